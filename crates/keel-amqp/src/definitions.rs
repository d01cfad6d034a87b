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
//! - `configure` only on its own `<service>.` queues (the shared exchanges come from the file
//!   and are checked passively, [`crate::topology::ensure_exchanges`]: with `configure` on
//!   them a service could delete them); `write` and `read` on `keel.events`, `keel.retry`,
//!   `keel.dlx` and its own queues, `write` only on `keel.unrouted` (the alternate exchange
//!   a publish may be handed to);
//! - **topic permissions** narrow routing keys: on `keel.events` it may publish only what the
//!   registry says it publishes (`checkout.order.*` for checkout) and bind only the keys its
//!   queues use; on `keel.retry` and `keel.dlx` only keys under its own prefix. So
//!   notification cannot publish a `billing.payment.*` event, bind a queue of its own to
//!   `billing.#` beyond what it consumes, nor push a message into billing's queue through the
//!   retry exchange (`crates/keel-amqp/tests/permissions.rs` proves each).
//!
//! Plus `keel_operator` (what `keelctl dlq` and `keelctl queues` need: read the DLQs and
//! `keel.unrouted`, publish replays to `keel.events` and `keel.retry`, configure nothing) and `keel`, the
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
        let prefix = escape(&access.service);
        let own = format!("^{prefix}\\..*$");
        // Publishing and binding its own queues: write and read on the three exchanges it
        // uses, and write on keel.unrouted (RabbitMQ checks it when keel.events hands an event
        // nobody is bound to over to it). No `configure` on any of them (it could delete them;
        // it checks them passively) and no read of keel.unrouted (every service's stray events
        // are there).
        let read = format!("^(keel\\.(events|retry|dlx)|{prefix}\\..*)$");
        let write = format!("^(keel\\.(events|retry|dlx|unrouted)|{prefix}\\..*)$");
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
        // Topic read is checked on queue.bind: the binding keys its queues use, literally (a
        // queue of its own bound to `billing.#` would read every billing event).
        let mut bound: Vec<String> = access
            .queues
            .iter()
            .flat_map(|q| q.bindings.iter().map(|b| escape(b)))
            .collect();
        bound.sort();
        bound.dedup();
        // Its own queues' keys on keel.retry and keel.dlx, by prefix: a tier added by
        // configuration stays covered, and another service's queue stays out of reach.
        let queues = format!("^{prefix}\\..*$");
        Self {
            configure: own,
            write,
            read,
            topics: vec![
                (EXCHANGE, any_of(&publishes), any_of(&bound)),
                (RETRY_EXCHANGE, queues.clone(), queues.clone()),
                (DEAD_LETTER_EXCHANGE, queues.clone(), queues),
            ],
        }
    }

    /// `keel_operator`: read (and purge) the DLQs and `keel.unrouted`, publish replays,
    /// declare nothing. Depths of the other queues are passive declares, which need no
    /// permission.
    pub fn operator() -> Self {
        let any = ".*".to_owned();
        Self {
            configure: String::new(),
            write: "^keel\\.(events|retry)$".to_owned(),
            read: "^(.+\\.dlq|keel\\.unrouted)$".to_owned(),
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
    fn a_service_publishes_only_its_own_routing_keys_and_binds_only_its_own() {
        let p = Permissions::for_service(&notification());
        let events = &p.topics[0];
        assert_eq!(events.0, "keel.events");
        assert_eq!(events.1, "^(notification\\.notification\\.[^.]+)$");
        assert_eq!(
            events.2, "^(checkout\\.order\\.\\*)$",
            "its binding, literally"
        );
        assert_eq!(p.topics[1].1, "^notification\\..*$");
        assert_eq!(p.topics[2].1, "^notification\\..*$");
        assert_eq!(p.configure, "^notification\\..*$", "no shared exchange");
        assert_eq!(
            p.write,
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
