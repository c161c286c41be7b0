"""Every SQL statement of the SQLite store, as named queries in one place.

Parameters are named (``:name``). Times are epoch seconds. The statements are
written so each one uses an index: claim queries read the partial ``*_due`` and
``*_lease`` indexes separately (an ``OR`` of the two would scan) and the store
merges their results. Schema lives in ``migrations/``.
"""

from __future__ import annotations

import functools

# --- schema bookkeeping ---------------------------------------------------------------

CREATE_SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version TEXT PRIMARY KEY,
    applied_at REAL NOT NULL
)
"""
MIGRATION_APPLIED = "SELECT 1 FROM schema_migrations WHERE version = :version"
RECORD_MIGRATION = (
    "INSERT INTO schema_migrations (version, applied_at) VALUES (:version, :applied_at)"
)

# --- start-up ---------------------------------------------------------------------------

# One process per SQLite file (product.md): a lease still held when the store opens
# belongs to a process that died, so it is void now rather than after its expiry.
VOID_JOB_LEASES = "UPDATE hydration_jobs SET lease_until = 0 WHERE status = 'running'"
VOID_DELIVERY_LEASES = "UPDATE deliveries SET lease_until = 0 WHERE status = 'running'"

# --- ingest -----------------------------------------------------------------------------

# Exact repeats only: a sender reusing a message id for another order sent a new notice.
FIND_DUPLICATE = """
SELECT job_id, signed_at FROM notifications
WHERE brand = :brand AND dedup_key = :dedup_key AND order_id = :order_id
"""
GET_JOB = "SELECT * FROM hydration_jobs WHERE id = :id"
GET_JOB_BY_ORDER = "SELECT * FROM hydration_jobs WHERE brand = :brand AND order_id = :order_id"
LATEST_SNAPSHOT_META = """
SELECT id, version, key, order_updated_at, hydrated_at FROM snapshots
WHERE brand = :brand AND order_id = :order_id
ORDER BY version DESC LIMIT 1
"""
INSERT_JOB = """
INSERT INTO hydration_jobs (
    brand, order_id, venue_id, status, generation, force_generation, retry_at,
    pending_since, last_version, last_snapshot_key, last_updated_at, created_at, updated_at
) VALUES (
    :brand, :order_id, :venue_id, 'pending', 1, :force_generation, :now,
    :now, :last_version, :last_snapshot_key, :last_updated_at, :now, :now
)
"""
# What a notice may change in its order's job (rules.JobPatch.columns).
JOB_NOTICE_COLUMNS = frozenset(
    {
        "status",
        "venue_id",
        "generation",
        "force_generation",
        "attempts",
        "not_found_attempts",
        "retry_at",
        "pending_since",
        "last_error",
    }
)


@functools.cache
def update_job_on_notice(columns: tuple[str, ...]) -> str:
    """The UPDATE of a job after a notice, setting only the columns that notice changed
    (and ``updated_at``): SQLite then leaves alone the indexes over the others. A
    coalescing notice mostly changes just the generation, and setting every column cost
    it 8 us more per notice (docs/performance.md)."""
    unknown = set(columns) - JOB_NOTICE_COLUMNS
    if unknown:
        raise ValueError(f"not a column a notice sets: {sorted(unknown)}")
    assignments = "".join(f"{column} = :{column}, " for column in columns)
    # Only names from JOB_NOTICE_COLUMNS reach the text (checked above); values are bound.
    return f"UPDATE hydration_jobs SET {assignments}updated_at = :now WHERE id = :id"  # noqa: S608


INSERT_NOTIFICATION = """
INSERT INTO notifications (
    job_id, brand, order_id, venue_id, dedup_key, signed_at, source, force, received_at,
    traceparent
) VALUES (
    :job_id, :brand, :order_id, :venue_id, :dedup_key, :signed_at, :source, :force,
    :received_at, :traceparent
)
"""

# --- hydration queue --------------------------------------------------------------------

DUE_PENDING_JOBS = """
SELECT id, retry_at, status, lost_leases FROM hydration_jobs
WHERE status = 'pending' AND retry_at <= :now
  AND brand NOT IN (SELECT value FROM json_each(:exclude))
ORDER BY retry_at, id LIMIT :limit
"""
EXPIRED_RUNNING_JOBS = """
SELECT id, retry_at, status, lost_leases FROM hydration_jobs
WHERE status = 'running' AND lease_until <= :now
  AND brand NOT IN (SELECT value FROM json_each(:exclude))
ORDER BY lease_until, id LIMIT :limit
"""
UNCOVERED_SUMMARY = """
SELECT MAX(id) AS max_id, MIN(received_at) AS first_received_at FROM notifications
WHERE job_id = :job_id AND snapshot_id IS NULL
"""
# A claim states its own preconditions (due, or running on a lease that ran out), so it
# is correct under any concurrency, not only because one writer runs every statement:
# of two claimers that picked the same candidate, the second changes nothing.
# The attempt counts now, not when it ends: a claim that ends with no outcome (a crash,
# a lost lease) still counts, and is one more lost lease in a row (status is still
# 'running' only when the previous claim recorded nothing).
CLAIM_JOB = """
UPDATE hydration_jobs SET
    status = 'running', lease_until = :lease_until, lease_token = :lease_token,
    attempts = attempts + 1,
    lost_leases = lost_leases + CASE WHEN status = 'running' THEN 1 ELSE 0 END,
    claimed_generation = generation, claimed_notification_id = :max_id, updated_at = :now
WHERE id = :id
  AND ((status = 'pending' AND retry_at <= :now) OR (status = 'running' AND lease_until <= :now))
RETURNING *
"""
RECENT_UNCOVERED_IDS = """
SELECT id, traceparent FROM notifications
WHERE job_id = :job_id AND snapshot_id IS NULL AND id <= :max_id
ORDER BY id DESC LIMIT :limit
"""
# Running work extends its lease, so a fetch longer than LEASE_SECONDS is not taken over.
EXTEND_JOB_LEASE = """
UPDATE hydration_jobs SET lease_until = :lease_until
WHERE id = :id AND status = 'running' AND lease_token = :lease_token
"""
LEASED_JOB = """
SELECT * FROM hydration_jobs
WHERE id = :id AND status = 'running' AND lease_token = :lease_token
"""
# The order already had this exact state (a read that lags behind what was stored).
KNOWN_STATE = """
SELECT 1 FROM snapshots WHERE brand = :brand AND order_id = :order_id AND key = :key LIMIT 1
"""
INSERT_SNAPSHOT = """
INSERT INTO snapshots (brand, order_id, key, version, body, order_updated_at, hydrated_at)
VALUES (:brand, :order_id, :key, :version, :body, :order_updated_at, :hydrated_at)
"""
SUPERSEDE_OLDER_PENDING = """
UPDATE deliveries SET status = 'superseded', updated_at = :now
WHERE sink = :sink AND brand = :brand AND order_id = :order_id
  AND status = 'pending' AND version < :version
"""
INSERT_DELIVERY = """
INSERT INTO deliveries (
    snapshot_id, sink, brand, order_id, version, status, retry_at,
    created_at, updated_at, first_received_at
) VALUES (
    :snapshot_id, :sink, :brand, :order_id, :version, 'pending', :now,
    :now, :now, :first_received_at
)
"""
COVER_NOTIFICATIONS = """
UPDATE notifications SET snapshot_id = :snapshot_id
WHERE job_id = :job_id AND snapshot_id IS NULL AND id <= :max_id
"""
OLDEST_UNCOVERED = """
SELECT MIN(received_at) AS oldest FROM notifications
WHERE job_id = :job_id AND snapshot_id IS NULL
"""
# The notices a claim did not cover (they arrived during its fetch).
OLDEST_AFTER_CLAIM = """
SELECT MIN(received_at) AS oldest FROM notifications
WHERE job_id = :job_id AND snapshot_id IS NULL AND id > :after_id
"""
# A force asked for after the claim (a higher generation) outlives this completion.
FINISH_JOB = """
UPDATE hydration_jobs SET
    status = :status, retry_at = :retry_at, attempts = 0, not_found_attempts = 0,
    force_generation = CASE WHEN force_generation > claimed_generation
                            THEN force_generation ELSE 0 END,
    lease_until = NULL, lease_token = NULL, last_error = NULL, lost_leases = 0,
    pending_since = :pending_since, last_version = :last_version,
    last_snapshot_key = :last_snapshot_key, last_updated_at = :last_updated_at,
    updated_at = :now
WHERE id = :id
"""
# A forced notice (an operator's "hydrate now") that arrived during the failed fetch
# outranks the backoff, as it would have right after it: the job keeps its retry_at (it
# was due when claimed, so it is due at once) and starts over. The claim counted the
# attempt; an outcome that does not count (429, pause, not-found) gives it back.
RETRY_JOB = """
UPDATE hydration_jobs SET
    status = 'pending', last_error = :error, lost_leases = 0,
    retry_at = CASE WHEN force_generation > claimed_generation THEN retry_at
                    ELSE :retry_at END,
    attempts = CASE WHEN force_generation > claimed_generation THEN 0
                    ELSE MAX(attempts - 1 + :add_attempt, 0) END,
    not_found_attempts = CASE WHEN force_generation > claimed_generation THEN 0
                              ELSE not_found_attempts + :add_not_found END,
    lease_until = NULL, lease_token = NULL, updated_at = :now
WHERE id = :id AND status = 'running' AND lease_token = :lease_token
"""
# retry_at is left as it was: the job was due then, so it goes back to the front. The
# attempt the claim counted is given back: a shutdown is no failure.
RELEASE_JOB = """
UPDATE hydration_jobs SET
    status = 'pending', attempts = MAX(attempts - 1, 0),
    lease_until = NULL, lease_token = NULL, updated_at = :now
WHERE id = :id AND status = 'running' AND lease_token = :lease_token
"""
# Ends a leased job: 'dead', or 'pending' and due at :retry_at when notices arrived during
# the fetch (they are not lost). Either way it starts over, and a force survives only if
# it was asked after the claim (as in FINISH_JOB), so a revived job does not re-deliver.
END_JOB_FAILED = """
UPDATE hydration_jobs SET
    status = :status, retry_at = :retry_at, last_error = :error,
    attempts = 0, not_found_attempts = 0, lost_leases = 0,
    force_generation = CASE WHEN force_generation > claimed_generation
                            THEN force_generation ELSE 0 END,
    lease_until = NULL, lease_token = NULL, pending_since = :pending_since, updated_at = :now
WHERE id = :id AND status = 'running' AND lease_token = :lease_token
"""
# A later success resolves the order's hydration dead letters.
RESOLVE_HYDRATION_LETTERS = """
DELETE FROM dead_letters WHERE kind = 'hydration' AND brand = :brand AND order_id = :order_id
"""

# --- delivery queue ---------------------------------------------------------------------

# A candidate must not have a sibling (same sink and order) in flight with a live lease.
DUE_PENDING_DELIVERIES = """
SELECT d.id, d.brand, d.order_id, d.version, d.retry_at, d.status, d.lost_leases
FROM deliveries AS d
WHERE d.sink = :sink AND d.status = 'pending' AND d.retry_at <= :now
  AND NOT EXISTS (
    SELECT 1 FROM deliveries AS o
    WHERE o.sink = d.sink AND o.brand = d.brand AND o.order_id = d.order_id
      AND o.status = 'running' AND o.lease_until > :now AND o.id <> d.id
  )
ORDER BY d.retry_at, d.id LIMIT :limit
"""
EXPIRED_RUNNING_DELIVERIES = """
SELECT d.id, d.brand, d.order_id, d.version, d.retry_at, d.status, d.lost_leases
FROM deliveries AS d
WHERE d.sink = :sink AND d.status = 'running' AND d.lease_until <= :now
  AND NOT EXISTS (
    SELECT 1 FROM deliveries AS o
    WHERE o.sink = d.sink AND o.brand = d.brand AND o.order_id = d.order_id
      AND o.status = 'running' AND o.lease_until > :now AND o.id <> d.id
  )
ORDER BY d.lease_until, d.id LIMIT :limit
"""
# Once a newer version of the (sink, order) has been attempted (claimed for sending,
# whatever its outcome: a timeout may have landed), an older one is never sent again.
NEWEST_ATTEMPTED_VERSION = """
SELECT MAX(version) AS version FROM deliveries
WHERE sink = :sink AND brand = :brand AND order_id = :order_id AND claimed_at IS NOT NULL
"""
# Claiming a version retires the older ones still waiting (or orphaned by a lost lease):
# they could only go out behind it.
SUPERSEDE_OLDER_UNSENT = """
UPDATE deliveries SET
    status = 'superseded', lease_until = NULL, lease_token = NULL, updated_at = :now
WHERE sink = :sink AND brand = :brand AND order_id = :order_id AND version < :version
  AND (status = 'pending' OR (status = 'running' AND lease_until <= :now))
"""
SUPERSEDE_DELIVERY = """
UPDATE deliveries SET
    status = 'superseded', lease_until = NULL, lease_token = NULL, updated_at = :now
WHERE id = :id
"""
# As for jobs: the claim states its preconditions (due or lease run out, no sibling in
# flight, no newer version attempted), the attempt counts at claim time, and a claim of
# running work (its lease ran out with nothing recorded) is one more lost lease in a row.
CLAIM_DELIVERY = """
UPDATE deliveries SET
    status = 'running', lease_until = :lease_until, lease_token = :lease_token,
    attempts = attempts + 1,
    lost_leases = lost_leases + CASE WHEN status = 'running' THEN 1 ELSE 0 END,
    claimed_at = COALESCE(claimed_at, :now), updated_at = :now
WHERE id = :id
  AND ((status = 'pending' AND retry_at <= :now) OR (status = 'running' AND lease_until <= :now))
  AND NOT EXISTS (
    SELECT 1 FROM deliveries AS o
    WHERE o.sink = deliveries.sink AND o.brand = deliveries.brand
      AND o.order_id = deliveries.order_id AND o.id <> deliveries.id
      AND ((o.status = 'running' AND o.lease_until > :now)
           OR (o.version > deliveries.version AND o.claimed_at IS NOT NULL)))
RETURNING id
"""
EXTEND_DELIVERY_LEASE = """
UPDATE deliveries SET lease_until = :lease_until
WHERE id = :id AND status = 'running' AND lease_token = :lease_token
"""
CLAIMED_DELIVERY = """
SELECT d.*, s.key AS snapshot_key, s.body AS body,
    (SELECT json_group_array(traceparent) FROM (
        SELECT traceparent FROM notifications
        WHERE snapshot_id = d.snapshot_id AND traceparent IS NOT NULL
        ORDER BY id LIMIT 32
    )) AS traceparents
FROM deliveries AS d JOIN snapshots AS s ON s.id = d.snapshot_id
WHERE d.id = :id
"""
COMPLETE_DELIVERY = """
UPDATE deliveries SET
    status = 'done', delivered_at = :now, last_error = NULL,
    lease_until = NULL, lease_token = NULL, updated_at = :now
WHERE id = :id AND status = 'running' AND lease_token = :lease_token
RETURNING sink, brand, order_id, version
"""
# A delivered version resolves the sink's dead letters of that order up to it: they
# would be superseded at claim time anyway.
RESOLVE_DELIVERY_LETTERS = """
DELETE FROM dead_letters
WHERE kind = 'delivery' AND sink = :sink AND brand = :brand AND order_id = :order_id
  AND delivery_id IN (
    SELECT id FROM deliveries
    WHERE sink = :sink AND brand = :brand AND order_id = :order_id AND version <= :version)
"""
RETRY_DELIVERY = """
UPDATE deliveries SET
    status = 'pending', retry_at = :retry_at, last_error = :error, lost_leases = 0,
    attempts = MAX(attempts - 1 + :add_attempt, 0),
    lease_until = NULL, lease_token = NULL, updated_at = :now
WHERE id = :id AND status = 'running' AND lease_token = :lease_token
"""
# As for jobs: released work keeps its (past) retry_at, goes back to the front, and
# gets back the attempt its claim counted.
RELEASE_DELIVERY = """
UPDATE deliveries SET
    status = 'pending', attempts = MAX(attempts - 1, 0),
    lease_until = NULL, lease_token = NULL, updated_at = :now
WHERE id = :id AND status = 'running' AND lease_token = :lease_token
"""
DEAD_DELIVERY = """
UPDATE deliveries SET
    status = 'dead', last_error = :error, lease_until = NULL, lease_token = NULL,
    lost_leases = 0, updated_at = :now
WHERE id = :id AND status = 'running' AND lease_token = :lease_token
RETURNING attempts
"""

# --- dead letters -----------------------------------------------------------------------

INSERT_DEAD_LETTER = """
INSERT INTO dead_letters (
    kind, brand, order_id, sink, reason, last_error, attempts, created_at,
    job_id, delivery_id, snapshot_key
) VALUES (
    :kind, :brand, :order_id, :sink, :reason, :last_error, :attempts, :created_at,
    :job_id, :delivery_id, :snapshot_key
)
"""
# Dead-letter filters: a NULL parameter means "any".
LIST_DEAD_LETTERS = """
SELECT * FROM dead_letters
WHERE id > :after_id
  AND (:brand IS NULL OR brand = :brand)
  AND (:sink IS NULL OR sink = :sink)
  AND (:reason IS NULL OR reason = :reason)
  AND (:kind IS NULL OR kind = :kind)
ORDER BY id LIMIT :limit
"""
COUNT_DEAD_LETTERS = """
SELECT COUNT(*) FROM dead_letters
WHERE (:brand IS NULL OR brand = :brand)
  AND (:sink IS NULL OR sink = :sink)
  AND (:reason IS NULL OR reason = :reason)
  AND (:kind IS NULL OR kind = :kind)
"""
DEAD_LETTER_IDS = """
SELECT id FROM dead_letters
WHERE (:brand IS NULL OR brand = :brand)
  AND (:sink IS NULL OR sink = :sink)
  AND (:reason IS NULL OR reason = :reason)
  AND (:kind IS NULL OR kind = :kind)
ORDER BY id LIMIT :limit
"""
PURGE_DEAD_LETTERS = """
DELETE FROM dead_letters
WHERE (:brand IS NULL OR brand = :brand)
  AND (:sink IS NULL OR sink = :sink)
  AND (:reason IS NULL OR reason = :reason)
  AND (:kind IS NULL OR kind = :kind)
"""
GET_DEAD_LETTER = "SELECT * FROM dead_letters WHERE id = :id"
DELETE_DEAD_LETTER = "DELETE FROM dead_letters WHERE id = :id"
# A replayed delivery starts over: attempts and its give-up clock (created_at) reset.
REPLAY_DELIVERY = """
UPDATE deliveries SET
    status = 'pending', attempts = 0, lost_leases = 0, retry_at = :now,
    lease_until = NULL, lease_token = NULL, created_at = :now, updated_at = :now
WHERE id = :id AND status = 'dead'
"""
DELIVERY_PLACE = "SELECT sink, brand, order_id, version FROM deliveries WHERE id = :id"

# --- upkeep -----------------------------------------------------------------------------

# Each prune statement deletes at most :chunk rows so one call never holds the writer
# (and everyone's group commit) for long; the store repeats it until nothing is left.
# A dead delivery stays while its dead letter does. The newest attempted delivery of a
# (sink, order) stays while an older one of that (sink, order) may still go out (pending,
# running, or dead with a letter to replay): it is what the claim-time "never older"
# check reads, so the older one is superseded rather than sent over a newer state.
PRUNE_DELIVERIES = """
DELETE FROM deliveries WHERE id IN (
  SELECT id FROM deliveries AS d
  WHERE d.status IN ('done', 'superseded', 'dead') AND d.updated_at < :cutoff
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
  LIMIT :chunk
)
"""
# A job is finished when done, or dead with its dead letter gone (purged). Its notices
# go once they are old; the job goes once it is old and has no notices left.
PRUNE_NOTIFICATIONS = """
DELETE FROM notifications WHERE id IN (
  SELECT n.id FROM notifications AS n
  WHERE n.received_at < :cutoff
    AND (n.snapshot_id IS NOT NULL OR EXISTS (
      SELECT 1 FROM hydration_jobs AS j
      WHERE j.id = n.job_id
        AND (j.status = 'done'
         OR (j.status = 'dead' AND NOT EXISTS (
               SELECT 1 FROM dead_letters AS dl
               WHERE dl.kind = 'hydration' AND dl.brand = j.brand
                 AND dl.order_id = j.order_id)))))
  LIMIT :chunk
)
"""
PRUNE_JOBS = """
DELETE FROM hydration_jobs WHERE id IN (
  SELECT j.id FROM hydration_jobs AS j
  WHERE j.status IN ('done', 'dead') AND j.updated_at < :cutoff
    AND (j.status = 'done'
         OR (j.status = 'dead' AND NOT EXISTS (
               SELECT 1 FROM dead_letters AS dl
               WHERE dl.kind = 'hydration' AND dl.brand = j.brand
                 AND dl.order_id = j.order_id)))
    AND NOT EXISTS (SELECT 1 FROM notifications AS n WHERE n.job_id = j.id)
  LIMIT :chunk
)
"""
# The newest snapshot of an order is kept as long as the order's job exists, for
# operators and for the unchanged/stale checks of the next fetch.
PRUNE_SNAPSHOTS = """
DELETE FROM snapshots WHERE id IN (
  SELECT s.id FROM snapshots AS s
  WHERE s.hydrated_at < :cutoff
    AND NOT EXISTS (SELECT 1 FROM deliveries AS d WHERE d.snapshot_id = s.id)
    AND NOT EXISTS (SELECT 1 FROM notifications AS n WHERE n.snapshot_id = s.id)
    AND (
      s.version < (SELECT MAX(version) FROM snapshots AS t
                   WHERE t.brand = s.brand AND t.order_id = s.order_id)
      OR NOT EXISTS (SELECT 1 FROM hydration_jobs AS j
                     WHERE j.brand = s.brand AND j.order_id = s.order_id)
    )
  LIMIT :chunk
)
"""

# --- reconciliation poller ----------------------------------------------------------------

GET_POLL_WATERMARK = "SELECT updated_at FROM poll_watermarks WHERE brand = :brand"
# Never backwards: two cycles (or, later, two replicas) finishing out of order keep the
# newer position.
SET_POLL_WATERMARK = """
INSERT INTO poll_watermarks (brand, updated_at, set_at) VALUES (:brand, :updated_at, :now)
ON CONFLICT (brand) DO UPDATE SET
    updated_at = MAX(poll_watermarks.updated_at, excluded.updated_at),
    set_at = excluded.set_at
RETURNING updated_at
"""
# The job mirrors its order's newest snapshot (last_updated_at), and reads by the
# (brand, order_id) unique index. :ids is a JSON list of integers.
KNOWN_STATES = """
SELECT order_id, last_snapshot_key, last_updated_at FROM hydration_jobs
WHERE brand = :brand AND order_id IN (SELECT value FROM json_each(:ids))
"""

# --- observation ------------------------------------------------------------------------

# One statement per status (not a bound :status) so each reads its partial index. Every
# pending item counts, but only due ones (and running ones) set the age: work waiting in
# a deliberate backoff is not a backlog.
PENDING_JOB_STATS = """
SELECT COUNT(*) AS n, MIN(CASE WHEN retry_at <= :now THEN pending_since END) AS oldest
FROM hydration_jobs WHERE status = 'pending'
"""
RUNNING_JOB_STATS = """
SELECT COUNT(*) AS n, MIN(pending_since) AS oldest FROM hydration_jobs WHERE status = 'running'
"""
PENDING_DELIVERY_STATS = """
SELECT sink, COUNT(*) AS n, MIN(CASE WHEN retry_at <= :now THEN first_received_at END) AS oldest
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
SELECT body FROM snapshots WHERE brand = :brand AND order_id = :order_id
ORDER BY version DESC LIMIT 1
"""
HEARTBEAT = "UPDATE heartbeat SET beats = beats + 1, beat_at = :now WHERE id = 1"

# --- the Clopos rate budget -------------------------------------------------------------

RECORD_BUDGET_SPEND = """
INSERT INTO budget_spend (tenant, at, limit_per_minute) VALUES (:tenant, :at, :limit)
"""
FORGET_BUDGET_SPEND = "DELETE FROM budget_spend WHERE at < :before"
BUDGET_SPEND_SINCE = """
SELECT tenant, at, limit_per_minute FROM budget_spend WHERE at > :since ORDER BY at, id
"""
