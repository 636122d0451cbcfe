"""Replay storm: N commands, each published three times, shuffled, from three producers.

Exactly N charges at the PSP sandboxes, N ledger captures, and every copy answered: the
first with the outcome, the two others with the same event marked ``replayed``.
"""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from datetime import UTC, datetime

import asyncpg
import pytest

from config.settings import Settings
from paystream.client import PaymentsClient
from tests.agents.kafka_reader import TopicReader
from tests.agents.test_pipeline import sandbox_charges, unique
from tests.conftest import async_wait_for
from topics.catalog import EVENTS

pytestmark = pytest.mark.stack

N = 1_000
COPIES = 3


async def test_replay_storm_charges_each_payment_once(live: Settings) -> None:
    merchant = unique("m_storm")
    commands: list[tuple[bytes, bytes]] = []
    for n in range(N):
        payment = f"{merchant}_p{n}"
        value = json.dumps({
            "type": "authorize_payment", "schema_version": 1,
            "command_id": f"cmd_{payment}", "merchant_id": merchant,
            "idempotency_key": f"{payment}-a", "payment_id": payment,
            "created_at": datetime.now(UTC).isoformat(),
            "amount": 500 + n, "currency": "USD", "payment_method": "tok_visa",
        }).encode()
        commands.append((payment.encode(), value))
    copies = [c for c in commands for _ in range(COPIES)]
    random.Random(7).shuffle(copies)  # out of order (each payment's copies are identical)
    shares = [copies[i::3] for i in range(3)]

    def produce(share: list[tuple[bytes, bytes]]) -> None:
        with PaymentsClient(live.kafka_bootstrap_servers) as client:
            for key, value in share:
                client.send_raw(key, value)
            client.flush()

    threads = [threading.Thread(target=produce, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    reader = TopicReader(live.kafka_bootstrap_servers, EVENTS)
    try:
        def answered(_records: object) -> list[dict[str, object]]:
            mine = [v for v in reader.values() if v.get("merchant_id") == merchant]
            return mine if len(mine) >= N * COPIES else []

        answers = reader.until(answered, timeout=180)
    finally:
        reader.close()

    assert len(answers) == N * COPIES
    by_payment: dict[str, list[dict[str, object]]] = {}
    for answer in answers:
        by_payment.setdefault(str(answer["payment_id"]), []).append(answer)
    assert len(by_payment) == N
    for payment, replies in by_payment.items():
        originals = [r for r in replies if not r["replayed"]]
        assert len(originals) == 1, payment
        assert originals[0]["type"] == "payment.captured"
        # Every replay is the original outcome: same event id, type and amounts.
        for reply in replies:
            assert (reply["event_id"], reply["type"], reply["amount_captured"]) == (
                originals[0]["event_id"], "payment.captured", originals[0]["amount"]
            )

    charges = [c for c in sandbox_charges(live) if c.get("merchant_id") == merchant]
    assert len(charges) == N
    assert Counter(c["payment_id"] for c in charges).most_common(1)[0][1] == 1

    conn = await asyncpg.connect(live.pg_dsn)
    try:
        async def all_posted() -> int:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM ledger_transactions WHERE merchant_id = $1 "
                "AND kind = 'capture'", merchant,
            )
            return count if count >= N else 0

        assert await async_wait_for(all_posted, within=60) == N
    finally:
        await conn.close()
