//! The egress policy: which URLs a customer may register for webhooks and which addresses a
//! delivery may connect to (SSRF guard).
//!
//! Two checks with two purposes:
//! - [`EgressPolicy::check_url`], at registration: the URL's shape (http or https, no
//!   user-info, a host) and every address its host resolves to **now**. Any forbidden address
//!   refuses the URL, so a customer learns at once that `http://localhost:6379/` or a name
//!   pointing into the cluster is not a webhook endpoint. It proves nothing about later
//!   deliveries: DNS can change after registration (rebinding).
//! - [`EgressPolicy::check_ip`], at delivery, on the addresses actually connected to: the
//!   guarded resolver (`resolve.rs`) filters what DNS answers through it, and IP-literal URLs
//!   are checked directly. That check is the one that protects the network.
//!
//! Must not break: forbidden unless public ([`forbidden_range`](super::forbidden_range)) or
//! inside an explicitly configured allow-list entry.

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use url::{Host, Url};

use super::Cidr;
use super::ranges::forbidden_range;

/// Where webhooks may go. In configuration:
///
/// ```toml
/// [webhooks.egress]
/// allow = ["127.0.0.0/8", "::1/128"]   # development only: lets deliveries reach localhost
/// dns_timeout = "2s"
/// ```
///
/// The default allows no special-purpose range at all, which is what production wants.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressPolicy {
    /// Ranges let through although they are forbidden by default. Checked first, so
    /// `127.0.0.0/8` lets a developer deliver to a receiver on their laptop. IPv4-mapped IPv6
    /// addresses (`::ffff:127.0.0.1`) match IPv4 entries. In an environment variable, a
    /// comma-separated list (`127.0.0.0/8,::1/128`).
    #[serde(deserialize_with = "keel_config::list")]
    pub allow: Vec<Cidr>,
    /// Longest wait for one DNS lookup, at registration and at delivery.
    #[serde(with = "keel_config::duration")]
    pub dns_timeout: Duration,
}

impl Default for EgressPolicy {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            dns_timeout: Duration::from_secs(2),
        }
    }
}

/// Why a URL or an address is refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EgressError {
    #[error("scheme `{0}` is not allowed; webhooks use http or https")]
    Scheme(String),
    #[error("a webhook URL may not carry a user name or password")]
    Userinfo,
    #[error("the URL has no host")]
    NoHost,
    #[error("{addr} is not an allowed destination: {range}")]
    Forbidden { addr: IpAddr, range: &'static str },
    /// The lookup failed, timed out (`ErrorKind::TimedOut`) or found no address.
    #[error("could not resolve `{host}`")]
    Dns {
        host: String,
        #[source]
        source: Arc<io::Error>,
    },
}

/// The host part of a URL whose shape passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target<'a> {
    Ip(IpAddr),
    Domain(&'a str),
}

impl EgressPolicy {
    /// A policy with this allow-list and the default DNS timeout.
    pub fn allowing(allow: impl IntoIterator<Item = Cidr>) -> Self {
        Self {
            allow: allow.into_iter().collect(),
            ..Self::default()
        }
    }

    /// Whether a connection to `ip` is allowed.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), EgressError> {
        // `to_canonical` unwraps ::ffff:a.b.c.d, so an IPv4 allow entry covers both spellings.
        let canonical = ip.to_canonical();
        if self
            .allow
            .iter()
            .any(|c| c.contains(ip) || c.contains(canonical))
        {
            return Ok(());
        }
        match forbidden_range(ip) {
            None => Ok(()),
            Some(range) => Err(EgressError::Forbidden { addr: ip, range }),
        }
    }

    /// The registration check: shape, then every address the host resolves to now (an IP
    /// literal is its own address, including the decimal, octal and hex spellings such as
    /// `http://2130706433/` that the `url` crate normalises to `127.0.0.1`).
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// use keel_http::client::{EgressError, EgressPolicy};
    ///
    /// let policy = EgressPolicy::default();
    /// let url = url::Url::parse("http://169.254.169.254/latest/meta-data/")?;
    /// assert!(matches!(policy.check_url(&url).await, Err(EgressError::Forbidden { .. })));
    /// # Ok(()) }
    /// ```
    pub async fn check_url(&self, url: &Url) -> Result<(), EgressError> {
        match target(url)? {
            Target::Ip(ip) => self.check_ip(ip),
            Target::Domain(host) => {
                for ip in self.lookup(host).await? {
                    self.check_ip(ip)?;
                }
                Ok(())
            }
        }
    }

    /// Every address `host` resolves to, within `dns_timeout`; never empty.
    pub(crate) async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, EgressError> {
        let dns = |source: io::Error| EgressError::Dns {
            host: host.to_owned(),
            source: Arc::new(source),
        };
        // Port 0: only the addresses matter; the connection uses the URL's port.
        let lookup = tokio::net::lookup_host((host, 0));
        let addrs = match tokio::time::timeout(self.dns_timeout, lookup).await {
            Err(_elapsed) => {
                return Err(dns(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {:?}", self.dns_timeout),
                )));
            }
            Ok(result) => result.map_err(dns)?,
        };
        let ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
        if ips.is_empty() {
            return Err(dns(io::Error::new(io::ErrorKind::NotFound, "no address")));
        }
        Ok(ips)
    }
}

/// The URL's shape: http or https, no user-info, a host; and that host as an address or a
/// name to resolve.
pub(crate) fn target(url: &Url) -> Result<Target<'_>, EgressError> {
    match url.scheme() {
        "http" | "https" => {}
        other => return Err(EgressError::Scheme(other.to_owned())),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(EgressError::Userinfo);
    }
    match url.host() {
        None => Err(EgressError::NoHost),
        Some(Host::Ipv4(v4)) => Ok(Target::Ip(v4.into())),
        Some(Host::Ipv6(v6)) => Ok(Target::Ip(v6.into())),
        // `url` turns every IPv4 spelling of a special scheme's host into `Host::Ipv4`; parse
        // anyway, so that nothing the connector would read as an address reaches the resolver
        // (which it would bypass) as a name.
        Some(Host::Domain(name)) => Ok(name
            .parse::<IpAddr>()
            .map_or(Target::Domain(name), Target::Ip)),
    }
}
