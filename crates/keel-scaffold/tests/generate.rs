//! What `make new-service` writes, checked on a scratch copy of the workspace's manifests,
//! registry, templates, compose.yaml and Kubernetes manifests (no build): the placeholder is
//! gone everywhere, the service has its own port, database, roles, queue and routing keys,
//! keelctl accepts the registry it leaves, compose and the kind overlay list it, a name that
//! cannot be used (malformed, taken, one of the template's own names, a dependency's) writes
//! nothing at all, and neither does a write that fails halfway. That what it writes into
//! compose.yaml and k8s/ renders and passes the deployment checks is the proof of
//! `scaffolded_service.rs`, which runs them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use keel_scaffold::{ScaffoldError, new_service};

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() == "target" {
            continue;
        }
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

/// A scratch root with what the generator reads: the root manifest and every member's,
/// `Cargo.lock`, the registry, the templates, compose.yaml with its secrets and `k8s/`.
fn scratch(test: &str) -> PathBuf {
    let root = keel_testkit::workspace_root();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("scaffold-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    for member in keel_scaffold::workspace::members(&manifest).unwrap() {
        std::fs::create_dir_all(dir.join(&member)).unwrap();
        std::fs::copy(
            root.join(&member).join("Cargo.toml"),
            dir.join(&member).join("Cargo.toml"),
        )
        .unwrap();
    }
    std::fs::copy(root.join("Cargo.toml"), dir.join("Cargo.toml")).unwrap();
    std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    std::fs::create_dir_all(dir.join("infra")).unwrap();
    std::fs::copy(
        root.join("infra/services.toml"),
        dir.join("infra/services.toml"),
    )
    .unwrap();
    copy_tree(&root.join("templates"), &dir.join("templates"));
    std::fs::copy(root.join("compose.yaml"), dir.join("compose.yaml")).unwrap();
    copy_tree(
        &root.join("infra/compose/secrets"),
        &dir.join("infra/compose/secrets"),
    );
    copy_tree(&root.join("k8s"), &dir.join("k8s"));
    dir
}

fn read(path: PathBuf) -> String {
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

#[test]
fn a_new_service_is_the_template_renamed_with_its_own_port_and_registry_entry() {
    let root = scratch("renamed");
    let before = keelctl::Registry::load(&root.join("infra/services.toml")).unwrap();
    let made = new_service(&root, "inventory").unwrap();
    let service = root.join("services/inventory");
    assert_eq!(made.dir, Path::new("services/inventory"));

    // Every file of the template, under the same relative path, none mentioning the
    // placeholder in any spelling.
    let template = root.join("templates/service");
    let rel = |base: &Path, files: Vec<PathBuf>| -> Vec<PathBuf> {
        files
            .into_iter()
            .map(|f| f.strip_prefix(base).unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        rel(&service, files(&service)),
        rel(&template, files(&template))
    );
    for file in files(&service) {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.to_lowercase().contains("skeleton"),
            "{} still mentions the placeholder",
            file.display()
        );
    }

    // The names the conventions derive from the service's name.
    let cargo = std::fs::read_to_string(service.join("Cargo.toml")).unwrap();
    assert!(cargo.contains("name = \"inventory\""), "{cargo}");
    let config = std::fs::read_to_string(service.join("config/default.toml")).unwrap();
    for expected in [
        "queue = \"inventory.events\"",
        &format!("port = {}", made.http_port),
    ] {
        assert!(config.contains(expected), "{expected} in:\n{config}");
    }
    // Its development secrets, in its dev profile (KEEL_PROFILE=dev), not in the defaults.
    let dev = std::fs::read_to_string(service.join("config/dev.toml")).unwrap();
    for expected in [
        "inventory_app:inventory_app_dev@127.0.0.1:6432/keel_inventory",
        "inventory_owner:inventory_owner_dev@127.0.0.1:5432/keel_inventory",
        "amqp://inventory:inventory_dev@127.0.0.1:5672/keel",
    ] {
        assert!(dev.contains(expected), "{expected} in:\n{dev}");
        assert!(
            !config.contains(expected),
            "{expected} in the defaults:\n{config}"
        );
    }
    let lib = std::fs::read_to_string(service.join("src/lib.rs")).unwrap();
    assert!(lib.contains("pub struct InventoryService;"), "{lib}");
    let items = std::fs::read_to_string(service.join("src/items/mod.rs")).unwrap();
    assert!(items.contains("\"inventory.item.created\""));

    // The registry keelctl reads: one more service, on a port nobody else has, whose queue is
    // the one its configuration consumes.
    let after = keelctl::Registry::load(&root.join("infra/services.toml")).unwrap();
    assert_eq!(after.services.len(), before.services.len() + 1);
    let entry = after.service("inventory").expect("registered");
    assert_eq!(entry.http_port(), made.http_port);
    assert!(
        before
            .services
            .iter()
            .all(|s| s.ports.values().all(|p| *p != made.http_port))
    );
    assert!(entry.database && entry.broker);
    assert_eq!(entry.consumes, ["inventory.events"]);
    assert_eq!(entry.publishes, ["inventory.item.*"]);
    assert_eq!(entry.migrate, ["migrate"]);
    assert_eq!(
        after.services.last().map(|s| s.name.as_str()),
        Some("inventory"),
        "appended after the others: the registry's order is the start order"
    );

    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members = keel_scaffold::workspace::members(&manifest).unwrap();
    assert!(members.contains(&"services/inventory".to_owned()));

    // compose.yaml: its migration and its service before the observability section, on its
    // port; its database created by db-init; its secrets declared, and their files written.
    let port = made.http_port;
    let compose = read(root.join("compose.yaml"));
    let observability = compose.find("  # --- observability").unwrap();
    for expected in [
        "\n  inventory-migrate:\n".to_owned(),
        "\n  inventory:\n".to_owned(),
        format!("${{KEEL_INVENTORY_PORT:-{port}}}:{port}\""),
        format!("http://127.0.0.1:{port}/readyz"),
    ] {
        let at = compose
            .find(&expected)
            .unwrap_or_else(|| panic!("{expected} in compose.yaml"));
        assert!(
            at < observability,
            "{expected} after the observability section"
        );
    }
    assert!(
        !compose.contains("8099"),
        "the placeholder port in compose.yaml"
    );
    assert!(
        compose.contains("      KEEL_DB_SERVICES: checkout,billing,notification,inventory\n"),
        "db-init's list"
    );
    assert!(compose.ends_with(
        "  inventory_database_url: { file: ./infra/compose/secrets/inventory_database_url }\n  \
         inventory_database_migrate_url: { file: ./infra/compose/secrets/inventory_database_migrate_url }\n  \
         inventory_amqp_url: { file: ./infra/compose/secrets/inventory_amqp_url }\n"
    ));
    // Its own broker user, not another service's, in both of its compose entries.
    assert_eq!(
        compose
            .matches("KEEL_AMQP__URL_FILE: /run/secrets/inventory_amqp_url\n")
            .count(),
        2,
        "{compose}"
    );
    let secrets = root.join("infra/compose/secrets");
    assert_eq!(
        read(secrets.join("inventory_database_url")),
        "postgres://inventory_app:inventory_app_dev@pgbouncer:6432/keel_inventory"
    );
    assert_eq!(
        read(secrets.join("inventory_database_migrate_url")),
        "postgres://inventory_owner:inventory_owner_dev@postgres:5432/keel_inventory"
    );
    assert_eq!(
        read(secrets.join("inventory_amqp_url")),
        "amqp://inventory:inventory_dev@rabbitmq:5672/keel"
    );

    // k8s/base/inventory: every manifest of templates/k8s/base, renamed, on its port.
    let base = root.join("k8s/base/inventory");
    let k8s_template = root.join("templates/k8s/base");
    assert_eq!(
        rel(&base, files(&base)),
        rel(&k8s_template, files(&k8s_template))
    );
    for file in files(&base) {
        let text = read(file.clone());
        assert!(
            !text.to_lowercase().contains("skeleton"),
            "{}",
            file.display()
        );
        assert!(
            !text.contains("8099"),
            "{} keeps the placeholder port",
            file.display()
        );
    }
    let deployment = read(base.join("deployment.yaml"));
    for expected in [
        "  name: inventory\n".to_owned(),
        "image: keel/inventory\n".to_owned(),
        format!("containerPort: {port}\n"),
        format!("value: \"{port}\"\n"),
        "    keel.dev/database: \"true\"\n".to_owned(),
        "secretName: inventory\n".to_owned(),
    ] {
        assert!(
            deployment.contains(&expected),
            "{expected} in:\n{deployment}"
        );
    }
    assert!(
        read(root.join("k8s/base/kustomization.yaml")).ends_with("  - psp-sim\n  - inventory\n")
    );

    // The kind overlay: its image pinned, its development Secret generated from its folder,
    // its database created by the kind Postgres.
    let kind = read(root.join("k8s/overlays/kind/kustomization.yaml"));
    assert!(
        kind.contains(
            "  - { name: keel/psp-sim, newTag: dev }\n  - { name: keel/inventory, newTag: dev }\n"
        ),
        "{kind}"
    );
    assert!(
        kind.contains(
            "  - name: inventory\n    files:\n      - secrets/inventory/amqp-url\n      \
             - secrets/inventory/database-migrate-url\n      - secrets/inventory/database-url\n"
        ),
        "{kind}"
    );
    let kind_secrets = root.join("k8s/overlays/kind/secrets/inventory");
    assert_eq!(
        read(kind_secrets.join("database-url")),
        "postgres://inventory_app:inventory_app_dev@pgbouncer:6432/keel_inventory\n"
    );
    assert_eq!(
        read(kind_secrets.join("database-migrate-url")),
        "postgres://inventory_owner:inventory_owner_dev@postgres:5432/keel_inventory\n"
    );
    assert_eq!(
        read(kind_secrets.join("amqp-url")),
        "amqp://inventory:inventory_dev@rabbitmq:5672/keel\n"
    );
    let roles = read(root.join("k8s/overlays/kind/dependencies/postgres/10-keel-roles.sh"));
    assert!(
        roles.contains("-v services=checkout,billing,notification,inventory "),
        "{roles}"
    );
}

/// Every folder and file under the scratch root, with each file's content: whatever the
/// generator writes, renames or leaves behind shows up here.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_owned();
            if path.is_dir() {
                out.insert(rel, None);
                dirs.push(path);
            } else {
                out.insert(rel, Some(std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

#[test]
fn a_name_that_cannot_be_used_writes_nothing() {
    let root = scratch("refused");
    let before = snapshot(&root);
    for (name, why) in [
        ("Inventory", "uppercase"),
        ("in-ventory", "hyphen"),
        ("9lives", "starts with a digit"),
        ("checkout", "a registered service"),
        ("platform", "a role prefix"),
        ("keelctl", "a workspace package"),
        ("skeleton", "the template's placeholder"),
        ("self", "a Rust keyword"),
    ] {
        let err = new_service(&root, name).expect_err(why);
        assert!(
            matches!(err, ScaffoldError::Name(_) | ScaffoldError::Taken { .. }),
            "{name} ({why}): {err}"
        );
    }
    assert_eq!(snapshot(&root), before, "nothing written");

    // And a second service of the same name, once the first exists.
    new_service(&root, "inventory").unwrap();
    let with_one = snapshot(&root);
    let err = new_service(&root, "inventory").unwrap_err();
    assert!(matches!(err, ScaffoldError::Taken { .. }), "{err}");
    assert_eq!(snapshot(&root), with_one);
}

#[test]
fn two_new_services_get_two_ports() {
    let root = scratch("two");
    let a = new_service(&root, "inventory").unwrap();
    let b = new_service(&root, "shipping").unwrap();
    assert_ne!(a.http_port, b.http_port);
    let registry = keelctl::Registry::load(&root.join("infra/services.toml")).unwrap();
    let names: Vec<_> = registry.services.iter().map(|s| s.name.as_str()).collect();
    assert!(names.ends_with(&["inventory", "shipping"]), "{names:?}");
    // Each list that names services gets both, in the registry's order.
    assert!(
        read(root.join("compose.yaml"))
            .contains("KEEL_DB_SERVICES: checkout,billing,notification,inventory,shipping\n")
    );
    assert!(
        read(root.join("k8s/base/kustomization.yaml")).ends_with("  - inventory\n  - shipping\n")
    );
    assert!(
        read(root.join("k8s/overlays/kind/dependencies/postgres/10-keel-roles.sh"))
            .contains("-v services=checkout,billing,notification,inventory,shipping ")
    );
}

#[test]
fn a_name_the_template_or_a_dependency_already_uses_is_refused_and_nothing_is_written() {
    let root = scratch("collisions");
    let before = snapshot(&root);
    for (name, why) in [
        ("app", "`App` in src/lib.rs"),
        ("config", "`Config` in src/config.rs"),
        ("service", "`Service` in src/lib.rs"),
        ("drained", "`Drained` in src/lib.rs"),
        ("items", "`items` in src/"),
        ("support", "`support` in tests/"),
        ("serde", "Cargo.lock has a package `serde`"),
        ("sqlx", "Cargo.lock has a package `sqlx`"),
    ] {
        let err = new_service(&root, name).expect_err(name);
        assert!(matches!(err, ScaffoldError::Taken { .. }), "{name}: {err}");
        assert!(
            err.to_string().contains(why),
            "{name}: `{err}` should say {why}"
        );
    }
    assert_eq!(snapshot(&root), before, "nothing written");
}

#[test]
fn the_command_refuses_a_colliding_name_with_exit_64_and_says_why() {
    let root = scratch("exit64");
    let before = snapshot(&root);
    for name in ["app", "config", "service", "drained", "serde", "sqlx"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel-scaffold"))
            .arg("--root")
            .arg(&root)
            .args(["new", name])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{name}: {stderr}");
        assert!(
            stderr.contains(&format!("`{name}` is taken")),
            "{name}: {stderr}"
        );
    }
    assert_eq!(snapshot(&root), before, "nothing written");
}

#[test]
fn a_name_that_once_shadowed_the_prelude_now_makes_a_service_with_unique_names() {
    // With the command-line type named by the bare camel-cased name, `result` wrote
    // `pub struct Result;` into lib.rs, and every `Result<…>` there stopped compiling.
    let root = scratch("prelude");
    new_service(&root, "result").unwrap();
    let lib = std::fs::read_to_string(root.join("services/result/src/lib.rs")).unwrap();
    let names = keel_scaffold::identifiers::module_level(&lib);
    assert!(names.iter().any(|n| n == "ResultService"), "{names:?}");
    assert!(!names.iter().any(|n| n == "Result"), "{names:?}");
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "a name given twice: {names:?}");
}

#[test]
fn a_write_that_fails_halfway_leaves_nothing_half_written() {
    let root = scratch("halfway");
    // Where the generator writes the root manifest's new text, the last it writes aside,
    // something it did not make: by then the service's folders (its own and its Kubernetes
    // ones), compose.yaml's, the kustomizations' and the registry's new texts and the new
    // secret files are all written aside.
    std::fs::create_dir_all(root.join(".Cargo.toml.inventory.scaffolding/keep")).unwrap();
    let before = snapshot(&root);
    let err = new_service(&root, "inventory").unwrap_err();
    assert!(matches!(err, ScaffoldError::Io { .. }), "{err}");
    let after = snapshot(&root);
    for file in [
        "compose.yaml",
        "k8s/base/kustomization.yaml",
        "k8s/overlays/kind/kustomization.yaml",
        "k8s/overlays/kind/dependencies/postgres/10-keel-roles.sh",
    ] {
        assert_eq!(
            after[Path::new(file)],
            before[Path::new(file)],
            "{file} changed"
        );
    }
    for absent in [
        "services/inventory",
        "k8s/base/inventory",
        "k8s/overlays/kind/secrets/inventory",
        "infra/compose/secrets/inventory_database_url",
        "infra/compose/secrets/inventory_database_migrate_url",
        "infra/compose/secrets/inventory_amqp_url",
    ] {
        assert!(!root.join(absent).exists(), "{absent} was left behind");
    }
    assert_eq!(
        after, before,
        "no folder, no entry, no member, no secret, no temporary file"
    );
    // Once the obstacle is gone, the same name goes through: nothing was left to refuse it.
    std::fs::remove_dir_all(root.join(".Cargo.toml.inventory.scaffolding")).unwrap();
    new_service(&root, "inventory").unwrap();
}

#[test]
fn a_deployment_file_reshaped_by_hand_is_refused_and_nothing_is_written() {
    let root = scratch("reshaped");
    let kind = root.join("k8s/overlays/kind/kustomization.yaml");
    let text = read(kind.clone()).replace("\nimages:\n", "\nimages: # pinned\n");
    std::fs::write(&kind, text).unwrap();
    let before = snapshot(&root);
    let err = new_service(&root, "inventory").unwrap_err();
    assert!(matches!(err, ScaffoldError::Template { .. }), "{err}");
    assert!(err.to_string().contains("images:"), "{err}");
    assert_eq!(snapshot(&root), before, "nothing written");

    // A service whose Kubernetes folder exists (made by hand, say) is refused by name.
    let root = scratch("k8s-taken");
    std::fs::create_dir_all(root.join("k8s/base/inventory")).unwrap();
    let before = snapshot(&root);
    let err = new_service(&root, "inventory").unwrap_err();
    assert!(matches!(err, ScaffoldError::Taken { .. }), "{err}");
    assert!(
        err.to_string().contains("k8s/base/inventory exists"),
        "{err}"
    );
    assert_eq!(snapshot(&root), before, "nothing written");
}
