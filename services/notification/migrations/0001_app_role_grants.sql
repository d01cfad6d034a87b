-- Least privilege (P14). Migrations run as notification_owner, the database owner. The runtime
-- role notification_app may read and write rows in tables the owner creates, and nothing else:
-- no CREATE in the schema, no ALTER/DROP (only an owner can), no other database (CONNECT is
-- granted per database in infra/postgres/init.sql).
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO notification_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO notification_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO notification_app;
