"""Running a sandbox PSP as a process: :func:`serve` (async) and :func:`main` (CLI).

``main`` stops cleanly on SIGINT or SIGTERM (held ``timeout`` answers are released).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence

from aiohttp import web

from psp.sandbox.app import DEFAULT_TIMEOUT_HOLD_S, create_app

log = logging.getLogger(__name__)


async def serve(
    name: str,
    host: str,
    port: int,
    *,
    api_key: str,
    webhook_secret: str,
    latency_ms: float = 0.0,
    timeout_hold_s: float = DEFAULT_TIMEOUT_HOLD_S,
    seed: int | None = None,
    webhook_url: str | None = None,
    fee_bps: int = 290,
    fee_fixed: int = 30,
    dispute_fee: int = 1500,
    async_delay_ms: float = 0.0,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve one sandbox PSP on ``host:port`` until cancelled or ``stop`` is set.

    ``ready`` is set once the socket listens. Other options: see :func:`create_app`.
    """
    app = create_app(
        name,
        api_key,
        webhook_secret,
        latency_ms,
        timeout_hold_s=timeout_hold_s,
        seed=seed,
        webhook_url=webhook_url,
        fee_bps=fee_bps,
        fee_fixed=fee_fixed,
        dispute_fee=dispute_fee,
        async_delay_ms=async_delay_ms,
    )
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        log.info("sandbox PSP %s listening on http://%s:%s", name, host, port)
        if ready is not None:
            ready.set()
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()


async def _serve_until_signalled(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await serve(
        args.name,
        args.host,
        args.port,
        api_key=args.api_key,
        webhook_secret=args.webhook_secret or f"whsec_test_{args.name}",
        latency_ms=args.latency_ms,
        timeout_hold_s=args.timeout_hold_s,
        seed=args.seed,
        webhook_url=args.webhook_url,
        fee_bps=args.fee_bps,
        fee_fixed=args.fee_fixed,
        dispute_fee=args.dispute_fee,
        async_delay_ms=args.async_delay_ms,
        stop=stop,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m psp.sandbox", description=__doc__)
    parser.add_argument("--name", required=True, help="PSP name, e.g. alpha")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key", required=True, help="accepted bearer token")
    parser.add_argument("--webhook-secret", default=None, help="default: whsec_test_<name>")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--timeout-hold-s", type=float, default=DEFAULT_TIMEOUT_HOLD_S)
    parser.add_argument("--seed", type=int, default=None, help="seed for global fault rates")
    parser.add_argument(
        "--webhook-url", default=None, help="where signed webhook events are POSTed (default: none)"
    )
    parser.add_argument("--fee-bps", type=int, default=290, help="charge fee, basis points")
    parser.add_argument("--fee-fixed", type=int, default=30, help="charge fee, minor units")
    parser.add_argument("--dispute-fee", type=int, default=1500, help="minor units")
    parser.add_argument(
        "--async-delay-ms",
        type=float,
        default=0.0,
        help="delay of disputes, failed-refund webhooks and payout results",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_until_signalled(args))
    return 0
