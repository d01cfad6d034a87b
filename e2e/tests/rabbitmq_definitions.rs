//! The RabbitMQ definitions file is the topology the code declares (P01, P05, P14's broker half).
//!
//! `infra/rabbitmq/definitions.json` is what compose and the kind overlay load at broker boot:
//! the platform's exchanges, every registered service's queues (with their retry tiers and
//! DLQs, as each service's checked-in configuration declares them: `ServiceMain::queues`), and
//! one user per service with least-privilege permissions. Three ways it could rot, three tests:
//! - the file differs from what `keel_amqp::definitions::render` makes of the code and the
//!   registry (`make rabbitmq-definitions` rewrites it; `KEEL_BLESS=1` on this test does too).
//!   Each service's queues come from its own binary (`<service> topology`, under the dev
//!   profile), so a service added with `make new-service` is covered without editing this file;
//! - the registry's `consumes` differs from the queues the services declare;
//! - RabbitMQ itself refuses the file, or a service's own declaration conflicts with it at
//!   start-up (a 406 `PRECONDITION_FAILED` on an argument): the file is imported into a test
//!   vhost, and each service then declares its topology over it, as its own user.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use keel_amqp::definitions::{self, ServiceAccess, Topology};
use keel_amqp::topology::{self, QueueSpec};
use keel_testkit::{ServiceProcess, TestVhost, workspace_root};
use keelctl::Registry;
use lapin::{Connection, ConnectionProperties};

const FILE: &str = "infra/rabbitmq/definitions.json";

fn registry() -> Registry {
    Registry::load(&workspace_root().join("infra/services.toml")).unwrap()
}

/// Every registered service that uses the broker, in registry order: what it publishes (the
/// registry) and what it consumes (`<service> topology`, its checked-in configuration).
async fn topology(registry: &Registry) -> Topology {
    let mut services = Vec::new();
    for entry in registry.services.iter().filter(|s| s.broker) {
        let (status, stdout, stderr) =
            ServiceProcess::run_to_exit(&keel_e2e::bin(&entry.name), &["topology"], &[]).await;
        assert!(status.success(), "{} topology: {stderr}", entry.name);
        let queues: Vec<QueueSpec> = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{} topology printed {stdout:?}: {e}", entry.name));
        services.push(ServiceAccess {
            service: entry.name.clone(),
            publishes: entry.publishes.clone(),
            queues,
        });
    }
    Topology { services }
}

#[tokio::test]
async fn the_definitions_file_is_what_the_code_renders() {
    let rendered = definitions::render_file(&topology(&registry()).await);
    let path = workspace_root().join(FILE);
    if std::env::var_os("KEEL_BLESS").is_some() {
        std::fs::write(&path, &rendered).unwrap();
        return;
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == rendered,
        "{FILE} differs from the topology the code declares: run `make rabbitmq-definitions` \
         and commit the result"
    );
}

#[tokio::test]
async fn the_registry_lists_every_queue_a_service_consumes() {
    let registry = registry();
    for access in topology(&registry).await.services {
        let entry = registry
            .services
            .iter()
            .find(|s| s.name == access.service)
            .unwrap();
        let declared: Vec<_> = access.queues.iter().map(|q| q.name.clone()).collect();
        assert_eq!(
            entry.consumes, declared,
            "infra/services.toml `consumes` of {}",
            access.service
        );
    }
}

/// Deletes the users a test imported (they are global, not per vhost) however the test ends.
struct ImportedUsers {
    base: String,
    names: Vec<String>,
}

impl Drop for ImportedUsers {
    fn drop(&mut self) {
        let (base, names) = (self.base.clone(), std::mem::take(&mut self.names));
        // Drop cannot be async: a thread with a runtime of its own deletes them.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                for name in names {
                    let _ = reqwest::Client::new()
                        .delete(format!("{base}/api/users/{name}"))
                        .basic_auth("guest", Some("guest"))
                        .timeout(std::time::Duration::from_secs(5))
                        .send()
                        .await;
                }
            });
            Ok::<_, std::io::Error>(())
        })
        .join();
    }
}

/// RabbitMQ 3.10 takes the file, and every service's start-up declaration agrees with it:
/// imported into a vhost of its own (users renamed so they are this test's), then each service
/// declares its queues over the imported ones as its own user, with its development password.
#[tokio::test]
async fn rabbitmq_imports_the_file_and_each_service_declares_over_it_as_its_own_user() {
    let vhost = TestVhost::create().await;
    let stack = keel_testkit::Stack::load();
    let base = stack.amqp_mgmt_base();
    let text = std::fs::read_to_string(workspace_root().join(FILE)).unwrap();
    let mut file: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rename = |user: &str| format!("{}.{user}", vhost.name);
    let mut names = Vec::new();
    for section in ["users", "permissions", "topic_permissions"] {
        for item in file[section].as_array_mut().unwrap() {
            let key = if section == "users" { "name" } else { "user" };
            let renamed = rename(item[key].as_str().unwrap());
            if section == "users" {
                names.push(renamed.clone());
            }
            item[key] = serde_json::Value::String(renamed);
        }
    }
    let _cleanup = ImportedUsers {
        base: base.clone(),
        names,
    };
    let mut text = serde_json::to_string(&file).unwrap();
    text = text.replace(
        "\"vhost\":\"keel\"",
        &format!("\"vhost\":\"{}\"", vhost.name),
    );
    text = text.replace(
        "{\"name\":\"keel\"}",
        &format!("{{\"name\":\"{}\"}}", vhost.name),
    );
    let res = reqwest::Client::new()
        .post(format!("{base}/api/definitions"))
        .basic_auth("guest", Some("guest"))
        .header("content-type", "application/json")
        .body(text)
        .send()
        .await
        .unwrap();
    let status = res.status();
    assert!(
        status.is_success(),
        "RabbitMQ refused the definitions: {status} {}",
        res.text().await.unwrap_or_default()
    );

    for access in topology(&registry()).await.services {
        let user = rename(&access.service);
        let url = format!(
            "amqp://{user}:{}@127.0.0.1:{}/{}",
            definitions::dev_password(&access.service),
            stack.amqp_port,
            vhost.name
        );
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("{} logs in with its dev password: {e}", access.service));
        // As the service does at start-up: the shared exchanges checked (passively: it has no
        // `configure` on them), its own queues declared over the imported ones.
        topology::ensure_exchanges(&conn)
            .await
            .unwrap_or_else(|e| panic!("{} checks the exchanges: {e}", access.service));
        let channel = conn.create_channel().await.unwrap();
        for queue in &access.queues {
            topology::declare_own(&channel, queue)
                .await
                .unwrap_or_else(|e| panic!("{} declares {}: {e}", access.service, queue.name));
        }
        let _ = conn.close(200, "done".into()).await;
    }
}
