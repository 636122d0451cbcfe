"""Fixtures for the PSP tests: a real sandbox PSP on an ephemeral 127.0.0.1 port per test.

No mocks: the adapter talks HTTP to an aiohttp AppRunner/TCPSite serving ``create_app``.
Faults are injected per request by giving an adapter a session whose default headers
carry ``Sandbox-Fault``. The sandbox's ``timeout`` fault holds its answer until the app
shuts down (teardown), so no test waits for it.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from psp.sandbox import SANDBOX_STATE, create_app
from tests.psp.psp_harness import API_KEY, PSP_NAME, WEBHOOK_SECRET, Sandbox


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    app: web.Application = create_app(PSP_NAME, API_KEY, WEBHOOK_SECRET, timeout_hold_s=30.0)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]  # port 0 above: the OS picked a free one
    http = aiohttp.ClientSession()
    box = Sandbox(base_url=f"http://127.0.0.1:{port}", state=app[SANDBOX_STATE], http=http)
    try:
        yield box
    finally:
        await box.aclose()
        await http.close()
        await runner.cleanup()


@pytest.fixture
def unused_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
