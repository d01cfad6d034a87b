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

/// The median of `values` (the upper one of an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A throughput row from paired rounds: `keel[i]` and `baseline[i]` ran back to back, so a
/// slow phase of the machine hits both alike. The ratio is the median of the per-pair
/// ratios (printed), the figures the medians of each side; `met` when it is at least
/// `min_ratio`.
pub fn paired_ratio_row(
    name: &str,
    unit: &str,
    keel: &[f64],
    baseline: &[f64],
    min_ratio: f64,
) -> Row {
    let ratios: Vec<f64> = keel.iter().zip(baseline).map(|(k, b)| k / b).collect();
    println!(
        "{name}: per-pair ratios {:?}",
        ratios.iter().map(|r| round(*r, 3)).collect::<Vec<_>>()
    );
    let ratio = median(&ratios);
    Row {
        name: name.to_owned(),
        unit: unit.to_owned(),
        keel: round(median(keel), 0),
        baseline: round(median(baseline), 0),
        ratio: round(ratio, 3),
        goal: format!(">= {min_ratio} (ratio)"),
        met: ratio >= min_ratio,
    }
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
