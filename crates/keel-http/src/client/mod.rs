//! Outbound HTTP to addresses that customers choose: the client that delivers webhooks (P33,
//! webhook delivery) without becoming a way into Keel's own network (SSRF).
//!
//! A customer registers a URL and Keel POSTs events to it. Whoever controls the URL controls
//! where Keel's servers connect: `http://169.254.169.254/` (cloud credentials),
//! `http://localhost:15672/` (the broker's admin API), `http://10.0.3.7:5432/`, or a name that
//! resolves to any of those — at registration, or only later (DNS rebinding). The pieces:
//! - [`ranges`]: which addresses are never a webhook destination (loopback, private,
//!   link-local, CGNAT, documentation, multicast, reserved, and the IPv6 forms that embed
//!   such an IPv4 address);
//! - [`EgressPolicy`]: those ranges minus an explicit allow-list of [`Cidr`]s (development
//!   only), and [`EgressPolicy::check_url`] for registration;
//! - the guarded resolver (`resolve.rs`): at delivery, names resolve only to allowed
//!   addresses, and reqwest connects only to what it returns;
//! - [`WebhookClient`]: one POST with IP literals checked, no proxy, no redirects, bounded
//!   time and a bounded read of the answer.
//!
//! Written by hand, not taken from a crate: the guard is the lesson, and it must be read to be
//! trusted. Signing is not here: the caller passes ready-made headers (see
//! `keel_webhooks::send::signed_headers`). Queueing, retries and the per-endpoint circuit
//! breaker are the delivery service's (notification), around [`WebhookClient::post`].
//!
//! Must not break: no byte leaves for a forbidden address. Every path to a socket goes through
//! [`EgressPolicy::check_ip`] on the address actually connected to: literals before sending,
//! names inside the resolver, and nothing else (no proxy, no redirect) can pick an address.

mod cidr;
mod policy;
pub mod ranges;
mod resolve;
mod webhook;

pub use cidr::{Cidr, CidrError};
pub use policy::{EgressError, EgressPolicy};
pub use ranges::forbidden_range;
pub use webhook::{
    BuildError, DeliveryError, DeliveryLimits, DeliveryResponse, Stage, WebhookClient,
};
