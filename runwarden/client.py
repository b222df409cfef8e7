"""A thin typed client for agents that run outside Runwarden: entity leases with fencing tokens,
the side-effect ledger, and a human's decision on a proposed action, over the HTTP API
(``/api/v1/leases/...``, ``/api/v1/effects``, ``/api/v1/outside/approvals``). The standard
library only; ``AsyncRunwarden`` runs the same calls off the event loop.

    rw = Runwarden("http://127.0.0.1:8000", token="...", tenant="acme")
    lease = rw.acquire("crm_contact:42", holder="billing-agent", ttl=30)
    refund = rw.effect("refund-ticket-981", "payments.refund", lambda: payments.refund(...),
                       request={"amount": "150.00"}, lease=lease)   # once, even when retried
    rw.release(lease)
    decided = rw.decision(rw.ask_approval("payments.refund", {"amount": "150.00"}), wait=60)

A write made with a lease that expired, was released or was taken over is refused
(``StaleToken``): acquire the lease again and re-read before writing.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any


class RunwardenError(Exception):
    """The API refused the call: ``status``, ``code`` and ``details`` as its error body says."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.details = details or {}


class LeaseHeld(RunwardenError):
    """Someone else holds the key (``details``: holder, expires_at)."""


class StaleToken(RunwardenError):
    """The token no longer holds its key: the write was refused."""


class EffectUnresolved(RunwardenError):
    """The effect's proposer is still at it (``effect_in_flight``), or vanished mid-way and a
    human must check whether it happened (``effect_ambiguous``)."""


ERRORS = {
    "lease_held": LeaseHeld,
    "stale_token": StaleToken,
    "effect_in_flight": EffectUnresolved,
    "effect_ambiguous": EffectUnresolved,
}


@dataclass(frozen=True)
class Lease:
    key: str
    token: int
    expires_at: str


class Runwarden:
    def __init__(self, base_url: str, *, token: str, tenant: str = "", timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.tenant = tenant
        self.timeout = timeout

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps({"tenant": self.tenant, **body}).encode()
        return self._call(path, data, "POST")

    def _call(
        self, path: str, data: bytes | None, method: str, timeout: float | None = None
    ) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.base_url}/api/v1{path}",
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                raw = response.read()
                answer: dict[str, Any] = json.loads(raw) if raw else {}
                answer["_status"] = response.status
                return answer
        except urllib.error.HTTPError as refused:
            error = json.loads(refused.read() or b"{}").get("error", {})
            kind = ERRORS.get(error.get("code", ""), RunwardenError)
            raise kind(
                refused.code, error.get("code", "error"), error.get("message", ""), error.get("details")
            ) from None

    def acquire(self, key: str, *, holder: str, ttl: float = 30.0) -> Lease:
        """The key's lease (LeaseHeld while someone else holds it)."""
        answer = self._post("/leases/acquire", {"key": key, "holder": holder, "ttl_seconds": ttl})
        return Lease(answer["key"], answer["token"], answer["expires_at"])

    def renew(self, lease: Lease, *, ttl: float = 30.0) -> Lease:
        """Extend it (StaleToken when it is no longer yours)."""
        answer = self._post("/leases/renew", {"key": lease.key, "token": lease.token, "ttl_seconds": ttl})
        return Lease(answer["key"], answer["token"], answer["expires_at"])

    def release(self, lease: Lease) -> None:
        self._post("/leases/release", {"key": lease.key, "token": lease.token})

    def propose(
        self, key: str, kind: str, *, request: dict[str, Any], lease: Lease | None = None
    ) -> dict[str, Any]:
        """Step 1 of an effect: ``status`` proposed (yours to perform, then ``report``) or
        committed (it happened: ``result``; do not act again)."""
        fence = {"lease_key": lease.key, "token": lease.token} if lease else {}
        return self._post("/effects", {"idempotency_key": key, "kind": kind, "request": request, **fence})

    def report(
        self,
        key: str,
        *,
        outcome: str,
        result: Any = None,
        external_ref: str = "",
        error: str = "",
        lease: Lease | None = None,
    ) -> dict[str, Any]:
        """Step 2: what happened (``committed`` with its result, or ``failed``: it did not)."""
        body = {
            "idempotency_key": key,
            "outcome": outcome,
            "result": result,
            "external_ref": external_ref,
            "error": error,
            "token": lease.token if lease else None,
        }
        return self._post("/effects/outcome", body)

    def ask_approval(
        self,
        kind: str,
        action: dict[str, Any],
        *,
        required: int = 1,
        timeout_seconds: float | None = None,
        idempotency_key: str = "",
    ) -> str:
        """Ask a human to decide on ``action`` (it shows in the inbox): the decision's id."""
        body = {
            "kind": kind,
            "action": action,
            "required": required,
            "timeout_seconds": timeout_seconds,
            "idempotency_key": idempotency_key,
        }
        return str(self._post("/outside/approvals", body)["id"])

    def decision(self, decision_id: str, *, wait: float = 0) -> dict[str, Any]:
        """Where it stands (``status``: pending, approved — perform ``action``, as approved —,
        rejected, expired, withdrawn); ``wait`` up to 60 s for it to be decided."""
        return self._call(
            f"/outside/approvals/{decision_id}?wait={wait:g}", None, "GET", timeout=wait + self.timeout
        )

    def effect(
        self,
        key: str,
        kind: str,
        fn: Callable[[], Any],
        *,
        request: dict[str, Any],
        lease: Lease | None = None,
        external_ref: Callable[[Any], str] | None = None,
    ) -> Any:
        """``fn()`` at most once per ``key``, through the ledger: a retry gets the recorded result."""
        proposed = self.propose(key, kind, request=request, lease=lease)
        if proposed["status"] == "committed":
            return proposed["result"]
        try:
            result = fn()
        except Exception as exc:
            self.report(key, outcome="failed", error=f"{type(exc).__name__}: {exc}", lease=lease)
            raise
        ref = external_ref(result) if external_ref else ""
        self.report(key, outcome="committed", result=result, external_ref=ref, lease=lease)
        return result


class AsyncRunwarden:
    """``Runwarden`` for asyncio code: the same calls, awaited (each HTTP call on a thread);
    ``effect``'s ``fn`` may return an awaitable."""

    def __init__(self, base_url: str, *, token: str, tenant: str = "", timeout: float = 30.0) -> None:
        self.sync = Runwarden(base_url, token=token, tenant=tenant, timeout=timeout)

    async def acquire(self, key: str, *, holder: str, ttl: float = 30.0) -> Lease:
        return await asyncio.to_thread(self.sync.acquire, key, holder=holder, ttl=ttl)

    async def renew(self, lease: Lease, *, ttl: float = 30.0) -> Lease:
        return await asyncio.to_thread(self.sync.renew, lease, ttl=ttl)

    async def release(self, lease: Lease) -> None:
        await asyncio.to_thread(self.sync.release, lease)

    async def ask_approval(self, kind: str, action: dict[str, Any], **options: Any) -> str:
        return await asyncio.to_thread(self.sync.ask_approval, kind, action, **options)

    async def decision(self, decision_id: str, *, wait: float = 0) -> dict[str, Any]:
        return await asyncio.to_thread(self.sync.decision, decision_id, wait=wait)

    async def effect(
        self,
        key: str,
        kind: str,
        fn: Callable[[], Any | Awaitable[Any]],
        *,
        request: dict[str, Any],
        lease: Lease | None = None,
        external_ref: Callable[[Any], str] | None = None,
    ) -> Any:
        proposed = await asyncio.to_thread(self.sync.propose, key, kind, request=request, lease=lease)
        if proposed["status"] == "committed":
            return proposed["result"]
        try:
            result = fn()
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            await asyncio.to_thread(
                self.sync.report, key, outcome="failed", error=f"{type(exc).__name__}: {exc}", lease=lease
            )
            raise
        ref = external_ref(result) if external_ref else ""
        await asyncio.to_thread(
            self.sync.report, key, outcome="committed", result=result, external_ref=ref, lease=lease
        )
        return result
