-- As SQLite's 0004 and 0005 (app/store/migrations): deliveries remember when they were
-- first claimed for sending (never backwards under unknown outcomes: an attempted newer
-- version supersedes older ones), and both queues count lost leases in a row (claims
-- that ended with nothing recorded; at MAX_LOST_LEASES the work ends in a dead letter).
ALTER TABLE deliveries ADD COLUMN claimed_at DOUBLE PRECISION;
UPDATE deliveries SET claimed_at = updated_at
WHERE status IN ('running', 'done', 'dead') OR attempts > 0;
ALTER TABLE hydration_jobs ADD COLUMN lost_leases INTEGER NOT NULL DEFAULT 0;
ALTER TABLE deliveries ADD COLUMN lost_leases INTEGER NOT NULL DEFAULT 0;
