//! The harness of Keel's end-to-end tests: one whole journey per test.
//!
//! [`Journey::start`] gives a test its own three databases (cloned from each service's
//! migrated template), its own RabbitMQ vhost, and the four **real binaries** (the same
//! artifacts `make dev` runs) wired to each other on ports chosen at run time, so journeys run
//! in parallel with each other and with a running `make dev` stack. checkout reaches billing's
//! gRPC port through a [`FaultProxy`], so a test can take billing away and give it back.
//! Every journey test ends with [`Journey::assert_audit_passes`]: keelctl's invariants over
//! the three databases and the broker must hold once every row is past the audit's time gates,
//! and each check the test's scenario feeds ([`Examines`]) must have examined rows, so no check
//! passes merely because it had nothing to look at. [`rolling::Rolling`] starts the same
//! journey with every hop a restart would break behind a readiness-aware balancer, so a test
//! can replace its services one at a time while orders flow.
//!
//! The service crates are dependencies only for their embedded default configs and migrators
//! (the template databases); the services themselves run as processes.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

pub mod rolling;

use std::path::PathBuf;
use std::time::Duration;

use keel_testkit::{FaultProxy, ServiceProcess, TestDb, TestVhost, eventually};
use serde_json::Value;

/// Where cargo put this test's sibling binaries (`target/<profile>/`), so the journey runs
/// exactly what the build produced, wherever `CARGO_TARGET_DIR` points.
pub fn bin(name: &str) -> String {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test-binary>
    let dir: PathBuf = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the service binaries first (`cargo build --bins`; `make test` does)",
        path.display()
    );
    path.display().to_string()
}

/// Settings a journey test may change.
#[derive(Debug, Clone)]
pub struct Options {
    /// checkout's saga deadline (order creation to final state).
    pub saga_deadline: Duration,
    /// checkout's per-call gRPC timeout to billing.
    pub call_timeout: Duration,
    /// Lease of a saga job (how soon a killed checkout's saga is taken over).
    pub saga_lease: Duration,
    /// How long psp-sim holds a `tok_slow` authorization.
    pub psp_slow_delay: Duration,
    /// The services' broker: `None`, the journey's own vhost on the stack's RabbitMQ (as
    /// guest); `Some(port)`, a node of the test's own on that port (`keel_testkit::RabbitNode`,
    /// the broker drill), reached as each service's own user of the definitions file.
    pub broker_port: Option<u16>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            saga_deadline: Duration::from_secs(20),
            call_timeout: Duration::from_secs(2),
            // Must exceed call_timeout (checkout refuses a lease shorter than one call).
            saga_lease: Duration::from_secs(3),
            psp_slow_delay: Duration::from_millis(1500),
            broker_port: None,
        }
    }
}

fn reserve_port() -> u16 {
    // Bind, read, release: the port is free for the process started right after. The window
    // is small and the kernel does not hand a just-released ephemeral port out again at once.
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn kv(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// One journey's processes and resources; everything is stopped and dropped with it.
#[derive(Debug)]
pub struct Journey {
    pub checkout_db: TestDb,
    pub billing_db: TestDb,
    pub notification_db: TestDb,
    pub vhost: TestVhost,
    pub psp: ServiceProcess,
    pub billing: ServiceProcess,
    pub notification: ServiceProcess,
    pub checkout: ServiceProcess,
    /// checkout → billing gRPC goes through this.
    pub billing_link: FaultProxy,
    checkout_env: Vec<(String, String)>,
    pub http: reqwest::Client,
    /// An API key of [`E2E_CUSTOMER`], issued as an operator does; the order helpers send it.
    pub api_key: String,
}

/// The customer the journeys' orders are placed for.
pub const E2E_CUSTOMER: &str = "cust-e2e";

impl Journey {
    pub async fn start(options: Options) -> Self {
        let data = own_data().await;
        let (billing_db, vhost) = (&data.billing_db, &data.vhost);
        // No drain delay: nothing routes to these processes but the test itself.
        let drain = Duration::ZERO;
        let psp_port = reserve_port();

        let mut billing_env = billing_env(
            billing_db,
            drain,
            &format!("http://127.0.0.1:{psp_port}"),
            vhost,
        );
        on_broker(&mut billing_env, &options, "billing");
        let billing = ServiceProcess::spawn(&bin("billing"), &[], &billing_env).await;
        let grpc_addr = logged_addr(&billing, "grpc_addr");

        let psp = ServiceProcess::spawn(
            &bin("psp-sim"),
            &[],
            &psp_env(
                &options,
                psp_port,
                &format!("{}/v1/webhooks/psp", billing.base_url()),
            ),
        )
        .await;

        Self::complete(data, &options, drain, psp, billing, grpc_addr).await
    }

    /// The rest of a start, once psp-sim and billing run: notification, the checkout → billing
    /// link (a [`FaultProxy`] to `billing_grpc`), checkout, an API key; returns when every
    /// service is ready. Shared by [`Journey::start`] and `Rolling::start` (which hands it a
    /// balancer's address as `billing_grpc`).
    pub(crate) async fn complete(
        data: Data,
        options: &Options,
        drain: Duration,
        psp: ServiceProcess,
        billing: ServiceProcess,
        billing_grpc: std::net::SocketAddr,
    ) -> Self {
        let Data {
            checkout_db,
            billing_db,
            notification_db,
            vhost,
        } = data;
        let mut notification_env = notification_env(&notification_db, drain, &vhost);
        on_broker(&mut notification_env, options, "notification");
        let notification =
            ServiceProcess::spawn(&bin("notification"), &[], &notification_env).await;

        let billing_link = FaultProxy::start(billing_grpc).await;
        let mut checkout_env = checkout_env(
            &checkout_db,
            drain,
            options,
            &format!("http://{}", billing_link.addr()),
            &vhost,
        );
        on_broker(&mut checkout_env, options, "checkout");
        let checkout = ServiceProcess::spawn(&bin("checkout"), &[], &checkout_env).await;
        let api_key = issue_api_key(&checkout_db).await;

        let journey = Self {
            checkout_db,
            billing_db,
            notification_db,
            vhost,
            psp,
            billing,
            notification,
            checkout,
            billing_link,
            checkout_env,
            http: http_client(),
            api_key,
        };
        journey.wait_all_ready().await;
        journey
    }

    /// Waits until every process's `/readyz` answers 200.
    async fn wait_all_ready(&self) {
        for p in [&self.checkout, &self.billing, &self.notification, &self.psp] {
            self.wait_ready(&p.base_url()).await;
        }
    }

    async fn wait_ready(&self, base: &str) {
        eventually(
            Duration::from_secs(20),
            &format!("{base}/readyz is 200"),
            || async {
                let r = self.http.get(format!("{base}/readyz")).send().await.ok()?;
                (r.status() == 200).then_some(())
            },
        )
        .await;
    }

    /// `POST /v1/orders` with `key` as the Idempotency-Key, as [`E2E_CUSTOMER`].
    pub async fn post_order(&self, key: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/orders", self.checkout.base_url()))
            .bearer_auth(&self.api_key)
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Places an order for `lines` paid with `token`; returns the order id.
    pub async fn place(&self, token: &str, lines: &[(&str, u32)]) -> String {
        let body = order_body(token, lines);
        let r = self
            .post_order(&uuid::Uuid::new_v4().to_string(), &body)
            .await;
        assert_eq!(r.status(), 202, "order accepted");
        let v: Value = r.json().await.unwrap();
        v["id"].as_str().unwrap().to_owned()
    }

    /// `GET url` as JSON; `None` if the request or the body failed (a service restarting,
    /// a poll that did not see its condition yet).
    pub async fn get_json(&self, url: &str) -> Option<Value> {
        self.http.get(url).send().await.ok()?.json().await.ok()
    }

    /// `GET /v1/orders/{id}` as [`E2E_CUSTOMER`]; `None` as [`Journey::get_json`].
    async fn order_json(&self, id: &str) -> Option<Value> {
        let url = format!("{}/v1/orders/{id}", self.checkout.base_url());
        let r = self.http.get(url).bearer_auth(&self.api_key).send().await;
        r.ok()?.json().await.ok()
    }

    /// `GET /v1/orders/{id}`.
    pub async fn order(&self, id: &str) -> Value {
        self.order_json(id)
            .await
            .unwrap_or_else(|| panic!("GET /v1/orders/{id} answered"))
    }

    /// Waits until order `id` is in a final state; returns that state.
    pub async fn final_state(&self, id: &str, deadline: Duration) -> String {
        eventually(deadline, &format!("order {id} final"), || async {
            let o = self.order_json(id).await?;
            let state = o["state"].as_str()?.to_owned();
            keelctl::audit::FINAL_STATES
                .contains(&state.as_str())
                .then_some(state)
        })
        .await
    }

    /// Waits until notification recorded order `id`'s final state.
    pub async fn notified(&self, id: &str) -> Value {
        let url = format!(
            "{}/v1/notifications?order_id={id}",
            self.notification.base_url()
        );
        eventually(
            Duration::from_secs(20),
            &format!("notification for {id}"),
            || async {
                let v = self.get_json(&url).await?;
                (!v["notifications"].as_array()?.is_empty()).then_some(v)
            },
        )
        .await
    }

    /// keelctl's audit over this journey's databases and vhost, read as `keel_auditor` as
    /// keelctl does everywhere, so every journey also proves the auditor's grants suffice.
    /// Its time gates are the shortest the configuration allows (1 s), so a test waits little
    /// past them; its queue backlog bound is 0, as nothing is in flight once a journey has
    /// settled.
    pub async fn audit(&self) -> Result<keelctl::audit::Report, keelctl::audit::AuditError> {
        let stack = keel_testkit::Stack::load();
        let config: keelctl::Config = keel_testkit::config(
            keelctl::DEFAULT_CONFIG,
            &[
                ("KEEL_CHECKOUT__URL", &self.checkout_db.auditor_url()),
                ("KEEL_BILLING__URL", &self.billing_db.auditor_url()),
                (
                    "KEEL_NOTIFICATION__URL",
                    &self.notification_db.auditor_url(),
                ),
                ("KEEL_RABBITMQ__MANAGEMENT_URL", &stack.amqp_mgmt_base()),
                ("KEEL_RABBITMQ__VHOST", &self.vhost.name),
                ("KEEL_AUDIT__SETTLE_WITHIN", "1s"),
                ("KEEL_AUDIT__OUTBOX_WITHIN", "1s"),
                ("KEEL_AUDIT__MAX_QUEUE_BACKLOG", "0"),
            ],
        );
        keelctl::audit::run(&config).await
    }

    /// Asserts the audit passes with every row judged, and that each check in `examines`
    /// examined at least one row; prints the report (it is the journey's summary).
    ///
    /// Polls (bounded) until every check passes and none has rows younger than its time gate:
    /// a row past the gate is judged, so the audit judges the state the journey settled in,
    /// never a moment in which everything was too young to count. The broker's queue counters
    /// come from the management API's samples (every 5 s), which the same poll waits for.
    pub async fn assert_audit_passes(&self, examines: &Examines) {
        let last = std::sync::Mutex::new(String::from("no audit ran"));
        let _show = ShowOnPanic(&last);
        let report = eventually(
            Duration::from_secs(30),
            "audit passes with every row past its gate and every expected check examining rows",
            || async {
                // An audit that could not run (a transient API error) is retried, not fatal.
                let r = match self.audit().await {
                    Ok(r) => r,
                    Err(e) => {
                        *last.lock().unwrap() = format!("the audit could not run: {e}");
                        return None;
                    }
                };
                let unfed = examines.unfed(&r);
                let settled = r.passed() && r.past_gates() && unfed.is_empty();
                if !settled {
                    *last.lock().unwrap() =
                        format!("{r}\nexpected to examine rows but did not: {unfed:?}");
                }
                settled.then_some(r)
            },
        )
        .await;
        eprintln!("{report}");
    }

    /// psp-sim's admin base URL (fault knobs, webhook replay): a listener of its own, whose
    /// address psp-sim logs as `admin_addr` once bound.
    pub async fn psp_admin_url(&self) -> String {
        let addr: std::net::SocketAddr = eventually(
            Duration::from_secs(10),
            "psp-sim logs its admin_addr",
            || async {
                self.psp
                    .logs()
                    .iter()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .find_map(|v| v["admin_addr"].as_str()?.parse().ok())
            },
        )
        .await;
        format!("http://{addr}")
    }

    /// SIGKILLs checkout (no graceful anything) and starts it again on the same database.
    pub async fn kill_and_restart_checkout(&mut self) {
        self.checkout.signal("KILL");
        let _ = self.checkout.wait(Duration::from_secs(10)).await;
        self.checkout = ServiceProcess::spawn(&bin("checkout"), &[], &self.checkout_env).await;
        self.wait_ready(&self.checkout.base_url()).await;
    }

    /// Closes every AMQP connection of this journey's vhost (and only those) through the
    /// management API: the broker "drops" the services, which must reconnect.
    ///
    /// Waits (bounded) until the management API lists the services' connections: its view
    /// lags a freshly opened connection by a moment.
    pub async fn drop_broker_connections(&self) -> usize {
        let stack = keel_testkit::Stack::load();
        let base = stack.amqp_mgmt_base();
        let conns: Vec<Value> = eventually(
            Duration::from_secs(20),
            "the services' AMQP connections are listed",
            || async {
                let conns: Vec<Value> = self
                    .http
                    .get(format!("{base}/api/vhosts/{}/connections", self.vhost.name))
                    .basic_auth("guest", Some("guest"))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                // checkout, billing and notification each hold one.
                (conns.len() >= 3).then_some(conns)
            },
        )
        .await;
        for c in &conns {
            let name = c["name"].as_str().unwrap();
            let _ = self
                .http
                .delete(format!(
                    "{base}/api/connections/{}",
                    keelctl::audit::urlencode(name)
                ))
                .basic_auth("guest", Some("guest"))
                .header("X-Reason", "keel e2e: broker drops connections")
                .send()
                .await
                .unwrap();
        }
        conns.len()
    }
}

/// Prints the last audit if the wait for it panics: the report says which check failed, which
/// rows were still too recent, and which expected check examined nothing.
struct ShowOnPanic<'a>(&'a std::sync::Mutex<String>);

impl Drop for ShowOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let last = self.0.lock().map(|l| l.clone()).unwrap_or_default();
            eprintln!("last audit:\n{last}");
        }
    }
}

/// The audit checks a journey test feeds, by what it did: each must examine at least one row.
///
/// Explicit per test, because which checks have rows depends on the scenario: an order rejected
/// for stock never reaches billing, so billing's payment checks legitimately examine nothing
/// there, while a confirmed order must show up in every payment check. A check not named here
/// may examine nothing; a check named here that examined nothing fails the test.
#[derive(Debug, Clone)]
pub struct Examines(Vec<&'static str>);

impl Examines {
    /// What every journey feeds: it places orders (checkout's saga jobs and order events),
    /// they end (stock and reservations settle) and are announced (notification consumes its
    /// queue and records each with an event of its own).
    pub fn journey() -> Self {
        Self(vec![
            "checkout.orders_final",
            "checkout.stock_conserved",
            "checkout.reservations_match_orders",
            "notification.final_orders_notified_once",
            "checkout.outbox_drained",
            "checkout.no_failed_jobs",
            "notification.outbox_drained",
            "queue:notification.events",
        ])
    }

    /// An order was confirmed: billing holds its payment, captured by the provider's webhook,
    /// and published the payment's events.
    #[must_use]
    pub fn confirmed(self) -> Self {
        self.and(&[
            "billing.confirmed_orders_paid_once",
            "billing.settled_payments_captured",
            "billing.outbox_drained",
        ])
    }

    /// An order ended unpaid (rejected, declined or failed): billing must hold nothing for it.
    #[must_use]
    pub fn unpaid(self) -> Self {
        self.and(&["billing.failed_orders_hold_nothing"])
    }

    /// More checks by id.
    #[must_use]
    pub fn and(mut self, ids: &[&'static str]) -> Self {
        self.0.extend_from_slice(ids);
        self
    }

    /// The expected checks that examined nothing in `report`, or that it does not have at all.
    pub fn unfed<'a>(&'a self, report: &keelctl::audit::Report) -> Vec<&'a str> {
        self.0
            .iter()
            .copied()
            .filter(|id| report.get(id).is_none_or(|c| c.examined == 0))
            .collect()
    }
}

/// An order body for `lines` paid with `token` (the customer is the API key's).
pub fn order_body(token: &str, lines: &[(&str, u32)]) -> Value {
    serde_json::json!({
        "currency": "EUR",
        "payment_token": token,
        "lines": lines.iter().map(|(sku, q)| serde_json::json!({"sku": sku, "quantity": q})).collect::<Vec<_>>(),
    })
}

/// A journey's own data: the three services' databases and a vhost.
pub(crate) struct Data {
    pub(crate) checkout_db: TestDb,
    pub(crate) billing_db: TestDb,
    pub(crate) notification_db: TestDb,
    pub(crate) vhost: TestVhost,
}

/// Creates a journey's [`Data`], all at once.
async fn own_data() -> Data {
    // On the heap: four set-ups in flight at once make a future too large to keep on the
    // caller's stack (clippy::large_futures).
    let (checkout_db, billing_db, notification_db, vhost) = Box::pin(async {
        tokio::join!(
            TestDb::create("checkout", &checkout::MIGRATOR),
            TestDb::create("billing", &billing::MIGRATOR),
            TestDb::create("notification", &notification::MIGRATOR),
            TestVhost::create(),
        )
    })
    .await;
    Data {
        checkout_db,
        billing_db,
        notification_db,
        vhost,
    }
}

/// Points `service`'s broker URL at [`Options::broker_port`]'s node, as its own user.
fn on_broker(env: &mut [(String, String)], options: &Options, service: &str) {
    let Some(port) = options.broker_port else {
        return;
    };
    for (key, value) in env.iter_mut() {
        if key == "KEEL_AMQP__URL" {
            *value = format!("amqp://{service}:{service}_dev@127.0.0.1:{port}/keel");
        }
    }
}

/// What every service process of a journey gets: its database, port 0, and `drain` as its
/// `shutdown.drain_delay`.
fn service_env(db: &TestDb, drain: Duration) -> Vec<(String, String)> {
    let mut env = db.env();
    env.extend(kv(&[
        ("KEEL_HTTP__PORT", "0".into()),
        ("KEEL_SHUTDOWN__DRAIN_DELAY", secs(drain)),
    ]));
    env
}

/// billing's variables: the provider at `psp_url`, events on `vhost`.
fn billing_env(
    db: &TestDb,
    drain: Duration,
    psp_url: &str,
    vhost: &TestVhost,
) -> Vec<(String, String)> {
    let mut env = service_env(db, drain);
    env.extend(kv(&[
        ("KEEL_GRPC__PORT", "0".into()),
        ("KEEL_PSP__BASE_URL", psp_url.to_owned()),
        ("KEEL_AMQP__URL", vhost.url()),
    ]));
    env
}

/// psp-sim's variables: its card API on `http_port` (0: any), webhooks to `webhook_url`. It is
/// never drained: no test rolls it (see [`rolling`]).
fn psp_env(options: &Options, http_port: u16, webhook_url: &str) -> Vec<(String, String)> {
    kv(&[
        ("KEEL_HTTP__PORT", http_port.to_string()),
        ("KEEL_ADMIN__PORT", "0".into()),
        ("KEEL_FAULTS__SLOW_DELAY", secs(options.psp_slow_delay)),
        ("KEEL_SHUTDOWN__DRAIN_DELAY", "0s".into()),
        ("KEEL_WEBHOOK__URL", webhook_url.to_owned()),
    ])
}

/// notification's variables: it consumes from `vhost`.
fn notification_env(db: &TestDb, drain: Duration, vhost: &TestVhost) -> Vec<(String, String)> {
    let mut env = service_env(db, drain);
    env.push(("KEEL_AMQP__URL".into(), vhost.url()));
    env
}

/// checkout's variables: billing's gRPC API at `billing_grpc_url`, the saga bounds of
/// `options`, events on `vhost`.
fn checkout_env(
    db: &TestDb,
    drain: Duration,
    options: &Options,
    billing_grpc_url: &str,
    vhost: &TestVhost,
) -> Vec<(String, String)> {
    let mut env = service_env(db, drain);
    env.extend(kv(&[
        ("KEEL_BILLING__GRPC_URL", billing_grpc_url.to_owned()),
        ("KEEL_BILLING__CALL_TIMEOUT", secs(options.call_timeout)),
        ("KEEL_SAGA__DEADLINE", secs(options.saga_deadline)),
        ("KEEL_SAGA__LEASE", secs(options.saga_lease)),
        ("KEEL_AMQP__URL", vhost.url()),
    ]));
    env
}

/// An API key of [`E2E_CUSTOMER`] in checkout's database, issued as an operator does.
async fn issue_api_key(checkout_db: &TestDb) -> String {
    keelctl::api_keys::issue(&checkout_db.admin_url(), E2E_CUSTOMER)
        .await
        .unwrap()
        .expose()
        .to_owned()
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn secs(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

fn logged_addr(p: &ServiceProcess, field: &str) -> std::net::SocketAddr {
    p.logs()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v[field].as_str().and_then(|a| a.parse().ok()))
        .unwrap_or_else(|| panic!("no `{field}` in the process's logs"))
}
