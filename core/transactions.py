"""A transaction that a concurrent one aborted (deadlock, serialization failure) is run again,
once: the lock order (runs/locking.py) makes such an abort rare, this makes it invisible."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from django.db import DatabaseError, transaction

from core.db_errors import is_transient_conflict

T = TypeVar("T")
logger = logging.getLogger(__name__)


def transaction_retried_once(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a transaction of its own; if PostgreSQL aborts it as a deadlock or a
    serialization failure, run it once more in a fresh one. A second such failure (or one
    inside a caller's outer transaction, which is aborted with it) is raised: the API answers
    it 409 ``concurrent_update``. ``fn`` decides on what it reads inside (or on what a
    compare-and-set inside confirms), so a retry decides on what the winner left."""
    nested = transaction.get_connection().in_atomic_block
    for attempt in (1, 2):
        try:
            with transaction.atomic():
                return fn()
        except DatabaseError as exc:
            if nested or attempt == 2 or not is_transient_conflict(exc):
                raise
            logger.warning("transaction aborted by a concurrent one (%s); retrying once", exc.__cause__)
    raise AssertionError("unreachable")
