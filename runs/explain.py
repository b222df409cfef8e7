"""Why is a step not running? The run page and the ownership board answer it for every step
that waits: for a predecessor, its session turn, a retry backoff, an entity lock (and who holds
it), a full cap (and its holders), a free worker, or a human (an approval, a conflict).

Reads only, in a fixed number of queries for any number of steps: the locks the steps need, the
scopes' live holders (one grouped query, as admission counts them), and what the approvals app
says about the steps parked for a human (registered from its AppConfig.ready).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from core.leases import live_leases_filter
from core.models import Lease
from runs.dispatch import Candidate, Room, load_room
from runs.models import Run, SessionState, Step, StepStatus


@dataclass
class Wait:
    """What one step waits for. ``kind`` names it for the page (and tests); ``text`` says it
    once, in plain words: the holder run, the times and the lease's fencing token are fields
    the page shows beside it (the token only when asked for)."""

    # predecessor | session | backoff | lock | cap | workers | admissible | admitted | running | human
    kind: str
    text: str
    until: datetime | None = None
    key: str = ""
    holder_run: str = ""
    holder_step: str = ""
    holders: list[str] = field(default_factory=list)
    link: str = ""
    since: datetime | None = None
    token: int | None = None


# What the approvals app knows: for the steps parked for a human, their Wait.
HumanWaits = Callable[[Sequence[Step]], dict[int, Wait]]
_human_waits: list[HumanWaits] = []


def human_waits_register(describe: HumanWaits) -> None:
    if describe not in _human_waits:
        _human_waits.append(describe)


def _run_url(run_id: str) -> str:
    return reverse("runs:run-detail", args=[run_id])


def explain_run(run: Run, steps: Sequence[Step], now: datetime | None = None) -> dict[int, Wait]:
    """A Wait for every step of ``run`` that is not finished."""
    now = now or timezone.now()
    waits: dict[int, Wait] = {}
    previous: Step | None = None
    ready = []
    for step in sorted(steps, key=lambda s: s.position):
        if step.status == StepStatus.PENDING:
            if run.session_key and run.session_state == SessionState.WAITING:
                waits[step.pk] = Wait("session", f"waits its turn in session {run.session_key}")
            elif previous is not None and previous.status != StepStatus.SUCCEEDED:
                waits[step.pk] = Wait(
                    "predecessor",
                    f"waits for step {previous.key} ({previous.status})",
                    link=f"#step-{previous.key}",
                )
            else:
                waits[step.pk] = Wait("predecessor", "waits for the run to reach it")
        elif step.status == StepStatus.READY:
            ready.append(step)
        elif step.status == StepStatus.LEASED:
            waits[step.pk] = Wait(
                "admitted",
                f"admitted, waiting for a free worker of lane {step.lane} to pick it up",
                since=step.enqueued_at,
            )
        elif step.status == StepStatus.RUNNING:
            waits[step.pk] = Wait("running", f"running (attempt {step.attempt} of {step.max_attempts})")
        previous = step
    waits.update(explain_ready(ready, run_workflows={run.pk: run.workflow}, now=now))
    parked = [s for s in steps if s.status in (StepStatus.WAITING_APPROVAL, StepStatus.CONFLICT)]
    for describe in _human_waits:
        waits.update(describe(parked))
    return waits


def explain_ready(
    steps: Sequence[Step],
    *,
    run_workflows: dict[str, str],
    now: datetime | None = None,
    room: Room | None = None,
) -> dict[int, Wait]:
    """Why each ready step is not admitted yet, in the order admission checks it."""
    now = now or timezone.now()
    if not steps:
        return {}
    room = room or load_room(now)
    holders = _lock_holders(steps, now)
    waits: dict[int, Wait] = {}
    cap_holders: dict[str, list[str]] = {}
    for step in steps:
        if step.available_at and step.available_at > now:
            waits[step.pk] = Wait(
                "backoff",
                f"retry backoff after attempt {step.attempt} of {step.max_attempts}",
                until=step.available_at,
            )
            continue
        held = [
            holders[(step.tenant_id, key)]
            for key in step.lock_keys
            if isinstance(key, str) and (step.tenant_id, key) in holders
        ]
        mine = [lease for lease in held if lease.metadata.get("run_id") != step.run_id]
        if mine and step.lock_policy == "wait":
            lease = mine[0]
            holder_run = str(lease.metadata.get("run_id") or "")
            held_by_run = holder_run.startswith("run_")
            waits[step.pk] = Wait(
                "lock",
                # A run holding it is named (and linked) beside the text; any other holder here.
                f"waits for the lock {lease.key}" + ("" if held_by_run else f", held by {lease.holder}"),
                until=lease.expires_at,
                key=lease.key,
                holder_run=holder_run if held_by_run else "",
                holder_step=str(lease.metadata.get("step_key") or ""),
                link=_run_url(holder_run) if held_by_run else "",
                token=lease.token,
            )
            continue
        candidate = Candidate(
            step_id=step.pk,
            tenant_id=step.tenant_id,
            run_id=step.run_id,
            key=step.key,
            lane=step.lane,
            tool=step.tool,
            workflow=run_workflows.get(step.run_id, ""),
            lock_keys=tuple(step.lock_keys),
            lock_policy=step.lock_policy,
        )
        full = [scope for scope in candidate.scopes() if room.full(scope)]
        if full:
            scope = full[0]
            if scope not in cap_holders:
                cap_holders[scope] = _scope_holders(scope, candidate)
            if scope.startswith(("tenant:", "tenant_")):
                used = f"{room.held[scope]} of {room.cap(scope)} admitted"
                text = f"the cap of {_scope_label(scope)} is full: {used}"
            else:
                # A platform-wide scope is shared: how much of it other tenants hold is theirs.
                yours = len(cap_holders[scope])
                text = (
                    f"the platform's cap of {_scope_label(scope)} is full (shared by every tenant; "
                    f"{yours}{'+' if yours >= 5 else ''} of the admitted steps are yours)"
                )
            waits[step.pk] = Wait("cap", text, key=scope, holders=cap_holders[scope])
            continue
        if not room.worker_room(step.lane):
            waits[step.pk] = Wait("workers", f"no free worker slot serves lane {step.lane}")
            continue
        waits[step.pk] = Wait("admissible", "the next admission round takes it (within a second)")
    return waits


def _lock_holders(steps: Iterable[Step], now: datetime) -> dict[tuple[int, str], Lease]:
    wanted = {(step.tenant_id, key) for step in steps for key in step.lock_keys if isinstance(key, str)}
    if not wanted:
        return {}
    condition = Q()
    by_tenant: dict[int, list[str]] = defaultdict(list)
    for tenant_id, key in wanted:
        by_tenant[tenant_id].append(key)
    for tenant_id, keys in by_tenant.items():
        condition |= Q(tenant_id=tenant_id, key__in=keys)
    live = Lease.objects.filter(live_leases_filter(now)).filter(condition)
    return {(lease.tenant_id, lease.key): lease for lease in live}


def _scope_label(scope: str) -> str:
    kind, _, name = scope.partition(":")
    if kind.startswith("tenant_"):
        return f"the tenant's {kind.removeprefix('tenant_')} {name.split(':', 1)[1]}"
    if kind == "tenant":
        return "the tenant"
    if kind == "global":
        return "the platform"
    return f"{kind} {name}"


def _scope_holders(scope: str, candidate: Candidate, limit: int = 5) -> list[str]:
    """Up to ``limit`` runs of the step's own tenant holding room in ``scope`` (one query per
    full scope shown). Another tenant's runs are never named, even in a platform-wide scope."""
    kind, _, _ = scope.partition(":")
    admitted = Step.objects.filter(
        status__in=[StepStatus.LEASED, StepStatus.RUNNING], tenant_id=candidate.tenant_id
    )
    filters: dict[str, dict[str, Any]] = {
        "global": {},
        "tenant": {"tenant_id": candidate.tenant_id},
        "workflow": {"run__workflow": candidate.workflow},
        "lane": {"lane": candidate.lane},
        "tool": {"tool": candidate.tool},
        "tenant_workflow": {"tenant_id": candidate.tenant_id, "run__workflow": candidate.workflow},
        "tenant_lane": {"tenant_id": candidate.tenant_id, "lane": candidate.lane},
        "tenant_tool": {"tenant_id": candidate.tenant_id, "tool": candidate.tool},
    }
    rows = admitted.filter(**filters.get(kind, {})).order_by("pk").values_list("run_id", flat=True)[:limit]
    return list(rows)
