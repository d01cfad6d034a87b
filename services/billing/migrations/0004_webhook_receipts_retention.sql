-- Retention of the payment provider's webhook receipts, without giving DELETE back (P14, P32).
--
-- Since 0003 billing_app may insert a receipt and never change or delete one: a receipt that
-- could be deleted would let a replayed webhook apply twice. Kept for ever, though, the table
-- only grows. The platform's retention (keel_pg::retention) purges it through this function
-- instead, and the function is the whole of what billing_app may do to old receipts:
--   - it deletes only receipts older than `older_than`, and refuses any `older_than` under
--     7 days. A webhook billing accepts is at most `webhook.tolerance` (at most an hour) old,
--     so a captured delivery can only be replayed while its receipt is minutes old; and a
--     provider's own redeliveries, which carry a fresh timestamp and so pass that check,
--     come within its retry schedule (days). Whatever the runtime role is made to ask, the
--     receipts that still stop a duplicate stay;
--   - at most `max_rows` per call (short locks, small WAL bursts), oldest first, skipping
--     rows another transaction holds;
--   - SECURITY DEFINER: it runs with its owner's (billing_owner's) rights, so the app role
--     needs EXECUTE on it and nothing on the table beyond 0003's. Its search_path is fixed
--     and the table named with its schema, so a caller's settings cannot point it elsewhere.
-- The app can purge old rows; it can never rewrite recent history.
--
-- billing registers it with one call (`Service::retain` with `Policy::function`); the age
-- is `webhook.receipts_kept` (90 days by default).

-- The purge walks receipts by age: without this index every batch scans the table.
CREATE INDEX webhook_receipts_received ON webhook_receipts (received_at);

CREATE FUNCTION purge_webhook_receipts(older_than interval, max_rows integer)
    RETURNS bigint
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    deleted bigint;
BEGIN
    IF older_than IS NULL OR older_than < interval '7 days' THEN
        RAISE EXCEPTION 'webhook receipts are kept at least 7 days; refusing to purge those older than %', older_than
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_rows IS NULL OR max_rows < 1 OR max_rows > 100000 THEN
        RAISE EXCEPTION 'max_rows must be 1 to 100000, not %', max_rows
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM public.webhook_receipts
     WHERE ctid = ANY (ARRAY(
           SELECT ctid FROM public.webhook_receipts
            WHERE received_at < now() - older_than
            ORDER BY received_at
            LIMIT max_rows
            FOR UPDATE SKIP LOCKED));
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;

-- Functions are executable by PUBLIC unless revoked: without this, every role that may
-- connect (the operator tool's too) could purge receipts.
REVOKE ALL ON FUNCTION purge_webhook_receipts(interval, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION purge_webhook_receipts(interval, integer) TO billing_app;
