-- Appends are group-committed: one transaction may hold the events of several commands. A key
-- recorded earlier in the same transaction is extended only by the next event of the same
-- stream (the same command); another command of the batch reusing the key is a conflict, as
-- it would be in a transaction of its own.
CREATE OR REPLACE FUNCTION events_record_idempotency_key() RETURNS trigger LANGUAGE plpgsql AS $$
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
        UPDATE idempotency_keys
           SET last_sequence = NEW.sequence
         WHERE principal = NEW.principal
           AND idempotency_key = key
           AND transaction_id = pg_current_xact_id()
           AND aggregate_type = NEW.aggregate_type
           AND aggregate_id = NEW.aggregate_id
           AND last_sequence = NEW.sequence - 1;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'idempotency key % already used by %', key, NEW.principal
                USING ERRCODE = 'unique_violation', CONSTRAINT = 'idempotency_keys_pkey';
        END IF;
    END IF;
    RETURN NULL;
END
$$;
