-- The operator tool's two roles on the platform's tables (P14). keelctl never connects as a
-- service's app role: that role may rewrite every row the service owns, and an operator's
-- credentials are the ones most often pasted into a terminal. Instead, once per cluster
-- (infra/postgres/init.sql creates them, with CONNECT on every service database):
--
--   keel_auditor   reads: `keelctl audit`, `keelctl jobs`, `keelctl outbox` (and its parked
--                  rows). SELECT on the job queue and the outbox; no write of any kind.
--   keel_operator  changes, each the one statement its command runs, column by column:
--                  `keelctl jobs retry` (keel_pg::jobs::retry_failed) and
--                  `keelctl outbox retry` (keel_pg::outbox::unpark, unpark_all). An UPDATE
--                  also needs SELECT on the columns its WHERE reads, and on nothing else.
--
-- Neither gets anything on inbox or idempotency_keys (stored answers to clients' requests):
-- no command reads them. Neither may DELETE, TRUNCATE, INSERT, or read a job's payload as the
-- operator. A change to one of those statements needs its grant changed here, in a new
-- migration: the operator's tests (keel_testkit::privilege::assert_operator_is_narrow) fail
-- with 42501 until it is.
--
-- The names are fixed, not derived like the app role's: one keelctl covers every service.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'keel_auditor')
       OR NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'keel_operator') THEN
        RAISE EXCEPTION 'Keel migrations grant to the roles keel_auditor and keel_operator; create them first (infra/postgres/init.sql, run by make deps)';
    END IF;
END
$$;

-- Both find tables by name in the schema (0001 took it from PUBLIC); USAGE lets them look,
-- not create. Each table below, or in a service's migration, is then its own grant.
GRANT USAGE ON SCHEMA public TO keel_auditor, keel_operator;

GRANT SELECT ON jobs, outbox TO keel_auditor;

-- jobs retry: UPDATE jobs SET state, attempts = 0, run_at = now(), finished_at = NULL
--             WHERE id = $1 AND state = 'failed'
GRANT SELECT (id, state) ON jobs TO keel_operator;
GRANT UPDATE (state, attempts, run_at, finished_at) ON jobs TO keel_operator;

-- outbox retry: UPDATE outbox SET parked_at = NULL, attempts = 0
--               WHERE [id = $1 AND] parked_at IS NOT NULL AND sent_at IS NULL
GRANT SELECT (id, parked_at, sent_at) ON outbox TO keel_operator;
GRANT UPDATE (parked_at, attempts) ON outbox TO keel_operator;
