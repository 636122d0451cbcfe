-- 0004_dlq_replays: which dead-lettered records `paystream dlq replay --execute` re-published.
--
-- One row per DLQ coordinate (topic, partition, offset), written only after the broker
-- acknowledged the re-published record. A later replay run skips every coordinate found
-- here. record_sha256 (over key and value) lets the tool notice a coordinate that now holds
-- different bytes (a DLQ topic deleted and re-created) and the same bytes dead-lettered
-- again after a replay (the record failed again).
CREATE TABLE IF NOT EXISTS dlq_replays (
    dlq_topic           text        NOT NULL,
    dlq_partition       integer     NOT NULL,
    dlq_offset          bigint      NOT NULL,
    record_sha256       text        NOT NULL,
    record_key          bytea,
    stage               text        NOT NULL,
    reason              text        NOT NULL,
    original_topic      text        NOT NULL,
    original_partition  integer     NOT NULL,
    original_offset     bigint      NOT NULL,
    replayed_partition  integer     NOT NULL,
    replayed_offset     bigint      NOT NULL,
    replayed_by         text        NOT NULL,
    replayed_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT dlq_replays_pkey PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset)
);
CREATE INDEX IF NOT EXISTS dlq_replays_sha256 ON dlq_replays (record_sha256);
CREATE INDEX IF NOT EXISTS dlq_replays_replayed_at ON dlq_replays (replayed_at);
