-- Parking an unpublishable outbox row (P02), used by keel_pg::outbox and keel_amqp::relay.
-- A row the broker keeps refusing (nacked) or the relay will not send (too large) would
-- otherwise be retried forever. Each refusal counts in `attempts` and delays the row's next
-- try (`retry_at`, the platform's backoff); at `relay.max_attempts` the row is parked: it
-- keeps its reason in `last_error`, is no longer claimed, and waits for an operator
-- (`keelctl outbox parked`, `keelctl outbox retry`). Rows of other aggregates keep flowing;
-- later rows of the same aggregate wait behind it, since the claim keeps per-aggregate order.
-- Nullable columns with no default: adding them rewrites nothing and takes no long lock.
ALTER TABLE outbox
    ADD COLUMN parked_at timestamptz,  -- NULL unless parked; a parked row stays unsent
    ADD COLUMN retry_at  timestamptz;  -- not claimed before this (NULL: at once)
-- The app role's table-wide grant (0002) covers the new columns.
