"""docker-compose.yml, the Prometheus config and the Grafana provisioning agree with the code.

* every metric a dashboard query names is one the workers export (``observability.metrics`` in
  prometheus-client's default registry, which ``/metrics`` serves);
* the dashboard shows what the issue asks for, through the provisioned datasource;
* every file compose mounts exists, Grafana's provisioning points where compose mounts the
  dashboards, Prometheus scrapes the worker's ``/metrics``;
* compose runs the services the README names, one PSP sandbox per configured PSP (reachable
  with the worker's settings), commands the CLI and the sandbox accept, and the Dockerfile
  copies every package.

Static checks only (no Docker needed). ``tests/ops/test_docs.py`` keeps its own fixed list
of service names; the README check here reads the names from the README itself.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase
from typer.testing import CliRunner

from config.settings import Settings
from observability import metrics
from ops.cli import app as cli_app
from psp.sandbox.server import _parser as sandbox_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
SANDBOX_ENTRYPOINT = ["python", "-m", "psp.sandbox"]


# ----------------------------------------------------------------------------- loading
@cache
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def services() -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"]
    return found


def dashboards() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, json.loads(path.read_text())) for path in sorted(DASHBOARDS.glob("*.json"))]


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL expression) of every query target."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if "expr" in target:
                yield panel.get("title", "?"), target["expr"]


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of a service's bind mounts (``./x:/y[:ro]``)."""
    mounts: list[tuple[Path, str]] = []
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append(((ROOT / source).resolve(), target))
    return mounts


def container_path(service: str, host_path: Path) -> str:
    """Where ``host_path`` (a mounted file or directory, or inside one) is in the container."""
    for source, target in bind_mounts(services()[service]):
        if host_path.resolve() == source:
            return target
        if source in host_path.resolve().parents:
            return target + "/" + host_path.resolve().relative_to(source).as_posix()
    raise AssertionError(f"{host_path} is not mounted into {service}")


def worker_env() -> dict[str, str]:
    env: dict[str, Any] = services()["worker"]["environment"]
    return {key: str(value) for key, value in env.items()}


# -------------------------------------------------------------------- exported metrics
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
}


def exported_samples() -> set[str]:
    """Sample names ``/metrics`` can contain: the default registry (with ``observability.metrics``
    imported), expanded by metric type, since a labelled metric has no samples until its
    first label set is used."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def samples_of(metric: MetricWrapperBase) -> set[str]:
    """Sample names of one metric object."""
    names: set[str] = set()
    for family in metric.describe():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names


# ---------------------------------------------------------------- PromQL metric names
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-z]+", re.IGNORECASE)
_IDENTIFIER = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left",
     "group_right", "offset", "inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, labels, keywords)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    names: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("paystream_consumer_lag", {"paystream_consumer_lag"}),
        (
            'histogram_quantile(0.99, sum by (le, psp) (rate(paystream_psp_request_duration_'
            'seconds_bucket{psp=~"alpha|beta", operation!="x"}[$__rate_interval])))',
            {"paystream_psp_request_duration_seconds_bucket"},
        ),
        ("max(abs(paystream_ledger_imbalance_minor_units)) or vector(0)",
         {"paystream_ledger_imbalance_minor_units"}),
        ("sum(rate(a_total[5m])) / on (job) group_left sum(rate(b_total[5m] offset 1h))",
         {"a_total", "b_total"}),
        ("count(max by (psp) (paystream_psp_breaker_state) == 2) > bool 0",
         {"paystream_psp_breaker_state"}),
        ('{__name__="quoted_only"}', set()),
        ("time() - 1e3", set()),
    ],
)
def test_metric_name_extractor(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


def test_an_unexported_name_is_caught() -> None:
    exported = exported_samples()
    assert "paystream_commands_total" in exported
    assert "paystream_commands" not in exported  # a counter's samples end in _total
    assert "paystream_end_to_end_latency_seconds_bucket" in exported
    assert "paystream_consumer_lag" in exported
    bad = "sum(rate(paystream_commands[5m])) + rate(paystream_nope_total[5m])"
    assert metric_names(bad) - exported == {"paystream_commands", "paystream_nope_total"}


# ------------------------------------------------------------------------- dashboard
def test_there_is_a_dashboard_with_queries() -> None:
    found = dashboards()
    assert [path.name for path, _ in found] == ["paystream.json"]
    assert len(list(queries(found[0][1]))) >= 20


def test_every_dashboard_query_names_metrics_the_code_exports() -> None:
    exported = exported_samples()
    problems: list[str] = []
    for path, dashboard in dashboards():
        for title, expr in queries(dashboard):
            names = metric_names(expr)
            if not names:
                problems.append(f"{path.name} / {title}: no metric in {expr!r}")
            for name in sorted(names - exported):
                problems.append(f"{path.name} / {title}: {name} is not exported")
    assert problems == []


# What the issue asks the dashboard to show, as the metric objects that carry it.
REQUIRED_ON_DASHBOARD: dict[str, list[MetricWrapperBase]] = {
    "throughput and errors per stage": [metrics.COMMANDS, metrics.EVENTS_APPLIED,
                                        metrics.DLQ_RECORDS],
    "end-to-end latency": [metrics.END_TO_END_LATENCY],
    "PSP latency": [metrics.PSP_LATENCY],
    "breaker state": [metrics.BREAKER_STATE],
    "retries by tier": [metrics.RETRIES],
    "DLQ rate": [metrics.DLQ_RECORDS],
    "pending verification": [metrics.PENDING_VERIFICATION],
    "consumer lag": [metrics.CONSUMER_LAG],
    "ledger imbalance": [metrics.LEDGER_IMBALANCE],
    "webhook deliveries, failures, backlog": [metrics.WEBHOOK_DELIVERIES,
                                              metrics.WEBHOOK_BACKLOG],
    "PSP webhooks received": [metrics.PSP_WEBHOOKS],
}


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    shown: set[str] = set()
    for _, dashboard in dashboards():
        for _, expr in queries(dashboard):
            shown |= metric_names(expr)
    missing = [
        f"{topic}: {sorted(samples_of(metric))}"
        for topic, required in REQUIRED_ON_DASHBOARD.items()
        for metric in required
        if not samples_of(metric) & shown
    ]
    assert missing == []


def provisioned_datasources() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for path in sorted((PROVISIONING / "datasources").glob("*.y*ml")):
        found += yaml.safe_load(path.read_text()).get("datasources", [])
    return found


def test_dashboard_panels_use_the_provisioned_prometheus() -> None:
    uids = {ds["uid"] for ds in provisioned_datasources() if ds["type"] == "prometheus"}
    assert uids, "no Prometheus datasource provisioned"
    for path, dashboard in dashboards():
        assert dashboard.get("uid"), f"{path.name}: a fixed uid keeps links stable"
        ids = [panel["id"] for panel in panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in panels(dashboard):
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{panel['title']}: wider than the grid"
            if panel["type"] == "row":
                continue
            assert panel.get("targets"), f"{panel['title']}: no query"
            for item in [panel, *panel["targets"]]:
                datasource = item.get("datasource", {})
                assert datasource.get("uid") in uids, f"{panel['title']}: {datasource}"


# ---------------------------------------------------------------------- compose files
def test_every_bind_mount_of_compose_exists() -> None:
    mounts = [(name, mount) for name, svc in services().items() for mount in bind_mounts(svc)]
    assert mounts, "expected config files mounted into prometheus and grafana"
    missing = [f"{name}: {source}" for name, (source, _) in mounts if not source.exists()]
    assert missing == []


def test_grafana_loads_the_provisioning_and_the_dashboards_from_the_repo() -> None:
    for kind in ("datasources", "dashboards"):
        files = sorted((PROVISIONING / kind).glob("*.y*ml"))
        assert files, f"no {kind} provisioning file"
        for path in files:
            target = f"/etc/grafana/provisioning/{kind}/{path.name}"
            assert container_path("grafana", path) == target
    providers = [
        provider
        for path in sorted((PROVISIONING / "dashboards").glob("*.y*ml"))
        for provider in yaml.safe_load(path.read_text())["providers"]
    ]
    paths = {provider["options"]["path"] for provider in providers}
    for path, _ in dashboards():
        assert container_path("grafana", path).rsplit("/", 1)[0] in paths
    home = services()["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home is not None:
        assert home == container_path("grafana", DASHBOARDS / "paystream.json")


def _port_of(service: str) -> int:
    """The container port a service listens on (its first published port)."""
    published = str(services()[service]["ports"][0])
    return int(published.rsplit(":", 1)[-1])


def test_grafana_datasource_points_at_the_compose_prometheus() -> None:
    for datasource in provisioned_datasources():
        url = urlsplit(datasource["url"])
        assert url.hostname in services(), datasource["url"]
        assert "prometheus" in str(services()[url.hostname]["image"])
        assert url.port == _port_of(url.hostname)


def test_prometheus_scrapes_the_worker_metrics_endpoint() -> None:
    prometheus = services()["prometheus"]
    config_path = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    assert container_path("prometheus", config_path) == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    targets: set[tuple[str, int]] = set()
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                targets.add((host, int(port)))
        for dns in job.get("dns_sd_configs", []):
            targets.update((name, int(dns["port"])) for name in dns["names"])
    assert ("worker", int(worker_env()["PAYSTREAM_WEB_PORT"])) in targets
    assert services()["worker"]["command"] == ["worker"]
    assert "worker" in prometheus.get("depends_on", [])


# ----------------------------------------------------------------- services and images
README_SERVICES = {
    "Apache Kafka": ["kafka"],
    "PostgreSQL": ["postgres"],
    "Redis": ["redis"],
    "Prometheus": ["prometheus"],
    "Grafana": ["grafana"],
    "PSP sandbox": [f"psp-{psp.name}" for psp in Settings().psp_endpoints()],
    "worker": ["worker"],
}


def readme_compose_paragraph() -> str:
    """The README paragraph that says what ``docker compose up`` runs."""
    readme = (ROOT / "README.md").read_text()
    for paragraph in readme.split("\n\n"):
        if "docker compose up" in paragraph and " runs " in paragraph:
            return " ".join(paragraph.split())
    raise AssertionError("the README does not say what `docker compose up` runs")


def test_compose_runs_every_service_the_readme_names() -> None:
    paragraph = readme_compose_paragraph()
    named = [name for name in README_SERVICES if name in paragraph]
    assert len(named) >= 6, f"README paragraph not understood: {paragraph!r}"
    expected = {service for name in named for service in README_SERVICES[name]}
    # Services the README names in backticks (e.g. `topics-init`).
    expected |= {
        word for word in re.findall(r"`([a-z][a-z0-9-]*)`", paragraph) if "-" in word
    }
    assert expected - set(services()) == set()
    for service in services().values():
        for dependency in service.get("depends_on", []):
            assert dependency in services()


def test_one_sandbox_per_psp_reachable_with_the_worker_settings() -> None:
    env = worker_env()
    for psp in Settings().psp_endpoints():
        prefix = f"PAYSTREAM_PSP_{psp.name.upper()}"
        url = urlsplit(env[f"{prefix}_URL"])
        service = services()[f"psp-{psp.name}"]
        assert url.hostname == f"psp-{psp.name}"
        assert service["entrypoint"] == SANDBOX_ENTRYPOINT
        args = sandbox_parser().parse_args([str(arg) for arg in service["command"]])
        assert args.name == psp.name
        assert args.host == "0.0.0.0"  # noqa: S104 - reachable from the worker's container
        assert args.port == url.port
        assert args.api_key == env[f"{prefix}_API_KEY"]
        assert args.webhook_secret == env[f"{prefix}_WEBHOOK_SECRET"]
        if args.webhook_url is not None:  # PSP webhooks go to the worker's ingress
            hook = urlsplit(args.webhook_url)
            assert (hook.hostname, hook.port) == ("worker", int(env["PAYSTREAM_WEB_PORT"]))
            assert psp.name in hook.path
        assert f"psp-{psp.name}" in services()["worker"]["depends_on"]


def test_compose_commands_are_cli_commands() -> None:
    runner = CliRunner()
    built = {name: svc for name, svc in services().items() if "build" in svc}
    assert {"worker", "topics-init"} <= set(built)
    for name, service in built.items():
        if service.get("entrypoint") == SANDBOX_ENTRYPOINT:
            continue  # checked with the sandbox's own parser above
        assert "entrypoint" not in service, name
        result = runner.invoke(cli_app, [*service["command"], "--help"])
        assert result.exit_code == 0, f"{name}: paystream {service['command']}: {result.output}"


def test_the_worker_listens_where_compose_publishes_it() -> None:
    env = worker_env()
    assert env["PAYSTREAM_WEB_HOST"] == "0.0.0.0"  # noqa: S104 - published port
    assert _port_of("worker") == int(env["PAYSTREAM_WEB_PORT"])
    for key in ("PAYSTREAM_KAFKA_BOOTSTRAP_SERVERS", "PAYSTREAM_PG_DSN", "PAYSTREAM_REDIS_URL"):
        assert env[key] != "embedded", key
    assert worker_env() == {
        key: str(value) for key, value in services()["topics-init"]["environment"].items()
    }


def test_kafka_is_kraft_single_node_with_transactions() -> None:
    env = services()["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "1@kafka:" in env["KAFKA_CONTROLLER_QUORUM_VOTERS"]
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
        "KAFKA_MIN_INSYNC_REPLICAS",
        "KAFKA_DEFAULT_REPLICATION_FACTOR",
    ):
        assert env[key] == 1, key
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    advertised = env["KAFKA_ADVERTISED_LISTENERS"]
    for server in worker_env()["PAYSTREAM_KAFKA_BOOTSTRAP_SERVERS"].split(","):
        assert f"//{server}" in advertised, server


def test_dockerfile_copies_every_package() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert all(svc.get("build") in (None, ".") for svc in services().values())
    copied = set(re.findall(r"^COPY (\S+) \1\s*$", dockerfile, re.MULTILINE))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    includes = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*").rstrip(".") for pattern in includes}
    present = {name for name in packages if (ROOT / name / "__init__.py").exists()}
    assert present, includes
    assert present - copied == set()
    assert re.search(r"^ENTRYPOINT \[\"paystream\"\]", dockerfile, re.MULTILINE)


# ------------------------------------------------------------------------- runbook
RUNBOOK = ROOT / "docs" / "operator-runbook.md"


def test_the_runbook_names_real_panels_and_metrics() -> None:
    text = RUNBOOK.read_text()
    titles = {panel.get("title") for _, dashboard in dashboards() for panel in panels(dashboard)}
    cited = [
        title
        for line in re.findall(r"Dashboard panels: (.*)", text)
        for title in re.findall(r'"([^"]+)"', line)
    ]
    assert len(cited) >= 8
    assert [title for title in cited if title not in titles] == []
    exported = exported_samples()
    alerts = re.findall(r"```promql\n(.*?)```", text, re.DOTALL)
    exprs = [line for block in alerts for line in block.splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(exprs) >= 4
    for expr in exprs:
        assert metric_names(expr), expr
        assert metric_names(expr) <= exported, expr
    histograms = {f.name for f in REGISTRY.collect() if f.type in ("histogram", "summary")}
    named = set(re.findall(r"`(paystream_[a-z_]+)", text))
    assert len(named) >= 15
    assert named - exported - histograms == set()
    for section in ("DLQ spike", "PSP outage", "Growing lag", "Ledger imbalance",
                    "How to reset offsets safely", "How to replay"):
        assert f"\n## {section}\n" in text, section
    for link in ("operator-offsets.md", "operator-dlq.md"):
        assert f"]({link}" in text and (ROOT / "docs" / link).exists()
