"""The Faust application: topics, the payment-state table, and the wiring of its parts.

Two agents keep the money path to two Kafka hops:

* ``process_commands`` (payments.commands -> payments.events): intake, idempotency, state
  checks and the PSP call, in batches from ``stream.take_events``. Payments of a batch run
  concurrently; the commands of one payment run in order.
* ``apply_events`` (payments.events -> PostgreSQL): ledger postings and the status read
  model, one database transaction per batch.

Faust acks a batch when the agent asks for the next one, even if the body raised, so both
bodies catch per-record errors (to the DLQ) and treat infrastructure errors (broker or
database unreachable after retries) by stopping the process without acking: the batch is
then redelivered to the next worker (at-least-once; effects are idempotent).

``create_app`` only wires: it builds the app, its topics and table, one
:class:`agents.context.AgentContext`, and registers each part with it, in this order:

* the partition-fence signal handlers (``agents/fencing.py``: ``FenceSignals``);
* ``process_commands`` (``agents/command_agent.py``), committing each batch with
  ``agents/commit.py: BatchCommit``;
* ``resolve_unknown_tierN`` (``agents/resolver_agent.py``), ``retry_tierN``
  (``agents/retry_agent.py``);
* the timers (``agents/timers.py``), ``apply_events`` (``agents/event_sink.py``), the
  merchant-webhook task (``agents/webhook_task.py``) and the web views (``agents/web.py``).

Faust registers agents, timers, tasks and pages when they are decorated, so each part's
``register`` defines the decorated functions (thin closures that delegate to the part's
methods) and must be called from here, before the worker starts.
"""

from __future__ import annotations

import faust

from agents.command_agent import CommandAgent
from agents.context import AgentContext, raw_topic
from agents.event_sink import EventSink
from agents.fencing import FenceSignals
from agents.resolver_agent import ResolverTiers
from agents.resources import Resources
from agents.retry_agent import RetryTiers
from agents.runtime import faust_credentials
from agents.timers import Timers
from agents.web import WebViews
from agents.webhook_task import MerchantWebhookTask
from config.settings import Settings
from topics import catalog as cat


def create_app(settings: Settings) -> faust.App:
    """The worker's Faust app, with every agent, timer, task and page registered."""
    settings.require_real()
    faust_dir = settings.data_dir / "faust"  # Faust's own files, out of the checkout
    faust_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{server}" for server in settings.kafka_bootstrap_servers.split(",")],
        broker_credentials=faust_credentials(settings),
        store="memory://",
        autodiscover=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_allow_declare=False,
        topic_disable_leader=True,
        broker_session_timeout=settings.broker_session_timeout,
        broker_rebalance_timeout=settings.broker_rebalance_timeout,
        broker_heartbeat_interval=settings.broker_heartbeat_interval,
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        web_port=settings.web_port,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_in_thread=False,
        datadir=str(faust_dir / settings.app_id),
        stream_wait_empty=False,
    )
    group = settings.app_id
    tiers = cat.verify_tiers(settings)
    resources = Resources(settings)

    commands_topic = app.topic(
        cat.COMMANDS,
        # Co-partitioned, keyed by payment_id: PSP lookups, retries, expiries and PSP
        # webhooks all reach the payment's only writer.
        cat.INTERNAL,
        cat.PSP_NOTIFICATIONS,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
    )
    events_topic = raw_topic(app, settings, cat.EVENTS)
    changelog = cat.changelog_topic(settings.app_id, cat.PAYMENT_STATE_TABLE)
    state_table = app.Table(
        cat.PAYMENT_STATE_TABLE,
        default=None,
        key_type=bytes,
        value_type=bytes,
        partitions=settings.partitions,
        changelog_topic=raw_topic(app, settings, changelog),
    )

    ctx = AgentContext(
        settings=settings,
        app=app,
        resources=resources,
        fencing=FenceSignals(resources, settings.app_id),
        state_table=state_table,
        verify_tiers=tiers,
        group=group,
        changelog=changelog,
    )
    ctx.fencing.register(app)

    # ---------------------------------------------------------------- command processing
    commands = CommandAgent(ctx)
    commands.register(commands_topic)

    # ---------------------------------------------------------------- unknown outcomes
    ResolverTiers(ctx).register()

    # ---------------------------------------------------------------- retry tiers
    RetryTiers(ctx).register()

    # ---------------------------------------------------------------- timers
    Timers(ctx, commands.request_verification).register()

    # ---------------------------------------------------------------- sinks
    EventSink(ctx).register(events_topic)

    # ---------------------------------------------------------------- merchant webhooks
    MerchantWebhookTask(ctx).register()

    # ---------------------------------------------------------------- web
    WebViews(ctx).register()

    return app

