-- The Clopos budget shared by every replica: one row per tenant (integrator_id:brand).
-- Clopos counts a tenant's calls centrally, whichever process makes them, so the
-- replicas draw on this one row. Times are epoch seconds on the database's clock
-- (clock_timestamp()), never a replica's.
CREATE TABLE rate_budgets (
    tenant TEXT PRIMARY KEY,
    -- GCRA "theoretical arrival time": the next call conforms at tat - burst allowance.
    tat DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_grant DOUBLE PRECISION NOT NULL DEFAULT 0,
    -- After a 429 the whole tenant waits until then.
    held_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    -- What Clopos last said (RateLimit-* headers), and what was granted since.
    server_limit INTEGER,
    server_remaining INTEGER,
    server_reset_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    granted_since_observation INTEGER NOT NULL DEFAULT 0,
    grants BIGINT NOT NULL DEFAULT 0
);

-- Take one call's slot for p_tenant now, or say how long to wait (seconds; 0 = taken).
-- One statement: the row lock lasts this function call only, never an HTTP call.
-- GCRA with interval T and a burst of b lets at most W/T + b calls through in any
-- window W, so T = (60 s + p_margin) / (limit - b) keeps every window under the limit.
CREATE FUNCTION take_rate_budget(
    p_tenant TEXT, p_limit INTEGER, p_burst INTEGER, p_margin DOUBLE PRECISION,
    p_reserve_fraction DOUBLE PRECISION
) RETURNS DOUBLE PRECISION
LANGUAGE plpgsql AS $$
DECLARE
    b rate_budgets%ROWTYPE;
    now_s DOUBLE PRECISION;
    lim INTEGER;
    step DOUBLE PRECISION;
    ready DOUBLE PRECISION;
    usable INTEGER;
BEGIN
    INSERT INTO rate_budgets (tenant) VALUES (p_tenant) ON CONFLICT (tenant) DO NOTHING;
    SELECT * INTO b FROM rate_budgets WHERE tenant = p_tenant FOR UPDATE;
    now_s := extract(epoch FROM clock_timestamp());  -- after any wait for the lock
    lim := p_limit;
    IF b.server_limit IS NOT NULL AND b.server_limit > 0 AND b.server_limit < lim THEN
        lim := b.server_limit;  -- Clopos announced a lower limit
    END IF;
    step := (60.0 + p_margin) / GREATEST(lim - p_burst, 1);
    ready := GREATEST(b.held_until, b.tat - (p_burst - 1) * step);
    IF b.server_remaining IS NOT NULL AND b.server_reset_at > now_s THEN
        -- Spread what Clopos says remains (less what was granted since) until its reset.
        usable := b.server_remaining - b.granted_since_observation
                  - GREATEST(1, round(lim * p_reserve_fraction)::INTEGER);
        IF usable <= 0 THEN
            ready := GREATEST(ready, b.server_reset_at);
        ELSE
            ready := GREATEST(ready, b.last_grant + (b.server_reset_at - now_s) / usable);
        END IF;
    END IF;
    IF ready > now_s THEN
        RETURN ready - now_s;
    END IF;
    UPDATE rate_budgets SET
        tat = GREATEST(tat, now_s) + step, last_grant = now_s,
        granted_since_observation = granted_since_observation + 1, grants = grants + 1
    WHERE tenant = p_tenant;
    RETURN 0;
END
$$;

-- Feed back what Clopos answered: RateLimit-* headers (NULL when absent) and, for a 429,
-- how long the whole tenant must wait (p_hold seconds, NULL otherwise).
CREATE FUNCTION observe_rate_budget(
    p_tenant TEXT, p_limit INTEGER, p_remaining INTEGER, p_reset DOUBLE PRECISION,
    p_hold DOUBLE PRECISION
) RETURNS VOID
LANGUAGE plpgsql AS $$
DECLARE
    now_s DOUBLE PRECISION;
BEGIN
    INSERT INTO rate_budgets (tenant) VALUES (p_tenant) ON CONFLICT (tenant) DO NOTHING;
    PERFORM 1 FROM rate_budgets WHERE tenant = p_tenant FOR UPDATE;
    now_s := extract(epoch FROM clock_timestamp());
    IF p_limit IS NOT NULL AND p_limit >= 1 THEN
        UPDATE rate_budgets SET server_limit = p_limit WHERE tenant = p_tenant;
    END IF;
    IF p_remaining IS NOT NULL AND p_reset IS NOT NULL THEN
        UPDATE rate_budgets SET
            server_remaining = p_remaining, server_reset_at = now_s + p_reset,
            granted_since_observation = 0
        WHERE tenant = p_tenant;
    END IF;
    IF p_hold IS NOT NULL THEN
        UPDATE rate_budgets SET
            held_until = GREATEST(held_until, now_s + p_hold),
            server_remaining = 0,
            server_reset_at = GREATEST(server_reset_at, held_until, now_s + p_hold),
            granted_since_observation = 0
        WHERE tenant = p_tenant;
    END IF;
END
$$;
