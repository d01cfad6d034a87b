//! Exponential backoff with full jitter, capped and deadline-aware: Keel's one retry pause
//! (P24).
//!
//! The failure it prevents is synchronisation. When a broker restarts, every relay, consumer
//! and connection supervisor of every instance fails at the same instant; with a plain
//! doubling backoff they all retry at the same instants too (100 ms, 300 ms, 700 ms, …), so
//! the dependency that is just coming back is met by the whole fleet at once, again and
//! again. Jitter turns those spikes into a spread (`tests/spread.rs` shows both).
//!
//! The policy, after the `n`-th consecutive failure (`n` from 1):
//! - **ceiling** `c(n) = min(max, initial · 2^(n-1))`: exponential, so a long outage costs few
//!   attempts, and capped, so recovery is noticed within `max`;
//! - **delay** uniform in `[0, c(n)]` ("full jitter").
//!
//! Why full jitter rather than decorrelated jitter (`min(max, random(initial, 3 · previous))`):
//! both break the synchronisation about equally well (AWS's "Exponential Backoff and Jitter"
//! simulations: full jitter does slightly less total work, decorrelated finishes slightly
//! sooner). Full jitter is a pure function of the failure count, while decorrelated jitter
//! needs the previous delay. Keel's job queue keeps only the attempt number in its table (a
//! job's retry may be computed by another worker after a crash), so full jitter lets the
//! in-memory loops and the persisted ones share one policy. The price: a delay may be close
//! to zero; the exponential ceiling keeps the *average* pause growing, which is what protects
//! a dependency that stays down.
//!
//! Deadlines: [`Backoff::next_delay`] answers `None` when the pause would end at or past the
//! deadline, instead of clamping the pause to it. A clamped pause ends exactly when the
//! caller's time is up, so the attempt after it could not finish anyway: giving up now
//! reports the same failure sooner and spends nothing on the dependency. Nor is the delay
//! redrawn inside the time that is left: that would squeeze the late retries of every caller
//! into the shrinking remainder, the very bunching jitter is there to prevent.
//!
//! Must not break: every pause is at most `max`, and a deadline-aware caller never sleeps
//! past its deadline.

use std::time::{Duration, Instant};

use rand::Rng;

/// How long to wait between attempts: `initial` doubling per failure up to `max`, full
/// jitter. Cheap to copy; keep one in configuration-derived state and start a [`Backoff`]
/// per retry loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    initial: Duration,
    max: Duration,
}

impl BackoffPolicy {
    /// `initial` is the ceiling after the first failure; `max` caps every ceiling. An
    /// `initial` above `max` is lowered to it.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial: initial.min(max),
            max,
        }
    }

    /// The ceiling after the first failure.
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The cap of every pause.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The largest pause after `failures` consecutive failures: `min(max, initial ·
    /// 2^(failures-1))`. `0` is treated as `1`; large counts saturate at `max`.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1);
        // 2^31 · 1 ns is already over two seconds, and any initial ≥ 1 ms is capped long
        // before that; saturating arithmetic keeps huge counts at `max` without overflow.
        let factor = 2u32.saturating_pow(doublings);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// A pause after `failures` consecutive failures, uniform in `[0, ceiling(failures)]`.
    pub fn delay(&self, failures: u32) -> Duration {
        self.delay_with(failures, &mut rand::rng())
    }

    /// [`delay`](Self::delay) drawn from `rng` (tests seed it to be deterministic).
    pub fn delay_with<R: Rng + ?Sized>(&self, failures: u32, rng: &mut R) -> Duration {
        let ceiling = u64::try_from(self.ceiling(failures).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=ceiling))
    }

    /// A pause after `failures` consecutive failures, or `None` if it would end at or past
    /// `deadline` (see the module docs for why this does not clamp). For retry counts kept
    /// outside memory, such as a job's attempt number.
    pub fn delay_before(&self, failures: u32, now: Instant, deadline: Instant) -> Option<Duration> {
        within(self.delay(failures), now, deadline)
    }

    /// A fresh retry loop's state (no failures yet).
    pub fn backoff(&self) -> Backoff {
        Backoff {
            policy: *self,
            failures: 0,
        }
    }
}

/// `delay` if the pause ends strictly before `deadline`.
fn within(delay: Duration, now: Instant, deadline: Instant) -> Option<Duration> {
    let left = deadline.checked_duration_since(now)?;
    (delay < left).then_some(delay)
}

/// One retry loop's backoff: counts consecutive failures, [`reset`](Self::reset) after a
/// success.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    failures: u32,
}

impl Backoff {
    /// Records a failure and returns the pause before the next attempt, or `None` if that
    /// pause would end at or past `deadline`: the caller gives up now with the last error.
    pub fn next_delay(&mut self, now: Instant, deadline: Instant) -> Option<Duration> {
        within(self.next_delay_without_deadline(), now, deadline)
    }

    /// Records a failure and returns the pause before the next attempt, for loops that retry
    /// until they are stopped rather than until a deadline (a relay, a consumer, a connection
    /// supervisor). Still at most the policy's `max`.
    pub fn next_delay_without_deadline(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.policy.delay(self.failures)
    }

    /// Consecutive failures recorded since the start or the last [`reset`](Self::reset).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// After a success: the next failure starts again from the initial ceiling.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceilings_double_from_initial_up_to_the_cap() {
        let p = BackoffPolicy::new(100 * MS, 1000 * MS);
        let ceilings: Vec<_> = (1..=6).map(|n| p.ceiling(n)).collect();
        assert_eq!(
            ceilings,
            [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
        assert_eq!(p.ceiling(0), 100 * MS, "no failure yet counts as the first");
    }

    #[test]
    fn huge_failure_counts_saturate_at_the_cap() {
        let p = BackoffPolicy::new(Duration::from_secs(1), Duration::from_secs(30));
        for n in [31, 32, 64, 1000, u32::MAX] {
            assert_eq!(p.ceiling(n), Duration::from_secs(30), "{n}");
            assert!(p.delay(n) <= Duration::from_secs(30));
        }
    }

    #[test]
    fn an_initial_above_the_cap_is_lowered_to_it() {
        let p = BackoffPolicy::new(Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(p.initial(), Duration::from_secs(1));
        assert_eq!(p.ceiling(1), Duration::from_secs(1));
    }

    #[test]
    fn full_jitter_covers_the_whole_window_below_the_ceiling() {
        let p = BackoffPolicy::new(100 * MS, 10_000 * MS);
        let mut rng = StdRng::seed_from_u64(7);
        let draws: Vec<_> = (0..2000).map(|_| p.delay_with(4, &mut rng)).collect();
        let ceiling = p.ceiling(4);
        assert!(draws.iter().all(|d| *d <= ceiling));
        // Uniform over [0, 800 ms]: some near each end, the mean near the middle.
        assert!(draws.iter().any(|d| *d < 40 * MS), "nothing near zero");
        assert!(
            draws.iter().any(|d| *d > 760 * MS),
            "nothing near the ceiling"
        );
        let mean = draws.iter().sum::<Duration>() / 2000;
        assert!(mean > 360 * MS && mean < 440 * MS, "{mean:?}");
    }

    #[test]
    fn reset_starts_again_from_the_initial_ceiling() {
        let mut b = BackoffPolicy::new(100 * MS, 10_000 * MS).backoff();
        for _ in 0..8 {
            assert!(b.next_delay_without_deadline() <= 10_000 * MS);
        }
        assert_eq!(b.failures(), 8);
        b.reset();
        assert_eq!(b.failures(), 0);
        for _ in 0..50 {
            let mut fresh = b.clone();
            assert!(fresh.next_delay_without_deadline() <= 100 * MS);
        }
    }

    #[test]
    fn no_pause_ends_at_or_past_the_deadline() {
        let p = BackoffPolicy::new(Duration::from_secs(1), Duration::from_secs(1));
        let now = Instant::now();
        // Plenty of time: every pause fits.
        let mut b = p.backoff();
        for _ in 0..100 {
            assert!(b.next_delay(now, now + Duration::from_secs(2)).is_some());
        }
        // A deadline inside the jitter window: the pauses that fit are returned, the others
        // are refused rather than clamped.
        let deadline = now + 500 * MS;
        let (mut fits, mut refused) = (0, 0);
        for _ in 0..200 {
            match p.delay_before(1, now, deadline) {
                Some(d) => {
                    assert!(now + d < deadline, "{d:?}");
                    fits += 1;
                }
                None => refused += 1,
            }
        }
        assert!(fits > 0 && refused > 0, "fits {fits}, refused {refused}");
        // At or past the deadline: never a pause.
        let mut b = p.backoff();
        assert_eq!(b.next_delay(now, now), None);
        assert_eq!(b.next_delay(now + MS, now), None);
    }
}
