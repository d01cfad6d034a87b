-- The example resource and what the consumer records about it. The platform tables behind
-- them (idempotency_keys for POST /v1/items, the outbox that publishes skeleton.item.created,
-- the inbox that dedupes the consumer's messages) are keel-pg's, applied before this file.

-- One row per item, written with its outbox event and its idempotency key's answer in one
-- transaction (P02, P13).
CREATE TABLE items (
    id          uuid PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    quantity    integer NOT NULL CHECK (quantity >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- What the consumer heard about each item, one row per event (P03's effect).
-- source_message_id UNIQUE: a second guard behind the inbox; one message can never be
-- recorded twice, whatever the consumer code does.
CREATE TABLE item_history (
    source_message_id  text PRIMARY KEY,
    item_id            uuid NOT NULL,
    event_type         text NOT NULL,
    occurred_at        timestamptz NOT NULL,
    recorded_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX item_history_by_item ON item_history (item_id, occurred_at);
