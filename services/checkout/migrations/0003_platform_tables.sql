-- The keel-pg platform tables, DDL exactly as documented in crates/keel-pg: the transactional
-- outbox (P02), the job queue that runs sagas and maintenance (P08) and the idempotency keys
-- of POST /v1/orders (P13). The runtime role's DML grants come from the default privileges
-- set in 0001; identity sequences likewise.

CREATE TABLE outbox (
    id             uuid PRIMARY KEY,
    seq            bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    event_type     text NOT NULL,
    payload        jsonb NOT NULL,          -- the whole keel_contracts::events::Envelope
    traceparent    text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    sent_at        timestamptz,
    attempts       int NOT NULL DEFAULT 0,
    last_error     text
);
CREATE INDEX outbox_unsent ON outbox (seq) WHERE sent_at IS NULL;
CREATE INDEX outbox_unsent_aggregate ON outbox (aggregate_type, aggregate_id, seq) WHERE sent_at IS NULL;

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
CREATE INDEX jobs_claimable ON jobs (queue, run_at) WHERE state IN ('queued', 'running');

CREATE TABLE idempotency_keys (
    scope        text NOT NULL,   -- the caller (API key, customer, RPC method)
    key          text NOT NULL,
    request_hash bytea NOT NULL,  -- fingerprint of the request: same key + other body = misuse
    status_code  int,             -- NULL while in progress (two-phase use only)
    response     jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
