-- Least privilege (P14). Migrations run as billing_owner, the database owner. The runtime
-- role billing_app may read and write rows in tables the owner creates, and nothing else:
-- no CREATE in the schema, no ALTER/DROP (only an owner can), no other database (CONNECT is
-- granted per database in infra/postgres/init.sql).
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO billing_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO billing_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO billing_app;
