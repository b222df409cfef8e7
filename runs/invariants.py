"""Invariants a live system must hold, checked read-only (``manage.py check_invariants`` and the
``runwarden_invariant_violations`` gauge on /metrics).

Each check returns findings, a line each; none means the invariant holds. They read the state
as it is, so a transition in flight can show for an instant: checks that could see one (a
lease just expired, a step just admitted) allow a grace period and only report what outlasts
it. Other apps add their checks with ``check_register`` (approvals adds its own in ready()).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import CharField, Count, Exists, F, Max, OuterRef, Value
from django.db.models.functions import Concat
from django.utils import timezone

from core.leases import live_leases_filter
from core.models import Event, Lease
from runs.dispatch import load_room
from runs.models import Run, RunStatus, SessionState, Step, StepStatus
from runs.queue_depth import queue_depth_miscounts
from runs.transitions import ADMITTED, UNFINISHED_RUN_STATUSES

MAX_FINDINGS_PER_CHECK = 50


@dataclass(frozen=True)
class Finding:
    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.check}: {self.message}"


Check = Callable[[datetime], list[str]]
_checks: dict[str, Check] = {}


def check_register(name: str, check: Check) -> None:
    _checks[name] = check


def grace() -> timedelta:
    """How long a state may legitimately look inconsistent while its transition completes:
    the reaper's period plus the broker's re-send delay, and a margin."""
    return timedelta(
        seconds=settings.RUNWARDEN_REAP_EVERY_SECONDS + settings.RUNWARDEN_RESEND_AFTER_SECONDS + 5
    )


def check_invariants(now: datetime | None = None) -> list[Finding]:
    """Every finding of every registered check (at most MAX_FINDINGS_PER_CHECK each)."""
    now = now or timezone.now()
    findings: list[Finding] = []
    for name, check in _checks.items():
        findings += [Finding(name, message) for message in check(now)[:MAX_FINDINGS_PER_CHECK]]
    return findings


def violation_samples() -> list[tuple[dict[str, str], float]]:
    """For the gauge: findings per check (0 for a check that holds)."""
    counts = dict.fromkeys(_checks, 0)
    for finding in check_invariants():
        counts[finding.check] += 1
    return [({"check": name}, float(n)) for name, n in counts.items()]


def _caps(now: datetime) -> list[str]:
    room = load_room(now)
    return [
        f"{scope} has {room.held[scope]} live holders; its cap is {room.cap(scope)}"
        for scope in sorted(room.held)
        if room.cap(scope) is not None and room.held[scope] > (room.cap(scope) or 0)
    ]


def _admitted_without_lease(now: datetime) -> list[str]:
    """A step leased or running must own a live step lease (past a grace: the reaper's job)."""
    live = Lease.objects.filter(
        live_leases_filter(now), pk=OuterRef("lease_id"), token=OuterRef("lease_token")
    )
    stale = (
        Step.objects.filter(status__in=ADMITTED, updated_at__lt=now - grace())
        .filter(~Exists(live))
        .values_list("run_id", "key", "status")
    )
    return [f"step {run_id}:{key} is {status} without a live lease" for run_id, key, status in stale[:100]]


def _lease_without_step(now: datetime) -> list[str]:
    """Every live lease held for a step belongs to a step that is admitted right now."""
    leases = list(
        Lease.objects.filter(
            live_leases_filter(now), metadata__has_key="step_id", acquired_at__lt=now - grace()
        ).only("key", "token", "metadata")[:1000]
    )
    steps = Step.objects.in_bulk([lease.metadata.get("step_id") for lease in leases])
    findings = []
    for lease in leases:
        step_id = lease.metadata.get("step_id")
        step = steps.get(step_id)
        if step is None or step.status not in ADMITTED:
            state = "gone" if step is None else step.status
            findings.append(
                f"lease {lease.key} (token {lease.token}) is live but its step {step_id} is {state}"
            )
        elif lease.key.startswith("step:") and step.lease_token != lease.token:
            findings.append(
                f"lease {lease.key} (token {lease.token}) is live but the step holds token {step.lease_token}"
            )
    return findings


def _sessions(now: datetime) -> list[str]:
    """No session has more runs active than its workflows allow."""
    busy = (
        Run.objects.filter(session_state=SessionState.ACTIVE)
        .values("tenant_id", "session_key")
        .annotate(n=Count("id"), limit=Max("session_max"))
        .filter(n__gt=F("limit"))
    )
    return [
        f"session {row['session_key']!r} of tenant {row['tenant_id']} has {row['n']} active runs; "
        f"at most {row['limit']} may be"
        for row in busy
    ]


def _runs_explained(now: datetime) -> list[str]:
    """Every unfinished run is doing something or waiting for something nameable: a step
    ready (admission: a lock, a cap, a backoff), admitted, parked for a human (approval,
    conflict), or its session turn. A compensation in progress has a step left to run."""
    moving = Step.objects.filter(
        run_id=OuterRef("pk"),
        status__in=[
            StepStatus.READY,
            StepStatus.LEASED,
            StepStatus.RUNNING,
            StepStatus.WAITING_APPROVAL,
            StepStatus.CONFLICT,
        ],
    )
    stuck = (
        Run.objects.filter(status__in=UNFINISHED_RUN_STATUSES, updated_at__lt=now - grace())
        .exclude(session_state=SessionState.WAITING)
        .filter(~Exists(moving))
        .values_list("pk", "status")
    )
    findings = [f"run {run_id} is {status} with nothing to run or wait for" for run_id, status in stuck[:100]]
    compensating = (
        Run.objects.filter(compensation="running", updated_at__lt=now - grace())
        .filter(~Exists(moving.filter(compensates__gt="")))
        .exclude(
            Exists(Step.objects.filter(run_id=OuterRef("pk"), compensates__gt="", status=StepStatus.PENDING))
        )
        .values_list("pk", flat=True)
    )
    findings += [
        f"run {run_id} is compensating with no compensation step left" for run_id in compensating[:100]
    ]
    return findings


TERMINAL_EVENTS = {
    RunStatus.SUCCEEDED: ("run_succeeded",),
    RunStatus.FAILED: ("run_failed",),
    RunStatus.CANCELLED: ("cancelled",),
    RunStatus.EXPIRED: ("run_expired",),
}


def _events_match_states(now: datetime) -> list[str]:
    """Every finished run has the event that finished it."""
    findings = []
    for status, verbs in TERMINAL_EVENTS.items():
        recorded = Event.objects.filter(
            tenant_id=OuterRef("tenant_id"), subject=OuterRef("subject"), verb__in=verbs
        )
        missing = (
            Run.objects.filter(status=status)
            .annotate(subject=Concat(Value("run:"), "pk", output_field=CharField()))
            .filter(~Exists(recorded))
            .values_list("pk", flat=True)
        )
        findings += [
            f"run {run_id} is {status} but no {'/'.join(verbs)} event says so" for run_id in missing[:100]
        ]
    return findings


for _name, _check in {
    "caps": _caps,
    "admitted_without_lease": _admitted_without_lease,
    "lease_without_step": _lease_without_step,
    "sessions": _sessions,
    "runs_explained": _runs_explained,
    "events_match_states": _events_match_states,
    "queue_depth_counted": lambda now: queue_depth_miscounts(),
}.items():
    check_register(_name, _check)
