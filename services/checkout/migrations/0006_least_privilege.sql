-- Least privilege, tighter (P14). 0001's default privileges gave checkout_app SELECT, INSERT,
-- UPDATE and DELETE on every table created after it. That is more than the service does, and
-- the difference is what a compromised checkout could do that checkout never needs to: change
-- the prices customers pay, or rewrite the record of what happened to an order. Take it back,
-- table by table, leaving exactly what the code uses (checked by running checkout's tests).
--
-- Retention: nothing here deletes old rows. A future retention job that must would run as a
-- role of its own with DELETE on these tables, never as checkout_app.

-- The catalogue is the owner's: migrations seed and change it, the service only reads it
-- (GET /v1/products, pricing an order). Without INSERT and DELETE too, a price cannot be
-- changed by deleting the product and inserting it again.
REVOKE INSERT, UPDATE, DELETE ON products FROM checkout_app;

-- An order's customer, currency and total are fixed when it is placed; the service moves only
-- its state (checkout::orders::store::set_state). Column-level UPDATE: the table-level grant
-- would cover every column, including total_minor.
REVOKE UPDATE, DELETE ON orders FROM checkout_app;
GRANT UPDATE (state, reason, updated_at) ON orders TO checkout_app;

-- The lines carry the price at order time ("a later price change does not rewrite history",
-- 0003): written once, with the order.
REVOKE UPDATE, DELETE ON order_lines FROM checkout_app;

-- Append-only logs: one row per order state change, one per saga step attempt.
REVOKE UPDATE, DELETE ON order_history FROM checkout_app;
REVOKE UPDATE, DELETE ON saga_steps FROM checkout_app;

-- API keys are issued by an operator (`keelctl api-keys create`, below) and only verified here
-- (checkout::api_keys reads one row by id): a checkout that could insert a key could mint one
-- for any customer and order as them.
REVOKE INSERT, UPDATE, DELETE ON api_keys FROM checkout_app;

-- The operator tool's read-only role (infra/postgres/init.sql creates it): what `keelctl audit`
-- and `keelctl demo` read, and the order's history for an operator looking into one order.
-- Not sagas (payment_token is the customer's payment-method token) nor saga_steps, nor any
-- future table: each grant to it is a decision, made here. The platform's tables (jobs,
-- outbox) get theirs from crates/keel-pg/migrations/0007_operator_roles.sql.
GRANT SELECT ON orders, order_lines, order_history, stock, reservations TO keel_auditor;

-- The operator tool's role for changes (infra/postgres/init.sql creates it): `keelctl api-keys
-- create` is one INSERT of these three columns (keelctl::api_keys::create), with no RETURNING.
-- Nothing else: it cannot read a key's hash back, change a key's customer or delete a key. The
-- job queue and outbox retries are granted on the platform's tables by 0007 there.
GRANT INSERT (id, customer_id, key_hash) ON api_keys TO keel_operator;
