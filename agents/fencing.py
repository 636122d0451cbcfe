"""Detecting rebalance zombies on the command processor's partitions.

Faust runs agents with ``stream_wait_empty=False``: a worker that loses partitions in a
rebalance keeps running its in-flight batch while the new owner re-processes the same
records. Its outputs are idempotent (events by id, the ledger by event id, PSP calls by
attempt id), but a late *state* write can land in the changelog after the new owner's.

Every worker takes an owner epoch in PostgreSQL for each ``payments.commands`` partition
it is assigned (``partition_owners``: one row per partition, bumped atomically), and
before writing a batch's state to the changelog asks which of the batch's partitions
another worker has taken since (one query per batch). Those writes are counted
(``paystream_zombie_state_writes_total``) and logged, **not dropped**: dropping them was
tried and is unsafe with Faust, which still acknowledges the batch's input records (and
may commit them when the partition comes back to the same worker), so the state would
be lost while its events were published. Preventing the write needs the batch's state,
outputs and input offsets in one Kafka transaction per input partition (a transactional
producer per partition, ``read_committed`` consumers): the open part of issue 11,
finding 10.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import asyncpg
import faust

from agents.runtime import with_infra_retries
from observability import metrics
from topics import catalog as cat

if TYPE_CHECKING:
    from agents.resources import Resources

log = logging.getLogger("paystream.agents.fencing")

_TAKE = """
INSERT INTO partition_owners AS o (app_id, partition, epoch, owner)
SELECT $1, p, 1, $3 FROM unnest($2::int[]) AS p
ON CONFLICT (app_id, partition) DO UPDATE
   SET epoch = o.epoch + 1, owner = EXCLUDED.owner, assigned_at = now()
RETURNING partition, epoch
"""

_HELD = """
SELECT partition, epoch, owner FROM partition_owners
 WHERE app_id = $1 AND partition = ANY($2::int[])
"""


class PartitionFence:
    """The epochs this worker holds for its partitions."""

    def __init__(self, pool: asyncpg.Pool, app_id: str, owner: str | None = None) -> None:
        self._pool = pool
        self._app_id = app_id
        self.owner = owner or f"worker-{uuid.uuid4().hex[:12]}"
        self._epochs: dict[int, int] = {}
        self.generation = 0
        """Bumped on every revocation: a batch that saw another generation re-checks."""

    async def take(self, partitions: Iterable[int]) -> dict[int, int]:
        """Take the next epoch of each partition (on assignment)."""
        wanted = sorted(set(partitions))
        if not wanted:
            return {}
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_TAKE, self._app_id, wanted, self.owner)
        taken = {int(r["partition"]): int(r["epoch"]) for r in rows}
        self._epochs.update(taken)
        log.info("fence: took epochs %s", taken)
        return taken

    def revoke(self, partitions: Iterable[int]) -> None:
        """Forget the epochs of revoked partitions: their state is no longer ours."""
        for partition in partitions:
            self._epochs.pop(partition, None)
        self.generation += 1

    async def lost(self, partitions: Iterable[int]) -> set[int]:
        """Which of ``partitions`` this worker no longer holds (another owner took them)."""
        wanted = sorted(set(partitions))
        if not wanted:
            return set()
        lost = {p for p in wanted if p not in self._epochs}
        asked = [p for p in wanted if p in self._epochs]
        if asked:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(_HELD, self._app_id, asked)
            held = {int(r["partition"]): (int(r["epoch"]), str(r["owner"])) for r in rows}
            for partition in asked:
                if held.get(partition) != (self._epochs[partition], self.owner):
                    lost.add(partition)
        if lost:
            log.warning("fence: partitions %s were taken by another worker while this "
                        "batch ran (a rebalance zombie)", sorted(lost))
        return lost


class FenceSignals:
    """This worker's :class:`PartitionFence`, kept current by Faust's rebalance signals."""

    def __init__(self, resources: Resources, app_id: str) -> None:
        self._resources = resources
        self._app_id = app_id
        self._fences: list[PartitionFence] = []
        self._handlers: tuple[Any, ...] = ()

    def register(self, app: faust.App) -> None:
        """Connect the signal handlers (kept here too: strong references)."""

        @app.on_partitions_assigned.connect  # type: ignore[arg-type]
        async def take_partition_epochs(sender: Any, assigned: Any, **_kwargs: Any) -> None:
            await self.take_partition_epochs(assigned)

        @app.on_partitions_revoked.connect  # type: ignore[arg-type]
        async def drop_partition_epochs(sender: Any, revoked: Any, **_kwargs: Any) -> None:
            self.drop_partition_epochs(revoked)

        self._handlers = (take_partition_epochs, drop_partition_epochs)

    async def partition_fence(self) -> PartitionFence:
        if not self._fences:
            self._fences.append(PartitionFence(await self._resources.db(), self._app_id))
        return self._fences[0]

    async def take_partition_epochs(self, assigned: Any) -> None:
        """Take the next owner epoch of every command partition this worker now holds."""
        partitions = {tp.partition for tp in assigned if tp.topic == cat.COMMANDS}

        async def take() -> None:
            await (await self.partition_fence()).take(partitions)

        await with_infra_retries("taking partition epochs", take)

    def drop_partition_epochs(self, revoked: Any) -> None:
        if self._fences:
            self._fences[0].revoke(tp.partition for tp in revoked if tp.topic == cat.COMMANDS)

    async def fenced_partitions(self, partitions: set[int]) -> set[int]:
        """The partitions of ``partitions`` another worker has taken since we did."""
        lost: set[int] = set()

        async def check() -> None:
            lost.update(await (await self.partition_fence()).lost(partitions))

        await with_infra_retries("checking partition epochs", check)
        if lost:
            metrics.ZOMBIE_STATE_WRITES.inc(len(lost))
        return lost
