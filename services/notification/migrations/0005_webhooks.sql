-- Customer webhooks (P33, notification::webhooks): the endpoints customers register, one
-- delivery per (endpoint, notification), and every attempt of each delivery. The delivery
-- itself runs as a `webhook.deliver` job on the platform's `jobs` table, enqueued in the
-- consumer's transaction next to the notification.

-- An endpoint, registered through `POST /v1/webhook-endpoints` by the customer whose API key
-- made the request. `secret` is the Standard Webhooks signing secret (`whsec_...`): returned
-- once, at registration, and kept here because every delivery must be signed with it (a hash
-- would not do; see the module docs for what protecting it further would take).
CREATE TABLE webhook_endpoints (
    id              uuid PRIMARY KEY,
    -- Same rule as notifications.customer_id.
    customer_id     text NOT NULL CHECK (length(customer_id) BETWEEN 1 AND 200),
    url             text NOT NULL CHECK (length(url) BETWEEN 1 AND 2048),
    event_types     text[] NOT NULL CHECK (cardinality(event_types) BETWEEN 1 AND 16),
    secret          text NOT NULL CHECK (secret LIKE 'whsec\_%'),
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- When the current run of failed attempts began (NULL after any success): an endpoint
    -- failing for `webhooks.disable_after` is disabled. A run is continuous: a failure after
    -- a pause longer than disable_after (last_failure_at) starts a new one, and a failure of
    -- an attempt that started before the last success (last_success_at) starts none.
    failing_since   timestamptz,
    last_failure_at timestamptz,
    last_success_at timestamptz,
    disabled_at     timestamptz,
    disabled_reason text,
    -- When the SMTP server accepted the email telling the owner it was disabled.
    owner_told_at   timestamptz,
    -- Deleted by its owner: no more deliveries; the row stays for the deliveries' history.
    deleted_at      timestamptz
);
CREATE INDEX webhook_endpoints_by_customer ON webhook_endpoints (customer_id, created_at)
    WHERE deleted_at IS NULL;

-- One notification to one endpoint. Its id is the `webhook-id` every attempt carries, so a
-- receiver dedupes retries; UNIQUE makes enqueueing twice (a redelivered event) a no-op.
CREATE TABLE webhook_deliveries (
    id              uuid PRIMARY KEY,
    endpoint_id     uuid NOT NULL REFERENCES webhook_endpoints (id),
    notification_id uuid NOT NULL,
    event_type      text NOT NULL,
    -- The exact body sent (and signed) on every attempt.
    body            text NOT NULL,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'succeeded', 'failed')),
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    UNIQUE (endpoint_id, notification_id)
);
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (endpoint_id, created_at);

-- Every attempt, as it ended: the answer's status, or why there was none. Append-only.
CREATE TABLE webhook_attempts (
    delivery_id     uuid NOT NULL REFERENCES webhook_deliveries (id),
    attempt         integer NOT NULL CHECK (attempt >= 1),
    started_at      timestamptz NOT NULL,
    duration_ms     integer NOT NULL CHECK (duration_ms >= 0),
    status_code     integer CHECK (status_code BETWEEN 100 AND 599),
    error           text,
    PRIMARY KEY (delivery_id, attempt)
);

-- Least privilege (P14): the runtime role deletes nothing here (an endpoint is deleted by
-- setting deleted_at), and an attempt, once recorded, is never rewritten.
REVOKE DELETE ON webhook_endpoints, webhook_deliveries FROM notification_app;
REVOKE UPDATE, DELETE ON webhook_attempts FROM notification_app;
