"""The commit protocol of the command processor: when a batch may be acknowledged.

See :class:`BatchCommit`.
"""

from __future__ import annotations

from typing import Any

from agents.fencing import FenceSignals
from agents.runtime import with_infra_retries
from config.settings import Settings
from topics.publisher import EventPublisher


class BatchCommit:
    """Make a processed batch of ``process_commands`` durable, in this order:

    1. **Flush the outputs** (``outputs.flush``): the batch's events, retries, verify
       requests and dead letters, all published with the agent's ``EventPublisher``.
       State goes to the changelog only once the batch's events are durable.
    2. **Check the partition epochs** (agents/fencing.py): a write for a partition another
       worker took while the batch ran (a rebalance zombie) is detected and counted, and
       still made: Faust acknowledges the batch whatever the agent does, so dropping the
       state would lose it while its events are published. Preventing the late write
       needs a Kafka transaction per input partition (see below).
    3. **Write each changed state to the changelog** through our own producer, not
       Faust's: Faust's own producer "flush" returns after 0.1 s without progress while
       records are still buffered, so Faust can commit offsets past state it never wrote.
       One record per producer batch (``single_record_batches``): the broker's high
       watermark cut the restore of the last changelog batch (README, "crash test").
    4. **Flush that producer**, before the batch is acked.
    5. **Only then let Faust ack the batch**: the agent does so by asking
       ``stream.take_events`` for the next batch, so :meth:`commit` returns before the
       agent loops. An infrastructure error that persists through the retries of any
       step stops the worker without acking (``agents.runtime.fail_stop``), and the batch
       is redelivered (at-least-once; effects are idempotent).

    The same shape as quixstreams' checkpoint (flush sinks -> produce changelogs -> flush
    producer -> commit offsets); the fencing work of exactly-once (a Kafka transaction
    per input partition, see README "Rebalance zombies") has this one place to go.
    """

    def __init__(
        self, settings: Settings, outputs: EventPublisher, fencing: FenceSignals,
        state_table: Any, changelog: str,
    ) -> None:
        self.outputs = outputs
        self.state_writer = EventPublisher(settings, single_record_batches=True)
        self.fencing = fencing
        self.state_table = state_table
        self.changelog = changelog

    async def commit(self, changes: dict[bytes, tuple[int, bytes]]) -> None:
        """Commit a batch's outputs and its new states (key -> (partition, state JSON))."""
        await with_infra_retries("publishing events", self.outputs.flush)
        # State goes to the changelog only once the batch's events are durable, and
        # through our producer, flushed before the batch is acked: Faust's own
        # producer "flush" returns after 0.1 s without progress while records are
        # still buffered, so Faust can commit offsets past state it never wrote.
        # A write for a partition another worker took meanwhile (a rebalance zombie) is
        # detected and counted, not dropped: see agents/fencing.py.
        await self.fencing.fenced_partitions({p for p, _value in changes.values()})
        for key, (partition, value) in changes.items():
            self.state_writer.publish(self.changelog, key, value, partition=partition)
        await with_infra_retries("writing the state changelog", self.state_writer.flush)
