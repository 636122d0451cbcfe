"""The topic catalog: every topic paystream reads or writes, in one place.

Nothing relies on broker auto-creation: ``paystream topics create`` makes these topics and
``paystream topics verify`` checks that a cluster matches them. Faust's table changelog
topics are listed too, because a changelog must have exactly as many partitions as the
stream that updates its table.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from config.settings import Settings

DAY_MS = 24 * 60 * 60 * 1000

COMMANDS = "payments.commands"
EVENTS = "payments.events"
COMMANDS_DLQ = "payments.commands.dlq"
EVENTS_DLQ = "payments.events.dlq"
INTERNAL = "payments.internal"
PSP_NOTIFICATIONS = "psp.notifications"
PSP_NOTIFICATIONS_DLQ = "psp.notifications.dlq"
WEBHOOKS_DLQ = "payments.webhooks.dlq"


def verify_tiers(settings: Settings) -> list[tuple[str, float]]:
    """Delay tiers for looking up unknown PSP outcomes: (topic, seconds to wait)."""
    return [
        (f"payments.verify.tier{n}", delay)
        for n, delay in enumerate(settings.verify_delays_seconds, start=1)
    ]


def retry_tiers(settings: Settings) -> list[tuple[str, float]]:
    """Retry tiers for transient failures: (topic, longest wait in seconds)."""
    return [
        (f"payments.retry.tier{n}", delay)
        for n, delay in enumerate(settings.retry_delays_seconds, start=1)
    ]


PAYMENT_STATE_TABLE = "payment_state"


def changelog_topic(app_id: str, table: str) -> str:
    """Faust's name for a table's changelog topic."""
    return f"{app_id}-{table}-changelog"


def copartitioned_topics(settings: Settings) -> list[str]:
    """Topics whose partition ``p`` must belong to the same worker for every ``p``.

    All are keyed by ``payment_id`` and feed (or record) the payment's one writer; with
    different partition counts the same key lands on different partitions.
    """
    return [
        COMMANDS,
        INTERNAL,
        PSP_NOTIFICATIONS,
        changelog_topic(settings.app_id, PAYMENT_STATE_TABLE),
        *(name for name, _ in verify_tiers(settings)),
        *(name for name, _ in retry_tiers(settings)),
    ]


class TopicSpec(BaseModel):
    """One topic: name, partitions, cleanup policy and what its key is."""

    model_config = ConfigDict(frozen=True)

    name: str
    partitions: int
    key: str
    description: str
    cleanup_policy: Literal["delete", "compact"] = "delete"
    retention_ms: int | None = 7 * DAY_MS
    replication_factor: int = 1

    def config(self) -> dict[str, str]:
        """Topic-level configs as Kafka expects them."""
        out: dict[str, str] = {"cleanup.policy": self.cleanup_policy}
        if self.retention_ms is not None:
            out["retention.ms"] = str(self.retention_ms)
        return out


def catalog(settings: Settings) -> list[TopicSpec]:
    """Every topic for a deployment configured by ``settings``."""
    n = settings.partitions
    rf = settings.replication_factor
    return [
        TopicSpec(
            name=COMMANDS,
            partitions=n,
            key="payment_id",
            description="Payment commands from checkout systems (JSON, schema_version 1).",
            retention_ms=7 * DAY_MS,
            replication_factor=rf,
        ),
        TopicSpec(
            name=EVENTS,
            partitions=n,
            key="payment_id",
            description="Authoritative payment outcomes (JSON events).",
            retention_ms=30 * DAY_MS,
            replication_factor=rf,
        ),
        TopicSpec(
            name=INTERNAL,
            partitions=n,
            key="payment_id",
            description="Internal commands (PSP lookups resolved); co-partitioned with commands.",
            retention_ms=7 * DAY_MS,
            replication_factor=rf,
        ),
        *(
            TopicSpec(
                name=name,
                partitions=n,
                key="payment_id",
                description=f"Unknown PSP outcomes to look up after {delay:g}s.",
                retention_ms=7 * DAY_MS,
                replication_factor=rf,
            )
            for name, delay in verify_tiers(settings)
        ),
        *(
            TopicSpec(
                name=name,
                partitions=n,
                key="payment_id",
                description=f"Commands retried after a transient failure, within {delay:g}s.",
                retention_ms=7 * DAY_MS,
                replication_factor=rf,
            )
            for name, delay in retry_tiers(settings)
        ),
        TopicSpec(
            name=PSP_NOTIFICATIONS,
            partitions=n,
            key="payment_id",
            description="Verified PSP webhooks, normalised; co-partitioned with commands.",
            retention_ms=7 * DAY_MS,
            replication_factor=rf,
        ),
        TopicSpec(
            name=PSP_NOTIFICATIONS_DLQ,
            partitions=1,
            key="original key",
            description="PSP notifications that could not be applied: original bytes + headers.",
            retention_ms=30 * DAY_MS,
            replication_factor=rf,
        ),
        TopicSpec(
            name=WEBHOOKS_DLQ,
            partitions=1,
            key="payment_id",
            description="Merchant webhook deliveries that exhausted their retry schedule.",
            retention_ms=30 * DAY_MS,
            replication_factor=rf,
        ),
        TopicSpec(
            name=COMMANDS_DLQ,
            partitions=1,
            key="original key",
            description="Commands that could not be processed: original bytes + headers.",
            retention_ms=30 * DAY_MS,
            replication_factor=rf,
        ),
        TopicSpec(
            name=EVENTS_DLQ,
            partitions=1,
            key="original key",
            description="Events a sink could not apply: original bytes + headers.",
            retention_ms=30 * DAY_MS,
            replication_factor=rf,
        ),
        TopicSpec(
            name=changelog_topic(settings.app_id, PAYMENT_STATE_TABLE),
            partitions=n,
            key="payment_id",
            description="Faust changelog of the per-payment state table.",
            cleanup_policy="compact",
            retention_ms=None,
            replication_factor=rf,
        ),
    ]
