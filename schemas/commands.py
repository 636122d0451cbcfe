"""Payment commands: what checkout systems publish to ``payments.commands``.

Wire contract (SPEC.md): JSON objects keyed by ``payment_id``; every command carries
``type``, ``schema_version`` (1), ``command_id``, ``merchant_id``, ``idempotency_key``,
``payment_id`` and ``created_at``. Unknown extra fields are ignored so that producers may
add fields before consumers know them.

Validation happens in two layers, and the layer decides where a bad command goes:

* the :class:`CommandEnvelope` (type, version, ids) must parse, or the bytes cannot be
  attributed to a payment and go to the dead-letter topic;
* the full command (amount, currency, token, ...) must then validate, or the merchant
  receives a ``payment.rejected`` event whose ``reason`` says what was wrong.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    TypeAdapter,
    field_validator,
    model_validator,
)

from schemas.currencies import exponent
from schemas.money import MAX_AMOUNT_MINOR, Currency
from schemas.pan import looks_like_pan

SCHEMA_VERSION = 1

Identifier = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.:\-]+$")]
PaymentMethodToken = Annotated[str, Field(min_length=4, max_length=255, pattern=r"^[A-Za-z0-9_]+$")]
PositiveAmount = Annotated[StrictInt, Field(gt=0, le=MAX_AMOUNT_MINOR)]

CommandType = Literal[
    "authorize_payment", "capture_payment", "void_payment", "refund_payment", "create_payout"
]
COMMAND_TYPES: tuple[str, ...] = CommandType.__args__  # type: ignore[attr-defined]


class CommandEnvelope(BaseModel):
    """The fields every command has; enough to address a reply to the merchant."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: CommandType
    schema_version: Literal[1]
    command_id: Identifier
    merchant_id: Identifier
    idempotency_key: Identifier
    payment_id: Identifier
    created_at: AwareDatetime


class _Command(CommandEnvelope):
    def fingerprint_fields(self) -> dict[str, Any]:
        """The payload compared for idempotency: every field but command_id, created_at."""
        return self.model_dump(mode="json", exclude={"command_id", "created_at"})


class AuthorizePayment(_Command):
    """Create a payment and authorize it at a PSP; capture now or later."""

    type: Literal["authorize_payment"]
    amount: PositiveAmount
    currency: Currency
    payment_method: PaymentMethodToken = Field(
        description="A PSP payment-method token such as tok_visa. Never a card number."
    )
    capture_method: Literal["automatic", "manual"] = "automatic"
    customer_id: Identifier | None = None
    description: Annotated[str, Field(max_length=1000)] | None = None
    metadata: dict[Annotated[str, Field(max_length=40)], Annotated[str, Field(max_length=500)]] = (
        Field(default_factory=dict, max_length=50)
    )

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        exponent(value)
        return value

    @model_validator(mode="after")
    def _no_card_numbers(self) -> AuthorizePayment:
        texts = [self.payment_method, self.description or "", *self.metadata.values()]
        if any(looks_like_pan(text) for text in texts):
            raise ValueError(
                "payload looks like it contains a card number; send a PSP token instead"
            )
        return self


class CapturePayment(_Command):
    """Capture an authorized payment, fully (no amount) or partially."""

    type: Literal["capture_payment"]
    amount: PositiveAmount | None = None


class VoidPayment(_Command):
    """Cancel an authorization that has not been captured."""

    type: Literal["void_payment"]


class RefundPayment(_Command):
    """Refund a captured payment, fully (no amount) or partially."""

    type: Literal["refund_payment"]
    refund_id: Identifier
    amount: PositiveAmount | None = None
    reason: Annotated[str, Field(max_length=500)] | None = None


class CreatePayout(_Command):
    """Pay out a merchant's available balance to a bank account token."""

    type: Literal["create_payout"]
    payout_id: Identifier
    amount: PositiveAmount
    currency: Currency
    destination: PaymentMethodToken

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        exponent(value)
        return value


Command = Annotated[
    AuthorizePayment | CapturePayment | VoidPayment | RefundPayment | CreatePayout,
    Field(discriminator="type"),
]
COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)


def describe_validation_error(exc: Exception) -> str:
    """A one-line, PAN-free reason for a rejected command."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
            message = re.sub(r"^Value error, ", "", err["msg"])
            parts.append(f"{where}: {message}" if where else message)
        return "; ".join(parts)
    return str(exc)
