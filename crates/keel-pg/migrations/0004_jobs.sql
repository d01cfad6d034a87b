-- Postgres job queue (P08), used by keel_pg::jobs: claimed with FOR UPDATE SKIP LOCKED,
-- leased (lease_expires_at, locked_by fence a worker whose lease was taken over), retried
-- with backoff until max_attempts, then `failed` for an operator to see and retry.
CREATE TABLE jobs (
    id               uuid PRIMARY KEY,
    queue            text NOT NULL,
    payload          jsonb NOT NULL,
    state            text NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'running', 'succeeded', 'failed')),
    attempts         int NOT NULL DEFAULT 0,
    max_attempts     int NOT NULL CHECK (max_attempts > 0),
    run_at           timestamptz NOT NULL DEFAULT now(),
    lease_expires_at timestamptz,
    locked_by        text,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
-- What a claim looks for: due jobs of one queue, and running ones whose lease may have expired.
CREATE INDEX jobs_claimable ON jobs (queue, run_at) WHERE state IN ('queued', 'running');

-- Rows only, for the app role paired with this owner (see 0001).
DO $$
BEGIN
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON jobs TO %I',
                   regexp_replace(current_user, '_owner$', '_app'));
END
$$;
