"""Structured JSON logs (stdlib logging) for workers; never a card number."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from schemas.pan import scrub_pans


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub_pans(record.getMessage()),
        }
        for key in ("payment_id", "merchant_id", "attempt_id"):
            value = getattr(record, key, None)
            if value is not None:
                payload[key] = scrub_pans(str(value))
        if record.exc_info:
            payload["exc"] = scrub_pans(self.formatException(record.exc_info))
        return json.dumps(payload)


_STANDARD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _scrubbed(value: object) -> object:
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, bytes):
        text = value.decode("utf-8", errors="replace")
    else:
        text = value if isinstance(value, str) else str(value)
    clean = scrub_pans(text)
    return value if clean == text and not isinstance(value, bytes) else clean


class PanScrubFilter(logging.Filter):
    """Scrubs card numbers from a record before any formatter sees it: the message with its
    arguments, every ``extra`` field, and the exception text. Installed on the worker's log
    handler, so every logger (ours, Faust's, aiokafka's) goes through it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub_pans(record.getMessage())
        record.args = None
        for name, value in list(vars(record).items()):
            if name not in _STANDARD_ATTRIBUTES:
                setattr(record, name, _scrubbed(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub_pans(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub_pans(record.stack_info)
        return True


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(PanScrubFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
