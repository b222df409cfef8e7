"""What PostgreSQL will not store, found before it is asked to: shared by the API's request
schemas (core.api) and workflow input validation (runs.definitions)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

NON_FIELD = "__all__"  # the path of an error about the value as a whole, as in Django forms
NUL_MESSAGE = "NUL characters (\\u0000) are not allowed"
NUL_KEY_MESSAGE = "NUL characters (\\u0000) are not allowed in keys"
NOT_FINITE_MESSAGE = "Input should be a finite number"
SURROGATE_MESSAGE = "unpaired surrogate characters (\\ud800-\\udfff) are not allowed"
# jsonb (UTF-8) refuses a surrogate code point, which only UTF-16 pairs into a character.
_SURROGATE = re.compile("[\ud800-\udfff]")


def dotted_path(loc: Sequence[str | int]) -> str:
    """``("changes", "stage")`` -> "changes.stage"; the empty path is NON_FIELD. A NUL in a key
    is spelt out, so the path itself can be shown, logged and stored."""
    return ".".join(str(part).replace("\x00", "\\u0000") for part in loc) or NON_FIELD


def unstorable_values(value: Any, path: tuple[str | int, ...] = ()) -> dict[str, str]:
    """{dotted path: message} for each place in a JSON-like value that PostgreSQL refuses: a NUL
    character in a key or string (text and jsonb both refuse it), a NaN or infinite number (not
    JSON, though Python's json module reads and writes them), an unpaired surrogate (a "\\ud800"
    escape JSON lets through and UTF-8 cannot hold). Empty when the value is storable."""
    found: dict[str, str] = {}
    if isinstance(value, str):
        if "\x00" in value:
            found[dotted_path(path)] = NUL_MESSAGE
        elif _SURROGATE.search(value):
            found[dotted_path(path)] = SURROGATE_MESSAGE
    elif isinstance(value, float):
        if not math.isfinite(value):
            found[dotted_path(path)] = NOT_FINITE_MESSAGE
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str) and "\x00" in key:
                found[dotted_path((*path, key))] = NUL_KEY_MESSAGE
            else:
                found.update(unstorable_values(item, (*path, key)))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found.update(unstorable_values(item, (*path, index)))
    return found


def json_unstorable_reason(value: Any) -> str:
    """Why PostgreSQL cannot store ``value`` as JSON ("" when it can): a value the json module
    cannot write (a coroutine, a datetime, a set), or one PostgreSQL refuses (a NUL, a NaN)."""
    found = unstorable_values(value)
    if found:
        path, message = next(iter(found.items()))
        return f"{message} (at {path})"
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return ""


def fingerprint(value: Any) -> str:
    """A stable hash of a JSON-able value (key order and spacing do not matter)."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
