"""Runtime helpers every agent shares: fail-stop, infrastructure retries, Kafka credentials.

Faust acks a batch when the agent asks for the next one, even if the body raised, so an
infrastructure error (broker or database unreachable after retries) stops the process
without acking: the batch is then redelivered to the next worker (at-least-once; effects
are idempotent).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import faust

from config.settings import Settings
from topics.publisher import RecordsLost

log = logging.getLogger("paystream.agents")

INFRA_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)


def fail_stop(reason: str) -> None:
    """Stop the worker at once without acking the current batch (it will be redelivered)."""
    log.critical("fail-stop: %s; exiting without acknowledging the batch", reason)
    logging.shutdown()
    os._exit(70)


async def with_infra_retries(what: str, action: Callable[[], Awaitable[None]]) -> None:
    """Run ``action``; retry on errors with backoff; fail-stop when they persist."""
    for delay in (*INFRA_RETRY_DELAYS, None):
        try:
            await action()
            return
        except RecordsLost as exc:  # retrying would ack a batch whose outputs are gone
            fail_stop(f"{what}: {exc}")
        except Exception as exc:  # noqa: BLE001 - any infrastructure error is retried
            if delay is None:
                fail_stop(f"{what} failed after retries: {type(exc).__name__}: {exc}")
            log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(exc).__name__, exc,
                        delay)
            await asyncio.sleep(delay or 0)



def faust_credentials(settings: Settings) -> Any:
    """SASL and/or TLS credentials for Faust's Kafka clients, from the same settings."""
    import ssl

    protocol = settings.kafka_security_protocol.upper()
    context = None
    if protocol in {"SSL", "SASL_SSL"}:
        context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
    if protocol.startswith("SASL"):
        password = settings.kafka_sasl_password
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=password.get_secret_value() if password else None,
            mechanism=settings.kafka_sasl_mechanism or "PLAIN",
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None
