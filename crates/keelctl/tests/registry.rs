//! The registry of services (`infra/services.toml`) is the one list: everything derived from it
//! agrees with it, and a new entry needs no edit anywhere else.
//!
//! Two readers exist on purpose (bash for `make deps`, which runs before anything is built;
//! TOML in keelctl), so the first test proves they read the same values. Then each derived
//! thing is checked against the registry: the `make dev` environment of every service, the
//! Postgres roles and databases `stack.sh up` creates (on the real Postgres, through the real
//! pgbouncer), and the absence of any service name in the files that used to list them. The
//! last test appends a service to a scratch copy of the registry and shows the scripts and
//! keelctl pick it up with nothing else changed.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use keelctl::Registry;
use keelctl::registry::dev_password;
use keelctl::targets::{AUDITOR_ROLE, OPERATOR_ROLE};
use sqlx::{Connection, PgConnection};

fn root() -> PathBuf {
    keel_testkit::workspace_root()
}

/// Runs an infra/dev script with a clean environment: PATH, plus `env`.
fn script(path: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new("bash")
        .arg(root().join(path))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{path} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The registry in the line format `infra/dev/registry.sh dump` prints.
fn dump(r: &Registry) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    for s in &r.services {
        let n = &s.name;
        line(format!("service={n}"));
        for (kind, port) in &s.ports {
            line(format!("{n}.port.{kind}={port}"));
        }
        line(format!("{n}.database={}", s.database));
        line(format!("{n}.broker={}", s.broker));
        line(format!("{n}.consumes={}", s.consumes.join(" ")));
        line(format!("{n}.publishes={}", s.publishes.join(" ")));
        line(format!("{n}.migrate={}", s.migrate.join(" ")));
        line(format!("{n}.ready={}", r.expand(&s.ready).unwrap()));
        for (key, value) in &s.env {
            line(format!("{n}.env.{key}={}", r.expand(value).unwrap()));
        }
    }
    for p in &r.roles {
        line(format!("roles={}", p.prefix));
    }
    out
}

#[test]
fn the_bash_reader_and_keelctl_read_the_same_registry() {
    let registry = Registry::embedded().unwrap();
    let bash = script("infra/dev/registry.sh", &["dump"], &[]);
    assert_eq!(bash, dump(&registry));
}

/// Expected `services.sh env <svc>` lines, from the registry and the given stack ports.
fn expected_env(r: &Registry, name: &str, pg: u16, pgbouncer: u16, amqp: u16) -> Vec<String> {
    let s = r.service(name).unwrap();
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    // Every service runs on its checked-in development secrets.
    env.insert("KEEL_PROFILE".into(), "dev".into());
    for (kind, port) in &s.ports {
        env.insert(
            format!("KEEL_{}__PORT", kind.to_ascii_uppercase()),
            port.to_string(),
        );
    }
    if let Some(db) = s.database_name() {
        let (app, owner) = (s.app_role(), s.owner_role());
        env.insert(
            "KEEL_DATABASE__URL".into(),
            format!(
                "postgres://{app}:{}@127.0.0.1:{pgbouncer}/{db}",
                dev_password(&app)
            ),
        );
        env.insert(
            "KEEL_DATABASE__MIGRATE_URL".into(),
            format!(
                "postgres://{owner}:{}@127.0.0.1:{pg}/{db}",
                dev_password(&owner)
            ),
        );
    }
    if s.broker {
        env.insert(
            "KEEL_AMQP__URL".into(),
            // Its own user of infra/rabbitmq/definitions.json, dev password `<name>_dev`.
            format!("amqp://{0}:{0}_dev@127.0.0.1:{amqp}/keel", s.name),
        );
    }
    for (key, template) in &s.env {
        env.insert(key.clone(), r.expand(template).unwrap());
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// `services.sh env` for `name`, sorted, against a stack on made-up ports (and a KEELDEV_HOME
/// with no resolved stack file, so a running `make dev` stack cannot change the answer).
fn dev_env(name: &str, registry: Option<&Path>) -> Vec<String> {
    let home = tempdir();
    let mut env = vec![
        ("KEELDEV_HOME", home.to_str().unwrap().to_owned()),
        ("PG_PORT", "1111".to_owned()),
        ("PGBOUNCER_PORT", "2222".to_owned()),
        ("AMQP_PORT", "3333".to_owned()),
    ];
    if let Some(r) = registry {
        env.push(("KEELDEV_REGISTRY", r.to_str().unwrap().to_owned()));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut lines: Vec<String> = script("infra/dev/services.sh", &["env", name], &env)
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    let _ = std::fs::remove_dir_all(home);
    lines
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keel-registry-test-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn make_dev_gives_every_service_the_environment_its_entry_implies() {
    let registry = Registry::embedded().unwrap();
    for s in &registry.services {
        assert_eq!(
            dev_env(&s.name, None),
            expected_env(&registry, &s.name, 1111, 2222, 3333),
            "services.sh env {}",
            s.name
        );
    }
}

#[tokio::test]
async fn postgres_has_every_registered_role_and_database() {
    // What `infra/dev/stack.sh up` (make deps, make test) created from the registry.
    let registry = Registry::embedded().unwrap();
    let stack = keel_testkit::Stack::load();
    for s in registry.with_database() {
        let db = s.database_name().unwrap();
        // The runtime path: app role, dev password, through pgbouncer.
        let mut app = PgConnection::connect(&format!(
            "postgres://{}:{}@127.0.0.1:{}/{db}",
            s.app_role(),
            dev_password(&s.app_role()),
            stack.pgbouncer_port
        ))
        .await
        .unwrap_or_else(|e| panic!("{} reaches {db} through pgbouncer: {e}", s.app_role()));
        let owner: String = sqlx::query_scalar(
            "SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = current_database()",
        )
        .fetch_one(&mut app)
        .await
        .unwrap();
        assert_eq!(owner, s.owner_role(), "{db} is owned by its owner role");
        // The migration path: owner role, direct.
        PgConnection::connect(&format!(
            "postgres://{}:{}@127.0.0.1:{}/{db}",
            s.owner_role(),
            dev_password(&s.owner_role()),
            stack.pg_port
        ))
        .await
        .unwrap_or_else(|e| panic!("{} reaches {db} directly: {e}", s.owner_role()));
        // Database-level grants (P14): nothing for PUBLIC, CONNECT and no TEMPORARY for the
        // app role; keelctl's roles reach it through pgbouncer.
        let (public, app_temp): (i64, bool) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM pg_database d, aclexplode(d.datacl) a
                      WHERE d.datname = current_database() AND a.grantee = 0),
                    has_database_privilege($1, current_database(), 'TEMPORARY')",
        )
        .bind(s.app_role())
        .fetch_one(&mut app)
        .await
        .unwrap();
        assert_eq!(public, 0, "PUBLIC has no privilege on {db}");
        assert!(
            !app_temp,
            "{} cannot create temporary tables in {db}",
            s.app_role()
        );
        for role in [AUDITOR_ROLE, OPERATOR_ROLE] {
            PgConnection::connect(&format!(
                "postgres://{role}:{}@127.0.0.1:{}/{db}",
                dev_password(role),
                stack.pgbouncer_port
            ))
            .await
            .unwrap_or_else(|e| panic!("{role} reaches {db} through pgbouncer: {e}"));
        }
    }
    // keelctl's roles: no attribute beyond LOGIN, and no membership that would lend them
    // another role's grants.
    for role in [AUDITOR_ROLE, OPERATOR_ROLE] {
        let mut conn = PgConnection::connect(&format!(
            "postgres://{role}:{}@127.0.0.1:{}/postgres",
            dev_password(role),
            stack.pg_port
        ))
        .await
        .unwrap_or_else(|e| panic!("{role} logs in with its dev password: {e}"));
        let (createdb, createrole, superuser, bypassrls, memberships): (
            bool,
            bool,
            bool,
            bool,
            i64,
        ) = sqlx::query_as(
            "SELECT rolcreatedb, rolcreaterole, rolsuper, rolbypassrls,
                        (SELECT count(*) FROM pg_auth_members m WHERE m.member = r.oid)
                   FROM pg_roles r WHERE rolname = current_user",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert!(
            !createdb && !createrole && !superuser && !bypassrls && memberships == 0,
            "{role} is least-privileged"
        );
    }
    // Role pairs without a database log in (to `postgres`) with their dev passwords.
    for (role, password) in registry.roles() {
        let mut conn = PgConnection::connect(&format!(
            "postgres://{role}:{password}@127.0.0.1:{}/postgres",
            stack.pg_port
        ))
        .await
        .unwrap_or_else(|e| panic!("{role} logs in with its dev password: {e}"));
        let (createdb, createrole, superuser): (bool, bool, bool) = sqlx::query_as(
            "SELECT rolcreatedb, rolcreaterole, rolsuper FROM pg_roles WHERE rolname = current_user",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert!(
            !createdb && !createrole && !superuser,
            "{role} is least-privileged"
        );
    }
}

/// Lines that are not comments, for the "names no service" checks.
fn code_lines(text: &str, comment: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with(comment))
        .map(str::to_owned)
        .collect()
}

fn names_a_service(line: &str, registry: &Registry) -> Option<String> {
    registry.services.iter().find_map(|s| {
        let upper = s.config_key().to_ascii_uppercase();
        let found = line
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .any(|word| {
                word == s.name
                    || word.split('_').any(|w| w == s.name)
                    || word.starts_with(&format!("{upper}_"))
            });
        found.then(|| s.name.clone())
    })
}

#[test]
fn the_files_that_used_to_list_services_name_none() {
    let registry = Registry::embedded().unwrap();
    let mut files: Vec<(PathBuf, &str)> = vec![
        (root().join("infra/postgres/init.sql"), "--"),
        (root().join("infra/dev/stack.env"), "#"),
    ];
    for entry in std::fs::read_dir(root().join("infra/dev")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "sh") {
            files.push((path, "#"));
        }
    }
    // keelctl's generic code (the journey's audit checks and the demo name services on purpose).
    for f in [
        "lib.rs",
        "targets.rs",
        "jobs.rs",
        "outbox.rs",
        "services.rs",
        "output.rs",
        "progress.rs",
        "audit/mod.rs",
        "audit/generic.rs",
    ] {
        files.push((root().join("crates/keelctl/src").join(f), "//"));
    }
    let mut found = Vec::new();
    for (path, comment) in &files {
        let text = std::fs::read_to_string(path).unwrap();
        for line in code_lines(&text, comment) {
            if let Some(service) = names_a_service(&line, &registry) {
                found.push(format!("{}: `{line}` names {service}", path.display()));
            }
        }
    }
    // The Makefile's own targets for the stack.
    let makefile = std::fs::read_to_string(root().join("Makefile")).unwrap();
    let mut in_target = false;
    for line in makefile.lines() {
        if !line.starts_with('\t') {
            in_target = ["dev:", "down:", "status:", "demo:"]
                .iter()
                .any(|t| line.starts_with(t));
        }
        if in_target && let Some(service) = names_a_service(line, &registry) {
            found.push(format!("Makefile: `{line}` names {service}"));
        }
    }
    assert!(
        found.is_empty(),
        "derive these from infra/services.toml:\n{}",
        found.join("\n")
    );
}

#[test]
fn a_new_entry_reaches_the_scripts_and_keelctl_with_no_other_edit() {
    let mut text = keelctl::registry::EMBEDDED.to_owned();
    text.push_str(
        "\n[[service]]\nname = \"inventory\"\nports = { http = 8095, grpc = 50052 }\n\
         database = true\nbroker = true\nconsumes = [\"inventory.events\"]\n\
         publishes = [\"inventory.stock.*\"]\nmigrate = [\"migrate\"]\n\
         ready = \"http://127.0.0.1:{inventory.http}/readyz\"  # its own HTTP port\n\
         [service.env]\nKEEL_BILLING__GRPC_URL = \"http://127.0.0.1:{billing.grpc}\"\n",
    );
    let registry = Registry::parse(&text).unwrap();
    let dir = tempdir();
    let path = dir.join("services.toml");
    std::fs::write(&path, &text).unwrap();
    let env = [("KEELDEV_REGISTRY", path.to_str().unwrap())];

    // The bash reader sees it as keelctl does ...
    assert_eq!(
        script("infra/dev/registry.sh", &["dump"], &env),
        dump(&registry)
    );
    // ... Postgres gets its roles and database ...
    let vars = script("infra/dev/registry.sh", &["psql-vars"], &env);
    assert!(
        vars.lines()
            .any(|l| l.starts_with("services=") && l.ends_with(",inventory")),
        "{vars}"
    );
    // ... make dev starts and migrates it with the environment its entry implies ...
    assert_eq!(
        dev_env("inventory", Some(&path)),
        expected_env(&registry, "inventory", 1111, 2222, 3333)
    );
    assert!(
        script("infra/dev/registry.sh", &["db-services"], &env)
            .lines()
            .any(|l| l == "inventory")
    );
    // ... and keelctl lists it, with a derived database target.
    let out = Command::new(env!("CARGO_BIN_EXE_keelctl"))
        .args([
            "--registry",
            path.to_str().unwrap(),
            "services",
            "-o",
            "json",
        ])
        .env_remove("KEEL_REGISTRY")
        .output()
        .unwrap();
    assert!(out.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "inventory" && s["database"] == true)
    );
    let config: keelctl::Config = keel_testkit::config(
        keelctl::DEFAULT_CONFIG,
        &[("KEEL_REGISTRY", path.to_str().unwrap())],
    );
    let targets = config.targets().unwrap();
    let inventory = targets.get("inventory").unwrap();
    assert!(inventory.database_url.is_some());
    assert_eq!(inventory.http_url, "http://127.0.0.1:8095");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_keelctl_overrides_of_make_dev_name_every_registered_service() {
    // services.sh passes keelctl every database and HTTP URL, so port overrides reach it;
    // keelctl must accept exactly those keys (an unknown one would exit 78).
    let registry = Registry::embedded().unwrap();
    let home = tempdir();
    let lines = script(
        "infra/dev/services.sh",
        &["env", "keelctl"],
        &[("KEELDEV_HOME", home.to_str().unwrap())],
    );
    let _ = std::fs::remove_dir_all(home);
    let pairs: Vec<(String, String)> = lines
        .lines()
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let refs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let config: keelctl::Config = keel_testkit::config(keelctl::DEFAULT_CONFIG, &refs);
    let targets = config.targets().unwrap();
    for s in &registry.services {
        let upper = s.config_key().to_ascii_uppercase();
        let key = format!("KEEL_{upper}__HTTP_URL");
        assert!(pairs.iter().any(|(k, _)| *k == key), "{key}");
        let target = targets.get(&s.name).unwrap();
        assert_eq!(s.database, target.database_url.is_some());
        assert_eq!(s.database, target.operator_url.is_some());
        // Read as keelctl's read-only role, changed as its operator role: never the service's.
        for (suffix, role) in [("URL", AUDITOR_ROLE), ("OPERATOR_URL", OPERATOR_ROLE)] {
            let key = format!("KEEL_{upper}__{suffix}");
            let value = pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| v);
            assert_eq!(
                value.is_some_and(|v| v.starts_with(&format!("postgres://{role}:"))),
                s.database,
                "{key}: {value:?}"
            );
        }
    }
}

#[test]
fn an_admin_port_gives_an_admin_url_that_an_override_replaces() {
    // psp-sim's fault knobs listen on its registry `admin` port: keelctl derives the URL from
    // [stack] as it does the HTTP one, and KEEL_PSP_SIM__ADMIN_URL points it elsewhere (compose
    // publishes the port on another host port; make test-compose relies on it).
    let derived: keelctl::Config = keel_testkit::config(keelctl::DEFAULT_CONFIG, &[]);
    let targets = derived.targets().unwrap();
    let psp = targets.get("psp-sim").unwrap();
    let admin = psp.service.port("admin").unwrap();
    assert_eq!(
        psp.admin_url.as_deref(),
        Some(format!("http://127.0.0.1:{admin}").as_str())
    );
    assert_eq!(
        targets.get("checkout").unwrap().admin_url,
        None,
        "no admin port, no URL"
    );

    let overridden: keelctl::Config = keel_testkit::config(
        keelctl::DEFAULT_CONFIG,
        &[("KEEL_PSP_SIM__ADMIN_URL", "http://127.0.0.1:18091/")],
    );
    let targets = overridden.targets().unwrap();
    assert_eq!(
        targets.get("psp-sim").unwrap().admin_url.as_deref(),
        Some("http://127.0.0.1:18091")
    );
}
