//! The new service's place in compose: its services in `compose.yaml` and the development
//! secrets compose mounts for it, so `docker compose up` (and `make test-compose`) run it with
//! the others, and the drift test (`infra/deploy/test_drift.py`) checks it like every service.
//! Its place in the Kubernetes manifests is [`crate::k8s`]'s.
//!
//! As with the registry, compose.yaml is changed as text, never re-serialised: its comments,
//! anchors and layout are what a reader learns from. The entry (`templates/compose-entry.yaml`,
//! rendered like the template) goes before the observability profile's section, the new
//! database joins db-init's list, and its three secrets join the file's `secrets:` at the end.
//! Each anchor the edit relies on is checked, so a compose.yaml reshaped by hand fails the
//! generator with a reason before anything is written.

use std::path::Path;

use crate::commit::Replace;
use crate::{ScaffoldError, ServiceName};

/// compose.yaml, relative to the workspace root.
pub const COMPOSE: &str = "compose.yaml";

/// The template of a service's compose entry, relative to the workspace root.
pub const COMPOSE_ENTRY: &str = "templates/compose-entry.yaml";

/// Where compose's development secrets live, relative to the workspace root.
pub const COMPOSE_SECRETS: &str = "infra/compose/secrets";

/// The line before which service entries are inserted.
const OBSERVABILITY: &str = "  # --- observability";

/// The line listing the databases db-init creates.
const DB_SERVICES: &str = "      KEEL_DB_SERVICES: ";

/// What compose gets for `name` on `http_port`: compose.yaml's new text and the three secret
/// files, new (a secret file that exists refuses the name).
pub(crate) fn plan(
    root: &Path,
    name: &ServiceName,
    http_port: u16,
) -> Result<Vec<Replace>, ScaffoldError> {
    let compose_path = root.join(COMPOSE);
    let compose = crate::read(&compose_path)?;
    let entry = crate::render(&crate::read(&root.join(COMPOSE_ENTRY))?, name);
    let (entry, ports) = crate::replace_port(&entry, http_port);
    if ports == 0 {
        return Err(ScaffoldError::Template {
            reason: format!("{COMPOSE_ENTRY} never mentions the placeholder port"),
        });
    }
    let new_compose = add_to_compose(&compose, &entry, name.as_str())?;
    let mut replaces = Vec::new();
    for (secret, value) in secret_names(name.as_str())
        .into_iter()
        .zip(secret_values(name.as_str()))
    {
        let path = root.join(COMPOSE_SECRETS).join(secret);
        if path.exists() {
            return Err(ScaffoldError::Taken {
                name: name.to_string(),
                by: format!("{} exists", path.display()),
            });
        }
        replaces.push(Replace {
            path,
            old: None,
            new: value.into_bytes(),
        });
    }
    replaces.push(Replace {
        path: compose_path,
        old: Some(compose.into_bytes()),
        new: new_compose.into_bytes(),
    });
    Ok(replaces)
}

fn template(reason: impl Into<String>) -> ScaffoldError {
    ScaffoldError::Template {
        reason: format!("{COMPOSE}: {}", reason.into()),
    }
}

/// compose.yaml with `name`'s rendered `entry` (comment lines dropped), its database in
/// db-init's list and its secrets declared.
pub fn add_to_compose(compose: &str, entry: &str, name: &str) -> Result<String, ScaffoldError> {
    let entry: String = entry
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut out = String::with_capacity(compose.len() + entry.len() + 256);
    let (mut inserted, mut listed) = (false, false);
    for line in compose.lines() {
        if line.starts_with(OBSERVABILITY) && !inserted {
            out.push_str(&entry);
            inserted = true;
        }
        if let Some(list) = line.strip_prefix(DB_SERVICES) {
            if list.split(',').any(|s| s.trim() == name) {
                return Err(template(format!("db-init already lists `{name}`")));
            }
            out.push_str(&format!("{DB_SERVICES}{},{name}\n", list.trim_end()));
            listed = true;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if !inserted {
        return Err(template(format!(
            "no `{}` line to insert before",
            OBSERVABILITY.trim()
        )));
    }
    if !listed {
        return Err(template("no db-init `KEEL_DB_SERVICES:` line"));
    }
    if !compose.lines().any(|l| l == "secrets:") {
        return Err(template("no top-level `secrets:`, which must come last"));
    }
    for secret in secret_names(name) {
        out.push_str(&format!(
            "  {secret}: {{ file: ./{COMPOSE_SECRETS}/{secret} }}\n"
        ));
    }
    Ok(out)
}

/// The compose secrets of a service made from the template (a database and a broker): its
/// runtime and its migration URL, and its own broker URL.
pub fn secret_names(name: &str) -> [String; 3] {
    [
        format!("{name}_database_url"),
        format!("{name}_database_migrate_url"),
        format!("{name}_amqp_url"),
    ]
}

/// The development values of [`secret_names`], in the same order: the registry's conventions
/// (roles `<name>_app` through pgbouncer, `<name>_owner` straight to Postgres, passwords
/// `<role>_dev`, database `keel_<name>`; the RabbitMQ user `<name>`, password `<name>_dev`,
/// vhost `keel`) at compose's host names. The broker user is the service's own, with
/// permissions on its own queues and routing keys only: it exists once
/// `infra/rabbitmq/definitions.json` is regenerated with the service in it
/// (`make rabbitmq-definitions`).
pub fn secret_values(name: &str) -> [String; 3] {
    [
        format!("postgres://{name}_app:{name}_app_dev@pgbouncer:6432/keel_{name}"),
        format!("postgres://{name}_owner:{name}_owner_dev@postgres:5432/keel_{name}"),
        format!("amqp://{name}:{name}_dev@rabbitmq:5672/keel"),
    ]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const COMPOSE_TEXT: &str = "services:\n  a:\n    image: a\n  db-init:\n    environment:\n      KEEL_DB_SERVICES: checkout,billing\n  # --- observability (profile) ---\n  jaeger:\n    image: j\n\nsecrets:\n  x: { file: ./x }\n";

    #[test]
    fn the_entry_goes_before_observability_and_the_database_and_secrets_are_added() {
        let out = add_to_compose(
            COMPOSE_TEXT,
            "# a comment\n  inventory:\n    image: i\n",
            "inventory",
        )
        .unwrap();
        let entry = out.find("  inventory:\n    image: i\n").unwrap();
        assert!(entry < out.find("  # --- observability").unwrap());
        assert!(!out.contains("# a comment"));
        assert!(out.contains("      KEEL_DB_SERVICES: checkout,billing,inventory\n"));
        assert!(out.ends_with(
            "  x: { file: ./x }\n  inventory_database_url: { file: ./infra/compose/secrets/inventory_database_url }\n  inventory_database_migrate_url: { file: ./infra/compose/secrets/inventory_database_migrate_url }\n  inventory_amqp_url: { file: ./infra/compose/secrets/inventory_amqp_url }\n"
        ));
    }

    #[test]
    fn each_secret_has_its_value_and_the_broker_url_is_the_services_own_user() {
        let names = secret_names("inventory");
        let values = secret_values("inventory");
        assert_eq!(
            names,
            [
                "inventory_database_url",
                "inventory_database_migrate_url",
                "inventory_amqp_url"
            ]
        );
        assert!(values[0].starts_with("postgres://inventory_app:"));
        assert!(values[1].starts_with("postgres://inventory_owner:"));
        assert_eq!(
            values[2],
            "amqp://inventory:inventory_dev@rabbitmq:5672/keel"
        );
    }

    #[test]
    fn a_reshaped_compose_file_is_refused_with_the_reason() {
        let no_marker = COMPOSE_TEXT.replace("  # --- observability", "  # observability");
        let e = add_to_compose(&no_marker, "", "inventory").unwrap_err();
        assert!(e.to_string().contains("# --- observability"), "{e}");
        let no_list = COMPOSE_TEXT.replace("KEEL_DB_SERVICES", "DATABASES");
        let e = add_to_compose(&no_list, "", "inventory").unwrap_err();
        assert!(e.to_string().contains("KEEL_DB_SERVICES"), "{e}");
        let e = add_to_compose(COMPOSE_TEXT, "", "billing").unwrap_err();
        assert!(e.to_string().contains("already lists `billing`"), "{e}");
    }
}
