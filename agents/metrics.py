"""Prometheus metrics every worker exports at ``/metrics`` (base units, bounded labels)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

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
