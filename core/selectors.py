"""Reads that every request goes through: which tenants a user may see, and in which role.

Another tenant's object is a 404, never a 403, so that ids do not leak across tenants; a
member without the needed role gets a 403.
"""

from __future__ import annotations

from typing import TypeVar

from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import PermissionDenied
from django.db import connection
from django.db.models import Model, QuerySet
from django.http import Http404

from core import rawsql
from core.models import ApiToken, Event, Membership, Role, Tenant, TenantQuota, User

M = TypeVar("M", bound=Model)
AnyUser = User | AnonymousUser

# What each role may do; an admin may do everything.
ROLE_GRANTS: dict[str, frozenset[str]] = {
    Role.OPERATOR: frozenset({Role.OPERATOR}),
    Role.REVIEWER: frozenset({Role.REVIEWER}),
    Role.ADMIN: frozenset({Role.OPERATOR, Role.REVIEWER, Role.ADMIN}),
}


def tenants_for_user(user: AnyUser) -> QuerySet[Tenant]:
    if not user.is_authenticated:
        return Tenant.objects.none()
    return Tenant.objects.filter(memberships__user=user).order_by("slug", "id")


def memberships_for_user(user: User) -> QuerySet[Membership]:
    return Membership.objects.filter(user=user).select_related("tenant").order_by("tenant__slug", "id")


def scope_to_user(queryset: QuerySet[M], user: AnyUser, tenant_field: str = "tenant") -> QuerySet[M]:
    """Restrict ``queryset`` to rows of the tenants ``user`` belongs to. A subquery, not a join
    through memberships: no row is repeated, so no DISTINCT (which would sort every row of a
    big table before a LIMIT)."""
    if not user.is_authenticated:
        return queryset.none()
    tenant_ids = Membership.objects.filter(user=user).values("tenant_id")
    return queryset.filter(**{f"{tenant_field}__in": tenant_ids})


def user_can(user: User, tenant: Tenant, role: str) -> bool:
    membership = Membership.objects.filter(user=user, tenant=tenant).only("role").first()
    return membership is not None and role in ROLE_GRANTS[membership.role]


def get_tenant_for_user(user: AnyUser, slug: str, *, role: str | None = None) -> Tenant:
    """The tenant ``slug`` if ``user`` is a member (else 404) holding ``role`` (else 403)."""
    row = None
    if user.is_authenticated:
        # Every tenant-scoped request asks this: hand-written (core.rawsql), not built by the ORM.
        with connection.cursor() as cursor:
            rawsql.execute_prepared(
                cursor,
                f"SELECT m.role, {rawsql.select_list(Tenant, 't')} FROM {Membership._meta.db_table} m"
                f" JOIN {Tenant._meta.db_table} t ON t.id = m.tenant_id WHERE m.user_id = %s AND t.slug = %s",
                [user.pk, slug],
            )
            row = cursor.fetchone()
    if row is None:
        raise Http404("No such tenant.")
    if role is not None and role not in ROLE_GRANTS[row[0]]:
        raise PermissionDenied(f"This needs the {role} role in {slug}.")
    return rawsql.from_row(Tenant, row, 1)


def quota_for_tenant(tenant: Tenant) -> TenantQuota:
    """The tenant's quota; a tenant without a row gets the defaults (not saved)."""
    return TenantQuota.objects.filter(tenant=tenant).first() or TenantQuota(tenant=tenant)


def members_of_tenant(tenant: Tenant) -> QuerySet[Membership]:
    return Membership.objects.filter(tenant=tenant).select_related("user").order_by("user__username", "id")


def member_user(tenant: Tenant, username: str) -> User:
    """The member ``username`` of ``tenant``; anyone else (or nobody) is a 404."""
    membership = (
        Membership.objects.select_related("user").filter(tenant=tenant, user__username=username).first()
    )
    if membership is None:
        raise Http404("No such member.")
    return membership.user


AUDIT_PAGE_SIZE = 50


def tenant_events(
    tenant: Tenant,
    *,
    actor: str = "",
    verb: str = "",
    subject: str = "",
    before: int | None = None,
    limit: int = AUDIT_PAGE_SIZE,
) -> tuple[list[Event], int | None]:
    """A page of the tenant's events, newest first: exact actor and verb, subject by prefix
    (``run:`` for every run, ``user:ann``), ``before`` an event id. Returns the page and the
    cursor of the next one (None at the end)."""
    events = Event.objects.filter(tenant=tenant)
    if actor:
        events = events.filter(actor=actor)
    if verb:
        events = events.filter(verb=verb)
    if subject:
        events = events.filter(subject__startswith=subject)
    if before is not None:
        events = events.filter(pk__lt=before)
    page = list(events.order_by("-pk")[: limit + 1])
    return page[:limit], (page[limit - 1].pk if len(page) > limit else None)


def tokens_of_user(user: User) -> QuerySet[ApiToken]:
    return ApiToken.objects.filter(user=user).order_by("-created_at", "-id")
