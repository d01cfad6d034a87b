//! `make bench`, the journey's rows (written next to the HTTP rows in `target/bench/report.json`):
//!
//! - `relay_publish_rate`: the outbox relay draining 5,000 committed events (claim with SKIP
//!   LOCKED, publish with confirms, mark sent, commit — per batch), one event per aggregate,
//!   ÷ raw lapin publishing the same 5,000 messages as fast as it allows: pipelined, each
//!   batch sent whole and its confirms awaited together, with the relay's batch size and its
//!   concurrency (that many channels, each publishing batch after batch), to the same exchange
//!   and queue. Both use checkout's `[relay]` configuration. Goal ≥ 0.8: the transactional
//!   bookkeeping may cost at most a fifth of the broker's rate.
//! - `relay_publish_rate_10_per_aggregate`: the same with 10 events per aggregate, written in
//!   bursts (an aggregate's 10 events one after the other). The relay claims only the oldest
//!   unsent event of an aggregate, so one batch holds at most one event of each and the claim
//!   walks past the rest; the raw side keeps each aggregate's order by sending all of an
//!   aggregate's messages on one channel (AMQP keeps a channel's order), which costs it
//!   nothing. Reported: what per-aggregate ordering costs.
//! - `placement_vs_fused_sql`: checkout's placement (`checkout::orders::place_order`: a
//!   transaction storing the idempotency key, reading the prices, writing the order, its lines
//!   and history, the saga, its job and the outbox event, then the key's stored answer) ÷ one
//!   hand-fused statement writing the same rows (data-modifying CTEs, prices read inside it,
//!   the stored answer and the event built in SQL), one round trip and one commit: the floor
//!   for this work. Both with 16 concurrent callers on the service's own pool through
//!   pgbouncer. Goal ≥ 0.8.
//! - `placement_vs_bare_insert`: the same placement ÷ inserting the bare order row: what the
//!   whole pattern (idempotency, saga, job, outbox) costs against writing nothing else.
//!   Reported.
//! - `order_to_final_p50_ms` / `order_to_final_p99_ms`: POST → final state (CONFIRMED) on the
//!   four release binaries at a fixed moderate rate, measured by the database's clock
//!   (order `created_at` to the final history row). Reported.
//!
//! Printed with the rows, the measurements that explain them (docs/benchmarks.md): for
//! placement, the CPU each side costs per order in this process, in the Postgres backends and
//! in pgbouncer, and single-caller latencies next to a bare round trip; for the relay, one
//! batch at a time, the time of its claim, publish and confirms, mark and commit.
//!
//! Postgres runs with production durability (`keel_testkit::bench::ProductionDurability`):
//! with `fsync` or `synchronous_commit` off a commit is nearly free, which flatters whichever
//! side commits more often. The report records what the bench's sessions saw.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use keel_amqp::RelayConfig;
use keel_pg::outbox::{self, NewEvent};
use keel_testkit::bench::{Durability, ProductionDurability, Row, paired_ratio_row, round};
use keel_testkit::{TestDb, TestVhost, eventually};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sqlx::Connection as _;
use tokio_util::sync::CancellationToken;

const EVENTS: usize = 5_000;
const ROUNDS: usize = 3;
const QUEUE: &str = "bench.sink";
/// Fixed poll of the outbox backlog while the relay drains it: the drain takes a second or
/// two, so `eventually`'s widening pauses (up to 200 ms) would be a large share of it.
const DRAIN_POLL: Duration = Duration::from_millis(10);

/// The relay as checkout runs it (`[relay]` of its checked-in configuration).
fn relay_config() -> RelayConfig {
    let config: checkout::Config = keel_testkit::config(checkout::DEFAULT_CONFIG, &[]);
    config.relay
}

async fn sink(url: &str) -> (Connection, lapin::Channel) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    keel_amqp::topology::declare_exchanges(&ch).await.unwrap();
    ch.queue_declare(
        QUEUE.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        QUEUE.into(),
        keel_events::EXCHANGE.into(),
        "bench.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    (conn, ch)
}

/// One message as the raw publisher sends it: the outbox row's body and its aggregate.
struct Message {
    aggregate: usize,
    body: Vec<u8>,
}

/// Commits `EVENTS` events, `per_aggregate` of each aggregate one after the other, and returns
/// their bodies in outbox order.
async fn fill_outbox(pool: &sqlx::PgPool, per_aggregate: usize) -> Vec<Message> {
    let mut tx = pool.begin().await.unwrap();
    for i in 0..EVENTS {
        let aggregate = format!("agg-{}", i / per_aggregate);
        outbox::insert(
            &mut tx,
            &NewEvent {
                aggregate_type: "bench",
                aggregate_id: &aggregate,
                event_type: "bench.item.created",
                data: serde_json::json!({ "n": i, "pad": "x".repeat(200) }),
            },
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    let rows: Vec<(String, serde_json::Value)> = sqlx::query_as(
        "SELECT aggregate_id, payload FROM outbox WHERE sent_at IS NULL ORDER BY seq",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(aggregate, payload)| Message {
            aggregate: aggregate["agg-".len()..].parse().unwrap(),
            body: serde_json::to_vec(&payload).unwrap(),
        })
        .collect()
}

/// One raw publishing lane: `messages` in batches of `batch`, each batch sent whole, then its
/// confirms awaited together (as `keel_amqp::publisher::Publisher::publish_batch` does).
async fn raw_lane(ch: lapin::Channel, messages: Vec<Vec<u8>>, batch: usize) {
    for chunk in messages.chunks(batch) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for body in chunk {
            // The same properties the relay sets (conventions: id, type, timestamp, content
            // type, persistent, traceparent), so both sides send identical messages.
            let mut headers = FieldTable::default();
            headers.insert(
                "traceparent".into(),
                AMQPValue::LongString(keel_amqp::publisher::fresh_traceparent().into()),
            );
            let props = BasicProperties::default()
                .with_message_id(uuid::Uuid::new_v4().to_string().into())
                .with_type("bench.item.created".into())
                .with_timestamp(1_700_000_000)
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_headers(headers);
            confirms.push(
                ch.basic_publish(
                    keel_events::EXCHANGE.into(),
                    "bench.item.created".into(),
                    BasicPublishOptions::default(),
                    body,
                    props,
                )
                .await
                .unwrap(),
            );
        }
        for c in confirms {
            assert!(c.await.unwrap().is_ack());
        }
    }
}

/// Raw lapin, as fast as it allows at the relay's batch size and concurrency: one task and
/// one confirm-mode channel (opened beforehand) per lane, as the relay runs one per loop; an
/// aggregate's messages all go to one lane, in order.
async fn raw_publish(conn: &Connection, messages: &[Message], config: &RelayConfig) -> f64 {
    let lanes = config.concurrency.max(1) as usize;
    let mut shards: Vec<Vec<Vec<u8>>> = vec![Vec::new(); lanes];
    for m in messages {
        shards[m.aggregate % lanes].push(m.body.clone());
    }
    let mut channels = Vec::with_capacity(lanes);
    for _ in 0..lanes {
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        channels.push(ch);
    }
    let batch = config.batch_size as usize;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (ch, shard) in channels.iter().zip(shards) {
        tasks.spawn(raw_lane(ch.clone(), shard, batch));
    }
    tasks.join_all().await;
    let rate = messages.len() as f64 / started.elapsed().as_secs_f64();
    for ch in channels {
        let _ = ch.close(200, "done".into()).await;
    }
    rate
}

async fn relay_drain(pool: &sqlx::PgPool, amqp_url: &str, config: &RelayConfig) -> f64 {
    let stop = CancellationToken::new();
    let broker = connected_broker(amqp_url, &stop).await;
    let mut poll = pool.acquire().await.unwrap();
    let started = Instant::now();
    let relay = keel_amqp::relay::spawn(pool.clone(), broker.clone(), config.clone(), stop.clone());
    let deadline = started + Duration::from_secs(120);
    let mut tick = tokio::time::interval(DRAIN_POLL);
    loop {
        tick.tick().await;
        if outbox::backlog(&mut poll).await.unwrap().unsent == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "outbox not drained within 120 s");
    }
    let rate = EVENTS as f64 / started.elapsed().as_secs_f64();
    drop(poll);
    stop.cancel();
    relay.await.unwrap();
    broker.close().await;
    rate
}

/// A Keel broker connection to `amqp_url`, as a service configures one, once connected.
async fn connected_broker(amqp_url: &str, stop: &CancellationToken) -> keel_amqp::Broker {
    let broker = keel_amqp::Broker::spawn(
        keel_testkit::config::<BenchAmqp>(
            "[amqp]\nurl = \"amqp://x\"\nconnect_timeout = \"3s\"\nmax_backoff = \"1s\"\n",
            &[("KEEL_AMQP__URL", amqp_url)],
        )
        .amqp,
        "bench",
        stop.clone(),
    );
    eventually(Duration::from_secs(10), "broker connected", || async {
        broker.is_connected().await.then_some(())
    })
    .await;
    broker
}

#[derive(Debug, serde::Deserialize)]
struct BenchAmqp {
    amqp: keel_amqp::AmqpConfig,
}

impl keel_config::Validate for BenchAmqp {
    fn validate(&self) -> Result<(), keel_config::ConfigError> {
        self.amqp.validate()
    }
}

/// Where a relay batch's time goes: the relay's own steps (`outbox::claim`,
/// `Publisher::publish_batch`, `outbox::mark_sent`, commit) run one batch at a time on a
/// fresh backlog and timed separately, printed as the mean per batch. Not a row: the
/// explanation of one.
async fn relay_breakdown(
    pool: &sqlx::PgPool,
    amqp_url: &str,
    config: &RelayConfig,
    per_aggregate: usize,
) {
    let stop = CancellationToken::new();
    let broker = connected_broker(amqp_url, &stop).await;
    let mut publisher =
        keel_amqp::publisher::Publisher::new(broker.clone(), config.publish_timeout);
    publisher.ready().await.unwrap();
    let (mut claim, mut publish, mut mark, mut commit, mut batches) = (0.0, 0.0, 0.0, 0.0, 0u32);
    let started = Instant::now();
    // Bounded: EVENTS rows, at least one per batch.
    for _ in 0..EVENTS {
        let t = Instant::now();
        let mut tx = pool.begin().await.unwrap();
        let rows = outbox::claim(&mut tx, i64::from(config.batch_size))
            .await
            .unwrap();
        claim += t.elapsed().as_secs_f64();
        if rows.is_empty() {
            tx.commit().await.unwrap();
            break;
        }
        let batch: Vec<_> = rows
            .iter()
            .map(|r| keel_amqp::publisher::Outgoing::from_outbox(r).unwrap())
            .collect();
        let t = Instant::now();
        let results = publisher.publish_batch(&batch).await.unwrap();
        publish += t.elapsed().as_secs_f64();
        assert!(results.iter().all(Result::is_ok));
        let ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.id).collect();
        let t = Instant::now();
        outbox::mark_sent(&mut tx, &ids).await.unwrap();
        mark += t.elapsed().as_secs_f64();
        let t = Instant::now();
        tx.commit().await.unwrap();
        commit += t.elapsed().as_secs_f64();
        batches += 1;
    }
    let total = started.elapsed().as_secs_f64();
    let per = |v: f64| round(v * 1000.0 / f64::from(batches.max(1)), 2);
    println!(
        "relay breakdown, {per_aggregate} per aggregate, one batch at a time: {batches} batches of \
         up to {} in {:.2} s ({:.0} events/s); per batch: claim {} ms, publish + confirms {} ms, \
         mark sent {} ms, commit {} ms",
        config.batch_size,
        total,
        EVENTS as f64 / total,
        per(claim),
        per(publish),
        per(mark),
        per(commit),
    );
    publisher.discard().await;
    stop.cancel();
    broker.close().await;
}

/// Relay ÷ raw rows, one per events-per-aggregate layout, on one database and vhost.
async fn relay_rows() -> (Vec<Row>, Durability) {
    let db = TestDb::create("billing", &billing::MIGRATOR).await;
    let durability = Durability::require(&db.app_url()).await;
    let vhost = TestVhost::create().await;
    let config = relay_config();
    // Like the service's pool: the relay's loops and the backlog gauge share it.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&db.app_url())
        .await
        .unwrap();
    let (conn, ch) = sink(&vhost.url()).await;
    let mut rows = Vec::new();
    for (name, per_aggregate, goal) in [
        ("relay_publish_rate", 1, Some(0.8)),
        ("relay_publish_rate_10_per_aggregate", 10, None),
    ] {
        let (mut keel, mut raw) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            sqlx::query("DELETE FROM outbox")
                .execute(&pool)
                .await
                .unwrap();
            let messages = fill_outbox(&pool, per_aggregate).await;
            raw.push(raw_publish(&conn, &messages, &config).await);
            ch.queue_purge(QUEUE.into(), QueuePurgeOptions::default())
                .await
                .unwrap();
            keel.push(relay_drain(&pool, &vhost.url(), &config).await);
            ch.queue_purge(QUEUE.into(), QueuePurgeOptions::default())
                .await
                .unwrap();
        }
        rows.push(paired_ratio_row(name, "events/s", &keel, &raw, goal));
        sqlx::query("DELETE FROM outbox")
            .execute(&pool)
            .await
            .unwrap();
        fill_outbox(&pool, per_aggregate).await;
        relay_breakdown(&pool, &vhost.url(), &config, per_aggregate).await;
        ch.queue_purge(QUEUE.into(), QueuePurgeOptions::default())
            .await
            .unwrap();
    }
    pool.close().await;
    (rows, durability)
}

const PLACE_CALLERS: usize = 16;
const PLACE_SECONDS: u64 = 3;
/// Placement rounds (each: Keel, fused, bare insert, 3 s apiece).
const PLACE_ROUNDS: usize = 5;

/// CPU seconds a process has used (`/proc/<pid>/stat` utime + stime, in USER_HZ = 100 ticks).
fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The fields after the command name, which is in parentheses and may hold spaces.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f[11].parse::<f64>().ok()? + f[12].parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

/// Where one side's CPU went: this process (the callers and sqlx), the Postgres backends
/// serving the bench database, and pgbouncer (shared with anything else on the machine).
#[derive(Debug, Default, Clone, Copy)]
struct CpuUse {
    client: f64,
    backends: f64,
    pgbouncer: f64,
    done: u64,
}

/// CPU counters of the processes a placement run uses, to diff around it.
struct CpuProbe {
    admin: sqlx::PgPool,
    database: String,
    pgbouncer: Vec<u32>,
}

impl CpuProbe {
    async fn new(db: &TestDb) -> Self {
        let pgbouncer = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "pgbouncer")
            })
            .collect();
        Self {
            admin: sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(&db.admin_url())
                .await
                .unwrap(),
            database: db.name.clone(),
            pgbouncer,
        }
    }

    async fn sample(&self) -> Vec<(u32, f64)> {
        let pids: Vec<i32> =
            sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = $1")
                .bind(&self.database)
                .fetch_all(&self.admin)
                .await
                .unwrap();
        let mut v: Vec<(u32, f64)> = pids
            .into_iter()
            .map(|p| (p as u32, cpu_seconds(p as u32)))
            .collect();
        v.push((0, cpu_seconds(std::process::id())));
        for p in &self.pgbouncer {
            v.push((u32::MAX - p, cpu_seconds(*p)));
        }
        v
    }

    /// Runs `work` (a [`rate`]) and returns its rate and the CPU it cost.
    async fn measure(&self, work: impl std::future::Future<Output = (f64, u64)>) -> (f64, CpuUse) {
        let before = self.sample().await;
        let (per_s, done) = work.await;
        let after = self.sample().await;
        let mut used = CpuUse {
            done,
            ..CpuUse::default()
        };
        for (pid, end) in after {
            let start = before.iter().find(|(p, _)| *p == pid).map_or(0.0, |b| b.1);
            let d = end - start;
            match pid {
                0 => used.client += d,
                p if p > u32::MAX / 2 => used.pgbouncer += d,
                _ => used.backends += d,
            }
        }
        (per_s, used)
    }
}

fn add(total: &mut CpuUse, run: CpuUse) {
    total.client += run.client;
    total.backends += run.backends;
    total.pgbouncer += run.pgbouncer;
    total.done += run.done;
}

fn per_order(name: &str, u: &CpuUse) -> String {
    let us = |s: f64| round(s * 1e6 / u.done.max(1) as f64, 0);
    format!(
        "{name}: client {} µs, postgres {} µs, pgbouncer {} µs",
        us(u.client),
        us(u.backends),
        us(u.pgbouncer)
    )
}

/// Runs `op` from `PLACE_CALLERS` tasks for `PLACE_SECONDS`; returns completed ops per second
/// and how many.
async fn rate<F, Fut>(op: F) -> (f64, u64)
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let until = Instant::now() + Duration::from_secs(PLACE_SECONDS);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..PLACE_CALLERS {
        let op = op.clone();
        tasks.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                op(caller as u64 * 1_000_000 + n).await;
                n += 1;
            }
            n
        });
    }
    let done: u64 = tasks.join_all().await.into_iter().sum();
    (done as f64 / started.elapsed().as_secs_f64(), done)
}

/// The floor for placement: every row `place_order` writes, in one statement (one round
/// trip, one commit). Prices are read inside it; the stored answer and the event envelope
/// are built in SQL around what only the database knows (the total, `now()`).
const FUSED_PLACEMENT: &str = "
WITH priced AS (
    SELECT l.line_no, l.sku, l.quantity, p.price_minor, p.currency
      FROM unnest($1::int[], $2::text[], $3::int[]) AS l(line_no, sku, quantity)
      JOIN products p ON p.sku = l.sku),
total AS (SELECT sum(price_minor * quantity)::bigint AS minor FROM priced),
k AS (
    INSERT INTO idempotency_keys (scope, key, request_hash, expires_at, status_code, response)
    SELECT $4, $5, $6, now() + make_interval(secs => $7::float8 / 1000), 202,
           jsonb_build_object(
               'id', $8::uuid, 'customer_id', $9::text, 'state', 'PENDING',
               'total', jsonb_build_object('minor', t.minor, 'currency', $10::text),
               'lines', (SELECT jsonb_agg(jsonb_build_object(
                            'sku', sku, 'quantity', quantity,
                            'unit_price', jsonb_build_object('minor', price_minor,
                                                             'currency', currency),
                            'line_total', jsonb_build_object('minor', price_minor * quantity,
                                                             'currency', currency))
                            ORDER BY line_no) FROM priced),
               'history', jsonb_build_array(jsonb_build_object('state', 'PENDING', 'at', now())),
               'created_at', now(), 'updated_at', now())
      FROM total t
    ON CONFLICT DO NOTHING
    RETURNING 1),
o AS (
    INSERT INTO orders (id, customer_id, currency, total_minor, state)
    SELECT $8, $9, $10, t.minor, 'PENDING' FROM total t, k
    RETURNING id),
l AS (
    INSERT INTO order_lines (order_id, line_no, sku, quantity, unit_price_minor)
    SELECT o.id, p.line_no, p.sku, p.quantity, p.price_minor FROM o, priced p),
h AS (INSERT INTO order_history (order_id, state) SELECT o.id, 'PENDING' FROM o),
s AS (
    INSERT INTO sagas (id, order_id, state, payment_token, deadline)
    SELECT $11, o.id, 'PENDING', $12, now() + make_interval(secs => $13::float8 / 1000) FROM o),
j AS (
    INSERT INTO jobs (id, queue, payload, max_attempts, run_at, state)
    SELECT $14, $15, $16, $17, now(), 'queued' FROM o),
e AS (
    INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload)
    SELECT $18, 'order', o.id::text, $19,
           jsonb_set(jsonb_set($20::jsonb, '{data,total_minor}', to_jsonb(t.minor)),
                     '{occurred_at}', to_jsonb(now()))
      FROM o, total t)
SELECT count(*) FROM o";

/// What the fused statement needs that does not change between calls.
#[derive(Clone)]
struct Fused {
    pool: sqlx::PgPool,
    order: checkout::orders::request::PlaceOrder,
    scope: String,
    customer: keel_events::CustomerId,
    ttl_ms: f64,
    deadline_ms: f64,
    max_attempts: i32,
}

impl Fused {
    async fn place(&self, key: &str) {
        let line_nos: Vec<i32> = (0..).take(self.order.lines.len()).collect();
        let skus: Vec<&str> = self.order.lines.iter().map(|l| l.sku.as_str()).collect();
        let quantities: Vec<i32> = self.order.lines.iter().map(|l| l.quantity).collect();
        let order_id = checkout::orders::OrderId::new();
        let saga_id = checkout::saga::SagaId(uuid::Uuid::now_v7());
        let job = checkout::saga::SagaJob { saga_id }
            .to_new_job(self.max_attempts)
            .unwrap();
        let kind = keel_events::order::EventType::parse(keel_events::order::PLACED).unwrap();
        let event = keel_events::JourneyEvent::Order(
            kind,
            keel_events::order::OrderEvent {
                order_id,
                customer_id: self.customer.clone(),
                state: kind.state(),
                // Set in SQL from the prices read there.
                total_minor: 0,
                currency: self.order.currency,
                reason: None,
            },
        );
        let event_id = uuid::Uuid::now_v7();
        let envelope = serde_json::json!({
            "id": event_id,
            "type": event.event_type(),
            "schema_version": keel_events::SCHEMA_VERSION,
            "aggregate_id": order_id.to_string(),
            "occurred_at": null,
            "data": event.data().unwrap(),
        });
        let written: i64 = sqlx::query_scalar(FUSED_PLACEMENT)
            .bind(&line_nos)
            .bind(&skus)
            .bind(&quantities)
            .bind(&self.scope)
            .bind(key)
            .bind(self.order.fingerprint(&self.scope))
            .bind(self.ttl_ms)
            .bind(order_id.0)
            .bind(self.customer.as_str())
            .bind(self.order.currency.as_str())
            .bind(saga_id.0)
            .bind(&self.order.payment_token)
            .bind(self.deadline_ms)
            .bind(job.id.unwrap())
            .bind(job.queue)
            .bind(&job.payload)
            .bind(job.max_attempts)
            .bind(event_id)
            .bind(event.event_type())
            .bind(&envelope)
            .fetch_one(&self.pool)
            .await
            .unwrap();
        assert_eq!(written, 1, "the fused placement wrote its order");
    }
}

/// Calls `op` `n` times one after the other; returns the mean latency in milliseconds.
async fn mean_ms<F, Fut>(n: u32, mut op: F) -> f64
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    for i in 0..n {
        op(i).await;
    }
    round(started.elapsed().as_secs_f64() * 1000.0 / f64::from(n), 3)
}

/// Where placement's time goes, printed (the explanation of the rows, not a row): one caller
/// at a time, the mean latency of Keel's placement, the fused statement, the bare insert, a
/// bare round trip through pgbouncer (`SELECT 1`) and a commit that writes nothing.
/// Placement runs 9 statements (BEGIN, the key, the prices, order + lines + history, the
/// outbox event, the saga, its job, the key's answer, COMMIT), each a round trip.
async fn placement_breakdown(
    state: &checkout::orders::OrdersState,
    fused: &Fused,
    caller: &checkout::api_keys::Authenticated,
    order: &checkout::orders::request::PlaceOrder,
) {
    const N: u32 = 200;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let keel = mean_ms(N, |i| {
        let key = format!("{run}-breakdown-{i}");
        async move {
            let placed = checkout::orders::place_order(state, caller, order, &key).await;
            assert!(matches!(placed, Ok(checkout::orders::Placed::New(_))));
        }
    })
    .await;
    let floor = mean_ms(N, |i| {
        let key = format!("{run}-breakdown-fused-{i}");
        async move { fused.place(&key).await }
    })
    .await;
    let pool = &state.pool;
    let bare = mean_ms(N, |_| async move {
        sqlx::query(
            "INSERT INTO orders (id, customer_id, currency, total_minor, state)
             VALUES ($1, 'bench', 'EUR', 1200, 'PENDING')",
        )
        .bind(uuid::Uuid::now_v7())
        .execute(pool)
        .await
        .unwrap();
    })
    .await;
    let round_trip = mean_ms(N, |_| async move {
        sqlx::query("SELECT 1").execute(pool).await.unwrap();
    })
    .await;
    let empty_tx = mean_ms(N, |_| async move {
        pool.begin().await.unwrap().commit().await.unwrap();
    })
    .await;
    println!(
        "placement breakdown, one caller, mean of {N}: keel {keel} ms (9 round trips), fused \
         {floor} ms (1), bare insert {bare} ms (1); a round trip (SELECT 1) {round_trip} ms, \
         BEGIN + COMMIT without writes {empty_tx} ms; load {:?}",
        keel_testkit::bench::load_1m()
    );
}

/// Placement ÷ the fused statement (goal) and ÷ the bare insert (reported).
async fn placement_rows() -> (Vec<Row>, Durability) {
    let db = TestDb::create("checkout", &checkout::MIGRATOR).await;
    let url = db.app_url();
    let durability = Durability::require(&url).await;
    let config: checkout::Config = keel_testkit::config(
        checkout::DEFAULT_CONFIG,
        &[("KEEL_DATABASE__URL", url.as_str())],
    );
    // The service's own pool settings (size, acquire timeout), through pgbouncer.
    let pool = keel_pg::runtime_pool(&config.database, "bench").unwrap();
    let state = checkout::orders::OrdersState {
        pool: pool.clone(),
        orders: config.orders.clone(),
        saga: config.saga.clone(),
    };
    let order = checkout::orders::request::parse(
        br#"{"currency":"EUR","payment_token":"tok_approve",
             "lines":[{"sku":"KEEL-MUG","quantity":1},{"sku":"KEEL-BOOK","quantity":2}]}"#,
        checkout::orders::request::Limits {
            max_lines: config.orders.max_lines,
            max_quantity: config.orders.max_quantity,
        },
    )
    .unwrap();
    let caller = checkout::api_keys::Authenticated {
        customer: keel_events::CustomerId::from("bench"),
        key_id: "bench".to_owned(),
    };
    let fused = Fused {
        pool: pool.clone(),
        order: order.clone(),
        scope: checkout::orders::api::idempotency_scope(&caller.customer),
        customer: caller.customer.clone(),
        ttl_ms: config.orders.idempotency_ttl.as_secs_f64() * 1000.0,
        deadline_ms: config.saga.deadline.as_secs_f64() * 1000.0,
        max_attempts: config.saga.max_attempts,
    };
    let run = uuid::Uuid::new_v4().simple().to_string();
    let (mut keel, mut floor, mut bare) = (Vec::new(), Vec::new(), Vec::new());
    let probe = CpuProbe::new(&db).await;
    let (mut keel_cpu, mut floor_cpu, mut bare_cpu) =
        (CpuUse::default(), CpuUse::default(), CpuUse::default());
    for round in 0..PLACE_ROUNDS {
        let (state, order, run, caller) =
            (state.clone(), order.clone(), run.clone(), caller.clone());
        let (r, used) = probe
            .measure(rate(move |n| {
                let (state, order, caller) = (state.clone(), order.clone(), caller.clone());
                let key = format!("{run}-keel-{round}-{n}");
                async move {
                    let placed = checkout::orders::place_order(&state, &caller, &order, &key).await;
                    assert!(matches!(placed, Ok(checkout::orders::Placed::New(_))));
                }
            }))
            .await;
        add(&mut keel_cpu, used);
        keel.push(r);
        let (fused, run) = (fused.clone(), uuid::Uuid::new_v4().simple().to_string());
        let (r, used) = probe
            .measure(rate(move |n| {
                let fused = fused.clone();
                let key = format!("{run}-fused-{round}-{n}");
                async move { fused.place(&key).await }
            }))
            .await;
        add(&mut floor_cpu, used);
        floor.push(r);
        let pool = pool.clone();
        let (r, used) = probe
            .measure(rate(move |_| {
                let pool = pool.clone();
                async move {
                    sqlx::query(
                        "INSERT INTO orders (id, customer_id, currency, total_minor, state)
                         VALUES ($1, 'bench', 'EUR', 1200, 'PENDING')",
                    )
                    .bind(uuid::Uuid::now_v7())
                    .execute(&pool)
                    .await
                    .unwrap();
                }
            }))
            .await;
        add(&mut bare_cpu, used);
        bare.push(r);
    }
    println!(
        "placement CPU per order over all rounds ({} callers): {}; {}; {}",
        PLACE_CALLERS,
        per_order("keel", &keel_cpu),
        per_order("fused", &floor_cpu),
        per_order("bare insert", &bare_cpu)
    );
    placement_breakdown(&state, &fused, &caller, &order).await;
    pool.close().await;
    (
        vec![
            paired_ratio_row(
                "placement_vs_fused_sql",
                "orders/s",
                &keel,
                &floor,
                Some(0.8),
            ),
            paired_ratio_row("placement_vs_bare_insert", "orders/s", &keel, &bare, None),
        ],
        durability,
    )
}

const LATENCY_RATE: u64 = 10; // orders per second
const LATENCY_ORDERS: u64 = 100;

async fn latency_rows() -> Vec<Row> {
    let journey = keel_e2e::Journey::start(keel_e2e::Options::default()).await;
    let mut ids = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / LATENCY_RATE));
    for _ in 0..LATENCY_ORDERS {
        tick.tick().await;
        ids.push(journey.place("tok_approve", &[("KEEL-MUG", 1)]).await);
    }
    for id in &ids {
        assert_eq!(
            journey.final_state(id, Duration::from_secs(60)).await,
            "CONFIRMED"
        );
    }
    let mut conn = sqlx::PgConnection::connect(&journey.checkout_db.admin_url())
        .await
        .unwrap();
    let mut ms: Vec<f64> = sqlx::query_scalar(
        "SELECT (EXTRACT(EPOCH FROM h.at - o.created_at) * 1000)::float8
           FROM orders o JOIN order_history h ON h.order_id = o.id AND h.state = o.state
          WHERE o.state = 'CONFIRMED'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms[((ms.len() as f64 - 1.0) * p).round() as usize];
    let (p50, p99) = (pct(0.50), pct(0.99));
    println!(
        "POST → CONFIRMED over {} orders at {LATENCY_RATE}/s: p50 {p50:.1} ms, p99 {p99:.1} ms",
        ms.len()
    );
    // Reported figures (at LATENCY_RATE orders/s): no baseline, no goal.
    vec![
        Row::reported("order_to_final_p50_ms", "ms", round(p50, 1)),
        Row::reported("order_to_final_p99_ms", "ms", round(p99, 1)),
    ]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _durable = ProductionDurability::ensure().await;
    let (mut rows, durability) = placement_rows().await;
    let (relay, relay_durability) = relay_rows().await;
    assert_eq!(relay_durability, durability);
    rows.extend(relay);
    rows.extend(Box::pin(latency_rows()).await);
    keel_testkit::bench::record(&rows, &durability);
}
