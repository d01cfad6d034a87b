#![doc = include_str!("../README.md")]
// A test harness panics on purpose: a failed set-up is a failed test, with the reason.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

pub mod balancer;
pub mod bench;
mod broker;
mod db;
pub mod privilege;
mod process;
pub mod proxy;
mod rabbit_node;
mod stack;

use std::future::Future;
use std::time::Duration;

pub use balancer::Balancer;
pub use broker::{QueueCounts, TestBroker};
pub use db::TestDb;
pub use process::ServiceProcess;
pub use proxy::FaultProxy;
pub use rabbit_node::RabbitNode;
pub use stack::{Stack, workspace_root};

/// Polls `check` until it returns `Some`, or panics naming `what` after `deadline`.
///
/// The poll interval starts at 10 ms and doubles up to 200 ms: quick for conditions that are
/// nearly true, cheap for slow ones.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= until {
            panic!("condition not met within {deadline:?}: {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Installs ring as rustls's process-wide crypto provider, as `keel_service::Service::new`
/// does for a service: Keel compiles only ring, and reqwest panics building any client,
/// `http://` ones included, until a provider is installed. Every harness entry point
/// (`Stack::load`, so each `TestDb`, `TestVhost`, `TestRedis` and `FaultProxy`;
/// `ServiceProcess::spawn`; [`config`]) calls it, so a test's own `reqwest` client just works;
/// a test that uses none of them calls it first.
pub fn install_crypto_provider() {
    // Err only says one is installed already: all a client needs.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Builds a service config from `embedded` (the service's `DEFAULT_CONFIG`) and `overrides`
/// given as `KEEL_*` variables, exactly as the binary would from its environment under
/// `KEEL_PROFILE=dev`, as `make dev` runs it: the development secrets are in. An override
/// `("KEEL_PROFILE", "")` loads without them, as production would.
pub fn config<T>(embedded: impl Into<keel_config::Embedded>, overrides: &[(&str, &str)]) -> T
where
    T: serde::de::DeserializeOwned + keel_config::Validate,
{
    install_crypto_provider();
    // First, so that a test's own KEEL_PROFILE (the last one wins) replaces it.
    let env = std::iter::once((
        keel_config::PROFILE_VAR.to_owned(),
        keel_config::DEV_PROFILE.to_owned(),
    ))
    .chain(
        overrides
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    match keel_config::load_from(embedded, env) {
        Ok(c) => c,
        Err(e) => panic!("test config invalid: {e}"),
    }
}

/// A RabbitMQ vhost owned by one test, deleted on drop.
#[derive(Debug)]
pub struct TestVhost {
    pub name: String,
    stack: Stack,
}

impl TestVhost {
    /// Creates a fresh vhost (guest gets full permissions on it).
    pub async fn create() -> Self {
        let stack = Stack::load();
        let name = format!("keel-test-{}", uuid::Uuid::new_v4().simple());
        let client = reqwest::Client::new();
        let base = stack.amqp_mgmt_base();
        let res = client
            .put(format!("{base}/api/vhosts/{name}"))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .expect("RabbitMQ management API reachable (is `make test`'s stack up?)");
        assert!(res.status().is_success(), "create vhost: {}", res.status());
        let res = client
            .put(format!("{base}/api/permissions/{name}/guest"))
            .basic_auth("guest", Some("guest"))
            .json(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}))
            .send()
            .await
            .expect("set vhost permissions");
        assert!(
            res.status().is_success(),
            "set permissions: {}",
            res.status()
        );
        Self { name, stack }
    }

    /// `amqp://guest:guest@host:port/<vhost>`.
    pub fn url(&self) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/{}",
            self.stack.amqp_port, self.name
        )
    }
}

impl TestVhost {
    /// Creates a RabbitMQ user that exists for this test only (deleted on drop), with
    /// `permissions` (`{"configure", "write", "read"}`) on this vhost and `topic_permissions`
    /// (`[{"exchange", "write", "read"}]`). `password_hash` is RabbitMQ's
    /// `rabbit_password_hashing_sha256` form, so the hash a definitions file carries is what the
    /// test logs in with. Returns the user's AMQP URL for this vhost.
    pub async fn user(
        &self,
        name: &str,
        password: &str,
        password_hash: &str,
        permissions: serde_json::Value,
        topic_permissions: &[serde_json::Value],
    ) -> TestUser {
        let base = self.stack.amqp_mgmt_base();
        let user = format!("{}.{name}", self.name);
        let client = reqwest::Client::new();
        let put = |url: String, body: serde_json::Value| {
            let client = client.clone();
            async move {
                let res = client
                    .put(url)
                    .basic_auth("guest", Some("guest"))
                    .json(&body)
                    .send()
                    .await
                    .expect("RabbitMQ management API reachable");
                assert!(
                    res.status().is_success(),
                    "management API: {}",
                    res.status()
                );
            }
        };
        put(
            format!("{base}/api/users/{user}"),
            serde_json::json!({
                "password_hash": password_hash,
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": "",
            }),
        )
        .await;
        put(
            format!("{base}/api/permissions/{}/{user}", self.name),
            permissions,
        )
        .await;
        for topic in topic_permissions {
            put(
                format!("{base}/api/topic-permissions/{}/{user}", self.name),
                topic.clone(),
            )
            .await;
        }
        TestUser {
            url: format!(
                "amqp://{user}:{password}@127.0.0.1:{}/{}",
                self.stack.amqp_port, self.name
            ),
            delete: format!("{base}/api/users/{user}"),
        }
    }
}

/// A RabbitMQ user created by [`TestVhost::user`], deleted on drop.
#[derive(Debug)]
pub struct TestUser {
    /// `amqp://<user>:<password>@host:port/<vhost>`.
    pub url: String,
    delete: String,
}

impl Drop for TestUser {
    fn drop(&mut self) {
        delete_in_background(self.delete.clone());
    }
}

/// Sends a management API DELETE from Drop, which cannot be async: a short-lived thread with
/// its own runtime does it whether or not we are inside a tokio runtime.
fn delete_in_background(url: String) {
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let _ = reqwest::Client::new()
                .delete(url)
                .basic_auth("guest", Some("guest"))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
        });
        Ok::<_, std::io::Error>(())
    })
    .join();
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        delete_in_background(format!(
            "{}/api/vhosts/{}",
            self.stack.amqp_mgmt_base(),
            self.name
        ));
    }
}

/// A Redis key prefix owned by one test; its keys are deleted on drop.
#[derive(Debug)]
pub struct TestRedis {
    /// Keys this test writes must start with this (e.g. `checkout:test:3f2a…:`).
    pub prefix: String,
    stack: Stack,
}

impl TestRedis {
    /// A fresh prefix under `service`'s own (`checkout:test:<uuid>:`, following the rule
    /// that every key starts with the owning service's prefix); checks that Redis answers.
    pub async fn create(service: &str) -> Self {
        let stack = Stack::load();
        let prefix = format!("{service}:test:{}:", uuid::Uuid::new_v4().simple());
        let client = redis::Client::open(stack.redis_url()).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("Redis reachable (is `make test`'s stack up?)");
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .expect("PING");
        Self { prefix, stack }
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        self.stack.redis_url()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let url = self.stack.redis_url();
        let pattern = format!("{}*", self.prefix);
        let _ = std::thread::spawn(move || {
            let client = redis::Client::open(url)?;
            let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
            let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query(&mut conn)?;
            if !keys.is_empty() {
                let _: () = redis::cmd("DEL").arg(keys).query(&mut conn)?;
            }
            Ok::<_, redis::RedisError>(())
        })
        .join();
    }
}
