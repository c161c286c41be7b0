-- The Clopos rate budget's spend (as in the SQLite store's 0004_budget_spend.sql): one row
-- per call granted to a tenant, written before the call goes out, with the per-minute limit
-- then in force, so that a restarted process loads the last minute instead of starting with
-- a full budget. Rows older than two minutes are deleted as new ones are written.
CREATE TABLE budget_spend (
    id BIGSERIAL PRIMARY KEY,
    tenant TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    limit_per_minute INTEGER NOT NULL
);
CREATE INDEX budget_spend_at ON budget_spend (at);
