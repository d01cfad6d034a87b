//! The bench report (`make bench`): `target/bench/report.json`, shaped as the conventions
//! fix it: `{"rows": [{"name", "unit", "keel", "baseline", "ratio", "goal", "met"}], "cores",
//! "postgres": {"fsync", "synchronous_commit"}}`.
//!
//! Several bench binaries contribute rows; each [`record`]s its own, replacing rows of the
//! same name and keeping the others, and the table printed is the whole report so far.
//!
//! A row with a goal has `met` true or false; a row that only reports a figure (a latency,
//! the cost of a pattern against its cheapest possible form) has `goal` and `met` null, never
//! a `true` it did not earn. Each row also carries the 1-minute load average when it was
//! measured (`load_1m`): on a shared 2-core machine a figure means little without it.
//!
//! Durability: a database bench is only worth its ratios if commits cost what they cost in
//! production, where `fsync` and `synchronous_commit` are on; a development server started
//! with them off (as `infra/dev/stack.sh` starts its project-local Postgres) makes every
//! commit nearly free and flatters whichever side commits more often. [`ProductionDurability`]
//! turns both on for the length of a bench if the server has them off, and puts them back
//! however the bench ends; [`Durability::require`] reads them as the bench's own sessions see
//! them (role and database settings included) and refuses to measure otherwise; the report
//! records what they were.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection};

use crate::stack::Stack;

/// One comparison: a Keel figure against a baseline measured in the same run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub name: String,
    pub unit: String,
    pub keel: f64,
    /// The baseline's figure; null for a figure that is only reported (a latency).
    pub baseline: Option<f64>,
    /// `keel / baseline`; null without a baseline.
    pub ratio: Option<f64>,
    /// What the figure must reach, in words (`>= 0.8 (ratio)`); null for a reported figure.
    pub goal: Option<String>,
    /// Whether the goal is reached; null when there is no goal.
    pub met: Option<bool>,
    /// The 1-minute load average of the machine when the row was measured.
    #[serde(default)]
    pub load_1m: Option<f64>,
}

impl Row {
    /// A figure reported on its own, without baseline or goal.
    pub fn reported(name: &str, unit: &str, keel: f64) -> Self {
        Self {
            name: name.to_owned(),
            unit: unit.to_owned(),
            keel,
            baseline: None,
            ratio: None,
            goal: None,
            met: None,
            load_1m: load_1m(),
        }
    }

    /// A figure that must stay at or below `max` (the Keel side alone is judged; the
    /// baseline says what the same measurement gives for the bare example).
    pub fn at_most(name: &str, unit: &str, keel: f64, baseline: f64, max: f64) -> Self {
        Self {
            name: name.to_owned(),
            unit: unit.to_owned(),
            keel,
            baseline: Some(baseline),
            ratio: Some(round(keel / baseline, 2)),
            goal: Some(format!("<= {max} {unit} (keel)")),
            met: Some(keel <= max),
            load_1m: load_1m(),
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Report {
    rows: Vec<Row>,
    /// CPUs the benches could use.
    #[serde(default)]
    cores: Option<usize>,
    /// The durability the benches' own Postgres sessions ran with.
    #[serde(default)]
    postgres: Option<Durability>,
}

fn path() -> PathBuf {
    crate::workspace_root().join("target/bench/report.json")
}

/// The 1-minute load average (`/proc/loadavg`), if the platform has one.
pub fn load_1m() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
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
/// ratios (printed), the figures the medians of each side; with `min_ratio`, `met` when the
/// ratio is at least that, without one the row only reports the ratio (`goal`, `met` null).
pub fn paired_ratio_row(
    name: &str,
    unit: &str,
    keel: &[f64],
    baseline: &[f64],
    min_ratio: Option<f64>,
) -> Row {
    let ratios: Vec<f64> = keel.iter().zip(baseline).map(|(k, b)| k / b).collect();
    println!(
        "{name}: keel {:?}, baseline {:?}, per-pair ratios {:?}, load {:?}",
        keel.iter().map(|v| round(*v, 0)).collect::<Vec<_>>(),
        baseline.iter().map(|v| round(*v, 0)).collect::<Vec<_>>(),
        ratios.iter().map(|r| round(*r, 3)).collect::<Vec<_>>(),
        load_1m(),
    );
    let ratio = median(&ratios);
    Row {
        name: name.to_owned(),
        unit: unit.to_owned(),
        keel: round(median(keel), 0),
        baseline: Some(round(median(baseline), 0)),
        ratio: Some(round(ratio, 3)),
        goal: min_ratio.map(|m| format!(">= {m} (ratio)")),
        met: min_ratio.map(|m| ratio >= m),
        load_1m: load_1m(),
    }
}

/// Postgres's durability settings as one session sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Durability {
    pub fsync: String,
    pub synchronous_commit: String,
}

impl Durability {
    /// Whether a commit is flushed to disk before it is acknowledged, as in production:
    /// `fsync` on, and `synchronous_commit` anything but `off` (`local`, `remote_write` and
    /// `remote_apply` flush locally too; without standbys they are `on`).
    pub fn is_production(&self) -> bool {
        self.fsync == "on" && self.synchronous_commit != "off"
    }

    /// Reads both settings on a session of `url`.
    pub async fn observed(url: &str) -> Self {
        let mut conn = PgConnection::connect(url)
            .await
            .unwrap_or_else(|e| panic!("bench: connect to read the durability settings: {e}"));
        let d = Self::read(&mut conn).await;
        let _ = conn.close().await;
        d
    }

    async fn read(conn: &mut PgConnection) -> Self {
        // Through pgbouncer in transaction mode, two statements may land on two server
        // connections: read both in one.
        let (fsync, synchronous_commit): (String, String) = sqlx::query_as(
            "SELECT current_setting('fsync'), current_setting('synchronous_commit')",
        )
        .fetch_one(conn)
        .await
        .expect("bench: read fsync and synchronous_commit");
        Self {
            fsync,
            synchronous_commit,
        }
    }

    /// The settings as the bench's own sessions on `url` see them (the role and database it
    /// measures with, through the same pgbouncer); panics unless they are production's.
    /// Call it for every database URL a bench measures on, after [`ProductionDurability::ensure`].
    pub async fn require(url: &str) -> Self {
        let d = Self::observed(url).await;
        assert!(
            d.is_production(),
            "bench: refusing to measure with fsync = {}, synchronous_commit = {} on this \
             session (a role or database setting?): commits would be nearly free and the \
             ratios meaningless",
            d.fsync,
            d.synchronous_commit
        );
        d
    }
}

/// While alive, the Postgres server runs with `fsync` and `synchronous_commit` on.
///
/// Both are reloadable (`ALTER SYSTEM` + `pg_reload_conf()`, no restart). If either is off
/// server-wide, [`ensure`](Self::ensure) turns it on and remembers how it was set; dropping
/// the guard (the bench's end, or its panic unwinding) or SIGINT/SIGTERM puts it back, and the
/// stderr line says what was changed and how to put it back by hand if the bench is killed
/// outright (SIGKILL leaves the server durable: slower, never less safe). If both are on, as
/// on a production-like server, nothing is touched.
#[derive(Debug)]
pub struct ProductionDurability {
    admin_url: String,
    /// The statements that undo what `ensure` changed, in order; empty if nothing was.
    restore: Vec<String>,
}

/// How a server-wide setting was set, enough to put it back.
#[derive(Debug, sqlx::FromRow)]
struct ServerSetting {
    name: String,
    setting: String,
    source: String,
    sourcefile: Option<String>,
}

impl ProductionDurability {
    /// Turns on `fsync` and `synchronous_commit` on the stack's Postgres if they are off.
    pub async fn ensure() -> Self {
        Self::ensure_on(&Stack::load().admin_url("postgres")).await
    }

    /// [`ensure`](Self::ensure) on the server of `admin_url` (a superuser URL).
    pub async fn ensure_on(admin_url: &str) -> Self {
        let mut admin = PgConnection::connect(admin_url)
            .await
            .expect("bench: Postgres reachable on the direct port as the superuser");
        let settings: Vec<ServerSetting> = sqlx::query_as(
            "SELECT name, setting, source, sourcefile FROM pg_settings
              WHERE name IN ('fsync', 'synchronous_commit') ORDER BY name",
        )
        .fetch_all(&mut admin)
        .await
        .expect("bench: read pg_settings");
        let mut guard = Self {
            admin_url: admin_url.to_owned(),
            restore: Vec::new(),
        };
        for s in settings.iter().filter(|s| s.setting == "off") {
            // Set by ALTER SYSTEM before us: put that value back; otherwise drop ours so the
            // configuration file's (or the default) applies again.
            let by_alter_system = s.source == "configuration file"
                && s.sourcefile
                    .as_deref()
                    .is_some_and(|f| f.ends_with("postgresql.auto.conf"));
            guard.restore.push(if by_alter_system {
                format!("ALTER SYSTEM SET {} = '{}'", s.name, s.setting)
            } else {
                format!("ALTER SYSTEM RESET {}", s.name)
            });
            exec(&mut admin, &format!("ALTER SYSTEM SET {} = 'on'", s.name)).await;
        }
        if guard.restore.is_empty() {
            let _ = admin.close().await;
            return guard;
        }
        eprintln!(
            "bench: the server had {} off; turned on for this bench with ALTER SYSTEM and put \
             back when it ends. If it is killed first, restore with: {}; SELECT pg_reload_conf();",
            settings
                .iter()
                .filter(|s| s.setting == "off")
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(" and "),
            guard.restore.join("; ")
        );
        guard.restore.push("SELECT pg_reload_conf()".to_owned());
        exec(&mut admin, "SELECT pg_reload_conf()").await;
        let _ = admin.close().await;
        // A setting from the command line outranks ALTER SYSTEM: then this never turns on.
        crate::eventually(
            Duration::from_secs(10),
            "fsync and synchronous_commit on after the reload (set on the server's command line?)",
            || async {
                Durability::observed(admin_url)
                    .await
                    .is_production()
                    .then_some(())
            },
        )
        .await;
        // A SIGINT or SIGTERM would end the process without unwinding: undo first.
        let (url, restore) = (guard.admin_url.clone(), guard.restore.clone());
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("bench: SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            undo(&url, &restore).await;
            std::process::exit(130);
        });
        guard
    }
}

impl Drop for ProductionDurability {
    fn drop(&mut self) {
        if self.restore.is_empty() {
            return;
        }
        // Drop cannot await, and may run on a runtime thread: undo on a thread of its own.
        let (url, restore) = (self.admin_url.clone(), std::mem::take(&mut self.restore));
        let undone = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(undo(&url, &restore)))
        })
        .join();
        if !matches!(undone, Ok(Ok(()))) {
            eprintln!("bench: could not put the durability settings back; see the line above");
        }
    }
}

async fn undo(admin_url: &str, restore: &[String]) {
    match PgConnection::connect(admin_url).await {
        Ok(mut admin) => {
            for sql in restore {
                exec(&mut admin, sql).await;
            }
            let _ = admin.close().await;
            eprintln!(
                "bench: durability settings put back ({})",
                restore.join("; ")
            );
        }
        Err(e) => eprintln!("bench: could not reconnect to put the settings back: {e}"),
    }
}

async fn exec(conn: &mut PgConnection, sql: &str) {
    // AssertSqlSafe: the statements are built here from pg_settings' names and values.
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(conn)
        .await
        .unwrap_or_else(|e| panic!("bench: {sql}: {e}"));
}

/// Merges `rows` into the report (same name: replaced), records the core count and the
/// durability the bench ran with, writes it, prints the whole table.
pub fn record(rows: &[Row], durability: &Durability) {
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
    report.cores = std::thread::available_parallelism().ok().map(usize::from);
    report.postgres = Some(durability.clone());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).unwrap();

    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    println!();
    println!(
        "{:<34} {:>16} {:>10} {:>8}  {:<22} {:<4} load",
        "name", "keel", "baseline", "ratio", "goal", "met"
    );
    for r in &report.rows {
        println!(
            "{:<34} {:>16} {:>10} {:>8}  {:<22} {:<4} {}",
            r.name,
            format!("{} {}", r.keel, r.unit),
            opt(r.baseline),
            opt(r.ratio),
            r.goal.as_deref().unwrap_or("- (reported)"),
            match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            },
            opt(r.load_1m),
        );
    }
    println!(
        "cores {}, postgres fsync = {}, synchronous_commit = {}",
        report.cores.unwrap_or(0),
        durability.fsync,
        durability.synchronous_commit
    );
    println!("\nwritten to {}", path.display());
}
