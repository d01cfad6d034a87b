//! An address range in CIDR notation (`127.0.0.0/8`, `::1/128`): the unit of the egress
//! allow-list. Hand-written (a few lines of masking) rather than taken from `ipnet`, so the
//! whole SSRF guard can be read in this module without a second crate's semantics.
//!
//! Must not break: a range whose address has bits set past its prefix (`127.0.0.1/8`) is
//! refused, not silently widened or narrowed: an allow-list entry means exactly what it says.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::Deserialize;

/// A network: an address and a prefix length, host bits zero. Parsed from `addr/prefix`, or
/// a bare address (a single host: `/32` or `/128`). In configuration it is that string.
///
/// ```
/// use keel_http::client::Cidr;
///
/// let loopback: Cidr = "127.0.0.0/8".parse()?;
/// assert!(loopback.contains([127, 1, 2, 3].into()));
/// assert!(!loopback.contains([128, 0, 0, 1].into()));
/// assert!("127.0.0.1/8".parse::<Cidr>().is_err()); // host bits set: say 127.0.0.0/8
/// # Ok::<(), keel_http::client::CidrError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// Why a string is not a [`Cidr`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("`{0}` is not an IP address or `address/prefix`")]
    Syntax(String),
    #[error("prefix /{prefix} is longer than the address's {max} bits")]
    Prefix { prefix: u8, max: u8 },
    #[error("`{given}` has bits set past its prefix; the network is `{network}`")]
    HostBits { given: String, network: String },
}

impl Cidr {
    /// The range of `prefix` leading bits of `network`; refused if `network` has host bits
    /// set or `prefix` is too long for its family.
    pub fn new(network: IpAddr, prefix: u8) -> Result<Self, CidrError> {
        let max = max_prefix(network);
        if prefix > max {
            return Err(CidrError::Prefix { prefix, max });
        }
        let cidr = Self { network, prefix };
        let masked = cidr.masked(network);
        if masked != network {
            return Err(CidrError::HostBits {
                given: format!("{network}/{prefix}"),
                network: format!("{masked}/{prefix}"),
            });
        }
        Ok(cidr)
    }

    /// The network address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in this range. An IPv4 range never contains an IPv6 address, nor the
    /// reverse; the policy unwraps IPv4-mapped addresses before asking.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.network.is_ipv4() == ip.is_ipv4() && self.masked(ip) == self.network
    }

    /// `ip` with every bit past the prefix cleared.
    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::from((u32::from(v4) & mask).to_be_bytes())
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::from((u128::from(v6) & mask).to_be_bytes())
            }
        }
    }
}

fn max_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || CidrError::Syntax(s.to_owned());
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let network: IpAddr = addr.trim().parse().map_err(|_| syntax())?;
        let prefix = match prefix {
            Some(p) => p.trim().parse().map_err(|_| syntax())?,
            None => max_prefix(network),
        };
        Self::new(network, prefix)
    }
}

impl TryFrom<String> for Cidr {
    type Error = CidrError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_ranges_and_single_hosts() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert_eq!((c.network(), c.prefix()), (IpAddr::from([10, 0, 0, 0]), 8));
        assert_eq!("::1".parse::<Cidr>().unwrap().to_string(), "::1/128");
        assert_eq!(
            "192.0.2.7".parse::<Cidr>().unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().prefix(), 0);
        assert_eq!("fc00::/7".parse::<Cidr>().unwrap().to_string(), "fc00::/7");
    }

    #[test]
    fn refuses_bad_syntax_long_prefixes_and_host_bits() {
        assert!(matches!(
            "localhost/8".parse::<Cidr>(),
            Err(CidrError::Syntax(_))
        ));
        assert!(matches!(
            "10.0.0.0/x".parse::<Cidr>(),
            Err(CidrError::Syntax(_))
        ));
        assert_eq!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::Prefix {
                prefix: 33,
                max: 32
            })
        );
        assert_eq!(
            "127.0.0.1/8".parse::<Cidr>(),
            Err(CidrError::HostBits {
                given: "127.0.0.1/8".into(),
                network: "127.0.0.0/8".into()
            })
        );
    }

    #[test]
    fn contains_checks_the_prefix_bits_and_the_family() {
        let c: Cidr = "172.16.0.0/12".parse().unwrap();
        assert!(c.contains([172, 16, 0, 1].into()));
        assert!(c.contains([172, 31, 255, 255].into()));
        assert!(!c.contains([172, 32, 0, 0].into()));
        assert!(!c.contains([172, 15, 255, 255].into()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains([8, 8, 8, 8].into()));
        assert!(
            !all.contains("::ffff:8.8.8.8".parse().unwrap()),
            "families differ"
        );
        let ula: Cidr = "fc00::/7".parse().unwrap();
        assert!(ula.contains("fdff::1".parse().unwrap()));
        assert!(!ula.contains("fe00::1".parse().unwrap()));
    }
}
