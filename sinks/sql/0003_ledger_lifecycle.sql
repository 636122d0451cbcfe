-- 0003_ledger_lifecycle: two-phase holds, per-payment refund bounds, merchant fee terms.
--
-- The journal (ledger_transactions, ledger_entries) stays append-only. The two tables
-- below are mutable *state* kept in the same database transaction as the entries that
-- justify each change (sinks/ledger.py writes both in one statement); their counters
-- only ever grow (trigger below) and CHECK constraints make the money rules structural:
--   * a hold is never captured beyond its amount and resolves at most once
--     (captured + released <= amount; a release takes the whole remainder, once);
--   * refunds + disputes of a payment never exceed what was captured, whatever the
--     concurrency (every writer updates the payment's row, so they serialise on it).
-- verify() (sinks/ledger.py) recomputes both tables from the journal.

-- A free-form business reference on a transaction (refund id, payout id, dispute id,
-- release reason). Nullable, no default: adding it rewrites nothing.
ALTER TABLE ledger_transactions ADD COLUMN reference text;

CREATE INDEX ledger_accounts_owner_idx ON ledger_accounts (owner);

-- One pending hold (authorization) per payment.
CREATE TABLE ledger_holds (
    payment_id             text        PRIMARY KEY,
    merchant_id            text        NOT NULL,
    currency               char(3)     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    amount                 bigint      NOT NULL CHECK (amount > 0),
    captured               bigint      NOT NULL DEFAULT 0 CHECK (captured >= 0),
    released               bigint      NOT NULL DEFAULT 0 CHECK (released >= 0),
    authorization_event_id text        NOT NULL UNIQUE,
    release_event_id       text        UNIQUE,
    release_reason         text        CHECK (release_reason IN ('void', 'expiry')),
    authorized_at          timestamptz NOT NULL,
    resolved_at            timestamptz,
    updated_at             timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ledger_holds_within_amount CHECK (captured + released <= amount),
    -- a release happens once, releases a positive remainder, and closes the hold
    CONSTRAINT ledger_holds_release_once CHECK (
        (release_event_id IS NULL) = (release_reason IS NULL)
        AND (release_event_id IS NULL) = (released = 0)
        AND (release_event_id IS NULL OR captured + released = amount)
    )
);

CREATE INDEX ledger_holds_open_idx ON ledger_holds (authorized_at)
    WHERE release_event_id IS NULL;

-- Money per payment and currency: what was captured (with fees) and what went back.
CREATE TABLE ledger_payments (
    payment_id    text    NOT NULL,
    currency      char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    merchant_id   text    NOT NULL,
    captured      bigint  NOT NULL DEFAULT 0 CHECK (captured >= 0),
    fees          bigint  NOT NULL DEFAULT 0 CHECK (fees >= 0),
    refunded      bigint  NOT NULL DEFAULT 0 CHECK (refunded >= 0),
    fees_refunded bigint  NOT NULL DEFAULT 0 CHECK (fees_refunded >= 0),
    disputed      bigint  NOT NULL DEFAULT 0 CHECK (disputed >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (payment_id, currency),
    CONSTRAINT ledger_payments_refund_within_captured CHECK (refunded + disputed <= captured),
    CONSTRAINT ledger_payments_fee_refund_within_fees CHECK (fees_refunded <= fees)
);

-- Counters only grow; identity columns never change; rows are never deleted.
CREATE FUNCTION ledger_state_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'ledger state rows are never deleted: DELETE on % refused', TG_TABLE_NAME
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF TG_TABLE_NAME = 'ledger_holds' THEN
        IF NEW.payment_id <> OLD.payment_id OR NEW.merchant_id <> OLD.merchant_id
           OR NEW.currency <> OLD.currency OR NEW.amount <> OLD.amount
           OR NEW.authorization_event_id <> OLD.authorization_event_id
           OR NEW.captured < OLD.captured OR NEW.released < OLD.released
           OR (OLD.release_event_id IS NOT NULL
               AND (NEW.release_event_id IS DISTINCT FROM OLD.release_event_id
                    OR NEW.released <> OLD.released)) THEN
            RAISE EXCEPTION 'ledger hold % may only capture more or be released once',
                OLD.payment_id USING ERRCODE = 'check_violation';
        END IF;
    ELSE
        IF NEW.payment_id <> OLD.payment_id OR NEW.currency <> OLD.currency
           OR NEW.merchant_id <> OLD.merchant_id
           OR NEW.captured < OLD.captured OR NEW.fees < OLD.fees
           OR NEW.refunded < OLD.refunded OR NEW.fees_refunded < OLD.fees_refunded
           OR NEW.disputed < OLD.disputed THEN
            RAISE EXCEPTION 'ledger payment % counters only grow', OLD.payment_id
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER ledger_holds_guard
    BEFORE UPDATE OR DELETE ON ledger_holds
    FOR EACH ROW EXECUTE FUNCTION ledger_state_guard();
CREATE TRIGGER ledger_payments_guard
    BEFORE UPDATE OR DELETE ON ledger_payments
    FOR EACH ROW EXECUTE FUNCTION ledger_state_guard();

-- Backfill: captures posted before this migration.
INSERT INTO ledger_payments (payment_id, currency, merchant_id, captured, fees)
SELECT t.payment_id,
       e.currency,
       coalesce(min(t.merchant_id), ''),
       coalesce(sum(e.amount) FILTER (WHERE starts_with(a.code, 'platform:psp_clearing:')), 0),
       coalesce(-sum(e.amount) FILTER (WHERE starts_with(a.code, 'platform:fee_revenue:')), 0)
  FROM ledger_transactions t
  JOIN ledger_entries e ON e.transaction_id = t.id
  JOIN ledger_accounts a ON a.id = e.account_id
 WHERE t.kind = 'capture' AND t.payment_id IS NOT NULL
 GROUP BY t.payment_id, e.currency;

-- Processing fee terms per merchant and currency (schemas.money.fee_for computes the fee).
CREATE TABLE merchant_fees (
    merchant_id     text        NOT NULL,
    currency        char(3)     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    fee_bps         integer     NOT NULL CHECK (fee_bps BETWEEN 0 AND 10000),
    fee_fixed_minor bigint      NOT NULL CHECK (fee_fixed_minor >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, currency)
);

-- The balance check of 0001, made O(statement) instead of O(journal): it now sums the
-- statement's own rows (the transition table) per transaction and currency. Equivalent
-- under 0001's rule that a transaction's entries are inserted by ONE statement: every
-- earlier statement was checked the same way, so a transaction balances iff each
-- statement's share of it does. (0001's version re-read ledger_entries for the touched
-- transactions; a session's cached plan for that lookup could be a sequential scan of
-- the whole journal, paid on every single-posting statement.)
CREATE OR REPLACE FUNCTION ledger_check_balanced() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT n.transaction_id, n.currency, sum(n.amount) AS total
      INTO bad
      FROM new_entries n
     GROUP BY n.transaction_id, n.currency
    HAVING sum(n.amount) <> 0
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'ledger transaction % does not balance in %: entries sum to %',
            bad.transaction_id, bad.currency, bad.total
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END;
$$;
