//! A circuit breaker: stop calling a dependency that is failing, and find out cheaply when it
//! has come back (P25).
//!
//! The failure it prevents is the caller drowning with its dependency. When a receiver of
//! webhooks or a payment provider is down, every call to it waits for its timeout; those
//! waits hold connections, tasks and queue slots that healthy work needs, and the retries
//! keep hammering a service that is trying to restart. A breaker notices the failure rate,
//! answers "no" at once for a while (fail fast, no wait, no load on the dependency), then lets
//! a few trial calls through to see whether it is worth calling again.
//!
//! The states, and what moves between them:
//! - **Closed**: calls pass; outcomes are counted in a rolling time window split into
//!   buckets. When the window holds at least `minimum_calls` outcomes and the share of
//!   failures is at or above `failure_rate_threshold`, the breaker opens. The minimum matters:
//!   without it the first call of a quiet endpoint, if it failed, would be a 100 % failure
//!   rate.
//! - **Open**: every [`Breaker::try_acquire`] is refused with how long is left
//!   ([`BreakerOpen::retry_after`]). After `open_for` (lengthened by up to `open_jitter` of it,
//!   so the breakers of many instances that opened together do not probe together) the next
//!   `try_acquire` turns the breaker **HalfOpen**. That happens on a call, not on a timer:
//!   there is no background thread, so an idle breaker reports `Open` until someone asks.
//! - **HalfOpen**: at most `half_open_probes` trial calls are let through; more are refused.
//!   When all of them succeed, the breaker closes with an empty window; the first that fails
//!   opens it again for another `open_for`.
//!
//! A permit settled after the state it was issued in has ended (a slow call from before the
//! breaker opened, finishing while it is half-open) is ignored: each transition starts a new
//! generation, and an outcome only counts in the generation that let the call through.
//!
//! The rolling window is `buckets` slots of `window / buckets` each; a bucket is reused (and
//! cleared) when the clock reaches its slot again. Outcomes therefore count for between
//! `window - window / buckets` and `window`: more buckets, sharper expiry, more memory
//! (a bucket is 16 bytes).
//!
//! Written by hand rather than taken from a crate because the state machine is the lesson,
//! and because Keel's breaker must take an injected [`Clock`] (tests drive time instead of
//! sleeping) and report transitions through a hook (this crate depends on no metrics crate).
//!
//! Must not break: while Open no call passes until `open_for` has elapsed, and while HalfOpen
//! no more than `half_open_probes` calls are in flight, whatever the number of threads.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rand::Rng;

/// The breaker's settings. Every field is checked by [`BreakerConfig::validate`], which
/// [`Breaker::new`] calls, so a breaker never runs with an unusable setting.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Share of failed calls in the window (`0 < x ≤ 1`) at or above which the breaker
    /// opens.
    pub failure_rate_threshold: f64,
    /// Fewest calls the window must hold before the failure rate is judged at all.
    pub minimum_calls: u32,
    /// How far back outcomes count.
    pub window: Duration,
    /// How many slots the window is split into (`1..=1000`, each at least 1 ms).
    pub buckets: u32,
    /// How long the breaker stays open before it lets probes through.
    pub open_for: Duration,
    /// Up to this share of `open_for` (`0 ≤ x ≤ 1`) is added at random to each open period.
    pub open_jitter: f64,
    /// Trial calls let through while half-open; all must succeed for the breaker to close.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    /// Starting points for a dependency called a few times a second: judge at least 10 calls
    /// over the last 30 s, open at 50 % failures, stay open 15 s (+ up to 20 %), 3 probes.
    fn default() -> Self {
        Self {
            failure_rate_threshold: 0.5,
            minimum_calls: 10,
            window: Duration::from_secs(30),
            buckets: 10,
            open_for: Duration::from_secs(15),
            open_jitter: 0.2,
            half_open_probes: 3,
        }
    }
}

/// Most buckets a window may have: past this, a bucket per call would be cheaper.
const MAX_BUCKETS: u32 = 1000;

impl BreakerConfig {
    /// Checks every field, naming the first that is unusable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let t = self.failure_rate_threshold;
        if !(t.is_finite() && t > 0.0 && t <= 1.0) {
            return Err(ConfigError::new(
                "failure_rate_threshold",
                "must be above 0 and at most 1",
            ));
        }
        if self.minimum_calls == 0 {
            return Err(ConfigError::new("minimum_calls", "must be at least 1"));
        }
        if self.window.is_zero() {
            return Err(ConfigError::new("window", "must be longer than zero"));
        }
        if !(1..=MAX_BUCKETS).contains(&self.buckets) {
            return Err(ConfigError::new("buckets", "must be 1 to 1000"));
        }
        if self.window / self.buckets < Duration::from_millis(1) {
            return Err(ConfigError::new(
                "buckets",
                "each bucket (window / buckets) must be at least 1 ms",
            ));
        }
        if self.open_for.is_zero() {
            return Err(ConfigError::new("open_for", "must be longer than zero"));
        }
        let j = self.open_jitter;
        if !(j.is_finite() && (0.0..=1.0).contains(&j)) {
            return Err(ConfigError::new("open_jitter", "must be 0 to 1"));
        }
        if self.half_open_probes == 0 {
            return Err(ConfigError::new("half_open_probes", "must be at least 1"));
        }
        Ok(())
    }
}

/// An unusable [`BreakerConfig`] field: which one, and what it must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigError {
    field: &'static str,
    reason: &'static str,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, reason: &'static str) -> Self {
        Self { field, reason }
    }

    /// The field's name in [`BreakerConfig`], for the caller to prefix with its own
    /// configuration key (`notification.webhooks.breaker.` + field).
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What the value must be.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// Where the breaker is. [`State::as_str`] gives a stable label for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer of [`Breaker::try_acquire`] when no call may pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerOpen {
    /// When asking again may succeed: the rest of the open period; while half-open with every
    /// probe out, the breaker cannot know when they end, so this is `open_for`, the wait that
    /// follows if a probe fails.
    pub retry_after: Duration,
}

impl fmt::Display for BreakerOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "circuit breaker open; retry after {} ms",
            self.retry_after.as_millis()
        )
    }
}

impl std::error::Error for BreakerOpen {}

/// A source of time. The breaker reads it on every call; tests inject a [`ManualClock`] and
/// move time themselves, so no test sleeps.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> Instant;
}

/// The real monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to, for tests. Clones share one time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<Instant>>,
}

impl ManualClock {
    /// A clock reading the current instant until it is advanced.
    pub fn new() -> Self {
        Self {
            now: Arc::new(Mutex::new(Instant::now())),
        }
    }

    /// Moves time forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(PoisonError::into_inner);
        *now += by;
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

type Hook = Box<dyn Fn(State, State) + Send + Sync>;

/// A circuit breaker. Cheap to clone: clones share one state (keep one per dependency, or one
/// per webhook endpoint, and hand clones to the tasks that call it).
///
/// ```
/// use std::time::Duration;
/// use keel_resilience::breaker::{Breaker, BreakerConfig, State};
///
/// let breaker = Breaker::new(BreakerConfig {
///     minimum_calls: 2,
///     open_jitter: 0.0,
///     ..BreakerConfig::default()
/// })?;
/// // Export the state: a gauge per breaker, set on every transition.
/// breaker.on_transition(|_from, to| {
///     let _label = to.as_str(); // metrics::gauge!("breaker_state", "state" => _label) ...
/// });
/// for _ in 0..2 {
///     let permit = breaker.try_acquire().expect("closed: calls pass");
///     // ... the call failed:
///     permit.failure();
/// }
/// assert_eq!(breaker.state(), State::Open);
/// let refused = breaker.try_acquire().unwrap_err();
/// assert!(refused.retry_after <= Duration::from_secs(15));
/// # Ok::<(), keel_resilience::breaker::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct Breaker {
    shared: Arc<Shared>,
}

struct Shared {
    config: BreakerConfig,
    clock: Arc<dyn Clock>,
    // One std Mutex around the whole state rather than atomics: a decision reads and writes
    // several fields together (window totals, phase, generation, probe counts), and a
    // lock-free version would need a compare-and-swap loop over all of them to stay correct.
    // The critical sections are a few integer updates with no I/O and no await, so the lock
    // is held for nanoseconds, while the call the breaker guards takes milliseconds.
    core: Mutex<Core>,
}

struct Core {
    phase: Phase,
    /// Bumped on every transition; a permit's outcome counts only in its own generation.
    generation: u64,
    window: Window,
    hooks: Vec<Hook>,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { issued: u32, succeeded: u32 },
}

impl Phase {
    fn state(self) -> State {
        match self {
            Phase::Closed => State::Closed,
            Phase::Open { .. } => State::Open,
            Phase::HalfOpen { .. } => State::HalfOpen,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Success,
    Failure,
    /// The permit was dropped without an outcome.
    Abandoned,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Breaker");
        // `try_lock`: formatting from inside a transition hook (which holds the lock) must
        // not deadlock.
        match self.shared.core.try_lock() {
            Ok(core) => s.field("phase", &core.phase),
            Err(_) => s.field("phase", &"<locked>"),
        };
        s.field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Breaker {
    /// A closed breaker on the system clock, or the first unusable setting.
    pub fn new(config: BreakerConfig) -> Result<Self, ConfigError> {
        Self::with_clock(config, SystemClock)
    }

    /// A closed breaker reading time from `clock` (a [`ManualClock`] in tests).
    pub fn with_clock(
        config: BreakerConfig,
        clock: impl Clock + 'static,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let clock: Arc<dyn Clock> = Arc::new(clock);
        let window = Window::new(clock.now(), config.window, config.buckets);
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                clock,
                core: Mutex::new(Core {
                    phase: Phase::Closed,
                    generation: 0,
                    window,
                    hooks: Vec::new(),
                }),
            }),
        })
    }

    /// The settings this breaker runs with.
    pub fn config(&self) -> &BreakerConfig {
        &self.shared.config
    }

    /// Where the breaker is now. An open breaker whose period has passed still reads `Open`
    /// until the next [`try_acquire`](Self::try_acquire) turns it half-open.
    pub fn state(&self) -> State {
        self.lock().phase.state()
    }

    /// Whether [`try_acquire`](Self::try_acquire) would refuse now, and for about how long:
    /// `Some` while it is open and its open period has not run out (the time left), or
    /// half-open with every probe out (`open_for`, as `try_acquire` answers); `None` when a
    /// call would be let through (closed, half-open with a probe to spare, or open but due for
    /// a probe). For a caller that decides what to attempt before asking for a permit, such as
    /// a job worker choosing which jobs to claim; it changes nothing.
    pub fn refusing_for(&self) -> Option<Duration> {
        let config = &self.shared.config;
        let core = self.lock();
        match core.phase {
            Phase::Open { until } => until
                .checked_duration_since(self.shared.clock.now())
                .filter(|left| !left.is_zero()),
            Phase::HalfOpen { issued, .. } if issued >= config.half_open_probes => {
                Some(config.open_for)
            }
            _ => None,
        }
    }

    /// Adds a hook called with `(from, to)` on every transition, in order, e.g. to set a
    /// gauge or log once. It runs while the breaker's lock is held (that is what keeps the
    /// calls in order across threads), so keep it short, and it must not call this breaker:
    /// that would deadlock.
    pub fn on_transition(&self, hook: impl Fn(State, State) + Send + Sync + 'static) {
        self.lock().hooks.push(Box::new(hook));
    }

    /// Asks to make one call. `Ok` carries the [`Permit`] to report the outcome on;
    /// `Err` means do not call, and says when asking again may succeed.
    pub fn try_acquire(&self) -> Result<Permit, BreakerOpen> {
        let config = &self.shared.config;
        let mut core = self.lock();
        let now = self.shared.clock.now();
        if let Phase::Open { until } = core.phase {
            if now < until {
                return Err(BreakerOpen {
                    retry_after: until - now,
                });
            }
            transition(
                &mut core,
                Phase::HalfOpen {
                    issued: 0,
                    succeeded: 0,
                },
            );
        }
        if let Phase::HalfOpen { issued, .. } = &mut core.phase {
            if *issued >= config.half_open_probes {
                return Err(BreakerOpen {
                    retry_after: config.open_for,
                });
            }
            *issued += 1;
        }
        Ok(Permit {
            breaker: self.clone(),
            generation: core.generation,
            settled: false,
        })
    }

    fn settle(&self, generation: u64, outcome: Outcome) {
        let config = &self.shared.config;
        let mut core = self.lock();
        if core.generation != generation {
            // Issued in a state that has since ended: its outcome says nothing about now.
            return;
        }
        let now = self.shared.clock.now();
        match core.phase {
            Phase::Closed => {
                if outcome == Outcome::Abandoned {
                    return;
                }
                let failed = outcome == Outcome::Failure;
                core.window.record(now, failed);
                if failed && core.window.tripped(now, config) {
                    let until = now + self.open_period();
                    transition(&mut core, Phase::Open { until });
                }
            }
            Phase::HalfOpen { issued, succeeded } => match outcome {
                Outcome::Success if succeeded + 1 >= config.half_open_probes => {
                    core.window.clear();
                    transition(&mut core, Phase::Closed);
                }
                Outcome::Success => {
                    core.phase = Phase::HalfOpen {
                        issued,
                        succeeded: succeeded + 1,
                    };
                }
                Outcome::Failure => {
                    let until = now + self.open_period();
                    transition(&mut core, Phase::Open { until });
                }
                Outcome::Abandoned => {
                    // Give the probe slot back, or a cancelled probe would leave the breaker
                    // half-open and refusing for ever.
                    core.phase = Phase::HalfOpen {
                        issued: issued.saturating_sub(1),
                        succeeded,
                    };
                }
            },
            // An open breaker issues no permits, so none can carry its generation.
            Phase::Open { .. } => {}
        }
    }

    /// `open_for`, lengthened by a random share of it up to `open_jitter`.
    fn open_period(&self) -> Duration {
        let config = &self.shared.config;
        if config.open_jitter == 0.0 {
            return config.open_for;
        }
        let extra = rand::rng().random_range(0.0..=config.open_jitter);
        config.open_for.mul_f64(1.0 + extra)
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        // A poisoned lock means a transition hook panicked; the state was updated before the
        // hooks ran, so it is consistent and the breaker keeps working.
        self.shared
            .core
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

fn transition(core: &mut Core, to: Phase) {
    let from = core.phase.state();
    core.phase = to;
    core.generation += 1;
    for hook in &core.hooks {
        hook(from, to.state());
    }
}

/// Leave to make one call, from [`Breaker::try_acquire`]. Report how it went with
/// [`success`](Self::success) or [`failure`](Self::failure).
///
/// A permit dropped without either counts as **neither**: dropping is what a cancelled call
/// does (its caller gave up, or the process is shutting down), which says nothing about the
/// dependency. A half-open probe dropped this way gives its slot back so that another probe
/// can go. If a timeout is how your dependency fails, call [`failure`](Self::failure) when
/// your timeout fires rather than letting the permit drop.
#[must_use = "a permit records nothing unless success() or failure() is called"]
pub struct Permit {
    breaker: Breaker,
    generation: u64,
    settled: bool,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Permit {
    /// The call succeeded.
    pub fn success(mut self) {
        self.settled = true;
        self.breaker.settle(self.generation, Outcome::Success);
    }

    /// The call failed in a way that says the dependency is unwell (a timeout, a refused
    /// connection, a 5xx), not that the request was wrong (a 4xx is usually a success here).
    pub fn failure(mut self) {
        self.settled = true;
        self.breaker.settle(self.generation, Outcome::Failure);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker.settle(self.generation, Outcome::Abandoned);
        }
    }
}

/// Outcomes over the last `window`, in `buckets` slots reused as the clock comes round.
struct Window {
    origin: Instant,
    width: Duration,
    buckets: Vec<Bucket>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which `width`-long slot since `origin` this bucket's counts belong to.
    slot: u64,
    calls: u32,
    failures: u32,
}

impl Window {
    fn new(origin: Instant, window: Duration, buckets: u32) -> Self {
        Self {
            origin,
            width: window / buckets,
            buckets: vec![Bucket::default(); buckets as usize],
        }
    }

    fn slot(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.origin).as_nanos();
        // `validate` keeps `width` at 1 ms or more; u64 slots of 1 ms last 584 million years.
        u64::try_from(since / self.width.as_nanos()).unwrap_or(u64::MAX)
    }

    fn record(&mut self, now: Instant, failed: bool) {
        let slot = self.slot(now);
        let len = self.buckets.len() as u64;
        let bucket = &mut self.buckets[(slot % len) as usize];
        if bucket.slot != slot {
            *bucket = Bucket {
                slot,
                calls: 0,
                failures: 0,
            };
        }
        bucket.calls = bucket.calls.saturating_add(1);
        if failed {
            bucket.failures = bucket.failures.saturating_add(1);
        }
    }

    /// `(calls, failures)` in the buckets still inside the window at `now`.
    fn totals(&self, now: Instant) -> (u64, u64) {
        let slot = self.slot(now);
        let len = self.buckets.len() as u64;
        self.buckets
            .iter()
            .filter(|b| b.slot <= slot && slot - b.slot < len)
            .fold((0, 0), |(calls, failures), b| {
                (calls + u64::from(b.calls), failures + u64::from(b.failures))
            })
    }

    fn tripped(&self, now: Instant, config: &BreakerConfig) -> bool {
        let (calls, failures) = self.totals(now);
        calls >= u64::from(config.minimum_calls)
            && failures as f64 / calls as f64 >= config.failure_rate_threshold
    }

    fn clear(&mut self) {
        self.buckets.fill(Bucket::default());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Barrier;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn config() -> BreakerConfig {
        BreakerConfig {
            failure_rate_threshold: 0.5,
            minimum_calls: 10,
            window: Duration::from_secs(10),
            buckets: 10,
            open_for: Duration::from_secs(5),
            open_jitter: 0.0,
            half_open_probes: 3,
        }
    }

    fn breaker(config: BreakerConfig) -> (Breaker, ManualClock) {
        let clock = ManualClock::new();
        (Breaker::with_clock(config, clock.clone()).unwrap(), clock)
    }

    fn fail(b: &Breaker, n: u32) {
        for _ in 0..n {
            b.try_acquire().unwrap().failure();
        }
    }

    fn succeed(b: &Breaker, n: u32) {
        for _ in 0..n {
            b.try_acquire().unwrap().success();
        }
    }

    /// Opens a fresh breaker: ten failures.
    fn opened(config: BreakerConfig) -> (Breaker, ManualClock) {
        let (b, clock) = breaker(config);
        fail(&b, 10);
        assert_eq!(b.state(), State::Open);
        (b, clock)
    }

    /// A transcript of the transitions a breaker reports.
    fn record_transitions(b: &Breaker) -> Arc<Mutex<Vec<(State, State)>>> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        b.on_transition(move |from, to| log.lock().unwrap().push((from, to)));
        seen
    }

    #[test]
    fn validation_names_the_unusable_field() {
        assert_eq!(config().validate(), Ok(()));
        assert_eq!(BreakerConfig::default().validate(), Ok(()));
        type Spoil = fn(&mut BreakerConfig);
        let cases: [(&str, Spoil); 12] = [
            ("failure_rate_threshold", |c| c.failure_rate_threshold = 0.0),
            ("failure_rate_threshold", |c| c.failure_rate_threshold = 1.5),
            ("failure_rate_threshold", |c| {
                c.failure_rate_threshold = f64::NAN
            }),
            ("minimum_calls", |c| c.minimum_calls = 0),
            ("window", |c| c.window = Duration::ZERO),
            ("buckets", |c| c.buckets = 0),
            ("buckets", |c| c.buckets = 1001),
            ("buckets", |c| c.window = Duration::from_millis(5)),
            ("open_for", |c| c.open_for = Duration::ZERO),
            ("open_jitter", |c| c.open_jitter = -0.1),
            ("open_jitter", |c| c.open_jitter = 2.0),
            ("half_open_probes", |c| c.half_open_probes = 0),
        ];
        for (field, spoil) in cases {
            let mut bad = config();
            spoil(&mut bad);
            let err = Breaker::new(bad).unwrap_err();
            assert_eq!(err.field(), field, "{err}");
            assert!(err.to_string().starts_with(field), "{err}");
        }
    }

    #[test]
    fn refusing_for_tells_how_long_an_open_breaker_still_refuses_without_moving_it() {
        let (b, clock) = breaker(config());
        assert_eq!(b.refusing_for(), None, "closed");
        fail(&b, 10);
        assert_eq!(b.refusing_for(), Some(Duration::from_secs(5)));
        clock.advance(Duration::from_secs(3));
        assert_eq!(b.refusing_for(), Some(Duration::from_secs(2)));
        clock.advance(Duration::from_secs(2));
        assert_eq!(b.refusing_for(), None, "due for a probe");
        assert_eq!(b.state(), State::Open, "asking moved nothing");
        let probes: Vec<Permit> = (0..3).map(|_| b.try_acquire().unwrap()).collect();
        assert_eq!(
            b.refusing_for(),
            Some(Duration::from_secs(5)),
            "half-open, every probe out"
        );
        drop(probes);
        assert_eq!(b.refusing_for(), None, "half-open, probes given back");
    }

    #[test]
    fn failures_below_the_minimum_number_of_calls_never_open_it() {
        let (b, _clock) = breaker(config());
        fail(&b, 9);
        assert_eq!(
            b.state(),
            State::Closed,
            "9 of 9 failed, but 10 calls are needed"
        );
        fail(&b, 1);
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn it_opens_when_the_failure_rate_reaches_the_threshold() {
        let (b, _clock) = breaker(config());
        succeed(&b, 6);
        fail(&b, 5);
        assert_eq!(b.state(), State::Closed, "5 of 11 is under 50 %");
        fail(&b, 1);
        assert_eq!(b.state(), State::Open, "6 of 12 is 50 %");
    }

    #[test]
    fn outcomes_older_than_the_window_are_forgotten() {
        let (b, clock) = breaker(config());
        fail(&b, 9);
        // The window is 10 s in ten 1 s buckets; past it, those nine failures are gone.
        clock.advance(Duration::from_secs(10));
        fail(&b, 9);
        assert_eq!(b.state(), State::Closed, "only 9 calls are in the window");

        // Buckets expire one by one: failures 5 s old still count, 10 s old ones do not.
        clock.advance(Duration::from_secs(5));
        fail(&b, 1);
        assert_eq!(b.state(), State::Open, "9 + 1 failures within 10 s");
    }

    #[test]
    fn successes_in_the_window_keep_it_closed() {
        let (b, clock) = breaker(config());
        for _ in 0..30 {
            succeed(&b, 2);
            fail(&b, 1);
            clock.advance(Duration::from_millis(700));
        }
        assert_eq!(
            b.state(),
            State::Closed,
            "a third failing is under the threshold"
        );
    }

    #[test]
    fn open_refuses_until_open_for_has_passed_then_half_opens() {
        let (b, clock) = opened(config());
        let seen = record_transitions(&b);
        assert_eq!(
            b.try_acquire().unwrap_err(),
            BreakerOpen {
                retry_after: Duration::from_secs(5)
            }
        );
        clock.advance(Duration::from_secs(3));
        assert_eq!(
            b.try_acquire().unwrap_err().retry_after,
            Duration::from_secs(2)
        );
        clock.advance(Duration::from_secs(2) - Duration::from_nanos(1));
        assert!(b.try_acquire().is_err(), "one nanosecond early");
        assert_eq!(b.state(), State::Open);

        clock.advance(Duration::from_nanos(1));
        assert_eq!(
            b.state(),
            State::Open,
            "no timer: it moves on the next call"
        );
        let probe = b.try_acquire().unwrap();
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(*seen.lock().unwrap(), vec![(State::Open, State::HalfOpen)]);
        drop(probe);
    }

    #[test]
    fn half_open_lets_through_only_the_probe_limit() {
        let (b, clock) = opened(config());
        clock.advance(5 * SEC);
        let probes: Vec<Permit> = (0..3).map(|_| b.try_acquire().unwrap()).collect();
        assert_eq!(
            b.try_acquire().unwrap_err(),
            BreakerOpen {
                retry_after: Duration::from_secs(5)
            },
            "the fourth call waits for the probes"
        );
        assert_eq!(b.state(), State::HalfOpen);
        probes.into_iter().for_each(Permit::success);
    }

    #[test]
    fn half_open_closes_when_every_probe_succeeds_with_an_empty_window() {
        let (b, clock) = opened(config());
        let seen = record_transitions(&b);
        clock.advance(5 * SEC);
        let probes: Vec<Permit> = (0..3).map(|_| b.try_acquire().unwrap()).collect();
        let mut probes = probes.into_iter();
        probes.next().unwrap().success();
        probes.next().unwrap().success();
        assert_eq!(
            b.state(),
            State::HalfOpen,
            "two of three probes are not enough"
        );
        probes.next().unwrap().success();
        assert_eq!(b.state(), State::Closed);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                (State::Open, State::HalfOpen),
                (State::HalfOpen, State::Closed)
            ]
        );
        // The failures that opened it are still inside the 10 s window, but a closed
        // breaker starts counting afresh: one failure does not reopen it.
        fail(&b, 1);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn half_open_reopens_on_the_first_failed_probe() {
        let (b, clock) = opened(config());
        let seen = record_transitions(&b);
        clock.advance(5 * SEC);
        let first = b.try_acquire().unwrap();
        let second = b.try_acquire().unwrap();
        first.success();
        second.failure();
        assert_eq!(b.state(), State::Open);
        assert_eq!(
            b.try_acquire().unwrap_err().retry_after,
            5 * SEC,
            "a full new period"
        );
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                (State::Open, State::HalfOpen),
                (State::HalfOpen, State::Open)
            ]
        );
    }

    #[test]
    fn a_dropped_permit_counts_as_neither_and_frees_its_probe_slot() {
        let (b, _clock) = breaker(config());
        for _ in 0..50 {
            drop(b.try_acquire().unwrap());
        }
        fail(&b, 9);
        assert_eq!(
            b.state(),
            State::Closed,
            "dropped permits were not counted as calls"
        );

        let (b, clock) = opened(config());
        clock.advance(5 * SEC);
        let probes: Vec<Permit> = (0..3).map(|_| b.try_acquire().unwrap()).collect();
        assert!(b.try_acquire().is_err());
        drop(probes);
        assert_eq!(b.state(), State::HalfOpen, "cancelled probes say nothing");
        succeed(&b, 3);
        assert_eq!(b.state(), State::Closed, "their slots went to new probes");
    }

    #[test]
    fn a_permit_from_an_earlier_state_is_ignored() {
        let (b, clock) = breaker(config());
        let slow_failure = b.try_acquire().unwrap();
        let slow_success = b.try_acquire().unwrap();
        fail(&b, 10);
        clock.advance(5 * SEC);
        let probe = b.try_acquire().unwrap();
        assert_eq!(b.state(), State::HalfOpen);
        // A call from before the breaker opened ends now: it must not reopen the breaker…
        slow_failure.failure();
        assert_eq!(b.state(), State::HalfOpen);
        // …nor count as a probe's success.
        slow_success.success();
        probe.success();
        assert_eq!(b.state(), State::HalfOpen, "one probe of three succeeded");
    }

    #[test]
    fn jitter_lengthens_the_open_period_by_at_most_its_share() {
        for _ in 0..20 {
            let (b, _clock) = opened(BreakerConfig {
                open_jitter: 0.5,
                ..config()
            });
            let wait = b.try_acquire().unwrap_err().retry_after;
            assert!(
                wait >= 5 * SEC && wait <= Duration::from_millis(7500),
                "{wait:?}"
            );
        }
    }

    #[test]
    fn the_hook_sees_every_transition_in_order() {
        let (b, clock) = breaker(config());
        let seen = record_transitions(&b);
        fail(&b, 10);
        clock.advance(5 * SEC);
        b.try_acquire().unwrap().failure();
        clock.advance(5 * SEC);
        succeed(&b, 3);
        use State::*;
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                (Closed, Open),
                (Open, HalfOpen),
                (HalfOpen, Open),
                (Open, HalfOpen),
                (HalfOpen, Closed)
            ]
        );
    }

    #[test]
    fn clones_share_one_state() {
        let (b, _clock) = breaker(config());
        let clone = b.clone();
        fail(&clone, 10);
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn concurrent_failures_open_it_exactly_once() {
        let (b, _clock) = breaker(config());
        let opens = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&opens);
        b.on_transition(move |_, to| {
            if to == State::Open {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
        let start = Arc::new(Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let b = b.clone();
                let start = Arc::clone(&start);
                std::thread::spawn(move || {
                    start.wait();
                    let mut refused = 0;
                    for _ in 0..1000 {
                        match b.try_acquire() {
                            Ok(permit) => permit.failure(),
                            Err(_) => refused += 1,
                        }
                    }
                    refused
                })
            })
            .collect();
        let refused: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(b.state(), State::Open);
        assert_eq!(
            opens.load(Ordering::SeqCst),
            1,
            "one transition, however many threads"
        );
        // The clock never moves: once open, every later call was refused. At most the calls
        // already holding a permit when it opened (one per thread) got through after it.
        assert!(refused >= 8000 - 10 - 8, "refused {refused}");
    }

    #[test]
    fn concurrent_callers_never_get_more_than_the_probe_limit() {
        let (b, clock) = opened(config());
        clock.advance(5 * SEC);
        let start = Arc::new(Barrier::new(16));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let b = b.clone();
                let start = Arc::clone(&start);
                std::thread::spawn(move || {
                    start.wait();
                    b.try_acquire().ok()
                })
            })
            .collect();
        // Every thread keeps its permit until all have asked, so none frees a slot early.
        let permits: Vec<Permit> = threads
            .into_iter()
            .filter_map(|t| t.join().unwrap())
            .collect();
        assert_eq!(permits.len(), 3);
        permits.into_iter().for_each(Permit::success);
        assert_eq!(b.state(), State::Closed);
    }
}
