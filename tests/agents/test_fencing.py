"""Rebalance zombies are fenced: a worker that lost a partition does not write its state
(issue 11, finding 10). Real PostgreSQL; the pipeline wiring is exercised by every stack
test (each worker takes epochs on assignment and checks them before each state write)."""

from __future__ import annotations

import asyncpg

from agents.fencing import PartitionFence
from sinks.migrations import migrate
from tests.agents.test_pipeline import unique


async def test_a_worker_that_lost_a_partition_is_fenced(pg_dsn: str) -> None:
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        await migrate(pool)
        app_id = unique("app")
        old = PartitionFence(pool, app_id, owner="worker-a")
        new = PartitionFence(pool, app_id, owner="worker-b")
        assert await old.take([0, 1, 2]) == {0: 1, 1: 1, 2: 1}
        assert await old.lost([0, 1, 2]) == set()
        # A rebalance moves partition 1 to the new worker; the old one has not noticed yet
        # (its batch is still in flight, or it was paused): the database tells it.
        assert await new.take([1]) == {1: 2}
        assert await old.lost([0, 1, 2]) == {1}
        assert await new.lost([1]) == set()
        # Revoked locally: fenced without asking.
        old.revoke([0])
        assert await old.lost([0, 2]) == {0}
        # Partition 1 comes back to the old worker: a new epoch, held again.
        assert await old.take([1]) == {1: 3}
        assert await old.lost([1]) == set()
        assert await new.lost([1]) == {1}
    finally:
        await pool.close()
