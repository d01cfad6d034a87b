//! One process, written once (P20, P21, P28): what a service registers while it is built, and
//! the staged shutdown that stops it.
//!
//! A service's `App::build` creates a [`Service`], adds what it has — `postgres`, `broker`,
//! `relay`, `consumer`, `worker`, `http`, `grpc` — each one call, and keeps the handles it
//! needs (a pool, a broker) for its capabilities. `postgres` also brings the platform's
//! retention (`keel_pg::retention`): one recurring purge of the platform's tables per service
//! and their row counts, configured by `[database.retention]`; a service adds a table of its
//! own with [`Service::retain`]. Nothing runs until [`Service::run`]: `build`
//! binds listeners (so a test can read the port) and creates lazy pools, but starts none of
//! its tasks, so a service that is built and dropped leaves nothing behind. (A sqlx pool
//! starts one reaper task of its own when it is created; it ends when the pool is dropped.)
//!
//! [`Service::run`] starts every registered task, serves until the shutdown signal, then stops
//! in stages, each bounded by `[shutdown]` (see [`crate::ShutdownConfig`]):
//!
//! ```text
//! signal ─▶ readiness false ─▶ drain delay ─▶ listeners stop accepting
//!        ─▶ in-flight HTTP/gRPC finish (grace_period)
//!        ─▶ consumers stop and settle their messages (consumers)
//!        ─▶ job workers finish or return their leases (workers)
//!        ─▶ outbox relays publish what the stages above wrote, then stop (relays)
//!        ─▶ broker connections close (broker) ─▶ pools close (pools)
//! ```
//!
//! Each stage stops only after the one before it, because each produces work for the next:
//! a request or a message writes outbox rows the relay must still publish, and the relay needs
//! the broker and the pool. A stage that overruns its bound is cut (its tasks are aborted; work
//! they held comes back by lease expiry or redelivery) and the stop is reported as
//! [`Drained::GraceExpired`].
//!
//! **The rule for a background task that ends early.** A registered task (server, consumer,
//! worker, relay, broker supervisor, lag probe) that panics, or returns before shutdown has
//! begun, is logged once, with its name, and *stops the process*: the same staged
//! shutdown runs, and `run` returns [`ServiceError::TaskEnded`], which the command line turns
//! into exit code 1 so the supervisor (Kubernetes, compose's restart policy) starts a fresh
//! process. Readiness false alone would leave a process that looks alive, is never restarted
//! (liveness stays green) and silently does none of that task's work.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_amqp::{AmqpConfig, Broker, ConsumerConfig, Incoming, Outcome, RelayConfig};
use keel_http::HttpConfig;
use keel_pg::DatabaseConfig;
use keel_pg::retention::{Policy, Retention, RetentionError};
use keel_telemetry::{LagMonitor, TelemetryConfig};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ShutdownConfig;
use crate::health::Health;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
type TaskStart = Box<dyn FnOnce(CancellationToken) -> BoxFuture<()> + Send>;
type ServerStart = Box<dyn FnOnce(CancellationToken) -> BoxFuture<std::io::Result<()>> + Send>;

/// The stage of the shutdown in which a background task is told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Message consumers: stop taking deliveries, settle the ones in flight.
    Consumers,
    /// Job workers: stop claiming, finish or hand back the jobs in flight.
    Workers,
    /// Outbox relays: publish what is committed, then stop.
    Relays,
}

impl Stage {
    const ORDER: [Stage; 3] = [Stage::Consumers, Stage::Workers, Stage::Relays];

    fn name(self) -> &'static str {
        match self {
            Stage::Consumers => "consumers",
            Stage::Workers => "workers",
            Stage::Relays => "relays",
        }
    }

    fn bound(self, config: &ShutdownConfig) -> Duration {
        match self {
            Stage::Consumers => config.consumers,
            Stage::Workers => config.workers,
            Stage::Relays => config.relays,
        }
    }
}

/// Whether a broker connection decides readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerReadiness {
    /// The process is useless without the broker (it consumes): not ready while disconnected.
    Required,
    /// The process keeps working without it (it only publishes through the outbox, whose
    /// rows wait for the broker): the connection is not a readiness check.
    NotRequired,
}

/// How the stop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every stage finished within its bound.
    Clean,
    /// A stage ran out of its bound and what was left of it was cut off.
    GraceExpired,
}

/// Why a service could not be built or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Database(#[from] keel_pg::PgError),
    #[error(transparent)]
    Retention(#[from] RetentionError),
    /// [`Service::retain`] before [`Service::postgres`]: no database to purge.
    #[error("a retention policy for `{table}` needs the service's database: call postgres first")]
    NoDatabase { table: &'static str },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A background task panicked or returned before shutdown (see the module docs).
    #[error(
        "background task `{name}` {how} before shutdown; the process stops so it can be restarted"
    )]
    TaskEnded { name: String, how: &'static str },
}

struct Task {
    name: String,
    stage: Stage,
    start: TaskStart,
}

struct Server {
    name: String,
    start: ServerStart,
}

/// A service being assembled, then run. See the module docs.
pub struct Service {
    name: &'static str,
    http: HttpConfig,
    shutdown: ShutdownConfig,
    health: Health,
    lag: LagMonitor,
    lag_interval: Duration,
    servers: Vec<Server>,
    accept: CancellationToken,
    tasks: Vec<Task>,
    brokers: Vec<Broker>,
    pools: Vec<(String, PgPool)>,
    /// The database's retention until `run` starts it (taken by its task then); `None`
    /// inside when `[database.retention] enabled = false`.
    retention: Option<Arc<Mutex<Option<Retention>>>>,
    /// The latest readiness a `/readyz` call computed, for gRPC health (`crate::grpc`).
    readiness_seen: tokio::sync::watch::Sender<Option<bool>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field(
                "servers",
                &self.servers.iter().map(|s| &s.name).collect::<Vec<_>>(),
            )
            .field(
                "tasks",
                &self.tasks.iter().map(|t| &t.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Service {
    /// A service named `name` (its connection and application name everywhere), with the
    /// health registry (`/readyz` answers within `http.readiness_timeout`) and the runtime-lag
    /// check (P28) already in place.
    pub fn new(
        name: &'static str,
        http: &HttpConfig,
        shutdown: &ShutdownConfig,
        telemetry: &TelemetryConfig,
    ) -> Self {
        // The runtime owns the process: services built in-process (tests) get the same TLS
        // provider as the binary, before their clients are built.
        crate::install_crypto_provider();
        let health = Health::new(http.readiness_timeout);
        let lag = LagMonitor::default();
        health.watch_runtime_lag(lag.clone(), telemetry.max_runtime_lag);
        Self {
            name,
            http: http.clone(),
            shutdown: shutdown.clone(),
            health,
            lag,
            lag_interval: telemetry.lag_probe_interval,
            servers: Vec::new(),
            accept: CancellationToken::new(),
            tasks: Vec::new(),
            brokers: Vec::new(),
            pools: Vec::new(),
            retention: None,
            readiness_seen: tokio::sync::watch::Sender::new(None),
        }
    }

    /// The service's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The health registry: add a check of your own, or hand it to gRPC health.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Fires when listeners stop accepting (after the drain delay): what holds a request open
    /// on purpose (a long poll, a simulated slow answer) ends then, inside the grace period.
    pub fn listeners_closed(&self) -> CancellationToken {
        self.accept.clone()
    }

    /// The runtime pool (through pgbouncer, lazy: no connection until first use), checked by
    /// readiness as `postgres` and closed in the last stage.
    ///
    /// With it comes the platform's retention (`keel_pg::retention`, `[database.retention]`,
    /// on unless `enabled = false`): a worker that purges old rows of the outbox, inbox, job
    /// queue and idempotency keys, one run per `interval` across all instances, and keeps the
    /// `table_rows` gauges current. It stops with the other job workers.
    pub fn postgres(&mut self, config: &DatabaseConfig) -> Result<PgPool, ServiceError> {
        let pool = keel_pg::runtime_pool(config, self.name)?;
        let db = pool.clone();
        self.health.add_check("postgres", move || {
            let db = db.clone();
            async move { keel_pg::ping(&db).await }
        });
        self.pools.push(("postgres pool".to_owned(), pool.clone()));
        let retention = config
            .retention
            .enabled
            .then(|| Retention::new(pool.clone(), &config.retention));
        let enabled = retention.is_some();
        let slot = Arc::new(Mutex::new(retention));
        self.retention = Some(Arc::clone(&slot));
        if enabled {
            let worker = keel_pg::retention::worker_name(self.name);
            self.worker("retention", move |stop| async move {
                // Taken once, when `run` starts the task; `retain` calls all came before.
                let retention = slot.lock().ok().and_then(|mut r| r.take());
                match retention {
                    Some(retention) => retention.run(worker, stop).await,
                    None => stop.cancelled().await,
                }
            });
        }
        Ok(pool)
    }

    /// Adds a table of the service's own to the retention that [`Service::postgres`] set up:
    /// one call, e.g. billing's webhook receipts,
    /// `service.retain(Policy::function("webhook_receipts", "purge_webhook_receipts", age))?`.
    /// Its rows are purged by the same recurring run and counted as
    /// `table_rows{table, state="all"}`. A no-op when retention is disabled.
    pub fn retain(&mut self, policy: Policy) -> Result<(), ServiceError> {
        // Checked whether or not retention runs here: a bad policy fails every build.
        policy.validate()?;
        let Some(slot) = &self.retention else {
            return Err(ServiceError::NoDatabase {
                table: policy.table(),
            });
        };
        if let Ok(mut retention) = slot.lock()
            && let Some(retention) = retention.as_mut()
        {
            retention.add(policy)?;
        }
        Ok(())
    }

    /// The supervised broker connection; it connects (and reconnects) once `run` starts and
    /// closes after the relays. Whether it gates readiness is the caller's explicit choice.
    pub fn broker(&mut self, config: &AmqpConfig, readiness: BrokerReadiness) -> Broker {
        let broker = Broker::new(config.clone(), self.name);
        if readiness == BrokerReadiness::Required {
            let b = broker.clone();
            self.health.add_check("rabbitmq", move || {
                let b = b.clone();
                async move {
                    if b.is_connected().await {
                        Ok(())
                    } else {
                        Err("not connected".to_owned())
                    }
                }
            });
        }
        self.brokers.push(broker.clone());
        broker
    }

    /// The outbox relay (P02) publishing `pool`'s outbox through `broker`. It stops after the
    /// consumers and workers, whose work writes the rows it publishes.
    pub fn relay(&mut self, pool: &PgPool, broker: &Broker, config: &RelayConfig) {
        let (pool, broker, config) = (pool.clone(), broker.clone(), config.clone());
        self.task(Stage::Relays, "outbox relay", move |stop| {
            keel_amqp::relay::run(pool, broker, config, stop)
        });
    }

    /// A message consumer: `run` gets a token that fires when consumers must stop taking
    /// deliveries, and returns once its in-flight messages are settled.
    pub fn consumer<F, Fut>(&mut self, name: &str, run: F)
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.task(Stage::Consumers, name, run);
    }

    /// A RabbitMQ consumer (P03, P05) of `config.queue`, bound to `bindings` on the events
    /// exchange, calling `handler` for each delivery with bounded prefetch and concurrency.
    pub fn amqp_consumer<H, Fut>(
        &mut self,
        name: &str,
        broker: &Broker,
        config: &ConsumerConfig,
        bindings: &[&str],
        handler: H,
    ) where
        H: Fn(Incoming) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let queue = config.queue_spec(bindings);
        let (broker, config) = (broker.clone(), config.clone());
        self.consumer(name, move |stop| {
            keel_amqp::consumer::run(broker, queue, config, handler, stop)
        });
    }

    /// A job worker: `run` gets a token that fires when workers must stop claiming, and
    /// returns once its jobs in flight are finished or handed back.
    pub fn worker<F, Fut>(&mut self, name: &str, run: F)
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.task(Stage::Workers, name, run);
    }

    /// Any background task, stopped in `stage`.
    pub fn task<F, Fut>(&mut self, stage: Stage, name: &str, run: F)
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.tasks.push(Task {
            name: name.to_owned(),
            stage,
            start: Box::new(move |stop| Box::pin(run(stop))),
        });
    }

    /// Binds `http.host:http.port` and serves `routes` inside the Keel HTTP stack (request
    /// ids, limits, timeouts, problem+json, `/livez`, `/readyz`, `/metrics`). Returns the
    /// bound address (port 0 picks one).
    pub async fn http(&mut self, routes: axum::Router) -> Result<SocketAddr, ServiceError> {
        let addr = self.http_on("http", self.http.addr(), routes).await?;
        // `addr` of the `listening` line is the HTTP address (tools and tests read it).
        tracing::info!(%addr, "listening");
        Ok(addr)
    }

    /// Another HTTP listener (an admin or internal port) on `addr`, serving `routes` inside the
    /// same Keel HTTP stack and stopped with the other listeners. Returns the bound address and
    /// logs nothing: the caller names it in a `listening` line of its own, under a field other
    /// than `addr`, which is the main HTTP listener's.
    pub async fn http_on(
        &mut self,
        name: &str,
        addr: SocketAddr,
        routes: axum::Router,
    ) -> Result<SocketAddr, ServiceError> {
        let listener = bind(addr).await?;
        let bound = listener.local_addr()?;
        let router = keel_http::stack::build(routes, self.probe(), &self.http);
        // keel_http::serve, not axum::serve: header-read and first-request deadlines, a
        // connection cap and header size cap (P15).
        let limits = self.http.limits.clone();
        self.server(name, move |stop| async move {
            keel_http::serve(listener, router, &limits, stop.cancelled_owned()).await
        });
        Ok(bound)
    }

    /// The readiness probe `/readyz` answers from: the health registry, each answer also
    /// handed to gRPC health so both report the same state at the same moment.
    fn probe(&self) -> keel_http::ReadinessProbe {
        let (health, seen) = (self.health.clone(), self.readiness_seen.clone());
        keel_http::ReadinessProbe::from_fn(move || {
            let (health, seen) = (health.clone(), seen.clone());
            async move {
                let readiness = health.ready().await;
                seen.send_replace(Some(readiness.ready));
                readiness
            }
        })
    }

    /// Binds `config.host:config.port` and serves `routes` over gRPC, with `grpc.health.v1`
    /// added (tonic-health, kept current from the health registry by one task) and the
    /// server's limits from `config` (see [`crate::GrpcConfig`]), until listeners stop
    /// accepting; in-flight calls then get the grace period, like HTTP requests.
    #[cfg(feature = "grpc")]
    pub async fn grpc(
        &mut self,
        config: &crate::GrpcConfig,
        routes: tonic::service::Routes,
    ) -> Result<SocketAddr, ServiceError> {
        let listener = bind(config.addr()).await?;
        let bound = listener.local_addr()?;
        let (routes, reporter) = crate::grpc::with_health(routes, self.name, config).await;
        let (name, health, interval) = (self.name, self.health.clone(), config.health_interval);
        let (seen, closed) = (self.readiness_seen.subscribe(), self.accept.clone());
        // It ends by itself when listeners close; the stage is only where it is waited for.
        self.task(Stage::Consumers, "grpc health reporter", move |_| {
            crate::grpc::report(name, reporter, health, interval, seen, closed)
        });
        let server = crate::grpc::server(config);
        self.server("grpc", move |stop| async move {
            let mut server = server;
            server
                .add_routes(routes)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await
                .map_err(std::io::Error::other)
        });
        tracing::info!(grpc_addr = %bound, "listening");
        Ok(bound)
    }

    /// Any server: `serve` gets a token that fires when listeners must stop accepting, and
    /// returns once its in-flight requests are done.
    pub fn server<F, Fut>(&mut self, name: &str, serve: F)
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = std::io::Result<()>> + Send + 'static,
    {
        self.servers.push(Server {
            name: name.to_owned(),
            start: Box::new(move |stop| Box::pin(serve(stop))),
        });
    }

    /// Starts everything, serves until `signal`, then stops in stages (module docs).
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<Drained, ServiceError> {
        let Service {
            name,
            shutdown,
            health,
            lag,
            lag_interval,
            servers,
            accept,
            tasks,
            brokers,
            pools,
            ..
        } = self;
        let failed = Failures::default();

        // Always-on tasks first: the lag probe and the broker supervisors. They stop last.
        let background = Group::new("background");
        background.spawn(
            "runtime lag probe",
            |stop| lag.run(lag_interval, stop),
            &failed,
        );
        for broker in &brokers {
            let b = broker.clone();
            background.spawn("rabbitmq connection", move |_| b.supervise(), &failed);
        }
        // Then the stages, in reverse order of stopping: the relays are up before anything
        // writes, and consumers start last.
        let mut groups: Vec<(Stage, Group)> = Stage::ORDER
            .iter()
            .map(|s| (*s, Group::new(s.name())))
            .collect();
        let mut tasks = tasks;
        for (stage, group) in groups.iter().rev() {
            for task in tasks.extract_if(.., |t| t.stage == *stage) {
                group.spawn(&task.name, task.start, &failed);
            }
        }
        let listeners = Group::with_token("servers", accept);
        for server in servers {
            let (start, name) = (server.start, server.name.clone());
            let failed_server = failed.clone();
            listeners.spawn(
                &server.name,
                move |stop| async move {
                    // Logged once, here, with its cause; the early-end rule still applies.
                    if let Err(e) = start(stop).await {
                        tracing::error!(server = %name, error = %e, "server failed; stopping the process");
                        failed_server.record(&name, "failed");
                    }
                },
                &failed,
            );
        }
        tracing::info!(service = name, "running");

        // 1. Wait for the signal, or for a task that ended early (the rule above).
        tokio::select! {
            () = signal => {}
            () = failed.any.cancelled() => {
                tracing::warn!("stopping because a background task ended");
            }
        }
        failed.shutting_down.cancel();
        // 2. Readiness false, then the drain delay while listeners still accept: requests
        //    already routed here are served instead of refused.
        health.set_draining();
        tracing::info!(
            drain_delay_ms = ms(shutdown.drain_delay),
            "draining: readiness is now false"
        );
        tokio::time::sleep(shutdown.drain_delay).await;
        // 3-4. Listeners stop accepting; in-flight requests get the grace period.
        tracing::info!("closing listeners; in-flight requests continue");
        let mut clean = listeners.stop(shutdown.grace_period).await;
        if clean {
            tracing::info!("all in-flight requests finished");
        }
        // 5-7. Consumers, workers, relays, each after the one before.
        for (stage, group) in groups.drain(..) {
            clean &= group.stop(stage.bound(&shutdown)).await;
        }
        // 8. Broker connections close (their supervisors end with them).
        for broker in &brokers {
            clean &= bounded("rabbitmq connection", shutdown.broker, broker.close()).await;
        }
        // 9. Pools close; the always-on tasks stop last.
        for (what, pool) in &pools {
            clean &= bounded(what, shutdown.pools, pool.close()).await;
        }
        // The lag probe (and the broker supervisors, which ended with their connections) stop
        // at once: nothing to wait for.
        background.stop_now();

        let drained = if clean {
            Drained::Clean
        } else {
            Drained::GraceExpired
        };
        tracing::info!(?drained, "stopped");
        match failed.first() {
            Some((name, how)) => Err(ServiceError::TaskEnded { name, how }),
            None => Ok(drained),
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServiceError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServiceError::Bind { addr, source })
}

fn ms(d: Duration) -> u64 {
    keel_config::millis(d)
}

/// Runs one closing step within `limit`; false if it was abandoned.
async fn bounded(what: &str, limit: Duration, close: impl Future<Output = ()>) -> bool {
    if tokio::time::timeout(limit, close).await.is_err() {
        tracing::warn!(
            what,
            limit_ms = ms(limit),
            "did not close in time; abandoned"
        );
        return false;
    }
    true
}

/// Tasks that ended early, a token that fires at the first one, and one that says shutdown
/// has begun (from then on a task may end because its input ended: that is no failure).
#[derive(Clone, Default)]
struct Failures {
    any: CancellationToken,
    shutting_down: CancellationToken,
    list: Arc<Mutex<Vec<(String, &'static str)>>>,
}

impl Failures {
    fn recorded(&self, name: &str) -> bool {
        self.list
            .lock()
            .map(|l| l.iter().any(|(n, _)| n == name))
            .unwrap_or(false)
    }

    fn record(&self, name: &str, how: &'static str) {
        if let Ok(mut list) = self.list.lock() {
            list.push((name.to_owned(), how));
        }
        self.any.cancel();
    }

    fn first(&self) -> Option<(String, &'static str)> {
        self.list.lock().ok().and_then(|l| l.first().cloned())
    }
}

/// The tasks of one stage: one stop token, a tracker to wait for them, abort handles to cut
/// them when the stage's bound runs out.
#[derive(Clone)]
struct Group {
    name: &'static str,
    stop: CancellationToken,
    tracker: TaskTracker,
    aborts: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Group {
    fn new(name: &'static str) -> Self {
        Self::with_token(name, CancellationToken::new())
    }

    fn with_token(name: &'static str, stop: CancellationToken) -> Self {
        Self {
            name,
            stop,
            tracker: TaskTracker::new(),
            aborts: Arc::default(),
        }
    }

    /// Spawns `start(stop)` and a watcher that applies the early-end rule to it.
    fn spawn<F, Fut>(&self, name: &str, start: F, failed: &Failures)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let task: JoinHandle<()> = tokio::spawn(start(self.stop.clone()));
        if let Ok(mut aborts) = self.aborts.lock() {
            aborts.push(task.abort_handle());
        }
        let (stop, failed, name) = (self.stop.clone(), failed.clone(), name.to_owned());
        self.tracker.spawn(async move {
            let how = match task.await {
                Ok(()) if stop.is_cancelled() || failed.shutting_down.is_cancelled() => return,
                // Already reported by the task itself (a server's error).
                Ok(()) if failed.recorded(&name) => return,
                Ok(()) => "returned",
                // Aborted by us after its stage's bound: already reported by `stop`.
                Err(e) if e.is_cancelled() => return,
                // The panic itself was logged by the panic hook (`cli`), with its location.
                Err(_) => "panicked",
            };
            tracing::error!(task = %name, how, "background task ended before shutdown; stopping the process");
            failed.record(&name, how);
        });
    }

    /// Tells the group to stop and waits at most `limit`; what is left is aborted.
    async fn stop(&self, limit: Duration) -> bool {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(limit, self.tracker.wait())
            .await
            .is_ok()
        {
            return true;
        }
        tracing::warn!(
            stage = self.name,
            limit_ms = ms(limit),
            "stage did not finish in time; cutting off what is left"
        );
        // Aborted tasks end at their next await point; nothing more is waited for (the bound
        // is the bound). For a server this ends the accept loop; connections it already
        // handed to their own tasks (hyper, tonic) run until the process exits.
        self.abort();
        false
    }

    /// Stops the group without waiting (what is left ends at its next await point).
    fn stop_now(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.abort();
    }

    fn abort(&self) {
        if let Ok(aborts) = self.aborts.lock() {
            for a in aborts.iter() {
                a.abort();
            }
        }
    }
}
