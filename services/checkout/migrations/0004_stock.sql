-- Stock per SKU and the reservations that move it (P11). Conservation is a constraint, not a
-- hope: available + reserved + sold = initial on every row, and no column below zero, so an
-- oversell or a double release fails loudly instead of corrupting the counts. Reservation,
-- release and commit lock stock rows in SKU order (checkout::stock): never change that.

CREATE TABLE stock (
    sku        text PRIMARY KEY REFERENCES products (sku),
    initial    int NOT NULL CHECK (initial >= 0),
    available  int NOT NULL CHECK (available >= 0),
    reserved   int NOT NULL CHECK (reserved >= 0),
    sold       int NOT NULL CHECK (sold >= 0),
    CHECK (available + reserved + sold = initial)
);

-- One row per order and SKU; its state guards against double release or commit:
-- reserved -> released | sold, and nothing leaves released or sold.
CREATE TABLE reservations (
    order_id    uuid NOT NULL REFERENCES orders (id),
    sku         text NOT NULL REFERENCES stock (sku),
    quantity    int NOT NULL CHECK (quantity > 0),
    state       text NOT NULL DEFAULT 'reserved' CHECK (state IN ('reserved', 'released', 'sold')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, sku)
);

-- A product that is nearly sold out, so the demo (and anyone trying the API) can see an
-- order rejected for lack of stock without first buying a thousand mugs.
INSERT INTO products (sku, name, description, price_minor, currency) VALUES
    ('KEEL-LIMITED-EDITION', 'Keel limited-edition print', 'Signed, numbered; five made.', 9900, 'EUR');

INSERT INTO stock (sku, initial, available, reserved, sold)
SELECT sku, CASE sku WHEN 'KEEL-LIMITED-EDITION' THEN 5 ELSE 1000 END,
            CASE sku WHEN 'KEEL-LIMITED-EDITION' THEN 5 ELSE 1000 END, 0, 0
  FROM products;
