from __future__ import annotations

from django.contrib import admin
from django.contrib.auth.admin import UserAdmin

from core.models import ApiToken, Event, Membership, Tenant, TenantQuota, User

admin.site.register(User, UserAdmin)


class MembershipInline(admin.TabularInline[Membership, Tenant]):
    model = Membership
    extra = 0


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin[Tenant]):
    list_display = ["slug", "name", "created_at"]
    inlines = [MembershipInline]


@admin.register(TenantQuota)
class TenantQuotaAdmin(admin.ModelAdmin[TenantQuota]):
    list_display = ["tenant", "max_concurrent_steps", "max_queue_depth", "weight"]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin[ApiToken]):
    list_display = ["prefix", "user", "name", "created_at", "last_used_at", "revoked_at"]
    readonly_fields = ["prefix", "token_hash", "created_at", "last_used_at"]


@admin.register(Event)
class EventAdmin(admin.ModelAdmin[Event]):
    list_display = ["id", "tenant", "subject", "verb", "actor", "created_at"]
    list_filter = ["tenant", "verb"]

    def has_change_permission(self, request: object, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: object, obj: object = None) -> bool:
        return False
