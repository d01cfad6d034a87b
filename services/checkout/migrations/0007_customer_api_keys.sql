-- API keys move to the platform. Other services now take customers' keys too, so the table is
-- the platform's, `customer_api_keys` (crates/keel-pg/migrations/0009_customer_api_keys.sql:
-- the columns and checks of 0005's `api_keys`), issued by one function (keel_pg::api_keys,
-- behind `keelctl api-keys create`) and verified by one extractor (keel_service::api_keys).
-- A platform table is defined once and checked against every service's copy (the schema drift
-- test); a copy per service is how two services' keys would come to differ.
--
-- 0005 is released, so it stays as it is: this migration moves its rows and drops the table.
-- The platform's migrations run before checkout's, so customer_api_keys exists here.
--
-- Every key issued so far keeps working: same id, customer, hash, creation and revocation.
-- ON CONFLICT DO NOTHING: ids are 48 random bits, so an id already in customer_api_keys is a
-- key issued there, by this release's keelctl, between the platform's migration and this one.
-- That row is kept and the older one with the same id is not copied (its holder gets a 401
-- and a new key), rather than failing the migration or overwriting a key just handed out.
INSERT INTO customer_api_keys (id, customer_id, key_hash, created_at, revoked_at)
SELECT id, customer_id, key_hash, created_at, revoked_at
  FROM api_keys
ON CONFLICT (id) DO NOTHING;

DROP TABLE api_keys;

-- Expand, deploy, contract (docs/deploy/production.md): during a rollout the previous
-- release's instances run against this schema. They read a key with `SELECT customer_id,
-- key_hash, revoked_at IS NOT NULL AS revoked FROM api_keys WHERE id = $1`, and the previous
-- keelctl issues one with `INSERT INTO api_keys (id, customer_id, key_hash)`. Without a
-- relation of that name every authenticated request to an old instance would fail with a 500
-- until it is replaced. This view keeps both statements working against the new table, with
-- the grants 0006 gave them, and nothing more. It is the contract step's to drop, in a later
-- migration, once no release older than this one runs.
CREATE VIEW api_keys AS
SELECT id, customer_id, key_hash, created_at, revoked_at
  FROM customer_api_keys;
-- A view reaches its table with its owner's privileges, and 0001's default privileges gave
-- checkout_app every DML on it: through it, the app role could mint a key, which 0009 refuses
-- it on the table. Take them back; leave the read the previous release makes.
REVOKE ALL ON api_keys FROM checkout_app;
GRANT SELECT ON api_keys TO checkout_app;
GRANT INSERT (id, customer_id, key_hash) ON api_keys TO keel_operator;
