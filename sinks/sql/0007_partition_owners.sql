-- 0007_partition_owners: fencing of the command processor's partitions.
--
-- Each time a worker is assigned a partition of payments.commands it takes the next
-- epoch for it (owner = that worker). Before writing payment state to the changelog, a
-- worker checks it still holds the epoch it took: a worker that lost the partition in a
-- rebalance while its batch was in flight (a "zombie") then drops its late state instead
-- of overwriting the new owner's (agents/fencing.py).
CREATE TABLE IF NOT EXISTS partition_owners (
    app_id      text        NOT NULL,
    partition   integer     NOT NULL,
    epoch       bigint      NOT NULL,
    owner       text        NOT NULL,
    assigned_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, partition)
);
