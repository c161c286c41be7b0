-- The PostgreSQL schema: the same two leased queues as SQLite's (hydration jobs,
-- deliveries), the notices and snapshots behind them, dead letters, the poller's
-- watermarks and a one-row heartbeat. Times are epoch seconds (double precision), as
-- the port passes them. Identity ids come from sequences and are never reused: a claim
-- remembers "notifications up to id N" of its job, and a job's notices are inserted
-- under that job's row lock, so per job they are numbered in commit order.

CREATE TABLE hydration_jobs (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    brand TEXT NOT NULL,
    order_id BIGINT NOT NULL,
    venue_id TEXT,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'dead')),
    generation BIGINT NOT NULL DEFAULT 1,
    claimed_generation BIGINT NOT NULL DEFAULT 0,
    claimed_notification_id BIGINT NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_found_attempts INTEGER NOT NULL DEFAULT 0,
    force_generation BIGINT NOT NULL DEFAULT 0,
    retry_at DOUBLE PRECISION NOT NULL,
    lease_until DOUBLE PRECISION,
    lease_token TEXT,
    last_error TEXT,
    pending_since DOUBLE PRECISION,
    last_version BIGINT NOT NULL DEFAULT 0,
    last_snapshot_key TEXT,
    last_updated_at DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    -- One job per order, whatever its status (so at most one pending job per order).
    UNIQUE (brand, order_id)
);
-- Claims read only these partial indexes: pending work by due time, running work by
-- lease expiry.
CREATE INDEX hydration_jobs_due ON hydration_jobs (retry_at, id) WHERE status = 'pending';
CREATE INDEX hydration_jobs_lease ON hydration_jobs (lease_until) WHERE status = 'running';
CREATE INDEX hydration_jobs_finished ON hydration_jobs (updated_at)
    WHERE status IN ('done', 'dead');

CREATE TABLE snapshots (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    brand TEXT NOT NULL,
    order_id BIGINT NOT NULL,
    key TEXT NOT NULL,
    version BIGINT NOT NULL,
    body BYTEA NOT NULL,
    order_updated_at DOUBLE PRECISION,
    hydrated_at DOUBLE PRECISION NOT NULL,
    UNIQUE (brand, order_id, version)
);
CREATE INDEX snapshots_hydrated ON snapshots (hydrated_at);

CREATE TABLE notifications (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id BIGINT NOT NULL REFERENCES hydration_jobs (id),
    brand TEXT NOT NULL,
    order_id BIGINT NOT NULL,
    venue_id TEXT,
    dedup_key TEXT,
    signed_at BIGINT,
    source TEXT NOT NULL,
    force BOOLEAN NOT NULL DEFAULT FALSE,
    received_at DOUBLE PRECISION NOT NULL,
    snapshot_id BIGINT REFERENCES snapshots (id)
);
-- Exact repeats only: the same message id for another order is a new notice.
CREATE UNIQUE INDEX notifications_dedup ON notifications (brand, dedup_key, order_id)
    WHERE dedup_key IS NOT NULL;
CREATE INDEX notifications_job ON notifications (job_id, id);
CREATE INDEX notifications_uncovered ON notifications (job_id, id) WHERE snapshot_id IS NULL;
CREATE INDEX notifications_snapshot ON notifications (snapshot_id);
CREATE INDEX notifications_received ON notifications (received_at);

CREATE TABLE deliveries (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    snapshot_id BIGINT NOT NULL REFERENCES snapshots (id),
    sink TEXT NOT NULL,
    brand TEXT NOT NULL,
    order_id BIGINT NOT NULL,
    version BIGINT NOT NULL,
    status TEXT NOT NULL
        CHECK (status IN ('pending', 'running', 'done', 'dead', 'superseded')),
    attempts INTEGER NOT NULL DEFAULT 0,
    retry_at DOUBLE PRECISION NOT NULL,
    lease_until DOUBLE PRECISION,
    lease_token TEXT,
    last_error TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    delivered_at DOUBLE PRECISION,
    first_received_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (sink, retry_at, id) WHERE status = 'pending';
CREATE INDEX deliveries_lease ON deliveries (sink, lease_until) WHERE status = 'running';
-- At most one delivery in flight per (sink, order), whichever replica claimed it.
CREATE UNIQUE INDEX deliveries_one_running ON deliveries (sink, brand, order_id)
    WHERE status = 'running';
CREATE INDEX deliveries_order ON deliveries (sink, brand, order_id, status, version);
CREATE INDEX deliveries_snapshot ON deliveries (snapshot_id);
CREATE INDEX deliveries_finished ON deliveries (updated_at)
    WHERE status IN ('done', 'superseded', 'dead');

-- Dead letters outlive the rows they describe on purpose (no foreign keys).
CREATE TABLE dead_letters (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('hydration', 'delivery')),
    brand TEXT NOT NULL,
    order_id BIGINT NOT NULL,
    sink TEXT,
    reason TEXT NOT NULL,
    last_error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    job_id BIGINT,
    delivery_id BIGINT,
    snapshot_key TEXT
);
CREATE INDEX dead_letters_delivery ON dead_letters (delivery_id)
    WHERE delivery_id IS NOT NULL;
CREATE INDEX dead_letters_order ON dead_letters (brand, order_id, kind);

CREATE TABLE poll_watermarks (
    brand TEXT PRIMARY KEY,
    updated_at DOUBLE PRECISION NOT NULL,
    set_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE heartbeat (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    beats BIGINT NOT NULL,
    beat_at DOUBLE PRECISION
);
INSERT INTO heartbeat (id, beats, beat_at) VALUES (1, 0, NULL);
