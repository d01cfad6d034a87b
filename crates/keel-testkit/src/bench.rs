//! The bench report (`make bench`): `target/bench/report.json`, shaped as the conventions
//! fix it: `{"rows": [{"name", "unit", "keel", "baseline", "ratio", "goal", "met"}]}`.
//!
//! Several bench binaries contribute rows; each [`record`]s its own, replacing rows of the
//! same name and keeping the others, and the table printed is the whole report so far.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One comparison: a Keel figure against a baseline measured in the same run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub name: String,
    pub unit: String,
    pub keel: f64,
    pub baseline: f64,
    pub ratio: f64,
    pub goal: String,
    pub met: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Report {
    rows: Vec<Row>,
}

fn path() -> PathBuf {
    crate::workspace_root().join("target/bench/report.json")
}

/// Rounds to `digits` decimals (report figures are read by people).
pub fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// Merges `rows` into the report (same name: replaced), writes it, prints the whole table.
pub fn record(rows: &[Row]) {
    let path = path();
    let mut report: Report = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    for row in rows {
        match report.rows.iter_mut().find(|r| r.name == row.name) {
            Some(r) => *r = row.clone(),
            None => report.rows.push(row.clone()),
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).unwrap();

    println!();
    println!(
        "{:<28} {:>14} {:>14} {:>8}  {:<22} met",
        "name", "keel", "baseline", "ratio", "goal"
    );
    for r in &report.rows {
        println!(
            "{:<28} {:>14} {:>14} {:>8}  {:<22} {}",
            r.name,
            format!("{} {}", r.keel, r.unit),
            r.baseline,
            r.ratio,
            r.goal,
            if r.met { "yes" } else { "NO" }
        );
    }
    println!("\nwritten to {}", path.display());
}
