//! `keelctl audit`: the journey's invariants, checked across the three databases and the
//! broker (P04, P02, P03, P11).
//!
//! Each service's tests prove its own part; this proves the whole: after any mix of orders
//! and faults, when things settle, the states the three services hold agree. Every check
//! prints how many things it looked at and how many broke the rule; any broken rule makes
//! the command exit 1. End-to-end tests and `make demo` finish with it.
//!
//! The checks read table contracts (column names documented in each service's migrations),
//! never service code.

use std::collections::HashMap;
use std::fmt;

use keel_config::ExposeSecret;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Config;

/// Order states that end the journey (checkout's saga).
pub const FINAL_STATES: [&str; 4] = [
    "CONFIRMED",
    "REJECTED",
    "PAYMENT_DECLINED",
    "PAYMENT_FAILED",
];
/// Payment statuses (billing's projection) that hold or took money.
pub const HOLDING_STATUSES: [&str; 3] = ["AUTHORIZED", "CAPTURE_PENDING", "CAPTURED"];
/// An authorization whose provider answer billing never recorded: it may hold money, so a
/// failed order must not leave one behind (compensation voids it).
pub const UNRESOLVED_STATUS: &str = "AUTHORIZATION_PENDING";

/// One invariant's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub name: String,
    /// How many things the check looked at.
    pub checked: i64,
    /// How many broke the rule (0 = pass).
    pub violations: i64,
    /// Up to a few examples of violations, for the operator.
    pub examples: Vec<String>,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.violations == 0
    }
}

/// All checks of one audit run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(Check::passed)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<66} {:>8} {:>10}  result",
            "check", "checked", "violations"
        )?;
        for c in &self.checks {
            let result = if c.passed() { "ok" } else { "FAIL" };
            writeln!(
                f,
                "{:<66} {:>8} {:>10}  {result}",
                c.name, c.checked, c.violations
            )?;
            for e in &c.examples {
                writeln!(f, "    {e}")?;
            }
        }
        write!(
            f,
            "audit: {}",
            if self.passed() {
                "all checks passed"
            } else {
                "FAILED"
            }
        )
    }
}

/// Why the audit could not run (as opposed to a failed check).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{service} database: {source}")]
    Database {
        service: &'static str,
        source: sqlx::Error,
    },
    #[error("RabbitMQ management API: {0}")]
    Broker(String),
}

fn db(service: &'static str) -> impl FnOnce(sqlx::Error) -> AuditError {
    move |source| AuditError::Database { service, source }
}

const EXAMPLES: usize = 5;

fn check(name: impl Into<String>, checked: i64, broken: Vec<String>) -> Check {
    Check {
        name: name.into(),
        checked,
        violations: broken.len() as i64,
        examples: broken.into_iter().take(EXAMPLES).collect(),
    }
}

#[derive(Debug, sqlx::FromRow)]
struct Order {
    id: Uuid,
    state: String,
    total_minor: i64,
    currency: String,
    settled: bool,
}

#[derive(Debug, sqlx::FromRow)]
struct Payment {
    payment_id: Uuid,
    order_id: Uuid,
    amount_minor: i64,
    currency: String,
    status: String,
}

/// Runs every check.
pub async fn run(config: &Config) -> Result<Report, AuditError> {
    let mut checkout = crate::connect(&config.checkout)
        .await
        .map_err(db("checkout"))?;
    let mut billing = crate::connect(&config.billing)
        .await
        .map_err(db("billing"))?;
    let mut notification = crate::connect(&config.notification)
        .await
        .map_err(db("notification"))?;
    let settle = config.audit.settle_within.as_secs_f64();
    let mut report = Report::default();

    // Orders, with whether each is old enough that it must have settled.
    let orders: Vec<Order> = sqlx::query_as(
        "SELECT id, state, total_minor, currency,
                created_at < now() - make_interval(secs => $1) AS settled
           FROM orders",
    )
    .bind(settle)
    .fetch_all(&mut checkout)
    .await
    .map_err(db("checkout"))?;
    let is_final = |s: &str| FINAL_STATES.contains(&s);

    // 1. Every order older than the bound is in a final state.
    let old: Vec<&Order> = orders.iter().filter(|o| o.settled).collect();
    let stuck = old
        .iter()
        .filter(|o| !is_final(&o.state))
        .map(|o| format!("order {} still {}", o.id, o.state))
        .collect();
    report.checks.push(check(
        format!(
            "orders older than {}s are final",
            config.audit.settle_within.as_secs()
        ),
        old.len() as i64,
        stuck,
    ));

    // 2. Stock is conserved per SKU and matches the reservations, and every final order's
    //    reservations ended as its state says.
    report.checks.push(stock_conserved(&mut checkout).await?);
    report
        .checks
        .push(reservations_settled(&mut checkout).await?);

    // 3 and 4. Payments agree with final order states.
    let payments: Vec<Payment> =
        sqlx::query_as("SELECT payment_id, order_id, amount_minor, currency, status FROM payments")
            .fetch_all(&mut billing)
            .await
            .map_err(db("billing"))?;
    let mut by_order: HashMap<Uuid, Vec<&Payment>> = HashMap::new();
    for p in &payments {
        by_order.entry(p.order_id).or_default().push(p);
    }
    let payments_of = |o: &Order, holds: &dyn Fn(&str) -> bool| -> Vec<&Payment> {
        by_order
            .get(&o.id)
            .map(|ps| ps.iter().copied().filter(|p| holds(&p.status)).collect())
            .unwrap_or_default()
    };
    let holding = |o: &Order| payments_of(o, &|s| HOLDING_STATUSES.contains(&s));
    let maybe_holding = |o: &Order| {
        payments_of(o, &|s| {
            HOLDING_STATUSES.contains(&s) || s == UNRESOLVED_STATUS
        })
    };
    let confirmed: Vec<&Order> = orders.iter().filter(|o| o.state == "CONFIRMED").collect();
    let unpaid = confirmed
        .iter()
        .filter_map(|o| {
            let held = holding(o);
            match held.as_slice() {
                // Settled: the provider's capture webhook has long had time to arrive.
                [p] if o.settled && p.status != "CAPTURED" => Some(format!(
                    "order {} confirmed but payment {} is still {}",
                    o.id, p.payment_id, p.status
                )),
                [p] if p.amount_minor == o.total_minor && p.currency == o.currency => None,
                [p] => Some(format!(
                    "order {} total {} {} but payment {} is {} {}",
                    o.id, o.total_minor, o.currency, p.payment_id, p.amount_minor, p.currency
                )),
                ps => Some(format!("order {} has {} holding payments", o.id, ps.len())),
            }
        })
        .collect();
    report.checks.push(check(
        "confirmed orders have one payment of their amount (captured once settled)",
        confirmed.len() as i64,
        unpaid,
    ));
    let failed: Vec<&Order> = orders
        .iter()
        .filter(|o| is_final(&o.state) && o.state != "CONFIRMED")
        .collect();
    let open = failed
        .iter()
        .flat_map(|o| {
            maybe_holding(o).into_iter().map(move |p| {
                format!(
                    "order {} is {} but payment {} is {}",
                    o.id, o.state, p.payment_id, p.status
                )
            })
        })
        .collect();
    report.checks.push(check(
        "rejected and failed orders hold no unvoided authorization",
        failed.len() as i64,
        open,
    ));

    // 5. Outboxes drain.
    for (service, conn) in [
        ("checkout", &mut checkout),
        ("billing", &mut billing),
        ("notification", &mut notification),
    ] {
        report
            .checks
            .push(outbox_drained(service, conn, config.audit.outbox_within.as_secs_f64()).await?);
    }

    // 6. Every settled final order has exactly one customer notification, announcing the
    //    state it ended in (a duplicate is the failure the inbox prevents).
    let notes: Vec<(Uuid, String)> = sqlx::query_as("SELECT order_id, kind FROM notifications")
        .fetch_all(&mut notification)
        .await
        .map_err(db("notification"))?;
    let mut kinds: HashMap<Uuid, Vec<String>> = HashMap::new();
    for (order, kind) in notes {
        kinds.entry(order).or_default().push(kind);
    }
    let settled_final: Vec<&Order> = orders
        .iter()
        .filter(|o| o.settled && is_final(&o.state))
        .collect();
    let wrong = settled_final
        .iter()
        .filter_map(|o| match kinds.get(&o.id).map(Vec::as_slice) {
            Some([kind]) if *kind == o.state => None,
            Some([kind]) => Some(format!(
                "order {} is {} but was announced {kind}",
                o.id, o.state
            )),
            Some(many) => Some(format!("order {} has {} notifications", o.id, many.len())),
            None => Some(format!("order {} ({}) has no notification", o.id, o.state)),
        })
        .collect();
    report.checks.push(check(
        "settled final orders have exactly one notification of their state",
        settled_final.len() as i64,
        wrong,
    ));

    // 7. Jobs: none given up on.
    let failed_jobs: Vec<(Uuid, String, Option<String>)> = sqlx::query_as(
        "SELECT id, queue, last_error FROM jobs WHERE state = 'failed' ORDER BY created_at",
    )
    .fetch_all(&mut checkout)
    .await
    .map_err(db("checkout"))?;
    let all_jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&mut checkout)
        .await
        .map_err(db("checkout"))?;
    report.checks.push(check(
        "checkout jobs: none failed for good",
        all_jobs,
        failed_jobs
            .into_iter()
            .map(|(id, q, e)| format!("job {id} ({q}): {}", e.unwrap_or_default()))
            .collect(),
    ));

    // 8. The broker: audited queues exist, are consumed, and are not backed up.
    report.checks.extend(queues(config).await?);
    Ok(report)
}

async fn stock_conserved(conn: &mut PgConnection) -> Result<Check, AuditError> {
    let rows: Vec<(String, i32, i32, i32, i32, i64, i64)> = sqlx::query_as(
        "SELECT s.sku, s.initial, s.available, s.reserved, s.sold,
                COALESCE(sum(r.quantity) FILTER (WHERE r.state = 'reserved'), 0)::int8,
                COALESCE(sum(r.quantity) FILTER (WHERE r.state = 'sold'), 0)::int8
           FROM stock s LEFT JOIN reservations r ON r.sku = s.sku
          GROUP BY s.sku, s.initial, s.available, s.reserved, s.sold
          ORDER BY s.sku",
    )
    .fetch_all(conn)
    .await
    .map_err(db("checkout"))?;
    let broken = rows
        .iter()
        .filter(|(_, initial, available, reserved, sold, r_reserved, r_sold)| {
            available + reserved + sold != *initial
                || *available < 0
                || i64::from(*reserved) != *r_reserved
                || i64::from(*sold) != *r_sold
        })
        .map(|(sku, initial, available, reserved, sold, rr, rs)| {
            format!(
                "{sku}: initial {initial} != available {available} + reserved {reserved} + sold {sold} \
                 (reservations: {rr} reserved, {rs} sold)"
            )
        })
        .collect();
    Ok(check(
        "stock conserved per SKU (available + reserved + sold = initial)",
        rows.len() as i64,
        broken,
    ))
}

async fn reservations_settled(conn: &mut PgConnection) -> Result<Check, AuditError> {
    let finals = FINAL_STATES.map(str::to_owned).to_vec();
    let checked: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE state = ANY($1)")
        .bind(&finals)
        .fetch_one(&mut *conn)
        .await
        .map_err(db("checkout"))?;
    // A CONFIRMED order sold every line, exactly; any other final order holds nothing and
    // sold nothing.
    let broken: Vec<(Uuid, String, String, Option<String>)> = sqlx::query_as(
        "SELECT o.id, o.state, l.sku, r.state
           FROM orders o
           JOIN order_lines l ON l.order_id = o.id
           LEFT JOIN reservations r ON r.order_id = o.id AND r.sku = l.sku
          WHERE (o.state = 'CONFIRMED'
                 AND (r.state IS DISTINCT FROM 'sold' OR r.quantity <> l.quantity))
             OR (o.state = ANY($1) AND o.state <> 'CONFIRMED'
                 AND r.state IN ('reserved', 'sold'))
          ORDER BY o.created_at",
    )
    .bind(&finals)
    .fetch_all(conn)
    .await
    .map_err(db("checkout"))?;
    Ok(check(
        "final orders' reservations match their state",
        checked,
        broken
            .into_iter()
            .map(|(id, state, sku, r)| {
                format!(
                    "order {id} is {state} but {sku} is {}",
                    r.as_deref().unwrap_or("not reserved")
                )
            })
            .collect(),
    ))
}

async fn outbox_drained(
    service: &'static str,
    conn: &mut PgConnection,
    within: f64,
) -> Result<Check, AuditError> {
    let (total, late): (i64, i64) = sqlx::query_as(
        "SELECT count(*),
                count(*) FILTER (WHERE sent_at IS NULL
                                   AND created_at < now() - make_interval(secs => $1))
           FROM outbox",
    )
    .bind(within)
    .fetch_one(conn)
    .await
    .map_err(db(service))?;
    Ok(Check {
        name: format!("{service} outbox: nothing unsent after {within}s"),
        checked: total,
        violations: late,
        examples: Vec::new(),
    })
}

async fn queues(config: &Config) -> Result<Vec<Check>, AuditError> {
    let rabbit = &config.rabbitmq;
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|e| AuditError::Broker(e.to_string()))?;
    let mut checks = Vec::new();
    for queue in &rabbit.queues {
        let url = format!(
            "{}/api/queues/{}/{}",
            rabbit.management_url.trim_end_matches('/'),
            urlencode(&rabbit.vhost),
            urlencode(queue)
        );
        let res = client
            .get(url)
            .basic_auth(&rabbit.username, Some(rabbit.password.expose_secret()))
            .send()
            .await
            .map_err(|e| AuditError::Broker(e.to_string()))?;
        let name = format!(
            "queue {queue}: consumed, backlog <= {}",
            config.audit.max_queue_backlog
        );
        if res.status() == reqwest::StatusCode::NOT_FOUND {
            checks.push(check(
                name,
                0,
                vec![format!("queue {queue} does not exist")],
            ));
            continue;
        }
        let body: serde_json::Value = res
            .error_for_status()
            .map_err(|e| AuditError::Broker(e.to_string()))?
            .json()
            .await
            .map_err(|e| AuditError::Broker(e.to_string()))?;
        let ready = body["messages_ready"].as_u64().unwrap_or(0);
        let consumers = body["consumers"].as_u64().unwrap_or(0);
        let mut broken = Vec::new();
        if consumers == 0 {
            broken.push(format!("queue {queue} has no consumer"));
        }
        if ready > config.audit.max_queue_backlog {
            broken.push(format!("queue {queue} has {ready} ready messages"));
        }
        checks.push(check(name, ready as i64, broken));
    }
    Ok(checks)
}

/// Percent-encodes a path segment of the management API (vhost and connection names may
/// contain `/`, spaces and other reserved characters).
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
