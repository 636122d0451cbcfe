"""The sandbox PSP's HTTP API (aiohttp.web), modelled on Stripe's PaymentIntents API.

Every ``/v1`` request goes through :func:`_handle`, which applies, in order: bearer-token
auth (401), pre-processing faults (``5xx``, ``429``: nothing is charged or remembered),
body parsing (JSON, or Stripe-style form encoding with ``metadata[key]=value``),
the ``Idempotency-Key`` check (replay, 400 ``idempotency_error`` on different parameters,
409 while the first request is in flight), latency, the operation itself (synchronous,
so atomic), storing the answer under the key, then post-processing faults (``timeout``:
hold the already-made answer for ``timeout_hold_s``; ``lost_response``: drop the
connection without answering).

Lookup for a caller whose response was lost: ``GET /v1/payment_intents?idempotency_key=K``
returns a Stripe list ``{"object": "list", "data": [...]}`` of the intents created by a
request carrying ``Idempotency-Key: K`` (at most one). ``payment_id=P`` filters on
``metadata.payment_id`` instead.

Faults: header ``Sandbox-Fault`` with comma-separated ``latency=<ms>``, ``timeout``,
``5xx``, ``429``, ``lost_response``; global rates via ``POST /sandbox/faults``.
Ground truth: ``GET /sandbox/charges``; ``POST /sandbox/reset``; ``GET /healthz``.
The ``/sandbox`` and ``/healthz`` routes need no API key (test control plane).

Payouts: ``POST /v1/payouts`` ``{amount, currency, destination, metadata}`` (destination
``btok_ok`` is paid, ``btok_fail`` fails, both asynchronously with a ``payout.paid`` /
``payout.failed`` webhook), ``GET /v1/payouts/{id}``; same auth, faults and idempotency.

Webhooks (see :mod:`psp.sandbox.webhooks`): events signed like Stripe's are POSTed to the
configured URL; ``GET /sandbox/webhooks`` lists the events and their delivery attempts,
``GET``/``POST /sandbox/webhooks/config`` reads / changes the knobs (url, duplicate_rate,
reorder, reorder_window, reorder_flush_ms, delay_ms, max_attempts, retry_backoff_ms).

Settlement report: ``GET /sandbox/settlement?date=YYYY-MM-DD`` (``text/csv``, format in
:mod:`psp.settlement`; no date: every row).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields
from datetime import date
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from psp.sandbox.state import (
    ApiError,
    FaultConfig,
    IdempotencyEntry,
    JsonDict,
    SandboxState,
    WebhookConfig,
)
from psp.sandbox.webhooks import WebhookDispatcher
from psp.settlement import format_settlement_csv

SANDBOX_STATE: web.AppKey[SandboxState] = web.AppKey("sandbox_state", SandboxState)
"""The in-memory state of an app built by :func:`create_app` (``app[SANDBOX_STATE]``)."""

DEFAULT_TIMEOUT_HOLD_S = 60.0

Reply = tuple[int, JsonDict]
Operation = Callable[[SandboxState, JsonDict, web.Request, str | None], Reply]


@dataclass
class _Faults:
    latency_ms: float | None = None
    timeout: bool = False
    server_error: bool = False
    rate_limit: bool = False
    lost_response: bool = False


def _parse_fault_header(raw: str) -> _Faults:
    faults = _Faults()
    for item in (part.strip().lower() for part in raw.split(",")):
        if not item:
            continue
        if item.startswith("latency="):
            try:
                faults.latency_ms = max(0.0, float(item.removeprefix("latency=")))
            except ValueError as exc:
                raise ApiError(
                    400, "invalid_request_error", f"Bad Sandbox-Fault: {item}", saved=False
                ) from exc
        elif item == "timeout":
            faults.timeout = True
        elif item in ("5xx", "500"):
            faults.server_error = True
        elif item == "429":
            faults.rate_limit = True
        elif item == "lost_response":
            faults.lost_response = True
        else:
            raise ApiError(
                400, "invalid_request_error", f"Unknown Sandbox-Fault: {item}", saved=False
            )
    return faults


def _roll_faults(state: SandboxState, faults: _Faults) -> None:
    cfg = state.faults
    rng = state.rng
    if cfg.error_rate and rng.random() < cfg.error_rate:
        faults.server_error = True
    if cfg.rate_limit_rate and rng.random() < cfg.rate_limit_rate:
        faults.rate_limit = True
    if cfg.timeout_rate and rng.random() < cfg.timeout_rate:
        faults.timeout = True
    if cfg.lost_response_rate and rng.random() < cfg.lost_response_rate:
        faults.lost_response = True


def _nest_form(items: list[tuple[str, str]]) -> JsonDict:
    """Stripe form encoding: ``metadata[payment_id]=p1`` becomes ``{"metadata": {...}}``."""
    out: JsonDict = {}
    for key, value in items:
        parts = key.replace("]", "").split("[")
        target = out
        for part in parts[:-1]:
            nxt = target.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ApiError(400, "invalid_request_error", f"Bad parameter {key}", saved=False)
            target = nxt
        target[parts[-1]] = value
    return out


async def _read_params(request: web.Request) -> JsonDict:
    if request.method == "GET" or not request.can_read_body:
        return {}
    if request.content_type == "application/x-www-form-urlencoded":
        form = await request.post()
        return _nest_form([(k, v) for k, v in form.items() if isinstance(v, str)])
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, "invalid_request_error", "Body is not valid JSON", saved=False) from exc
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request_error", "Body must be a JSON object", saved=False)
    return body


def _int_param(params: JsonDict, name: str, *, required: bool) -> int | None:
    value = params.get(name)
    if value is None:
        if required:
            raise ApiError(
                400,
                "invalid_request_error",
                f"Missing required param: {name}.",
                code="parameter_missing",
                param=name,
                saved=False,
            )
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ApiError(
            400,
            "invalid_request_error",
            f"Invalid {name}: must be a positive integer in minor units.",
            code="parameter_invalid_integer",
            param=name,
            saved=False,
        )
    return value


def _str_param(params: JsonDict, name: str, *, required: bool) -> str | None:
    value = params.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ApiError(
            400,
            "invalid_request_error",
            f"Missing or invalid param: {name}.",
            code="parameter_missing" if value is None else "parameter_invalid",
            param=name,
            saved=False,
        )
    return value


def _fingerprint(request: web.Request, params: JsonDict) -> str:
    canonical = json.dumps(
        [request.method, request.path, params], sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _error_response(err: ApiError) -> web.Response:
    return web.json_response(err.body, status=err.http_status)


async def _hold(state: SandboxState, seconds: float) -> None:
    """Sleep ``seconds`` unless the app shuts down first (so tests never wait on it)."""
    try:
        async with asyncio.timeout(seconds):
            await state.released.wait()
    except TimeoutError:
        pass


def _drop_connection(request: web.Request) -> web.StreamResponse:
    transport = request.transport
    if transport is not None:
        transport.abort()
    # The connection is gone; whatever we return cannot be delivered.
    return web.Response(status=204)


async def _handle(request: web.Request, operation: Operation) -> web.StreamResponse:
    state = request.app[SANDBOX_STATE]
    if request.headers.get("Authorization", "") != f"Bearer {state.api_key}":
        return web.json_response(
            {
                "error": {
                    "type": "invalid_request_error",
                    "code": "api_key_invalid",
                    "message": "Invalid API Key provided.",
                }
            },
            status=401,
        )
    try:
        faults = _parse_fault_header(request.headers.get("Sandbox-Fault", ""))
    except ApiError as err:
        return _error_response(err)
    _roll_faults(state, faults)
    if faults.server_error:
        return web.json_response(
            {"error": {"type": "api_error", "message": "Sandbox injected server error."}},
            status=500,
        )
    if faults.rate_limit:
        return web.json_response(
            {
                "error": {
                    "type": "invalid_request_error",
                    "code": "rate_limit",
                    "message": "Too many requests hit the API too quickly.",
                }
            },
            status=429,
            headers={"Retry-After": "1"},
        )
    try:
        params = await _read_params(request)
    except ApiError as err:
        return _error_response(err)

    key = request.headers.get("Idempotency-Key") if request.method == "POST" else None
    replayed = False
    if key is not None:
        fingerprint = _fingerprint(request, params)
        entry = state.idempotency.get(key)
        if entry is not None and entry.fingerprint != fingerprint:
            return web.json_response(
                {
                    "error": {
                        "type": "idempotency_error",
                        "message": "Keys for idempotent requests can only be used with the "
                        "same parameters they were first used with.",
                    }
                },
                status=400,
            )
        if entry is not None and entry.in_flight:
            return web.json_response(
                {
                    "error": {
                        "type": "idempotency_error",
                        "code": "idempotency_key_in_use",
                        "message": "There is currently another in-progress request using "
                        "this Stripe-Idempotency-Key.",
                    }
                },
                status=409,
            )
        if entry is not None:
            replayed = True
            assert entry.http_status is not None and entry.body is not None  # noqa: S101
            status, body = entry.http_status, entry.body
        else:
            state.idempotency[key] = IdempotencyEntry(fingerprint=fingerprint)

    if not replayed:
        completed = False
        try:
            latency = state.faults.latency_ms if faults.latency_ms is None else faults.latency_ms
            if latency > 0:
                await _hold(state, latency / 1000.0)
            try:
                status, body = operation(state, params, request, key)
            except ApiError as err:
                if not err.saved:
                    return _error_response(err)
                status, body = err.http_status, err.body
            completed = True
        finally:
            if key is not None:
                if completed:
                    state.idempotency[key].http_status = status
                    state.idempotency[key].body = body
                else:
                    state.idempotency.pop(key, None)

    if faults.lost_response:
        return _drop_connection(request)
    if faults.timeout:
        await _hold(state, state.timeout_hold_s)
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    if key is not None:
        headers["Idempotency-Key"] = key
    return web.json_response(body, status=status, headers=headers)


# --- operations (synchronous: atomic on the event loop) -------------------------------


def _op_create_intent(
    state: SandboxState, params: JsonDict, request: web.Request, key: str | None
) -> Reply:
    amount = _int_param(params, "amount", required=True)
    currency = _str_param(params, "currency", required=True)
    payment_method = _str_param(params, "payment_method", required=True)
    capture_method = _str_param(params, "capture_method", required=False) or "automatic"
    if capture_method not in ("automatic", "manual"):
        raise ApiError(
            400,
            "invalid_request_error",
            "capture_method must be automatic or manual.",
            code="parameter_invalid",
            param="capture_method",
            saved=False,
        )
    metadata = _metadata_param(params)
    assert amount is not None and currency is not None  # noqa: S101
    assert payment_method is not None  # noqa: S101
    pi = state.create_intent(
        amount=amount,
        currency=currency.lower(),
        payment_method=payment_method,
        capture_method=capture_method,
        metadata=metadata,
        idempotency_key=key,
    )
    return 200, pi.to_json()


def _op_capture(
    state: SandboxState, params: JsonDict, request: web.Request, key: str | None
) -> Reply:
    amount = _int_param(params, "amount_to_capture", required=False)
    return 200, state.capture(request.match_info["id"], amount).to_json()


def _op_cancel(
    state: SandboxState, params: JsonDict, request: web.Request, key: str | None
) -> Reply:
    reason = _str_param(params, "cancellation_reason", required=False)
    return 200, state.cancel(request.match_info["id"], reason).to_json()


def _op_retrieve(
    state: SandboxState, params: JsonDict, request: web.Request, key: str | None
) -> Reply:
    return 200, state.intent(request.match_info["id"]).to_json()


def _op_list(state: SandboxState, params: JsonDict, request: web.Request, key: str | None) -> Reply:
    query = request.query
    wanted_key = query.get("idempotency_key")
    wanted_payment = query.get("payment_id")
    data = [
        pi.to_json()
        for pi in state.intents.values()
        if (wanted_key is None or pi.idempotency_key == wanted_key)
        and (wanted_payment is None or pi.metadata.get("payment_id") == wanted_payment)
    ]
    return 200, {"object": "list", "data": data, "has_more": False, "url": "/v1/payment_intents"}


def _op_refund(
    state: SandboxState, params: JsonDict, request: web.Request, key: str | None
) -> Reply:
    intent_id = _str_param(params, "payment_intent", required=True)
    amount = _int_param(params, "amount", required=False)
    assert intent_id is not None  # noqa: S101
    refund, reported = state.refund(intent_id, amount, key, _metadata_param(params))
    return 200, refund.to_json(status=reported)


def _op_get_refund(
    state: SandboxState, params: JsonDict, request: web.Request, key: str | None
) -> Reply:
    return 200, state.get_refund(request.match_info["id"]).to_json()


def _metadata_param(params: JsonDict) -> dict[str, str]:
    raw_meta = params.get("metadata") or {}
    if not isinstance(raw_meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()
    ):
        raise ApiError(
            400,
            "invalid_request_error",
            "metadata must map strings to strings.",
            code="parameter_invalid",
            param="metadata",
            saved=False,
        )
    return dict(raw_meta)


def _op_create_payout(
    state: SandboxState, params: JsonDict, request: web.Request, key: str | None
) -> Reply:
    amount = _int_param(params, "amount", required=True)
    currency = _str_param(params, "currency", required=True)
    destination = _str_param(params, "destination", required=True)
    metadata = _metadata_param(params)
    assert amount is not None and currency is not None  # noqa: S101
    assert destination is not None  # noqa: S101
    payout = state.create_payout(
        amount=amount,
        currency=currency.lower(),
        destination=destination,
        metadata=metadata,
        idempotency_key=key,
    )
    return 200, payout.to_json()


def _op_get_payout(
    state: SandboxState, params: JsonDict, request: web.Request, key: str | None
) -> Reply:
    return 200, state.get_payout(request.match_info["id"]).to_json()


def _route(operation: Operation) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await _handle(request, operation)

    return handler


# --- control plane ---------------------------------------------------------------------


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "psp": request.app[SANDBOX_STATE].name})


async def _charges(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    return web.json_response([pi.ground_truth(state.name) for pi in state.intents.values()])


async def _reset(request: web.Request) -> web.Response:
    request.app[SANDBOX_STATE].reset()
    return web.json_response({"reset": True})


_RATE_FIELDS = ("timeout_rate", "lost_response_rate", "error_rate", "rate_limit_rate")


async def _get_faults(request: web.Request) -> web.Response:
    return web.json_response(request.app[SANDBOX_STATE].faults.to_json())


async def _set_faults(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    try:
        params = await _read_params(request)
        updated = FaultConfig(**state.faults.to_json())
        for name, raw in params.items():
            if name not in (*_RATE_FIELDS, "latency_ms"):
                raise ApiError(400, "invalid_request_error", f"Unknown fault knob: {name}")
            value = float(raw)
            if name in _RATE_FIELDS and not 0.0 <= value <= 1.0:
                raise ApiError(400, "invalid_request_error", f"{name} must be within 0..1")
            if value < 0:
                raise ApiError(400, "invalid_request_error", f"{name} must not be negative")
            setattr(updated, name, value)
    except (TypeError, ValueError):
        return web.json_response(
            {"error": {"type": "invalid_request_error", "message": "Knobs must be numbers."}},
            status=400,
        )
    except ApiError as err:
        return _error_response(err)
    state.faults = updated
    return web.json_response(updated.to_json())


async def _release_holds(app: web.Application) -> None:
    app[SANDBOX_STATE].released.set()


async def _webhooks(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    wanted = request.query.get("type")
    return web.json_response(
        [e.summary() for e in state.events.values() if wanted is None or e.type == wanted]
    )


async def _get_webhook_config(request: web.Request) -> web.Response:
    return web.json_response(request.app[SANDBOX_STATE].webhook.to_json())


def _config_error(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message, saved=False)


def _number(name: str, raw: object, *, integer: bool = False) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise _config_error(f"{name} must be a number")
    try:
        value = float(raw)
    except ValueError as exc:
        raise _config_error(f"{name} must be a number") from exc
    if value < 0 or value != value:  # negative or NaN
        raise _config_error(f"{name} must not be negative")
    if integer and (not value.is_integer() or value < 1):
        raise _config_error(f"{name} must be a positive integer")
    return value


def _apply_webhook_config(current: WebhookConfig, params: JsonDict) -> WebhookConfig:
    known = {f.name for f in fields(WebhookConfig)}
    updated = WebhookConfig(**current.to_json())
    for name, raw in params.items():
        if name not in known:
            raise _config_error(f"Unknown webhook knob: {name}")
        if name == "url":
            if raw in (None, ""):
                updated.url = None
                continue
            if not isinstance(raw, str) or urlsplit(raw).scheme not in ("http", "https"):
                raise _config_error("url must be an http(s) URL or null")
            updated.url = raw
        elif name == "reorder":
            if isinstance(raw, str) and raw.lower() in ("true", "false"):
                raw = raw.lower() == "true"
            if not isinstance(raw, bool):
                raise _config_error("reorder must be a boolean")
            updated.reorder = raw
        elif name in ("reorder_window", "max_attempts"):
            setattr(updated, name, int(_number(name, raw, integer=True)))
        else:
            value = _number(name, raw)
            if name == "duplicate_rate" and value > 1.0:
                raise _config_error("duplicate_rate must be within 0..1")
            setattr(updated, name, value)
    return updated


async def _set_webhook_config(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    try:
        params = await _read_params(request)
        state.webhook = _apply_webhook_config(state.webhook, params)
    except ApiError as err:
        return _error_response(err)
    return web.json_response(state.webhook.to_json())


async def _settlement(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    raw = request.query.get("date")
    day: date | None = None
    if raw:
        try:
            day = date.fromisoformat(raw)
        except ValueError:
            return _error_response(_config_error(f"date must be YYYY-MM-DD, got {raw!r}"))
    text = format_settlement_csv(state.settlement_rows(day))
    return web.Response(text=text, content_type="text/csv", charset="utf-8")


async def _webhook_dispatcher(app: web.Application) -> AsyncIterator[None]:
    dispatcher = WebhookDispatcher(app[SANDBOX_STATE])
    await dispatcher.start()
    try:
        yield
    finally:
        await dispatcher.stop()


def create_app(
    name: str,
    api_key: str,
    webhook_secret: str,
    latency_ms: float = 0.0,
    *,
    timeout_hold_s: float = DEFAULT_TIMEOUT_HOLD_S,
    seed: int | None = None,
    webhook_url: str | None = None,
    fee_bps: int = 290,
    fee_fixed: int = 30,
    dispute_fee: int = 1500,
    async_delay_ms: float = 0.0,
) -> web.Application:
    """Build one sandbox PSP.

    ``latency_ms`` is the default processing latency of every API call;
    ``timeout_hold_s`` how long a ``timeout`` fault holds its answer (held requests are
    released at shutdown); ``seed`` makes the global fault rates (and webhook
    duplication / shuffling) reproducible. Webhooks are signed with ``webhook_secret``
    and POSTed to ``webhook_url`` (none: only recorded). ``fee_bps`` / ``fee_fixed``
    (minor units) are the fee on a captured charge, ``dispute_fee`` on a dispute, in the
    settlement report. ``async_delay_ms`` delays asynchronous outcomes (disputes,
    failed-refund webhooks, payout results).
    """
    if fee_bps < 0 or fee_fixed < 0 or dispute_fee < 0 or async_delay_ms < 0:
        raise ValueError("fees and async_delay_ms must not be negative")
    app = web.Application()
    app[SANDBOX_STATE] = SandboxState(
        name=name,
        api_key=api_key,
        webhook_secret=webhook_secret,
        faults=FaultConfig(latency_ms=latency_ms),
        timeout_hold_s=timeout_hold_s,
        rng=random.Random(seed),  # noqa: S311 - fault injection, not cryptography
        fee_bps=fee_bps,
        fee_fixed=fee_fixed,
        dispute_fee=dispute_fee,
        async_delay_s=async_delay_ms / 1000.0,
        webhook=WebhookConfig(url=webhook_url),
    )
    app.on_shutdown.append(_release_holds)
    app.cleanup_ctx.append(_webhook_dispatcher)
    app.router.add_post("/v1/payment_intents", _route(_op_create_intent))
    app.router.add_get("/v1/payment_intents", _route(_op_list))
    app.router.add_get("/v1/payment_intents/{id}", _route(_op_retrieve))
    app.router.add_post("/v1/payment_intents/{id}/capture", _route(_op_capture))
    app.router.add_post("/v1/payment_intents/{id}/cancel", _route(_op_cancel))
    app.router.add_post("/v1/refunds", _route(_op_refund))
    app.router.add_get("/v1/refunds/{id}", _route(_op_get_refund))
    app.router.add_post("/v1/payouts", _route(_op_create_payout))
    app.router.add_get("/v1/payouts/{id}", _route(_op_get_payout))
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/sandbox/charges", _charges)
    app.router.add_post("/sandbox/reset", _reset)
    app.router.add_get("/sandbox/faults", _get_faults)
    app.router.add_post("/sandbox/faults", _set_faults)
    app.router.add_get("/sandbox/webhooks", _webhooks)
    app.router.add_get("/sandbox/webhooks/config", _get_webhook_config)
    app.router.add_post("/sandbox/webhooks/config", _set_webhook_config)
    app.router.add_get("/sandbox/settlement", _settlement)
    return app
