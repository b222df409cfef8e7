"""Template helpers of the console."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django import template
from django.utils.dateformat import format as date_format
from django.utils.html import format_html
from django.utils.safestring import SafeString

register = template.Library()


@register.filter
def when(value: datetime | None, fmt: str = "Y-m-d H:i:s") -> SafeString | str:
    """A moment as ``<time>``: UTC in the page, shown in the reader's timezone (with how long
    ago) by static/js/live.js; "—" for none."""
    if value is None or value == "":
        return "—"
    kind = "time" if fmt in ("H:i:s", "H:i") else "datetime"
    return format_html(
        '<time datetime="{}" data-local="{}">{}</time>', value.isoformat(), kind, date_format(value, fmt)
    )


@register.filter
def key_words(value: str) -> SafeString:
    """A raw key in words (``lease_expired_with_pending_effect``: "lease expired with pending
    effect"), which wrap between words; the key itself stays on hover."""
    return format_html('<span title="{}">{}</span>', value, words(value))


@register.filter
def words(value: str) -> str:
    """A raw key as plain words, for where markup cannot go (an ``<option>``, an attribute)."""
    return str(value).replace("_", " ")


# Where a state's key alone reads as jargon, what it says instead, by what it is the state of
# ("run", "step", "effect", "approval"); any other key reads with spaces for underscores. A run
# stays pending until a worker starts its first step, while that step already says "ready" (or
# "admitted"): the run's badge says it has not started rather than a second word for waiting.
STATE_WORDS: dict[tuple[str, str], str] = {
    ("run", "pending"): "waiting to start",
    ("step", "leased"): "admitted",
    ("run", "waiting_approval"): "waiting for approval",
    ("step", "waiting_approval"): "waiting for approval",
    ("call", "awaiting_approval"): "waiting for approval",
    ("call", "waiting"): "waiting for its locks or a slot",
}


@register.filter
def state_words(status: str, of: str = "") -> str:
    """A status in words: ``STATE_WORDS``, else the key with spaces."""
    return STATE_WORDS.get((of, status)) or words(status)


@register.filter
def state_badge(status: str, of: str = "") -> SafeString:
    """A status badge in words (``state_words``), the key on hover."""
    text = state_words(status, of)
    return format_html('<span class="badge status-{}" title="{}">{}</span>', status, status, text)


@register.simple_tag(takes_context=True)
def nav_mark(context: dict[str, Any], section: str) -> SafeString | str:
    """` aria-current="page"` (or "true" inside the section) on the link of the current
    page's section (core.context_processors: nav_current), else nothing."""
    current = context.get("nav_current", {}).get(section)
    return format_html(' aria-current="{}"', current) if current else ""
