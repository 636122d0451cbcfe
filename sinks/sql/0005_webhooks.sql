-- 0005_webhooks: outbound merchant webhooks (an outbox in the ledger's database).
--
-- merchant_endpoints: where a merchant receives events, which types, and the signing
--   secret(s). During a rotation the old secret stays in previous_secret until
--   previous_secret_expires_at; deliveries are signed with both until then.
-- webhook_deliveries: one row per (event, endpoint), written in the ledger sink's
--   transaction (sinks/webhook_outbox.py), so an event that is posted has its deliveries
--   and a redelivered event adds none (UNIQUE (event_id, endpoint_id)). payload holds the
--   exact JSON bytes sent on every attempt. A dispatcher claims due rows with
--   FOR UPDATE SKIP LOCKED and pushes next_attempt_at forward by a lease while it sends.
--   attempts counts every attempt ever started (a replay keeps counting); schedule_offset
--   is the attempt count when the current retry schedule began (0, or the count at the
--   last replay), so a replayed delivery gets the whole published schedule again.
-- webhook_attempts: the log of every attempt (never updated).
CREATE TABLE IF NOT EXISTS merchant_endpoints (
    id                          bigserial   PRIMARY KEY,
    merchant_id                 text        NOT NULL,
    url                         text        NOT NULL,
    event_types                 text[]      NOT NULL DEFAULT '{}',  -- empty: every event type
    secret                      text        NOT NULL,
    previous_secret             text,
    previous_secret_expires_at  timestamptz,
    enabled                     boolean     NOT NULL DEFAULT true,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT merchant_endpoints_previous_secret_expiry
        CHECK (previous_secret IS NULL OR previous_secret_expires_at IS NOT NULL)
);
CREATE INDEX IF NOT EXISTS merchant_endpoints_merchant
    ON merchant_endpoints (merchant_id) WHERE enabled;

CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id                bigserial   PRIMARY KEY,
    event_id          text        NOT NULL,
    endpoint_id       bigint      NOT NULL REFERENCES merchant_endpoints (id),
    payment_id        text        NOT NULL,
    merchant_id       text        NOT NULL,
    event_type        text        NOT NULL,
    payload           bytea       NOT NULL,
    status            text        NOT NULL DEFAULT 'pending'
                                  CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts          integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    schedule_offset   integer     NOT NULL DEFAULT 0 CHECK (schedule_offset >= 0),
    next_attempt_at   timestamptz,
    last_status_code  integer,
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    delivered_at      timestamptz,
    CONSTRAINT webhook_deliveries_event_endpoint UNIQUE (event_id, endpoint_id),
    CONSTRAINT webhook_deliveries_pending_due
        CHECK (status <> 'pending' OR next_attempt_at IS NOT NULL)
);
-- Due deliveries, per endpoint (the dispatcher fills each endpoint's free slots).
CREATE INDEX IF NOT EXISTS webhook_deliveries_due
    ON webhook_deliveries (endpoint_id, next_attempt_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS webhook_deliveries_payment ON webhook_deliveries (payment_id);
CREATE INDEX IF NOT EXISTS webhook_deliveries_created_at ON webhook_deliveries (created_at);

CREATE TABLE IF NOT EXISTS webhook_attempts (
    id            bigserial        PRIMARY KEY,
    delivery_id   bigint           NOT NULL REFERENCES webhook_deliveries (id),
    attempt       integer          NOT NULL,
    attempted_at  timestamptz      NOT NULL,
    status_code   integer,
    latency_ms    double precision NOT NULL,
    error         text
);
CREATE INDEX IF NOT EXISTS webhook_attempts_delivery ON webhook_attempts (delivery_id, attempt);
