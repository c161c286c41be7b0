-- Attempts are counted when work is claimed, so a lease that runs out (a crash, or work
-- that outlived its lease) still counts. lost_leases is how many claims in a row ended
-- with no outcome recorded; at a limit the next claim ends the work in a dead letter
-- (reason lease_lost) instead of trying it again forever.
ALTER TABLE hydration_jobs ADD COLUMN lost_leases INTEGER NOT NULL DEFAULT 0;
ALTER TABLE deliveries ADD COLUMN lost_leases INTEGER NOT NULL DEFAULT 0;
