"""What the parts of the worker share, passed to each of them explicitly.

``create_app`` (agents/app.py) builds one :class:`AgentContext` and hands it to every part
(the command processor, the resolver and retry tiers, the event sink, the webhook task,
the timers, the web views): no part reaches into another's enclosing scope, and a test can
build a context with fakes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faust

from agents.fencing import FenceSignals
from agents.resources import Resources
from config.settings import Settings


def raw_topic(app: faust.App, settings: Settings, name: str) -> Any:
    """A topic of raw bytes (keys and values), with the configured partition count."""
    return app.topic(
        name,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
    )


@dataclass(slots=True)
class AgentContext:
    """The dependencies of the agents, timers and views of one worker."""

    settings: Settings
    app: faust.App
    resources: Resources
    """PostgreSQL pool, Redis, the PSP router and the merchant idempotency keys."""
    fencing: FenceSignals
    """The partition fence of the command partitions (agents/fencing.py)."""
    state_table: Any
    """The ``payment_state`` table: payment id -> ``PaymentState`` JSON."""
    verify_tiers: list[tuple[str, float]]
    """The resolver's delay tiers: (topic, seconds)."""
    group: str
    """The consumer group (the app id), named in dead-letter envelopes."""
    changelog: str
    """The state table's changelog topic, written by :class:`agents.commit.BatchCommit`."""

    def raw_topic(self, name: str) -> Any:
        return raw_topic(self.app, self.settings, name)
