//! A rolling restart without loss (P20 graceful shutdown, P21 readiness), natively: every
//! service of the journey is replaced by a new process, one at a time, while orders flow, and
//! no request fails, no accepted order is lost, and keelctl's audit passes.
//!
//! Clients, checkout's saga and psp-sim's webhooks reach the services through readiness-aware
//! balancers ([`keel_testkit::Balancer`], wired by [`Rolling`]), as they reach pods through a
//! Kubernetes Service. A loop places an order every [`TICK`] through checkout's balancer for the
//! whole rollout. Failure first: a naive rollout of checkout alone, the old instance stopped
//! before the new one is started (what `maxUnavailable: 1, maxSurge: 0` does to one replica),
//! refuses the requests that arrive while no instance is ready. Then Keel's rollout, the one a
//! Deployment with `maxSurge: 1, maxUnavailable: 0`, a readiness probe on `/readyz` and a drain
//! delay does: for each service a new instance first, routed once its `/readyz` is 200, and only
//! then SIGTERM to the old one, which turns `/readyz` 503, keeps serving through its drain delay
//! while the balancer takes it out, finishes what it holds and exits 0 within its shutdown
//! bound. psp-sim is not rolled: it plays an external provider whose state lives in its memory
//! (the module docs of [`keel_e2e::rolling`] say why any rollout of it would lose some).
//!
//! The mapping to Kubernetes is in `docs/patterns/p20-graceful-shutdown.md` ("Rolling restart").
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keel_e2e::rolling::{DRAIN_DELAY, Role, Rolling};
use keel_e2e::{Examines, Options, order_body};
use keel_testkit::{ServiceProcess, eventually};
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

/// One order every this often: 20 a second, for the whole rollout.
const TICK: Duration = Duration::from_millis(50);

/// The loop's bound: 30 s of orders, far more than either rollout needs.
const MAX_POSTS: usize = 600;

/// Orders accepted before a rollout begins and after it ends: it happens while orders flow.
const FLOWING: usize = 20;

/// How long an accepted order may take to reach its final state and its notification.
const SETTLE: Duration = Duration::from_secs(40);

/// The SKUs the loop orders from in turn (1,000 in stock each): one of each per four orders.
const SKUS: [&str; 4] = ["KEEL-MUG", "KEEL-BOOK", "KEEL-STICKERS", "KEEL-TEE-M"];

/// One POST of the order loop: when it was sent, and the order's id (202) or what failed.
struct Post {
    at: Instant,
    outcome: Result<String, String>,
}

/// Orders flowing through checkout's balancer: one POST every [`TICK`], each with a fresh
/// Idempotency-Key, until stopped or [`MAX_POSTS`].
struct OrderFlow {
    stop: CancellationToken,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<Vec<Post>>,
}

impl OrderFlow {
    fn start(r: &Rolling) -> Self {
        // A connection per request, as many independent clients would open: the balancer
        // (like kube-proxy) balances connections, so each request is routed afresh. A kept-alive
        // connection would stay with its instance until that instance closes it at the end of
        // its drain, and a request sent at that very instant would race the close: Keel's
        // servers close idle connections when their listeners stop, but do not answer
        // `Connection: close` during the drain delay, which would move a pooling client over
        // without that (narrow) race.
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let url = format!("{}/v1/orders", r.checkout_url());
        let api_key = r.journey.api_key.clone();
        let (stop, accepted) = (CancellationToken::new(), Arc::new(AtomicUsize::new(0)));
        let task = tokio::spawn({
            let (stop, accepted) = (stop.clone(), accepted.clone());
            async move {
                let mut posts = Vec::new();
                let mut tick = tokio::time::interval(TICK);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for i in 0..MAX_POSTS {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    let body = order_body("tok_approve", &[(SKUS[i % SKUS.len()], 1)]);
                    let at = Instant::now();
                    let r = client
                        .post(&url)
                        .bearer_auth(&api_key)
                        .header("Idempotency-Key", uuid::Uuid::new_v4().to_string())
                        .json(&body)
                        .send()
                        .await;
                    let outcome = match r {
                        Ok(resp) if resp.status() == 202 => {
                            let v: serde_json::Value = resp.json().await.unwrap();
                            accepted.fetch_add(1, Ordering::SeqCst);
                            Ok(v["id"].as_str().unwrap().to_owned())
                        }
                        Ok(resp) => Err(format!("answered {}", resp.status())),
                        Err(e) => Err(format!("{e:?}")),
                    };
                    posts.push(Post { at, outcome });
                }
                posts
            }
        });
        Self {
            stop,
            accepted,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until `n` orders in all have been accepted.
    async fn wait_accepted(&self, n: usize) {
        eventually(
            Duration::from_secs(30),
            &format!("{n} orders accepted"),
            || async { (self.accepted() >= n).then_some(()) },
        )
        .await;
    }

    /// Stops the loop; every POST it sent. Asserts it was still running: orders flowed until
    /// the end, not until the bound.
    async fn stop(self) -> Vec<Post> {
        self.stop.cancel();
        let posts = self.task.await.unwrap();
        assert!(
            posts.len() < MAX_POSTS,
            "the order loop reached its bound of {MAX_POSTS} before the rollout ended"
        );
        posts
    }
}

/// What the loop saw: the accepted orders' ids and the failures.
struct Tally {
    accepted: Vec<String>,
    failed: Vec<String>,
}

fn tally(posts: &[Post]) -> Tally {
    let (ok, failed): (Vec<_>, Vec<_>) = posts.iter().partition(|p| p.outcome.is_ok());
    Tally {
        accepted: ok.into_iter().map(|p| p.outcome.clone().unwrap()).collect(),
        failed: failed
            .into_iter()
            .map(|p| p.outcome.clone().unwrap_err())
            .collect(),
    }
}

fn sent_between(posts: &[Post], from: Instant, to: Instant) -> usize {
    posts.iter().filter(|p| p.at >= from && p.at < to).count()
}

/// Nothing accepted is lost, and nothing refused was created: every accepted order reaches
/// `CONFIRMED` (every order pays with an approving card) and its notification, checkout holds
/// exactly the accepted orders, and keelctl's audit passes with every journey check fed.
async fn assert_no_order_lost(r: &Rolling, accepted: &[String]) {
    for id in accepted {
        assert_eq!(r.journey.final_state(id, SETTLE).await, "CONFIRMED", "{id}");
        r.journey.notified(id).await;
    }
    let mut db = PgConnection::connect(&r.journey.checkout_db.admin_url())
        .await
        .unwrap();
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(
        usize::try_from(orders).unwrap(),
        accepted.len(),
        "one order per 202"
    );
    r.journey
        .assert_audit_passes(&Examines::journey().confirmed())
        .await;
}

/// Waits for `p`, signalled at `since`, to exit; asserts it exited 0 within `bound` of the
/// signal after a clean drain. Returns how long the stop took.
async fn wait_clean_exit(p: &mut ServiceProcess, since: Instant, bound: Duration) -> Duration {
    // `wait` panics past the bound.
    let status = p.wait(bound.saturating_sub(since.elapsed())).await;
    let took = since.elapsed();
    assert!(status.success(), "exit 0 after SIGTERM, got {status}");
    assert!(
        took <= bound,
        "stopped in {took:?}, over its bound {bound:?}"
    );
    // The exit can be seen before the last lines are read from its stdout.
    let stopped = eventually(Duration::from_secs(5), "the `stopped` log line", || async {
        p.logs()
            .into_iter()
            .find(|l| l.contains(r#""message":"stopped""#))
    })
    .await;
    assert!(
        stopped.contains(r#""drained":"Clean""#),
        "every stage finished within its bound: {stopped}"
    );
    took
}

/// What each balancer refused (no instance ready) and could not deliver (the instance it
/// chose did not accept the connection).
fn balancer_counts(r: &Rolling) -> String {
    r.balancers()
        .iter()
        .map(|(hop, lb)| {
            format!(
                "{hop} {} refused, {} unreachable",
                lb.refused(),
                lb.unreachable()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The failure side: checkout rolled the naive way, the old instance stopped (gracefully, with
/// its drain) before the new one is started. Between the old one's readiness turning false and
/// the new one's turning true, no instance is ready, and the balancer refuses every request
/// that arrives, as a Service with no ready endpoints does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_checkout_before_starting_its_replacement_fails_requests() {
    let mut r = Rolling::start(Options::default()).await;
    let orders = OrderFlow::start(&r);
    orders.wait_accepted(FLOWING).await;

    let began = Instant::now();
    let bound = r.shutdown_bound(Role::Checkout);
    r.process(Role::Checkout).signal("TERM");
    let stopped_in = wait_clean_exit(r.process_mut(Role::Checkout), Instant::now(), bound).await;
    let new = r.spawn(Role::Checkout).await;
    let old = r.replace(Role::Checkout, new);
    r.unroute(Role::Checkout, &old);
    r.route(Role::Checkout, r.process(Role::Checkout));
    r.wait_routed(Role::Checkout, r.process(Role::Checkout))
        .await;
    let took = began.elapsed();
    orders.wait_accepted(orders.accepted() + FLOWING).await;
    let posts = orders.stop().await;

    let t = tally(&posts);
    let during = sent_between(&posts, began, began + took);
    eprintln!(
        "naive rollout of checkout (stop, then start): {} POSTs sent, {} accepted, {} failed \
         ({during} sent during the {took:?} restart, old instance stopped in {stopped_in:?}; \
         balancers: {}); e.g. {:?}",
        posts.len(),
        t.accepted.len(),
        t.failed.len(),
        balancer_counts(&r),
        t.failed.first()
    );
    assert!(
        !t.failed.is_empty(),
        "requests fail while no instance is ready"
    );
    // What is lost is requests, never accepted orders: P20 and the saga keep those.
    assert_no_order_lost(&r, &t.accepted).await;
}

/// One service's turn in Keel's rollout.
struct Restart {
    role: Role,
    began: Instant,
    took: Duration,
    stopped_in: Duration,
}

/// Replaces `role`'s instance: the new one first (maxSurge 1), the old one only once the new
/// one takes traffic (maxUnavailable 0).
async fn roll(r: &mut Rolling, role: Role) -> Restart {
    let began = Instant::now();
    let new = r.spawn(role).await;
    r.wait_ready(&new).await;
    r.route(role, &new);
    r.wait_routed(role, &new).await;

    let bound = r.shutdown_bound(role);
    let mut old = r.replace(role, new);
    old.signal("TERM");
    let term = Instant::now();
    // Readiness turns false at the signal while the listeners still serve (the drain delay),
    // and the balancers take the old instance out before they close.
    let readyz = format!("{}/readyz", old.base_url());
    eventually(
        DRAIN_DELAY,
        "the old instance's /readyz answers 503",
        || async {
            let r = reqwest::get(&readyz).await.ok()?;
            (r.status() == 503).then_some(())
        },
    )
    .await;
    eventually(
        DRAIN_DELAY,
        "the balancers stop routing to the old instance",
        || async { (!r.routes_any_to(role, &old)).then_some(()) },
    )
    .await;
    let stopped_in = wait_clean_exit(&mut old, term, bound).await;
    r.unroute(role, &old);
    Restart {
        role,
        began,
        took: began.elapsed(),
        stopped_in,
    }
}

/// Keel's rollout, of every service in turn, while orders flow: zero failed requests, zero lost
/// orders, and keelctl's audit passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_every_service_with_surge_and_readiness_fails_no_request_and_loses_no_order() {
    let mut r = Rolling::start(Options::default()).await;
    let orders = OrderFlow::start(&r);
    orders.wait_accepted(FLOWING).await;

    let mut restarts = Vec::new();
    for role in Role::ALL {
        restarts.push(roll(&mut r, role).await);
    }
    // The new instances take the orders from here on.
    orders.wait_accepted(orders.accepted() + FLOWING).await;
    let posts = orders.stop().await;

    let t = tally(&posts);
    let each: Vec<String> = restarts
        .iter()
        .map(|s| {
            let during = sent_between(&posts, s.began, s.began + s.took);
            format!(
                "{} {:?} (old stopped in {:?}, {during} POSTs sent meanwhile)",
                s.role.name(),
                s.took,
                s.stopped_in
            )
        })
        .collect();
    eprintln!(
        "Keel rollout: {} POSTs sent, {} accepted, {} failed; {}; balancers: {}",
        posts.len(),
        t.accepted.len(),
        t.failed.len(),
        each.join("; "),
        balancer_counts(&r)
    );
    for s in &restarts {
        assert!(
            sent_between(&posts, s.began, s.began + s.took) > 0,
            "orders flowed while {} restarted",
            s.role.name()
        );
    }
    assert!(
        t.failed.is_empty(),
        "{} of {} requests failed: {:?}",
        t.failed.len(),
        posts.len(),
        &t.failed[..t.failed.len().min(5)]
    );
    // Nor did any hop lose a connection, those whose callers retry included (checkout's saga
    // calling billing, psp-sim's webhooks): no balancer was left without a ready instance, and
    // none sent a connection to an instance that no longer accepted it.
    for (hop, lb) in r.balancers() {
        assert_eq!(
            (lb.refused(), lb.unreachable()),
            (0, 0),
            "{hop}: connections refused, unreachable"
        );
    }
    assert_no_order_lost(&r, &t.accepted).await;
    eprintln!(
        "all {} accepted orders confirmed and notified",
        t.accepted.len()
    );
}
