"""Test harness for the PSP tests: a handle on a running sandbox PSP and its helpers.

Faults are injected per request by giving an adapter a session whose default headers
carry ``Sandbox-Fault``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiohttp

from psp.sandbox import SandboxState
from psp.sandbox_adapter import SandboxAdapter

API_KEY = "sk_test_alpha"
WEBHOOK_SECRET = "whsec_test_alpha"
PSP_NAME = "alpha"


@dataclass
class Sandbox:
    """A running sandbox plus helpers to reach it."""

    base_url: str
    state: SandboxState
    http: aiohttp.ClientSession
    _adapters: list[SandboxAdapter] = field(default_factory=list)
    _sessions: list[aiohttp.ClientSession] = field(default_factory=list)

    def adapter(
        self, *, timeout: float = 2.0, fault: str | None = None, api_key: str = API_KEY
    ) -> SandboxAdapter:
        """An adapter for this sandbox; ``fault`` is sent as ``Sandbox-Fault`` on every call."""
        session = None
        if fault is not None:
            session = aiohttp.ClientSession(headers={"Sandbox-Fault": fault})
            self._sessions.append(session)
        adapter = SandboxAdapter(PSP_NAME, self.base_url, api_key, timeout, session=session)
        self._adapters.append(adapter)
        return adapter

    async def charges(self) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.base_url}/sandbox/charges") as resp:
            assert resp.status == 200
            body: list[dict[str, Any]] = await resp.json()
            return body

    async def post(
        self,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        key: str | None = None,
        fault: str | None = None,
        api_key: str = API_KEY,
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Raw authenticated POST; returns (status, JSON body, headers)."""
        headers = {"Authorization": f"Bearer {api_key}"}
        if key is not None:
            headers["Idempotency-Key"] = key
        if fault is not None:
            headers["Sandbox-Fault"] = fault
        async with self.http.post(self.base_url + path, json=body, headers=headers) as resp:
            return resp.status, await resp.json(), dict(resp.headers)

    async def get(self, path: str) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with self.http.get(self.base_url + path, headers=headers) as resp:
            return resp.status, await resp.json()

    async def aclose(self) -> None:
        for adapter in self._adapters:
            await adapter.close()
        for session in self._sessions:
            await session.close()
