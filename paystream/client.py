"""A small producer client for checkout systems: publish payment commands to Kafka.

    from paystream import PaymentsClient

    with PaymentsClient("kafka:9092") as client:
        client.authorize(merchant_id="m_1", payment_id="pay_1", idempotency_key="order-42",
                         amount=1999, currency="USD", payment_method="tok_visa")

Commands are validated locally with the same pydantic models the pipeline uses, keyed by
``payment_id`` and written by an idempotent producer with ``acks=all``. Other languages
can produce the same JSON: see ``paystream schemas export``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal

from confluent_kafka import KafkaError, Message, Producer

from schemas.commands import COMMAND_ADAPTER, Command
from topics.catalog import COMMANDS


class PublishError(RuntimeError):
    """The broker did not acknowledge a command."""


def new_command_id() -> str:
    return f"cmd_{uuid.uuid4().hex}"


class PaymentsClient:
    """Publishes validated commands to ``payments.commands``."""

    def __init__(
        self, bootstrap_servers: str, topic: str = COMMANDS, **config: str | int | bool
    ) -> None:
        conf: dict[str, str | int | bool] = {
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            # Kafka's Java placement (murmur2), which the pipeline expects; librdkafka's
            # default (consistent_random) would cost every command an extra hop.
            "partitioner": "murmur2_random",
        }
        conf.update(config)
        self._producer = Producer(conf)
        self._topic = topic
        self._errors: list[str] = []

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._errors.append(str(err))

    def send(self, command: Command | dict[str, Any]) -> Command:
        """Validate and publish one command (asynchronously; call :meth:`flush`)."""
        parsed = COMMAND_ADAPTER.validate_python(command) if isinstance(command, dict) else command
        value = parsed.model_dump_json(exclude_none=True).encode()
        self.send_raw(parsed.payment_id.encode(), value)
        return parsed

    def send_raw(self, key: bytes | None, value: bytes) -> None:
        """Publish bytes as they are (tests and tools; no validation)."""
        while True:
            try:
                self._producer.produce(
                    self._topic, key=key, value=value, on_delivery=self._on_delivery
                )
                break
            except BufferError:
                self._producer.poll(0.05)
        self._producer.poll(0)

    def authorize(
        self,
        *,
        merchant_id: str,
        payment_id: str,
        idempotency_key: str,
        amount: int,
        currency: str,
        payment_method: str,
        capture_method: Literal["automatic", "manual"] = "automatic",
        metadata: dict[str, str] | None = None,
        description: str | None = None,
        customer_id: str | None = None,
    ) -> Command:
        return self.send(
            {
                "type": "authorize_payment",
                "schema_version": 1,
                "command_id": new_command_id(),
                "merchant_id": merchant_id,
                "idempotency_key": idempotency_key,
                "payment_id": payment_id,
                "created_at": datetime.now(UTC),
                "amount": amount,
                "currency": currency,
                "payment_method": payment_method,
                "capture_method": capture_method,
                "metadata": metadata or {},
                "description": description,
                "customer_id": customer_id,
            }
        )

    def capture(
        self, *, merchant_id: str, payment_id: str, idempotency_key: str, amount: int | None = None
    ) -> Command:
        return self.send(
            {
                "type": "capture_payment",
                "schema_version": 1,
                "command_id": new_command_id(),
                "merchant_id": merchant_id,
                "idempotency_key": idempotency_key,
                "payment_id": payment_id,
                "created_at": datetime.now(UTC),
                "amount": amount,
            }
        )

    def void(self, *, merchant_id: str, payment_id: str, idempotency_key: str) -> Command:
        """Cancel an uncaptured (manual-capture) authorization."""
        return self.send(
            {
                "type": "void_payment",
                "schema_version": 1,
                "command_id": new_command_id(),
                "merchant_id": merchant_id,
                "idempotency_key": idempotency_key,
                "payment_id": payment_id,
                "created_at": datetime.now(UTC),
            }
        )

    def refund(
        self,
        *,
        merchant_id: str,
        payment_id: str,
        idempotency_key: str,
        refund_id: str,
        amount: int | None = None,
        reason: str | None = None,
    ) -> Command:
        """Refund all that is left (no amount) or part of a captured payment."""
        return self.send(
            {
                "type": "refund_payment",
                "schema_version": 1,
                "command_id": new_command_id(),
                "merchant_id": merchant_id,
                "idempotency_key": idempotency_key,
                "payment_id": payment_id,
                "created_at": datetime.now(UTC),
                "refund_id": refund_id,
                "amount": amount,
                "reason": reason,
            }
        )

    def flush(self, timeout: float = 30.0) -> None:
        """Block until every command sent so far is acknowledged; raise if any failed."""
        remaining = self._producer.flush(timeout)
        errors, self._errors = self._errors, []
        if remaining or errors:
            raise PublishError(f"{remaining} unacknowledged, {len(errors)} failed: {errors[:3]}")

    def __enter__(self) -> PaymentsClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.flush()
