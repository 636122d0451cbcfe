"""`paystream dlq list / show / replay` against the real running pipeline.

Broker, PostgreSQL, worker and PSP sandboxes are the session stack of tests/conftest.py.
Every test uses its own payment ids, so the shared DLQ topics hold other tests' records
too; commands here always filter by ``--payment-id``.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from typer.testing import CliRunner

from config.settings import Settings, get_settings
from ops.dlq import DlqFilter, read_dlq, replay
from ops.dlq_cli import dlq_app
from paystream.client import PaymentsClient
from schemas.dlq import DlqEnvelope
from sinks.migrations import migrate
from tests.agents.kafka_reader import TopicReader
from tests.conftest import wait_for
from topics.catalog import COMMANDS, COMMANDS_DLQ, EVENTS, EVENTS_DLQ
from topics.partitioning import java_partition

pytestmark = pytest.mark.stack


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture()
def cli(live: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    """A CliRunner whose settings point at the live stack."""
    monkeypatch.setenv("PAYSTREAM_KAFKA_BOOTSTRAP_SERVERS", live.kafka_bootstrap_servers)
    monkeypatch.setenv("PAYSTREAM_PG_DSN", live.pg_dsn)
    monkeypatch.setenv("PAYSTREAM_APP_ID", live.app_id)
    monkeypatch.setenv("COLUMNS", "240")  # rich tables: room for whole ids
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def run(runner: CliRunner, *args: str, code: int = 0) -> str:
    result = runner.invoke(dlq_app, list(args))
    assert result.exit_code == code, f"{args}: exit {result.exit_code}\n{result.output}"
    return result.output


def list_json(runner: CliRunner, *args: str) -> list[dict[str, Any]]:
    out = run(runner, "list", "--output", "json", *args)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def query(live: Settings, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(live.pg_dsn)
        try:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
            return rows
        finally:
            await conn.close()

    return asyncio.run(go())


def status_of(live: Settings, payment_id: str) -> str | None:
    rows = query(live, "SELECT status FROM payment_status WHERE payment_id = $1", payment_id)
    return rows[0]["status"] if rows else None


def ledger_transactions(live: Settings, payment_id: str) -> int:
    rows = query(
        live, "SELECT count(*) AS n FROM ledger_transactions WHERE payment_id = $1", payment_id
    )
    return int(rows[0]["n"])


def sandbox_charges(live: Settings, payment_id: str) -> list[dict[str, Any]]:
    charges: list[dict[str, Any]] = []
    for psp in live.psp_endpoints():
        with urllib.request.urlopen(f"{psp.url}/sandbox/charges", timeout=5) as r:  # noqa: S310
            body = json.loads(r.read())
        charges.extend(body["charges"] if isinstance(body, dict) else body)
    return [c for c in charges if c.get("payment_id") == payment_id]


def on_topic(live: Settings, topic: str, payment_id: str) -> list[Any]:
    """Every record of ``topic`` keyed ``payment_id``, read to the end (deterministic)."""
    return read_dlq(live, topic, DlqFilter(payment_id=payment_id))


def authorize_bytes(payment_id: str, merchant_id: str, amount: int) -> bytes:
    return json.dumps(
        {
            "type": "authorize_payment",
            "schema_version": 1,
            "command_id": unique("cmd"),
            "merchant_id": merchant_id,
            "idempotency_key": f"{payment_id}-auth",
            "payment_id": payment_id,
            "created_at": datetime.now(UTC).isoformat(),
            "amount": amount,
            "currency": "USD",
            "payment_method": "tok_visa",
            "capture_method": "automatic",
        }
    ).encode()


def produce_acked(
    bootstrap: str, topic: str, key: bytes | None, value: bytes,
    headers: list[tuple[str, str | bytes | None]] | None = None,
) -> tuple[int, int]:
    """Produce one record, wait for the ack, return (partition, offset)."""
    delivered: list[tuple[int, int]] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        assert err is None, err
        delivered.append((msg.partition() or 0, msg.offset() or 0))

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    producer.produce(topic, key=key, value=value, headers=headers, on_delivery=on_delivery)
    assert producer.flush(10) == 0
    return delivered[0]


def dead_letter_valid_command(live: Settings, payment_id: str, merchant_id: str) -> bytes:
    """Put a VALID command into payments.commands.dlq as if the worker had failed on it.

    A transient failure (here: a PSP connection reset in the executor) cannot be forced
    on the running worker from a test, so the test plays the worker's part: the command's
    bytes and key go to the DLQ with the headers the worker writes (DlqEnvelope), pointing
    at the payment's home partition on payments.commands (murmur2 of the key, where the
    worker processes it; a command elsewhere would have been forwarded there first) and at
    that partition's current end offset. The replay then has
    to bring the payment through the real pipeline exactly once.
    """
    key = payment_id.encode()
    partition = java_partition(key, live.partitions)
    consumer = Consumer({"bootstrap.servers": live.kafka_bootstrap_servers, "group.id": "t"})
    try:
        _low, high = consumer.get_watermark_offsets(TopicPartition(COMMANDS, partition), 10)
    finally:
        consumer.close()
    failed_at = datetime.now(UTC)
    envelope = DlqEnvelope(
        stage="executor",
        reason="unexpected_error",
        error_type="ConnectionResetError",
        error_message="[Errno 104] Connection reset by peer (PSP alpha)",
        original_topic=COMMANDS,
        original_partition=partition,
        original_offset=high,
        original_timestamp=failed_at,
        consumer_group=live.app_id,
        first_failure_at=failed_at,
        last_failure_at=failed_at,
    )
    value = authorize_bytes(payment_id, merchant_id, 2_500)
    headers: list[tuple[str, str | bytes | None]] = list(envelope.to_headers())
    produce_acked(live.kafka_bootstrap_servers, COMMANDS_DLQ, key, value, headers)
    return value


# ----------------------------------------------------------------------------- list / show
def test_poison_command_is_listed_with_reason_origin_and_filters(
    live: Settings, cli: CliRunner
) -> None:
    payment = unique("pay")
    poison = b'{"type": "authorize_payment", "schema_version": 1, "payment_id": "'
    with PaymentsClient(live.kafka_bootstrap_servers) as client:
        client.send_raw(payment.encode(), poison)
    [original] = wait_for(lambda: on_topic(live, COMMANDS, payment))

    [row] = wait_for(lambda: list_json(cli, "--payment-id", payment), timeout=60)
    envelope = row["envelope"]
    assert row["dlq_topic"] == COMMANDS_DLQ and row["key"] == payment
    assert envelope["reason"] == "invalid_json" and envelope["stage"] == "intake"
    assert envelope["original_topic"] == COMMANDS
    assert (envelope["original_partition"], envelope["original_offset"]) == (
        original.partition, original.offset
    )
    assert row["replayed"] is False

    # Filters: each one alone excludes it; the matching ones keep it.
    only = ["--payment-id", payment]
    assert len(list_json(cli, *only, "--reason", "invalid_json", "--stage", "intake")) == 1
    assert len(list_json(cli, *only, "--topic", COMMANDS_DLQ)) == 1
    assert list_json(cli, *only, "--reason", "schema_violation") == []
    assert list_json(cli, *only, "--stage", "executor") == []
    assert list_json(cli, *only, "--topic", EVENTS_DLQ) == []
    at = datetime.fromisoformat(row["dead_lettered_at"].replace("Z", "+00:00"))
    before, after = (at - timedelta(seconds=5)).isoformat(), (at + timedelta(seconds=5)).isoformat()
    assert len(list_json(cli, *only, "--since", before, "--until", after)) == 1
    assert list_json(cli, *only, "--since", after) == []
    assert list_json(cli, *only, "--until", before) == []
    naive_before = (at - timedelta(seconds=5)).replace(tzinfo=None).isoformat()
    assert len(list_json(cli, *only, "--since", naive_before)) == 1  # naive = UTC
    run(cli, "list", "--since", "yesterday", code=2)
    run(cli, "list", "--topic", "payments.commands", code=2)

    table = run(cli, "list", *only)
    assert "invalid_json" in table and f"@{row['dlq_offset']}" in table and "no" in table

    shown = run(cli, "show", "--topic", COMMANDS_DLQ, "--offset", str(row["dlq_offset"]))
    assert "dlq.reason" in shown and "invalid_json" in shown
    assert "dlq.original_offset" in shown and payment in shown
    assert '"schema_version": 1, "payment_id": "' in shown  # not JSON: printed as text
    assert "replayed: no" in shown
    run(cli, "show", "--topic", COMMANDS_DLQ, "--offset", "999999999", code=1)


# ----------------------------------------------------------------------------- replay
def test_replay_dry_run_then_execute_processes_once_and_second_run_skips(
    live: Settings, cli: CliRunner
) -> None:
    payment, merchant = unique("pay"), unique("m")
    value = dead_letter_valid_command(live, payment, merchant)
    [row] = wait_for(lambda: list_json(cli, "--payment-id", payment))
    envelope = row["envelope"]
    coordinate = (COMMANDS_DLQ, row["dlq_partition"], row["dlq_offset"])

    # Dry run (the default): says what it would do, publishes and records nothing.
    dry = run(cli, "replay", "--payment-id", payment, "--reason", "unexpected_error")
    assert "dry run" in dry and "1 would replay" in dry
    assert f"{COMMANDS}[{envelope['original_partition']}]" in dry
    assert query(live, "SELECT 1 FROM dlq_replays WHERE dlq_topic = $1 AND dlq_partition = $2 "
                 "AND dlq_offset = $3", *coordinate) == []
    assert on_topic(live, COMMANDS, payment) == []
    assert status_of(live, payment) is None

    done = run(cli, "replay", "--payment-id", payment, "--execute", "--by", "test-operator")
    assert "execute: 1 replayed" in done

    # The original key and bytes, to the original partition, with replay.* headers only.
    [replayed] = on_topic(live, COMMANDS, payment)
    assert replayed.key == payment.encode() and replayed.value == value
    assert replayed.partition == envelope["original_partition"]
    headers = dict(replayed.headers)
    assert set(headers) == {
        "replay.dlq_topic", "replay.dlq_partition", "replay.dlq_offset", "replay.at",
        "replay.by",
    }
    assert headers["replay.dlq_topic"] == COMMANDS_DLQ.encode()
    assert headers["replay.dlq_offset"] == str(row["dlq_offset"]).encode()
    assert headers["replay.by"] == b"test-operator"

    # Processed exactly once: captured, one ledger transaction, one PSP charge.
    assert wait_for(lambda: status_of(live, payment) == "captured", timeout=60)
    wait_for(lambda: ledger_transactions(live, payment) >= 1)
    assert ledger_transactions(live, payment) == 1
    assert len(sandbox_charges(live, payment)) == 1

    [tracked] = query(live, "SELECT * FROM dlq_replays WHERE dlq_topic = $1 AND "
                      "dlq_partition = $2 AND dlq_offset = $3", *coordinate)
    assert tracked["replayed_offset"] == replayed.offset
    assert tracked["replayed_by"] == "test-operator" and tracked["reason"] == "unexpected_error"
    assert [r["replayed"] for r in list_json(cli, "--payment-id", payment)] == [True]

    # A second run replays nothing and says why.
    again = run(cli, "replay", "--payment-id", payment, "--execute")
    assert "execute: 1 already replayed" in again and "by test-operator" in again
    assert len(on_topic(live, COMMANDS, payment)) == 1
    assert "replayed: yes" in run(
        cli, "show", "--topic", COMMANDS_DLQ, "--offset", str(row["dlq_offset"])
    )


def test_replay_after_lost_tracking_is_answered_as_a_replay_not_charged_twice(
    live: Settings, cli: CliRunner
) -> None:
    """The documented crash window: published, but the dlq_replays row was never written.

    Simulated by deleting the row; the next run publishes the command a second time and
    the pipeline's idempotency (per payment, by idempotency key) answers it as a replay.
    """
    payment, merchant = unique("pay"), unique("m")
    dead_letter_valid_command(live, payment, merchant)
    wait_for(lambda: list_json(cli, "--payment-id", payment))
    run(cli, "replay", "--payment-id", payment, "--execute")
    assert wait_for(lambda: status_of(live, payment) == "captured", timeout=60)

    query(live, "DELETE FROM dlq_replays WHERE record_key = $1", payment.encode())
    assert "execute: 1 replayed" in run(cli, "replay", "--payment-id", payment, "--execute")
    assert len(on_topic(live, COMMANDS, payment)) == 2

    events = TopicReader(live.kafka_bootstrap_servers, EVENTS)
    try:
        mine = events.until(
            lambda _r: [v for v in events.values() if v["payment_id"] == payment][:2]
            if len([v for v in events.values() if v["payment_id"] == payment]) >= 2 else None
        )
    finally:
        events.close()
    assert [e["replayed"] for e in mine] == [False, True]
    assert mine[0]["event_id"] == mine[1]["event_id"]
    assert len(sandbox_charges(live, payment)) == 1
    assert ledger_transactions(live, payment) == 1
    assert status_of(live, payment) == "captured"


def test_poison_that_fails_again_is_not_replayed_in_a_loop(
    live: Settings, cli: CliRunner
) -> None:
    payment = unique("pay")
    with PaymentsClient(live.kafka_bootstrap_servers) as client:
        client.send_raw(payment.encode(), b"{truncated")
    wait_for(lambda: list_json(cli, "--payment-id", payment), timeout=60)
    assert "execute: 1 replayed" in run(cli, "replay", "--payment-id", payment, "--execute")

    # The worker dead-letters the replayed bytes again: a second DLQ record, same bytes.
    def two_records() -> list[dict[str, Any]] | None:
        rows = list_json(cli, "--payment-id", payment)
        return rows if len(rows) >= 2 else None

    first, second = wait_for(two_records, timeout=60)
    [replayed] = on_topic(live, COMMANDS, payment)[1:]
    assert second["envelope"]["original_offset"] == replayed.offset
    assert (first["replayed"], second["replayed"]) == (True, False)

    out = run(cli, "replay", "--payment-id", payment, "--execute")
    assert "1 already replayed" in out and "1 repeat skipped" in out
    assert len(on_topic(live, COMMANDS, payment)) == 2
    assert "1 would replay" in run(cli, "replay", "--payment-id", payment, "--allow-repeat")


# ----------------------------------------------------------------------------- reading
def test_read_dlq_reads_whole_multi_record_batches_and_flags_bad_envelopes(
    live: Settings,
) -> None:
    """Tansu's high watermark stops at the last batch's base offset + 1: read past it."""
    topic = unique("scratch.dlq")
    admin = AdminClient({"bootstrap.servers": live.kafka_bootstrap_servers})
    for future in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        future.result(10)
    now = datetime.now(UTC)
    envelope = DlqEnvelope(
        stage="sink", reason="schema_violation", error_type="ValidationError",
        error_message="bad", original_topic=EVENTS, original_partition=0, original_offset=7,
        consumer_group="g", first_failure_at=now, last_failure_at=now,
    )
    headers: list[tuple[str, str | bytes | None]] = list(envelope.to_headers())
    producer = Producer({"bootstrap.servers": live.kafka_bootstrap_servers, "linger.ms": 100})
    for batch in range(3):
        for i in range(50):
            producer.produce(topic, key=f"k{batch}-{i}".encode(), value=b"{}", headers=headers)
        assert producer.flush(10) == 0
    producer.produce(topic, key=b"no-envelope", value=b"{}")  # not written by the worker
    assert producer.flush(10) == 0

    records = read_dlq(live, topic)
    assert [r.offset for r in records] == list(range(151))
    assert records[0].envelope == envelope and records[-1].envelope is None
    assert records[-1].envelope_error is not None
    assert len(read_dlq(live, [topic], DlqFilter(reason="schema_violation"))) == 150
    assert read_dlq(live, topic, DlqFilter(stage="intake")) == []

    async def dry_run() -> list[str]:
        conn = await asyncpg.connect(live.pg_dsn)
        try:
            await migrate(conn)
            report = await replay(live, records[-2:], False, conn)
        finally:
            await conn.close()
        return [item.outcome for item in report.items]

    assert asyncio.run(dry_run()) == ["would_replay", "not_replayable"]
