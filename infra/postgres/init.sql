-- Keel: roles and databases for local development and CI, for every service in the registry
-- (infra/services.toml). This file names no service: the lists come in as psql variables.
--
-- Run by a superuser against the `postgres` database (infra/dev/stack.sh up does this on every
-- run, with the lists from infra/dev/registry.sh), e.g.
--   psql -X -h 127.0.0.1 -p 5432 -U postgres -d postgres \
--        $(infra/dev/registry.sh psql-vars) -f infra/postgres/init.sql
-- where psql-vars prints `-v services=checkout,billing,... -v extra_roles=platform`.
--
-- Idempotent: CREATE statements are generated only for what is missing
-- (\gexec runs each row of the preceding query as a statement), and the ALTER /
-- GRANT / REVOKE statements converge existing objects to the state below, so a
-- re-run also repairs drift. (A service removed from the registry keeps its
-- roles and database: dropping data is never a side effect of `make dev`.)
--
-- The passwords are DEVELOPMENT SECRETS for this local/CI stack only, "<role>_dev"
-- by convention; infra/dev/stack.sh writes the same passwords into the PgBouncer
-- auth file, from the same registry.
--
-- Per service <s> in :services (registry entries with `database = true`):
--   keel_<s>   its database, owned by <s>_owner.
--   <s>_owner  runs the service's migrations.
--   <s>_app    what the running service connects as; gets CONNECT (and no
--              TEMPORARY) here, schema/table privileges from the migrations.
-- Per prefix <p> in :extra_roles (the registry's [[roles]]): <p>_owner and <p>_app,
-- with the same attributes and no database (e.g. `platform`: the platform crates'
-- own tests, whose per-test databases keel_testkit::TestDb creates).
-- Once per cluster, the operator tool's roles (keelctl, P14): fixed names, not the
-- registry's, because the platform's migrations grant to them by name
-- (crates/keel-pg/migrations/0007_operator_roles.sql), as do the services' own:
--   keel_auditor   read-only: SELECT on what `keelctl audit` and its listings read.
--   keel_operator  the few changes an operator makes (`keelctl jobs retry`, ...),
--                  column by column.
-- Both get CONNECT on every service database here; keel_testkit::TestDb creates
-- them the same way if a cluster's init.sql predates them.

\set ON_ERROR_STOP on

-- Both lists are required (either may be empty): without them this script would
-- silently create nothing.
\if :{?services}
\else
DO $$ BEGIN RAISE EXCEPTION 'init.sql needs -v services=a,b,... (see infra/dev/registry.sh psql-vars)'; END $$;
\endif
\if :{?extra_roles}
\else
DO $$ BEGIN RAISE EXCEPTION 'init.sql needs -v extra_roles=a,b,... (see infra/dev/registry.sh psql-vars)'; END $$;
\endif

CREATE TEMP TABLE keel_services AS
SELECT DISTINCT trim(s) AS service
FROM unnest(string_to_array(:'services', ',')) AS s
WHERE trim(s) <> '';

CREATE TEMP TABLE keel_roles AS
SELECT p.prefix || r.suffix AS rolname, p.prefix || r.suffix || '_dev' AS password
FROM (SELECT service AS prefix FROM keel_services
      UNION
      SELECT trim(x) FROM unnest(string_to_array(:'extra_roles', ',')) AS x
      WHERE trim(x) <> '') AS p
CROSS JOIN (VALUES ('_owner'), ('_app')) AS r (suffix)
UNION ALL
SELECT o.rolname, o.rolname || '_dev'
FROM (VALUES ('keel_auditor'), ('keel_operator')) AS o (rolname);

-- Roles: create the missing ones ...
SELECT format('CREATE ROLE %I LOGIN', r.rolname)
FROM keel_roles r
WHERE NOT EXISTS (SELECT 1 FROM pg_roles p WHERE p.rolname = r.rolname)
\gexec

-- ... then (re)apply attributes and password to all of them. No role here may
-- create databases or roles or bypass RLS: the owner role is for migrations of
-- its own database only, and the operator tool's roles have only their grants.
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

-- Database-level access: nobody but the owner, the service's app role and the
-- operator tool's two roles may connect, and nobody but the owner may create
-- temporary tables. PUBLIC has CONNECT and TEMPORARY by default: take both
-- away. TEMPORARY is revoked from the app role too, by name, because earlier
-- versions of this file granted it: a re-run converges. No service needs
-- temporary tables, and one is a place to stage data or fill disk that no
-- migration and no grant on a table controls.
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', 'keel_' || s.service)
FROM keel_services s
ORDER BY s.service
\gexec

SELECT format('REVOKE TEMPORARY ON DATABASE %I FROM %I', 'keel_' || s.service, s.service || '_app')
FROM keel_services s
ORDER BY s.service
\gexec

SELECT format('GRANT CONNECT ON DATABASE %I TO %I, keel_auditor, keel_operator',
              'keel_' || s.service, s.service || '_app')
FROM keel_services s
ORDER BY s.service
\gexec

DROP TABLE keel_roles;
DROP TABLE keel_services;

-- PgBouncer's lookup role (compose and kind; P14). PgBouncer finds a client's SCRAM verifier
-- with its auth_query, logged in as this role, which can do one thing: call the function
-- below. The function runs as its owner (SECURITY DEFINER, the superuser that runs this file)
-- because pg_shadow is superuser-only, and it never answers for a superuser: no superuser can
-- log in through the pooler, and PgBouncer's own secret is this role's password, not the
-- superuser's. (`make dev`'s loopback-only pgbouncer still looks roles up as postgres.)
SELECT 'CREATE ROLE keel_pgbouncer LOGIN'
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'keel_pgbouncer')
\gexec
ALTER ROLE keel_pgbouncer LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    INHERIT PASSWORD 'keel_pgbouncer_dev';
SET client_min_messages = warning;  -- no "already exists, skipping" on every re-run
CREATE SCHEMA IF NOT EXISTS pgbouncer;
REVOKE ALL ON SCHEMA pgbouncer FROM PUBLIC;
-- A set, not a record: for a superuser or an unknown name it returns no row, which PgBouncer
-- reports as a failed login (a NULL record would read as a configuration error).
DROP FUNCTION IF EXISTS pgbouncer.user_lookup(text);
CREATE FUNCTION pgbouncer.user_lookup(i_username text)
RETURNS TABLE (uname text, phash text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog
AS $$
    SELECT usename::text, passwd::text FROM pg_catalog.pg_shadow
    WHERE usename = i_username AND NOT usesuper
$$;
REVOKE ALL ON FUNCTION pgbouncer.user_lookup(text) FROM PUBLIC;
GRANT USAGE ON SCHEMA pgbouncer TO keel_pgbouncer;
GRANT EXECUTE ON FUNCTION pgbouncer.user_lookup(text) TO keel_pgbouncer;
