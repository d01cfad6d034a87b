//! The resolver reqwest connects through: it resolves a name, drops every address the
//! [`EgressPolicy`] forbids, and refuses the name if none is left.
//!
//! This is what closes the gap between checking and connecting. A guard that resolves a name,
//! checks the answer, then lets the HTTP client resolve it again is beaten by DNS rebinding:
//! the attacker's name answers a public address to the check and `127.0.0.1` to the
//! connection a millisecond later. Installed with `ClientBuilder::dns_resolver`, this
//! resolver is the only source of addresses for named hosts, so the addresses it returns are
//! the only ones reqwest can connect to.
//!
//! Must not break: reqwest never calls a resolver for IP-literal hosts (hyper connects to
//! them directly), so the client checks those itself before sending (`webhook.rs`).

use std::net::SocketAddr;
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use super::{EgressError, EgressPolicy};

/// See the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct GuardedResolver {
    policy: Arc<EgressPolicy>,
}

impl GuardedResolver {
    pub(crate) fn new(policy: Arc<EgressPolicy>) -> Self {
        Self { policy }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = Arc::clone(&self.policy);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let mut refused: Option<EgressError> = None;
            let allowed: Vec<SocketAddr> = policy
                .lookup(&host)
                .await?
                .into_iter()
                .filter(|&ip| match policy.check_ip(ip) {
                    Ok(()) => true,
                    Err(e) => {
                        refused.get_or_insert(e);
                        false
                    }
                })
                // Port 0: reqwest puts the URL's port (or the scheme's) in its place.
                .map(|ip| SocketAddr::new(ip, 0))
                .collect();
            match refused {
                // Every address was forbidden: the error says which (the first), and the
                // client finds it in the error's source chain.
                Some(e) if allowed.is_empty() => Err(e.into()),
                _ => Ok(Box::new(allowed.into_iter()) as Addrs),
            }
        })
    }
}
