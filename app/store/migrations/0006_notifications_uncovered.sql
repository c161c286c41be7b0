-- The notices still waiting for a fetch, by job: what a claim, a completion and a list
-- page read (MAX(id), MIN(received_at), "cover those before the read"). Through
-- notifications_job those reads walked every notice the order ever had, so their cost
-- grew with its history: under a steady stream of notices for the same orders, one list
-- page's store operation took 30-80 ms and held every webhook's commit behind it
-- (docs/performance.md). This index only holds the waiting ones, so it stays small and
-- a fetch's bookkeeping costs the same on day one and day ninety. PostgreSQL has had
-- the same index from its first migration.
CREATE INDEX notifications_uncovered ON notifications (job_id, id) WHERE snapshot_id IS NULL;
