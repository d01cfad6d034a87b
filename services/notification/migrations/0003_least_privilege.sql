-- Least privilege, tighter (P14). A notification row is what a customer was told: recorded
-- once, by the consumer, in the transaction that marks the message handled
-- (customer_notifications::store), and never changed. The runtime role loses UPDATE and DELETE
-- on it, so not even a bug here can rewrite or erase that record.
--
-- Retention: nothing here deletes old rows. A future retention job that must would run as a
-- role of its own, never as notification_app.
REVOKE UPDATE, DELETE ON notifications FROM notification_app;

-- The operator tool's read-only role (infra/postgres/init.sql creates it): `keelctl audit`
-- checks every final order has its notification. The platform's tables (jobs, outbox) get
-- theirs from crates/keel-pg/migrations/0007_operator_roles.sql.
GRANT SELECT ON notifications TO keel_auditor;
