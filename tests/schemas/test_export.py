"""JSON Schema export: other languages validate commands against these files."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from ops.cli import app


def test_schemas_export_writes_valid_json_schema_per_model(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["schemas", "export", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "authorize_payment.schema.json" in files
    assert "payment_event.schema.json" in files
    schema = json.loads((tmp_path / "authorize_payment.schema.json").read_text())
    assert schema["properties"]["amount"]["type"] == "integer"
    assert {"merchant_id", "idempotency_key", "payment_id", "amount", "currency"} <= set(
        schema["required"]
    )
