"""Harness for the webhook and settlement tests: a real aiohttp receiver, a sandbox factory
taking :func:`create_app` options, and condition waits (no sleeps as synchronisation).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from psp.sandbox import SANDBOX_STATE, create_app
from tests.psp.psp_harness import API_KEY, PSP_NAME, WEBHOOK_SECRET, Sandbox

WAIT_S = 5.0


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.body)
        return loaded


@dataclass
class Receiver:
    """A local webhook endpoint; answers ``statuses`` in turn (then 200) and records all."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    calls: list[Received] = field(default_factory=list)
    """Every request, whatever was answered."""
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def accepted(self) -> list[Received]:
        return [c for c in self.calls if c.headers.get("X-Answered") == "200"]

    def events(self, event_type: str | None = None) -> list[dict[str, Any]]:
        """Events answered with 200, in arrival order."""
        found = [c.event for c in self.accepted]
        return [e for e in found if event_type is None or e["type"] == event_type]

    async def handle(self, request: web.Request) -> web.Response:
        status = self.statuses.pop(0) if self.statuses else 200
        headers = dict(request.headers)
        headers["X-Answered"] = str(status)
        self.calls.append(Received(headers=headers, body=await request.read()))
        self._changed.set()
        return web.Response(status=status, text="ok" if status == 200 else "nope")

    async def wait_for(self, condition: Callable[[], bool], limit_s: float = WAIT_S) -> None:
        """Wait until ``condition()`` holds, re-checking on every received request."""
        async with asyncio.timeout(limit_s):
            while not condition():
                self._changed.clear()
                if condition():
                    return
                await self._changed.wait()


async def wait_until(
    check: Callable[[], Awaitable[bool]], limit_s: float = WAIT_S, interval_s: float = 0.01
) -> None:
    """Poll an async ``check`` until it is true (TimeoutError after ``limit_s``)."""
    async with asyncio.timeout(limit_s):
        while True:
            if await check():
                return
            await asyncio.sleep(interval_s)


@asynccontextmanager
async def running_receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hooks", receiver.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks"
    try:
        yield receiver
    finally:
        await runner.cleanup()


@asynccontextmanager
async def running_sandbox(**options: Any) -> AsyncIterator[Sandbox]:
    """A sandbox on an ephemeral port built with ``create_app(..., **options)``."""
    app = create_app(PSP_NAME, API_KEY, WEBHOOK_SECRET, timeout_hold_s=30.0, **options)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    http = aiohttp.ClientSession()
    box = Sandbox(
        base_url=f"http://127.0.0.1:{runner.addresses[0][1]}",
        state=app[SANDBOX_STATE],
        http=http,
    )
    try:
        yield box
    finally:
        await box.aclose()
        await http.close()
        await runner.cleanup()


async def configure_webhooks(box: Sandbox, **knobs: Any) -> dict[str, Any]:
    async with box.http.post(f"{box.base_url}/sandbox/webhooks/config", json=knobs) as resp:
        body: dict[str, Any] = await resp.json()
        assert resp.status == 200, body
        return body


async def webhook_log(box: Sandbox) -> list[dict[str, Any]]:
    async with box.http.get(f"{box.base_url}/sandbox/webhooks") as resp:
        assert resp.status == 200
        body: list[dict[str, Any]] = await resp.json()
        return body


async def settlement_csv(box: Sandbox, day: str | None = None) -> tuple[str, str]:
    """``(content type, text)`` of the settlement report."""
    params = {"date": day} if day else {}
    async with box.http.get(f"{box.base_url}/sandbox/settlement", params=params) as resp:
        assert resp.status == 200, await resp.text()
        return resp.content_type, await resp.text()
