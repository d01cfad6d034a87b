-- Customer API keys (keel_pg::api_keys): how a customer's requests to a service's public API
-- authenticate, `Authorization: Bearer keel_<id>_<secret>`. Each key belongs to one customer,
-- and every request made with it acts for that customer. A platform table, so every service
-- that takes customers' requests verifies keys the same way (keel_service::api_keys::ApiKey).
-- Each service's database holds its own keys: a key is valid on the API of the service it
-- was issued for, and nowhere else.
--
-- Keys are issued by `keelctl api-keys create --customer <id> [--service <name>]`, which
-- prints the key once; only SHA-256 of the whole key is kept here (keel_pg::api_keys says why
-- a fast hash, not a password hash). The format and this table are the contract between
-- keelctl and the services, both in keel_pg::api_keys.
CREATE TABLE customer_api_keys (
    -- The key's non-secret part: 12 hex digits, how logs and operators name a key.
    id           text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{12}$'),
    -- Opaque customer id (keel_events::CustomerId), printed in logs and tables.
    customer_id  text NOT NULL CHECK (length(customer_id) BETWEEN 1 AND 200),
    key_hash     bytea NOT NULL CHECK (length(key_hash) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- Set to revoke (`keelctl api-keys revoke`): the key is refused from the next request on.
    -- Rows are kept, so log lines can still be traced to the key that made a request.
    revoked_at   timestamptz
);
-- An operator's question "which keys does this customer have" (and revoking them all).
CREATE INDEX customer_api_keys_customer ON customer_api_keys (customer_id);

-- The app role reads keys and nothing more (least privilege, P14): a service verifies keys,
-- one row by id (keel_pg::api_keys::verify). A service that could insert a key could mint one
-- for any customer and act as them; one that could update a row could un-revoke a key.
--
-- REVOKE ALL first, unlike the platform's earlier tables: on a database a service migrated
-- before this file was released, the service's own first migration has already set default
-- privileges (`ALTER DEFAULT PRIVILEGES ... GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES`),
-- and they apply to this table too, since the owner creates it. A new database runs this
-- before those defaults exist. Without the REVOKE, the same service would have INSERT on an
-- upgraded database and not on a new one.
DO $$
DECLARE
    app text := regexp_replace(current_user, '_owner$', '_app');
BEGIN
    EXECUTE format('REVOKE ALL ON customer_api_keys FROM %I', app);
    EXECUTE format('GRANT SELECT ON customer_api_keys TO %I', app);
END
$$;

-- The operator tool (0007 says why its grants are column by column), each grant the one
-- statement its command runs:
-- api-keys create: INSERT INTO customer_api_keys (id, customer_id, key_hash) VALUES (...),
--                  with no RETURNING: it cannot read a key's hash back.
GRANT INSERT (id, customer_id, key_hash) ON customer_api_keys TO keel_operator;
-- api-keys revoke: UPDATE customer_api_keys SET revoked_at = now()
--                  WHERE id = $1 AND revoked_at IS NULL
GRANT SELECT (id, revoked_at) ON customer_api_keys TO keel_operator;
GRANT UPDATE (revoked_at) ON customer_api_keys TO keel_operator;
-- keel_auditor gets nothing: no command reads keys.
