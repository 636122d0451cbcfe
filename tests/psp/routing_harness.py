"""Helpers for the breaker, limit and routing tests: real Redis, two real sandbox PSPs.

Redis: PAYSTREAM_TEST_REDIS_URL (default db 15); every test uses its own key prefix and
deletes only keys under it. Sandboxes: in-process aiohttp AppRunner on free ports, reusing
:class:`tests.psp.psp_harness.Sandbox` for ground truth (``charges()``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from psp.sandbox import SANDBOX_STATE, create_app
from psp.sandbox_adapter import SandboxAdapter
from tests.psp.psp_harness import API_KEY, WEBHOOK_SECRET, Sandbox

REDIS_URL = os.environ.get("PAYSTREAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


class FakeClock:
    """A settable clock for breakers and limits: tests advance it instead of sleeping."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def new_prefix() -> str:
    return f"pstest:{uuid.uuid4().hex[:12]}"


@asynccontextmanager
async def redis_clients(prefix: str, count: int) -> AsyncIterator[list[aioredis.Redis]]:
    """``count`` independent clients (separate connection pools, like separate workers);
    deletes every key under ``prefix`` afterwards."""
    clients = [aioredis.Redis.from_url(REDIS_URL) for _ in range(count)]
    try:
        yield clients
    finally:
        keys = [key async for key in clients[0].scan_iter(match=f"{prefix}:*")]
        if keys:
            await clients[0].delete(*keys)
        for client in clients:
            await client.aclose()


@asynccontextmanager
async def running_sandbox(name: str) -> AsyncIterator[Sandbox]:
    """A sandbox PSP called ``name`` on a free port (held ``timeout`` faults end at exit)."""
    app = create_app(name, API_KEY, WEBHOOK_SECRET, timeout_hold_s=30.0)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    http = aiohttp.ClientSession()
    box = Sandbox(base_url=f"http://127.0.0.1:{port}", state=app[SANDBOX_STATE], http=http)
    try:
        yield box
    finally:
        await box.aclose()
        await http.close()
        await runner.cleanup()


def adapter_for(name: str, base_url: str, *, timeout: float = 2.0) -> SandboxAdapter:
    """A :class:`SandboxAdapter` named ``name`` (the harness's ``adapter()`` is always alpha)."""
    return SandboxAdapter(name, base_url, API_KEY, timeout)


async def set_faults(box: Sandbox, **knobs: float) -> dict[str, Any]:
    """``POST /sandbox/faults`` (global fault rates of that sandbox)."""
    async with box.http.post(f"{box.base_url}/sandbox/faults", json=knobs) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body
