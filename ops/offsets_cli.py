"""``paystream offsets``: show a group's lag, reset its offsets like kafka-consumer-groups.

Mounted by the main CLI as ``app.add_typer(offsets_app, name="offsets")``.
"""

from __future__ import annotations

from typing import Annotated

import typer
from confluent_kafka import KafkaException
from rich.console import Console
from rich.table import Table

from config.settings import get_settings
from topics import offsets
from topics.offsets import GroupActiveError, OffsetsError, ResetSpec

offsets_app = typer.Typer(
    help="Consumer group offsets: lag per partition, and resets (dry-run first).",
    no_args_is_help=True,
)
console = Console()
err_console = Console(stderr=True)

GroupOption = Annotated[str, typer.Option("--group", "-g", help="Consumer group id.")]


def _fmt(value: int | None) -> str:
    return "-" if value is None else str(value)


def _parse_partitions(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        parts = [int(item) for item in text.split(",") if item.strip()]
    except ValueError as exc:
        raise typer.BadParameter(
            f"{text!r}: expected partition numbers like 0,1,3", param_hint="--partitions"
        ) from exc
    if not parts or any(p < 0 for p in parts):
        raise typer.BadParameter(
            f"{text!r}: expected partition numbers like 0,1,3", param_hint="--partitions"
        )
    return parts


def _spec(
    to_earliest: bool,
    to_latest: bool,
    to_datetime: str | None,
    by_duration: str | None,
    shift_by: int | None,
    to_offset: int | None,
) -> ResetSpec:
    chosen = [
        name
        for name, given in (
            ("--to-earliest", to_earliest),
            ("--to-latest", to_latest),
            ("--to-datetime", to_datetime is not None),
            ("--by-duration", by_duration is not None),
            ("--shift-by", shift_by is not None),
            ("--to-offset", to_offset is not None),
        )
        if given
    ]
    if len(chosen) != 1:
        got = f"got {', '.join(chosen)}" if chosen else "got none"
        raise typer.BadParameter(
            "exactly one is required: --to-earliest, --to-latest, --to-datetime, "
            f"--by-duration, --shift-by or --to-offset ({got})",
            param_hint="reset mode",
        )
    try:
        if to_datetime is not None:
            return offsets.ToDatetime(offsets.parse_iso_datetime(to_datetime))
        if by_duration is not None:
            return offsets.ByDuration(offsets.parse_iso_duration(by_duration))
    except ValueError as exc:
        hint = "--to-datetime" if to_datetime is not None else "--by-duration"
        raise typer.BadParameter(str(exc), param_hint=hint) from exc
    if shift_by is not None:
        return offsets.ShiftBy(shift_by)
    if to_offset is not None:
        if to_offset < 0:
            raise typer.BadParameter("must be >= 0", param_hint="--to-offset")
        return offsets.ToOffset(to_offset)
    return offsets.ToEarliest() if to_earliest else offsets.ToLatest()


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[red]{message}[/]", highlight=False, soft_wrap=True)
    return typer.Exit(1)


@offsets_app.command("show")
def show_command(group: GroupOption) -> None:
    """Committed offset, end offset and lag per partition of a consumer group."""
    settings = get_settings().with_local_broker()
    try:
        rows = offsets.show(settings, group)
    except (OffsetsError, KafkaException) as exc:
        raise _fail(f"cannot read group {group!r}: {exc}") from exc
    if not rows:
        console.print(f"group {group!r} has no committed offsets", highlight=False)
        return
    table = Table(title=f"consumer group {group}")
    for name in ("topic", "partition", "committed", "end", "lag"):
        table.add_column(name, justify="left" if name == "topic" else "right",
                         overflow="fold")
    for row in rows:
        table.add_row(row.topic, str(row.partition), _fmt(row.committed), _fmt(row.end),
                      _fmt(row.lag))
    known = [row.lag for row in rows if row.lag is not None]
    table.add_section()
    table.add_row("total", "", "", "", str(sum(known)))
    console.print(table)
    if any(lag < 0 for lag in known):
        err_console.print(
            "[yellow]note: a negative lag means the end offset reads low (Tansu's high "
            "watermark lags a multi-record last batch) or the log was truncated.[/]",
            highlight=False,
            soft_wrap=True,
        )


@offsets_app.command("reset")
def reset_command(
    group: GroupOption,
    topic: Annotated[str, typer.Option("--topic", "-t", help="Topic whose offsets to reset.")],
    partitions: Annotated[
        str | None, typer.Option(help="Only these partitions, e.g. 0,1 (default: all).")
    ] = None,
    to_earliest: Annotated[bool, typer.Option("--to-earliest", help="Log start.")] = False,
    to_latest: Annotated[bool, typer.Option("--to-latest", help="Log end.")] = False,
    to_datetime: Annotated[
        str | None,
        typer.Option(help="First record at/after this ISO 8601 instant, e.g. "
                          "2026-11-21T10:00:00Z (a zone is required)."),
    ] = None,
    by_duration: Annotated[
        str | None,
        typer.Option(help="First record at/after now minus this ISO 8601 duration, "
                          "e.g. PT1H, P1DT2H."),
    ] = None,
    shift_by: Annotated[
        int | None,
        typer.Option(help="Committed offset plus N (negative re-reads), clamped to the log."),
    ] = None,
    to_offset: Annotated[
        int | None, typer.Option(help="Absolute offset N, clamped to the log.")
    ] = None,
    execute: Annotated[
        bool,
        typer.Option("--execute/--dry-run",
                     help="Apply the reset; the default only prints the plan."),
    ] = False,
) -> None:
    """Reset a group's committed offsets on one topic (like kafka-consumer-groups.sh)."""
    spec = _spec(to_earliest, to_latest, to_datetime, by_duration, shift_by, to_offset)
    chosen = _parse_partitions(partitions)
    settings = get_settings().with_local_broker()
    try:
        rows = offsets.plan_reset(settings, group, topic, spec, chosen)
    except (OffsetsError, KafkaException) as exc:
        raise _fail(f"cannot plan the reset: {exc}") from exc

    table = Table(title=f"reset {group} on {topic}: {offsets.describe_spec(spec)}")
    for name in ("topic", "partition", "before", "after", "change", "log start", "log end"):
        table.add_column(name, justify="left" if name == "topic" else "right",
                         overflow="fold")
    for row in rows:
        change = row.change
        table.add_row(row.topic, str(row.partition), _fmt(row.current), str(row.target),
                      "-" if change is None else f"{change:+d}", str(row.earliest),
                      str(row.end))
    console.print(table)
    past_end = [row for row in rows if row.past_end]
    if past_end:
        where = ", ".join(f"{row.topic}[{row.partition}]" for row in past_end)
        err_console.print(
            f"[yellow]warning: the committed offset of {where} is past the broker's end "
            "offset, so this plan moves it back. The end offset reads low on brokers whose "
            "high watermark lags the last batch (Tansu), or the log was truncated. See "
            "docs/operator-offsets.md.[/]",
            highlight=False,
            soft_wrap=True,
        )

    if not execute:
        console.print("dry run: nothing changed (add --execute to apply)", highlight=False)
        return
    try:
        offsets.execute_reset(settings, group, rows)
    except GroupActiveError as exc:
        raise _fail(f"refused: {exc}") from exc
    except (OffsetsError, KafkaException) as exc:
        raise _fail(f"reset failed: {exc}") from exc
    console.print("done", highlight=False)
