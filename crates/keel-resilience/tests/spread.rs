//! The P24 proof: jitter spreads the retries of many instances that failed at the same
//! instant, where a plain doubling backoff keeps them in lock-step.
//!
//! A hundred simulated instances (each with its own seeded random source, so the test is
//! deterministic and needs no clock) lose their broker at t = 0. Each test first shows the
//! failure with the naive backoff, then the same scenario with [`BackoffPolicy`].

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use keel_resilience::backoff::BackoffPolicy;
use rand::SeedableRng;
use rand::rngs::StdRng;

const INSTANCES: u64 = 100;
const BUCKET: Duration = Duration::from_millis(100);

/// The backoff the broker supervisor used: double from `initial` up to `max`, no jitter.
fn naive(initial: Duration, max: Duration, failures: u32) -> Duration {
    (initial * 2u32.pow(failures.saturating_sub(1).min(20))).min(max)
}

/// The largest number of `times` that fall into one `BUCKET`-wide slot.
fn peak(times: &[Duration]) -> usize {
    let mut buckets: BTreeMap<u128, usize> = BTreeMap::new();
    for t in times {
        *buckets.entry(t.as_nanos() / BUCKET.as_nanos()).or_default() += 1;
    }
    buckets.values().copied().max().unwrap_or(0)
}

/// How many `BUCKET`-wide slots `times` touch.
fn slots(times: &[Duration]) -> usize {
    let mut s: Vec<_> = times
        .iter()
        .map(|t| t.as_nanos() / BUCKET.as_nanos())
        .collect();
    s.sort_unstable();
    s.dedup();
    s.len()
}

#[test]
fn first_retries_of_a_hundred_instances_spread_over_the_window_only_with_jitter() {
    let (initial, max) = (Duration::from_secs(1), Duration::from_secs(30));

    // The failure: without jitter every instance retries at the same instant.
    let first: Vec<_> = (0..INSTANCES).map(|_| naive(initial, max, 1)).collect();
    assert_eq!(
        peak(&first),
        100,
        "naive backoff: all 100 in one 100 ms bucket"
    );

    // Full jitter: the first retries cover the whole 1 s window, no bucket above a quarter
    // (evenly spread would be 10 per bucket; the seeded draw peaks at 17).
    let policy = BackoffPolicy::new(initial, max);
    let first: Vec<_> = (0..INSTANCES)
        .map(|seed| policy.delay_with(1, &mut StdRng::seed_from_u64(seed)))
        .collect();
    assert!(first.iter().all(|d| *d <= initial));
    assert!(peak(&first) <= 25, "peak {} of 100", peak(&first));
    assert_eq!(slots(&first), 10, "every 100 ms of the window sees a retry");
}

/// Each instance retries until its attempt lands after `back` (the broker is up again);
/// returns when that first successful attempt happens.
fn first_attempt_after(back: Duration, mut pause: impl FnMut(u32) -> Duration) -> Duration {
    let (mut t, mut failures) = (Duration::ZERO, 0);
    while t < back {
        failures += 1;
        t += pause(failures);
    }
    t
}

#[test]
fn after_a_broker_restart_a_hundred_instances_come_back_spread_not_at_once() {
    let (initial, max) = (Duration::from_millis(100), Duration::from_secs(10));
    let back = Duration::from_secs(30);

    // The failure: the broker is back at 30 s and every instance reconnects at the same
    // instant (32.7 s), the thundering herd a restarted broker meets.
    let returns: Vec<_> = (0..INSTANCES)
        .map(|_| first_attempt_after(back, |n| naive(initial, max, n)))
        .collect();
    assert_eq!(
        peak(&returns),
        100,
        "naive backoff: all 100 reconnect together"
    );

    // Full jitter: the reconnects spread over the cap's window; no 100 ms holds 10 % of them
    // (the seeded draw peaks at 5 and touches 58 slots).
    let policy = BackoffPolicy::new(initial, max);
    let returns: Vec<_> = (0..INSTANCES)
        .map(|seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            first_attempt_after(back, |n| policy.delay_with(n, &mut rng))
        })
        .collect();
    assert!(returns.iter().all(|t| *t >= back && *t <= back + max));
    assert!(peak(&returns) <= 10, "peak {} of 100", peak(&returns));
    assert!(slots(&returns) >= 40, "only {} slots", slots(&returns));
}
