-- 0006_idempotency_keys: which payment a merchant's idempotency key belongs to.
--
-- The durable record behind agents/idempotency.py (Redis is a cache in front of it): a
-- flushed or evicted Redis must not let one key charge twice within its retention. A row
-- older than the retention may be rebound to a new payment (the key was released, as at
-- Stripe); rows are kept, so a reuse is visible to operators.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    merchant_id      text        NOT NULL,
    idempotency_key  text        NOT NULL,
    payment_id       text        NOT NULL,
    bound_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, idempotency_key)
);
