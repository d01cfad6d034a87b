-- Least privilege (P14). Migrations run as checkout_owner, the database owner. The runtime
-- role checkout_app may read and write rows in tables the owner creates, and nothing else:
-- no CREATE in the schema, no ALTER/DROP (only an owner can), no other database (CONNECT is
-- granted per database in infra/postgres/init.sql).
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO checkout_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO checkout_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO checkout_app;
