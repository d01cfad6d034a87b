//! `keelctl services`: the registry of services (`infra/services.toml`), for people.
//!
//! What runs where, which services own a database or use the broker, and the queues and
//! routing keys each one consumes and publishes: the map an operator needs before `jobs`,
//! `outbox` or `audit` says something about one of them. Pattern: P14 at a glance (each
//! database listed belongs to one service and its own pair of roles).

use crate::registry::Registry;

/// The registry as a table of 100 columns.
pub fn table(registry: &Registry) -> comfy_table::Table {
    let mut t = crate::output::table([
        "service",
        "ports",
        "database",
        "broker",
        "consumes",
        "publishes",
    ]);
    for s in &registry.services {
        let ports: Vec<String> = s.ports.iter().map(|(k, p)| format!("{k} {p}")).collect();
        t.add_row([
            s.name.clone(),
            ports.join("\n"),
            s.database_name().unwrap_or_else(|| "-".to_owned()),
            if s.broker { "yes" } else { "no" }.to_owned(),
            s.consumes.join("\n"),
            s.publishes.join("\n"),
        ]);
    }
    t
}
