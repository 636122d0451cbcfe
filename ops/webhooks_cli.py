"""``paystream webhooks``: merchant webhook endpoints, deliveries and replays.

Mounted by the main CLI as ``paystream webhooks``. PostgreSQL comes from the settings
(``PAYSTREAM_PG_DSN``); the guide for merchants and operators is docs/webhooks.md.

- ``endpoints add | list | rotate-secret | disable | enable``
- ``deliveries``: deliveries and their attempt log
- ``replay``: send deliveries again (dry run unless ``--execute``)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, TypeVar, cast

import asyncpg
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from config.settings import EMBEDDED, Settings, get_settings
from sinks.migrations import migrate
from sinks.webhook_endpoints import (
    EndpointError,
    MerchantEndpoint,
    add_endpoint,
    disable_endpoint,
    enable_endpoint,
    list_endpoints,
    redact_url,
    rotate_secret,
)
from sinks.webhook_outbox import (
    AttemptRecord,
    DeliveryRecord,
    DeliveryStatus,
    list_attempts,
    list_deliveries,
)
from sinks.webhook_replay import ReplayResult, ReplaySelection, replay_deliveries

webhooks_app = typer.Typer(
    help="Merchant webhooks: endpoints, deliveries, replays (guide: docs/webhooks.md).",
    no_args_is_help=True,
)
endpoints_app = typer.Typer(
    help="Merchant webhook endpoints: add, list, rotate a secret, disable, enable.",
    no_args_is_help=True,
)
webhooks_app.add_typer(endpoints_app, name="endpoints")

T = TypeVar("T")
STATUSES: tuple[str, ...] = ("pending", "delivered", "dead")


def _console() -> Console:
    return Console(soft_wrap=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    _console().print(f"[red]{escape(message)}[/]")
    return typer.Exit(code)


def _settings() -> Settings:
    return get_settings().with_local_broker()


def _with_db(action: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    settings = _settings()
    if settings.pg_dsn == EMBEDDED:
        raise _fail("set PAYSTREAM_PG_DSN to the pipeline's PostgreSQL (webhooks live there)")

    async def run() -> T:
        conn = await asyncpg.connect(settings.pg_dsn)
        try:
            await migrate(conn)  # makes sure the webhook tables exist
            return await action(conn)
        finally:
            await conn.close()

    try:
        return asyncio.run(run())
    except EndpointError as exc:
        raise _fail(str(exc), 1) from exc
    except (OSError, asyncpg.PostgresError) as exc:
        raise _fail(f"PostgreSQL ({type(exc).__name__}): {exc}", 1) from exc


def _time(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _instant(text: str | None, option: str) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise _fail(f"{option}: not an ISO 8601 time: {text!r}") from exc
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _endpoint_table(endpoints: list[MerchantEndpoint], title: str) -> Table:
    table = Table(title=title)
    for column in ("id", "merchant", "url", "events", "enabled", "created", "rotation ends"):
        table.add_column(column, overflow="fold")
    for endpoint in endpoints:
        table.add_row(
            str(endpoint.id),
            escape(endpoint.merchant_id),
            escape(redact_url(endpoint.url)),
            escape(",".join(endpoint.event_types) or "(all)"),
            "yes" if endpoint.enabled else "no",
            _time(endpoint.created_at),
            _time(endpoint.previous_secret_expires_at),
        )
    return table


# ----------------------------------------------------------------------------- endpoints
@endpoints_app.command("add")
def add_command(
    merchant: Annotated[str, typer.Option("--merchant", help="Merchant id.")],
    url: Annotated[str, typer.Option("--url", help="Where to POST events (http(s)://...).")],
    events: Annotated[
        str | None,
        typer.Option(
            "--events", help="Comma-separated event types, e.g. payment.captured (default: all)."
        ),
    ] = None,
) -> None:
    """Register a webhook endpoint; prints its id and its signing secret (shown only once)."""
    types = [t for t in (events or "").split(",") if t.strip()]
    created = _with_db(lambda conn: add_endpoint(conn, merchant, url, types))
    console = _console()
    endpoint = created.endpoint
    console.out(f"endpoint id: {endpoint.id}", highlight=False)
    console.out(f"secret: {created.secret}", highlight=False)
    console.print(
        f"merchant {escape(endpoint.merchant_id)}, {escape(redact_url(endpoint.url))}, events: "
        f"{escape(','.join(endpoint.event_types) or 'all')}. The secret is shown only "
        "now: give it to the merchant, it is needed to verify signatures.",
        highlight=False,
    )


@endpoints_app.command("list")
def list_command(
    merchant: Annotated[str | None, typer.Option("--merchant", help="Only this merchant.")] = None,
) -> None:
    """List endpoints (never their secrets)."""
    endpoints = _with_db(lambda conn: list_endpoints(conn, merchant))
    _console().print(_endpoint_table(endpoints, f"{len(endpoints)} webhook endpoint(s)"))


@endpoints_app.command("rotate-secret")
def rotate_command(
    endpoint_id: Annotated[int, typer.Argument(help="Endpoint id.")],
    overlap_hours: Annotated[
        float,
        typer.Option(
            "--overlap-hours", min=0, help="How long the old secret keeps signing too."
        ),
    ] = 24.0,
) -> None:
    """Give an endpoint a new secret; both sign deliveries until the overlap ends."""
    overlap = timedelta(hours=overlap_hours)
    rotated = _with_db(lambda conn: rotate_secret(conn, endpoint_id, overlap))
    console = _console()
    console.out(f"endpoint id: {rotated.endpoint.id}", highlight=False)
    console.out(f"secret: {rotated.secret}", highlight=False)
    console.print(
        f"the previous secret also signs until {_time(rotated.previous_secret_expires_at)}; "
        "the new secret is shown only now.",
        highlight=False,
    )


@endpoints_app.command("disable")
def disable_command(endpoint_id: Annotated[int, typer.Argument(help="Endpoint id.")]) -> None:
    """Stop sending to an endpoint (its pending deliveries wait until it is enabled)."""
    endpoint = _with_db(lambda conn: disable_endpoint(conn, endpoint_id))
    _console().print(
        f"endpoint {endpoint.id} ({escape(redact_url(endpoint.url))}) disabled", highlight=False
    )


@endpoints_app.command("enable")
def enable_command(endpoint_id: Annotated[int, typer.Argument(help="Endpoint id.")]) -> None:
    """Send to a disabled endpoint again (its pending deliveries resume)."""
    endpoint = _with_db(lambda conn: enable_endpoint(conn, endpoint_id))
    _console().print(
        f"endpoint {endpoint.id} ({escape(redact_url(endpoint.url))}) enabled", highlight=False
    )


# ----------------------------------------------------------------------------- deliveries
def _last(delivery: DeliveryRecord) -> str:
    if delivery.last_error:
        return delivery.last_error
    return "" if delivery.last_status_code is None else f"HTTP {delivery.last_status_code}"


def _attempt_log(attempts: list[AttemptRecord]) -> str:
    return " ".join(
        f"{a.attempt}:{a.status_code if a.status_code is not None else 'error'}" for a in attempts
    )


def _delivery_table(
    deliveries: list[DeliveryRecord], attempts: dict[int, list[AttemptRecord]], title: str
) -> Table:
    table = Table(title=title)
    for column in (
        "id", "event", "type", "payment", "endpoint", "status", "attempts", "attempt log",
        "last", "next attempt", "created",
    ):
        table.add_column(column, overflow="fold")
    for d in deliveries:
        endpoint = f"{d.endpoint_id} {redact_url(d.endpoint_url)}"
        if not d.endpoint_enabled:
            endpoint += " (disabled)"
        table.add_row(
            str(d.id),
            escape(d.event_id),
            d.event_type,
            escape(d.payment_id),
            escape(endpoint),
            d.status,
            str(d.attempts),
            _attempt_log(attempts.get(d.id, [])),
            escape(_last(d)[:80]),
            _time(d.next_attempt_at) if d.status == "pending" else "",
            _time(d.created_at),
        )
    return table


@webhooks_app.command("deliveries")
def deliveries_command(
    payment: Annotated[str | None, typer.Option("--payment", help="Only this payment.")] = None,
    event_id: Annotated[str | None, typer.Option("--event-id", help="Only this event.")] = None,
    status: Annotated[
        str | None, typer.Option("--status", help="pending | delivered | dead")
    ] = None,
    merchant: Annotated[str | None, typer.Option("--merchant", help="Only this merchant.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Newest N deliveries.")] = 50,
) -> None:
    """Webhook deliveries, newest first, with their attempts.

    The attempt log shows attempt:HTTP status ('error': a timeout or connection error).
    """
    if status is not None and status not in STATUSES:
        raise _fail(f"--status must be one of {', '.join(STATUSES)}, not {status!r}")

    async def fetch(
        conn: asyncpg.Connection,
    ) -> tuple[list[DeliveryRecord], dict[int, list[AttemptRecord]]]:
        found = await list_deliveries(
            conn,
            payment_id=payment,
            event_id=event_id,
            status=cast(DeliveryStatus | None, status),
            merchant_id=merchant,
            limit=limit,
        )
        return found, await list_attempts(conn, [d.id for d in found])

    deliveries, attempts = _with_db(fetch)
    _console().print(
        _delivery_table(deliveries, attempts, f"{len(deliveries)} webhook delivery(ies)")
    )


# ----------------------------------------------------------------------------- replay
@webhooks_app.command("replay")
def replay_command(
    event_id: Annotated[
        str | None, typer.Option("--event-id", help="This event's deliveries.")
    ] = None,
    payment: Annotated[
        str | None, typer.Option("--payment", help="Every delivery of this payment.")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Deliveries enqueued at or after (ISO 8601; no offset: UTC)."),
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="... and before (ISO 8601; only with --since).")
    ] = None,
    endpoint: Annotated[
        int | None, typer.Option("--endpoint", help="Only this endpoint id.")
    ] = None,
    execute: Annotated[
        bool,
        typer.Option("--execute/--dry-run", help="Send again (default: dry run, change nothing)."),
    ] = False,
) -> None:
    """Send webhook deliveries again: choose --event-id, --payment or --since [--until].

    Dry run by default. --execute sets the chosen deliveries back to pending, due now; the
    dispatcher re-sends the same payload with the same Paystream-Event-Id, attempt numbers
    keep counting, and the retry schedule starts again.
    """
    try:
        selection = ReplaySelection(
            event_id=event_id,
            payment_id=payment,
            since=_instant(since, "--since"),
            until=_instant(until, "--until"),
            endpoint_id=endpoint,
        )
    except ValidationError as exc:
        messages = "; ".join(str(error["msg"]) for error in exc.errors())
        raise _fail(
            f"{messages} (use --event-id, --payment or --since [--until])"
        ) from exc

    async def run(conn: asyncpg.Connection) -> tuple[ReplayResult, dict[int, list[AttemptRecord]]]:
        result = await replay_deliveries(conn, selection, execute=execute)
        return result, await list_attempts(conn, [d.id for d in result.deliveries])

    result, attempts = _with_db(run)
    console = _console()
    if not result.deliveries:
        console.print("no webhook deliveries match", highlight=False)
        return
    title = "replay" if result.executed else "replay (dry run: nothing changed)"
    console.print(_delivery_table(result.deliveries, attempts, title))
    disabled = sum(1 for d in result.deliveries if not d.endpoint_enabled)
    if result.executed:
        console.print(
            f"{result.replayed} delivery(ies) set back to pending, due now; the dispatcher "
            "sends them again.",
            highlight=False,
        )
    else:
        console.print(
            f"dry run: {len(result.deliveries)} delivery(ies) would be sent again; run again "
            "with --execute to send them.",
            highlight=False,
        )
    if disabled:
        console.print(
            f"[yellow]{disabled} of them belong to a disabled endpoint: sent only once it is "
            "enabled again.[/]"
        )
