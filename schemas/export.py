"""JSON Schema export of the wire contract, for producers in other languages."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.commands import (
    AuthorizePayment,
    CapturePayment,
    CreatePayout,
    RefundPayment,
    VoidPayment,
)
from schemas.events import PaymentEvent

MODELS: dict[str, type[BaseModel]] = {
    "authorize_payment": AuthorizePayment,
    "capture_payment": CapturePayment,
    "void_payment": VoidPayment,
    "refund_payment": RefundPayment,
    "create_payout": CreatePayout,
    "payment_event": PaymentEvent,
}


def export_json_schemas(folder: Path) -> list[Path]:
    """Write one ``<name>.schema.json`` per command and event model; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in MODELS.items():
        schema = model.model_json_schema(mode="validation")
        schema["$id"] = f"https://paystream.dev/schemas/v1/{name}.schema.json"
        path = folder / f"{name}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
