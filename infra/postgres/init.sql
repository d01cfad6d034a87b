-- Keel: roles and databases for local development and CI.
--
-- Run by a superuser against the `postgres` database, e.g.
--   psql -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p 5432 -U postgres -d postgres -f infra/postgres/init.sql
-- (infra/dev/stack.sh up does this on every run).
--
-- Idempotent: CREATE statements are generated only for what is missing
-- (\gexec runs each row of the preceding query as a statement), and the ALTER /
-- GRANT / REVOKE statements converge existing objects to the state below, so a
-- re-run also repairs drift.
--
-- The passwords are DEVELOPMENT SECRETS for this local/CI stack only; they are
-- checked in on purpose. infra/dev/stack.sh writes the same "<role>_dev"
-- passwords into the PgBouncer auth file; keep the two in sync.
--
-- Per service <s> in checkout, billing, notification:
--   <s>_owner  owns database keel_<s>; the service's migrations run as it.
--   <s>_app    what the running service connects as; gets CONNECT/TEMPORARY
--              here, schema/table privileges from the service's first migration.

\set ON_ERROR_STOP on

CREATE TEMP TABLE keel_roles (rolname text PRIMARY KEY, password text NOT NULL);
INSERT INTO keel_roles VALUES
    ('checkout_owner',     'checkout_owner_dev'),
    ('checkout_app',       'checkout_app_dev'),
    ('billing_owner',      'billing_owner_dev'),
    ('billing_app',        'billing_app_dev'),
    ('notification_owner', 'notification_owner_dev'),
    ('notification_app',   'notification_app_dev'),
    -- Platform crates' own tests (keel-pg, keel-amqp): same owner/app split,
    -- no database here (keel_testkit::TestDb creates per-test databases).
    ('platform_owner',     'platform_owner_dev'),
    ('platform_app',       'platform_app_dev');

CREATE TEMP TABLE keel_services (service text PRIMARY KEY);
INSERT INTO keel_services VALUES ('checkout'), ('billing'), ('notification');

-- Roles: create the missing ones ...
SELECT format('CREATE ROLE %I LOGIN', r.rolname)
FROM keel_roles r
WHERE NOT EXISTS (SELECT 1 FROM pg_roles p WHERE p.rolname = r.rolname)
\gexec

-- ... then (re)apply attributes and password to all of them. Neither kind of
-- role may create databases or roles or bypass RLS: the owner role is for
-- migrations of its own database only.
SELECT format(
    'ALTER ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT PASSWORD %L',
    r.rolname, r.password)
FROM keel_roles r
ORDER BY r.rolname
\gexec

-- Databases: CREATE DATABASE cannot run inside a DO block / function, hence
-- \gexec.
SELECT format('CREATE DATABASE %I OWNER %I', 'keel_' || s.service, s.service || '_owner')
FROM keel_services s
WHERE NOT EXISTS (SELECT 1 FROM pg_database d WHERE d.datname = 'keel_' || s.service)
\gexec

SELECT format('ALTER DATABASE %I OWNER TO %I', 'keel_' || s.service, s.service || '_owner')
FROM keel_services s
ORDER BY s.service
\gexec

-- Database-level access: nobody but the owner and the service's app role may
-- connect (PUBLIC has CONNECT/TEMPORARY by default; take it away).
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', 'keel_' || s.service)
FROM keel_services s
ORDER BY s.service
\gexec

SELECT format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I', 'keel_' || s.service, s.service || '_app')
FROM keel_services s
ORDER BY s.service
\gexec

DROP TABLE keel_roles;
DROP TABLE keel_services;
