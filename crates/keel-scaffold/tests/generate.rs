//! What `make new-service` writes, checked on a scratch copy of the workspace's manifests,
//! registry and template (no build): the placeholder is gone everywhere, the service has its
//! own port, database, roles, queue and routing keys, keelctl accepts the registry it leaves,
//! a name that cannot be used (malformed, taken, one of the template's own names, a
//! dependency's) writes nothing at all, and neither does a write that fails halfway.
#![allow(clippy::unwrap_used, clippy::expect_used)]

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
/// `Cargo.lock`, the registry and the template.
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
    dir
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
}

/// What the generator may change: the root manifest, the registry, every file under
/// `services/` and every file at the two folders' top (where its temporary files go).
fn snapshot(root: &Path) -> (String, String, Option<Vec<PathBuf>>, Vec<PathBuf>) {
    let top = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    };
    let mut tops = top(root);
    tops.extend(top(&root.join("infra")));
    tops.sort();
    (
        std::fs::read_to_string(root.join("Cargo.toml")).unwrap(),
        std::fs::read_to_string(root.join("infra/services.toml")).unwrap(),
        root.join("services")
            .exists()
            .then(|| files(&root.join("services"))),
        tops,
    )
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
    // Where the generator writes the root manifest's new text, something it did not make: by
    // then the service's folder and the registry's new text are already written aside.
    std::fs::create_dir_all(root.join(".Cargo.toml.inventory.scaffolding/keep")).unwrap();
    let before = snapshot(&root);
    let err = new_service(&root, "inventory").unwrap_err();
    assert!(matches!(err, ScaffoldError::Io { .. }), "{err}");
    assert_eq!(
        snapshot(&root),
        before,
        "no folder, no registry entry, no member, no temporary file"
    );
    // Once the obstacle is gone, the same name goes through: nothing was left to refuse it.
    std::fs::remove_dir_all(root.join(".Cargo.toml.inventory.scaffolding")).unwrap();
    new_service(&root, "inventory").unwrap();
}
