//! `keelctl audit`: invariants checked across every registered service's database and the
//! broker (P02, P03, P04, P08, P11).
//!
//! Each service's tests prove its own part; this proves the whole: after any mix of orders and
//! faults, when things settle, the states the services hold agree. Every check prints how many
//! things it looked at and how many broke the rule; any broken rule makes the command exit 1.
//! End-to-end tests and `make demo` finish with it.
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

use keel_config::ConfigError;
use serde::Serialize;
use sqlx::PgConnection;

use crate::targets::Targets;
use crate::{AuditBounds, Config, RabbitTarget};

pub use journey::{FINAL_STATES, HOLDING_STATUSES, UNRESOLVED_STATUS};

/// One invariant's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub name: String,
    /// How many things the check looked at.
    pub checked: i64,
    /// How many broke the rule (0 = pass).
    pub violations: i64,
    /// Up to a few examples of violations, for the operator.
    pub examples: Vec<String>,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.violations == 0
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

    /// The report as a table of 100 columns, examples under their check.
    pub fn table(&self) -> comfy_table::Table {
        let mut t = crate::output::table(["check", "checked", "violations", "result"]);
        for c in &self.checks {
            let mut name = c.name.clone();
            for e in &c.examples {
                name.push_str("\n  ");
                name.push_str(e);
            }
            t.add_row([
                name,
                c.checked.to_string(),
                c.violations.to_string(),
                if c.passed() { "ok" } else { "FAIL" }.to_owned(),
            ]);
        }
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

/// A check from its violations, keeping a few as examples.
pub fn check(name: impl Into<String>, checked: i64, broken: Vec<String>) -> Check {
    Check {
        name: name.into(),
        checked,
        violations: broken.len() as i64,
        examples: broken.into_iter().take(EXAMPLES).collect(),
    }
}

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
