"""Consumer group offsets: lag per partition (the lag monitor, ``paystream offsets show``), and
resets like ``kafka-consumer-groups.sh`` (``paystream offsets reset``).

Only standard Kafka admin APIs are used (ListOffsets, OffsetFetch, OffsetCommit through
``alter_consumer_group_offsets``, DescribeGroups), so this works on Apache Kafka and on the
embedded Tansu broker alike.

Reset targets follow Kafka's own tool (``ConsumerGroupCommand``):

* ``ToEarliest``: the log start offset.
* ``ToLatest``: the log end offset (high watermark).
* ``ToDatetime``: the first offset whose record timestamp is >= the given instant
  (ListOffsets by timestamp); the log end offset when no record is that recent.
* ``ByDuration``: ``now - duration``, then as ``ToDatetime``.
* ``ShiftBy``: the committed offset + N, clamped to ``[log start, log end]``. Like Kafka's
  tool, a partition without a committed offset cannot be shifted: the whole plan is refused
  (exclude such partitions with ``partitions=``).
* ``ToOffset``: N, clamped to ``[log start, log end]``.

Every other mode ignores the committed offset, so a partition the group never committed
gets the computed target like the others (Kafka's tool does the same).

A reset is applied only while the group is inactive (state Empty or Dead, no members),
checked right before the offsets are altered; the broker also refuses an admin offset
commit to a group with members (UNKNOWN_MEMBER_ID), which closes the remaining race.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import (
    ConsumerGroupState,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]

from config.settings import Settings
from topics.kafka_config import client_config

DEFAULT_TIMEOUT = 15.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
_EARLIEST: Any = OffsetSpec.earliest()  # type: ignore[no-untyped-call]
_LATEST: Any = OffsetSpec.latest()  # type: ignore[no-untyped-call]
_INACTIVE_STATES = frozenset({ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD})
# Errors with which a broker refuses an admin offset commit because the group has members.
_GROUP_BUSY_CODES = frozenset(
    {
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.FENCED_INSTANCE_ID,
    }
)


class OffsetsError(Exception):
    """Offsets cannot be read, planned or applied; the message says why."""


class GroupActiveError(OffsetsError):
    """The consumer group has live members: its offsets must not be reset now."""


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class PartitionLag:
    """One partition of a group: committed offset (None if none), end offset and lag.

    ``end`` is None when the broker could not say (topic deleted, leader unavailable);
    ``lag`` (``end - committed``) is None when either side is unknown. It is reported as
    computed, so a negative lag means the end offset reads low (see the operator guide).
    """

    topic: str
    partition: int
    committed: int | None
    end: int | None
    lag: int | None


@dataclass(frozen=True)
class ResetRow:
    """A planned reset of one partition: the committed offset now and the target."""

    topic: str
    partition: int
    current: int | None
    target: int
    earliest: int
    end: int

    @property
    def past_end(self) -> bool:
        """The committed offset is beyond the broker's end offset.

        On Kafka only after log truncation or topic re-creation; on Tansu 0.6.0 whenever
        the last batch held several records, because its end offset reads low. Then
        ``ToLatest`` and the clamping of ``ShiftBy``/``ToOffset`` move the group *back*.
        """
        return self.current is not None and self.current > self.end

    @property
    def change(self) -> int | None:
        """Records the group moves forward (positive) or re-reads (negative)."""
        return None if self.current is None else self.target - self.current


# ----------------------------------------------------------------------- reset specs
@dataclass(frozen=True)
class ToEarliest:
    """Reset to the log start offset."""


@dataclass(frozen=True)
class ToLatest:
    """Reset to the log end offset."""


@dataclass(frozen=True)
class ToDatetime:
    """Reset to the first record with a timestamp at or after ``at`` (zone-aware)."""

    at: datetime

    def __post_init__(self) -> None:
        if self.at.tzinfo is None or self.at.utcoffset() is None:
            raise ValueError("the datetime needs a zone (e.g. Z or +01:00)")


@dataclass(frozen=True)
class ByDuration:
    """Reset to the first record at or after ``now - duration``."""

    duration: timedelta

    def __post_init__(self) -> None:
        if self.duration < timedelta(0):
            raise ValueError("the duration must not be negative")


@dataclass(frozen=True)
class ShiftBy:
    """Move the committed offset by ``by`` records (negative re-reads), clamped."""

    by: int


@dataclass(frozen=True)
class ToOffset:
    """Reset to an absolute offset, clamped to the partition's range."""

    offset: int


ResetSpec = ToEarliest | ToLatest | ToDatetime | ByDuration | ShiftBy | ToOffset


# ----------------------------------------------------------------------- pure parsing
_DURATION = re.compile(
    r"P(?:(?P<days>\d+)D)?"
    r"(?:T(?=\d)(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?"
    r"(?:(?P<seconds>\d+)(?:[.,](?P<fraction>\d{1,9}))?S)?)?",
    re.IGNORECASE,
)
DURATION_HELP = (
    "an ISO 8601 duration PnDTnHnMnS, e.g. PT1H, PT30M, P1DT2H, PT1.5S "
    "(days, hours, minutes, seconds; no years, months or weeks)"
)


def parse_iso_duration(text: str) -> timedelta:
    """Parse ``PnDTnHnMnS`` (as Java's ``Duration.parse`` that Kafka's tool uses, unsigned)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or not any(match.group(g) for g in ("days", "hours", "minutes",
                                                          "seconds")):
        raise ValueError(f"{text!r} is not {DURATION_HELP}")
    fraction = match.group("fraction") or ""
    try:
        return timedelta(
            days=int(match.group("days") or 0),
            hours=int(match.group("hours") or 0),
            minutes=int(match.group("minutes") or 0),
            seconds=int(match.group("seconds") or 0),
            microseconds=int(fraction.ljust(9, "0")) // 1000 if fraction else 0,
        )
    except OverflowError as exc:
        raise ValueError(f"{text!r} is too long a duration") from exc


def parse_iso_datetime(text: str) -> datetime:
    """Parse an ISO 8601 date-time with a zone, e.g. ``2026-11-21T10:00:00Z``.

    Kafka's tool also accepts a local time without a zone; we do not, so that the same
    command means the same instant on every operator's machine.
    """
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ValueError(
            f"{text!r} is not an ISO 8601 date-time such as 2026-11-21T10:00:00Z"
        ) from exc
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValueError(f"{text!r} has no zone: add Z (UTC) or an offset such as +01:00")
    return parsed


def to_epoch_ms(moment: datetime) -> int:
    """Milliseconds since the epoch (floored, like Java's ``toEpochMilli``), at least 0.

    ListOffsets reads negative timestamps as special values (-1 latest, -2 earliest), so an
    instant before 1970 is sent as 0: every record is at or after it.
    """
    return max(0, (moment - _EPOCH) // _ONE_MS)


def spec_timestamp_ms(spec: ResetSpec, now: datetime) -> int | None:
    """The ListOffsets timestamp a spec needs, or None when it needs none."""
    if isinstance(spec, ToDatetime):
        return to_epoch_ms(spec.at)
    if isinstance(spec, ByDuration):
        try:
            return to_epoch_ms(now - spec.duration)
        except OverflowError:
            return 0
    return None


def clamp(offset: int, earliest: int, end: int) -> int:
    """Kafka's ``checkOffsetsRange``: below the log start -> start, past the end -> end."""
    if offset > end:
        return end
    if offset < earliest:
        return earliest
    return offset


def target_offset(
    spec: ResetSpec,
    *,
    current: int | None,
    earliest: int,
    end: int,
    at_time: int | None = None,
    where: str = "this partition",
) -> int:
    """The new committed offset for one partition (pure; ``at_time`` for time specs).

    ``at_time`` is the ListOffsets-by-timestamp answer, None when no record is that recent.
    """
    if isinstance(spec, ToEarliest):
        return earliest
    if isinstance(spec, ToLatest):
        return end
    if isinstance(spec, ToDatetime | ByDuration):
        return end if at_time is None else at_time
    if isinstance(spec, ShiftBy):
        if current is None:
            raise OffsetsError(
                f"Cannot shift offset for partition {where} since there is no current "
                "committed offset (exclude it with --partitions, or use another mode)"
            )
        return clamp(current + spec.by, earliest, end)
    return clamp(spec.offset, earliest, end)


def describe_spec(spec: ResetSpec) -> str:
    """A short human description, for headings."""
    if isinstance(spec, ToEarliest):
        return "to earliest"
    if isinstance(spec, ToLatest):
        return "to latest"
    if isinstance(spec, ToDatetime):
        return f"to datetime {spec.at.isoformat()}"
    if isinstance(spec, ByDuration):
        return f"by duration {spec.duration}"
    if isinstance(spec, ShiftBy):
        return f"shift by {spec.by:+d}"
    return f"to offset {spec.offset}"


# ----------------------------------------------------------------------- broker access
def _admin(settings: Settings) -> AdminClient:
    conf: dict[str, str | int | float | bool] = dict(
        client_config(settings.with_local_broker())
    )
    return AdminClient(conf)


def _result(future: Any, timeout: float, what: str) -> Any:
    try:
        return future.result(timeout=timeout)
    except KafkaException as exc:
        raise OffsetsError(f"{what}: {exc.args[0] if exc.args else exc}") from exc
    except TimeoutError as exc:
        raise OffsetsError(f"{what}: no answer from the broker within {timeout}s") from exc


def _committed(
    admin: AdminClient,
    group: str,
    partitions: Sequence[tuple[str, int]] | None,
    timeout: float,
) -> dict[tuple[str, int], int]:
    """Committed offsets of ``group`` (all of them, or of ``partitions``); none -> absent."""
    request = ConsumerGroupTopicPartitions(
        group,
        None if partitions is None else [TopicPartition(t, p) for t, p in partitions],
    )
    futures = admin.list_consumer_group_offsets([request], request_timeout=timeout)
    answer = _result(futures[group], timeout, f"reading the offsets of group {group!r}")
    out: dict[tuple[str, int], int] = {}
    for tp in answer.topic_partitions or []:
        if tp.error is not None:
            raise OffsetsError(f"reading {tp.topic}[{tp.partition}] of {group!r}: {tp.error}")
        if tp.offset >= 0:
            out[(tp.topic, tp.partition)] = tp.offset
    return out


def _list_offsets(
    admin: AdminClient,
    partitions: Iterable[tuple[str, int]],
    spec: Any,
    timeout: float,
) -> dict[tuple[str, int], Any]:
    """ListOffsets for each partition; value is a ListOffsetsResultInfo or a KafkaException."""
    request = {TopicPartition(t, p): spec for t, p in partitions}
    if not request:
        return {}
    futures = admin.list_offsets(request, request_timeout=timeout)
    out: dict[tuple[str, int], Any] = {}
    for tp, future in futures.items():
        try:
            out[(tp.topic, tp.partition)] = future.result(timeout=timeout)
        except KafkaException as exc:
            out[(tp.topic, tp.partition)] = exc
    return out


def _offsets_or_raise(answers: dict[tuple[str, int], Any], what: str) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for (topic, partition), info in answers.items():
        if isinstance(info, KafkaException):
            raise OffsetsError(f"{what} of {topic}[{partition}]: {info.args[0]}")
        out[partition] = info
    return out


def _group_activity(admin: AdminClient, group: str, timeout: float) -> tuple[str, int] | None:
    """(state name, member count) when the group is active; None when it is inactive."""
    futures = admin.describe_consumer_groups([group], request_timeout=timeout)
    try:
        description = futures[group].result(timeout=timeout)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        if isinstance(error, KafkaError) and error.code() == KafkaError.GROUP_ID_NOT_FOUND:
            return None  # no such group: nothing is consuming with it
        raise OffsetsError(f"describing group {group!r}: {error or exc}") from exc
    except TimeoutError as exc:
        raise OffsetsError(f"describing group {group!r}: no answer within {timeout}s") from exc
    members = len(description.members or [])
    # Tansu 0.6.0 reports a joined group as STABLE with an empty member list (and UNKNOWN
    # while it joins), so the state decides as much as the members: anything but
    # Empty/Dead is active, exactly as in Kafka's tool.
    if description.state in _INACTIVE_STATES and members == 0:
        return None
    return description.state.name, members


def topic_partitions(settings: Settings, topic: str, timeout: float = DEFAULT_TIMEOUT) -> int:
    """Partition count of ``topic``; OffsetsError if it does not exist.

    Lists all topics rather than asking for this one: a metadata request naming a topic
    can auto-create it on brokers that allow that (Tansu does).
    """
    metadata = _admin(settings).list_topics(timeout=timeout)
    found = metadata.topics.get(topic)
    if found is None or found.error is not None:
        raise OffsetsError(f"topic {topic!r} does not exist")
    return len(found.partitions)


# ----------------------------------------------------------------------------- show
def show(settings: Settings, group: str, timeout: float = DEFAULT_TIMEOUT) -> list[PartitionLag]:
    """Committed offset, end offset and lag of every partition the group has committed
    (or, on brokers that list members, has assigned)."""
    admin = _admin(settings)
    committed = _committed(admin, group, None, timeout)
    partitions = set(committed)
    futures = admin.describe_consumer_groups([group], request_timeout=timeout)
    try:
        description = futures[group].result(timeout=timeout)
        for member in description.members or []:
            assignment = member.assignment.topic_partitions if member.assignment else []
            partitions.update((tp.topic, tp.partition) for tp in assignment or [])
    except KafkaException:
        pass  # an unknown group simply has no assignments
    ends = _list_offsets(admin, sorted(partitions), _LATEST, timeout)
    rows: list[PartitionLag] = []
    for topic, partition in sorted(partitions):
        info = ends.get((topic, partition))
        end = None if info is None or isinstance(info, KafkaException) else int(info.offset)
        current = committed.get((topic, partition))
        lag = None if end is None or current is None else end - current
        rows.append(PartitionLag(topic, partition, current, end, lag))
    return rows


# ----------------------------------------------------------------------------- reset
def plan_reset(
    settings: Settings,
    group: str,
    topic: str,
    spec: ResetSpec,
    partitions: list[int] | None = None,
    *,
    now: datetime | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[ResetRow]:
    """Where each partition of ``topic`` would move for ``group`` (reads only)."""
    count = topic_partitions(settings, topic, timeout)
    if partitions is None:
        chosen = list(range(count))
    else:
        chosen = sorted(set(partitions))
        unknown = [p for p in chosen if not 0 <= p < count]
        if unknown:
            raise OffsetsError(
                f"topic {topic!r} has partitions 0..{count - 1}; no partition {unknown}"
            )
    if not chosen:
        raise OffsetsError("no partitions to reset")
    admin = _admin(settings)
    keys = [(topic, p) for p in chosen]
    committed = _committed(admin, group, keys, timeout)
    earliest = _offsets_or_raise(
        _list_offsets(admin, keys, _EARLIEST, timeout), "the log start offset"
    )
    ends = _offsets_or_raise(
        _list_offsets(admin, keys, _LATEST, timeout), "the log end offset"
    )
    at_time: dict[int, int | None] = {}
    timestamp = spec_timestamp_ms(spec, now or datetime.now(UTC))
    if timestamp is not None:
        found = _offsets_or_raise(
            _list_offsets(admin, keys, OffsetSpec.for_timestamp(timestamp), timeout),
            "the offset for the timestamp",
        )
        for partition, info in found.items():
            # Kafka answers offset -1 (timestamp -1) when no record is that recent. Tansu
            # 0.6.0 answers offset 0 with timestamp -1 instead, so a timestamp of -1 also
            # means "none" (a real match always carries the record's timestamp).
            none_found = info.offset < 0 or info.timestamp < 0
            at_time[partition] = None if none_found else int(info.offset)
    rows: list[ResetRow] = []
    for partition in chosen:
        start = int(earliest[partition].offset)
        end = int(ends[partition].offset)
        current = committed.get((topic, partition))
        target = target_offset(
            spec,
            current=current,
            earliest=start,
            end=end,
            at_time=at_time.get(partition),
            where=f"{topic}-{partition}",
        )
        rows.append(ResetRow(topic, partition, current, target, start, end))
    return rows


def ensure_inactive(settings: Settings, group: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Raise GroupActiveError unless the group is Empty or Dead with no members."""
    activity = _group_activity(_admin(settings), group, timeout)
    if activity is not None:
        state, members = activity
        raise GroupActiveError(
            f"Offsets can only be reset while group {group!r} is inactive, but its state is "
            f"{state} ({members} member(s) listed). Stop every worker/consumer of the "
            "group (and wait for it to show as Empty) first."
        )


def _alter(admin: AdminClient, group: str, rows: Sequence[ResetRow], timeout: float) -> None:
    request = ConsumerGroupTopicPartitions(
        group, [TopicPartition(r.topic, r.partition, r.target) for r in rows]
    )
    futures = admin.alter_consumer_group_offsets([request], request_timeout=timeout)
    try:
        answer = futures[group].result(timeout=timeout)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        if isinstance(error, KafkaError) and error.code() in _GROUP_BUSY_CODES:
            raise GroupActiveError(
                f"the broker refused the reset of group {group!r}: it has live members "
                f"({error.str()})"
            ) from exc
        raise OffsetsError(f"altering the offsets of group {group!r}: {error or exc}") from exc
    except TimeoutError as exc:
        raise OffsetsError(f"altering offsets of {group!r}: no answer in {timeout}s") from exc
    failed = [tp for tp in answer.topic_partitions or [] if tp.error is not None]
    if failed:
        detail = ", ".join(f"{tp.topic}[{tp.partition}]: {tp.error.str()}" for tp in failed)
        if any(tp.error.code() in _GROUP_BUSY_CODES for tp in failed):
            raise GroupActiveError(
                f"the broker refused the reset of group {group!r}: it has live members "
                f"({detail})"
            )
        raise OffsetsError(f"altering the offsets of group {group!r} failed: {detail}")


def execute_reset(
    settings: Settings,
    group: str,
    rows: Sequence[ResetRow],
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Commit every row's target for ``group``; refuses while the group is active."""
    if not rows:
        return
    ensure_inactive(settings, group, timeout)  # right before altering
    _alter(_admin(settings), group, rows, timeout)
