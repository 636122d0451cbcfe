"""``paystream status PAYMENT_ID``: one payment's whole story in one view.

:func:`gather_payment_view` collects, for one payment id:

* **status**: the payment's latest event as the status read model serves it
  (``GET /v1/payments/{id}``; :func:`sinks.status.get_status`);
* **events**: every recorded event, in per-payment order, from the event log the status
  sink writes in its transaction (``payment_events``, :func:`sinks.status.apply_events`;
  one row per ``event_id``, so redeliveries and replays show once);
* **PSP attempts**: the attempt claims in Redis (``{app_id}:attempt:att_<payment>_<op>_<n>``,
  :mod:`psp.claims`): which PSP each attempt id was sent to. Found with ``SCAN MATCH``,
  which walks the whole keyspace: fine for an operator's look-up, not for a hot path;
* **ledger entries**: every journal entry of the payment's ledger transactions
  (``ledger_transactions.payment_id``), signed as in the journal: debit positive, credit
  negative;
* **webhook deliveries**: the merchant webhook outbox rows of the payment with their
  attempt log (``webhook_deliveries`` / ``webhook_attempts``), when those tables exist.

:func:`render_payment_view` prints it with rich (one section per part);
``view.model_dump_json()`` is the machine-readable form.

Settings: pass what the CLI uses (``get_settings().with_local_broker()``). A PostgreSQL
DSN or Redis URL still set to ``embedded`` is resolved to the running ``paystream dev``
stack's address (:func:`local_service_settings`), the way ``with_local_broker`` does for
the broker.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from pydantic import AwareDatetime, BaseModel, ConfigDict
from redis.exceptions import RedisError
from rich.console import Console, JustifyMethod
from rich.markup import escape
from rich.table import Table

from config.settings import EMBEDDED, Settings
from schemas.currencies import exponent
from schemas.events import PaymentEvent
from sinks.status import get_status

__all__ = [
    "ATTEMPT_OPERATIONS",
    "AttemptClaim",
    "LedgerEntry",
    "PaymentView",
    "PaymentViewError",
    "WebhookAttempt",
    "WebhookDelivery",
    "gather_payment_view",
    "local_service_settings",
    "render_payment_view",
]

ATTEMPT_OPERATIONS = ("authorize", "capture", "void", "refund", "payout")
"""Operations of attempt ids (``agents.executor.attempt_id``), in display order."""

_CONNECT_TIMEOUT_SECONDS = 10.0


class PaymentViewError(RuntimeError):
    """The view cannot be gathered (no database to read)."""


class AttemptClaim(BaseModel):
    """One PSP attempt id of the payment and the PSP it was claimed for (sent to)."""

    model_config = ConfigDict(frozen=True)

    attempt_id: str
    operation: str
    number: str
    """The attempt counter (a refund's ``refund_id`` for refunds)."""
    psp: str
    expires_in_seconds: int | None
    """Seconds until the claim lapses (None: no expiry)."""


class LedgerEntry(BaseModel):
    """One journal entry of one of the payment's ledger transactions."""

    model_config = ConfigDict(frozen=True)

    transaction_id: int
    entry_id: int
    event_id: str
    kind: str
    reference: str | None
    occurred_at: AwareDatetime
    posted_at: AwareDatetime
    account: str
    currency: str
    amount: int
    """Minor units, signed as in the journal: debit positive, credit negative."""


class WebhookAttempt(BaseModel):
    """One attempt to deliver a merchant webhook."""

    model_config = ConfigDict(frozen=True)

    attempt: int
    attempted_at: AwareDatetime
    status_code: int | None
    latency_ms: float | None
    error: str | None


class WebhookDelivery(BaseModel):
    """One merchant webhook (event x endpoint) and its attempts."""

    model_config = ConfigDict(frozen=True)

    id: int
    event_id: str
    endpoint_id: int
    merchant_id: str
    event_type: str
    status: str
    attempts: int
    next_attempt_at: AwareDatetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: AwareDatetime
    delivered_at: AwareDatetime | None
    attempt_log: list[WebhookAttempt] = []


class PaymentView(BaseModel):
    """Everything paystream knows about one payment."""

    payment_id: str
    generated_at: AwareDatetime
    status: dict[str, Any] | None
    """The latest event, as ``GET /v1/payments/{id}`` answers it (None: unknown there)."""
    events: list[PaymentEvent]
    attempts: list[AttemptClaim]
    ledger_entries: list[LedgerEntry]
    webhook_deliveries: list[WebhookDelivery]
    notes: list[str]
    """Parts that could not be read (and why), so a partial view says it is partial."""

    @property
    def found(self) -> bool:
        """Whether any part knows the payment."""
        return bool(
            self.status
            or self.events
            or self.attempts
            or self.ledger_entries
            or self.webhook_deliveries
        )


# ------------------------------------------------------------------------- settings
def _embedded_pg_dsn(settings: Settings) -> str:
    """The DSN of the embedded PostgreSQL that ``paystream dev`` runs in ``data_dir/pg``."""
    from pgserver.utils import PostmasterInfo

    pg_dir = settings.data_dir.resolve() / "pg"
    info = PostmasterInfo.read_from_pgdata(pg_dir)
    if info is None or not info.is_running():
        raise PaymentViewError(
            f"PAYSTREAM_PG_DSN is 'embedded' but no embedded PostgreSQL runs in {pg_dir}: "
            "start 'paystream dev' (from this directory) or set PAYSTREAM_PG_DSN"
        )
    return str(info.get_uri())


def local_service_settings(settings: Settings) -> Settings:
    """``settings`` with ``embedded`` broker, PostgreSQL and Redis replaced by the addresses
    of the running ``paystream dev`` stack (same ``PAYSTREAM_DATA_DIR`` and ports)."""
    resolved = settings.with_local_broker()
    update: dict[str, str] = {}
    if resolved.pg_dsn == EMBEDDED:
        update["pg_dsn"] = _embedded_pg_dsn(resolved)
    if resolved.redis_url == EMBEDDED:
        update["redis_url"] = f"redis://127.0.0.1:{resolved.embedded_redis_port}/0"
    return resolved.model_copy(update=update) if update else resolved


# ------------------------------------------------------------------------- gathering
_EVENTS = """
SELECT event FROM payment_events WHERE payment_id = $1 ORDER BY sequence, received_at
"""

_LEDGER = """
SELECT t.id AS transaction_id, e.id AS entry_id, t.event_id, t.kind, t.reference,
       t.occurred_at, t.posted_at, a.code AS account, e.currency::text AS currency,
       e.amount
  FROM ledger_transactions t
  JOIN ledger_entries e ON e.transaction_id = t.id
  JOIN ledger_accounts a ON a.id = e.account_id
 WHERE t.payment_id = $1
 ORDER BY t.id, e.id
"""

_TABLES = """
SELECT to_regclass('webhook_deliveries') IS NOT NULL AS deliveries,
       to_regclass('webhook_attempts') IS NOT NULL AS attempts
"""

_DELIVERIES = """
SELECT id, event_id, endpoint_id, merchant_id, event_type, status, attempts,
       next_attempt_at, last_status_code, last_error, created_at, delivered_at
  FROM webhook_deliveries
 WHERE payment_id = $1
 ORDER BY created_at, id
"""

_DELIVERY_ATTEMPTS = """
SELECT delivery_id, attempt, attempted_at, status_code,
       latency_ms::double precision AS latency_ms, error
  FROM webhook_attempts
 WHERE delivery_id = ANY($1::bigint[])
 ORDER BY delivery_id, attempt, attempted_at
"""


def _event_of(value: Any) -> PaymentEvent:
    if isinstance(value, str | bytes):
        return PaymentEvent.model_validate_json(value)
    return PaymentEvent.model_validate(dict(value))


async def _events(conn: asyncpg.Connection, payment_id: str) -> list[PaymentEvent]:
    events = [_event_of(row["event"]) for row in await conn.fetch(_EVENTS, payment_id)]
    return sorted(events, key=lambda e: (e.sequence, e.occurred_at, e.event_id))


async def _ledger(conn: asyncpg.Connection, payment_id: str) -> list[LedgerEntry]:
    rows = await conn.fetch(_LEDGER, payment_id)
    return [LedgerEntry.model_validate(dict(row)) for row in rows]


async def _webhooks(
    conn: asyncpg.Connection, payment_id: str, tables: Any, notes: list[str]
) -> list[WebhookDelivery]:
    if not tables["deliveries"]:
        notes.append("webhook deliveries: no webhook_deliveries table (migration 0005)")
        return []
    try:
        rows = await conn.fetch(_DELIVERIES, payment_id)
        logs: dict[int, list[WebhookAttempt]] = {}
        if rows and tables["attempts"]:
            for row in await conn.fetch(_DELIVERY_ATTEMPTS, [r["id"] for r in rows]):
                attempt = WebhookAttempt.model_validate(dict(row))
                logs.setdefault(row["delivery_id"], []).append(attempt)
    except asyncpg.PostgresError as exc:
        notes.append(f"webhook deliveries: unreadable ({type(exc).__name__}: {exc})")
        return []
    return [
        WebhookDelivery.model_validate({**dict(row), "attempt_log": logs.get(row["id"], [])})
        for row in rows
    ]


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis glob pattern."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def _attempt_sort_key(claim: AttemptClaim) -> tuple[int, int, str]:
    rank = ATTEMPT_OPERATIONS.index(claim.operation)
    number = int(claim.number) if claim.number.isdigit() else -1
    return rank, number, claim.number


async def _attempts(redis: aioredis.Redis, app_id: str, payment_id: str) -> list[AttemptClaim]:
    prefix = f"{app_id}:attempt:"
    own = f"att_{payment_id}_"
    pattern = _glob_escape(prefix + own) + "*"
    keys: list[bytes] = [key async for key in redis.scan_iter(match=pattern, count=1000)]
    claims: list[AttemptClaim] = []
    if not keys:
        return claims
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.get(key)
            pipe.ttl(key)
        answers = await pipe.execute()
    for i, key in enumerate(keys):
        attempt_id = key.decode() if isinstance(key, bytes) else str(key)
        attempt_id = attempt_id.removeprefix(prefix)
        operation, _, number = attempt_id.removeprefix(own).partition("_")
        # Another payment whose id starts with this one's plus "_" matches the pattern
        # too; its remainder does not start with a known operation (for numbered
        # operations, a counter must follow).
        if operation not in ATTEMPT_OPERATIONS or not number:
            continue
        if operation not in ("refund", "payout") and not number.isdigit():
            continue
        owner, ttl = answers[2 * i], answers[2 * i + 1]
        if owner is None:  # lapsed between SCAN and GET
            continue
        claims.append(
            AttemptClaim(
                attempt_id=attempt_id,
                operation=operation,
                number=number,
                psp=owner.decode() if isinstance(owner, bytes) else str(owner),
                expires_in_seconds=int(ttl) if isinstance(ttl, int) and ttl >= 0 else None,
            )
        )
    return sorted(claims, key=_attempt_sort_key)


async def gather_payment_view(settings: Settings, payment_id: str) -> PaymentView:
    """Collect the payment's status, events, PSP attempts, ledger entries and webhook
    deliveries. Raises :class:`PaymentViewError` when PostgreSQL cannot be reached; an
    unreachable Redis or a missing table leaves that part empty with a note."""
    resolved = local_service_settings(settings)
    notes: list[str] = []
    try:
        conn = await asyncpg.connect(resolved.pg_dsn, timeout=_CONNECT_TIMEOUT_SECONDS)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise PaymentViewError(
            f"cannot connect to PostgreSQL: {type(exc).__name__}: {exc}"
        ) from exc
    try:
        tables = await conn.fetchrow(_TABLES)
        status = await get_status(conn, payment_id)
        events = await _events(conn, payment_id)
        ledger_entries = await _ledger(conn, payment_id)
        deliveries = await _webhooks(conn, payment_id, tables, notes)
    finally:
        await conn.close()

    attempts: list[AttemptClaim] = []
    redis = aioredis.Redis.from_url(
        resolved.redis_url, socket_connect_timeout=_CONNECT_TIMEOUT_SECONDS
    )
    try:
        attempts = await _attempts(redis, resolved.app_id, payment_id)
    except (RedisError, OSError) as exc:
        notes.append(f"PSP attempts: Redis unavailable ({type(exc).__name__}: {exc})")
    finally:
        await redis.aclose()

    return PaymentView(
        payment_id=payment_id,
        generated_at=datetime.now(UTC),
        status=status,
        events=events,
        attempts=attempts,
        ledger_entries=ledger_entries,
        webhook_deliveries=deliveries,
        notes=notes,
    )


# ------------------------------------------------------------------------- rendering
def _money(amount: int | None, currency: str | None) -> str:
    """Exact major units with the currency (``-12.50 USD``); minor units if unknown."""
    if amount is None:
        return ""
    if not currency:
        return str(amount)
    try:
        places = exponent(currency)
    except ValueError:
        return f"{amount} {currency}"
    sign = "-" if amount < 0 else ""
    return f"{sign}{Decimal(abs(amount)).scaleb(-places):.{places}f} {currency}"


def _when(moment: datetime | None) -> str:
    return "" if moment is None else moment.astimezone(UTC).isoformat(timespec="seconds")


def _cell(value: object) -> str:
    return "" if value is None else escape(str(value))


def _none(console: Console) -> None:
    console.print("  [dim](none)[/]")


def _render_status(view: PaymentView, console: Console) -> None:
    console.rule(f"[bold]payment {escape(view.payment_id)}[/]")
    status = view.status
    if status is None:
        console.print("status: [yellow]not in the status read model[/]")
        return
    currency = status.get("currency")
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    rows: Sequence[tuple[str, object]] = (
        ("status", status.get("status")),
        ("merchant", status.get("merchant_id")),
        ("amount", _money(status.get("amount"), currency)),
        ("captured", _money(status.get("amount_captured"), currency)),
        ("refunded", _money(status.get("amount_refunded"), currency)),
        ("psp", status.get("psp")),
        ("psp reference", status.get("psp_reference")),
        ("last event", f"{status.get('type')} ({status.get('event_id')})"),
        ("at", status.get("occurred_at")),
        ("decline code", status.get("decline_code")),
        ("reason", status.get("reason")),
    )
    for label, value in rows:
        if value not in (None, ""):
            table.add_row(label, _cell(value))
    console.print(table)


def _render_events(view: PaymentView, console: Console) -> None:
    console.print(f"\n[bold]events[/] ({len(view.events)})")
    if not view.events:
        _none(console)
        return
    table = Table()
    for column in ("seq", "occurred at", "type", "status", "amount", "captured", "refunded",
                   "psp", "detail", "event id"):
        table.add_column(column, justify="right" if column == "seq" else "left")
    for e in view.events:
        detail = " ".join(
            part
            for part in (
                e.decline_code or "",
                e.reason or "",
                f"refund {e.refund_id}" if e.refund_id else "",
                "(replayed)" if e.replayed else "",
            )
            if part
        )
        table.add_row(
            str(e.sequence), _when(e.occurred_at), e.type, e.status,
            _money(e.amount, e.currency), _money(e.amount_captured, e.currency),
            _money(e.amount_refunded, e.currency), _cell(e.psp), _cell(detail),
            _cell(e.event_id),
        )
    console.print(table)


def _render_attempts(view: PaymentView, console: Console) -> None:
    console.print(f"\n[bold]PSP attempts[/] ({len(view.attempts)})")
    if not view.attempts:
        _none(console)
        return
    table = Table()
    for column in ("attempt id", "operation", "n", "psp", "claim expires in"):
        table.add_column(column)
    for a in view.attempts:
        expires = "" if a.expires_in_seconds is None else f"{a.expires_in_seconds}s"
        table.add_row(_cell(a.attempt_id), a.operation, _cell(a.number), _cell(a.psp), expires)
    console.print(table)


def _render_ledger(view: PaymentView, console: Console) -> None:
    console.print(f"\n[bold]ledger entries[/] ({len(view.ledger_entries)})")
    if not view.ledger_entries:
        _none(console)
        return
    table = Table()
    columns: Sequence[tuple[str, JustifyMethod]] = (
        ("tx", "right"), ("kind", "left"), ("account", "left"), ("debit", "right"),
        ("credit", "right"), ("reference", "left"), ("posted at", "left"), ("event id", "left"),
    )
    for column, justify in columns:
        table.add_column(column, justify=justify)
    for entry in view.ledger_entries:
        debit = _money(entry.amount, entry.currency) if entry.amount > 0 else ""
        credit = _money(-entry.amount, entry.currency) if entry.amount < 0 else ""
        table.add_row(
            str(entry.transaction_id), _cell(entry.kind), _cell(entry.account), debit, credit,
            _cell(entry.reference), _when(entry.posted_at), _cell(entry.event_id),
        )
    console.print(table)


def _render_webhooks(view: PaymentView, console: Console) -> None:
    console.print(f"\n[bold]webhook deliveries[/] ({len(view.webhook_deliveries)})")
    if not view.webhook_deliveries:
        _none(console)
        return
    table = Table()
    for column in ("id", "event type", "endpoint", "status", "attempts", "last code",
                   "next attempt", "delivered at", "last error"):
        table.add_column(column)
    for d in view.webhook_deliveries:
        table.add_row(
            str(d.id), _cell(d.event_type), str(d.endpoint_id), _cell(d.status),
            str(d.attempts), _cell(d.last_status_code), _when(d.next_attempt_at),
            _when(d.delivered_at), _cell(d.last_error),
        )
    console.print(table)
    log = [(d.id, a) for d in view.webhook_deliveries for a in d.attempt_log]
    if log:
        attempts = Table(title="webhook attempts")
        for column in ("delivery", "attempt", "at", "code", "latency", "error"):
            attempts.add_column(column)
        for delivery_id, a in log:
            latency = "" if a.latency_ms is None else f"{a.latency_ms:.0f} ms"
            attempts.add_row(
                str(delivery_id), str(a.attempt), _when(a.attempted_at),
                _cell(a.status_code), latency, _cell(a.error),
            )
        console.print(attempts)


def render_payment_view(view: PaymentView, console: Console) -> None:
    """Print the view: status, then events, PSP attempts, ledger entries, webhooks."""
    _render_status(view, console)
    _render_events(view, console)
    _render_attempts(view, console)
    _render_ledger(view, console)
    _render_webhooks(view, console)
    for note in view.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    if not view.found:
        console.print(f"[red]no payment {escape(view.payment_id)} anywhere[/]")
