"""Client configuration shared by every confluent-kafka and aiokafka client we create."""

from __future__ import annotations

from config.settings import Settings


def client_config(settings: Settings) -> dict[str, str]:
    """librdkafka properties for bootstrap servers and optional SASL/TLS."""
    conf = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "security.protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_sasl_mechanism:
        conf["sasl.mechanism"] = settings.kafka_sasl_mechanism
    if settings.kafka_sasl_username:
        conf["sasl.username"] = settings.kafka_sasl_username
    if settings.kafka_sasl_password is not None:
        conf["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    if settings.kafka_ssl_cafile:
        conf["ssl.ca.location"] = settings.kafka_ssl_cafile
    return conf


def producer_config(settings: Settings) -> dict[str, str | int | bool]:
    """A durable, idempotent producer (acks=all) placing keys as Java does (murmur2)."""
    conf: dict[str, str | int | bool] = dict(client_config(settings))
    conf.update(
        {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "none",
            # Java's placement (murmur2), not librdkafka's default (consistent_random,
            # CRC32): every record about a payment must land on the partition a Java,
            # kafkajs or Faust producer would pick for its payment_id (README: Partitioning).
            "partitioner": "murmur2_random",
        }
    )
    return conf
