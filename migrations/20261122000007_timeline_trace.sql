-- The W3C trace context of the command that produced each timeline entry, so the WebSocket
-- send can be logged in the same trace as the HTTP command, the append, the publish and the
-- projection.
ALTER TABLE rm_timeline ADD COLUMN traceparent text;
