-- The event store: the postgres-es `events` and `snapshots` tables, extended with what the
-- relay and the auditors need. The events table is also the outbox the relay tails.

CREATE TABLE events (
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    sequence        bigint      NOT NULL CHECK (sequence > 0),
    event_type      text        NOT NULL,
    event_version   text        NOT NULL,
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL,
    -- Global position: insert order, NOT commit order (see docs/architecture/event_bus.md).
    position        bigint      GENERATED ALWAYS AS IDENTITY,
    -- The committing transaction; with pg_snapshot_xmin it gives a gap-free commit-order read.
    transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    event_id        uuid        NOT NULL DEFAULT gen_random_uuid(),
    -- Filled from `metadata` by events_fill_metadata(); NOT NULL makes a command without
    -- them fail loudly instead of storing an anonymous event.
    correlation_id  uuid        NOT NULL,
    causation_id    uuid        NOT NULL,
    principal       text        NOT NULL,
    principal_role  text        NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE UNIQUE INDEX events_position_key ON events (position);
CREATE UNIQUE INDEX events_event_id_key ON events (event_id);
CREATE INDEX events_transaction_idx ON events (transaction_id, position);
CREATE INDEX events_recorded_at_idx ON events (recorded_at);

CREATE TABLE snapshots (
    aggregate_type   text   NOT NULL,
    aggregate_id     text   NOT NULL,
    last_sequence    bigint NOT NULL CHECK (last_sequence >= 0),
    current_snapshot bigint NOT NULL CHECK (current_snapshot >= 0),
    payload          jsonb  NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- Copies the command metadata written by the command layer into typed columns.
CREATE FUNCTION events_fill_metadata() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.correlation_id := (NEW.metadata ->> 'correlation_id')::uuid;
    NEW.causation_id   := (NEW.metadata ->> 'causation_id')::uuid;
    NEW.principal      := NEW.metadata ->> 'principal';
    NEW.principal_role := NEW.metadata ->> 'principal_role';
    RETURN NEW;
END
$$;

CREATE TRIGGER events_fill_metadata BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_fill_metadata();

-- Events are immutable: the store only ever appends.
CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER events_append_only BEFORE UPDATE ON events
    FOR EACH ROW EXECUTE FUNCTION events_append_only();

-- Wakes the relay as soon as a transaction that appended events commits.
CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('apex_events', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_notify();
