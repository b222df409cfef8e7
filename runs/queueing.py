"""Handing admitted steps to Celery, by task name: domain code never imports its own task
module (the tasks import the services, not the other way round)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

from kombu import Producer
from redis.exceptions import ResponseError

from core.celery import app

logger = logging.getLogger(__name__)

EXECUTE_STEP_TASK = "runs.execute_step"


def enqueue_step(step_id: int, token: int, lane: str) -> None:
    """Send an admitted step to its lane's queue. If the broker is down, the dispatcher's
    sweep re-sends it (same token) and, past the pickup timeout, the step is admitted anew:
    nothing is lost, and a duplicate delivery exits without running."""
    enqueue_steps([(step_id, token, lane)])


def enqueue_steps(admitted: Iterable[tuple[int, int, str]]) -> None:
    """``enqueue_step`` for each (step id, token, lane), over one producer (a round sends many):
    together in one write to the broker where it can (``_together``); where that write does not
    reach Redis whole (a connection it dropped: the write is not retried), one by one again, each
    under kombu's reconnect-and-retry as a lone send is. Some of the first write may have
    arrived: a step delivered twice runs once (its token). What Redis refuses (a key the broker's
    user may not write) is left to the sweep, as a lone send's refusal is."""
    sends = list(admitted)
    try:
        with app.producer_or_acquire() as producer:
            try:
                with _together(producer):
                    for step_id, token, lane in sends:
                        _send(producer, step_id, token, lane)
            except Exception as failed:
                if isinstance(failed.__cause__, ResponseError):
                    raise  # Redis took the write and refused some of it: the rest arrived
                logger.warning(
                    "sending steps %s together failed; sending them one by one", _ids(sends), exc_info=True
                )
                for step_id, token, lane in sends:
                    _send(producer, step_id, token, lane)
    except Exception:  # the producer, or a write Redis refused in part (a lone send logs its own)
        logger.warning(
            "enqueuing steps %s failed; the dispatcher's sweep will re-send those not sent",
            _ids(sends),
            exc_info=True,
        )


def _ids(sends: list[tuple[int, int, str]]) -> list[int]:
    return [step_id for step_id, _, _ in sends]


def _together(producer: Producer) -> AbstractContextManager[object]:
    """The sends made within go to the broker together as the block ends, in one write (kombu's
    publish batch: one Redis pipeline), not one round trip each: a round's many sends cost the
    dispatcher about a millisecond apiece under load. Where kombu does not batch (the embedded
    default's in-memory transport; Redis with retries set in its transport options), one each."""
    batch = getattr(producer, "batch", None)
    return batch() if batch is not None else nullcontext()


def _send(producer: Producer, step_id: int, token: int, lane: str) -> None:
    try:
        app.send_task(
            EXECUTE_STEP_TASK,
            kwargs={"step_id": step_id, "token": token},
            queue=lane,
            producer=producer,
            # Sent by queue name through the broker's default exchange, which needs no queue
            # declared (Redis and memory:// make a queue's list with its first message).
            # Celery's default would declare the lane's queue, under its retry policy, on
            # every send: a quarter of a send's time.
            declare=[],
            # What Celery would show for them, without its generic repr of each argument.
            argsrepr="()",
            kwargsrepr=f"{{'step_id': {step_id}, 'token': {token}}}",
        )
    except Exception:
        logger.warning(
            "could not enqueue step %s; the dispatcher's sweep will re-send it", step_id, exc_info=True
        )
