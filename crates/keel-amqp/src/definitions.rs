//! The topology as a RabbitMQ definitions file, and who may do what in it (P01, P14's broker
//! half).
//!
//! [`render`] turns a [`Topology`] — the platform's exchanges ([`crate::topology`]), every
//! consumer's queues, and one user per service — into the JSON that RabbitMQ imports at boot
//! (`load_definitions`). `infra/rabbitmq/definitions.json` is that output for the registered
//! services; compose and the kind overlay load it, and `e2e/tests/rabbitmq_definitions.rs`
//! fails when it differs from what this code renders (`make rabbitmq-definitions` rewrites it).
//!
//! One user per service, least privilege ([`Permissions::for_service`]):
//! - resource permissions (configure, write, read) only on the platform's exchanges and
//!   `keel.unrouted` (every service declares them, idempotently) and on the service's own
//!   `<service>.` queues;
//! - **topic permissions** narrow what it may publish by routing key: on `keel.events` only the
//!   routing keys the registry says it publishes (`checkout.order.*` for checkout), on
//!   `keel.retry` and `keel.dlx` only its own queues' keys. So notification cannot publish a
//!   `billing.payment.*` event, nor push a message into billing's queue through the retry
//!   exchange (`crates/keel-amqp/tests/permissions.rs` proves both).
//!
//! Plus `keel_operator` (what `keelctl dlq` and `keelctl queues` need: read every queue,
//! publish replays to `keel.events` and `keel.retry`, configure nothing) and `keel`, the
//! administrator of the management UI. Their passwords, and the services', are the development
//! ones (`<user>_dev`, as `config/dev.toml` has them), stored as RabbitMQ's salted SHA-256
//! hashes: a deployment outside development brings its own users (docs/deploy/production.md).
//!
//! Must not break: the file is generated; edit the code, then `make rabbitmq-definitions`.

use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::topology::{
    self, Argument, DEAD_LETTER_EXCHANGE, EXCHANGE, QueueDeclaration, QueueSpec, RETRY_EXCHANGE,
};

/// The vhost every Keel service uses.
pub const VHOST: &str = "keel";
/// The operator's user (`keelctl dlq`, `keelctl queues`).
pub const OPERATOR: &str = "keel_operator";
/// The management UI's administrator (development).
pub const ADMIN: &str = "keel";

/// One service's part of the topology: what it publishes and the queues it consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccess {
    /// The service's name: its user, and the prefix of its queues.
    pub service: String,
    /// Routing-key patterns it publishes on `keel.events` (the registry's `publishes`).
    pub publishes: Vec<String>,
    /// The queues it consumes, with their tiers and DLQs.
    pub queues: Vec<QueueSpec>,
}

/// Everything the definitions file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub services: Vec<ServiceAccess>,
}

/// A user's resource permissions (regular expressions, as RabbitMQ takes them) and its topic
/// permissions per exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub configure: String,
    pub write: String,
    pub read: String,
    /// (exchange, write, read) routing-key expressions.
    pub topics: Vec<(&'static str, String, String)>,
}

/// Matches nothing: RabbitMQ's "no access" for a topic permission.
const NOTHING: &str = "^(?!)$";

fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if !c.is_ascii_alphanumeric() && c != '_' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A topic pattern (`checkout.order.*`, `audit.#`) as a regular expression over routing keys.
pub fn pattern_regex(pattern: &str) -> String {
    let words: Vec<String> = pattern
        .split('.')
        .map(|w| match w {
            "*" => "[^.]+".to_owned(),
            "#" => ".*".to_owned(),
            w => escape(w),
        })
        .collect();
    format!("^{}$", words.join("\\."))
}

fn any_of(alternatives: &[String]) -> String {
    if alternatives.is_empty() {
        NOTHING.to_owned()
    } else {
        format!("^({})$", alternatives.join("|"))
    }
}

impl Permissions {
    /// What `access.service` may do (see the module docs).
    pub fn for_service(access: &ServiceAccess) -> Self {
        let own = format!(
            "^(keel\\.(events|retry|dlx|unrouted)|{}\\..*)$",
            escape(&access.service)
        );
        let publishes: Vec<String> = access
            .publishes
            .iter()
            .map(|p| {
                pattern_regex(p)
                    .trim_start_matches('^')
                    .trim_end_matches('$')
                    .to_owned()
            })
            .collect();
        let queues: Vec<String> = access.queues.iter().map(|q| escape(&q.name)).collect();
        let tiers: Vec<String> = access
            .queues
            .iter()
            .flat_map(|q| {
                std::iter::once(escape(&q.name)).chain(
                    q.retry_tiers
                        .iter()
                        .map(|d| escape(&topology::retry_queue(&q.name, *d))),
                )
            })
            .collect();
        // Topic *read* permissions are not checked for AMQP 0-9-1 bindings; "any" says so
        // instead of pretending to restrict.
        let any = ".*".to_owned();
        Self {
            configure: own.clone(),
            write: own.clone(),
            read: own,
            topics: vec![
                (EXCHANGE, any_of(&publishes), any.clone()),
                (RETRY_EXCHANGE, any_of(&tiers), any.clone()),
                (DEAD_LETTER_EXCHANGE, any_of(&queues), any),
            ],
        }
    }

    /// `keel_operator`: read (and purge) every queue, publish replays, declare nothing.
    pub fn operator() -> Self {
        let any = ".*".to_owned();
        Self {
            configure: String::new(),
            write: "^keel\\.(events|retry)$".to_owned(),
            read: any.clone(),
            topics: vec![
                (EXCHANGE, any.clone(), any.clone()),
                (RETRY_EXCHANGE, any.clone(), any),
            ],
        }
    }
}

/// RabbitMQ's `rabbit_password_hashing_sha256` form: base64(salt ‖ SHA-256(salt ‖ password)).
/// The salt is derived from the user name so the file is the same on every render (these are
/// development passwords; see the module docs).
pub fn password_hash(user: &str, password: &str) -> String {
    let salt = &Sha256::digest(format!("keel-dev-salt:{user}").as_bytes())[..4];
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(password.as_bytes());
    let mut bytes = salt.to_vec();
    bytes.extend_from_slice(&hasher.finalize());
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A user's development password: `<user>_dev`.
pub fn dev_password(user: &str) -> String {
    format!("{user}_dev")
}

fn user(name: &str, tags: &[&str]) -> Value {
    json!({
        "name": name,
        "password_hash": password_hash(name, &dev_password(name)),
        "hashing_algorithm": "rabbit_password_hashing_sha256",
        "tags": tags,
        "limits": {},
    })
}

fn arguments(declaration: &QueueDeclaration) -> Value {
    let mut map = serde_json::Map::new();
    for (key, value) in &declaration.arguments {
        let value = match value {
            Argument::Text(s) => json!(s),
            Argument::Int(n) => json!(n),
        };
        map.insert((*key).to_owned(), value);
    }
    Value::Object(map)
}

/// The definitions file for `topology` (deterministic: the same input renders the same bytes).
pub fn render(topology: &Topology) -> Value {
    let mut users = vec![user(ADMIN, &["administrator"]), user(OPERATOR, &[])];
    let mut permissions = vec![json!({
        "user": ADMIN, "vhost": VHOST, "configure": ".*", "write": ".*", "read": ".*",
    })];
    let mut topic_permissions = Vec::new();
    let mut grant = |name: &str, p: &Permissions| {
        permissions.push(json!({
            "user": name, "vhost": VHOST,
            "configure": p.configure, "write": p.write, "read": p.read,
        }));
        for (exchange, write, read) in &p.topics {
            topic_permissions.push(json!({
                "user": name, "vhost": VHOST, "exchange": exchange, "write": write, "read": read,
            }));
        }
    };
    grant(OPERATOR, &Permissions::operator());
    for access in &topology.services {
        users.push(user(&access.service, &[]));
        grant(&access.service, &Permissions::for_service(access));
    }

    let exchanges: Vec<Value> = topology::exchanges()
        .iter()
        .map(|e| {
            let arguments = match e.alternate {
                Some(alternate) => json!({ "alternate-exchange": alternate }),
                None => json!({}),
            };
            json!({
                "name": e.name, "vhost": VHOST, "type": e.kind.as_str(), "durable": true,
                "auto_delete": false, "internal": false, "arguments": arguments,
            })
        })
        .collect();

    let mut declarations = vec![topology::unrouted_queue()];
    for access in &topology.services {
        for queue in &access.queues {
            declarations.extend(queue.declarations());
        }
    }
    let queues: Vec<Value> = declarations
        .iter()
        .map(|d| {
            json!({
                "name": d.name, "vhost": VHOST, "durable": true, "auto_delete": false,
                "arguments": arguments(d),
            })
        })
        .collect();
    let bindings: Vec<Value> = declarations
        .iter()
        .flat_map(|d| {
            d.bindings.iter().map(move |(exchange, key)| {
                json!({
                    "source": exchange, "vhost": VHOST, "destination": d.name,
                    "destination_type": "queue", "routing_key": key, "arguments": {},
                })
            })
        })
        .collect();

    json!({
        "rabbit_version": "3.10.8",
        "rabbitmq_version": "3.10.8",
        "users": users,
        "vhosts": [{ "name": VHOST }],
        "permissions": permissions,
        "topic_permissions": topic_permissions,
        "parameters": [],
        "global_parameters": [],
        "policies": [],
        "exchanges": exchanges,
        "queues": queues,
        "bindings": bindings,
    })
}

/// [`render`] as the file's text: pretty JSON with a final newline.
pub fn render_file(topology: &Topology) -> String {
    let mut text = serde_json::to_string_pretty(&render(topology)).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn topic_patterns_become_anchored_regexes() {
        assert_eq!(
            pattern_regex("checkout.order.*"),
            "^checkout\\.order\\.[^.]+$"
        );
        assert_eq!(pattern_regex("audit.#"), "^audit\\..*$");
        assert_eq!(pattern_regex("psp-sim.x"), "^psp\\-sim\\.x$");
    }

    fn notification() -> ServiceAccess {
        ServiceAccess {
            service: "notification".into(),
            publishes: vec!["notification.notification.*".into()],
            queues: vec![QueueSpec {
                name: "notification.events".into(),
                bindings: vec!["checkout.order.*".into()],
                delivery_limit: 20,
                max_length: 1000,
                retry_tiers: vec![Duration::from_secs(1)],
                dead_letter_max_length: 1000,
            }],
        }
    }

    #[test]
    fn a_service_publishes_only_its_own_routing_keys() {
        let p = Permissions::for_service(&notification());
        let events = &p.topics[0];
        assert_eq!(events.0, "keel.events");
        assert_eq!(events.1, "^(notification\\.notification\\.[^.]+)$");
        let retry = &p.topics[1];
        assert_eq!(
            retry.1,
            "^(notification\\.events|notification\\.events\\.retry\\.1s)$"
        );
        assert_eq!(p.topics[2].1, "^(notification\\.events)$");
        assert_eq!(
            p.configure,
            "^(keel\\.(events|retry|dlx|unrouted)|notification\\..*)$"
        );
    }

    #[test]
    fn a_service_that_publishes_nothing_gets_a_pattern_that_matches_nothing() {
        let mut access = notification();
        access.publishes.clear();
        assert_eq!(Permissions::for_service(&access).topics[0].1, NOTHING);
    }

    #[test]
    fn the_password_hash_is_salted_sha256_and_stable() {
        let a = password_hash("notification", "notification_dev");
        assert_eq!(a, password_hash("notification", "notification_dev"));
        assert_ne!(
            a,
            password_hash("billing", "notification_dev"),
            "salt per user"
        );
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&a)
            .unwrap_or_default();
        assert_eq!(bytes.len(), 4 + 32);
    }
}
