-- Payment-status read model and the event log it is built from.
CREATE TABLE IF NOT EXISTS payment_status (
    payment_id   text PRIMARY KEY,
    merchant_id  text NOT NULL,
    status       text NOT NULL,
    sequence     integer NOT NULL,
    event        jsonb NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS payment_status_merchant ON payment_status (merchant_id);

CREATE TABLE IF NOT EXISTS payment_events (
    event_id     text PRIMARY KEY,
    payment_id   text NOT NULL,
    type         text NOT NULL,
    sequence     integer NOT NULL,
    replayed     boolean NOT NULL,
    event        jsonb NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS payment_events_payment ON payment_events (payment_id, sequence);
