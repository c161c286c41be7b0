-- The W3C traceparent of the ingest span that stored the notice (NULL when tracing is off
-- or the notice came from the poller or an operator): hydration and delivery spans join
-- the notice's trace, and a fetch covering several notices links to each of them.
ALTER TABLE notifications ADD COLUMN traceparent TEXT;
