-- The idempotent consumer (P03) and its effect, and notification's own outbox (P02).
-- Grants: 0001's ALTER DEFAULT PRIVILEGES gives notification_app DML on these tables.

-- One row per message this service has handled, written in the effect's transaction: a
-- redelivered message finds its row and skips the effect. (DDL shared by every service.)
CREATE TABLE inbox (
    consumer     text NOT NULL,
    message_id   text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- What a customer was told about an order, one row per final order state.
-- source_message_id UNIQUE: a second guard behind the inbox; an effect can never be recorded
-- twice for one message, whatever the code above does.
CREATE TABLE notifications (
    id                 uuid PRIMARY KEY,
    order_id           uuid NOT NULL,
    customer_id        text NOT NULL,
    kind               text NOT NULL,
    message            text NOT NULL,
    source_message_id  text NOT NULL UNIQUE,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notifications_by_order ON notifications (order_id, created_at);

-- Events notification publishes (notification.notification.recorded), relayed by
-- keel_amqp::relay. (DDL shared by every service.)
CREATE TABLE outbox (
    id             uuid PRIMARY KEY,
    seq            bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    event_type     text NOT NULL,
    payload        jsonb NOT NULL,
    traceparent    text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    sent_at        timestamptz,
    attempts       int NOT NULL DEFAULT 0,
    last_error     text
);
CREATE INDEX outbox_unsent ON outbox (seq) WHERE sent_at IS NULL;
CREATE INDEX outbox_unsent_aggregate ON outbox (aggregate_type, aggregate_id, seq) WHERE sent_at IS NULL;
