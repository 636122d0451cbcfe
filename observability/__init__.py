"""What every process exports for operators: the Prometheus metric definitions.

A layer of its own, between ``topics`` and ``schemas`` (see docs/architecture.md): agents,
sinks, PSP adapters and the Kafka helpers all record metrics, so the definitions sit below
all of them and import nothing of the project but ``schemas`` and ``config``.
"""
