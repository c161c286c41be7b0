-- The initial schema: two leased queues (hydration jobs, deliveries), the notices and
-- snapshots behind them, dead letters, and a one-row heartbeat for readiness probes.
-- Times are epoch seconds (REAL). Ids use AUTOINCREMENT so a deleted id is never
-- reused: claims remember "notifications up to id N" as a watermark.

CREATE TABLE hydration_jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    brand TEXT NOT NULL,
    order_id INTEGER NOT NULL,
    venue_id TEXT,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'dead')),
    -- Bumped by every notice; a claim remembers the generation (and the last notice id)
    -- it covers, so a notice that arrives during the fetch makes the job due again.
    generation INTEGER NOT NULL DEFAULT 1,
    claimed_generation INTEGER NOT NULL DEFAULT 0,
    claimed_notification_id INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_found_attempts INTEGER NOT NULL DEFAULT 0,
    -- 0: not forced; otherwise the generation at which a forced hydration was asked,
    -- so a force that arrives during a fetch survives that fetch's completion.
    force_generation INTEGER NOT NULL DEFAULT 0,
    retry_at REAL NOT NULL,
    lease_until REAL,
    lease_token TEXT,
    last_error TEXT,
    -- received_at of the oldest notice not yet covered by a fetch (backlog age).
    pending_since REAL,
    last_version INTEGER NOT NULL DEFAULT 0,
    last_snapshot_key TEXT,
    last_updated_at REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (brand, order_id)
);
CREATE INDEX hydration_jobs_due ON hydration_jobs (retry_at) WHERE status = 'pending';
CREATE INDEX hydration_jobs_lease ON hydration_jobs (lease_until) WHERE status = 'running';
CREATE INDEX hydration_jobs_finished ON hydration_jobs (updated_at)
    WHERE status IN ('done', 'dead');

CREATE TABLE snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    brand TEXT NOT NULL,
    order_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    body BLOB NOT NULL,
    order_updated_at REAL,
    hydrated_at REAL NOT NULL,
    UNIQUE (brand, order_id, version)
);
CREATE INDEX snapshots_hydrated ON snapshots (hydrated_at);

CREATE TABLE notifications (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES hydration_jobs (id),
    brand TEXT NOT NULL,
    order_id INTEGER NOT NULL,
    venue_id TEXT,
    dedup_key TEXT,
    signed_at INTEGER,
    source TEXT NOT NULL,
    force INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL,
    -- The snapshot whose fetch covered this notice; NULL while it still waits.
    snapshot_id INTEGER REFERENCES snapshots (id)
);
CREATE UNIQUE INDEX notifications_dedup ON notifications (brand, dedup_key)
    WHERE dedup_key IS NOT NULL;
CREATE INDEX notifications_job ON notifications (job_id, id);
CREATE INDEX notifications_snapshot ON notifications (snapshot_id);
CREATE INDEX notifications_received ON notifications (received_at);

CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    snapshot_id INTEGER NOT NULL REFERENCES snapshots (id),
    sink TEXT NOT NULL,
    brand TEXT NOT NULL,
    order_id INTEGER NOT NULL,
    version INTEGER NOT NULL,
    status TEXT NOT NULL
        CHECK (status IN ('pending', 'running', 'done', 'dead', 'superseded')),
    attempts INTEGER NOT NULL DEFAULT 0,
    retry_at REAL NOT NULL,
    lease_until REAL,
    lease_token TEXT,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    delivered_at REAL,
    first_received_at REAL NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (sink, retry_at) WHERE status = 'pending';
CREATE INDEX deliveries_lease ON deliveries (sink, lease_until) WHERE status = 'running';
CREATE INDEX deliveries_order ON deliveries (sink, brand, order_id, status, version);
CREATE INDEX deliveries_snapshot ON deliveries (snapshot_id);
CREATE INDEX deliveries_finished ON deliveries (updated_at)
    WHERE status IN ('done', 'superseded', 'dead');

-- Dead letters outlive the rows they describe on purpose (no foreign keys): a replay
-- works from brand/order_id (and the delivery id when that delivery still exists).
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('hydration', 'delivery')),
    brand TEXT NOT NULL,
    order_id INTEGER NOT NULL,
    sink TEXT,
    reason TEXT NOT NULL,
    last_error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    created_at REAL NOT NULL,
    job_id INTEGER,
    delivery_id INTEGER,
    snapshot_key TEXT
);
CREATE INDEX dead_letters_delivery ON dead_letters (delivery_id)
    WHERE delivery_id IS NOT NULL;
CREATE INDEX dead_letters_order ON dead_letters (brand, order_id, kind);

CREATE TABLE heartbeat (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    beats INTEGER NOT NULL,
    beat_at REAL
);
INSERT INTO heartbeat (id, beats, beat_at) VALUES (1, 0, NULL);
