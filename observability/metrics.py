"""Prometheus metrics every worker exports at ``/metrics`` (base units, bounded labels)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

COMMANDS = Counter(
    "paystream_commands_total",
    "Commands processed, by command type and outcome (event type or dlq).",
    ["type", "outcome"],
)
EVENTS_APPLIED = Counter(
    "paystream_sink_events_total", "Events applied by the ledger/status sink.", ["type"]
)
DLQ_RECORDS = Counter(
    "paystream_dlq_records_total", "Records sent to a dead-letter topic.", ["stage", "reason"]
)
END_TO_END_LATENCY = Histogram(
    "paystream_end_to_end_latency_seconds",
    "Command created_at to its event applied by the sink.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_SIZE = Histogram(
    "paystream_agent_batch_size",
    "Records per agent batch.",
    ["agent"],
    buckets=(1, 10, 50, 100, 250, 500, 1000),
)
LEDGER_POSTINGS = Counter(
    "paystream_ledger_postings_total", "Ledger transactions newly posted.", ["kind"]
)
VERIFY_LOOKUPS = Counter(
    "paystream_psp_verify_lookups_total",
    "Lookups of unknown PSP outcomes, by PSP and lookup outcome.",
    ["psp", "outcome"],
)
PSP_LATENCY = Histogram(
    "paystream_psp_request_duration_seconds",
    "PSP HTTP call latency, by PSP, operation and outcome.",
    ["psp", "operation", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BREAKER_STATE = Gauge(
    "paystream_psp_breaker_state",
    "Circuit breaker state per PSP: 0 closed, 1 half-open, 2 open.",
    ["psp"],
)
PENDING_VERIFICATION = Gauge(
    "paystream_payments_pending_verification",
    "Payments of this worker's partitions whose PSP outcome is unknown (being verified).",
)
ZOMBIE_STATE_WRITES = Counter(
    "paystream_zombie_state_writes_total",
    "Batches' state writes for a partition another worker had taken meanwhile (a rebalance "
    "zombie; detected by the owner epochs, not prevented: docs/failure-modes.md).",
)
STUCK_PAYMENTS = Gauge(
    "paystream_payments_stuck",
    "Payments of this worker's partitions still pending verification after "
    "PAYSTREAM_STUCK_AFTER_SECONDS (re-verified by the stuck-payment sweep; alert on > 0).",
)
RETRIES = Counter(
    "paystream_retries_total",
    "Commands (or notifications) sent to a retry tier, by tier and kind.",
    ["tier", "kind"],
)
WEBHOOK_DELIVERIES = Counter(
    "paystream_webhook_deliveries_total",
    "Merchant webhook delivery attempts, by result (delivered, failed, dead).",
    ["result"],
)
WEBHOOK_DELIVERY_LATENCY = Histogram(
    "paystream_webhook_delivery_duration_seconds",
    "Merchant webhook HTTP call latency.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
WEBHOOK_BACKLOG = Gauge(
    "paystream_webhook_deliveries_pending",
    "Merchant webhook deliveries waiting for their next attempt.",
)
PSP_WEBHOOKS = Counter(
    "paystream_psp_webhooks_total",
    "PSP webhooks received at ingress, by PSP and result (accepted, duplicate, "
    "bad_signature, bad_request, unknown_psp, error).",
    ["psp", "result"],
)
CONSUMER_LAG = Gauge(
    "paystream_consumer_lag",
    "Records behind the end offset, per consumer group, topic and partition.",
    ["group", "topic", "partition"],
)
LEDGER_IMBALANCE = Gauge(
    "paystream_ledger_imbalance_minor_units",
    "Sum of all ledger entries per currency; must stay 0.",
    ["currency"],
)
AUTHORIZATIONS_EXPIRED = Counter(
    "paystream_authorizations_expired_total",
    "Authorizations voided because they were not captured within their validity.",
)
COMMANDS_FORWARDED = Counter(
    "paystream_commands_forwarded_total",
    "Commands that arrived on a partition other than their payment's (a producer with a "
    "non-murmur2 partitioner) and were forwarded to the right one.",
)
