-- Duplicate detection matches exact repeats only: a sender that reuses a message id for
-- another order sent a new notice, so the key is (brand, dedup_key, order_id).
DROP INDEX notifications_dedup;
CREATE UNIQUE INDEX notifications_dedup ON notifications (brand, dedup_key, order_id)
    WHERE dedup_key IS NOT NULL;
