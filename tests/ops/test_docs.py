"""The docs keep up with the code: every setting documented, compose has what README names."""

from __future__ import annotations

from pathlib import Path

import yaml

from config.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [
        f"PAYSTREAM_{name.upper()}"
        for name in Settings.model_fields
        if f"`PAYSTREAM_{name.upper()}`" not in readme
    ]
    assert missing == []


def test_readme_shows_the_two_commands_first() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.index("make run") < readme.index("## Architecture")
    assert "make test" in readme


def test_compose_runs_the_services_the_readme_names() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = set(compose["services"])
    named = {"kafka", "postgres", "redis", "prometheus", "grafana", "worker", "psp-alpha"}
    assert named <= services
    kafka_env = compose["services"]["kafka"]["environment"]
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert kafka_env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == 1
    assert kafka_env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
