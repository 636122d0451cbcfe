"""Dead-letter topics: read, filter and replay dead-lettered records.

``paystream dlq`` (see :mod:`ops.dlq_cli`) is a thin layer over this module.

Reading (:func:`read_dlq`) uses a confluent-kafka consumer with ``assign()``: no group
join, no offset commits, so it never disturbs the workers and two operators can read at
once. Each partition is read from its low watermark until it is *done*; the end is the
high watermark captured before reading starts. Tansu reports a high watermark that is
the base offset of the last record batch + 1, not the log end (see FIELD-NOTES), so a
partition counts as done when one of these holds:

* librdkafka's partition-EOF event (``enable.partition.eof``) arrives at a position at or
  beyond the captured watermark (Kafka, and Tansu when the last batch has one record);
* the consumer's position is at or beyond the captured watermark and the partition has
  returned nothing for :data:`QUIET_SECONDS` (Tansu with a multi-record last batch:
  librdkafka emits EOF only when the position *equals* the watermark, which then never
  happens; a fetch returns whole batches, so once the position passed the watermark the
  whole last batch has been read).

Records are keyed by their offset, so a record delivered twice is listed once.

Replaying (:func:`replay`) re-publishes a record's original key and value bytes, unchanged,
to ``envelope.original_topic`` and ``envelope.original_partition`` (the partition the
producer chose, whichever partitioner it used, so the payment's commands stay in one
partition), with ``replay.*`` headers only. It uses an idempotent producer (acks=all) and
records each DLQ coordinate in the ``dlq_replays`` table *after* the broker acknowledged
it. A crash between the acknowledgement and the insert means the next run publishes that
record again; that is safe because the pipeline is idempotent (commands are deduplicated
by idempotency key per payment, sinks by event id), and it is the only way round that is
safe: recording first would lose a record that was never published. Runs are serialised
by a PostgreSQL advisory lock, so two operators cannot replay the same record at once.
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from pydantic import ValidationError

from config.settings import Settings
from schemas.dlq import HEADER_PREFIX, DlqEnvelope
from topics.catalog import COMMANDS_DLQ, EVENTS_DLQ, PSP_NOTIFICATIONS_DLQ
from topics.kafka_config import client_config, producer_config

__all__ = [
    "DLQ_TOPICS",
    "REPLAY_HEADER_PREFIX",
    "DlqError",
    "DlqFilter",
    "DlqRecord",
    "ReplayItem",
    "ReplayReport",
    "read_dlq",
    "read_record",
    "replay",
    "replayed_coordinates",
]

DLQ_TOPICS: tuple[str, ...] = (COMMANDS_DLQ, EVENTS_DLQ, PSP_NOTIFICATIONS_DLQ)
REPLAY_HEADER_PREFIX = "replay."
QUIET_SECONDS = 1.0
"""How long a partition past its captured high watermark must stay silent to be done."""
REPLAY_LOCK_KEY = 0x7061_7973_646C_71  # "paysdlq": advisory lock held while replaying
PUBLISH_CHUNK = 200
"""Records published per flush; each chunk is recorded once the broker acknowledged it."""

Coordinate = tuple[str, int, int]
"""(dlq topic, partition, offset): where a dead-lettered record lives."""


class DlqError(RuntimeError):
    """A DLQ topic could not be read or a replay could not be published."""


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True, slots=True)
class DlqRecord:
    """One record of a dead-letter topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    """The original record's key (the payment id for commands and events)."""
    value: bytes | None
    """The original record's value bytes (PAN-scrubbed by the worker), unchanged."""
    headers: tuple[tuple[str, bytes], ...]
    envelope: DlqEnvelope | None
    """The ``dlq.*`` headers; ``None`` when they are missing or invalid (not replayable)."""
    envelope_error: str | None
    timestamp: datetime | None
    """The DLQ record's Kafka timestamp (when it was dead-lettered)."""

    @property
    def coordinate(self) -> Coordinate:
        return (self.topic, self.partition, self.offset)

    @property
    def key_text(self) -> str:
        return "" if self.key is None else self.key.decode("utf-8", errors="replace")

    @property
    def failed_at(self) -> datetime | None:
        """When the record was dead-lettered: the DLQ record time, else last_failure_at."""
        if self.timestamp is not None:
            return self.timestamp
        return self.envelope.last_failure_at if self.envelope is not None else None

    def sha256(self) -> str:
        """Digest of key and value (length-prefixed, so the boundary is unambiguous)."""
        digest = hashlib.sha256()
        for part in (self.key, self.value):
            if part is None:
                digest.update(b"\xff" * 8)
            else:
                digest.update(len(part).to_bytes(8, "big"))
                digest.update(part)
        return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class DlqFilter:
    """Which records to keep; every field left ``None`` matches everything."""

    stage: str | None = None
    reason: str | None = None
    since: datetime | None = None
    """Inclusive lower bound on :attr:`DlqRecord.failed_at` (timezone-aware)."""
    until: datetime | None = None
    """Exclusive upper bound on :attr:`DlqRecord.failed_at` (timezone-aware)."""
    payment_id: str | None = None
    """The record key (payment id for both DLQ topics)."""

    def matches(self, record: DlqRecord) -> bool:
        envelope = record.envelope
        if self.stage is not None and (envelope is None or envelope.stage != self.stage):
            return False
        if self.reason is not None and (envelope is None or envelope.reason != self.reason):
            return False
        if self.payment_id is not None and record.key != self.payment_id.encode():
            return False
        if self.since is not None or self.until is not None:
            at = record.failed_at
            if at is None:
                return False
            if self.since is not None and at < self.since:
                return False
            if self.until is not None and at >= self.until:
                return False
        return True


def _to_record(message: Message) -> DlqRecord:
    raw = message.headers() or []
    pairs = list(raw.items()) if isinstance(raw, dict) else raw
    headers = tuple(
        (name, value.encode() if isinstance(value, str) else value or b"")
        for name, value in pairs
    )
    envelope: DlqEnvelope | None = None
    error: str | None = None
    try:
        envelope = DlqEnvelope.from_headers(
            [(name, value) for name, value in headers if name.startswith(HEADER_PREFIX)]
        )
    except (ValidationError, UnicodeDecodeError) as exc:
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    kind, millis = message.timestamp()
    timestamp = (
        datetime.fromtimestamp(millis / 1000, UTC) if kind != 0 and millis >= 0 else None
    )
    topic = message.topic()
    partition = message.partition()
    offset = message.offset()
    if topic is None or partition is None or offset is None:
        raise DlqError("the consumer returned a record without topic, partition or offset")
    return DlqRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        key=message.key(),
        value=message.value(),
        headers=headers,
        envelope=envelope,
        envelope_error=error,
        timestamp=timestamp,
    )


def _reader(settings: Settings) -> Consumer:
    conf: dict[str, Any] = dict(client_config(settings.with_local_broker()))
    conf.update(
        {
            # Required by the client, but never joined (assign()) nor committed to.
            "group.id": f"{settings.app_id}-dlq-reader",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
    )
    return Consumer(conf)


def _partitions(consumer: Consumer, topic: str, timeout: float) -> list[int]:
    metadata = consumer.list_topics(topic, timeout=timeout)
    found = metadata.topics.get(topic)
    if found is None or found.error is not None:
        raise DlqError(f"topic {topic} not found: {found.error if found else 'no metadata'}")
    return sorted(found.partitions)


def read_dlq(
    settings: Settings,
    topics: str | Sequence[str] = DLQ_TOPICS,
    filters: DlqFilter | None = None,
    *,
    timeout: float = 60.0,
) -> list[DlqRecord]:
    """Every record of ``topics`` from the beginning to the end, those matching ``filters``.

    Sorted by (topic, partition, offset). Raises :class:`DlqError` when a topic is missing
    or the end is not reached within ``timeout`` seconds.
    """
    names = [topics] if isinstance(topics, str) else list(topics)
    consumer = _reader(settings)
    found: dict[Coordinate, DlqRecord] = {}
    try:
        targets: dict[tuple[str, int], int] = {}
        assignment: list[TopicPartition] = []
        for topic in names:
            for partition in _partitions(consumer, topic, timeout):
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=timeout, cached=False
                )
                if high <= low:
                    continue  # empty (or everything expired)
                targets[(topic, partition)] = high
                assignment.append(TopicPartition(topic, partition, low))
        if not assignment:
            return []
        consumer.assign(assignment)
        position = {tp: -1 for tp in targets}  # next offset to read, once known
        last_seen = {tp: time.monotonic() for tp in targets}
        pending = set(targets)
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                behind = ", ".join(f"{t}[{p}]" for t, p in sorted(pending))
                raise DlqError(f"did not reach the end of {behind} within {timeout:.0f}s")
            for message in consumer.consume(500, timeout=0.2):
                tp = (message.topic() or "", message.partition() or 0)
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        offset = message.offset() or 0
                        if offset >= targets.get(tp, 0):
                            pending.discard(tp)
                        continue
                    if error.retriable():
                        continue
                    raise DlqError(f"reading {tp[0]}[{tp[1]}]: {error}")
                record = _to_record(message)
                found[record.coordinate] = record
                position[tp] = max(position[tp], record.offset + 1)
                last_seen[tp] = time.monotonic()
            now = time.monotonic()
            for tp in list(pending):
                if position[tp] >= targets[tp] and now - last_seen[tp] >= QUIET_SECONDS:
                    pending.discard(tp)  # past the watermark and silent: Tansu's low HWM
    finally:
        consumer.close()
    chosen = filters or DlqFilter()
    return [found[c] for c in sorted(found) if chosen.matches(found[c])]


def read_record(
    settings: Settings, topic: str, offset: int, partition: int = 0, *, timeout: float = 30.0
) -> DlqRecord | None:
    """The record at ``topic[partition]@offset``, or ``None`` if there is none."""
    consumer = _reader(settings)
    try:
        if partition not in _partitions(consumer, topic, timeout):
            raise DlqError(f"{topic} has no partition {partition}")
        low, high = consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=timeout, cached=False
        )
        if offset < low or high <= low:
            return None
        consumer.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            messages = consumer.consume(100, timeout=0.2)
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        return None
                    if error.retriable():
                        continue
                    raise DlqError(f"reading {topic}[{partition}]: {error}")
                if message.offset() == offset:
                    return _to_record(message)
                if (message.offset() or 0) > offset:
                    return None  # compacted or never existed
            if messages:
                quiet_since = time.monotonic()
            elif offset >= high and time.monotonic() - quiet_since >= QUIET_SECONDS:
                return None
        raise DlqError(f"could not read {topic}[{partition}]@{offset} within {timeout:.0f}s")
    finally:
        consumer.close()


# ----------------------------------------------------------------------------- replay
Outcome = Literal[
    "would_replay",
    "replayed",
    "already_replayed",
    "repeat_skipped",
    "not_replayable",
    "failed",
]


@dataclass(slots=True)
class ReplayItem:
    """What happened (or would happen) to one DLQ record."""

    record: DlqRecord
    outcome: Outcome
    detail: str = ""
    replayed_partition: int | None = None
    replayed_offset: int | None = None


@dataclass(slots=True)
class ReplayReport:
    executed: bool
    replayed_by: str
    items: list[ReplayItem] = field(default_factory=list)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for item in self.items if item.outcome == outcome)

    @property
    def ok(self) -> bool:
        return self.count("failed") == 0

    def summary(self) -> str:
        order: tuple[Outcome, ...] = (
            "would_replay", "replayed", "already_replayed", "repeat_skipped",
            "not_replayable", "failed",
        )
        parts = [f"{self.count(o)} {o.replace('_', ' ')}" for o in order if self.count(o)]
        mode = "execute" if self.executed else "dry run"
        return f"{mode}: " + (", ".join(parts) if parts else "nothing to replay")


def default_replayed_by() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def replay_headers(
    record: DlqRecord, at: datetime, by: str
) -> list[tuple[str, str | bytes | None]]:
    """The only headers a replayed record carries (key and value stay byte-exact)."""
    return [
        ("replay.dlq_topic", record.topic.encode()),
        ("replay.dlq_partition", str(record.partition).encode()),
        ("replay.dlq_offset", str(record.offset).encode()),
        ("replay.at", at.isoformat().encode()),
        ("replay.by", by.encode()),
    ]


@dataclass(frozen=True, slots=True)
class ReplayedRow:
    coordinate: Coordinate
    record_sha256: str
    replayed_at: datetime
    replayed_by: str


async def replayed_coordinates(
    conn: asyncpg.Connection, records: Iterable[DlqRecord]
) -> dict[Coordinate, ReplayedRow]:
    """The rows of ``dlq_replays`` for ``records`` (by DLQ coordinate)."""
    wanted = list(records)
    if not wanted:
        return {}
    rows = await conn.fetch(
        """
        SELECT r.dlq_topic, r.dlq_partition, r.dlq_offset, r.record_sha256,
               r.replayed_at, r.replayed_by
        FROM dlq_replays r
        JOIN unnest($1::text[], $2::int[], $3::bigint[]) AS w(topic, part, off)
          ON r.dlq_topic = w.topic AND r.dlq_partition = w.part AND r.dlq_offset = w.off
        """,
        [r.topic for r in wanted],
        [r.partition for r in wanted],
        [r.offset for r in wanted],
    )
    return {
        (row["dlq_topic"], row["dlq_partition"], row["dlq_offset"]): ReplayedRow(
            coordinate=(row["dlq_topic"], row["dlq_partition"], row["dlq_offset"]),
            record_sha256=row["record_sha256"],
            replayed_at=row["replayed_at"],
            replayed_by=row["replayed_by"],
        )
        for row in rows
    }


async def _replayed_digests(
    conn: asyncpg.Connection, digests: Iterable[str]
) -> dict[str, Coordinate]:
    rows = await conn.fetch(
        "SELECT record_sha256, dlq_topic, dlq_partition, dlq_offset FROM dlq_replays "
        "WHERE record_sha256 = ANY($1::text[]) ORDER BY replayed_at",
        sorted(set(digests)),
    )
    return {
        row["record_sha256"]: (row["dlq_topic"], row["dlq_partition"], row["dlq_offset"])
        for row in rows
    }


def _original_partitions(settings: Settings, topics: set[str]) -> dict[str, int]:
    consumer = _reader(settings)
    try:
        return {topic: len(_partitions(consumer, topic, 30.0)) for topic in sorted(topics)}
    finally:
        consumer.close()


async def replay(
    settings: Settings,
    records: Sequence[DlqRecord],
    execute: bool,
    conn: asyncpg.Connection,
    *,
    replayed_by: str | None = None,
    allow_repeat: bool = False,
) -> ReplayReport:
    """Replay ``records`` (dry run unless ``execute``); return what happened to each.

    Skipped: records whose coordinate is in ``dlq_replays`` (``already_replayed``),
    records without a valid envelope (``not_replayable``) and, unless ``allow_repeat``,
    records whose key and value equal a record replayed before (``repeat_skipped``: the
    replayed record failed again and was dead-lettered anew; replaying it once more only
    makes sense after the cause was fixed). A dry run publishes and records nothing.
    ``conn`` must not be inside a transaction and needs the ``dlq_replays`` table
    (:func:`sinks.migrations.migrate`).
    """
    by = replayed_by or default_replayed_by()
    report = ReplayReport(executed=execute, replayed_by=by)
    locked = False
    if execute:
        await conn.execute("SELECT pg_advisory_lock($1)", REPLAY_LOCK_KEY)
        locked = True
    try:
        # Read what was replayed only now, under the lock: a concurrent run has finished.
        done = await replayed_coordinates(conn, records)
        digests = {r.coordinate: r.sha256() for r in records}
        earlier = await _replayed_digests(conn, digests.values())
        targets = {r.envelope.original_topic for r in records if r.envelope is not None}
        partitions = (
            await asyncio.to_thread(_original_partitions, settings, targets) if targets else {}
        )
        to_publish: list[ReplayItem] = []
        for record in records:
            row = done.get(record.coordinate)
            envelope = record.envelope
            if row is not None:
                detail = f"replayed {row.replayed_at.isoformat()} by {row.replayed_by}"
                if row.record_sha256 != digests[record.coordinate]:
                    detail += " (the coordinate now holds different bytes: topic re-created?)"
                report.items.append(ReplayItem(record, "already_replayed", detail))
            elif envelope is None:
                report.items.append(
                    ReplayItem(record, "not_replayable", f"no valid envelope: "
                               f"{record.envelope_error}")
                )
            elif envelope.original_partition >= partitions.get(envelope.original_topic, 0):
                report.items.append(
                    ReplayItem(
                        record,
                        "not_replayable",
                        f"{envelope.original_topic} has no partition "
                        f"{envelope.original_partition}",
                    )
                )
            elif not allow_repeat and digests[record.coordinate] in earlier:
                t, p, o = earlier[digests[record.coordinate]]
                report.items.append(
                    ReplayItem(
                        record,
                        "repeat_skipped",
                        f"same key and bytes already replayed from {t}[{p}]@{o}; "
                        "it failed again (use --allow-repeat once the cause is fixed)",
                    )
                )
            else:
                item = ReplayItem(
                    record,
                    "would_replay",
                    f"-> {envelope.original_topic}[{envelope.original_partition}]",
                )
                report.items.append(item)
                to_publish.append(item)
        if execute and to_publish:
            producer = Producer(producer_config(settings.with_local_broker()))
            for start in range(0, len(to_publish), PUBLISH_CHUNK):
                chunk = to_publish[start : start + PUBLISH_CHUNK]
                await asyncio.to_thread(_publish, producer, chunk, by)
                await _record(conn, [i for i in chunk if i.outcome == "replayed"], by)
    finally:
        if locked:
            await conn.execute("SELECT pg_advisory_unlock($1)", REPLAY_LOCK_KEY)
    return report


def _publish(producer: Producer, items: list[ReplayItem], by: str) -> None:
    """Produce ``items`` and wait for the broker; set each item's outcome from its ack."""
    at = datetime.now(UTC)

    def acked(item: ReplayItem) -> Any:
        def on_delivery(err: KafkaError | None, message: Message) -> None:
            if err is not None:
                item.outcome = "failed"
                item.detail = f"not acknowledged: {err}"
            else:
                item.outcome = "replayed"
                item.replayed_partition = message.partition()
                item.replayed_offset = message.offset()
                item.detail = f"-> {message.topic()}[{message.partition()}]@{message.offset()}"

        return on_delivery

    for item in items:
        envelope = item.record.envelope
        if envelope is None:  # filtered out by replay(); kept for the type checker
            continue
        item.outcome = "failed"
        item.detail = "no acknowledgement from the broker"
        while True:
            try:
                producer.produce(
                    envelope.original_topic,
                    key=item.record.key,
                    value=item.record.value,
                    partition=envelope.original_partition,
                    headers=replay_headers(item.record, at, by),
                    on_delivery=acked(item),
                )
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(60.0)


async def _record(conn: asyncpg.Connection, items: list[ReplayItem], by: str) -> None:
    if not items:
        return
    rows = []
    for item in items:
        record = item.record
        envelope = record.envelope
        if envelope is None:
            continue
        rows.append(
            (
                record.topic, record.partition, record.offset, record.sha256(), record.key,
                envelope.stage, envelope.reason, envelope.original_topic,
                envelope.original_partition, envelope.original_offset,
                item.replayed_partition, item.replayed_offset, by,
            )
        )
    async with conn.transaction():
        await conn.executemany(
            """
            INSERT INTO dlq_replays (
                dlq_topic, dlq_partition, dlq_offset, record_sha256, record_key, stage, reason,
                original_topic, original_partition, original_offset, replayed_partition,
                replayed_offset, replayed_by
            ) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
            ON CONFLICT (dlq_topic, dlq_partition, dlq_offset) DO NOTHING
            """,
            rows,
        )
