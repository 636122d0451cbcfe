"""A Stripe-like PSP sandbox served over HTTP, for tests, the dev stack and load tests.

Run one with ``python -m psp.sandbox --name alpha --port 18081 --api-key sk_test_alpha``;
build one in-process with :func:`create_app`. See :mod:`psp.sandbox.app` for the API.
"""

from psp.sandbox.app import DEFAULT_TIMEOUT_HOLD_S, SANDBOX_STATE, create_app
from psp.sandbox.server import main, serve
from psp.sandbox.state import BANK_TOKENS, TOKENS, SandboxState
from psp.sandbox.webhooks import WebhookDispatcher

__all__ = [
    "BANK_TOKENS",
    "DEFAULT_TIMEOUT_HOLD_S",
    "SANDBOX_STATE",
    "TOKENS",
    "WebhookDispatcher",
    "SandboxState",
    "create_app",
    "main",
    "serve",
]
