-- API keys of the orders API: each belongs to one customer, and every request made with it
-- acts for that customer. Keys are issued by `keelctl api-keys create --customer <id>`, which
-- prints the key once; only SHA-256 of the whole key is kept here (checkout::api_keys says why
-- a fast hash, not a password hash). The format, `keel_<id>_<secret>`, and this table are the
-- contract between keelctl and checkout.
CREATE TABLE api_keys (
    -- The key's non-secret part: 12 hex digits, how logs and operators name a key.
    id           text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{12}$'),
    -- Same rule as orders.customer_id.
    customer_id  text NOT NULL CHECK (length(customer_id) BETWEEN 1 AND 200),
    key_hash     bytea NOT NULL CHECK (length(key_hash) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- Set to revoke: the key is refused from the next request on. Rows are kept, so an order's
    -- log lines can still be traced to the key that placed it.
    revoked_at   timestamptz
);
-- An operator's question "which keys does this customer have" (and revoking them all).
CREATE INDEX api_keys_customer ON api_keys (customer_id);
