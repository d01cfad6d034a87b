-- The least-privilege baseline of every Keel database (P14), set by the platform because its
-- migrations run first, before any of the service's own.
--
-- Convention: migrations run as `<svc>_owner`, the database owner; the running service
-- connects as `<svc>_app`. The platform derives the app role from the role running this
-- (`checkout_owner` -> `checkout_app`), so one set of platform migrations serves every
-- service without knowing its name. Run as anything else (say `postgres`), the grants would
-- silently go to the wrong role: refuse instead.
--
-- The platform grants per table (each of its migrations ends with an explicit GRANT) and
-- never sets ALTER DEFAULT PRIVILEGES: default privileges set here would also apply to the
-- service's migration history table, which sqlx creates after this runs, and hand it to the
-- app role. The service's own first migration sets the defaults for its own tables.
DO $$
DECLARE
    app text := regexp_replace(current_user, '_owner$', '_app');
BEGIN
    IF app = current_user OR NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = app) THEN
        RAISE EXCEPTION 'Keel migrations run as <service>_owner with a matching <service>_app role; current_user is %', current_user;
    END IF;
    -- Nobody but the owner may create objects; the app role may use what the owner grants it.
    REVOKE ALL ON SCHEMA public FROM PUBLIC;
    EXECUTE format('GRANT USAGE ON SCHEMA public TO %I', app);
END
$$;
