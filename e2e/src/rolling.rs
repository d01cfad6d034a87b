//! A journey whose services can be replaced one at a time while orders flow: the harness of the
//! rolling restart (P20 graceful shutdown, P21 readiness), `e2e/tests/rollout.rs`.
//!
//! [`Rolling::start`] starts the same four binaries as [`Journey::start`], each on its own
//! database and the journey's vhost, but every hop that a restart would otherwise break goes
//! through a readiness-aware [`Balancer`] (keel-testkit), as it goes through a Kubernetes
//! Service in a cluster, instead of straight to one process:
//! - clients → checkout's HTTP API ([`Rolling::checkout_url`]);
//! - checkout's saga → billing's gRPC API (still behind [`Journey::billing_link`], so a test
//!   can cut it as in every journey);
//! - psp-sim's capture webhooks → billing's HTTP port.
//!
//! Both of billing's balancers route by billing's `/readyz`, the one readiness of the process.
//! notification has no client-facing hop: it consumes the journey's queue, which an old and a
//! new instance share while both run, so it needs no balancer.
//!
//! psp-sim is never rolled, and billing reaches it directly. It plays an external payment
//! provider, a deployment that is not Keel's, and keeps its authorizations, idempotency keys and
//! queued webhooks in memory (`services/psp-sim/src/store.rs`): a second instance answers a
//! capture of an authorization the first one made with 404, and a stopped one abandons the
//! webhooks it has queued. Any rollout of a process whose state lives in its memory loses some
//! of it; Keel's services keep theirs in Postgres and RabbitMQ, which is what lets them roll.
//!
//! The rollout itself, which instance starts and stops when, is the test's: this module gives
//! it the parts. [`Rolling::spawn`] starts a new instance of a [`Role`] on port 0 with the
//! role's configuration, [`Rolling::route`] adds it to the role's balancers,
//! [`Rolling::replace`] makes it the journey's instance, and [`Rolling::shutdown_bound`] is the
//! longest a graceful stop of the role may take, from the configuration the process loads.
//!
//! Must not break: every rolled service runs with `shutdown.drain_delay` = [`DRAIN_DELAY`],
//! longer than the balancer may take to see a 503 (`FAILURE_THRESHOLD * (PROBE_INTERVAL +
//! PROBE_TIMEOUT)`). Shorter, the listener could close while the balancer still routes new
//! connections to it.

use std::net::SocketAddr;
use std::time::Duration;

use keel_testkit::balancer::{FAILURE_THRESHOLD, PROBE_INTERVAL, PROBE_TIMEOUT};
use keel_testkit::{Balancer, ServiceProcess, eventually};

use crate::{Journey, Options, billing_env, bin, logged_addr, notification_env, own_data, psp_env};

/// `shutdown.drain_delay` of every rolled service: readiness is false this long before its
/// listeners close. The balancer usually sees the 503 within half a second; this covers its
/// worst case (two probes in a row that time out) with room to spare.
pub const DRAIN_DELAY: Duration = Duration::from_secs(3);

const _: () = assert!(
    DRAIN_DELAY.as_millis()
        > FAILURE_THRESHOLD as u128 * (PROBE_INTERVAL.as_millis() + PROBE_TIMEOUT.as_millis()),
    "the drain delay must outlast the balancer's slowest view of a 503"
);

/// A service of the journey that can be rolled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Checkout,
    Billing,
    Notification,
}

impl Role {
    /// Every rolled service, in the order a rollout takes them.
    pub const ALL: [Role; 3] = [Role::Checkout, Role::Billing, Role::Notification];

    /// The binary's name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Checkout => "checkout",
            Role::Billing => "billing",
            Role::Notification => "notification",
        }
    }
}

/// A journey behind balancers; see the module docs. Everything stops when it is dropped.
#[derive(Debug)]
pub struct Rolling {
    /// The journey; its `checkout`, `billing` and `notification` are the current instances.
    pub journey: Journey,
    checkout_lb: Balancer,
    billing_grpc_lb: Balancer,
    billing_http_lb: Balancer,
    billing_env: Vec<(String, String)>,
    notification_env: Vec<(String, String)>,
}

impl Rolling {
    /// Starts the journey behind its balancers; returns once every service is ready and
    /// routed to.
    pub async fn start(options: Options) -> Self {
        let data = own_data().await;
        let checkout_lb = Balancer::start().await;
        let billing_grpc_lb = Balancer::start().await;
        let billing_http_lb = Balancer::start().await;

        // The balancers exist before their backends, so psp-sim can start first with billing's
        // webhook address, and billing with psp-sim's address: no port is reserved in advance.
        let psp = ServiceProcess::spawn(
            &bin("psp-sim"),
            &[],
            &psp_env(
                &options,
                0,
                &format!("{}/v1/webhooks/psp", billing_http_lb.url()),
            ),
        )
        .await;
        let billing_env = billing_env(&data.billing_db, DRAIN_DELAY, &psp.base_url(), &data.vhost);
        let billing = ServiceProcess::spawn(&bin("billing"), &[], &billing_env).await;
        // checkout reaches billing's gRPC through its balancer, behind the journey's link.
        let journey = Journey::complete(
            data,
            &options,
            DRAIN_DELAY,
            psp,
            billing,
            billing_grpc_lb.addr(),
        )
        .await;
        // The same environment `complete` gave notification, for its replacements.
        let notification_env =
            notification_env(&journey.notification_db, DRAIN_DELAY, &journey.vhost);
        let rolling = Self {
            journey,
            checkout_lb,
            billing_grpc_lb,
            billing_http_lb,
            billing_env,
            notification_env,
        };
        for role in Role::ALL {
            let p = rolling.process(role);
            rolling.route(role, p);
            rolling.wait_routed(role, p).await;
        }
        rolling
    }

    /// Where clients reach checkout: its balancer.
    pub fn checkout_url(&self) -> String {
        self.checkout_lb.url()
    }

    /// Every balancer, by the hop it carries: what a test reads their counters from.
    pub fn balancers(&self) -> [(&'static str, &Balancer); 3] {
        [
            ("clients → checkout", &self.checkout_lb),
            ("checkout → billing gRPC", &self.billing_grpc_lb),
            ("psp-sim → billing webhooks", &self.billing_http_lb),
        ]
    }

    /// The journey's current instance of `role`.
    pub fn process(&self, role: Role) -> &ServiceProcess {
        match role {
            Role::Checkout => &self.journey.checkout,
            Role::Billing => &self.journey.billing,
            Role::Notification => &self.journey.notification,
        }
    }

    /// The journey's current instance of `role`, to wait for or signal.
    pub fn process_mut(&mut self, role: Role) -> &mut ServiceProcess {
        match role {
            Role::Checkout => &mut self.journey.checkout,
            Role::Billing => &mut self.journey.billing,
            Role::Notification => &mut self.journey.notification,
        }
    }

    /// Starts a new instance of `role` (port 0, the role's configuration) and returns once it
    /// logged its address; it is neither waited for nor routed to.
    pub async fn spawn(&self, role: Role) -> ServiceProcess {
        ServiceProcess::spawn(&bin(role.name()), &[], self.env(role)).await
    }

    /// The variables every instance of `role` starts with.
    fn env(&self, role: Role) -> &[(String, String)] {
        match role {
            Role::Checkout => &self.journey.checkout_env,
            Role::Billing => &self.billing_env,
            Role::Notification => &self.notification_env,
        }
    }

    /// Waits (bounded) until `p`'s `/readyz` answers 200.
    pub async fn wait_ready(&self, p: &ServiceProcess) {
        self.journey.wait_ready(&p.base_url()).await;
    }

    /// The balancers that route to an instance of `role`, each with the address it forwards to
    /// on instance `p`.
    fn links(&self, role: Role, p: &ServiceProcess) -> Vec<(&Balancer, SocketAddr)> {
        match role {
            Role::Checkout => vec![(&self.checkout_lb, p.addr)],
            Role::Billing => vec![
                (&self.billing_grpc_lb, logged_addr(p, "grpc_addr")),
                (&self.billing_http_lb, p.addr),
            ],
            Role::Notification => vec![],
        }
    }

    /// Adds instance `p` to `role`'s balancers; each routes to it once its `/readyz` answers 200.
    pub fn route(&self, role: Role, p: &ServiceProcess) {
        let readyz = format!("{}/readyz", p.base_url());
        for (lb, addr) in self.links(role, p) {
            lb.add(addr, &readyz);
        }
    }

    /// Whether every balancer of `role` routes new connections to `p` now.
    pub fn routes_to(&self, role: Role, p: &ServiceProcess) -> bool {
        self.links(role, p)
            .iter()
            .all(|(lb, addr)| lb.routes_to(*addr))
    }

    /// Whether any balancer of `role` still routes new connections to `p`.
    pub fn routes_any_to(&self, role: Role, p: &ServiceProcess) -> bool {
        self.links(role, p)
            .iter()
            .any(|(lb, addr)| lb.routes_to(*addr))
    }

    /// Waits (bounded) until every balancer of `role` routes to `p`.
    pub async fn wait_routed(&self, role: Role, p: &ServiceProcess) {
        eventually(
            Duration::from_secs(10),
            &format!("the {} balancers route to {}", role.name(), p.addr),
            || async { self.routes_to(role, p).then_some(()) },
        )
        .await;
    }

    /// Removes instance `p` (gone) from `role`'s balancers.
    pub fn unroute(&self, role: Role, p: &ServiceProcess) {
        for (lb, addr) in self.links(role, p) {
            lb.remove(addr);
        }
    }

    /// Makes `new` the journey's instance of `role`; returns the one it replaces.
    pub fn replace(&mut self, role: Role, new: ServiceProcess) -> ServiceProcess {
        std::mem::replace(self.process_mut(role), new)
    }

    /// The longest a graceful stop of `role` may take, every stage at its bound
    /// (`ShutdownConfig::total`), from the configuration its processes load.
    pub fn shutdown_bound(&self, role: Role) -> Duration {
        let env: Vec<(&str, &str)> = self
            .env(role)
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        match role {
            Role::Checkout => {
                keel_testkit::config::<checkout::Config>(checkout::DEFAULT_CONFIG, &env)
                    .shutdown
                    .total()
            }
            Role::Billing => keel_testkit::config::<billing::Config>(billing::DEFAULT_CONFIG, &env)
                .shutdown
                .total(),
            Role::Notification => keel_testkit::config::<notification::config::Config>(
                notification::DEFAULT_CONFIG,
                &env,
            )
            .shutdown
            .total(),
        }
    }
}
