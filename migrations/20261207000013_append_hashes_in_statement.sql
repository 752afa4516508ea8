-- The append statement computes each event's metadata columns and hash itself, set-based,
-- where it knows the predecessor's hash (commands/src/group_commit.rs; docs/operations/audit.md,
-- "What the hash chain covers"). `events_before_insert` now runs only for rows that arrive
-- without a hash: an append's events whose predecessor its writer did not commit, and every row
-- inserted by other means. It computes what it always computed, the same way.
--
-- The statement uses the trigger's expressions, field for field, so every hash, whoever
-- computed it, verifies the same way (`apex audit verify` recomputes in Rust).
--
-- Measured with the `write` benchmark: the per-row trigger call and its predecessor lookup were
-- the largest part of an append's time in PostgreSQL (docs/benchmarks.md, change 51).

DROP TRIGGER events_before_insert ON events;

CREATE TRIGGER events_before_insert BEFORE INSERT ON events
    FOR EACH ROW WHEN (NEW.hash IS NULL) EXECUTE FUNCTION events_before_insert();
