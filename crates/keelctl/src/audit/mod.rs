//! `keelctl audit`: invariants checked across every registered service's database and the
//! broker (P02, P03, P04, P08, P11).
//!
//! Each service's tests prove its own part; this proves the whole: after any mix of orders and
//! faults, when things settle, the states the services hold agree. Every check reports how
//! many things it examined and how many broke the rule; any broken rule makes the command exit
//! 1. End-to-end tests and `make demo` finish with it.
//!
//! Some rules hold only after a while (an order placed a second ago need not be final yet), so
//! those checks have a time gate from `[audit]`: rows younger than it are not judged, and the
//! check counts them as `too_recent` instead of `examined`. A pass with nothing examined proves
//! nothing; callers that expect rows (the end-to-end tests) wait until nothing is too recent
//! and require `examined > 0` for the checks their scenario feeds ([`Report::past_gates`]).
//!
//! Read-only: every query is a `SELECT`, so the audit can run as a role that may only read.
//!
//! Two kinds of checks, so that adding a service never means editing this code:
//! - [`generic`] checks apply to every registered service by what its registry entry says:
//!   its outbox drains, its job queue has nothing failed for good, the queues it consumes are
//!   consumed and not backed up. A new service is covered by these the moment it is registered.
//! - [`journey`] checks are the business journey's invariants, declared per service in one
//!   table keyed by service name ([`journey::CHECKS`]); a service with no entry there simply has
//!   none, and an entry whose service is not registered is skipped.
//!
//! The checks read table contracts (column names documented in each service's migrations and
//! the platform's), never service code.

pub mod generic;
pub mod journey;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use keel_config::ConfigError;
use serde::Serialize;
use sqlx::PgConnection;

use crate::targets::Targets;
use crate::{AuditBounds, Config, RabbitTarget};

pub use journey::{FINAL_STATES, HOLDING_STATUSES, UNRESOLVED_STATUS};

/// One invariant's result.
///
/// `examined` is what makes a pass mean something: a check that examined nothing passed
/// vacuously (no rows yet, or every row younger than its time gate), and a test that expects
/// rows treats that as a failure. A check with a time gate leaves rows younger than the gate
/// unjudged (an order placed a second ago need not be final yet) and counts them in
/// `too_recent`, so a caller that wants every row judged waits until that is 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable identifier, `<service>.<rule>` (`checkout.orders_final`), or `queue:<name>` for
    /// a consumed queue: what tests and scripts match on. The name may change with bounds.
    pub id: String,
    /// The rule in words, with its bounds.
    pub name: String,
    /// How many things the rule was applied to: rows past the time gate, if it has one.
    pub examined: i64,
    /// What `examined` counts (`orders`, `SKUs`, `outbox rows`, `jobs`, `messages`).
    pub unit: &'static str,
    /// The check's time gate, if it has one: rows younger than this are not judged yet.
    #[serde(serialize_with = "secs")]
    pub gate: Option<Duration>,
    /// Rows left unjudged because they are younger than the gate (0 without a gate).
    pub too_recent: i64,
    /// How many broke the rule (0 = pass).
    pub violations: i64,
    /// Up to a few examples of violations, for the operator.
    pub examples: Vec<String>,
}

/// A gate in JSON: whole seconds (fractions kept), or null.
fn secs<S: serde::Serializer>(gate: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match gate {
        Some(d) => s.serialize_f64(d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

impl Check {
    /// A check without a time gate, from its violations, keeping a few as examples.
    pub fn new(
        id: impl Into<String>,
        name: impl Into<String>,
        examined: i64,
        unit: &'static str,
        broken: Vec<String>,
    ) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            examined,
            unit,
            gate: None,
            too_recent: 0,
            violations: broken.len() as i64,
            examples: broken.into_iter().take(EXAMPLES).collect(),
        }
    }

    /// This check with a time gate of `gate`, which left `too_recent` rows unjudged.
    #[must_use]
    pub fn gated(mut self, gate: Duration, too_recent: i64) -> Self {
        self.gate = Some(gate);
        self.too_recent = too_recent;
        self
    }

    pub fn passed(&self) -> bool {
        self.violations == 0
    }

    /// `examined` with its unit, as the table shows it (`3 orders`, `1 order`).
    pub fn examined_text(&self) -> String {
        // Every unit is a regular plural.
        let unit = if self.examined == 1 {
            self.unit.trim_end_matches('s')
        } else {
            self.unit
        };
        format!("{} {unit}", self.examined)
    }
}

/// All checks of one audit run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(Check::passed)
    }

    /// The check with id `id`.
    pub fn get(&self, id: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.id == id)
    }

    /// The ids of the checks that failed, in report order.
    pub fn failed(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|c| !c.passed())
            .map(|c| c.id.as_str())
            .collect()
    }

    /// Whether every gated check judged every row: nothing was left as too recent.
    pub fn past_gates(&self) -> bool {
        self.checks.iter().all(|c| c.too_recent == 0)
    }

    /// The report as a table of 100 columns, examples under their check.
    pub fn table(&self) -> comfy_table::Table {
        let mut t =
            crate::output::table(["check", "examined", "too recent", "violations", "result"]);
        for c in &self.checks {
            let mut name = c.name.clone();
            for e in &c.examples {
                name.push_str("\n  ");
                name.push_str(e);
            }
            t.add_row([
                name,
                c.examined_text(),
                match c.gate {
                    Some(_) => c.too_recent.to_string(),
                    None => "-".to_owned(),
                },
                c.violations.to_string(),
                if c.passed() { "ok" } else { "FAIL" }.to_owned(),
            ]);
        }
        crate::output::keep_whole(&mut t, &[1, 2, 3, 4]);
        t
    }

    /// The closing line.
    pub fn verdict(&self) -> &'static str {
        if self.passed() {
            "audit: all checks passed"
        } else {
            "audit: FAILED"
        }
    }
}

/// The table and the verdict, as `keelctl audit` prints them (and e2e tests log them).
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.table())?;
        write!(f, "{}", self.verdict())
    }
}

/// The report in JSON: the checks with their verdicts, and the overall one.
#[derive(Debug, Serialize)]
pub struct ReportJson<'a> {
    pub passed: bool,
    pub checks: Vec<CheckJson<'a>>,
}

/// One check in JSON.
#[derive(Debug, Serialize)]
pub struct CheckJson<'a> {
    #[serde(flatten)]
    pub check: &'a Check,
    pub passed: bool,
}

impl Report {
    /// What `--output json` prints.
    pub fn json(&self) -> ReportJson<'_> {
        ReportJson {
            passed: self.passed(),
            checks: self
                .checks
                .iter()
                .map(|check| CheckJson {
                    check,
                    passed: check.passed(),
                })
                .collect(),
        }
    }
}

/// Why the audit could not run (as opposed to a failed check).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{service} database: {source}")]
    Database {
        service: String,
        source: sqlx::Error,
    },
    #[error("RabbitMQ management API: {0}")]
    Broker(String),
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// A journey check needs a service that is not registered with a database.
    #[error("{needed_by} checks need {service}'s database, which the registry does not have")]
    Missing {
        service: String,
        needed_by: &'static str,
    },
}

/// A database error of `service`, for `map_err`.
pub fn db(service: &str) -> impl FnOnce(sqlx::Error) -> AuditError {
    let service = service.to_owned();
    move |source| AuditError::Database { service, source }
}

const EXAMPLES: usize = 5;

/// What the checks work with: one connection per registered database and the bounds.
#[derive(Debug)]
pub struct Ctx {
    pub bounds: AuditBounds,
    dbs: BTreeMap<String, PgConnection>,
}

impl Ctx {
    /// The connection to `service`'s database, for the checks of `needed_by`.
    pub fn db(
        &mut self,
        service: &str,
        needed_by: &'static str,
    ) -> Result<&mut PgConnection, AuditError> {
        self.dbs
            .get_mut(service)
            .ok_or_else(|| AuditError::Missing {
                service: service.to_owned(),
                needed_by,
            })
    }

    /// Whether `service` has a database here.
    pub fn has(&self, service: &str) -> bool {
        self.dbs.contains_key(service)
    }
}

/// Runs every check against the targets `config` describes.
pub async fn run(config: &Config) -> Result<Report, AuditError> {
    let targets = config.targets()?;
    run_on(&targets, &config.audit, &config.rabbitmq).await
}

/// Runs every check against `targets`.
pub async fn run_on(
    targets: &Targets,
    bounds: &AuditBounds,
    rabbit: &RabbitTarget,
) -> Result<Report, AuditError> {
    let mut dbs = BTreeMap::new();
    for (t, url) in targets.with_database() {
        let conn = crate::connect(url).await.map_err(db(&t.service.name))?;
        dbs.insert(t.service.name.clone(), conn);
    }
    let mut cx = Ctx {
        bounds: bounds.clone(),
        dbs,
    };
    let mut report = Report::default();

    // The journey's invariants, in registry order, for the services that declare some.
    for t in &targets.all {
        for entry in journey::CHECKS
            .iter()
            .filter(|c| c.service == t.service.name)
        {
            report.checks.extend((entry.checks)(&mut cx).await?);
        }
    }
    // What every registered service owes, by its registry entry.
    for (t, _) in targets.with_database() {
        let name = &t.service.name;
        let conn = cx.db(name, "generic")?;
        report
            .checks
            .extend(generic::database_checks(name, conn, bounds).await?);
    }
    report
        .checks
        .extend(generic::queues(targets, bounds, rabbit).await?);
    Ok(report)
}

/// Percent-encodes a path segment of the management API (vhost and connection names may
/// contain `/`, spaces and other reserved characters).
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
