"""``SandboxAdapter``: a :class:`~psp.protocol.PspAdapter` for the Stripe-like sandbox PSP.

It speaks the sandbox's PaymentIntents API over one shared keep-alive aiohttp session
and sends our ``attempt_id`` as the ``Idempotency-Key`` of every call, so a retry with
the same attempt id can never charge twice.

Transport failures map to outcomes (see :mod:`psp.protocol`):

* cannot connect (refused, DNS, TLS handshake), no pooled connection within the
  timeout, or 401/403 -> ``not_sent`` (the PSP certainly did nothing);
* timeout, connection reset / dropped, unreadable body after the request was sent,
  or 409 (the key's first request is still in flight) -> ``unknown``;
* 5xx and 429 -> ``retryable_error`` (with ``retry_after`` from ``Retry-After``);
  the sandbox, like Stripe's front door, does not store these under the key;
* 402 -> ``declined`` or ``retryable_error`` according to :func:`psp.declines.is_retryable`;
* other 4xx -> ``declined`` with the error's ``code`` (``idempotency_error`` when an
  attempt id is reused with different parameters);
* 200 -> ``succeeded`` (status ``requires_capture``, ``succeeded`` or ``canceled``) or
  ``requires_action``.

Every authorize, capture, void, refund, payout and retrieve call is timed into
``paystream_psp_request_duration_seconds{psp, operation, outcome}`` (``observability.metrics``).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import date
from typing import Any, Concatenate, ParamSpec

import aiohttp

from observability.metrics import PSP_LATENCY
from psp.declines import is_retryable
from psp.protocol import (
    STATUS_NOT_FOUND,
    AuthorizeRequest,
    CaptureRequest,
    PayoutRequest,
    PspNotification,
    PspResult,
    RefundRequest,
    VoidRequest,
)
from psp.settlement import SettlementError, SettlementRow, parse_settlement_csv
from schemas.signatures import SignatureError, verify_signature

JsonDict = dict[str, Any]
_P = ParamSpec("_P")
_Operation = Callable[Concatenate["SandboxAdapter", _P], Coroutine[Any, Any, PspResult]]


def _timed(operation: str) -> Callable[[_Operation[_P]], _Operation[_P]]:
    """Observe ``paystream_psp_request_duration_seconds{psp, operation, outcome}`` for every
    call of the decorated PSP operation: ``outcome`` is the result's, or ``error`` if the
    call raised (a cancelled call is not observed)."""

    def decorate(call: _Operation[_P]) -> _Operation[_P]:
        @functools.wraps(call)
        async def timed(self: SandboxAdapter, /, *args: _P.args, **kwargs: _P.kwargs) -> PspResult:
            started = time.perf_counter()
            try:
                result = await call(self, *args, **kwargs)
            except Exception:
                latency = PSP_LATENCY.labels(self.name, operation, "error")
                latency.observe(time.perf_counter() - started)
                raise
            latency = PSP_LATENCY.labels(self.name, operation, result.outcome)
            latency.observe(time.perf_counter() - started)
            return result

        return timed

    return decorate


class _Http:
    """A parsed HTTP answer."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: JsonDict) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def _as_int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _as_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _retry_after(headers: dict[str, str]) -> float | None:
    raw = headers.get("Retry-After")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None


class SandboxAdapter:
    """Adapter for one sandbox PSP at ``base_url`` (e.g. ``http://127.0.0.1:18081``).

    ``timeout`` (seconds) bounds every call end to end. Pass a shared ``session`` to pool
    connections across adapters (it is then not closed by :meth:`close`); otherwise the
    adapter owns a session with at most ``connection_limit`` connections.
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        api_key: str,
        timeout: float,
        session: aiohttp.ClientSession | None = None,
        *,
        connection_limit: int = 100,
        webhook_secrets: Sequence[str] = (),
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._name = name
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=timeout)
        self._session = session
        self._owns_session = session is None
        self._connection_limit = connection_limit
        self._webhook_secrets = tuple(webhook_secrets)

    @property
    def name(self) -> str:
        return self._name

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connection_limit),
                raise_for_status=False,
            )
            self._owns_session = True
        return self._session

    async def close(self) -> None:
        if self._owns_session and self._session is not None and not self._session.closed:
            await self._session.close()

    # --- transport --------------------------------------------------------------------

    def _result(self, outcome: str, **fields: Any) -> PspResult:
        return PspResult.model_validate({"outcome": outcome, "psp": self._name, **fields})

    async def _call(
        self,
        method: str,
        path: str,
        *,
        idempotency_key: str | None = None,
        body: JsonDict | None = None,
        query: dict[str, str] | None = None,
    ) -> _Http | PspResult:
        headers = {"Authorization": f"Bearer {self._api_key}"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        try:
            async with self._get_session().request(
                method,
                self._base_url + path,
                json=body,
                params=query,
                headers=headers,
                timeout=self._timeout,
            ) as resp:
                raw = await resp.read()
                status = resp.status
                resp_headers = {k: v for k, v in resp.headers.items()}
        except aiohttp.ConnectionTimeoutError as exc:
            return self._result("not_sent", message=f"no connection within timeout: {exc}")
        except aiohttp.ClientConnectorError as exc:
            return self._result("not_sent", message=f"cannot connect: {exc}")
        except TimeoutError as exc:
            return self._result("unknown", message=f"timeout after sending: {exc!r}")
        except aiohttp.ClientError as exc:
            return self._result("unknown", message=f"connection lost after sending: {exc!r}")
        parsed: object = None
        if raw:
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
        if not isinstance(parsed, dict):
            if status >= 500 or status == 429:
                return self._result(
                    "retryable_error",
                    message=f"HTTP {status}",
                    retry_after=_retry_after(resp_headers),
                )
            return self._result("unknown", message=f"HTTP {status} with unreadable body")
        return _Http(status, resp_headers, parsed)

    def _error_result(self, http: _Http) -> PspResult:
        """Map a non-2xx answer."""
        error = http.body.get("error")
        err: JsonDict = error if isinstance(error, dict) else {}
        message = _as_str(err.get("message"))
        code = _as_str(err.get("decline_code")) or _as_str(err.get("code"))
        intent = err.get("payment_intent")
        pi: JsonDict = intent if isinstance(intent, dict) else {}
        common: JsonDict = {
            "psp_reference": _as_str(pi.get("id")),
            "status": _as_str(pi.get("status")),
            "message": message,
        }
        if http.status >= 500 or http.status == 429:
            return self._result(
                "retryable_error",
                decline_code=code or ("rate_limit" if http.status == 429 else "api_error"),
                retry_after=_retry_after(http.headers),
                **common,
            )
        if http.status in (401, 403):
            return self._result("not_sent", decline_code=code or "authentication_error", **common)
        if http.status == 409:
            return self._result("unknown", decline_code=code or "conflict", **common)
        if http.status == 402:
            decline = code or "card_declined"
            outcome = "retryable_error" if is_retryable(decline) else "declined"
            return self._result(outcome, decline_code=decline, **common)
        return self._result(
            "declined", decline_code=code or _as_str(err.get("type")) or "invalid_request", **common
        )

    def _intent_result(self, pi: JsonDict) -> PspResult:
        """Map a PaymentIntent object (200 answers and retrieve)."""
        status = _as_str(pi.get("status"))
        fields: JsonDict = {
            "psp_reference": _as_str(pi.get("id")),
            "status": status,
            "amount_refunded": _as_int(pi.get("amount_refunded")),
        }
        if status == "requires_capture":
            return self._result(
                "succeeded", amount_authorized=_as_int(pi.get("amount_capturable")), **fields
            )
        if status == "succeeded":
            received = _as_int(pi.get("amount_received"))
            return self._result(
                "succeeded", amount_authorized=received, amount_captured=received, **fields
            )
        if status == "canceled":
            return self._result("succeeded", **fields)
        if status == "requires_action":
            return self._result("requires_action", **fields)
        error = pi.get("last_payment_error")
        if isinstance(error, dict):
            code = _as_str(error.get("decline_code")) or _as_str(error.get("code"))
            decline = code or "card_declined"
            return self._result(
                "retryable_error" if is_retryable(decline) else "declined",
                decline_code=decline,
                message=_as_str(error.get("message")),
                **fields,
            )
        return self._result("unknown", message=f"unexpected intent status {status!r}", **fields)

    def _map(self, answer: _Http | PspResult) -> PspResult:
        if isinstance(answer, PspResult):
            return answer
        if answer.status != 200:
            return self._error_result(answer)
        return self._intent_result(answer.body)

    # --- PspAdapter ---------------------------------------------------------------------

    @_timed("authorize")
    async def authorize(self, req: AuthorizeRequest) -> PspResult:
        body: JsonDict = {
            "amount": req.amount,
            "currency": req.currency.lower(),
            "payment_method": req.payment_method,
            "capture_method": req.capture_method,
            "confirm": True,
            "metadata": {
                "payment_id": req.payment_id,
                "merchant_id": req.merchant_id,
                "attempt_id": req.attempt_id,
            },
        }
        answer = await self._call(
            "POST", "/v1/payment_intents", idempotency_key=req.attempt_id, body=body
        )
        return self._map(answer)

    @_timed("capture")
    async def capture(self, req: CaptureRequest) -> PspResult:
        answer = await self._call(
            "POST",
            f"/v1/payment_intents/{req.psp_reference}/capture",
            idempotency_key=req.attempt_id,
            body={"amount_to_capture": req.amount},
        )
        return self._map(answer)

    @_timed("void")
    async def void(self, req: VoidRequest) -> PspResult:
        answer = await self._call(
            "POST",
            f"/v1/payment_intents/{req.psp_reference}/cancel",
            idempotency_key=req.attempt_id,
            body={},
        )
        return self._map(answer)

    @_timed("refund")
    async def refund(self, req: RefundRequest) -> PspResult:
        answer = await self._call(
            "POST",
            "/v1/refunds",
            idempotency_key=req.attempt_id,
            body={
                "payment_intent": req.psp_reference,
                "amount": req.amount,
                # Like Stripe refund metadata: the refund's webhooks name our payment.
                "metadata": {"payment_id": req.payment_id, "attempt_id": req.attempt_id},
            },
        )
        if isinstance(answer, PspResult) or answer.status != 200:
            return self._map(answer)
        refund = answer.body
        status = _as_str(refund.get("status"))
        fields: JsonDict = {
            "psp_reference": _as_str(refund.get("payment_intent")) or req.psp_reference,
            "refund_reference": _as_str(refund.get("id")),
            "status": status,
            "amount_refunded": _as_int(refund.get("amount")),
        }
        if status in ("succeeded", "pending"):
            return self._result("succeeded", **fields)
        reason = _as_str(refund.get("failure_reason")) or "refund_failed"
        return self._result("declined", decline_code=reason, **fields)

    @_timed("payout")
    async def payout(self, req: PayoutRequest) -> PspResult:
        answer = await self._call(
            "POST",
            "/v1/payouts",
            idempotency_key=req.attempt_id,
            body={
                "amount": req.amount,
                "currency": req.currency.lower(),
                "destination": req.destination,
                "metadata": {"payout_id": req.payout_id, "merchant_id": req.merchant_id},
            },
        )
        if isinstance(answer, PspResult) or answer.status != 200:
            return self._map(answer)
        payout = answer.body
        status = _as_str(payout.get("status"))
        fields: JsonDict = {"psp_reference": _as_str(payout.get("id")), "status": status}
        if status == "failed":
            reason = _as_str(payout.get("failure_code")) or "payout_failed"
            return self._result("declined", decline_code=reason, **fields)
        return self._result("succeeded", **fields)

    def parse_webhook(self, payload: bytes, signature_header: str) -> PspNotification:
        if not self._webhook_secrets:
            raise SignatureError(f"no webhook secret configured for PSP {self._name}")
        verify_signature(payload, signature_header, self._webhook_secrets)
        event = json.loads(payload)
        obj = event.get("data", {}).get("object", {}) if isinstance(event, dict) else {}
        metadata = obj.get("metadata") or {}
        reference = obj.get("payment_intent") if obj.get("object") != "payment_intent" else None
        return PspNotification(
            psp=self._name,
            event_id=str(event["id"]),
            type=str(event["type"]),
            psp_reference=_as_str(reference) or _as_str(obj.get("id")),
            payment_id=_as_str(metadata.get("payment_id")),
            attempt_id=_as_str(metadata.get("attempt_id")),
            object_id=_as_str(obj.get("id")),
            status=_as_str(obj.get("status")),
            amount=_as_int(obj.get("amount")),
            currency=(_as_str(obj.get("currency")) or "").upper() or None,
            created=_as_int(event.get("created")),
        )

    async def settlement_report(self, day: date | None = None) -> list[SettlementRow]:
        query = {"date": day.isoformat()} if day is not None else None
        try:
            async with self._get_session().get(
                self._base_url + "/sandbox/settlement",
                params=query,
                headers={"Authorization": f"Bearer {self._api_key}"},
                timeout=self._timeout,
            ) as response:
                response.raise_for_status()
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SettlementError(f"{self._name}: settlement report unavailable: {exc}") from exc
        return parse_settlement_csv(text)

    @_timed("retrieve")
    async def retrieve(
        self, *, psp_reference: str | None = None, attempt_id: str | None = None
    ) -> PspResult:
        if (psp_reference is None) == (attempt_id is None):
            raise ValueError("give exactly one of psp_reference or attempt_id")
        if psp_reference is not None:
            answer = await self._call("GET", f"/v1/payment_intents/{psp_reference}")
            if isinstance(answer, _Http) and answer.status == 404:
                return self._result("unknown", psp_reference=psp_reference, status=STATUS_NOT_FOUND)
            return self._map(answer)
        assert attempt_id is not None  # noqa: S101 - narrowed by the check above
        answer = await self._call(
            "GET", "/v1/payment_intents", query={"idempotency_key": attempt_id}
        )
        if isinstance(answer, PspResult) or answer.status != 200:
            return self._map(answer)
        data = answer.body.get("data")
        intents = [pi for pi in data if isinstance(pi, dict)] if isinstance(data, list) else []
        if not intents:
            return self._result(
                "unknown",
                status=STATUS_NOT_FOUND,
                message=f"no payment intent for idempotency key {attempt_id}",
            )
        return self._intent_result(intents[0])
