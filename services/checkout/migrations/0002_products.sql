-- The product catalogue read by GET /v1/products. Prices are integer minor units with an
-- ISO 4217 currency: never floating point for money.
CREATE TABLE products (
    sku          text PRIMARY KEY CHECK (sku ~ '^[A-Z0-9-]{3,32}$'),
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description  text NOT NULL DEFAULT '',
    price_minor  bigint NOT NULL CHECK (price_minor >= 0),
    currency     char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Seed catalogue for the demo journey.
INSERT INTO products (sku, name, description, price_minor, currency) VALUES
    ('KEEL-MUG',      'Keel mug',            'Stoneware, 350 ml.',                      1200, 'EUR'),
    ('KEEL-TEE-M',    'Keel T-shirt (M)',    'Organic cotton.',                         2500, 'EUR'),
    ('KEEL-TEE-L',    'Keel T-shirt (L)',    'Organic cotton.',                         2500, 'EUR'),
    ('KEEL-HOODIE',   'Keel hoodie',         'Heavyweight, navy.',                      5900, 'EUR'),
    ('KEEL-STICKERS', 'Sticker pack',        'Ten vinyl stickers.',                      500, 'EUR'),
    ('KEEL-BOOK',     'Reliability field guide', 'The patterns behind Keel, in print.', 3900, 'EUR');
