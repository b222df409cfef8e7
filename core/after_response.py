"""Work a request leaves for after its answer has gone out.

Some work a request starts need not hold up its answer: the approval's answer need not wait
while the step it resumed is handed to a worker (``core.direct_admission``). ``after_response``
runs such work once the response has been sent — Django closes every response after sending
it, and ``request_finished`` fires on the request's own thread (the web process's request
threads, or a test client's) — or at once outside a request (a worker, a command).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from django.core.signals import request_finished, request_started

logger = logging.getLogger(__name__)

_here = threading.local()  # ``after``: this thread's request's deferred work, None outside one


def after_response(work: Callable[[], object]) -> None:
    """Run ``work`` after the current request's response is sent; at once outside a request."""
    deferred = getattr(_here, "after", None)
    if deferred is None:
        work()
    else:
        deferred.append(work)


def _request_started(**_: Any) -> None:
    # Work a request left here whose end never came to this thread (an aborted response) runs
    # now rather than being dropped.
    _run_deferred()
    _here.after = []


def _request_finished(**_: Any) -> None:
    _run_deferred()


def _run_deferred() -> None:
    deferred, _here.after = getattr(_here, "after", None) or [], None
    for work in deferred:
        try:
            work()
        except Exception:  # the answer is out: log, and let the rest run
            logger.exception("work deferred until after a response failed")


def connect() -> None:
    request_started.connect(_request_started, dispatch_uid="runwarden-after-response-start")
    request_finished.connect(_request_finished, dispatch_uid="runwarden-after-response-finish")
