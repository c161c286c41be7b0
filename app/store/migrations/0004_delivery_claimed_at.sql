-- Never backwards under unknown outcomes: once any version of a (sink, order) has been
-- handed to a sender, whatever came of it (a timeout may still have landed), no older
-- version of that (sink, order) is sent again. claimed_at is when a delivery was first
-- claimed for sending (NULL: never attempted); it is set once and never reset, not even
-- by a replay.
ALTER TABLE deliveries ADD COLUMN claimed_at REAL;
UPDATE deliveries SET claimed_at = updated_at
WHERE status IN ('running', 'done', 'dead') OR attempts > 0;
