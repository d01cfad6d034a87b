-- Idempotency keys (P13), used by keel_pg::idempotency: the first answer to a keyed request,
-- stored with its effect and given again to a retry.
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
-- purge_expired deletes in batches by expiry.
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);

-- Rows only, for the app role paired with this owner (see 0001).
DO $$
BEGIN
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON idempotency_keys TO %I',
                   regexp_replace(current_user, '_owner$', '_app'));
END
$$;
