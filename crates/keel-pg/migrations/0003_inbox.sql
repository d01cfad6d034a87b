-- Idempotent consumer (P03), used by keel_pg::inbox: one row per message a consumer has
-- handled, written in the effect's transaction, so a redelivered message finds its row and
-- skips the effect. The primary key makes a concurrent duplicate wait for the first.
CREATE TABLE inbox (
    consumer     text NOT NULL,
    message_id   text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- Rows only, for the app role paired with this owner (see 0001).
DO $$
BEGIN
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON inbox TO %I',
                   regexp_replace(current_user, '_owner$', '_app'));
END
$$;
