-- The chat timeline is an inline projection: the append that stores an instance's events writes
-- their `rm_timeline` rows in the same statement (docs/architecture/event_bus.md). No projector
-- maintains it any more, so its projector bookkeeping goes. Its dead letters stay, as history.
--
-- Upgrading a database whose instance projector had not applied everything when the old
-- version stopped: run `apex rebuild timeline` once (online) to add what it had not applied.

DELETE FROM projector_offsets WHERE projector = 'timeline';
DELETE FROM projector_status WHERE projector = 'timeline';
