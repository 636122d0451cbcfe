"""The ``paystream`` command line: dev stack, worker, topics, schemas, send, ledger, demo."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from config.settings import EMBEDDED, Settings, get_settings
from ops.dlq_cli import dlq_app
from ops.offsets_cli import offsets_app
from ops.webhooks_cli import webhooks_app

app = typer.Typer(help="paystream: Kafka-native payment processing.", no_args_is_help=True)
topics_app = typer.Typer(help="Create and verify the topic catalog.", no_args_is_help=True)
schemas_app = typer.Typer(help="JSON Schemas of the wire contract.", no_args_is_help=True)
ledger_app = typer.Typer(help="Ledger checks and reports.", no_args_is_help=True)
send_app = typer.Typer(help="Publish commands (a producer for testing).", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
app.add_typer(schemas_app, name="schemas")
app.add_typer(ledger_app, name="ledger")
app.add_typer(send_app, name="send")
app.add_typer(offsets_app, name="offsets")
app.add_typer(dlq_app, name="dlq")
app.add_typer(webhooks_app, name="webhooks")
console = Console()


# ------------------------------------------------------------------------- stack
@app.command()
def worker() -> None:
    """Run a Faust worker (intake/executor and sink agents, web views)."""
    import faust

    from agents.app import create_app
    from ops.logs import configure_logging

    configure_logging()
    settings = get_settings()
    _refuse_unless_copartitioned(settings)
    faust_app = create_app(settings)
    faust.Worker(faust_app, loglevel="info", override_logging=False).execute_from_commandline()


def _refuse_unless_copartitioned(settings: Settings) -> None:
    """Exit (code 78, configuration error) when the co-partitioned topics disagree."""
    import logging

    from topics.admin import TopicProblem, check_copartitioned

    settings.require_real()
    try:
        check_copartitioned(settings)
    except TopicProblem as exc:
        message = f"refusing to start the worker: {exc}"
        logging.getLogger("paystream.worker").critical(message)
        Console(stderr=True).print(f"[red]{message}[/]", soft_wrap=True, highlight=False)
        raise typer.Exit(78) from exc


@app.command()
def dev() -> None:
    """Start the embedded stack and keep it up until Ctrl-C."""
    from ops.stack import EmbeddedStack

    stack = EmbeddedStack(get_settings())
    env = stack.start(log=console.print)
    console.print("[bold green]paystream dev stack is up.[/] In another shell:")
    for name, value in env.items():
        console.print(f"  export {name}='{value}'", soft_wrap=True, highlight=False)
    console.print("Ctrl-C stops everything.")
    stopping = False

    def _stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    # Explicit handlers: a shell may start a background job with SIGINT ignored.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stopping:
            if stack.worker is not None and stack.worker.poll() is not None:
                console.print(f"[red]worker exited ({stack.worker.returncode}); restarting[/]")
                stack.start_worker(log=console.print)
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping...")
        stack.stop(log=console.print)


@app.command()
def demo(
    payments: Annotated[int, typer.Option(help="How many payments to publish.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the demo mix.")] = 7,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for settlement.")] = 180.0,
) -> None:
    """Start the embedded stack, run a demo checkout load through it, summarise, stop."""
    from ops.demo import new_run_id, publish_demo_load, wait_and_summarise
    from ops.stack import EmbeddedStack
    from paystream.client import PaymentsClient

    stack = EmbeddedStack(get_settings())
    ok = False
    try:
        with console.status("starting the embedded stack"):
            stack.start(log=console.print)
        settings = stack.concrete_settings()
        run_id = new_run_id()
        console.print(f"publishing {payments} demo payments (run {run_id})")
        client = PaymentsClient(settings.kafka_bootstrap_servers)
        publish_demo_load(client, run_id, payments, seed)
        del client  # flushed; close its connections before the broker stops
        result = asyncio.run(wait_and_summarise(settings, run_id, payments, timeout, console))
        ok = result.settled and result.ledger_ok
    finally:
        with console.status("stopping the stack"):
            stack.stop(log=lambda _msg: None)
    raise typer.Exit(0 if ok else 1)


@app.command("psp-sandbox")
def psp_sandbox(
    name: Annotated[str, typer.Option(help="PSP name, e.g. alpha.")] = "alpha",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 18081,
    api_key: Annotated[str, typer.Option(envvar="PAYSTREAM_PSP_ALPHA_API_KEY")] = "sk_test_alpha",
    latency_ms: Annotated[float, typer.Option(help="Added latency per request.")] = 5.0,
) -> None:
    """Run a PSP sandbox (Stripe-like test PSP) in the foreground."""
    from psp.sandbox.server import main as sandbox_main

    raise typer.Exit(
        sandbox_main(
            ["--name", name, "--port", str(port), "--api-key", api_key,
             "--latency-ms", str(latency_ms)]
        )
    )


@app.command("settings")
def settings_command() -> None:
    """Print every setting (environment variable, default, meaning) as a markdown table."""
    from config.settings import settings_table

    print(settings_table())  # noqa: T201 - plain output for piping into docs


# ------------------------------------------------------------------------- topics
@topics_app.command("create")
def topics_create() -> None:
    """Create every topic of the catalog that is missing, then verify all."""
    from topics.admin import create_topics

    for name, outcome in create_topics(get_settings().with_local_broker()).items():
        console.print(f"{name}: {outcome}")


@topics_app.command("verify")
def topics_verify() -> None:
    """Check that every catalog topic exists with the right partition count."""
    from topics.admin import TopicProblem, verify_topics

    try:
        names = verify_topics(get_settings().with_local_broker())
    except TopicProblem as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from exc
    console.print(f"{len(names)} topics OK")


@topics_app.command("list")
def topics_list() -> None:
    """Print the catalog."""
    from topics.catalog import catalog

    for spec in catalog(get_settings()):
        console.print(
            f"{spec.name}: {spec.partitions} partitions, key {spec.key}, "
            f"{spec.cleanup_policy} - {spec.description}"
        )


# ------------------------------------------------------------------------- schemas
@schemas_app.command("export")
def schemas_export(
    out: Annotated[Path, typer.Option(help="Folder for the JSON Schema files.")] = Path(
        "schemas/json"
    ),
) -> None:
    """Write JSON Schema files for every command and event."""
    from schemas.export import export_json_schemas

    for path in export_json_schemas(out):
        console.print(f"wrote {path}")


# ------------------------------------------------------------------------- send
@send_app.command("authorize")
def send_authorize(
    merchant: Annotated[str, typer.Option()],
    payment: Annotated[str, typer.Option()],
    amount: Annotated[int, typer.Option(help="Minor units (cents for USD).")],
    currency: Annotated[str, typer.Option()] = "USD",
    token: Annotated[str, typer.Option(help="PSP payment-method token.")] = "tok_visa",  # noqa: S107
    manual: Annotated[bool, typer.Option(help="Manual capture.")] = False,
    idempotency_key: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Publish an authorize_payment command."""
    from paystream.client import PaymentsClient

    with PaymentsClient(get_settings().with_local_broker().kafka_bootstrap_servers) as client:
        command = client.authorize(
            merchant_id=merchant,
            payment_id=payment,
            idempotency_key=idempotency_key or f"{payment}-authorize",
            amount=amount,
            currency=currency,
            payment_method=token,
            capture_method="manual" if manual else "automatic",
        )
    console.print_json(command.model_dump_json())


@send_app.command("capture")
def send_capture(
    merchant: Annotated[str, typer.Option()],
    payment: Annotated[str, typer.Option()],
    amount: Annotated[int | None, typer.Option(help="Minor units; default: the rest.")] = None,
    idempotency_key: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Publish a capture_payment command."""
    from paystream.client import PaymentsClient

    with PaymentsClient(get_settings().with_local_broker().kafka_bootstrap_servers) as client:
        command = client.capture(
            merchant_id=merchant,
            payment_id=payment,
            idempotency_key=idempotency_key or f"{payment}-capture",
            amount=amount,
        )
    console.print_json(command.model_dump_json())


# ------------------------------------------------------------------------- status
@app.command()
def status(
    payment_id: Annotated[str | None, typer.Argument(help="The payment to show.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the view as JSON.")] = False,
    live: Annotated[
        bool, typer.Option("--live", help="Only ask the worker's status view (HTTP).")
    ] = False,
    stuck: Annotated[
        bool,
        typer.Option("--stuck", help="List payments pending verification for too long "
                     "(exit 1 if there are any)."),
    ] = False,
    older_than: Annotated[
        float | None,
        typer.Option("--older-than", help="With --stuck: age in seconds "
                     "(default PAYSTREAM_STUCK_AFTER_SECONDS)."),
    ] = None,
) -> None:
    """A payment's events, PSP attempts, ledger entries and webhook deliveries; or, with
    --stuck, every payment whose PSP outcome is still unknown after the stuck age."""
    settings = get_settings()
    if stuck:
        _print_stuck(settings, older_than, as_json)
        return
    if payment_id is None:
        console.print("[red]give a PAYMENT_ID, or --stuck[/]")
        raise typer.Exit(2)
    if live:
        url = f"http://{settings.web_host}:{settings.web_port}/v1/payments/{payment_id}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our worker
                console.print_json(response.read().decode())
        except urllib.error.HTTPError as exc:
            console.print(f"[red]{exc.code}[/] {exc.read().decode()}")
            raise typer.Exit(1) from exc
        return
    from ops.payment_view import PaymentViewError, gather_payment_view, render_payment_view

    try:
        view = asyncio.run(gather_payment_view(settings.with_local_broker(), payment_id))
    except PaymentViewError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from exc
    if as_json:
        console.print_json(view.model_dump_json())
    else:
        render_payment_view(view, console)
    if not view.found:
        raise typer.Exit(1)


def _print_stuck(settings: Settings, older_than: float | None, as_json: bool) -> None:
    import asyncpg

    from sinks import status as read_model

    age = settings.stuck_after_seconds if older_than is None else older_than

    async def fetch() -> list[dict[str, object]]:
        conn = await asyncpg.connect(settings.pg_dsn)
        try:
            return await read_model.stuck_payments(conn, age)
        finally:
            await conn.close()

    rows = asyncio.run(fetch())
    if as_json:
        console.print_json(json.dumps({"older_than_seconds": age, "payments": rows}))
    elif not rows:
        console.print(f"no payment pending verification for over {age:.0f}s")
    else:
        table = Table("payment", "merchant", "amount", "psp", "since", "reason",
                      title=f"{len(rows)} payments pending verification for over {age:.0f}s")
        for row in rows:
            table.add_row(str(row["payment_id"]), str(row["merchant_id"]),
                          f"{row['amount']} {row['currency']}", str(row["psp"]),
                          str(row["updated_at"]), str(row["reason"] or ""))
        console.print(table)
    if rows:
        raise typer.Exit(1)


# ------------------------------------------------------------------------- ledger
@ledger_app.command("verify")
def ledger_verify() -> None:
    """Check the ledger invariants per currency; exit 1 on any violation."""
    import asyncpg

    from sinks import ledger

    async def run() -> ledger.LedgerReport:
        conn = await asyncpg.connect(get_settings().pg_dsn)
        try:
            return await ledger.verify(conn)
        finally:
            await conn.close()

    report = asyncio.run(run())
    console.print_json(json.dumps(report.model_dump(mode="json")))
    if not report.ok:
        raise typer.Exit(1)
    console.print("ledger balanced: yes")


async def _with_db(action: Any) -> Any:
    import asyncpg

    conn = await asyncpg.connect(get_settings().pg_dsn)
    try:
        return await action(conn)
    finally:
        await conn.close()


@ledger_app.command("balance")
def ledger_balance(merchant: Annotated[str, typer.Option(help="Merchant id.")]) -> None:
    """A merchant's available, pending (held) and receivable balances per currency."""
    from rich.table import Table

    from schemas.money import Money
    from sinks import ledger

    balances = asyncio.run(_with_db(lambda conn: ledger.merchant_balances(conn, merchant)))
    table = Table(title=f"balances of {merchant}")
    for column in ("currency", "available", "pending", "receivable"):
        table.add_column(column, justify="right")
    for currency, balance in sorted(balances.items()):
        table.add_row(
            currency,
            *(str(Money.of(value, currency)) if value >= 0 else f"-{Money.of(-value, currency)}"
              for value in (balance.available, balance.pending, balance.receivable)),
        )
    console.print(table)


@ledger_app.command("statement")
def ledger_statement(
    merchant: Annotated[str, typer.Option(help="Merchant id.")],
    out: Annotated[Path | None, typer.Option(help="CSV file; default: standard output.")] = None,
) -> None:
    """Export a merchant's ledger statement as CSV (exact minor units, running balances)."""
    from sinks import ledger

    rows = asyncio.run(_with_db(lambda conn: ledger.merchant_statement_rows(conn, merchant)))
    text = ledger.statement_csv(rows)
    if out is None:
        print(text, end="")  # noqa: T201 - CSV on stdout
    else:
        out.write_text(text)
        console.print(f"wrote {len(rows)} rows to {out}")


bench_app = typer.Typer(help="Benchmarks (numbers, never pass/fail).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("ledger")
def bench_ledger_command(
    postings: Annotated[int, typer.Option(help="Postings per scenario.")] = 20_000,
    batch: Annotated[int, typer.Option(help="Postings per database round trip.")] = 1_000,
    dsn: Annotated[
        str | None, typer.Option(help="Server to use (a throwaway database is created).")
    ] = None,
) -> None:
    """Ledger postings/s, spread over many merchants and on one hot merchant account."""
    from ops.bench import bench_ledger

    server = dsn or get_settings().pg_dsn
    if server == EMBEDDED:
        console.print("[red]set PAYSTREAM_PG_DSN or --dsn to a PostgreSQL server[/]")
        raise typer.Exit(2)
    console.print(bench_ledger(server, postings, batch))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
