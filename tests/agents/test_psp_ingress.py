"""PSP webhook ingress against a real broker and Redis: verify, dedupe, publish, ack.

Every test uses payment ids and event ids of its own. Records about one payment share a
Kafka key, hence a partition, so once a later "marker" record is visible every earlier
record of that key is visible too: that is how the tests prove a bad request published
nothing, without sleeping.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from agents.psp_ingress import PspWebhookIngress
from config.settings import Settings
from psp.protocol import PspAdapter, PspNotification
from psp.sandbox_adapter import SandboxAdapter
from schemas.signatures import sign_payload
from tests.agents.kafka_reader import TopicReader
from topics.catalog import PSP_NOTIFICATIONS
from topics.publisher import EventPublisher

pytestmark = pytest.mark.stack

PSP = "alpha"


def _secret(settings: Settings, name: str = PSP) -> str:
    return next(e.webhook_secret for e in settings.psp_endpoints() if e.name == name)


def _adapters(settings: Settings) -> dict[str, PspAdapter]:
    return {
        e.name: SandboxAdapter(
            name=e.name,
            base_url=e.url,
            api_key=e.api_key,
            timeout=settings.psp_timeout_seconds,
            webhook_secrets=(e.webhook_secret,),
        )
        for e in settings.psp_endpoints()
    }


def _event(
    payment_id: str | None,
    *,
    event_type: str = "payment_intent.succeeded",
    obj: dict[str, Any] | None = None,
) -> tuple[str, bytes]:
    """A Stripe-shaped event (id, raw body) about a payment intent of ``payment_id``."""
    event_id = f"evt_{uuid.uuid4().hex}"
    intent = f"pi_{uuid.uuid4().hex[:16]}"
    metadata = {"payment_id": payment_id, "merchant_id": "m_ingress"} if payment_id else {}
    body = {
        "id": event_id,
        "object": "event",
        "type": event_type,
        "created": int(time.time()),
        "livemode": False,
        "data": {
            "object": obj
            or {
                "id": intent,
                "object": "payment_intent",
                "amount": 1999,
                "currency": "usd",
                "status": "succeeded",
                "metadata": metadata,
            }
        },
    }
    return event_id, json.dumps(body, separators=(",", ":")).encode()


def _sign(settings: Settings, body: bytes, *, secret: str | None = None,
          timestamp: int | None = None) -> str:
    return sign_payload(
        body, secret or _secret(settings), int(time.time()) if timestamp is None else timestamp
    )


def _count(result: str, psp: str = PSP) -> float:
    value = REGISTRY.get_sample_value(
        "paystream_psp_webhooks_total", {"psp": psp, "result": result}
    )
    return value or 0.0


@pytest.fixture()
def reader(live: Settings) -> Iterator[TopicReader]:
    topic_reader = TopicReader(live.kafka_bootstrap_servers, PSP_NOTIFICATIONS)
    try:
        yield topic_reader
    finally:
        topic_reader.close()


@pytest.fixture()
async def redis_client(live: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(live.redis_url)
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{live.app_id}:psp-webhook:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture()
async def ingress(live: Settings, redis_client: aioredis.Redis) -> AsyncIterator[PspWebhookIngress]:
    adapters = _adapters(live)
    handler = PspWebhookIngress(live, adapters, redis_client, EventPublisher(live))
    try:
        yield handler
    finally:
        await handler.close()
        for adapter in adapters.values():
            await adapter.close()


def _with_key(reader: TopicReader, key: bytes) -> list[Any]:
    return [m for m in reader.records if m.key() == key]


def _event_ids(records: list[Any]) -> list[str]:
    return [json.loads(m.value())["event_id"] for m in records]


async def test_valid_webhook_is_published_once_and_its_duplicate_is_not(
    live: Settings, ingress: PspWebhookIngress, reader: TopicReader, redis_client: aioredis.Redis
) -> None:
    payment_id = f"pay_ing_{uuid.uuid4().hex[:10]}"
    key = payment_id.encode()
    event_id, body = _event(payment_id)
    accepted, duplicates = _count("accepted"), _count("duplicate")

    status, answer = await ingress.handle(PSP, body, _sign(live, body))
    assert (status, answer["duplicate"], answer["event_id"]) == (200, False, event_id)
    records = reader.until(lambda _: _with_key(reader, key) or None)
    assert len(records) == 1
    note = PspNotification.model_validate_json(records[0].value())
    assert (note.psp, note.event_id, note.payment_id) == (PSP, event_id, payment_id)
    assert (note.type, note.status, note.amount, note.currency) == (
        "payment_intent.succeeded", "succeeded", 1999, "USD"
    )
    ttl = await redis_client.ttl(ingress.dedupe_key(PSP, event_id))
    assert 0 < ttl <= live.psp_webhook_dedupe_seconds

    # The PSP sends it again (a retry, or its own duplicate), signed anew.
    status, answer = await ingress.handle(PSP, body, _sign(live, body, timestamp=int(time.time())))
    assert (status, answer["duplicate"]) == (200, True)

    # Proof that the duplicate published nothing: a later record of the same key is seen,
    # so everything before it on that partition is seen too.
    marker_id, marker = _event(payment_id, event_type="charge.refunded")
    assert (await ingress.handle(PSP, marker, _sign(live, marker)))[0] == 200
    reader.until(lambda _: marker_id in _event_ids(_with_key(reader, key)))
    assert _event_ids(_with_key(reader, key)) == [event_id, marker_id]
    assert _count("accepted") == accepted + 2
    assert _count("duplicate") == duplicates + 1


async def test_bad_signatures_are_rejected_and_nothing_reaches_kafka(
    live: Settings, ingress: PspWebhookIngress, reader: TopicReader, redis_client: aioredis.Redis
) -> None:
    payment_id = f"pay_bad_{uuid.uuid4().hex[:10]}"
    key = payment_id.encode()
    tolerance = live.psp_webhook_tolerance_seconds
    now = int(time.time())
    event_id, body = _event(payment_id)
    tampered = body.replace(b'"amount":1999', b'"amount":1')
    assert tampered != body
    bad_signatures = _count("bad_signature")

    requests: list[tuple[str, bytes, str | None]] = [
        ("tampered body", tampered, _sign(live, body)),
        ("wrong secret", body, _sign(live, body, secret="whsec_not_the_one")),
        ("other PSP's secret", body, _sign(live, body, secret=_secret(live, "beta"))),
        ("stale timestamp", body, _sign(live, body, timestamp=now - tolerance - 60)),
        ("far-future timestamp", body, _sign(live, body, timestamp=now + tolerance + 60)),
        ("missing header", body, None),
        ("empty header", body, ""),
        ("malformed header", body, "v1=deadbeef"),
    ]
    for what, raw, header in requests:
        status, answer = await ingress.handle(PSP, raw, header)
        assert (status, answer["error"]) == (400, "bad_signature"), what
    assert _count("bad_signature") == bad_signatures + len(requests)
    assert not await redis_client.exists(ingress.dedupe_key(PSP, event_id))

    # The same event, correctly signed: accepted (the rejects did not poison its event id),
    # and it is the only record of this payment on the topic.
    status, answer = await ingress.handle(PSP, body, _sign(live, body))
    assert (status, answer["duplicate"]) == (200, False)
    reader.until(lambda _: _with_key(reader, key))
    assert _event_ids(_with_key(reader, key)) == [event_id]
    assert json.loads(_with_key(reader, key)[0].value())["amount"] == 1999


async def test_a_correctly_signed_malformed_event_is_a_bad_request(
    live: Settings, ingress: PspWebhookIngress
) -> None:
    bad_requests = _count("bad_request")
    for body in (b"not json", b'{"type": "payment_intent.succeeded"}', b"[]"):
        status, answer = await ingress.handle(PSP, body, _sign(live, body))
        assert (status, answer["error"]) == (400, "bad_request"), body
    assert _count("bad_request") == bad_requests + 3


async def test_unknown_psp_is_404_and_publishes_nothing(
    live: Settings, ingress: PspWebhookIngress
) -> None:
    unknown = _count("unknown_psp", psp="unknown")
    _, body = _event("pay_unknown_psp")
    status, answer = await ingress.handle("gamma", body, _sign(live, body))
    assert (status, answer["error"]) == (404, "unknown_psp")
    assert _count("unknown_psp", psp="unknown") == unknown + 1


async def test_without_our_payment_id_the_key_is_the_psp_reference(
    live: Settings, ingress: PspWebhookIngress, reader: TopicReader
) -> None:
    # A dispute object, as the sandbox sends it: it names the payment intent, no metadata.
    intent = f"pi_{uuid.uuid4().hex[:16]}"
    dispute = {
        "id": f"dp_{uuid.uuid4().hex[:12]}",
        "object": "dispute",
        "amount": 500,
        "currency": "eur",
        "payment_intent": intent,
        "status": "needs_response",
    }
    event_id, body = _event(None, event_type="charge.dispute.created", obj=dispute)
    status, _ = await ingress.handle(PSP, body, _sign(live, body))
    assert status == 200
    key = f"{PSP}:{intent}".encode()
    records = reader.until(lambda _: _with_key(reader, key))
    note = PspNotification.model_validate_json(records[0].value())
    assert (note.event_id, note.payment_id, note.psp_reference) == (event_id, None, intent)


class _RefusedPublisher(EventPublisher):
    """A real producer whose records the real broker refuses (a partition that does not
    exist), as a full or failing broker would."""

    def publish(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> None:
        super().publish(topic, key, value, headers, partition=999)


async def test_a_refused_write_answers_503_and_the_retry_gets_through(
    live: Settings, ingress: PspWebhookIngress, reader: TopicReader, redis_client: aioredis.Redis
) -> None:
    payment_id = f"pay_503_{uuid.uuid4().hex[:10]}"
    event_id, body = _event(payment_id)
    errors = _count("error")
    adapters = _adapters(live)
    failing = PspWebhookIngress(live, adapters, redis_client, _RefusedPublisher(live))
    try:
        status, answer = await failing.handle(PSP, body, _sign(live, body))
    finally:
        await failing.close()
        for adapter in adapters.values():
            await adapter.close()
    assert (status, answer["error"]) == (503, "unavailable")
    assert _count("error") == errors + 1
    assert not await redis_client.exists(ingress.dedupe_key(PSP, event_id))

    # The PSP retries: accepted now, not taken for a duplicate; exactly one record.
    status, answer = await ingress.handle(PSP, body, _sign(live, body))
    assert (status, answer["duplicate"]) == (200, False)
    key = payment_id.encode()
    reader.until(lambda _: _with_key(reader, key))
    assert _event_ids(_with_key(reader, key)) == [event_id]
