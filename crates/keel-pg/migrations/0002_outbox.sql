-- Transactional outbox (P02), used by keel_pg::outbox and relayed by keel_amqp::relay.
-- A service inserts its event in the transaction that changes its state; the relay claims
-- unsent rows, oldest first per aggregate, and marks them sent after the broker's confirm.
CREATE TABLE outbox (
    id             uuid PRIMARY KEY,        -- the event id, the message_id consumers dedupe by
    -- Insert order; the relay publishes each aggregate's events in this order. An identity
    -- column: inserting needs no privilege on its sequence.
    seq            bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    event_type     text NOT NULL,
    payload        jsonb NOT NULL,          -- the whole event envelope
    traceparent    text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    sent_at        timestamptz,             -- NULL until the broker confirmed it
    attempts       int NOT NULL DEFAULT 0,
    last_error     text
);
-- The relay's pinned claim plan walks outbox_unsent in seq order and probes
-- outbox_unsent_aggregate per row (keel_pg::outbox::claim); both stay small because sent
-- rows leave them. Dropping either turns every claim into a scan of the whole table.
CREATE INDEX outbox_unsent ON outbox (seq) WHERE sent_at IS NULL;
CREATE INDEX outbox_unsent_aggregate ON outbox (aggregate_type, aggregate_id, seq) WHERE sent_at IS NULL;

-- Rows only, for the app role paired with this owner (see 0001).
DO $$
BEGIN
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON outbox TO %I',
                   regexp_replace(current_user, '_owner$', '_app'));
END
$$;
