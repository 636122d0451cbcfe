"""The topic catalog against the real broker: create is idempotent, verify catches drift."""

from __future__ import annotations

import pytest
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from config.settings import Settings
from topics.admin import TopicProblem, create_topics, verify_topics
from topics.catalog import catalog

pytestmark = pytest.mark.stack


def test_create_is_idempotent_and_verify_passes(live: Settings) -> None:
    outcome = create_topics(live)  # the stack already created them
    assert set(outcome) == {spec.name for spec in catalog(live)}
    assert set(outcome.values()) == {"exists"}
    assert verify_topics(live) == [spec.name for spec in catalog(live)]


def test_verify_reports_missing_and_mismatched_topics(live: Settings) -> None:
    other = live.model_copy(update={"app_id": "paystream-drift", "partitions": live.partitions})
    with pytest.raises(TopicProblem, match="paystream-drift-payment_state-changelog: missing"):
        verify_topics(other)
    admin = AdminClient({"bootstrap.servers": live.kafka_bootstrap_servers})
    name = "paystream-drift-payment_state-changelog"
    admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])[name].result(10)
    with pytest.raises(TopicProblem, match=f"{name}: 1 partitions, catalog says"):
        verify_topics(other)


def test_catalog_keys_payment_topics_by_payment_id() -> None:
    specs = {spec.name: spec for spec in catalog(Settings())}
    assert specs["payments.commands"].key == "payment_id"
    assert specs["payments.events"].key == "payment_id"
    assert specs["paystream-payment_state-changelog"].cleanup_policy == "compact"
    assert (
        specs["paystream-payment_state-changelog"].partitions
        == specs["payments.commands"].partitions
    )
