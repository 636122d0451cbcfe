"""Two workers, checkouts with different partitioners: every payment reaches its one writer.

A Java (or kafkajs, aiokafka, Faust) checkout places a payment_id with murmur2; a
librdkafka checkout with its default partitioner (consistent_random, CRC32) places it
elsewhere. paystream's own records about the payment (PSP lookups' answers on
payments.internal, retries, webhooks) must reach the worker that holds the payment's state
whichever partitioner the checkout used; with the PSP losing responses, unknown outcomes
are resolved through payments.internal, so a misplaced answer would leave the payment
pending (and dead-letter the answer as unknown_payment).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from agents.forwarding import FORWARDED_FROM_HEADER
from config.settings import Settings
from ops.stack import EmbeddedStack, free_port, http_ok
from paystream.client import PaymentsClient
from tests.agents.kafka_reader import TopicReader
from tests.agents.test_psp_faults import ground_truth, post_json
from tests.conftest import async_wait_for, wait_for
from topics.catalog import (
    COMMANDS,
    COMMANDS_DLQ,
    EVENTS_DLQ,
    INTERNAL,
    PAYMENT_STATE_TABLE,
    changelog_topic,
)
from topics.partitioning import java_partition

pytestmark = pytest.mark.stack

PARTITIONERS = ("consistent_random", "murmur2_random")


@pytest.fixture()
def second_worker(stack: EmbeddedStack, live: Settings, tmp_path: Path) -> Iterator[int]:
    """A second worker in the same consumer group; yields its web port."""
    port = free_port()
    env = {
        **os.environ,
        **stack.child_env(),
        "PAYSTREAM_WEB_PORT": str(port),
        "PAYSTREAM_DATA_DIR": str(tmp_path / "worker2"),
    }
    log_file = (tmp_path / "worker2.log").open("ab")
    proc = subprocess.Popen(  # noqa: S603 - our own worker
        [sys.executable, "-m", "ops.cli", "worker"],
        env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    first = f"http://{live.web_host}:{live.web_port}/readyz"
    second = f"http://{live.web_host}:{port}/readyz"
    try:
        def both_ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"second worker exited with {proc.returncode}; see {log_file.name}")
            return http_ok(second) and http_ok(first)

        wait_for(both_ready, timeout=90, interval=0.25)
        yield port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log_file.close()
        # The first worker takes all partitions back before the next test runs.
        wait_for(lambda: http_ok(first), timeout=90, interval=0.25)


@pytest.fixture()
def lossy_alpha(live: Settings) -> Iterator[None]:
    faults = f"{live.psp_alpha_url}/sandbox/faults"
    post_json(faults, {"timeout_rate": 0.2, "lost_response_rate": 0.3})
    try:
        yield
    finally:
        post_json(faults, {"timeout_rate": 0.0, "lost_response_rate": 0.0})


def _unknown_payment_dead_letters(readers: list[TopicReader], payments: set[str]) -> list[str]:
    found: list[str] = []
    for reader in readers:
        reader.poll()
        for record in reader.records:
            headers = dict(record.headers() or [])
            key = (record.key() or b"").decode(errors="replace")
            if headers.get("dlq.reason") == b"unknown_payment" and key in payments:
                found.append(f"{reader.topic}: {key}")
    return found


async def test_payments_settle_whichever_partitioner_the_checkout_used(
    live: Settings, second_worker: int, lossy_alpha: None
) -> None:
    run = uuid.uuid4().hex[:8]
    payments: dict[str, int] = {}
    for partitioner in PARTITIONERS:
        with PaymentsClient(live.kafka_bootstrap_servers, partitioner=partitioner) as client:
            for n in range(60):
                payment = f"pay_2w_{run}_{partitioner[:6]}_{n:03d}"
                amount = 1_000 + n  # below USD 25.00: alpha (the lossy PSP) takes it
                payments[payment] = amount
                client.authorize(
                    merchant_id=f"m_2w_{n % 3}", payment_id=payment,
                    idempotency_key=f"{payment}-a", amount=amount, currency="USD",
                    payment_method="tok_visa",
                )

    dlq_readers = [TopicReader(live.kafka_bootstrap_servers, t) for t in (EVENTS_DLQ, COMMANDS_DLQ)]
    conn = await asyncpg.connect(live.pg_dsn)
    try:
        async def settled() -> dict[str, str] | None:
            stranded = _unknown_payment_dead_letters(dlq_readers, set(payments))
            assert not stranded, f"answers dead-lettered as unknown_payment: {stranded[:5]}"
            rows = await conn.fetch(
                "SELECT payment_id, status FROM payment_status WHERE payment_id LIKE $1",
                f"pay_2w_{run}_%",
            )
            found = {row["payment_id"]: row["status"] for row in rows}
            seen[:] = [Counter(found.values()), len(payments) - len(found)]
            done = len(found) == len(payments) and all(
                status == "captured" for status in found.values()
            )
            return found if done else None

        seen: list[Any] = []
        try:
            final = await async_wait_for(settled, within=120)
        except pytest.fail.Exception:
            pytest.fail(f"not all payments captured: statuses {seen[0]}, {seen[1]} unseen")
        went_pending = await conn.fetchval(
            "SELECT count(DISTINCT payment_id) FROM payment_events "
            "WHERE payment_id LIKE $1 AND type = 'payment.pending_verification'",
            f"pay_2w_{run}_%",
        )

        async def ledger_captured() -> dict[str, int] | None:
            rows = await conn.fetch(
                "SELECT t.payment_id, sum(e.amount) AS captured FROM ledger_entries e "
                "JOIN ledger_transactions t ON t.id = e.transaction_id "
                "JOIN ledger_accounts a ON a.id = e.account_id "
                "WHERE t.payment_id LIKE $1 AND t.kind IN ('capture', 'hold_capture') "
                "AND starts_with(a.code, 'platform:psp_clearing:') GROUP BY t.payment_id",
                f"pay_2w_{run}_%",
            )
            captured = {row["payment_id"]: int(row["captured"]) for row in rows}
            return captured if len(captured) == len(payments) else None

        ledger = await async_wait_for(ledger_captured, within=60)
    finally:
        await conn.close()
        for reader in dlq_readers:
            reader.close()

    assert went_pending > 0  # the lost responses did happen
    assert Counter(final.values()) == {"captured": len(payments)}
    psp_captured: dict[str, int] = defaultdict(int)
    charges: Counter[str] = Counter()
    for charge in ground_truth(live):
        payment = charge.get("payment_id")
        if payment in payments and charge["status"] in {"succeeded", "requires_capture"}:
            charges[payment] += 1
            psp_captured[payment] += int(charge["amount_captured"])
    assert max(charges.values()) == 1, "a payment was charged twice"
    mismatched: dict[str, Any] = {
        p: (psp_captured.get(p), ledger.get(p), amount)
        for p, amount in payments.items()
        if not (psp_captured.get(p) == ledger.get(p) == amount)
    }
    assert not mismatched, f"PSP captured != ledger captured: {list(mismatched.items())[:5]}"

    # One writer per payment: its state and the PSP's answers about it live on one
    # partition, the one Java's partitioner gives its payment_id, whoever published it.
    placed = partitions_by_key(live, set(payments))
    home = {p: java_partition(p.encode(), live.partitions) for p in payments}
    split = {p: where for p, where in placed.items() if len(where) > 1}
    assert not split, f"a payment written on two partitions: {list(split.items())[:5]}"
    away = {p: where for p, where in placed.items() if where != {home[p]}}
    assert not away, f"records of a payment off its home partition: {list(away.items())[:5]}"
    # The commands librdkafka's default partitioner misplaced were forwarded home.
    commands = TopicReader(live.kafka_bootstrap_servers, COMMANDS)
    try:
        forwarded = commands.until(lambda records: [
            r for r in records
            if (r.key() or b"").decode() in payments
            and FORWARDED_FROM_HEADER in dict(r.headers() or [])
        ])
    finally:
        commands.close()
    assert all(r.partition() == home[r.key().decode()] for r in forwarded)
    assert {r.key().decode().split("_")[3] for r in forwarded} == {"consis"}


def partitions_by_key(live: Settings, payments: set[str]) -> dict[str, set[int]]:
    """Partitions of the state changelog and payments.internal holding each payment."""
    changelog = changelog_topic(live.app_id, PAYMENT_STATE_TABLE)
    placed: dict[str, set[int]] = defaultdict(set)
    for topic in (changelog, INTERNAL):
        reader = TopicReader(live.kafka_bootstrap_servers, topic)
        try:
            def mine(records: list[Any], topic: str = topic) -> bool:
                keys = {(r.key() or b"").decode(errors="replace") for r in records}
                return topic == INTERNAL or payments <= keys

            reader.until(mine)
            reader.poll()
            for record in reader.records:
                key = (record.key() or b"").decode(errors="replace")
                if key in payments:
                    placed[key].add(record.partition())
        finally:
            reader.close()
    return placed
