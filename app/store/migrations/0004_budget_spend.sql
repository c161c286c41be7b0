-- The Clopos rate budget's spend, so that the next process knows what this one spent.
-- Clopos counts a tenant's calls over a sliding minute, whichever process made them; a
-- process restarted after a crash loads the last minute from here instead of starting with
-- a full budget (and sending into a full window). One row per call granted to a tenant
-- (integrator_id:brand), written before the call goes out, with the per-minute limit then
-- in force (ours, or the lower one Clopos announced). Rows older than two minutes are
-- deleted as new ones are written.
CREATE TABLE budget_spend (
    id INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    at REAL NOT NULL,
    limit_per_minute INTEGER NOT NULL
);
CREATE INDEX budget_spend_at ON budget_spend (at);
