"""Fixtures shared by the pipeline tests: a command producer and a reader of the events."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from config.settings import Settings
from paystream.client import PaymentsClient
from tests.agents.kafka_reader import TopicReader
from topics.catalog import EVENTS


@pytest.fixture()
def client(live: Settings) -> Iterator[PaymentsClient]:
    with PaymentsClient(live.kafka_bootstrap_servers) as producer:
        yield producer


@pytest.fixture()
def events(live: Settings) -> Iterator[TopicReader]:
    reader = TopicReader(live.kafka_bootstrap_servers, EVENTS)
    yield reader
    reader.close()
