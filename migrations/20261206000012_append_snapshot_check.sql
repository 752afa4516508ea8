-- A batch that moves a snapshot is one statement, like every other batch (docs/architecture/
-- agents.md, group commit; commands/src/group_commit.rs, APPEND_MOVING). Its snapshot `UPDATE` is checked inside that statement: when fewer
-- snapshots moved than the batch expected (another process moved one first), the statement
-- calls this function, which fails it with SQLSTATE AXS01, so nothing of the batch lands.
-- Before, such a batch ran in an explicit transaction of four round trips (`BEGIN`, the
-- insert, the checked update, `COMMIT`).

CREATE FUNCTION append_snapshot_moved(moved bigint, expected bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a snapshot changed concurrently: % of % snapshot updates matched', moved, expected
        USING ERRCODE = 'AXS01';
END
$$;
