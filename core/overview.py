"""The overview page's sections. Each app registers what it can say about the tenants a user
belongs to (runs: work in flight and finished; approvals: what waits for a human), from its
AppConfig.ready; core knows nothing of them and renders each with its own template."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.utils import timezone

# (tenant ids, {tenant id: slug}, now) -> the section's context
SectionProvider = Callable[[Sequence[int], dict[int, str], datetime], dict[str, Any]]


@dataclass(frozen=True)
class Section:
    name: str
    template: str
    provider: SectionProvider
    order: int


_sections: list[Section] = []


def overview_section_register(
    name: str, template: str, provider: SectionProvider, *, order: int = 50
) -> None:
    """Sections are shown by ``order`` (what waits for people comes first)."""
    if name not in {s.name for s in _sections}:
        _sections.append(Section(name, template, provider, order))
        _sections.sort(key=lambda s: s.order)


def overview_sections(tenants: dict[int, str], now: datetime | None = None) -> list[dict[str, Any]]:
    now = now or timezone.now()
    ids = sorted(tenants)
    return [
        {"name": s.name, "template": s.template, "data": s.provider(ids, tenants, now)} for s in _sections
    ]


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile of ``values`` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]
