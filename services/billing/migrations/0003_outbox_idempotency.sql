-- Platform tables billing uses: the transactional outbox (P02, keel_pg::outbox) and the
-- idempotency keys of the gRPC API (P13, keel_pg::idempotency). DDL as those modules document.

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

CREATE TABLE idempotency_keys (
    scope        text NOT NULL,   -- the RPC method
    key          text NOT NULL,
    request_hash bytea NOT NULL,  -- fingerprint of the request: same key + other request = misuse
    status_code  int,             -- NULL while in progress
    response     jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
