"""The double-entry ledger sink: postings to an append-only journal in PostgreSQL.

Modules: ``accounts`` (codes, kinds, create-and-lock), ``captures``, ``holds``
(authorizations, hold captures, releases, expiries), ``refunds``, ``payouts``, ``disputes``
(each one posting kind), ``lifecycle`` (what the hold/refund/payout/dispute postings
share), ``fees`` (merchant fee terms), ``verification`` (:func:`verify`) and ``reports``
(totals, merchant balances and statements). Callers import from ``sinks.ledger`` itself.

Conventions (binding for every writer of the ledger tables; see ``sinks/sql/0001_ledger.sql``)

* Money is an ``int`` of minor units of the account's currency (ISO 4217 exponent: JPY 0,
  USD 2, KWD 3). No floats; PostgreSQL sums (``numeric``) are converted to ``int`` exactly.
* ``ledger_entries.amount`` is signed: a **debit is positive, a credit is negative**. The
  entries of every transaction sum to zero per currency (PostgreSQL refuses an INSERT
  statement that leaves a transaction unbalanced, so a transaction's entries are always
  inserted by one statement).
* ``ledger_accounts.balance`` is kept in the account's *normal* orientation: for a
  debit-normal account (assets) ``balance == sum(amount)``; for a credit-normal account
  (liabilities, revenue) ``balance == -sum(amount)``. A ``no_overdraft`` account (merchant
  wallets) can never go below zero (a CHECK constraint).
* The journal is append-only (triggers refuse UPDATE/DELETE/TRUNCATE); corrections are new
  transactions. ``ledger_transactions.event_id`` is the idempotency key of a posting: an
  event posts at most once, however often it is delivered.

A capture of ``amount`` with processing fee ``fee`` posts one transaction (kind
``capture``)::

    debit  psp clearing   (asset, normal debit)       +amount
    credit merchant wallet (liability, normal credit)  -(amount - fee)
    credit fee revenue    (revenue, normal credit)     -fee

Zero legs are omitted (no entry for a zero fee, nor for the wallet when the fee takes the
whole amount). Rounding: the ledger does not round. Fees arrive already computed in minor
units (see :func:`schemas.money.fee_for`, which rounds the percentage part half up with
integers and never exceeds the amount); the merchant is credited exactly ``amount - fee``,
so nothing is lost or created by rounding.

Accounts (``<CUR>`` is the ISO code; one account per currency, so an entry's currency is
always its account's currency -- a composite foreign key enforces it):

* ``platform:psp_clearing:<CUR>`` (asset, debit-normal): captured funds receivable from
  the PSP.
* ``platform:psp_clearing_pending:<CUR>`` (asset, debit-normal): authorized, not yet
  captured funds (the platform side of open holds).
* ``platform:fee_revenue:<CUR>`` (revenue, credit-normal): processing fees earned.
* ``platform:bank_payouts:<CUR>`` (liability, credit-normal): payouts sent to merchants'
  banks, in transit (cleared by bank reconciliation, outside this module).
* ``merchant:<id>:available:<CUR>`` (liability, credit-normal, no overdraft): the
  merchant's wallet.
* ``merchant:<id>:pending:<CUR>`` (liability, credit-normal, no overdraft): the merchant's
  held, not yet captured, authorizations.
* ``merchant:<id>:receivable:<CUR>`` (asset, debit-normal): what the merchant owes us
  (disputes beyond its wallet balance).

Posting types (``ledger_transactions.kind``) and their entries (``+`` debit, ``-`` credit;
zero legs are omitted). Every function is idempotent on ``event_id``:

* ``capture`` (:func:`post_captures`, a payment captured without a hold): clearing
  ``+amount``, wallet ``-(amount - fee)``, fee revenue ``-fee``.
* ``authorization`` (:func:`post_authorizations`, phase one): clearing_pending ``+amount``,
  merchant pending ``-amount``; opens the payment's row in ``ledger_holds``.
* ``hold_capture`` (:func:`post_hold_captures`, phase two, full or partial, repeatable up to
  the hold): merchant pending ``+amount``, clearing_pending ``-amount``, clearing
  ``+amount``, wallet ``-(amount - fee)``, fee revenue ``-fee``; ``ledger_holds.captured``
  grows.
* ``hold_release`` (:func:`release_holds` / :func:`expire_holds`, a void or an expiry):
  releases the whole remainder ``r = amount - captured`` once: merchant pending ``+r``,
  clearing_pending ``-r``; the hold is then closed (no capture, no second release).
* ``refund`` (:func:`post_refunds`): wallet ``+(amount - fee_refund)``, fee revenue
  ``+fee_refund``, clearing ``-amount``. Fee policy is the caller's (``fee_refund`` may be 0,
  a proportional share, or the whole fee); the ledger bounds it by the payment's fees.
* ``payout`` (:func:`post_payouts`): wallet ``+amount``, bank_payouts ``-amount``.
* ``dispute`` (:func:`post_disputes`, a chargeback of ``amount``): wallet
  ``+min(amount, wallet balance)``, merchant receivable ``+(the rest)``, clearing
  ``-amount``. Wallets never overdraw, so what the wallet cannot cover becomes a debt of the
  merchant (its receivable) instead of a negative wallet.

Guarantees (modelled on TigerBeetle's two-phase transfers), enforced by PostgreSQL rather
than by callers (``sinks/sql/0003_ledger_lifecycle.sql``):

* A hold resolves at most once: ``captured + released <= amount``, and a release takes the
  whole remainder, once (``ledger_holds`` CHECK constraints, counters only grow).
* Per payment and currency, ``refunded + disputed <= captured`` and
  ``fees_refunded <= fees`` (``ledger_payments`` CHECK constraints). Captures (with or
  without a hold) add to ``captured``.
* Concurrency: every writer first locks the accounts it touches in id order; all postings
  of one merchant share its wallet, so they serialise, and each guard reads committed state
  under that lock (READ COMMITTED). The CHECK constraints are the backstop.
* A posting the rules refuse (a refund beyond what was captured, a payout beyond the
  wallet, a second release...) is *rejected*, not raised: the batch's other postings go on,
  and the :class:`PostingResult` lists each rejected event id with its reason. A rejected
  event leaves no trace, so delivering it again later is evaluated again.

Settlement delay: captures credit the merchant's *available* wallet directly (as before
holds existed), because the pipeline's captures and every deployed ledger already mean
"available" by that account; a ``settle_pending`` step would change what existing captures
mean. ``pending`` is the merchant's held, not yet captured, authorizations.
"""

from __future__ import annotations

from sinks.ledger.accounts import (
    AccountSpec,
    bank_payouts_account,
    fee_revenue_account,
    merchant_pending_account,
    merchant_receivable_account,
    merchant_wallet_account,
    psp_clearing_account,
    psp_pending_account,
)
from sinks.ledger.captures import CAPTURE_KIND, CapturePosting, post_captures
from sinks.ledger.disputes import DISPUTE_KIND, DisputePosting, post_disputes
from sinks.ledger.fees import FeeTerms, merchant_fee_terms, set_merchant_fee
from sinks.ledger.holds import (
    AUTHORIZATION_KIND,
    HOLD_CAPTURE_KIND,
    HOLD_RELEASE_KIND,
    AuthorizationHold,
    HoldCapture,
    HoldRelease,
    ReleaseReason,
    expire_holds,
    post_authorizations,
    post_hold_captures,
    release_holds,
)
from sinks.ledger.lifecycle import PostingResult, Rejection, RejectReason
from sinks.ledger.payouts import PAYOUT_KIND, PayoutPosting, post_payouts
from sinks.ledger.refunds import REFUND_KIND, RefundPosting, post_refunds
from sinks.ledger.reports import (
    STATEMENT_COLUMNS,
    CurrencyTotals,
    MerchantBalance,
    StatementRow,
    merchant_balances,
    merchant_statement_rows,
    statement_csv,
    totals_by_currency,
)
from sinks.ledger.verification import (
    CurrencyVolume,
    LedgerReport,
    Violation,
    ViolationKind,
    verify,
)

__all__ = [
    "AUTHORIZATION_KIND",
    "CAPTURE_KIND",
    "DISPUTE_KIND",
    "HOLD_CAPTURE_KIND",
    "HOLD_RELEASE_KIND",
    "PAYOUT_KIND",
    "REFUND_KIND",
    "STATEMENT_COLUMNS",
    "AccountSpec",
    "AuthorizationHold",
    "CapturePosting",
    "CurrencyTotals",
    "CurrencyVolume",
    "DisputePosting",
    "FeeTerms",
    "HoldCapture",
    "HoldRelease",
    "LedgerReport",
    "MerchantBalance",
    "PayoutPosting",
    "PostingResult",
    "RefundPosting",
    "RejectReason",
    "Rejection",
    "ReleaseReason",
    "StatementRow",
    "Violation",
    "ViolationKind",
    "bank_payouts_account",
    "expire_holds",
    "fee_revenue_account",
    "merchant_balances",
    "merchant_fee_terms",
    "merchant_pending_account",
    "merchant_receivable_account",
    "merchant_statement_rows",
    "merchant_wallet_account",
    "post_authorizations",
    "post_captures",
    "post_disputes",
    "post_hold_captures",
    "post_payouts",
    "post_refunds",
    "psp_clearing_account",
    "psp_pending_account",
    "release_holds",
    "set_merchant_fee",
    "statement_csv",
    "totals_by_currency",
    "verify",
]
