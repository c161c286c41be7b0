"""Every SQL statement of the PostgreSQL store, as named queries in one place.

Parameters are psycopg's ``%(name)s``. Times are epoch seconds (double precision), as
the port passes them, except lease expiry: ``LEASE_NOW`` is the database's clock
(``statement_timestamp()``) unless the store was built to take the caller's ``now``
(the contract tests drive time that way). Replicas' clocks never decide whether a lease
has expired; one clock, the database's, does.

Concurrency: a hydration job's row lock is the serialization point for everything
about that order's job (enqueue, claim, completion, failure). Claims pick rows with
``FOR UPDATE SKIP LOCKED`` so racing claimers (coroutines or replicas) never wait on,
nor hand out, each other's rows. Delivery claims also take a transaction-scoped
advisory lock per (sink, order), so two claimers never both start one of its versions;
the unique partial index ``deliveries_one_running`` is the backstop.
"""

from __future__ import annotations

# The clock leases are measured by: the caller's ``lease_now`` when given (tests),
# otherwise the database's.
LEASE_NOW = "COALESCE(%(lease_now)s::float8, extract(epoch FROM statement_timestamp()))"

# --- ingest -----------------------------------------------------------------------------

FIND_DUPLICATE = """
SELECT job_id, signed_at FROM notifications
WHERE brand = %(brand)s AND dedup_key = %(dedup_key)s AND order_id = %(order_id)s
"""
LOCK_JOB_BY_ORDER = """
SELECT * FROM hydration_jobs WHERE brand = %(brand)s AND order_id = %(order_id)s FOR UPDATE
"""
GET_JOB_BY_ORDER = """
SELECT * FROM hydration_jobs WHERE brand = %(brand)s AND order_id = %(order_id)s
"""
LATEST_SNAPSHOT_META = """
SELECT id, version, key, order_updated_at, hydrated_at FROM snapshots
WHERE brand = %(brand)s AND order_id = %(order_id)s
ORDER BY version DESC LIMIT 1
"""
# A new job: nothing when another transaction created it first (then it is locked and
# noticed like any existing job).
INSERT_JOB = """
INSERT INTO hydration_jobs (
    brand, order_id, venue_id, status, generation, force_generation, retry_at,
    pending_since, last_version, last_snapshot_key, last_updated_at, created_at, updated_at
)
SELECT %(brand)s, %(order_id)s, %(venue_id)s, 'pending', 1, %(force_generation)s, %(now)s,
       %(now)s, COALESCE(s.version, 0), s.key, s.order_updated_at, %(now)s, %(now)s
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT version, key, order_updated_at FROM snapshots
    WHERE brand = %(brand)s AND order_id = %(order_id)s
    ORDER BY version DESC LIMIT 1
) AS s ON TRUE
ON CONFLICT (brand, order_id) DO NOTHING
RETURNING id
"""
UPDATE_JOB_ON_NOTICE = """
UPDATE hydration_jobs SET
    status = %(status)s, venue_id = %(venue_id)s, generation = %(generation)s,
    force_generation = %(force_generation)s, attempts = %(attempts)s,
    not_found_attempts = %(not_found_attempts)s, retry_at = %(retry_at)s,
    pending_since = %(pending_since)s, last_error = %(last_error)s, updated_at = %(now)s
WHERE id = %(id)s
"""
# Work became due: every replica LISTENing wakes its workers when this commits (NOTIFY
# is transactional), instead of at its next poll.
WORK_CHANNEL = "hydrator_work"
NOTIFY_WORK = f"SELECT pg_notify('{WORK_CHANNEL}', %(kind)s)"
# The notice, and the wake-up of hydration workers, in one round trip.
INSERT_NOTIFICATION = f"""
WITH inserted AS (
    INSERT INTO notifications (
        job_id, brand, order_id, venue_id, dedup_key, signed_at, source, force, received_at,
        traceparent
    ) VALUES (
        %(job_id)s, %(brand)s, %(order_id)s, %(venue_id)s, %(dedup_key)s, %(signed_at)s,
        %(source)s, %(force)s, %(received_at)s, %(traceparent)s
    )
    RETURNING id
)
SELECT id, pg_notify('{WORK_CHANNEL}', 'hydration') AS notified FROM inserted
"""

# --- hydration queue --------------------------------------------------------------------

# Step one of a claim: lock the due jobs (pending and due, or running with an expired
# lease), oldest first, skipping rows another claimer or an enqueue holds.
PICK_JOBS = f"""
SELECT id, status, lost_leases FROM hydration_jobs
WHERE ((status = 'pending' AND retry_at <= %(now)s)
       OR (status = 'running' AND lease_until <= {LEASE_NOW}))
  AND NOT (brand = ANY(%(exclude)s::text[]))
ORDER BY retry_at, id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED
"""
# Step two, in a later statement (so its snapshot sees every notice committed before
# the locks were taken): lease them, remembering the generation and the newest notice
# each claim covers.
CLAIM_JOBS = f"""
WITH summary AS (
    SELECT j.id,
           (SELECT MAX(n.id) FROM notifications AS n
            WHERE n.job_id = j.id AND n.snapshot_id IS NULL) AS max_id,
           (SELECT MIN(n.received_at) FROM notifications AS n
            WHERE n.job_id = j.id AND n.snapshot_id IS NULL) AS first_received_at
    FROM hydration_jobs AS j WHERE j.id = ANY(%(ids)s::bigint[])
)
UPDATE hydration_jobs AS j SET
    status = 'running', lease_until = {LEASE_NOW} + %(lease_seconds)s,
    lease_token = gen_random_uuid()::text, claimed_generation = j.generation,
    attempts = j.attempts + 1,
    lost_leases = j.lost_leases + CASE WHEN j.status = 'running' THEN 1 ELSE 0 END,
    claimed_notification_id = COALESCE(s.max_id, 0), updated_at = %(now)s
FROM summary AS s
WHERE j.id = s.id
  AND ((j.status = 'pending' AND j.retry_at <= %(now)s)
       OR (j.status = 'running' AND j.lease_until <= {LEASE_NOW}))
RETURNING j.*, s.first_received_at AS uncovered_since
"""
# Running work renews its lease (by the lease clock), so slow work is not taken over.
EXTEND_JOB_LEASE = f"""
UPDATE hydration_jobs SET lease_until = {LEASE_NOW} + %(lease_seconds)s
WHERE id = %(id)s AND status = 'running' AND lease_token = %(lease_token)s
"""
GET_JOB_FOR_UPDATE = "SELECT * FROM hydration_jobs WHERE id = %(id)s FOR UPDATE"
# The newest notices each claimed job covers (at most :limit per job), oldest first.
CLAIMED_NOTIFICATION_IDS = """
SELECT j.id AS job_id, n.id, n.traceparent
FROM unnest(%(ids)s::bigint[], %(max_ids)s::bigint[]) AS j (id, max_id)
CROSS JOIN LATERAL (
    SELECT id, traceparent FROM notifications
    WHERE job_id = j.id AND snapshot_id IS NULL AND id <= j.max_id
    ORDER BY id DESC LIMIT %(limit)s
) AS n
ORDER BY j.id, n.id
"""
LOCK_LEASED_JOB = """
SELECT * FROM hydration_jobs
WHERE id = %(id)s AND status = 'running' AND lease_token = %(lease_token)s
FOR UPDATE
"""
# The order already had this exact state (a read lagging behind what was stored).
KNOWN_STATE = """
SELECT 1 FROM snapshots
WHERE brand = %(brand)s AND order_id = %(order_id)s AND key = %(key)s LIMIT 1
"""
INSERT_SNAPSHOT = """
INSERT INTO snapshots (brand, order_id, key, version, body, order_updated_at, hydrated_at)
VALUES (%(brand)s, %(order_id)s, %(key)s, %(version)s, %(body)s, %(order_updated_at)s,
        %(hydrated_at)s)
RETURNING id
"""
SUPERSEDE_OLDER_PENDING = """
UPDATE deliveries SET status = 'superseded', updated_at = %(now)s
WHERE sink = %(sink)s AND brand = %(brand)s AND order_id = %(order_id)s
  AND status = 'pending' AND version < %(version)s
"""
INSERT_DELIVERY = """
INSERT INTO deliveries (
    snapshot_id, sink, brand, order_id, version, status, retry_at,
    created_at, updated_at, first_received_at
) VALUES (
    %(snapshot_id)s, %(sink)s, %(brand)s, %(order_id)s, %(version)s, 'pending', %(now)s,
    %(now)s, %(now)s, %(first_received_at)s
)
"""
COVER_NOTIFICATIONS = """
UPDATE notifications SET snapshot_id = %(snapshot_id)s
WHERE job_id = %(job_id)s AND snapshot_id IS NULL AND id <= %(max_id)s
"""
OLDEST_UNCOVERED = """
SELECT MIN(received_at) AS oldest FROM notifications
WHERE job_id = %(job_id)s AND snapshot_id IS NULL
"""
OLDEST_AFTER_CLAIM = """
SELECT MIN(received_at) AS oldest FROM notifications
WHERE job_id = %(job_id)s AND snapshot_id IS NULL AND id > %(after_id)s
"""
FINISH_JOB = """
UPDATE hydration_jobs SET
    status = %(status)s, retry_at = %(retry_at)s, attempts = 0, not_found_attempts = 0,
    force_generation = CASE WHEN force_generation > claimed_generation
                            THEN force_generation ELSE 0 END,
    lease_until = NULL, lease_token = NULL, last_error = NULL, lost_leases = 0,
    pending_since = %(pending_since)s, last_version = %(last_version)s,
    last_snapshot_key = %(last_snapshot_key)s, last_updated_at = %(last_updated_at)s,
    updated_at = %(now)s
WHERE id = %(id)s
"""
RETRY_JOB = """
UPDATE hydration_jobs SET
    status = 'pending', last_error = %(error)s, lost_leases = 0,
    retry_at = CASE WHEN force_generation > claimed_generation THEN retry_at
                    ELSE %(retry_at)s END,
    attempts = CASE WHEN force_generation > claimed_generation THEN 0
                    ELSE GREATEST(attempts - 1 + %(add_attempt)s, 0) END,
    not_found_attempts = CASE WHEN force_generation > claimed_generation THEN 0
                              ELSE not_found_attempts + %(add_not_found)s END,
    lease_until = NULL, lease_token = NULL, updated_at = %(now)s
WHERE id = %(id)s AND status = 'running' AND lease_token = %(lease_token)s
"""
RELEASE_JOB = """
UPDATE hydration_jobs SET
    status = 'pending', attempts = GREATEST(attempts - 1, 0),
    lease_until = NULL, lease_token = NULL, updated_at = %(now)s
WHERE id = %(id)s AND status = 'running' AND lease_token = %(lease_token)s
"""
END_JOB_FAILED = """
UPDATE hydration_jobs SET
    status = %(status)s, retry_at = %(retry_at)s, last_error = %(error)s,
    attempts = 0, not_found_attempts = 0, lost_leases = 0,
    force_generation = CASE WHEN force_generation > claimed_generation
                            THEN force_generation ELSE 0 END,
    lease_until = NULL, lease_token = NULL, pending_since = %(pending_since)s,
    updated_at = %(now)s
WHERE id = %(id)s AND status = 'running' AND lease_token = %(lease_token)s
"""
RESOLVE_HYDRATION_LETTERS = """
DELETE FROM dead_letters
WHERE kind = 'hydration' AND brand = %(brand)s AND order_id = %(order_id)s
"""

# --- delivery queue ---------------------------------------------------------------------

# Candidates of one sink, oldest due first; rows another claimer holds are skipped.
PICK_DELIVERIES = f"""
SELECT id, brand, order_id, version, status, lost_leases, lease_token FROM deliveries
WHERE sink = %(sink)s
  AND ((status = 'pending' AND retry_at <= %(now)s)
       OR (status = 'running' AND lease_until <= {LEASE_NOW}))
  AND NOT (id = ANY(%(seen)s::bigint[]))
ORDER BY retry_at, id
LIMIT %(limit)s
FOR UPDATE OF deliveries SKIP LOCKED
"""
# Only one claimer at a time decides about a (sink, order); the others skip it.
LOCK_SINK_ORDER = """
SELECT pg_try_advisory_xact_lock(
    hashtextextended(%(sink)s || chr(31) || %(brand)s || chr(31) || %(order_id)s::text, 0)
) AS locked
"""
# Another version of the order is in flight (live lease) or held by a claimer.
RUNNING_SIBLING = f"""
SELECT id, lease_until <= {LEASE_NOW} AS expired FROM deliveries
WHERE sink = %(sink)s AND brand = %(brand)s AND order_id = %(order_id)s
  AND status = 'running' AND id <> %(id)s
"""
# An expired sibling goes back to pending, so a newer claim may start (its old holder
# then loses, as for any reclaimed lease).
VOID_EXPIRED_SIBLING = """
UPDATE deliveries SET status = 'pending', lease_until = NULL, lease_token = NULL,
    lost_leases = lost_leases + 1, updated_at = %(now)s
WHERE id = ANY(%(ids)s::bigint[]) AND status = 'running'
"""
# Once a newer version of the (sink, order) has been attempted (claimed for sending,
# whatever its outcome: a timeout may have landed), an older one is never sent again.
NEWEST_ATTEMPTED_VERSION = """
SELECT MAX(version) AS version FROM deliveries
WHERE sink = %(sink)s AND brand = %(brand)s AND order_id = %(order_id)s
  AND claimed_at IS NOT NULL
"""
# Claiming a version retires the older ones still waiting: they could only go out
# behind it.
SUPERSEDE_OLDER_UNSENT = """
UPDATE deliveries SET
    status = 'superseded', lease_until = NULL, lease_token = NULL, updated_at = %(now)s
WHERE sink = %(sink)s AND brand = %(brand)s AND order_id = %(order_id)s
  AND version < %(version)s AND status = 'pending'
"""
SUPERSEDE_DELIVERY = """
UPDATE deliveries SET
    status = 'superseded', lease_until = NULL, lease_token = NULL, updated_at = %(now)s
WHERE id = %(id)s
"""
# The attempt counts at claim time; a claim of running work (its lease ran out with
# nothing recorded) is one more lost lease in a row.
CLAIM_DELIVERY = f"""
UPDATE deliveries AS d SET
    status = 'running', lease_until = {LEASE_NOW} + %(lease_seconds)s,
    lease_token = gen_random_uuid()::text, updated_at = %(now)s,
    attempts = d.attempts + 1,
    lost_leases = d.lost_leases + CASE WHEN d.status = 'running' THEN 1 ELSE 0 END,
    claimed_at = COALESCE(d.claimed_at, %(now)s)
FROM snapshots AS s
WHERE d.id = %(id)s AND s.id = d.snapshot_id
  AND ((d.status = 'pending' AND d.retry_at <= %(now)s)
       OR (d.status = 'running' AND d.lease_until <= {LEASE_NOW}))
  AND NOT EXISTS (
    SELECT 1 FROM deliveries AS newer
    WHERE newer.sink = d.sink AND newer.brand = d.brand AND newer.order_id = d.order_id
      AND newer.version > d.version AND newer.claimed_at IS NOT NULL)
RETURNING d.*, s.key AS snapshot_key, s.body AS body,
    ARRAY(
        SELECT n.traceparent FROM notifications AS n
        WHERE n.snapshot_id = d.snapshot_id AND n.traceparent IS NOT NULL
        ORDER BY n.id LIMIT 32
    ) AS traceparents
"""
EXTEND_DELIVERY_LEASE = f"""
UPDATE deliveries SET lease_until = {LEASE_NOW} + %(lease_seconds)s
WHERE id = %(id)s AND status = 'running' AND lease_token = %(lease_token)s
"""
DELIVERY_FOR_LETTER = """
SELECT d.*, s.key AS snapshot_key FROM deliveries AS d
JOIN snapshots AS s ON s.id = d.snapshot_id WHERE d.id = %(id)s
"""
COMPLETE_DELIVERY = """
UPDATE deliveries SET
    status = 'done', delivered_at = %(now)s, last_error = NULL,
    lease_until = NULL, lease_token = NULL, updated_at = %(now)s
WHERE id = %(id)s AND status = 'running' AND lease_token = %(lease_token)s
RETURNING sink, brand, order_id, version
"""
RESOLVE_DELIVERY_LETTERS = """
DELETE FROM dead_letters
WHERE kind = 'delivery' AND sink = %(sink)s AND brand = %(brand)s AND order_id = %(order_id)s
  AND delivery_id IN (
    SELECT id FROM deliveries
    WHERE sink = %(sink)s AND brand = %(brand)s AND order_id = %(order_id)s
      AND version <= %(version)s)
"""
RETRY_DELIVERY = """
UPDATE deliveries SET
    status = 'pending', retry_at = %(retry_at)s, last_error = %(error)s, lost_leases = 0,
    attempts = GREATEST(attempts - 1 + %(add_attempt)s, 0),
    lease_until = NULL, lease_token = NULL, updated_at = %(now)s
WHERE id = %(id)s AND status = 'running' AND lease_token = %(lease_token)s
"""
RELEASE_DELIVERY = """
UPDATE deliveries SET
    status = 'pending', attempts = GREATEST(attempts - 1, 0),
    lease_until = NULL, lease_token = NULL, updated_at = %(now)s
WHERE id = %(id)s AND status = 'running' AND lease_token = %(lease_token)s
"""
DEAD_DELIVERY = """
UPDATE deliveries SET
    status = 'dead', last_error = %(error)s, lease_until = NULL, lease_token = NULL,
    lost_leases = 0, updated_at = %(now)s
WHERE id = %(id)s AND status = 'running' AND lease_token = %(lease_token)s
RETURNING attempts
"""

# --- dead letters -----------------------------------------------------------------------

INSERT_DEAD_LETTER = """
INSERT INTO dead_letters (
    kind, brand, order_id, sink, reason, last_error, attempts, created_at,
    job_id, delivery_id, snapshot_key
) VALUES (
    %(kind)s, %(brand)s, %(order_id)s, %(sink)s, %(reason)s, %(last_error)s, %(attempts)s,
    %(created_at)s, %(job_id)s, %(delivery_id)s, %(snapshot_key)s
)
"""
# Dead-letter filters: a NULL parameter means "any".
_FILTER = """
    (%(brand)s::text IS NULL OR brand = %(brand)s)
    AND (%(sink)s::text IS NULL OR sink = %(sink)s)
    AND (%(reason)s::text IS NULL OR reason = %(reason)s)
    AND (%(kind)s::text IS NULL OR kind = %(kind)s)
"""
LIST_DEAD_LETTERS = f"""
SELECT * FROM dead_letters WHERE id > %(after_id)s AND {_FILTER}
ORDER BY id LIMIT %(limit)s
"""
COUNT_DEAD_LETTERS = f"SELECT COUNT(*) AS n FROM dead_letters WHERE {_FILTER}"
DEAD_LETTER_IDS = f"SELECT id FROM dead_letters WHERE {_FILTER} ORDER BY id LIMIT %(limit)s"
PURGE_DEAD_LETTERS = f"DELETE FROM dead_letters WHERE {_FILTER}"
GET_DEAD_LETTER = "SELECT * FROM dead_letters WHERE id = %(id)s"
LOCK_DEAD_LETTER = "SELECT * FROM dead_letters WHERE id = %(id)s FOR UPDATE"
DELETE_DEAD_LETTER = "DELETE FROM dead_letters WHERE id = %(id)s"
REPLAY_DELIVERY = """
UPDATE deliveries SET
    status = 'pending', attempts = 0, lost_leases = 0, retry_at = %(now)s, lease_until = NULL,
    lease_token = NULL, created_at = %(now)s, updated_at = %(now)s
WHERE id = %(id)s AND status = 'dead'
"""
DELIVERY_PLACE = """
SELECT sink, brand, order_id, version FROM deliveries WHERE id = %(id)s FOR UPDATE
"""

# --- upkeep -----------------------------------------------------------------------------

# As SQLite's (app/store/sql.py): chunked, and keeping what ordering and letters need.
PRUNE_DELIVERIES = """
DELETE FROM deliveries WHERE id IN (
  SELECT id FROM deliveries AS d
  WHERE d.status IN ('done', 'superseded', 'dead') AND d.updated_at < %(cutoff)s
    AND (d.status <> 'dead'
         OR NOT EXISTS (SELECT 1 FROM dead_letters AS dl WHERE dl.delivery_id = d.id))
    AND NOT (
      d.claimed_at IS NOT NULL
      AND EXISTS (
        SELECT 1 FROM deliveries AS o
        WHERE o.sink = d.sink AND o.brand = d.brand AND o.order_id = d.order_id
          AND o.version < d.version
          AND (o.status IN ('pending', 'running')
               OR (o.status = 'dead' AND EXISTS (
                     SELECT 1 FROM dead_letters AS dl WHERE dl.delivery_id = o.id))))
      AND NOT EXISTS (
        SELECT 1 FROM deliveries AS n
        WHERE n.sink = d.sink AND n.brand = d.brand AND n.order_id = d.order_id
          AND n.version > d.version AND n.claimed_at IS NOT NULL))
  LIMIT %(chunk)s
)
"""
PRUNE_NOTIFICATIONS = """
DELETE FROM notifications WHERE id IN (
  SELECT n.id FROM notifications AS n
  WHERE n.received_at < %(cutoff)s
    AND (n.snapshot_id IS NOT NULL OR EXISTS (
      SELECT 1 FROM hydration_jobs AS j
      WHERE j.id = n.job_id
        AND (j.status = 'done'
         OR (j.status = 'dead' AND NOT EXISTS (
               SELECT 1 FROM dead_letters AS dl
               WHERE dl.kind = 'hydration' AND dl.brand = j.brand
                 AND dl.order_id = j.order_id)))))
  LIMIT %(chunk)s
)
"""
# SKIP LOCKED: a job an enqueue holds is live, not prunable.
PRUNE_JOBS = """
DELETE FROM hydration_jobs WHERE id IN (
  SELECT j.id FROM hydration_jobs AS j
  WHERE j.status IN ('done', 'dead') AND j.updated_at < %(cutoff)s
    AND (j.status = 'done'
         OR (j.status = 'dead' AND NOT EXISTS (
               SELECT 1 FROM dead_letters AS dl
               WHERE dl.kind = 'hydration' AND dl.brand = j.brand
                 AND dl.order_id = j.order_id)))
    AND NOT EXISTS (SELECT 1 FROM notifications AS n WHERE n.job_id = j.id)
  LIMIT %(chunk)s
  FOR UPDATE SKIP LOCKED
)
"""
PRUNE_SNAPSHOTS = """
DELETE FROM snapshots WHERE id IN (
  SELECT s.id FROM snapshots AS s
  WHERE s.hydrated_at < %(cutoff)s
    AND NOT EXISTS (SELECT 1 FROM deliveries AS d WHERE d.snapshot_id = s.id)
    AND NOT EXISTS (SELECT 1 FROM notifications AS n WHERE n.snapshot_id = s.id)
    AND (
      s.version < (SELECT MAX(version) FROM snapshots AS t
                   WHERE t.brand = s.brand AND t.order_id = s.order_id)
      OR NOT EXISTS (SELECT 1 FROM hydration_jobs AS j
                     WHERE j.brand = s.brand AND j.order_id = s.order_id)
    )
  LIMIT %(chunk)s
)
"""

# --- reconciliation poller ----------------------------------------------------------------

GET_POLL_WATERMARK = "SELECT updated_at FROM poll_watermarks WHERE brand = %(brand)s"
SET_POLL_WATERMARK = """
INSERT INTO poll_watermarks (brand, updated_at, set_at)
VALUES (%(brand)s, %(updated_at)s, %(now)s)
ON CONFLICT (brand) DO UPDATE SET
    updated_at = GREATEST(poll_watermarks.updated_at, excluded.updated_at),
    set_at = excluded.set_at
RETURNING updated_at
"""
KNOWN_STATES = """
SELECT order_id, last_snapshot_key, last_updated_at FROM hydration_jobs
WHERE brand = %(brand)s AND order_id = ANY(%(ids)s::bigint[])
"""

# --- observation ------------------------------------------------------------------------

PENDING_JOB_STATS = """
SELECT COUNT(*) AS n, MIN(CASE WHEN retry_at <= %(now)s THEN pending_since END) AS oldest
FROM hydration_jobs WHERE status = 'pending'
"""
RUNNING_JOB_STATS = """
SELECT COUNT(*) AS n, MIN(pending_since) AS oldest FROM hydration_jobs
WHERE status = 'running'
"""
PENDING_DELIVERY_STATS = """
SELECT sink, COUNT(*) AS n,
       MIN(CASE WHEN retry_at <= %(now)s THEN first_received_at END) AS oldest
FROM deliveries WHERE status = 'pending' GROUP BY sink
"""
RUNNING_DELIVERY_STATS = """
SELECT sink, COUNT(*) AS n, MIN(first_received_at) AS oldest FROM deliveries
WHERE status = 'running' GROUP BY sink
"""
DEAD_LETTER_STATS = """
SELECT kind, reason, COALESCE(sink, '') AS sink, COUNT(*) AS n FROM dead_letters
GROUP BY kind, reason, COALESCE(sink, '')
"""
LATEST_SNAPSHOT_BODY = """
SELECT body FROM snapshots WHERE brand = %(brand)s AND order_id = %(order_id)s
ORDER BY version DESC LIMIT 1
"""
HEARTBEAT = "UPDATE heartbeat SET beats = beats + 1, beat_at = %(now)s WHERE id = 1"

# --- the shared Clopos budget (functions of migrations_pg/0004_rate_budgets.sql) ----------

TAKE_RATE_BUDGET = """
SELECT take_rate_budget(
    %(tenant)s, %(limit)s, %(burst)s, %(margin)s, %(reserve_fraction)s) AS wait
"""
OBSERVE_RATE_BUDGET = """
SELECT observe_rate_budget(%(tenant)s, %(limit)s, %(remaining)s, %(reset)s, %(hold)s)
"""
RATE_BUDGETS = """
SELECT tenant, grants, server_limit,
       GREATEST(held_until - extract(epoch FROM clock_timestamp()), 0) AS held_for
FROM rate_budgets
"""
# The rows as /admin/status shows them: relative to the database's clock.
SHARED_BUDGETS = """
SELECT tenant, grants, server_limit,
       GREATEST(tat - c.now_s, 0) AS tat_ahead,
       GREATEST(held_until - c.now_s, 0) AS held_for,
       CASE WHEN server_reset_at > c.now_s
            THEN GREATEST(server_remaining - granted_since_observation, 0) END AS remaining,
       GREATEST(server_reset_at - c.now_s, 0) AS reset_in
FROM rate_budgets, LATERAL (SELECT extract(epoch FROM clock_timestamp()) AS now_s) AS c
"""

# --- one poller per brand across replicas ------------------------------------------------

# Session-level advisory locks (classid, objid) on a connection of their own: held while
# that connection lives, released by the server the moment the process dies.
POLLER_LOCK_CLASS = 0x706F6C6C  # "poll"
TRY_LEAD_POLLER = "SELECT pg_try_advisory_lock(%(class)s, hashtext(%(brand)s)) AS locked"
STILL_CONNECTED = "SELECT 1"
# The holder is whoever's session has that lock granted: its application_name names it.
POLLER_HOLDER = """
SELECT a.application_name AS holder FROM pg_locks AS l
JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.classid = %(class)s::oid AND l.objid = hashtext(%(brand)s)::oid
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""

# --- a per-process budget's ledger (the port's record_budget_spend) ------------------------

RECORD_BUDGET_SPEND = """
INSERT INTO budget_spend (tenant, at, limit_per_minute) VALUES (%(tenant)s, %(at)s, %(limit)s)
"""
FORGET_BUDGET_SPEND = "DELETE FROM budget_spend WHERE at < %(before)s"
BUDGET_SPEND_SINCE = """
SELECT tenant, at, limit_per_minute FROM budget_spend WHERE at > %(since)s ORDER BY at, id
"""
