//! The workspace's dependency rules, enforced over `cargo metadata`.
//!
//! ARCHITECTURE.md calls the crate layout a proposal but the dependency rules fixed; this file
//! is what makes them fixed. No runtime pattern (P-id) of its own: it guards the layering the
//! patterns rely on, for instance P24's retries living in `keel-resilience` with no I/O
//! dependency, so every adapter can use them without dragging a database or broker along.
//!
//! The rules, each read over the *resolved* graph (`resolve.nodes`: the features actually
//! enabled, not every optional dependency a manifest mentions):
//! 1. a service (a package under `services/`, or the service template under `templates/`)
//!    never depends on another service;
//! 2. a platform crate (under `crates/`) never depends on a service;
//! 3. `keel-testkit` is a normal or build dependency of nothing but `keel-e2e`;
//! 4. `keel-resilience` reaches no database, broker or HTTP client crate;
//! 5. `keel-http`, `keel-pg` and `keel-amqp` never reach `keel-service`, which sits above them;
//! 6. only checkout and billing link `keel-contracts` (the gRPC code); `keel-events` carries
//!    the wire types everyone else needs;
//! 7. no service is in the root `[workspace.dependencies]`: a service is a folder and a
//!    registry entry, not a platform part others can pull in with one line.
//!
//! "Depends on" and "reaches" mean compiled into one of the package's targets: one edge of any
//! kind (so a test's dev-dependency counts), then normal and build edges only (a dependency's
//! own dev-dependencies are never built for it). The unit tests below build small graphs by
//! hand that break each rule and show the report naming it; `the_workspace_keeps_its_rules`
//! then runs the same checker on the real workspace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

/// Where a workspace member sits, which decides the rules that apply to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    /// `services/*` and the service template (`templates/service`).
    Service,
    /// `crates/*`: what every service reuses.
    Platform,
    /// `e2e`: the test-only package, the one place that may link every service.
    Tests,
    /// Anything else: no rule names it.
    Other,
}

/// The kind of a dependency edge, as `cargo metadata` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Normal,
    Dev,
    Build,
}

/// The resolved dependency graph reduced to package names: all the rules read.
///
/// Two versions of one external crate share a node, which can only add edges: a rule may
/// over-report, never miss a violation.
#[derive(Debug, Default)]
struct Graph {
    members: BTreeMap<String, Layer>,
    /// Every package's direct resolved dependencies, external packages included.
    edges: BTreeMap<String, BTreeMap<String, BTreeSet<Kind>>>,
    /// The root `[workspace.dependencies]`: name → `path`, if it is a path dependency.
    workspace_dependencies: BTreeMap<String, Option<String>>,
}

/// One broken rule, with the chain of packages that breaks it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Violation {
    rule: Rule,
    detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    ServiceOnService,
    PlatformOnService,
    TestkitNotDevOnly,
    ResilienceDoesIo,
    LowerCrateOnKeelService,
    ContractsOutsideGrpcServices,
    ServiceInWorkspaceDependencies,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self.rule {
            Rule::ServiceOnService => "services never depend on each other",
            Rule::PlatformOnService => "platform crates never depend on a service",
            Rule::TestkitNotDevOnly => {
                "keel-testkit is a dev-dependency (only keel-e2e may link it)"
            }
            Rule::ResilienceDoesIo => {
                "keel-resilience has no database, broker or HTTP client dependency"
            }
            Rule::LowerCrateOnKeelService => {
                "keel-service composes keel-http, keel-pg and keel-amqp; they never import it"
            }
            Rule::ContractsOutsideGrpcServices => {
                "only checkout and billing link keel-contracts (gRPC); others use keel-events"
            }
            Rule::ServiceInWorkspaceDependencies => "services are not in [workspace.dependencies]",
        };
        write!(f, "{why}: {}", self.detail)
    }
}

/// Crates that do I/O to a database, a broker or over HTTP; `keel-resilience` reaches none.
const IO_CRATES: &[&str] = &[
    "sqlx",
    "tokio-postgres",
    "lapin",
    "redis",
    "reqwest",
    "hyper",
    "hyper-util",
    "axum",
    "tonic",
];

/// The only packages allowed to link `keel-contracts`: the two that speak gRPC, and the
/// test package that runs them.
const GRPC_LINKERS: &[&str] = &["checkout", "billing", "keel-e2e"];

/// Packages that must never link `keel-contracts` even though no other rule names them.
const NEVER_LINK_CONTRACTS: &[&str] = &["notification", "psp-sim", "keel-pg", "keel-amqp"];

impl Graph {
    fn layer(&self, name: &str) -> Option<Layer> {
        self.members.get(name).copied()
    }

    /// Every package compiled into one of `from`'s targets, each with the chain that brings it
    /// in (`from`, …, the package). Breadth first, so each chain is a shortest one.
    fn reach(&self, from: &str) -> BTreeMap<String, Vec<String>> {
        let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut queue = VecDeque::new();
        queue.push_back(vec![from.to_owned()]);
        while let Some(chain) = queue.pop_front() {
            let here = chain.last().unwrap();
            let first_hop = chain.len() == 1;
            for (dep, kinds) in self.edges.get(here).into_iter().flatten() {
                // A dependency's dev-dependencies are built for its own tests, never for us.
                let built = first_hop || kinds.iter().any(|k| *k != Kind::Dev);
                if !built || dep == from || seen.contains_key(dep) {
                    continue;
                }
                let mut next = chain.clone();
                next.push(dep.clone());
                seen.insert(dep.clone(), next.clone());
                queue.push_back(next);
            }
        }
        seen
    }

    fn members_in(&self, layer: Layer) -> impl Iterator<Item = &str> {
        self.members
            .iter()
            .filter(move |(_, l)| **l == layer)
            .map(|(n, _)| n.as_str())
    }

    /// Every broken rule, in rule order.
    fn violations(&self) -> Vec<Violation> {
        let mut found = Vec::new();
        let chain = |c: &Vec<String>| c.join(" → ");

        for layer in [Layer::Service, Layer::Platform] {
            for member in self.members_in(layer) {
                for (dep, path) in self.reach(member) {
                    if self.layer(&dep) == Some(Layer::Service) {
                        let rule = match layer {
                            Layer::Service => Rule::ServiceOnService,
                            _ => Rule::PlatformOnService,
                        };
                        found.push(Violation {
                            rule,
                            detail: chain(&path),
                        });
                    }
                }
            }
        }

        for (from, deps) in &self.edges {
            if from == "keel-e2e" || !self.members.contains_key(from) {
                continue;
            }
            if let Some(kinds) = deps.get("keel-testkit") {
                let linked: Vec<_> = kinds.iter().filter(|k| **k != Kind::Dev).collect();
                if !linked.is_empty() {
                    found.push(Violation {
                        rule: Rule::TestkitNotDevOnly,
                        detail: format!("{from} → keel-testkit as {linked:?}"),
                    });
                }
            }
        }

        for (dep, path) in self.reach("keel-resilience") {
            if IO_CRATES.contains(&dep.as_str()) {
                found.push(Violation {
                    rule: Rule::ResilienceDoesIo,
                    detail: chain(&path),
                });
            }
        }

        for lower in ["keel-http", "keel-pg", "keel-amqp"] {
            if let Some(path) = self.reach(lower).get("keel-service") {
                found.push(Violation {
                    rule: Rule::LowerCrateOnKeelService,
                    detail: chain(path),
                });
            }
        }

        let mut contracts_rule_covers: BTreeSet<&str> =
            self.members.keys().map(|s| s.as_str()).collect();
        contracts_rule_covers.extend(NEVER_LINK_CONTRACTS);
        for member in contracts_rule_covers {
            if member == "keel-contracts" || GRPC_LINKERS.contains(&member) {
                continue;
            }
            if let Some(path) = self.reach(member).get("keel-contracts") {
                found.push(Violation {
                    rule: Rule::ContractsOutsideGrpcServices,
                    detail: chain(path),
                });
            }
        }

        for (name, path) in &self.workspace_dependencies {
            let names_a_service = self.layer(name) == Some(Layer::Service);
            let points_at_one = path
                .as_deref()
                .is_some_and(|p| matches!(layer_of(Path::new(p)), Layer::Service));
            if names_a_service || points_at_one {
                found.push(Violation {
                    rule: Rule::ServiceInWorkspaceDependencies,
                    detail: format!("{name} = {{ path = {path:?} }}"),
                });
            }
        }

        found
    }
}

/// The layer of a package from its folder, relative to the workspace root.
fn layer_of(relative_dir: &Path) -> Layer {
    let first = relative_dir.components().find_map(|c| match c {
        Component::Normal(s) => s.to_str(),
        _ => None,
    });
    match first {
        Some("services" | "templates") => Layer::Service,
        Some("crates") => Layer::Platform,
        Some("e2e") => Layer::Tests,
        _ => Layer::Other,
    }
}

// ---- the real workspace: `cargo metadata` and the root manifest ----

#[derive(Deserialize)]
struct Metadata {
    packages: Vec<Package>,
    workspace_members: Vec<String>,
    workspace_root: PathBuf,
    resolve: Resolve,
}

#[derive(Deserialize)]
struct Package {
    id: String,
    name: String,
    manifest_path: PathBuf,
}

#[derive(Deserialize)]
struct Resolve {
    nodes: Vec<Node>,
}

#[derive(Deserialize)]
struct Node {
    id: String,
    deps: Vec<NodeDep>,
}

#[derive(Deserialize)]
struct NodeDep {
    pkg: String,
    dep_kinds: Vec<DepKind>,
}

#[derive(Deserialize)]
struct DepKind {
    kind: Option<String>,
}

fn workspace_root() -> PathBuf {
    // e2e sits one folder below the root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The real workspace's resolved graph and root `[workspace.dependencies]`.
fn load_workspace() -> Graph {
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(root.join("Cargo.toml"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Metadata = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");

    let names: BTreeMap<&str, &Package> =
        meta.packages.iter().map(|p| (p.id.as_str(), p)).collect();
    let mut graph = Graph::default();
    for id in &meta.workspace_members {
        let package = names[id.as_str()];
        let dir = package.manifest_path.parent().unwrap();
        let relative = dir.strip_prefix(&meta.workspace_root).unwrap();
        graph
            .members
            .insert(package.name.clone(), layer_of(relative));
    }
    for node in &meta.resolve.nodes {
        let from = names[node.id.as_str()].name.clone();
        let deps = graph.edges.entry(from).or_default();
        for dep in &node.deps {
            let kinds = deps
                .entry(names[dep.pkg.as_str()].name.clone())
                .or_default();
            for k in &dep.dep_kinds {
                kinds.insert(match k.kind.as_deref() {
                    Some("dev") => Kind::Dev,
                    Some("build") => Kind::Build,
                    _ => Kind::Normal,
                });
            }
        }
    }

    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let manifest: toml::Table = manifest.parse().expect("root Cargo.toml is TOML");
    let declared = manifest["workspace"]
        .get("dependencies")
        .and_then(|d| d.as_table())
        .cloned()
        .unwrap_or_default();
    for (name, spec) in declared {
        let path = spec.get("path").and_then(|p| p.as_str()).map(str::to_owned);
        graph.workspace_dependencies.insert(name, path);
    }
    graph
}

#[test]
fn the_workspace_keeps_its_rules() {
    let graph = load_workspace();
    // The loader found the workspace it is meant to judge, or every rule would pass vacuously.
    for (name, layer) in [
        ("checkout", Layer::Service),
        ("billing", Layer::Service),
        ("keel-pg", Layer::Platform),
        ("keel-testkit", Layer::Platform),
        ("keel-e2e", Layer::Tests),
    ] {
        assert_eq!(graph.layer(name), Some(layer), "{name}");
    }
    assert!(graph.reach("checkout").contains_key("keel-contracts"));

    let violations = graph.violations();
    assert!(
        violations.is_empty(),
        "dependency rules broken:\n  {}",
        violations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

// ---- the checker on small hand-built graphs: each rule bites ----

impl Graph {
    fn member(mut self, name: &str, layer: Layer) -> Self {
        self.members.insert(name.to_owned(), layer);
        self
    }

    fn dep(mut self, from: &str, to: &str, kind: Kind) -> Self {
        self.edges
            .entry(from.to_owned())
            .or_default()
            .entry(to.to_owned())
            .or_default()
            .insert(kind);
        self
    }

    fn workspace_dependency(mut self, name: &str, path: Option<&str>) -> Self {
        self.workspace_dependencies
            .insert(name.to_owned(), path.map(str::to_owned));
        self
    }
}

/// A miniature of the workspace that keeps every rule.
fn lawful() -> Graph {
    use Kind::*;
    Graph::default()
        .member("checkout", Layer::Service)
        .member("billing", Layer::Service)
        .member("notification", Layer::Service)
        .member("psp-sim", Layer::Service)
        .member("keel-service", Layer::Platform)
        .member("keel-http", Layer::Platform)
        .member("keel-pg", Layer::Platform)
        .member("keel-amqp", Layer::Platform)
        .member("keel-events", Layer::Platform)
        .member("keel-contracts", Layer::Platform)
        .member("keel-resilience", Layer::Platform)
        .member("keel-testkit", Layer::Platform)
        .member("keel-e2e", Layer::Tests)
        .dep("keel-service", "keel-http", Normal)
        .dep("keel-service", "keel-pg", Normal)
        .dep("keel-service", "keel-amqp", Normal)
        .dep("keel-service", "keel-testkit", Dev)
        .dep("keel-amqp", "keel-pg", Normal)
        .dep("keel-amqp", "keel-events", Normal)
        .dep("keel-amqp", "lapin", Normal)
        .dep("keel-amqp", "keel-resilience", Normal)
        .dep("keel-pg", "keel-events", Normal)
        .dep("keel-pg", "sqlx", Normal)
        .dep("keel-pg", "keel-testkit", Dev)
        .dep("keel-testkit", "keel-pg", Normal)
        .dep("keel-testkit", "reqwest", Normal)
        .dep("keel-resilience", "rand", Normal)
        .dep("keel-contracts", "tonic", Normal)
        .dep("keel-contracts", "protox", Build)
        .dep("checkout", "keel-service", Normal)
        .dep("checkout", "keel-contracts", Normal)
        .dep("billing", "keel-service", Normal)
        .dep("billing", "keel-contracts", Normal)
        .dep("notification", "keel-service", Normal)
        .dep("notification", "keel-testkit", Dev)
        .dep("psp-sim", "keel-http", Normal)
        .dep("keel-e2e", "keel-testkit", Normal)
        .dep("keel-e2e", "checkout", Normal)
        .dep("keel-e2e", "billing", Normal)
        .dep("keel-e2e", "notification", Normal)
        // A dependency's dev-dependencies are not built for its dependents: hyper reached
        // only through keel-pg's tests does not count against keel-resilience below.
        .dep("rand", "hyper", Dev)
        .workspace_dependency("keel-pg", Some("crates/keel-pg"))
        .workspace_dependency("tokio", None)
}

/// The violations of `graph`, asserting every one is of `rule`; returns their messages.
fn only(graph: &Graph, rule: Rule) -> Vec<String> {
    let found = graph.violations();
    assert!(
        !found.is_empty(),
        "expected a {rule:?} violation, found none"
    );
    for v in &found {
        assert_eq!(v.rule, rule, "unexpected violation: {v}");
    }
    found.iter().map(ToString::to_string).collect()
}

#[test]
fn a_graph_that_keeps_the_rules_reports_nothing() {
    assert_eq!(lawful().violations(), vec![]);
}

#[test]
fn a_service_depending_on_another_is_reported_even_through_its_tests() {
    let direct = lawful().dep("checkout", "billing", Kind::Normal);
    assert_eq!(
        only(&direct, Rule::ServiceOnService),
        ["services never depend on each other: checkout → billing"]
    );
    let in_tests = lawful().dep("notification", "psp-sim", Kind::Dev);
    assert_eq!(
        only(&in_tests, Rule::ServiceOnService),
        ["services never depend on each other: notification → psp-sim"]
    );
}

#[test]
fn a_platform_crate_depending_on_a_service_is_reported_with_its_chain() {
    // keel-events importing checkout drags checkout into every crate above keel-events, and
    // into every other service: the report names each chain (and each service rule it breaks).
    let graph = lawful().dep("keel-events", "checkout", Kind::Normal);
    let found = graph.violations();
    assert!(found.contains(&Violation {
        rule: Rule::PlatformOnService,
        detail: "keel-events → checkout".into(),
    }));
    assert!(found.contains(&Violation {
        rule: Rule::PlatformOnService,
        detail: "keel-service → keel-amqp → keel-events → checkout".into(),
    }));
    assert!(found.contains(&Violation {
        rule: Rule::ServiceOnService,
        detail: "notification → keel-service → keel-amqp → keel-events → checkout".into(),
    }));
}

#[test]
fn keel_testkit_as_a_normal_dependency_is_reported_outside_e2e() {
    let graph = lawful().dep("checkout", "keel-testkit", Kind::Normal);
    assert_eq!(
        only(&graph, Rule::TestkitNotDevOnly),
        [
            "keel-testkit is a dev-dependency (only keel-e2e may link it): checkout → keel-testkit as [Normal]"
        ]
    );
    let build = lawful().dep("keel-amqp", "keel-testkit", Kind::Build);
    assert_eq!(only(&build, Rule::TestkitNotDevOnly).len(), 1);
}

#[test]
fn keel_resilience_reaching_an_io_crate_is_reported_even_transitively() {
    let direct = lawful().dep("keel-resilience", "reqwest", Kind::Normal);
    assert_eq!(
        only(&direct, Rule::ResilienceDoesIo),
        [
            "keel-resilience has no database, broker or HTTP client dependency: keel-resilience → reqwest"
        ]
    );
    let through = lawful()
        .dep("keel-resilience", "tower-helper", Kind::Normal)
        .dep("tower-helper", "hyper", Kind::Normal);
    assert_eq!(
        only(&through, Rule::ResilienceDoesIo),
        [
            "keel-resilience has no database, broker or HTTP client dependency: keel-resilience → tower-helper → hyper"
        ]
    );
}

#[test]
fn a_lower_crate_importing_keel_service_is_reported() {
    for lower in ["keel-http", "keel-pg", "keel-amqp"] {
        let graph = lawful().dep(lower, "keel-service", Kind::Normal);
        let found = graph.violations();
        assert!(
            found.iter().any(|v| v.rule == Rule::LowerCrateOnKeelService
                && v.detail == format!("{lower} → keel-service")),
            "{lower}: {found:?}"
        );
        assert!(
            found
                .iter()
                .all(|v| v.rule == Rule::LowerCrateOnKeelService),
            "{found:?}"
        );
    }
}

#[test]
fn keel_contracts_linked_outside_checkout_and_billing_is_reported_through_the_graph() {
    // The likely slip: a platform crate takes an event type from keel-contracts again, and
    // every service on the platform links the gRPC stack through it.
    let graph = lawful().dep("keel-amqp", "keel-contracts", Kind::Normal);
    let found = only(&graph, Rule::ContractsOutsideGrpcServices);
    for chain in [
        "keel-amqp → keel-contracts",
        "keel-service → keel-amqp → keel-contracts",
        "notification → keel-service → keel-amqp → keel-contracts",
    ] {
        assert!(
            found.iter().any(|m| m.ends_with(chain)),
            "{chain} missing from {found:?}"
        );
    }
    let psp = lawful().dep("psp-sim", "keel-contracts", Kind::Normal);
    assert_eq!(
        only(&psp, Rule::ContractsOutsideGrpcServices),
        [
            "only checkout and billing link keel-contracts (gRPC); others use keel-events: psp-sim → keel-contracts"
        ]
    );
}

#[test]
fn a_service_in_workspace_dependencies_is_reported() {
    let by_name = lawful().workspace_dependency("billing", Some("services/billing"));
    assert_eq!(
        only(&by_name, Rule::ServiceInWorkspaceDependencies),
        [
            "services are not in [workspace.dependencies]: billing = { path = Some(\"services/billing\") }"
        ]
    );
    // A new service not (yet) a member is still caught by where it lives.
    let by_path = lawful().workspace_dependency("inventory", Some("services/inventory"));
    assert_eq!(
        only(&by_path, Rule::ServiceInWorkspaceDependencies).len(),
        1
    );
}
