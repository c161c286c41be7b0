-- The reconciliation poller's durable position, one row per brand: how far its reading
-- of Clopos's change list (GET /v2/orders by updated_at) has got, as the newest Clopos
-- updated_at seen (epoch seconds). A restart resumes there instead of re-reading, and
-- changes made while the service was down are still found.
CREATE TABLE poll_watermarks (
    brand TEXT PRIMARY KEY,
    updated_at REAL NOT NULL,
    set_at REAL NOT NULL
);
