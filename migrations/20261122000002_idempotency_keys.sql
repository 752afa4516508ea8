-- Idempotency keys: a retried request with the same `Idempotency-Key` appends nothing new and
-- gets the original answer. The key is recorded by a trigger inside the append transaction, so
-- a key is stored if and only if its events are.

CREATE TABLE idempotency_keys (
    principal       text        NOT NULL,
    idempotency_key text        NOT NULL,
    request_hash    text        NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    first_sequence  bigint      NOT NULL,
    last_sequence   bigint      NOT NULL,
    transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (principal, idempotency_key)
);

CREATE INDEX idempotency_keys_created_at_idx ON idempotency_keys (created_at);

CREATE FUNCTION events_record_idempotency_key() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    key text := NEW.metadata ->> 'idempotency_key';
BEGIN
    IF key IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO idempotency_keys
        (principal, idempotency_key, request_hash, aggregate_type, aggregate_id,
         first_sequence, last_sequence)
    VALUES
        (NEW.principal, key, NEW.metadata ->> 'request_hash', NEW.aggregate_type,
         NEW.aggregate_id, NEW.sequence, NEW.sequence)
    ON CONFLICT (principal, idempotency_key) DO NOTHING;
    IF NOT FOUND THEN
        -- Later events of the same command extend the range; any other transaction
        -- reusing the key is a conflict the command layer resolves by replaying the answer.
        UPDATE idempotency_keys
           SET last_sequence = NEW.sequence
         WHERE principal = NEW.principal
           AND idempotency_key = key
           AND transaction_id = pg_current_xact_id();
        IF NOT FOUND THEN
            RAISE EXCEPTION 'idempotency key % already used by %', key, NEW.principal
                USING ERRCODE = 'unique_violation', CONSTRAINT = 'idempotency_keys_pkey';
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_record_idempotency_key AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_record_idempotency_key();
