"""Settling unknown PSP outcomes: ask the PSP again, and accept only a real answer.

An attempt whose outcome is unknown (a timeout, a lost response, a 5xx) waits in
``pending_verification``. The resolver tiers (``payments.verify.tierN``) ask the PSP about
it with growing delays:

* Preferred: **re-send the very request** under the same attempt id. The PSP's idempotency
  key makes that safe: it replays the stored answer, answers "in flight" (409) while the
  first call is still running, or, if the first call never arrived, processes it once now.
  Unlike a read, it cannot mistake "not arrived yet" for "never happened".
* Only for a request we cannot re-send (none stored): a read by attempt id (authorize) or
  by PSP reference (capture).

Either way only the PSP's positive statement of an outcome settles the payment
(:func:`agents.executor.is_positive_answer`); a lookup that fails (5xx, 429, connection
refused, a key still in flight, a timeout) is asked again on the next tier, and after the
last lookup the payment stays ``pending_verification`` (alerting; the stuck-payment sweep
and reconciliation pick it up), never declined or failed by us.
"""

from __future__ import annotations

from psp.protocol import (
    STATUS_NOT_FOUND,
    AuthorizeRequest,
    CaptureRequest,
    PspAdapter,
    PspResult,
    RefundRequest,
    VoidRequest,
)
from schemas.internal import VerifyRequest


async def ask_psp(adapter: PspAdapter, request: VerifyRequest) -> PspResult:
    """The PSP's current answer about ``request``'s attempt (see the module docstring)."""
    if request.request is not None:
        return await resend(adapter, request.operation, request.request)
    if request.operation == "authorize":
        return await adapter.retrieve(attempt_id=request.attempt_id)
    if request.operation == "capture" and request.psp_reference is not None:
        found = await adapter.retrieve(psp_reference=request.psp_reference)
        if found.outcome == "succeeded" and found.amount_captured >= request.expected_captured:
            return found
        # Not captured (yet): our capture may still be in flight; not an answer.
        return found.model_copy(update={
            "outcome": "unknown", "status": found.status or STATUS_NOT_FOUND,
            "message": "capture not visible at the PSP yet",
        })
    return PspResult(outcome="unknown", psp=adapter.name,
                     message=f"no stored request to re-send for {request.operation}")


async def resend(adapter: PspAdapter, operation: str, request_json: str) -> PspResult:
    """Send the stored request again (same attempt id = the PSP's idempotency key)."""
    if operation == "authorize":
        return await adapter.authorize(AuthorizeRequest.model_validate_json(request_json))
    if operation == "capture":
        return await adapter.capture(CaptureRequest.model_validate_json(request_json))
    if operation == "void":
        return await adapter.void(VoidRequest.model_validate_json(request_json))
    if operation == "refund":
        return await adapter.refund(RefundRequest.model_validate_json(request_json))
    raise ValueError(f"cannot re-send a {operation!r} request")
