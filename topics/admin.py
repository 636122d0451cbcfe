"""Create, verify and describe the catalog's topics with confluent-kafka's AdminClient."""

from __future__ import annotations

from typing import Any

from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from config.settings import Settings
from topics.catalog import TopicSpec, catalog, copartitioned_topics
from topics.kafka_config import client_config


class TopicProblem(Exception):
    """A topic exists with the wrong shape, or could not be created."""


def admin_client(settings: Settings) -> AdminClient:
    conf: dict[str, str | int | float | bool] = dict(client_config(settings))
    return AdminClient(conf)


def _existing(admin: AdminClient, timeout: float) -> dict[str, int]:
    metadata = admin.list_topics(timeout=timeout)
    return {
        name: len(topic.partitions)
        for name, topic in metadata.topics.items()
        if topic.error is None
    }


def create_topics(settings: Settings, timeout: float = 15.0) -> dict[str, str]:
    """Create every missing catalog topic; returns name -> 'created' | 'exists'."""
    admin = admin_client(settings)
    specs = catalog(settings)
    existing = _existing(admin, timeout)
    result: dict[str, str] = {}
    missing: list[TopicSpec] = []
    for spec in specs:
        if spec.name in existing:
            result[spec.name] = "exists"
        else:
            missing.append(spec)
    if missing:
        futures: dict[str, Any] = admin.create_topics(
            [
                NewTopic(
                    spec.name,
                    num_partitions=spec.partitions,
                    replication_factor=spec.replication_factor,
                    config=spec.config(),
                )
                for spec in missing
            ],
            operation_timeout=timeout,
        )
        for name, future in futures.items():
            try:
                future.result(timeout=timeout)
                result[name] = "created"
            except Exception as exc:  # noqa: BLE001 - reported per topic below
                if "TOPIC_ALREADY_EXISTS" in str(exc):
                    result[name] = "exists"
                else:
                    raise TopicProblem(f"could not create {name}: {exc}") from exc
    verify_topics(settings, timeout=timeout)
    return result


def verify_topics(settings: Settings, timeout: float = 15.0) -> list[str]:
    """Check every catalog topic exists with its partition count; raise on a mismatch."""
    existing = _existing(admin_client(settings), timeout)
    problems: list[str] = []
    for spec in catalog(settings):
        partitions = existing.get(spec.name)
        if partitions is None:
            problems.append(f"{spec.name}: missing (run 'paystream topics create')")
        elif partitions != spec.partitions:
            problems.append(
                f"{spec.name}: {partitions} partitions, catalog says {spec.partitions}"
            )
    if problems:
        raise TopicProblem("; ".join(problems))
    return [spec.name for spec in catalog(settings)]


def copartition_problems(settings: Settings, existing: dict[str, int]) -> list[str]:
    """What is wrong with the co-partitioned topics, given ``existing`` name -> partitions.

    They must all exist with one partition count, the one the worker is configured with
    (``PAYSTREAM_PARTITIONS``): intake computes each payment's partition from it.
    """
    names = copartitioned_topics(settings)
    missing = [name for name in names if name not in existing]
    counts = {name: existing[name] for name in names if name in existing}
    problems: list[str] = []
    if missing:
        problems.append(f"missing: {', '.join(missing)} (run 'paystream topics create')")
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name}={n}" for name, n in counts.items())
        problems.append(f"co-partitioned topics differ in partition count: {listed}")
    elif counts and settings.partitions not in counts.values():
        problems.append(
            f"co-partitioned topics have {next(iter(counts.values()))} partitions, "
            f"PAYSTREAM_PARTITIONS is {settings.partitions}"
        )
    return problems


def check_copartitioned(settings: Settings, timeout: float = 15.0) -> None:
    """Raise :class:`TopicProblem` unless the co-partitioned topics agree (worker start-up).

    A payment's commands, PSP answers, retries and state changelog must share a partition
    number; if the topics' partition counts differ, the same payment_id hashes to different
    partitions, answers reach a worker without the payment's state, and payments strand.
    """
    problems = copartition_problems(settings, _existing(admin_client(settings), timeout))
    if problems:
        raise TopicProblem("; ".join(problems))
