"""Writes of the core app: API tokens, quotas, the event log."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Q
from django.utils import timezone

from core import rawsql
from core.access import member_role_check
from core.models import (
    BUILTIN_ENVIRONMENTS,
    ApiToken,
    Environment,
    Event,
    Membership,
    Role,
    Tenant,
    TenantQuota,
    User,
)

TOKEN_PREFIX = "rw_"

# Listeners called after the transaction that wrote an event commits (live push, metrics).
# Other apps register here from their AppConfig.ready; core knows nothing of them.
EventListener = Callable[[Event], None]
_event_listeners: list[EventListener] = []


def event_listener_register(listener: EventListener) -> None:
    if listener not in _event_listeners:
        _event_listeners.append(listener)


def _notify_event_listeners(event: Event) -> None:
    for listener in list(_event_listeners):
        listener(event)


# Enrichers add context to an event's payload before it is written (runs stamps the run's
# contract on every event about a run). Registered from AppConfig.ready, like listeners.
EventEnricher = Callable[[str, dict[str, Any]], dict[str, Any]]
_event_enrichers: list[EventEnricher] = []


def event_enricher_register(enricher: EventEnricher) -> None:
    if enricher not in _event_enrichers:
        _event_enrichers.append(enricher)


_EVENT_PAYLOAD = Event._meta.get_field("payload")
_EVENT_FIELDS = ["id", "tenant_id", "subject", "verb", "actor", "payload", "created_at"]


def event_record(
    *,
    tenant: Tenant | int,
    subject: str,
    verb: str,
    actor: str,
    payload: dict[str, Any] | None = None,
    prelude_sql: tuple[str, Sequence[Any]] = ("", ()),
) -> Event:
    """Append an event in the caller's transaction; listeners run only once it commits.
    ``prelude_sql``: a statement (ending in ``;``) and its parameters to run first in the same
    round trip: the change the event records."""
    sql, params, recorded = event_insert_sql(
        tenant=tenant, subject=subject, verb=verb, actor=actor, payload=payload
    )
    with connection.cursor() as cursor:
        if prelude_sql[0] and not rawsql.on_postgresql():  # SQLite runs one statement per call
            cursor.execute(prelude_sql[0].strip().rstrip(";"), prelude_sql[1])
            prelude_sql = ("", ())
        cursor.execute(f"{prelude_sql[0]}{sql} RETURNING id", [*prelude_sql[1], *params])
        event = recorded(cursor.fetchone()[0])
    transaction.on_commit(lambda: _notify_event_listeners(event))
    return event


def event_insert_sql(
    *, tenant: Tenant | int, subject: str, verb: str, actor: str, payload: dict[str, Any] | None = None
) -> tuple[str, list[Any], Callable[[int], Event]]:
    """The INSERT of an event (no ``;``: a caller may add ``RETURNING``), its parameters, and
    what builds the Event from its id once written. ``event_record`` sends it; a caller writing
    a whole transaction in one round trip sends it there, then calls ``event_committed``."""
    # A hand-written INSERT: events are written on every step, and the ORM's save costs more
    # than the statement. The instance is the one ``Event.objects.create`` would return.
    params, built = _event_row(tenant=tenant, subject=subject, actor=actor, payload=payload)
    params.insert(2, verb)
    sql = f"INSERT INTO core_event ({_EVENT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s)"
    return sql, params, lambda event_id: built(event_id, verb)


def event_insert_select_sql(
    *, tenant: Tenant | int, subject: str, verb_sql: str, actor: str, payload: dict[str, Any] | None = None
) -> tuple[str, list[Any], Callable[[int, str], Event]]:
    """An event's INSERT as ``INSERT ... SELECT`` (no ``WHERE``, no ``;``: a statement's CTE
    adds its condition), its verb the SQL expression ``verb_sql`` (it takes no parameter); its
    parameters; and what builds the Event from its id and verb once written."""
    params, built = _event_row(tenant=tenant, subject=subject, actor=actor, payload=payload)
    # Typed: a SELECT's parameters take no type from the columns they go to.
    values = (
        f"CAST(%s AS bigint), CAST(%s AS text), {verb_sql}, CAST(%s AS text), CAST(%s AS jsonb),"
        " CAST(%s AS timestamptz)"
    )
    return f"INSERT INTO core_event ({_EVENT_COLUMNS}) SELECT {values}", params, built


_EVENT_COLUMNS = "tenant_id, subject, verb, actor, payload, created_at"


def _event_row(
    *, tenant: Tenant | int, subject: str, actor: str, payload: dict[str, Any] | None
) -> tuple[list[Any], Callable[[int, str], Event]]:
    """An event's values but its verb (tenant, subject, actor, payload, created_at), adapted as
    parameters, and what builds the Event from its id and verb."""
    tenant_id = tenant if isinstance(tenant, int) else tenant.pk
    payload = payload or {}
    now = timezone.now()
    for enrich in _event_enrichers:
        payload = enrich(subject, payload)
    params = [
        tenant_id,
        subject,
        actor,
        _EVENT_PAYLOAD.get_db_prep_save(payload, connection),
        rawsql.adapt_datetime(now),
    ]

    def built(event_id: int, verb: str) -> Event:
        return Event.from_db(
            connection.alias, _EVENT_FIELDS, [event_id, tenant_id, subject, verb, actor, payload, now]
        )

    return params, built


def event_committed(event: Event) -> None:
    """An event written outside ``event_record`` has committed: its listeners run now."""
    _notify_event_listeners(event)


def _hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def api_token_issue(
    *, user: User, name: str = "", environment: str = "production", days: int | None = None
) -> str:
    """The secret of a new token (see ``api_token_create``)."""
    return api_token_create(user=user, name=name, environment=environment, days=days)[1]


def api_token_create(
    *, user: User, name: str = "", environment: str = "production", days: int | None = None
) -> tuple[ApiToken, str]:
    """Create a token for ``user`` and return its secret; only its hash is stored. Runs started
    with it run in ``environment`` unless a request names another: one of the built-in
    environments or one added by a tenant of the user (else ValueError). It expires after
    ``days`` (RUNWARDEN_TOKEN_DEFAULT_DAYS; at most RUNWARDEN_TOKEN_MAX_DAYS)."""
    known = {*BUILTIN_ENVIRONMENTS} | set(
        Environment.objects.filter(tenant__memberships__user=user).values_list("name", flat=True)
    )
    if environment not in known:
        raise ValueError(f"unknown environment {environment!r} (known: {', '.join(sorted(known))})")
    days = settings.RUNWARDEN_TOKEN_DEFAULT_DAYS if days is None else days
    if not 1 <= days <= settings.RUNWARDEN_TOKEN_MAX_DAYS:
        raise ValueError(f"a token lives from 1 to {settings.RUNWARDEN_TOKEN_MAX_DAYS} days")
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(
        user=user,
        name=name,
        environment=environment,
        prefix=raw[:10],
        token_hash=_hash_token(raw),
        expires_at=timezone.now() + timedelta(days=days),
    )
    return token, raw


def api_token_revoke(*, user: User, token_id: int) -> bool:
    """Revoke one of ``user``'s own tokens (conditional: a revoked token stays as it was).
    Returns False when no live token of theirs has that id."""
    return bool(
        ApiToken.objects.filter(pk=token_id, user=user, revoked_at__isnull=True).update(
            revoked_at=timezone.now()
        )
    )


def api_token_find(raw: str) -> ApiToken | None:
    """The live token ``raw`` is (with its active user), or None."""
    if not raw.startswith(TOKEN_PREFIX):
        return None
    now = timezone.now()
    # Every API call asks this: hand-written, it costs a third of what the ORM's query
    # building costs on top of the same statement.
    with connection.cursor() as cursor:
        rawsql.execute_prepared(
            cursor,
            f"SELECT {rawsql.select_list(ApiToken, 't')}, {rawsql.select_list(User, 'u')}"
            f" FROM {ApiToken._meta.db_table} t JOIN {User._meta.db_table} u ON u.id = t.user_id"
            " WHERE t.token_hash = %s AND t.revoked_at IS NULL AND u.is_active = %s"
            " AND (t.expires_at IS NULL OR t.expires_at > %s)",
            [_hash_token(raw), True, rawsql.adapt_datetime(now)],
        )
        row = cursor.fetchone()
    if row is None:
        return None
    token = rawsql.from_row(ApiToken, row)
    token.user = rawsql.from_row(User, row, rawsql.width(ApiToken))
    # Touch last_used_at at most once a minute, so API traffic does not write on every call
    # (nor send a statement: the token just read says whether it is due; the UPDATE's own
    # condition keeps concurrent requests from touching it twice).
    stale = now - timedelta(minutes=1)
    if token.last_used_at is None or token.last_used_at < stale:
        ApiToken.objects.filter(pk=token.pk).filter(
            Q(last_used_at__isnull=True) | Q(last_used_at__lt=stale)
        ).update(last_used_at=now)
    return token


class QuotaInvalid(ValueError):
    """A quota change that cannot be applied; ``fields`` maps each bad field to its message."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__("; ".join(f"{name}: {message}" for name, message in fields.items()))
        self.fields = fields


QUOTA_LIMITS = {"max_concurrent_steps": 100_000, "max_queue_depth": 10_000_000, "weight": 1000}
# Which mid-step lock wait gives way in a deadlock (core.deadlocks reads the tenant's).
DEADLOCK_POLICIES = ("kill_youngest_waiter", "kill_oldest_waiter")
CAP_KINDS = ("workflow", "lane", "tool")
CAP_MAX = 100_000

# What a tenant may put a cap on: {"workflow": [...], "lane": [...], "tool": [...]}. The runs
# app registers the names it knows (registered workflows, lanes, tools) from AppConfig.ready.
_cap_names: Callable[[], dict[str, list[str]]] = lambda: {kind: [] for kind in CAP_KINDS}  # noqa: E731


def quota_cap_names_register(provider: Callable[[], dict[str, list[str]]]) -> None:
    global _cap_names
    _cap_names = provider


def quota_cap_names() -> dict[str, list[str]]:
    return _cap_names()


# What must wait for a queue-depth change: the runs app registers the holding of every start
# in flight (runs.queue_depth), so a lowered depth applies after them and before any later one.
_queue_depth_change_waits: Callable[[int], None] = lambda tenant_id: None  # noqa: E731


def quota_queue_depth_change_register(wait: Callable[[int], None]) -> None:
    global _queue_depth_change_waits
    _queue_depth_change_waits = wait


def _merged_caps(current: dict[str, Any], changes: Any) -> dict[str, dict[str, int]]:
    """``current`` with ``changes`` ({kind: {name: cap or None}}) applied; None removes a cap."""
    if not isinstance(changes, dict):
        raise QuotaInvalid({"caps": "must be an object of workflow, lane and tool caps"})
    known = quota_cap_names()
    errors: dict[str, str] = {}
    merged = {kind: dict((current or {}).get(kind) or {}) for kind in CAP_KINDS}
    for kind, caps in changes.items():
        if kind not in CAP_KINDS:
            errors[f"caps.{kind}"] = f"unknown kind of cap (one of {', '.join(CAP_KINDS)})"
            continue
        if not isinstance(caps, dict):
            errors[f"caps.{kind}"] = "must be an object of name: cap"
            continue
        for name, cap in caps.items():
            if name not in known[kind]:
                errors[f"caps.{kind}.{name}"] = f"unknown {kind} (known: {', '.join(known[kind]) or 'none'})"
            elif cap is None:
                merged[kind].pop(name, None)
            elif isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= CAP_MAX:
                errors[f"caps.{kind}.{name}"] = (
                    f"must be a whole number from 1 to {CAP_MAX}, or null to remove"
                )
            else:
                merged[kind][name] = cap
    if errors:
        raise QuotaInvalid(errors)
    return {kind: dict(sorted(caps.items())) for kind, caps in merged.items() if caps}


@transaction.atomic
def tenant_quota_update(*, tenant: Tenant, actor: User, changes: dict[str, Any]) -> TenantQuota:
    """Set some of a tenant's quota: concurrent steps, queue depth, weight and ``caps``
    (merged: {kind: {name: cap}}, a null cap removes it). The row is locked, so two admins
    take turns; the change is an event and the next admission round applies it. A new queue
    depth waits for the starts in flight and applies to every later one."""
    errors = dict.fromkeys(set(changes) - {*QUOTA_LIMITS, "caps", "deadlock_policy"}, "unknown quota field")
    if "deadlock_policy" in changes and changes["deadlock_policy"] not in DEADLOCK_POLICIES:
        errors["deadlock_policy"] = f"must be one of {', '.join(DEADLOCK_POLICIES)}"
    for field, limit in QUOTA_LIMITS.items():
        value = changes.get(field)
        if field in changes and (
            isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit
        ):
            errors[field] = f"must be a whole number from 1 to {limit}"
    if errors:
        raise QuotaInvalid(errors)
    quota, _ = TenantQuota.objects.select_for_update().get_or_create(tenant=tenant)
    member_role_check(actor, tenant.pk, [Role.ADMIN], f"changing the quotas of {tenant.slug}")
    if "caps" in changes:
        changes = {**changes, "caps": _merged_caps(quota.caps, changes["caps"])}
    before = {field: getattr(quota, field) for field in changes}
    after = {field: value for field, value in changes.items() if before[field] != value}
    if not after:
        return quota
    if "max_queue_depth" in after:
        _queue_depth_change_waits(tenant.pk)
    for field, value in after.items():
        setattr(quota, field, value)
    quota.save(update_fields=[*after, "updated_at"])
    event_record(
        tenant=tenant,
        subject=f"tenant:{tenant.slug}",
        verb="quota_updated",
        actor=actor.get_username(),
        payload={"before": {field: before[field] for field in after}, "after": after},
    )
    return quota


class MembershipInvalid(ValueError):
    """A membership change that cannot be made (unknown user, last admin, ...)."""

    def __init__(self, message: str, *, code: str = "invalid_member", status: int = 422) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def _lock_tenant(tenant: Tenant, actor: User) -> None:
    """Membership changes of one tenant take turns on its row: "at least one admin remains"
    is then a check under the lock, never a race between two admins demoting each other.
    ``FOR NO KEY UPDATE``: rows that refer to the tenant (events, decisions) are still written
    meanwhile — ``FOR UPDATE`` would block their foreign-key checks and deadlock a decision
    that holds its decider's membership row."""
    Tenant.objects.select_for_update(no_key=True).filter(pk=tenant.pk).first()
    member_role_check(actor, tenant.pk, [Role.ADMIN], f"managing the members of {tenant.slug}")


def _close_member_sockets(tenant: Tenant, user: User) -> None:
    """After commit: the member's open live sockets for ``tenant`` close (they reconnect with
    the groups their memberships allow now)."""
    from core import live

    transaction.on_commit(
        lambda: live.group_send(
            live.user_group(user.pk), {"type": "membership.changed", "tenant_id": tenant.pk}
        )
    )


def _check_role(role: str) -> None:
    if role not in Role.values:
        raise MembershipInvalid(
            f"unknown role {role!r} (one of {', '.join(Role.values)})", code="invalid_role"
        )


@transaction.atomic
def membership_add(
    *, tenant: Tenant, actor: User, username: str, role: str, email: str = "", password: str = ""
) -> Membership:
    """Give a role in ``tenant`` to a new account (``username`` with a password that passes the
    password validators), or back to an account of this platform that belongs to no tenant
    now. An account that is a member of another tenant is not a tenant admin's to take (409,
    the same answer as any taken username: nothing about it is told). Audited."""
    from django.contrib.auth.password_validation import validate_password
    from django.core.exceptions import ValidationError

    _check_role(role)
    username = User.normalize_username(username.strip())
    if not username or len(username) > 150 or "\x00" in username:
        raise MembershipInvalid("a username of 1 to 150 characters is required", code="invalid_username")
    try:
        User._meta.get_field("username").run_validators(username)
    except ValidationError as bad:
        raise MembershipInvalid(" ".join(bad.messages), code="invalid_username") from bad
    _lock_tenant(tenant, actor)
    user = User.objects.filter(username=username).first()
    created = user is None
    if user is not None:
        if Membership.objects.filter(tenant=tenant, user=user).exists():
            raise MembershipInvalid(
                f"{username} is already a member: change the role instead", code="already_member", status=409
            )
        if Membership.objects.filter(user=user).exists():
            raise MembershipInvalid(f"the username {username} is taken", code="username_taken", status=409)
    else:
        if not password:
            raise MembershipInvalid(f"{username!r} has no account yet: give a password to create it")
        try:
            validate_password(password, User(username=username, email=email))
        except ValidationError as weak:
            raise MembershipInvalid(" ".join(weak.messages), code="weak_password") from weak
        try:
            with transaction.atomic():  # two tenants creating one username at once: one wins
                user = User.objects.create_user(username=username, email=email, password=password)
        except IntegrityError:
            raise MembershipInvalid(
                f"the username {username} is taken", code="username_taken", status=409
            ) from None
    membership = Membership.objects.create(tenant=tenant, user=user, role=role)
    _membership_changed(tenant, user, actor, "membership_added", {"role": role, "account_created": created})
    return membership


def _membership_changed(tenant: Tenant, user: User, actor: User, verb: str, payload: dict[str, Any]) -> None:
    """Audit a membership change and close the member's open sockets once it commits."""
    event_record(
        tenant=tenant,
        subject=f"user:{user.get_username()}",
        verb=verb,
        actor=actor.get_username(),
        payload=payload,
    )
    _close_member_sockets(tenant, user)


def _locked_membership(tenant: Tenant, user: User, actor: User) -> Membership | None:
    """``user``'s membership of ``tenant``, read under the tenant's lock (see _lock_tenant)."""
    _lock_tenant(tenant, actor)
    return Membership.objects.select_related("user").filter(tenant=tenant, user=user).first()


def _ensure_an_admin_remains(tenant: Tenant, leaving: Membership) -> None:
    if leaving.role != Role.ADMIN:
        return
    others = Membership.objects.filter(tenant=tenant, role=Role.ADMIN).exclude(pk=leaving.pk)
    if not others.exists():
        raise MembershipInvalid(
            f"{leaving.user.get_username()} is the last admin of {tenant.slug}: "
            "make someone else admin first",
            code="last_admin",
            status=409,
        )


@transaction.atomic
def membership_set_role(*, tenant: Tenant, actor: User, user: User, role: str) -> Membership:
    """Change a member's role; it applies at once (their open sockets close and reconnect)."""
    _check_role(role)
    membership = _locked_membership(tenant, user, actor)
    if membership is None:
        raise MembershipInvalid(
            f"{user.get_username()} is not a member of {tenant.slug}", code="not_found", status=404
        )
    if membership.role == role:
        return membership
    if role != Role.ADMIN:
        _ensure_an_admin_remains(tenant, membership)
    before = membership.role
    membership.role = role
    membership.save(update_fields=["role", "updated_at"])
    _membership_changed(tenant, user, actor, "membership_role_changed", {"before": before, "after": role})
    return membership


@transaction.atomic
def membership_revoke(*, tenant: Tenant, user: User, actor: User) -> bool:
    """Remove ``user``'s role in ``tenant``; their open live sockets for it are closed on commit.
    Returns False when there was no membership to remove; refuses to remove the last admin."""
    membership = _locked_membership(tenant, user, actor)
    if membership is None:
        return False
    _ensure_an_admin_remains(tenant, membership)
    membership.delete()
    _membership_changed(tenant, user, actor, "membership_revoked", {"role": membership.role})
    return True
