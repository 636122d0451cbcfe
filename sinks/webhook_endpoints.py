"""Merchant webhook endpoints: add, list, rotate the signing secret, disable, enable.

An endpoint is a URL of a merchant that receives the merchant's events (all of them, or the
``event_types`` it subscribed to), signed with its secret (``whsec_...``, generated here
with :mod:`secrets`; shown once, when the endpoint is added or its secret rotated).

Rotating a secret keeps the old one as ``previous_secret`` until ``now + overlap``
(24 h by default): meanwhile every delivery carries two ``v1=`` signatures, one per secret,
so the merchant can deploy the new secret at any time within the window. Only one previous
secret is kept: rotating again inside the window drops the older one.

Every function takes an asyncpg connection (or anything with the same methods, such as a
pool) and runs one statement.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from pydantic import AwareDatetime, BaseModel, ConfigDict

from schemas.events import EVENT_TYPES

__all__ = [
    "DEFAULT_ROTATION_OVERLAP",
    "SECRET_PREFIX",
    "CreatedEndpoint",
    "EndpointError",
    "MerchantEndpoint",
    "RotatedSecret",
    "add_endpoint",
    "disable_endpoint",
    "enable_endpoint",
    "generate_secret",
    "get_endpoint",
    "list_endpoints",
    "redact_url",
    "rotate_secret",
]

SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
DEFAULT_ROTATION_OVERLAP = timedelta(hours=24)


class EndpointError(ValueError):
    """An invalid endpoint (URL, event types) or an unknown endpoint id."""


class MerchantEndpoint(BaseModel):
    """An endpoint as operators see it (never its secrets)."""

    model_config = ConfigDict(frozen=True)

    id: int
    merchant_id: str
    url: str
    event_types: list[str]
    """Subscribed event types; empty means every event type."""
    enabled: bool
    created_at: AwareDatetime
    previous_secret_expires_at: AwareDatetime | None = None
    """End of the current rotation window (the old secret still signs until then)."""


class CreatedEndpoint(BaseModel):
    """A new endpoint and its secret (shown once)."""

    model_config = ConfigDict(frozen=True)

    endpoint: MerchantEndpoint
    secret: str


class RotatedSecret(BaseModel):
    """The endpoint after a rotation, its new secret, and until when the old one signs too."""

    model_config = ConfigDict(frozen=True)

    endpoint: MerchantEndpoint
    secret: str
    previous_secret_expires_at: AwareDatetime


_COLUMNS = """id, merchant_id, url, event_types, enabled, created_at,
              CASE WHEN previous_secret_expires_at > now()
                   THEN previous_secret_expires_at END AS previous_secret_expires_at"""


def generate_secret() -> str:
    """A fresh signing secret: ``whsec_`` and 32 random bytes (URL-safe base64)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def redact_url(url: str) -> str:
    """``url`` with its password and query values masked (they may be credentials): for
    logs, dead letters and operator tables. ``https://u:pw@h/p?t=x`` -> ``https://u:***@h/p?t=***``."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{host}:{parts.port}" if parts.port is not None else host
    except ValueError:
        return "<invalid url>"
    if parts.username is not None:
        user = parts.username + (":***" if parts.password is not None else "")
        netloc = f"{user}@{netloc}"
    query = "&".join(
        f"{item.partition('=')[0]}=***" if item else item for item in parts.query.split("&")
    ) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _check_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a non-numeric port
    except ValueError as exc:
        raise EndpointError(f"invalid URL {url!r}: {exc}") from exc
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise EndpointError(f"endpoint URL must be http(s)://host/..., not {url!r}")
    return url


def _check_event_types(event_types: Sequence[str] | None) -> list[str]:
    chosen = list(dict.fromkeys(t.strip() for t in event_types or () if t.strip()))
    unknown = [t for t in chosen if t not in EVENT_TYPES]
    if unknown:
        raise EndpointError(
            f"unknown event type(s) {', '.join(unknown)}; known: {', '.join(EVENT_TYPES)}"
        )
    return chosen


def _endpoint(row: Any) -> MerchantEndpoint:
    return MerchantEndpoint(
        id=row["id"],
        merchant_id=row["merchant_id"],
        url=row["url"],
        event_types=list(row["event_types"]),
        enabled=row["enabled"],
        created_at=row["created_at"],
        previous_secret_expires_at=row["previous_secret_expires_at"],
    )


async def add_endpoint(
    conn: asyncpg.Connection,
    merchant_id: str,
    url: str,
    event_types: Sequence[str] | None = None,
) -> CreatedEndpoint:
    """Register ``url`` for ``merchant_id`` (``event_types`` empty or None: every type)."""
    if not merchant_id.strip():
        raise EndpointError("merchant_id must not be empty")
    types = _check_event_types(event_types)
    secret = generate_secret()
    row = await conn.fetchrow(
        f"""
        INSERT INTO merchant_endpoints (merchant_id, url, event_types, secret)
        VALUES ($1, $2, $3::text[], $4)
        RETURNING {_COLUMNS}
        """,  # noqa: S608 (constant column list)
        merchant_id,
        _check_url(url),
        types,
        secret,
    )
    return CreatedEndpoint(endpoint=_endpoint(row), secret=secret)


async def list_endpoints(
    conn: asyncpg.Connection, merchant_id: str | None = None
) -> list[MerchantEndpoint]:
    """Every endpoint (of ``merchant_id`` if given), oldest first."""
    rows = await conn.fetch(
        f"""
        SELECT {_COLUMNS} FROM merchant_endpoints
         WHERE $1::text IS NULL OR merchant_id = $1
         ORDER BY id
        """,  # noqa: S608 (constant column list)
        merchant_id,
    )
    return [_endpoint(row) for row in rows]


async def get_endpoint(conn: asyncpg.Connection, endpoint_id: int) -> MerchantEndpoint:
    """One endpoint; :class:`EndpointError` if there is none with this id."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM merchant_endpoints WHERE id = $1",  # noqa: S608
        endpoint_id,
    )
    if row is None:
        raise EndpointError(f"no webhook endpoint {endpoint_id}")
    return _endpoint(row)


async def rotate_secret(
    conn: asyncpg.Connection,
    endpoint_id: int,
    overlap: timedelta = DEFAULT_ROTATION_OVERLAP,
) -> RotatedSecret:
    """Give the endpoint a new secret; the current one keeps signing until ``now + overlap``."""
    if overlap < timedelta(0):
        raise EndpointError("overlap must not be negative")
    secret = generate_secret()
    row = await conn.fetchrow(
        f"""
        UPDATE merchant_endpoints
           SET previous_secret = secret,
               previous_secret_expires_at = now() + $3::interval,
               secret = $2
         WHERE id = $1
        RETURNING {_COLUMNS}, previous_secret_expires_at AS rotation_ends_at
        """,  # noqa: S608 (constant column list)
        endpoint_id,
        secret,
        overlap,
    )
    if row is None:
        raise EndpointError(f"no webhook endpoint {endpoint_id}")
    return RotatedSecret(
        endpoint=_endpoint(row), secret=secret, previous_secret_expires_at=row["rotation_ends_at"]
    )


async def _set_enabled(
    conn: asyncpg.Connection, endpoint_id: int, enabled: bool
) -> MerchantEndpoint:
    row = await conn.fetchrow(
        f"UPDATE merchant_endpoints SET enabled = $2 WHERE id = $1 RETURNING {_COLUMNS}",  # noqa: S608
        endpoint_id,
        enabled,
    )
    if row is None:
        raise EndpointError(f"no webhook endpoint {endpoint_id}")
    return _endpoint(row)


async def disable_endpoint(conn: asyncpg.Connection, endpoint_id: int) -> MerchantEndpoint:
    """Stop delivering to the endpoint: no new deliveries are enqueued for it, and its
    pending ones stay pending (not sent) until it is enabled again."""
    return await _set_enabled(conn, endpoint_id, False)


async def enable_endpoint(conn: asyncpg.Connection, endpoint_id: int) -> MerchantEndpoint:
    """Deliver to the endpoint again (its pending deliveries resume)."""
    return await _set_enabled(conn, endpoint_id, True)
