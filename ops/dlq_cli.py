"""``paystream dlq list | show | replay``: inspect and replay dead-lettered records.

Mounted by the main CLI as ``paystream dlq``. Kafka and PostgreSQL come from the settings
(``PAYSTREAM_KAFKA_BOOTSTRAP_SERVERS``, ``PAYSTREAM_PG_DSN``); the runbook is
docs/operator-dlq.md.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import asyncpg
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from config.settings import EMBEDDED, Settings, get_settings
from ops.dlq import (
    DLQ_TOPICS,
    DlqError,
    DlqFilter,
    DlqRecord,
    ReplayReport,
    read_dlq,
    read_record,
    replay,
    replayed_coordinates,
)
from sinks.migrations import migrate

dlq_app = typer.Typer(
    help="Inspect and replay dead-lettered records (runbook: docs/operator-dlq.md).",
    no_args_is_help=True,
)

T = TypeVar("T")

TopicOption = Annotated[
    str,
    typer.Option(help=f"{' | '.join(DLQ_TOPICS)} | all", show_default=True),
]
StageOption = Annotated[
    str | None, typer.Option(help="Only this stage (intake, state, executor, sink, ledger).")
]
ReasonOption = Annotated[
    str | None, typer.Option(help="Only this reason (invalid_json, unexpected_error, ...).")
]
SinceOption = Annotated[
    str | None,
    typer.Option(help="Dead-lettered at or after (ISO 8601; no offset means UTC)."),
]
UntilOption = Annotated[
    str | None, typer.Option(help="Dead-lettered before (ISO 8601; no offset means UTC).")
]
PaymentOption = Annotated[str | None, typer.Option(help="Only this payment id (record key).")]


def _console() -> Console:
    return Console(soft_wrap=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    _console().print(f"[red]{escape(message)}[/]")
    return typer.Exit(code)


def _topics(topic: str) -> list[str]:
    if topic == "all":
        return list(DLQ_TOPICS)
    if topic not in DLQ_TOPICS:
        raise _fail(f"--topic must be one of {', '.join(DLQ_TOPICS)} or all, not {topic!r}")
    return [topic]


def _instant(text: str | None, option: str) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise _fail(f"{option}: not an ISO 8601 time: {text!r}") from exc
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _filters(
    stage: str | None, reason: str | None, since: str | None, until: str | None,
    payment_id: str | None,
) -> DlqFilter:
    return DlqFilter(
        stage=stage,
        reason=reason,
        since=_instant(since, "--since"),
        until=_instant(until, "--until"),
        payment_id=payment_id,
    )


def _read(settings: Settings, topics: list[str], filters: DlqFilter) -> list[DlqRecord]:
    try:
        return read_dlq(settings, topics, filters)
    except DlqError as exc:
        raise _fail(str(exc), 1) from exc


def _with_db(settings: Settings, action: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    if settings.pg_dsn == EMBEDDED:
        raise _fail("set PAYSTREAM_PG_DSN to the pipeline's PostgreSQL (replays are tracked there)")

    async def run() -> T:
        conn = await asyncpg.connect(settings.pg_dsn)
        try:
            await migrate(conn)  # makes sure dlq_replays exists
            return await action(conn)
        finally:
            await conn.close()

    try:
        return asyncio.run(run())
    except (OSError, asyncpg.PostgresError) as exc:
        raise _fail(f"PostgreSQL ({type(exc).__name__}): {exc}", 1) from exc


def _maybe_db(settings: Settings, action: Callable[[asyncpg.Connection], Awaitable[T]]) -> T | None:
    """``_with_db`` for read-only extras: ``None`` (with a warning) if PostgreSQL is absent."""
    if settings.pg_dsn == EMBEDDED:
        return None
    try:
        return _with_db(settings, action)
    except typer.Exit:
        _console().print("[yellow]replay tracking unavailable: 'replayed' shows ?[/]")
        return None


def _time(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4]


def _record_json(record: DlqRecord, replayed: bool | None) -> dict[str, Any]:
    envelope = record.envelope
    return {
        "dlq_topic": record.topic,
        "dlq_partition": record.partition,
        "dlq_offset": record.offset,
        "dead_lettered_at": _time(record.failed_at),
        "key": record.key_text,
        "envelope": None if envelope is None else envelope.model_dump(mode="json"),
        "envelope_error": record.envelope_error,
        "replayed": replayed,
    }


# ----------------------------------------------------------------------------- list
@dlq_app.command("list")
def list_command(
    topic: TopicOption = "all",
    stage: StageOption = None,
    reason: ReasonOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    payment_id: PaymentOption = None,
    output: Annotated[str, typer.Option(help="table | json (one object per line).")] = "table",
) -> None:
    """List dead-lettered records (oldest first) with where they came from and why."""
    if output not in {"table", "json"}:
        raise _fail("--output must be table or json")
    settings = get_settings()
    records = _read(settings, _topics(topic), _filters(stage, reason, since, until, payment_id))

    async def lookup(conn: asyncpg.Connection) -> set[tuple[str, int, int]]:
        return set(await replayed_coordinates(conn, records))

    replayed = _maybe_db(settings, lookup)

    def was_replayed(record: DlqRecord) -> bool | None:
        return None if replayed is None else record.coordinate in replayed

    console = _console()
    if output == "json":
        for record in records:
            console.out(json.dumps(_record_json(record, was_replayed(record))), highlight=False)
        return
    table = Table(title=f"{len(records)} dead-lettered record(s)")
    for column in ("dlq", "time", "stage", "reason", "original", "key", "error", "replayed"):
        table.add_column(column, overflow="fold")
    for record in records:
        envelope = record.envelope
        flag = was_replayed(record)
        table.add_row(
            f"{record.topic}[{record.partition}]@{record.offset}",
            _time(record.failed_at),
            envelope.stage if envelope else "?",
            envelope.reason if envelope else "?",
            (f"{envelope.original_topic}[{envelope.original_partition}]"
             f"@{envelope.original_offset}") if envelope else "?",
            escape(record.key_text),
            escape((envelope.error_message if envelope else record.envelope_error or "")[:60]),
            "?" if flag is None else ("yes" if flag else "no"),
        )
    console.print(table)


# ----------------------------------------------------------------------------- show
@dlq_app.command("show")
def show_command(
    topic: Annotated[str, typer.Option(help=" | ".join(DLQ_TOPICS))],
    offset: Annotated[int, typer.Option(help="Offset of the DLQ record.")],
    partition: Annotated[int, typer.Option(help="Partition of the DLQ record.")] = 0,
) -> None:
    """Every header of one DLQ record and its value (pretty-printed if it is JSON)."""
    [name] = _topics(topic)
    settings = get_settings()
    try:
        record = read_record(settings, name, offset, partition)
    except DlqError as exc:
        raise _fail(str(exc), 1) from exc
    if record is None:
        raise _fail(f"no record at {name}[{partition}]@{offset}", 1)
    console = _console()
    console.print(f"[bold]{name}[{partition}]@{offset}[/]  dead-lettered {_time(record.failed_at)}")
    console.print(f"key: {escape(record.key_text)!s}", highlight=False)
    table = Table(title="headers", show_header=True)
    table.add_column("header")
    table.add_column("value", overflow="fold")
    for header, value in record.headers:
        table.add_row(escape(header), escape(value.decode("utf-8", errors="replace")))
    console.print(table)
    if record.envelope_error:
        console.print(f"[red]envelope invalid:[/] {escape(record.envelope_error)}")

    async def lookup(conn: asyncpg.Connection) -> str:
        row = (await replayed_coordinates(conn, [record])).get(record.coordinate)
        return "no" if row is None else f"yes, {_time(row.replayed_at)} by {row.replayed_by}"

    console.print(f"replayed: {escape(_maybe_db(settings, lookup) or '?')}", highlight=False)
    if record.value is None:
        console.print("value: (none)")
        return
    console.print(f"value ({len(record.value)} bytes):")
    try:
        console.print_json(json.dumps(json.loads(record.value)))
    except (UnicodeDecodeError, json.JSONDecodeError):
        console.out(record.value.decode("utf-8", errors="replace"), highlight=False)


# ----------------------------------------------------------------------------- replay
def _print_report(report: ReplayReport) -> None:
    console = _console()
    table = Table(title=("replay" if report.executed else "replay (dry run: nothing published)"))
    for column in ("dlq", "stage", "reason", "key", "outcome", "detail"):
        table.add_column(column, overflow="fold")
    for item in report.items:
        record = item.record
        envelope = record.envelope
        table.add_row(
            f"{record.topic}[{record.partition}]@{record.offset}",
            envelope.stage if envelope else "?",
            envelope.reason if envelope else "?",
            escape(record.key_text),
            item.outcome.replace("_", " "),
            escape(item.detail),
        )
    if report.items:
        console.print(table)
    console.print(report.summary(), highlight=False)
    if not report.executed and report.count("would_replay"):
        console.print("dry run: run again with --execute to publish.", highlight=False)


@dlq_app.command("replay")
def replay_command(
    topic: TopicOption = "all",
    stage: StageOption = None,
    reason: ReasonOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    payment_id: PaymentOption = None,
    execute: Annotated[
        bool,
        typer.Option("--execute/--dry-run", help="Publish (default: dry run, publish nothing)."),
    ] = False,
    allow_repeat: Annotated[
        bool,
        typer.Option(help="Also replay records whose same bytes were replayed before."),
    ] = False,
    replayed_by: Annotated[
        str | None, typer.Option("--by", help="Who replays (default: user@host).")
    ] = None,
) -> None:
    """Re-publish dead-lettered records' original key and bytes to their original topic.

    Dry run by default. Records already replayed (tracked in PostgreSQL) are skipped.
    """
    settings = get_settings()
    filters = _filters(stage, reason, since, until, payment_id)
    records = _read(settings, _topics(topic), filters)

    async def run(conn: asyncpg.Connection) -> ReplayReport:
        return await replay(
            settings, records, execute, conn, replayed_by=replayed_by, allow_repeat=allow_repeat
        )

    try:
        report = _with_db(settings, run)
    except DlqError as exc:
        raise _fail(str(exc), 1) from exc
    _print_report(report)
    if not report.ok:
        raise typer.Exit(1)
