"""The docs keep up with the code: every setting documented, compose has what README names."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

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


def _import_contract() -> dict[str, Any]:
    contract: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"][
        "importlinter"
    ]
    return contract


def test_every_package_is_in_the_import_contract() -> None:
    """A new top-level package cannot dodge the layers: lint-imports must know it."""
    contract = _import_contract()
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert set(contract["root_packages"]) == packages
    (layers,) = [c["layers"] for c in contract["contracts"] if c["type"] == "layers"]
    layered = {name.strip() for layer in layers for name in layer.split("|")}
    assert layered == packages


def test_architecture_doc_shows_the_enforced_layers() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    (layers,) = [c["layers"] for c in _import_contract()["contracts"] if c["type"] == "layers"]
    diagram = doc.split("```")[3]  # the second code block: the layer diagram
    drawn = [re.split(r"\s{2,}", line.strip())[0] for line in diagram.strip().splitlines()]
    assert [name for name in drawn if name != "|"] == layers
    for package in _import_contract()["root_packages"]:
        assert f"`{package}/`" in doc
