-- The relay's checkpoint: the (transaction_id, position) of the last event it published with a
-- broker confirm. It reads in that same order, so the checkpoint is the exact resume point.
CREATE TABLE relay_checkpoints (
    name            text        PRIMARY KEY,
    transaction_id  xid8        NOT NULL DEFAULT '0'::xid8,
    position        bigint      NOT NULL DEFAULT 0,
    published_total bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
