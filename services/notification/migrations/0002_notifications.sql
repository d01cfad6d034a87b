-- What notification records (P03's effect). The inbox that dedupes the messages behind these
-- rows, and the outbox that publishes notification.notification.recorded, are platform tables
-- (crates/keel-pg/migrations), applied before these migrations.

-- What a customer was told about an order, one row per final order state.
-- source_message_id UNIQUE: a second guard behind the inbox; an effect can never be recorded
-- twice for one message, whatever the consumer code does.
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
