-- Least privilege, tighter (P14). The ledger's event store is append-only since 0002, which
-- revoked UPDATE, DELETE and TRUNCATE on payment_events from billing_app. The receipts of the
-- payment provider's webhooks are a log of the same kind: inserted once, in the transaction that
-- applies the webhook (a replay finds its row and has no second effect), never changed. A
-- receipt that could be deleted would let a replayed webhook apply twice, so the runtime role
-- loses UPDATE and DELETE on it too.
--
-- Retention: nothing here deletes old rows. A future retention job that must would run as a
-- role of its own, never as billing_app.
REVOKE UPDATE, DELETE ON webhook_receipts FROM billing_app;

-- The operator tool's read-only role (infra/postgres/init.sql creates it): the payments
-- projection `keelctl audit` checks against checkout's orders, and the ledger behind it for an
-- operator looking into one payment. Not webhook_receipts (nothing reads them but billing).
-- The platform's tables (jobs, outbox) get theirs from
-- crates/keel-pg/migrations/0007_operator_roles.sql.
GRANT SELECT ON payments, payment_events TO keel_auditor;
