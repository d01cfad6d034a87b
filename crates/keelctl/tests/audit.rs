//! The audit audited: every invariant `keelctl audit` checks, shown failing on exactly the
//! violation it exists for, and a clean data set passing with every check examining rows.
//!
//! Every end-to-end test ends with the audit, so a check that could never fail (a query that
//! reads the wrong column, a filter that drops every row) would let every one of them pass.
//! Each test here starts from the same consistent data set (the one
//! `a_clean_consistent_data_set_passes_with_every_check_examining_rows` shows passing), seeds
//! ONE violation by SQL as the database's owner, and asserts that the audit fails on that check
//! and on no other, with the offending row among its examples.
//!
//! The databases are real: per test, one `TestDb` for each of checkout, billing and
//! notification, migrated from the services' own migration folders (read at run time: the
//! table contracts are what keelctl depends on, never a service crate), and one vhost holding
//! the queue notification consumes, with a consumer attached as the service would. The audit
//! reads through pgbouncer as each service's runtime role, as `keelctl audit` does in tests.
//! Seeded rows are an hour old, past every time gate; the gate tests add young rows.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::process::Command;
use std::time::Duration;

use keel_testkit::{TestDb, TestVhost, eventually, workspace_root};
use keelctl::audit::Report;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;
use sqlx::migrate::Migrator;
use sqlx::{Connection as _, PgConnection};
use uuid::Uuid;

const KEELCTL: &str = env!("CARGO_BIN_EXE_keelctl");
/// The one queue the registry says a service consumes (notification's).
const QUEUE: &str = "notification.events";
/// How old every seeded row is: past every gate the default configuration sets.
const OLD: &str = "1 hour";
/// How long the management API may take to show a change. It samples every 5 s by default,
/// but its statistics are emitted and aggregated by broker processes that a loaded machine
/// delays: in a full `make test` beside a workspace build, 20 s once passed with the count
/// still at 0. A bound on the broker's bookkeeping, not on anything keelctl does.
const BROKER_VIEW: Duration = Duration::from_secs(60);

/// `service`'s migrations, read from its folder: the same versions and checksums as the
/// service's embedded migrator, so `TestDb` reuses the same migrated template.
async fn migrator(service: &str) -> Migrator {
    Migrator::new(
        workspace_root()
            .join("services")
            .join(service)
            .join("migrations"),
    )
    .await
    .unwrap()
}

/// One order of the data set, with what checkout, billing and notification hold for it.
#[derive(Debug, Clone, Copy)]
struct Seed {
    id: Uuid,
    state: &'static str,
    sku: &'static str,
    quantity: i32,
    unit_price: i64,
    /// The reservation's state, if stock was ever reserved.
    reservation: Option<&'static str>,
    /// billing's payment for it: (id, status).
    payment: Option<(Uuid, &'static str)>,
}

impl Seed {
    fn new(
        state: &'static str,
        sku: &'static str,
        quantity: i32,
        unit_price: i64,
        reservation: Option<&'static str>,
        payment: Option<&'static str>,
    ) -> Self {
        Self {
            id: Uuid::new_v4(),
            state,
            sku,
            quantity,
            unit_price,
            reservation,
            payment: payment.map(|s| (Uuid::new_v4(), s)),
        }
    }

    fn total(&self) -> i64 {
        self.unit_price * i64::from(self.quantity)
    }
}

/// One test's three databases and vhost, seeded with a consistent data set.
struct World {
    checkout: TestDb,
    billing: TestDb,
    notification: TestDb,
    vhost: TestVhost,
    amqp: Connection,
    /// The channel whose consumer stands for notification's.
    consumer: Channel,
    /// That consumer: lapin cancels a consumer when its last handle is dropped.
    _consuming: lapin::Consumer,
    /// Confirmed for good: every order final, paid or compensated as its state says,
    /// announced once; every outbox row sent; every job succeeded.
    confirmed: Seed,
    declined: Seed,
    rejected: Seed,
    failed: Seed,
}

impl World {
    async fn new() -> Self {
        let (checkout_m, billing_m, notification_m) = tokio::join!(
            migrator("checkout"),
            migrator("billing"),
            migrator("notification")
        );
        // Boxed: four set-ups at once make a large future.
        let (checkout, billing, notification, vhost) = Box::pin(async {
            tokio::join!(
                TestDb::create("checkout", &checkout_m),
                TestDb::create("billing", &billing_m),
                TestDb::create("notification", &notification_m),
                TestVhost::create(),
            )
        })
        .await;
        let amqp = Connection::connect(&vhost.url(), ConnectionProperties::default())
            .await
            .unwrap();
        let consumer = amqp.create_channel().await.unwrap();
        consumer
            .queue_declare(
                QUEUE.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        // Acked on delivery: the queue drains as notification's does.
        let consuming = consumer
            .basic_consume(
                QUEUE.into(),
                "notification".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let w = Self {
            checkout,
            billing,
            notification,
            vhost,
            amqp,
            consumer,
            _consuming: consuming,
            confirmed: Seed::new(
                "CONFIRMED",
                "KEEL-MUG",
                2,
                1200,
                Some("sold"),
                Some("CAPTURED"),
            ),
            declined: Seed::new(
                "PAYMENT_DECLINED",
                "KEEL-BOOK",
                1,
                3900,
                Some("released"),
                Some("DECLINED"),
            ),
            // Six of the five limited prints: nothing reserved, billing never asked.
            rejected: Seed::new("REJECTED", "KEEL-LIMITED-EDITION", 6, 9900, None, None),
            failed: Seed::new(
                "PAYMENT_FAILED",
                "KEEL-HOODIE",
                1,
                5900,
                Some("released"),
                Some("VOIDED"),
            ),
        };
        for seed in w.seeds() {
            w.seed_order(&seed, OLD).await;
            w.announce(&seed, seed.state).await;
        }
        for db in [&w.checkout, &w.billing, &w.notification] {
            w.sent_outbox_row(db).await;
            w.job(db, "succeeded").await;
        }
        w.wait_for_consumer().await;
        w
    }

    fn seeds(&self) -> [Seed; 4] {
        [self.confirmed, self.declined, self.rejected, self.failed]
    }

    /// A direct connection as `db`'s owner: how the tests seed and break things.
    async fn owner(db: &TestDb) -> PgConnection {
        PgConnection::connect(&db.owner_url()).await.unwrap()
    }

    /// Runs `sql` as `db`'s owner.
    async fn exec(db: &TestDb, sql: &str) {
        let mut c = Self::owner(db).await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut c)
            .await
            .unwrap();
    }

    /// checkout's order (lines, reservation and the stock it moved, saga job, outbox row) and
    /// billing's payment, all `age` old.
    async fn seed_order(&self, s: &Seed, age: &str) {
        let mut c = Self::owner(&self.checkout).await;
        let at = format!("now() - interval '{age}'");
        let q = |sql: &str| sqlx::AssertSqlSafe(sql.replace("$AT", &at));
        sqlx::query(q(
            "INSERT INTO orders (id, customer_id, currency, total_minor, state, \
                       created_at, updated_at) VALUES ($1, 'cust-audit', 'EUR', $2, $3, $AT, $AT)",
        ))
        .bind(s.id)
        .bind(s.total())
        .bind(s.state)
        .execute(&mut c)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO order_lines (order_id, line_no, sku, quantity, unit_price_minor)
             VALUES ($1, 0, $2, $3, $4)",
        )
        .bind(s.id)
        .bind(s.sku)
        .bind(s.quantity)
        .bind(s.unit_price)
        .execute(&mut c)
        .await
        .unwrap();
        if let Some(state) = s.reservation {
            sqlx::query(q(
                "INSERT INTO reservations (order_id, sku, quantity, state, \
                           created_at, updated_at) VALUES ($1, $2, $3, $4, $AT, $AT)",
            ))
            .bind(s.id)
            .bind(s.sku)
            .bind(s.quantity)
            .bind(state)
            .execute(&mut c)
            .await
            .unwrap();
            move_stock(&mut c, s.sku, s.quantity, state).await;
        }
        sqlx::query(q("INSERT INTO jobs (id, queue, payload, state, attempts, max_attempts, \
                       created_at, finished_at) VALUES ($1, 'saga', '{}', 'succeeded', 1, 5, $AT, $AT)"))
            .bind(Uuid::new_v4())
            .execute(&mut c)
            .await
            .unwrap();
        if let Some((payment, status)) = s.payment {
            self.payment(s, payment, status, s.total()).await;
        }
    }

    /// A payment of `amount` for `order` in billing.
    async fn payment(&self, order: &Seed, id: Uuid, status: &str, amount: i64) {
        let mut c = Self::owner(&self.billing).await;
        sqlx::query(
            "INSERT INTO payments (payment_id, order_id, amount_minor, currency, status, version,
                                   updated_at)
             VALUES ($1, $2, $3, 'EUR', $4, 1, now())",
        )
        .bind(id)
        .bind(order.id)
        .bind(amount)
        .bind(status)
        .execute(&mut c)
        .await
        .unwrap();
    }

    /// A customer notification for `order` announcing `kind`.
    async fn announce(&self, order: &Seed, kind: &str) {
        let mut c = Self::owner(&self.notification).await;
        sqlx::query(
            "INSERT INTO notifications (id, order_id, customer_id, kind, message,
                                        source_message_id, created_at)
             VALUES ($1, $2, 'cust-audit', $3, 'your order', $4, now() - interval '1 hour')",
        )
        .bind(Uuid::new_v4())
        .bind(order.id)
        .bind(kind)
        .bind(Uuid::new_v4().to_string())
        .execute(&mut c)
        .await
        .unwrap();
    }

    async fn outbox_row(db: &TestDb, age: &str, sent: bool) -> Uuid {
        let id = Uuid::new_v4();
        let at = format!("now() - interval '{age}'");
        let sent_at = if sent { at.as_str() } else { "NULL" };
        let mut c = Self::owner(db).await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload,
                                 created_at, sent_at)
             VALUES ($1, 'audit', 'a1', 'audit.thing.happened', '{{}}', {at}, {sent_at})"
        )))
        .bind(id)
        .execute(&mut c)
        .await
        .unwrap();
        id
    }

    async fn sent_outbox_row(&self, db: &TestDb) {
        Self::outbox_row(db, OLD, true).await;
    }

    async fn job(&self, db: &TestDb, state: &str) -> Uuid {
        let id = Uuid::new_v4();
        let mut c = Self::owner(db).await;
        sqlx::query(
            "INSERT INTO jobs (id, queue, payload, state, attempts, max_attempts, last_error,
                               created_at, finished_at)
             VALUES ($1, 'audit', '{}', $2, 5, 5, 'it broke', now() - interval '1 hour', now())",
        )
        .bind(id)
        .bind(state)
        .execute(&mut c)
        .await
        .unwrap();
        id
    }

    fn db(&self, service: &str) -> &TestDb {
        match service {
            "checkout" => &self.checkout,
            "billing" => &self.billing,
            "notification" => &self.notification,
            other => panic!("no database for {other}"),
        }
    }

    /// keelctl's configuration for this world: its databases as the runtime roles through
    /// pgbouncer, its vhost, and `extra` (`KEEL_AUDIT__*` bounds).
    fn env(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let stack = keel_testkit::Stack::load();
        let mut env: Vec<(String, String)> = vec![
            ("KEEL_CHECKOUT__URL".into(), self.checkout.app_url()),
            ("KEEL_BILLING__URL".into(), self.billing.app_url()),
            ("KEEL_NOTIFICATION__URL".into(), self.notification.app_url()),
            (
                "KEEL_RABBITMQ__MANAGEMENT_URL".into(),
                stack.amqp_mgmt_base(),
            ),
            ("KEEL_RABBITMQ__VHOST".into(), self.vhost.name.clone()),
        ];
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        env
    }

    async fn audit_with(&self, extra: &[(&str, &str)]) -> Report {
        let env = self.env(extra);
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let config: keelctl::Config = keel_testkit::config(keelctl::DEFAULT_CONFIG, &pairs);
        let report = keelctl::audit::run(&config).await.unwrap();
        eprintln!("{report}");
        report
    }

    /// The audit with the default bounds (`settle_within` 60 s, `outbox_within` 30 s).
    async fn audit(&self) -> Report {
        self.audit_with(&[]).await
    }

    /// Waits until the management API shows the queue's consumer: it lags a basic.consume.
    async fn wait_for_consumer(&self) {
        eventually(
            BROKER_VIEW,
            "the management API lists the consumer",
            || async {
                let q = self.queue_view().await?;
                (q["consumers"].as_u64()? > 0).then_some(())
            },
        )
        .await;
    }

    async fn queue_view(&self) -> Option<Value> {
        let stack = keel_testkit::Stack::load();
        reqwest::Client::new()
            .get(format!(
                "{}/api/queues/{}/{QUEUE}",
                stack.amqp_mgmt_base(),
                self.vhost.name
            ))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    /// Publishes `n` messages to the queue (default exchange) and waits for the confirms.
    async fn publish(&self, n: usize) {
        let ch = self.amqp.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        for i in 0..n {
            let confirm = ch
                .basic_publish(
                    "".into(),
                    QUEUE.into(),
                    BasicPublishOptions::default(),
                    format!("{{\"n\":{i}}}").as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(confirm.is_ack());
        }
    }
}

/// Moves `quantity` of `sku` from available to where a reservation in `state` holds it.
async fn move_stock(c: &mut PgConnection, sku: &str, quantity: i32, state: &str) {
    let column = match state {
        "reserved" => "reserved",
        "sold" => "sold",
        _ => return,
    };
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE stock SET available = available - $2, {column} = {column} + $2 WHERE sku = $1"
    )))
    .bind(sku)
    .bind(quantity)
    .execute(c)
    .await
    .unwrap();
}

/// Every check the audit runs over this world, by id: the journey's and the generic ones.
const ALL_CHECKS: &[&str] = &[
    "checkout.orders_final",
    "checkout.stock_conserved",
    "checkout.reservations_match_orders",
    "billing.confirmed_orders_paid_once",
    "billing.settled_payments_captured",
    "billing.failed_orders_hold_nothing",
    "notification.final_orders_notified_once",
    "checkout.outbox_drained",
    "checkout.no_failed_jobs",
    "billing.outbox_drained",
    "billing.no_failed_jobs",
    "notification.outbox_drained",
    "notification.no_failed_jobs",
    "queue:notification.events",
];

/// The audit failed on `id` and on nothing else, and one of that check's examples names
/// `culprit` (the seeded row).
fn assert_fails_only(report: &Report, id: &str, culprit: &str) {
    assert_eq!(
        report.failed(),
        vec![id],
        "exactly one check fails:\n{report}"
    );
    let check = report.get(id).unwrap();
    assert!(
        check.examples.iter().any(|e| e.contains(culprit)),
        "an example of {id} names {culprit}: {:?}",
        check.examples
    );
    let text = report.to_string();
    assert!(
        text.contains("FAIL") && text.ends_with("audit: FAILED"),
        "{text}"
    );
}

/// Runs the keelctl binary with `args` and only the world's configuration.
fn keelctl(w: &World, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(KEELCTL);
    cmd.args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEEL_")) {
        cmd.env_remove(k);
    }
    cmd.envs(w.env(&[]));
    let out = cmd.output().unwrap();
    eprintln!(
        "keelctl {args:?} -> {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test]
async fn a_clean_consistent_data_set_passes_with_every_check_examining_rows() {
    let w = World::new().await;
    w.publish(4).await;
    // The queue's message counters reach the management API at its next sample.
    let report = eventually(BROKER_VIEW, "the queue's messages are counted", || async {
        let r = w.audit().await;
        (r.get("queue:notification.events")?.examined == 4).then_some(r)
    })
    .await;
    assert!(report.passed(), "{report}");
    assert!(report.past_gates(), "every seeded row is past its gate");
    let ids: Vec<&str> = report.checks.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ALL_CHECKS, "the checks, in order");
    for c in &report.checks {
        assert!(c.examined > 0, "{} examined nothing", c.id);
    }
    let examined = |id: &str| report.get(id).unwrap().examined;
    assert_eq!(examined("checkout.orders_final"), 4);
    assert_eq!(examined("checkout.stock_conserved"), 7, "every SKU");
    assert_eq!(examined("checkout.reservations_match_orders"), 4);
    assert_eq!(examined("billing.confirmed_orders_paid_once"), 1);
    assert_eq!(examined("billing.settled_payments_captured"), 1);
    assert_eq!(examined("billing.failed_orders_hold_nothing"), 3);
    assert_eq!(examined("notification.final_orders_notified_once"), 4);
    assert_eq!(examined("checkout.outbox_drained"), 1);
    assert_eq!(
        examined("checkout.no_failed_jobs"),
        5,
        "four sagas and one more"
    );

    // The command line reports the same counts: in JSON for scripts, in the table for people.
    let out = keelctl(&w, &["audit", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["passed"], true);
    let orders = json["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "checkout.orders_final")
        .unwrap();
    assert_eq!(orders["examined"], 4);
    assert_eq!(orders["unit"], "orders");
    assert_eq!(orders["gate"], 60.0);
    assert_eq!(orders["too_recent"], 0);
    assert_eq!(orders["passed"], true);
    let stock = json["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "checkout.stock_conserved")
        .unwrap();
    assert_eq!(stock["gate"], Value::Null, "no time gate");
    let out = keelctl(&w, &["audit"]);
    assert_eq!(out.status.code(), Some(0));
    let table = String::from_utf8(out.stdout).unwrap();
    for header in ["examined", "too recent", "violations"] {
        assert!(table.contains(header), "{table}");
    }
    assert!(
        table.contains("4 orders") && table.contains("7 SKUs"),
        "{table}"
    );
    assert!(table.trim_end().ends_with("audit: all checks passed"));
    for line in table.lines() {
        assert!(line.chars().count() <= 100, "fits 100 columns: {line}");
    }
}

#[tokio::test]
async fn rows_younger_than_a_gate_are_counted_too_recent_and_judged_once_past_it() {
    let w = World::new().await;
    // Just placed and still PENDING; an event just written and not yet sent; an order that
    // ended a moment ago and is not announced yet. Each is fine for now.
    let young = Seed::new("PENDING", "KEEL-TEE-L", 1, 2500, None, None);
    w.seed_order(&young, "0 seconds").await;
    let ended = Seed::new("REJECTED", "KEEL-LIMITED-EDITION", 9, 9900, None, None);
    w.seed_order(&ended, "0 seconds").await;
    let event = World::outbox_row(&w.checkout, "0 seconds", false).await;

    let report = w.audit().await;
    assert!(report.passed(), "young rows are not judged:\n{report}");
    assert!(!report.past_gates());
    let orders = report.get("checkout.orders_final").unwrap();
    assert_eq!((orders.examined, orders.too_recent), (4, 2));
    let notified = report
        .get("notification.final_orders_notified_once")
        .unwrap();
    assert_eq!((notified.examined, notified.too_recent), (4, 1));
    let outbox = report.get("checkout.outbox_drained").unwrap();
    assert_eq!((outbox.examined, outbox.too_recent), (1, 1));

    // Gates of one second, waited past: the same rows are now judged, and fail.
    let tight = [
        ("KEEL_AUDIT__SETTLE_WITHIN", "1s"),
        ("KEEL_AUDIT__OUTBOX_WITHIN", "1s"),
    ];
    let report = eventually(
        Duration::from_secs(10),
        "the rows pass the gates",
        || async {
            let r = w.audit_with(&tight).await;
            r.past_gates().then_some(r)
        },
    )
    .await;
    assert_eq!(
        report.failed(),
        vec![
            "checkout.orders_final",
            "notification.final_orders_notified_once",
            "checkout.outbox_drained",
        ],
        "{report}"
    );
    let orders = report.get("checkout.orders_final").unwrap();
    assert_eq!((orders.examined, orders.too_recent), (6, 0));
    assert!(orders.examples[0].contains(&young.id.to_string()));
    let notified = report
        .get("notification.final_orders_notified_once")
        .unwrap();
    assert!(notified.examples[0].contains(&ended.id.to_string()));
    let outbox = report.get("checkout.outbox_drained").unwrap();
    assert!(outbox.examples[0].contains(&event.to_string()));
}

#[tokio::test]
async fn an_order_past_the_gate_that_is_not_final_fails_orders_final() {
    let w = World::new().await;
    // Stock reserved an hour ago and the saga never finished: consistent stock, no payment,
    // not final (so no notification is due), but stuck.
    let stuck = Seed::new("RESERVED", "KEEL-TEE-M", 1, 2500, Some("reserved"), None);
    w.seed_order(&stuck, OLD).await;
    assert_fails_only(
        &w.audit().await,
        "checkout.orders_final",
        &stuck.id.to_string(),
    );
}

#[tokio::test]
async fn stock_counters_that_disagree_with_the_reservations_fail_stock_conserved() {
    let w = World::new().await;
    // One T-shirt counted as reserved with no reservation holding it: the sum still equals
    // `initial` (the table's CHECK allows it), but the counters no longer match the rows.
    World::exec(
        &w.checkout,
        "UPDATE stock SET available = available - 1, reserved = reserved + 1
          WHERE sku = 'KEEL-TEE-M'",
    )
    .await;
    assert_fails_only(&w.audit().await, "checkout.stock_conserved", "KEEL-TEE-M");
}

#[tokio::test]
async fn a_final_order_still_holding_stock_fails_reservations_match_orders() {
    let w = World::new().await;
    // The declined order's release never happened: its book is still reserved (and counted
    // so, so stock is conserved).
    World::exec(
        &w.checkout,
        &format!(
            "UPDATE reservations SET state = 'reserved' WHERE order_id = '{}';
             UPDATE stock SET available = available - 1, reserved = reserved + 1
              WHERE sku = 'KEEL-BOOK'",
            w.declined.id
        ),
    )
    .await;
    assert_fails_only(
        &w.audit().await,
        "checkout.reservations_match_orders",
        &w.declined.id.to_string(),
    );
}

#[tokio::test]
async fn a_confirmed_order_charged_the_wrong_amount_or_twice_fails_paid_once() {
    let w = World::new().await;
    let id = "billing.confirmed_orders_paid_once";
    let order = w.confirmed.id.to_string();
    let (payment, _) = w.confirmed.payment.unwrap();
    World::exec(
        &w.billing,
        &format!("UPDATE payments SET amount_minor = 2300 WHERE payment_id = '{payment}'"),
    )
    .await;
    assert_fails_only(&w.audit().await, id, &order);

    // Put right, then charged a second time: two captured payments for one order.
    World::exec(
        &w.billing,
        &format!("UPDATE payments SET amount_minor = 2400 WHERE payment_id = '{payment}'"),
    )
    .await;
    assert!(w.audit().await.passed());
    w.payment(&w.confirmed, Uuid::new_v4(), "CAPTURED", 2400)
        .await;
    assert_fails_only(&w.audit().await, id, &order);
}

#[tokio::test]
async fn a_settled_confirmed_order_whose_capture_never_came_fails_payments_captured() {
    let w = World::new().await;
    // Authorized and asked to capture, but the provider's webhook never arrived.
    let (payment, _) = w.confirmed.payment.unwrap();
    World::exec(
        &w.billing,
        &format!("UPDATE payments SET status = 'CAPTURE_PENDING' WHERE payment_id = '{payment}'"),
    )
    .await;
    assert_fails_only(
        &w.audit().await,
        "billing.settled_payments_captured",
        &w.confirmed.id.to_string(),
    );
}

#[tokio::test]
async fn a_failed_order_with_an_authorization_left_open_fails_failed_orders_hold_nothing() {
    let w = World::new().await;
    let id = "billing.failed_orders_hold_nothing";
    let (payment, _) = w.failed.payment.unwrap();
    // Compensation never voided it.
    for status in ["AUTHORIZED", "AUTHORIZATION_PENDING"] {
        World::exec(
            &w.billing,
            &format!("UPDATE payments SET status = '{status}' WHERE payment_id = '{payment}'"),
        )
        .await;
        let report = w.audit().await;
        assert_fails_only(&report, id, &payment.to_string());
        assert!(report.get(id).unwrap().examples[0].contains(status));
    }
}

#[tokio::test]
async fn a_final_order_not_announced_exactly_once_with_its_state_fails_notified_once() {
    let w = World::new().await;
    let id = "notification.final_orders_notified_once";
    // Lost: the confirmed order was never announced.
    World::exec(
        &w.notification,
        &format!(
            "DELETE FROM notifications WHERE order_id = '{}'",
            w.confirmed.id
        ),
    )
    .await;
    assert_fails_only(&w.audit().await, id, &w.confirmed.id.to_string());
    w.announce(&w.confirmed, "CONFIRMED").await;
    assert!(w.audit().await.passed());

    // Doubled: a redelivered event applied twice (what the inbox prevents).
    w.announce(&w.declined, "PAYMENT_DECLINED").await;
    assert_fails_only(&w.audit().await, id, &w.declined.id.to_string());
    World::exec(
        &w.notification,
        &format!(
            "DELETE FROM notifications WHERE order_id = '{}'",
            w.declined.id
        ),
    )
    .await;
    w.announce(&w.declined, "PAYMENT_DECLINED").await;
    assert!(w.audit().await.passed());

    // Wrong: the rejected order announced as confirmed.
    World::exec(
        &w.notification,
        &format!(
            "UPDATE notifications SET kind = 'CONFIRMED' WHERE order_id = '{}'",
            w.rejected.id
        ),
    )
    .await;
    assert_fails_only(&w.audit().await, id, &w.rejected.id.to_string());
}

#[tokio::test]
async fn an_outbox_row_unsent_past_the_gate_fails_that_services_outbox_check() {
    let w = World::new().await;
    for service in ["checkout", "billing", "notification"] {
        let db = w.db(service);
        let row = World::outbox_row(db, OLD, false).await;
        assert_fails_only(
            &w.audit().await,
            &format!("{service}.outbox_drained"),
            &row.to_string(),
        );
        World::exec(
            db,
            &format!("UPDATE outbox SET sent_at = now() WHERE id = '{row}'"),
        )
        .await;
    }
    assert!(w.audit().await.passed());
}

#[tokio::test]
async fn a_job_failed_for_good_fails_that_services_jobs_check() {
    let w = World::new().await;
    for service in ["checkout", "billing", "notification"] {
        let db = w.db(service);
        let job = w.job(db, "failed").await;
        assert_fails_only(
            &w.audit().await,
            &format!("{service}.no_failed_jobs"),
            &job.to_string(),
        );
        World::exec(
            db,
            &format!("UPDATE jobs SET state = 'succeeded' WHERE id = '{job}'"),
        )
        .await;
    }
    assert!(w.audit().await.passed());
}

#[tokio::test]
async fn a_consumed_queue_without_its_consumer_fails_the_queue_check() {
    let w = World::new().await;
    w.consumer
        .basic_cancel("notification".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    // The management API shows the consumer gone at its next sample.
    let report = eventually(BROKER_VIEW, "the queue check fails", || async {
        let r = w.audit().await;
        (!r.passed()).then_some(r)
    })
    .await;
    assert_fails_only(&report, "queue:notification.events", "has no consumer");
}

#[tokio::test]
async fn a_backlog_over_the_bound_fails_the_queue_check() {
    let w = World::new().await;
    // A consumer that takes one message and never acks it, in place of the one that drains:
    // the rest wait, ready.
    let slow = w.amqp.create_channel().await.unwrap();
    slow.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let _stuck = slow
        .basic_consume(
            QUEUE.into(),
            "stuck".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    w.consumer
        .basic_cancel("notification".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    w.publish(6).await;
    let bound = [("KEEL_AUDIT__MAX_QUEUE_BACKLOG", "2")];
    // The management API samples the queue: wait for the sample that has all six in it.
    let report = eventually(BROKER_VIEW, "the whole backlog is seen", || async {
        let r = w.audit_with(&bound).await;
        let examples = &r.get("queue:notification.events")?.examples;
        examples
            .iter()
            .any(|e| e.contains("5 ready messages"))
            .then_some(r)
    })
    .await;
    assert_fails_only(&report, "queue:notification.events", "5 ready messages");
}

#[tokio::test]
async fn a_consumed_queue_that_does_not_exist_fails_the_queue_check() {
    let w = World::new().await;
    w.consumer
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert_fails_only(
        &w.audit().await,
        "queue:notification.events",
        "does not exist",
    );
}
