//! A retry budget: retries may add at most a set share of extra load on a dependency (P24).
//!
//! The failure it prevents is the retry storm. A client that retries every failed call up to
//! three times turns a dependency's outage into four times its normal load, exactly when it
//! can least take it; with two layers that each retry three times (checkout's saga around
//! billing, billing around the provider) the multiplier is sixteen. Per-call attempt limits
//! cannot see that: each call is within its limit. A budget counts across calls: every first
//! attempt deposits, every retry withdraws, and a retry with nothing to withdraw is not made
//! (the call fails with its last error instead). While the dependency is healthy nothing is
//! retried and the budget fills; during an outage retries run out after `ratio` of the
//! traffic, so the dependency sees at most `1 + ratio` attempts per call, plus a small floor
//! (`min_per_second`) that keeps a quiet client able to retry at all.
//!
//! The accounting is tower's `TpsBudget` (Finagle's design: deposits expire after `window`),
//! taken rather than rewritten: it is well kept and the arithmetic is not the lesson. What
//! this module adds is a validated configuration (tower's constructor panics on a bad value)
//! and names that say what the calls mean.
//!
//! Must not break: [`RetryBudget::deposit`] once per *call* (not per attempt), and
//! [`RetryBudget::try_withdraw`] before every retry, or the ratio means nothing.

use std::fmt;
use std::time::Duration;

use tower::retry::budget::{Budget, TpsBudget};

use crate::breaker::ConfigError;

/// How much extra load retries may add.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryBudgetConfig {
    /// Retries allowed per first attempt over the window (`0.1`: at most 10 % extra load);
    /// `0 ≤ x ≤ 10`.
    pub ratio: f32,
    /// Retries allowed per second whatever the traffic, so a client making one call a minute
    /// may still retry it.
    pub min_per_second: u32,
    /// How long a deposit counts (1 to 60 s).
    pub window: Duration,
}

impl Default for RetryBudgetConfig {
    /// 10 % extra load, at least one retry a second, over 10 s.
    fn default() -> Self {
        Self {
            ratio: 0.1,
            min_per_second: 1,
            window: Duration::from_secs(10),
        }
    }
}

impl RetryBudgetConfig {
    /// Checks every field, naming the first that is unusable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.ratio.is_finite() && (0.0..=10.0).contains(&self.ratio)) {
            return Err(ConfigError::new("ratio", "must be 0 to 10"));
        }
        if self.min_per_second > 1_000_000 {
            return Err(ConfigError::new(
                "min_per_second",
                "must be at most 1000000",
            ));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&self.window) {
            return Err(ConfigError::new("window", "must be 1 s to 60 s"));
        }
        Ok(())
    }
}

/// A retry budget shared by every call to one dependency (module docs).
pub struct RetryBudget {
    inner: TpsBudget,
    config: RetryBudgetConfig,
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl RetryBudget {
    /// A budget for `config`, or the first unusable setting.
    pub fn new(config: RetryBudgetConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            // Validated above: tower's own assertions cannot fire.
            inner: TpsBudget::new(config.window, config.min_per_second, config.ratio),
            config,
        })
    }

    /// Records a call (its first attempt): what later retries may draw on.
    pub fn deposit(&self) {
        self.inner.deposit();
    }

    /// Asks for one retry: `true` if the budget allows it (and it is counted), `false` if the
    /// caller must give up with the error it has.
    pub fn try_withdraw(&self) -> bool {
        self.inner.withdraw()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_setting_is_named_not_a_panic() {
        for (config, field) in [
            (
                RetryBudgetConfig {
                    ratio: -0.1,
                    ..RetryBudgetConfig::default()
                },
                "ratio",
            ),
            (
                RetryBudgetConfig {
                    ratio: f32::NAN,
                    ..RetryBudgetConfig::default()
                },
                "ratio",
            ),
            (
                RetryBudgetConfig {
                    window: Duration::from_millis(500),
                    ..RetryBudgetConfig::default()
                },
                "window",
            ),
            (
                RetryBudgetConfig {
                    window: Duration::from_secs(61),
                    ..RetryBudgetConfig::default()
                },
                "window",
            ),
        ] {
            assert_eq!(RetryBudget::new(config).expect_err(field).field(), field);
        }
    }

    #[test]
    fn retries_beyond_the_ratio_of_calls_are_refused() {
        // No floor, so only the ratio counts: 1,000 calls allow about 100 retries.
        let budget = RetryBudget::new(RetryBudgetConfig {
            ratio: 0.1,
            min_per_second: 0,
            window: Duration::from_secs(10),
        })
        .unwrap();
        let mut allowed = 0;
        for _ in 0..1000 {
            budget.deposit();
            if budget.try_withdraw() {
                allowed += 1;
            }
        }
        assert!(
            (95..=105).contains(&allowed),
            "{allowed} retries for 1,000 calls"
        );
        // Spent: a burst of further retries without calls gets nothing.
        let burst = (0..100).filter(|_| budget.try_withdraw()).count();
        assert!(burst <= 5, "{burst} retries with no calls behind them");
    }
}
