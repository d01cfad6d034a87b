-- Least privilege (P14). Migrations run as skeleton_owner, the database owner; the running
-- service connects as skeleton_app, which may read and write rows in the tables the owner
-- creates and nothing else: no CREATE in the schema, no ALTER/DROP (only an owner can), no
-- other database (CONNECT is granted per database by infra/postgres/init.sql).
--
-- The platform's migrations (crates/keel-pg/migrations, applied first by keel_pg::migrate)
-- already took the schema from PUBLIC, gave skeleton_app USAGE on it and DML on the platform
-- tables (outbox, inbox, jobs, idempotency_keys). What is left is this service's own tables:
-- every table the owner creates from here on is usable by skeleton_app with no per-table grant.
--
-- Forward-only: never edit a migration that has been applied anywhere; add the next number.
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO skeleton_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO skeleton_app;
