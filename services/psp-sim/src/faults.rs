//! How the simulated provider misbehaves: per-request outcomes chosen by the payment token,
//! and process-wide fault knobs set at run time on `/admin/faults`.
//!
//! Tokens make a *specific* payment fail in a specific way, so an end-to-end test can place
//! one declined order next to an approved one:
//!
//! | token | outcome of `POST /v1/authorizations` |
//! |---|---|
//! | `tok_approve`, any other `tok_ok*` | 201 authorized |
//! | `tok_decline` | 402 `card-declined`, `decline_code: card_declined` |
//! | `tok_insufficient_funds` | 402 `card-declined`, `decline_code: insufficient_funds` |
//! | `tok_slow` | 201 after `faults.slow_delay` |
//! | `tok_flaky` | 503 for the first `faults.flaky_failures` attempts of an idempotency key, then 201 |
//! | `tok_timeout` | no answer for `faults.timeout_hold` (or until the client gives up), then 504 |
//!
//! The knobs (`latency_ms`, `error_rate`) make *every* `/v1` call slow or failing, for the
//! "provider degraded" scenarios; they start at zero and are not persisted.
//!
//! What must not break: every wait here ends when the process stops (the lifecycle's stop
//! token), answering 503, so a held request never stretches graceful shutdown (P20) — and
//! `tok_timeout`'s hold is validated to be shorter than `http.request_timeout`, so the
//! simulator, not the server's timeout layer, decides how it ends.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use keel_config::{ConfigError, Validate, ensure_range, millis as ms};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::error::{ApiError, FieldError};
use crate::model::DeclineCode;

/// `[faults]`: the timings of the token outcomes and the bound of the latency knob.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsConfig {
    /// How long `tok_slow` takes to approve.
    #[serde(with = "keel_config::duration")]
    pub slow_delay: Duration,
    /// How long `tok_timeout` holds a request before answering 504.
    #[serde(with = "keel_config::duration")]
    pub timeout_hold: Duration,
    /// How many attempts per idempotency key `tok_flaky` fails before approving.
    pub flaky_failures: u32,
    /// Largest `latency_ms` the admin knob accepts.
    #[serde(with = "keel_config::duration")]
    pub max_latency: Duration,
}

impl Validate for FaultsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure_range("faults.slow_delay (ms)", ms(self.slow_delay), 0, 300_000)?;
        ensure_range(
            "faults.timeout_hold (ms)",
            ms(self.timeout_hold),
            1,
            300_000,
        )?;
        ensure_range("faults.flaky_failures", self.flaky_failures, 0, 100)?;
        ensure_range("faults.max_latency (ms)", ms(self.max_latency), 0, 300_000)
    }
}

/// The outcome a payment token asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    Approve,
    Decline(DeclineCode),
    Slow,
    Flaky,
    Timeout,
}

impl Token {
    /// The outcome named by `token`, or `None` for a token the simulator does not know.
    pub fn parse(token: &str) -> Option<Self> {
        Some(match token {
            "tok_approve" => Self::Approve,
            "tok_decline" => Self::Decline(DeclineCode::CardDeclined),
            "tok_insufficient_funds" => Self::Decline(DeclineCode::InsufficientFunds),
            "tok_slow" => Self::Slow,
            "tok_flaky" => Self::Flaky,
            "tok_timeout" => Self::Timeout,
            t if t.starts_with("tok_ok") => Self::Approve,
            _ => return None,
        })
    }
}

/// The run-time knobs, as `GET`/`PUT /admin/faults` show and take them. A `PUT` replaces
/// both; a missing field is 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Knobs {
    /// Added to every `/v1` call before it runs.
    pub latency_ms: u64,
    /// Share of `/v1` calls answered 503 instead of running (0 = none, 1 = all).
    pub error_rate: f64,
}

/// The fault state shared by the handlers.
#[derive(Debug)]
pub struct Faults {
    config: FaultsConfig,
    knobs: RwLock<Knobs>,
    /// The lifecycle's stop token: ends every hold at shutdown.
    stop: CancellationToken,
}

impl Faults {
    pub fn new(config: FaultsConfig, stop: CancellationToken) -> Self {
        Self {
            config,
            knobs: RwLock::new(Knobs::default()),
            stop,
        }
    }

    pub fn knobs(&self) -> Knobs {
        *self.knobs.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_knobs(&self, knobs: Knobs) {
        *self.knobs.write().unwrap_or_else(PoisonError::into_inner) = knobs;
    }

    /// Plays the outcome `token` asks for on the `attempt`-th try of an idempotency key:
    /// `Ok` means approve.
    pub async fn play(&self, token: Token, attempt: u32) -> Result<(), ApiError> {
        match token {
            Token::Approve => Ok(()),
            Token::Decline(code) => Err(ApiError::CardDeclined(code)),
            Token::Slow => self.hold(self.config.slow_delay).await,
            Token::Flaky if attempt <= self.config.flaky_failures => Err(ApiError::Unavailable),
            Token::Flaky => Ok(()),
            Token::Timeout => {
                // Dropped here if the client hangs up first: hyper cancels the handler.
                self.hold(self.config.timeout_hold).await?;
                Err(ApiError::Timeout)
            }
        }
    }

    /// Waits `how_long`, or until shutdown (then 503, so the caller retries elsewhere).
    async fn hold(&self, how_long: Duration) -> Result<(), ApiError> {
        let _held = HeldGauge::enter();
        tokio::select! {
            () = tokio::time::sleep(how_long) => Ok(()),
            () = self.stop.cancelled() => Err(ApiError::ShuttingDown),
        }
    }
}

/// Counts requests being held (`psp_held_requests`); a guard, so a hold cut short by a
/// client hanging up is uncounted too.
struct HeldGauge;

impl HeldGauge {
    fn enter() -> Self {
        metrics::gauge!("psp_held_requests").increment(1.0);
        Self
    }
}

impl Drop for HeldGauge {
    fn drop(&mut self) {
        metrics::gauge!("psp_held_requests").decrement(1.0);
    }
}

/// Middleware on every `/v1` route: adds the knob's latency, then fails the configured share
/// of calls with 503 before they reach the handler (so they have no effect and store no
/// idempotent answer: a retry with the same key runs).
pub async fn inject(State(faults): State<Arc<Faults>>, request: Request, next: Next) -> Response {
    let knobs = faults.knobs();
    if knobs.latency_ms > 0
        && let Err(e) = faults.hold(Duration::from_millis(knobs.latency_ms)).await
    {
        return e.into_response();
    }
    if knobs.error_rate > 0.0 && rand::random::<f64>() < knobs.error_rate {
        metrics::counter!("psp_injected_errors_total").increment(1);
        return ApiError::Unavailable.into_response();
    }
    next.run(request).await
}

/// `GET /admin/faults` and `PUT /admin/faults`.
pub fn admin_routes(faults: Arc<Faults>) -> Router {
    Router::new()
        .route("/admin/faults", get(get_knobs).put(put_knobs))
        .with_state(faults)
}

async fn get_knobs(State(faults): State<Arc<Faults>>) -> Json<Knobs> {
    Json(faults.knobs())
}

async fn put_knobs(
    State(faults): State<Arc<Faults>>,
    Json(knobs): Json<Knobs>,
) -> Result<Json<Knobs>, ApiError> {
    let mut errors = Vec::new();
    if !(0.0..=1.0).contains(&knobs.error_rate) {
        errors.push(FieldError::new("error_rate", "must be between 0 and 1"));
    }
    let max = ms(faults.config.max_latency);
    if knobs.latency_ms > max {
        errors.push(FieldError::new(
            "latency_ms",
            format!("must be at most {max} (faults.max_latency)"),
        ));
    }
    if !errors.is_empty() {
        return Err(ApiError::InvalidRequest(errors));
    }
    faults.set_knobs(knobs);
    tracing::info!(
        latency_ms = knobs.latency_ms,
        error_rate = knobs.error_rate,
        "fault knobs set"
    );
    Ok(Json(knobs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_their_outcomes_and_unknown_ones_are_refused() {
        assert_eq!(Token::parse("tok_ok_visa"), Some(Token::Approve));
        assert_eq!(
            Token::parse("tok_insufficient_funds"),
            Some(Token::Decline(DeclineCode::InsufficientFunds))
        );
        assert_eq!(Token::parse("tok_nope"), None);
        assert_eq!(Token::parse("approve"), None);
    }
}
