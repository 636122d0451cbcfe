-- 0001_ledger: the double-entry ledger (accounts, append-only journal).
--
-- Sign convention (binding for every writer of ledger_entries):
--   ledger_entries.amount is signed minor units: a DEBIT is positive, a CREDIT is negative.
--   Every transaction's entries sum to zero per currency (enforced below, per statement).
--   ledger_accounts.balance is kept in the account's NORMAL orientation:
--     normal_balance = 'debit'  -> balance =  sum(entries.amount)
--     normal_balance = 'credit' -> balance = -sum(entries.amount)
--   so a positive balance is the usual state of every account, and a no_overdraft account
--   must never go below zero (CHECK below).
--
-- The journal (ledger_transactions, ledger_entries) is append-only: corrections are new
-- transactions. A writer inserts all entries of one transaction in ONE statement.
--
-- Room for later two-phase holds (authorizations): a later migration adds a holds table
-- and pending/available columns; ledger_transactions.kind is free text for that reason.

CREATE TABLE ledger_accounts (
    id             bigserial   PRIMARY KEY,
    code           text        NOT NULL UNIQUE,
    owner          text        NOT NULL,
    kind           text        NOT NULL
        CHECK (kind IN ('asset', 'liability', 'revenue', 'expense', 'equity')),
    currency       char(3)     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    normal_balance text        NOT NULL CHECK (normal_balance IN ('debit', 'credit')),
    no_overdraft   boolean     NOT NULL DEFAULT false,
    balance        bigint      NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- target of the composite FK that keeps entry currency == account currency
    CONSTRAINT ledger_accounts_id_currency_key UNIQUE (id, currency),
    CONSTRAINT ledger_accounts_no_overdraft CHECK (NOT no_overdraft OR balance >= 0)
);

CREATE TABLE ledger_transactions (
    id          bigserial   PRIMARY KEY,
    event_id    text        NOT NULL UNIQUE,  -- idempotency key of a posting
    kind        text        NOT NULL CHECK (kind <> ''),
    payment_id  text,
    merchant_id text,
    occurred_at timestamptz NOT NULL,
    posted_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX ledger_transactions_payment_id_idx ON ledger_transactions (payment_id);

CREATE TABLE ledger_entries (
    id             bigserial PRIMARY KEY,
    transaction_id bigint    NOT NULL REFERENCES ledger_transactions (id),
    account_id     bigint    NOT NULL,
    amount         bigint    NOT NULL CHECK (amount <> 0),  -- debit > 0, credit < 0
    currency       char(3)   NOT NULL,
    CONSTRAINT ledger_entries_account_currency_fkey
        FOREIGN KEY (account_id, currency) REFERENCES ledger_accounts (id, currency)
);

CREATE INDEX ledger_entries_transaction_id_idx ON ledger_entries (transaction_id);
CREATE INDEX ledger_entries_account_id_idx ON ledger_entries (account_id);

-- Append-only journal: refuse UPDATE, DELETE and TRUNCATE, whoever the role is.
CREATE FUNCTION ledger_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger journal is append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation',
              HINT = 'post a correcting transaction instead';
END;
$$;

CREATE TRIGGER ledger_transactions_append_only
    BEFORE UPDATE OR DELETE ON ledger_transactions
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_transactions_no_truncate
    BEFORE TRUNCATE ON ledger_transactions
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_entries_append_only
    BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_entries_no_truncate
    BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();

-- Every transaction touched by an INSERT statement must balance per currency once the
-- statement ends (hence: all entries of a transaction go in one statement).
CREATE FUNCTION ledger_check_balanced() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT e.transaction_id, e.currency, sum(e.amount) AS total
      INTO bad
      FROM ledger_entries e
     WHERE e.transaction_id IN (SELECT DISTINCT n.transaction_id FROM new_entries n)
     GROUP BY e.transaction_id, e.currency
    HAVING sum(e.amount) <> 0
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'ledger transaction % does not balance in %: entries sum to %',
            bad.transaction_id, bad.currency, bad.total
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER ledger_entries_balanced
    AFTER INSERT ON ledger_entries
    REFERENCING NEW TABLE AS new_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_check_balanced();
