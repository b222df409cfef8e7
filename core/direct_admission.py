"""Direct admission: a step made ready by a request is admitted by the process that made it
ready, right after that commit, instead of by a dispatcher round.

An operator's approval resumes its step. Woken for it, the dispatcher would start a round —
the whole admission lock, the fair pass over every ready step, the round's bookkeeping — for
one step whose owner is known: measured here, the round was about ten of the 25–30 ms from
the approval to the step running. Instead, once the decision has committed and its answer has
gone out (``core.after_response``), the deciding process admits that one step in a short
transaction of its own, exactly as a worker admits its own next step (``runs.dispatch``: one
shard of the admission lock, every cap with room for all shards' admissions, a free worker
slot of its lane, its entity keys free and it first in line), and enqueues it.

Where the step does not fit now (a cap, a held key, no free slot), or anything fails, the
dispatcher is woken as before: a direct admission is only ever a faster path to what a round
would do. Nothing is lost if the process dies before it gets to the step: the step is ready
in the database, and the dispatcher's sweep admits it.

On SQLite (the embedded default) the dispatcher runs in the same process and one writer gets
in at a time: the dispatcher is simply woken.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

from django.db import connection, transaction

from core import rawsql
from core.after_response import after_response
from core.wakeups import wake_now, wake_on_commit

logger = logging.getLogger(__name__)

# Admits one ready step (by id) in a transaction of its own and enqueues it after that commit;
# whether it did. Registered by the runs app (core knows nothing of steps).
Admitter = Callable[[int], bool]
_admitter: Admitter | None = None


def admitter_register(admitter: Admitter) -> None:
    global _admitter
    _admitter = admitter


def admit_on_commit(step_id: int) -> None:
    """Once the current transaction commits (and a request's answer is out), admit ``step_id``
    (made ready by it) directly, or wake the dispatcher where that cannot be done here."""
    if _admitter is None or not rawsql.on_postgresql():
        wake_on_commit()
        return
    transaction.on_commit(partial(after_response, partial(admit_one, step_id)))


def admit_one(step_id: int) -> bool:
    """Admit ``step_id`` here, else wake the dispatcher; whether it was admitted here."""
    assert _admitter is not None
    try:
        # Prepared statements where the thread prepares (a web request thread keeping its
        # connection); RUNWARDEN_PREPARED_STATEMENTS=0 behind a transaction-pooling pgbouncer.
        admitted = _admitter(step_id)
    except Exception:
        logger.warning("direct admission of step %s failed; waking the dispatcher", step_id, exc_info=True)
        if not connection.in_atomic_block:
            connection.close()  # perhaps broken: the next use reconnects
        admitted = False
    if not admitted:
        wake_now()
    return admitted
