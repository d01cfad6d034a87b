-- The payment ledger (P10): an append-only event store, the projection it feeds, and the
-- receipts of the payment provider's webhooks (P32).

-- One stream per payment; versions 1, 2, 3, ... The primary key is the optimistic
-- concurrency check: two writers that decided on the same version cannot both append.
CREATE TABLE payment_events (
    stream_id   uuid        NOT NULL,
    version     bigint      NOT NULL CHECK (version > 0),
    event_type  text        NOT NULL,
    data        jsonb       NOT NULL,
    -- Causation: the idempotency key or webhook id that led to the event.
    metadata    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, version)
);
-- Append-only for real: the runtime role may read and insert, never rewrite history. The
-- default privileges of 0001 granted UPDATE and DELETE at CREATE; take them back (P14).
REVOKE UPDATE, DELETE, TRUNCATE ON payment_events FROM billing_app;

-- The read model: the fold of each stream, written in the transaction that appends.
-- Rebuildable from payment_events at any time (billing rebuild-projections).
CREATE TABLE payments (
    payment_id           uuid        PRIMARY KEY,
    order_id             uuid        NOT NULL,
    amount_minor         bigint      NOT NULL CHECK (amount_minor > 0),
    currency             text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    status               text        NOT NULL,
    psp_authorization_id text,
    decline_reason       text,
    version              bigint      NOT NULL,
    updated_at           timestamptz NOT NULL
);
CREATE INDEX payments_order_id ON payments (order_id);
CREATE INDEX payments_psp_authorization_id ON payments (psp_authorization_id)
    WHERE psp_authorization_id IS NOT NULL;

-- Every webhook applied, by its webhook-id: a replayed delivery finds its row and has no
-- second effect. Inserted in the transaction that applies the webhook.
CREATE TABLE webhook_receipts (
    webhook_id  text        PRIMARY KEY,
    event_type  text        NOT NULL,
    payment_id  uuid,
    received_at timestamptz NOT NULL DEFAULT now()
);
