-- Email delivery (P33 over P08): when the SMTP server accepted a notification's email. The
-- email itself is a job on the platform's `jobs` table (queue `email.send`, enqueued in the
-- consumer's transaction), which the platform's migrations already grant to notification_app.
--
-- Additive: a nullable column with no default rewrites no row and takes only a brief lock;
-- code that does not know the column keeps working.
ALTER TABLE notifications ADD COLUMN emailed_at timestamptz NULL;

-- Least privilege (P14), as tight as 0003 left it: notification_app still cannot UPDATE or
-- DELETE what a customer was told. It may set this one column, which records a delivery, not
-- the content (customer_notifications::store::mark_emailed, `WHERE emailed_at IS NULL`).
GRANT UPDATE (emailed_at) ON notifications TO notification_app;
