"""paystream's public Python API for checkout systems.

The pipeline's own packages (agents, sinks, psp, ...) are internal; import from here.
"""

from paystream.client import PaymentsClient, PublishError
from schemas.commands import AuthorizePayment, CapturePayment
from schemas.events import PaymentEvent
from schemas.money import Money

__all__ = [
    "AuthorizePayment",
    "CapturePayment",
    "Money",
    "PaymentEvent",
    "PaymentsClient",
    "PublishError",
]
