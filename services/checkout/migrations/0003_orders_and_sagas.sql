-- Orders and the saga instances that drive them (P04). An order's state is what customers
-- see; the saga's state is the orchestrator's own (it has COMPENSATING, which the order does
-- not). Both change only in transactions that also write the order's history row and, for
-- first and final states, its outbox event. States and transitions: docs/journey-states.md.

CREATE TABLE orders (
    id           uuid PRIMARY KEY,
    customer_id  text NOT NULL CHECK (length(customer_id) BETWEEN 1 AND 200),
    currency     char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    -- Integer minor units, never floating point.
    total_minor  bigint NOT NULL CHECK (total_minor >= 0),
    state        text NOT NULL CHECK (state IN ('PENDING', 'RESERVED', 'AUTHORIZED', 'CONFIRMED',
                                                'REJECTED', 'PAYMENT_DECLINED', 'PAYMENT_FAILED')),
    -- Why the order ended where it did (out_of_stock, card_declined, deadline_exceeded, ...).
    reason       text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
-- Orders still in flight, oldest first: what `keelctl audit` and the journey SLI look at.
CREATE INDEX orders_open ON orders (created_at)
    WHERE state IN ('PENDING', 'RESERVED', 'AUTHORIZED');

CREATE TABLE order_lines (
    order_id          uuid NOT NULL REFERENCES orders (id),
    line_no           int NOT NULL CHECK (line_no >= 0),
    sku               text NOT NULL REFERENCES products (sku),
    quantity          int NOT NULL CHECK (quantity > 0),
    -- The price when the order was placed: a later price change does not rewrite history.
    unit_price_minor  bigint NOT NULL CHECK (unit_price_minor >= 0),
    PRIMARY KEY (order_id, line_no),
    UNIQUE (order_id, sku)
);

-- Append-only: one row per state change, with the reason.
CREATE TABLE order_history (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id  uuid NOT NULL REFERENCES orders (id),
    state     text NOT NULL,
    reason    text,
    at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX order_history_order ON order_history (order_id, id);

CREATE TABLE sagas (
    id             uuid PRIMARY KEY,
    order_id       uuid NOT NULL UNIQUE REFERENCES orders (id),
    state          text NOT NULL CHECK (state IN ('PENDING', 'RESERVED', 'AUTHORIZED', 'COMPENSATING',
                                                  'CONFIRMED', 'REJECTED', 'PAYMENT_DECLINED',
                                                  'PAYMENT_FAILED')),
    -- While COMPENSATING: the final state compensation ends in, and why.
    compensate_to  text CHECK (compensate_to IN ('PAYMENT_DECLINED', 'PAYMENT_FAILED')),
    reason         text,
    -- The customer's payment-method token: needed until authorization, cleared at the end.
    payment_token  text,
    payment_id     text,
    -- An authorization exists that compensation must void; `voided` once it is.
    void_needed    boolean NOT NULL DEFAULT false,
    voided         boolean NOT NULL DEFAULT false,
    -- Forward progress (retries of payment calls) stops here; compensation does not.
    deadline       timestamptz NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CHECK (state <> 'COMPENSATING' OR compensate_to IS NOT NULL)
);

-- The saga's log: every step attempt with its outcome (ok, retry, declined, skipped, ...).
CREATE TABLE saga_steps (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    saga_id  uuid NOT NULL REFERENCES sagas (id),
    step     text NOT NULL,
    outcome  text NOT NULL,
    detail   text,
    at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX saga_steps_saga ON saga_steps (saga_id, id);
