-- Least privilege (P14). Migrations run as billing_owner, the database owner. The runtime
-- role billing_app may read and write rows in tables the owner creates, and nothing else:
-- no CREATE in the schema, no ALTER/DROP (only an owner can), no other database (CONNECT is
-- granted per database in infra/postgres/init.sql).
--
-- The platform's migrations (crates/keel-pg/migrations, applied first by keel_pg::migrate)
-- already took the schema from PUBLIC, gave billing_app USAGE on it and DML on the platform
-- tables. What is left is the service's own tables: every table created below by the owner
-- is usable by billing_app with no per-table grant.
--
-- History: these migrations were renumbered when the platform tables moved into keel-pg,
-- before any database was deployed. From here on they are forward-only: never edit an
-- applied migration, add the next number.
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO billing_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO billing_app;
