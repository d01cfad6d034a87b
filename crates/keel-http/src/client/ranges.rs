//! Which addresses a customer's webhook may never reach, and why: the deny side of the egress
//! policy (SSRF).
//!
//! The rule is written as code over `std`'s address methods, one line per range with its
//! name, rather than as a data table, so that a reader can check each line against the IANA
//! special-purpose registries (RFC 6890 and its updates) without learning a second format.
//! IPv6 forms that **embed** an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`, NAT64
//! `64:ff9b::a.b.c.d`, 6to4 `2002:AABB:CCDD::`) are judged by the IPv4 address they carry:
//! the operating system or a translator delivers them to it, so `::ffff:127.0.0.1` is
//! loopback and `64:ff9b::a9fe:a9fe` is the cloud metadata service.
//!
//! Must not break: anything not positively public is forbidden. IPv4 gets a list of special
//! ranges; IPv6 must be global unicast (`2000::/3`) or an embedding of a public IPv4, so a
//! range this file forgets to name is refused, not let through.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The special-purpose range `ip` falls in, named for error messages, or `None` if it is a
/// public unicast address a webhook may be sent to.
pub fn forbidden_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_range(v4),
        IpAddr::V6(v6) => v6_range(v6),
    }
}

fn v4_range(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    let range = if a == 0 {
        // Includes the unspecified 0.0.0.0, which Linux connects to as the local host.
        "this network (0.0.0.0/8)"
    } else if ip.is_loopback() {
        "loopback (127.0.0.0/8)"
    } else if ip.is_private() {
        "private (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)"
    } else if ip.is_link_local() {
        "link-local (169.254.0.0/16, where cloud metadata lives)"
    } else if a == 100 && (b & 0b1100_0000) == 64 {
        "shared address space, carrier-grade NAT (100.64.0.0/10)"
    } else if a == 192 && b == 0 && c == 0 {
        "IETF protocol assignments (192.0.0.0/24)"
    } else if ip.is_documentation() {
        "documentation (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24)"
    } else if a == 198 && (b & 0b1111_1110) == 18 {
        "benchmarking (198.18.0.0/15)"
    } else if a == 192 && b == 88 && c == 99 {
        "6to4 relay anycast (192.88.99.0/24)"
    } else if ip.is_broadcast() {
        "broadcast (255.255.255.255)"
    } else if ip.is_multicast() {
        "multicast (224.0.0.0/4)"
    } else if a >= 240 {
        "reserved (240.0.0.0/4)"
    } else {
        return None;
    };
    Some(range)
}

fn v6_range(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    // Forms that carry an IPv4 address: judged by it.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_range(v4)
            .map(|_| "IPv4-mapped (::ffff:0:0/96) form of a forbidden IPv4 address");
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return v4_range(low_v4(ip))
            .map(|_| "NAT64 (64:ff9b::/96) form of a forbidden IPv4 address");
    }
    if s[0] == 0x2002 {
        let v4 = Ipv4Addr::from((u32::from(s[1]) << 16) | u32::from(s[2]));
        return v4_range(v4).map(|_| "6to4 (2002::/16) form of a forbidden IPv4 address");
    }
    let range = if ip.is_unspecified() {
        "unspecified (::)"
    } else if ip.is_loopback() {
        "loopback (::1)"
    } else if s[..6] == [0; 6] {
        // Deprecated (RFC 4291); `::127.0.0.1` must not become a way round the v4 rules.
        "IPv4-compatible (::/96, deprecated)"
    } else if s[..3] == [0x64, 0xff9b, 1] {
        "local-use NAT64 (64:ff9b:1::/48)"
    } else if s[..4] == [0x100, 0, 0, 0] {
        "discard-only (100::/64)"
    } else if s[0] == 0x2001 && s[1] < 0x200 {
        // Teredo (2001::/32) tunnels to an obfuscated IPv4 address; the rest is benchmarking,
        // ORCHID and other non-destinations.
        "IETF protocol assignments (2001::/23, Teredo included)"
    } else if s[0] == 0x2001 && s[1] == 0xdb8 {
        "documentation (2001:db8::/32)"
    } else if s[0] == 0x3fff && s[1] < 0x1000 {
        "documentation (3fff::/20)"
    } else if ip.is_unique_local() {
        "unique local (fc00::/7)"
    } else if ip.is_unicast_link_local() {
        "link-local (fe80::/10)"
    } else if (s[0] & 0xffc0) == 0xfec0 {
        "site-local (fec0::/10, deprecated)"
    } else if ip.is_multicast() {
        "multicast (ff00::/8)"
    } else if (s[0] & 0xe000) != 0x2000 {
        "not global unicast (outside 2000::/3)"
    } else {
        return None;
    };
    Some(range)
}

/// The IPv4 address in the low 32 bits.
fn low_v4(ip: Ipv6Addr) -> Ipv4Addr {
    // Truncation is the point: the low 32 bits are the embedded address.
    Ipv4Addr::from(u128::from(ip) as u32)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn range(s: &str) -> Option<&'static str> {
        forbidden_range(s.parse().unwrap())
    }

    #[test]
    fn range_edges_are_exact() {
        // Last address before and first after each hand-written range.
        for public in [
            "100.63.255.255",
            "100.128.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "192.0.1.255",
            "192.88.98.255",
            "192.88.100.0",
            "223.255.255.255",
            "1.0.0.0",
        ] {
            assert_eq!(range(public), None, "{public}");
        }
        for forbidden in [
            "100.64.0.0",
            "100.127.255.255",
            "198.18.0.0",
            "198.19.255.255",
            "192.0.0.0",
            "192.0.0.255",
            "240.0.0.0",
            "0.255.255.255",
        ] {
            assert!(range(forbidden).is_some(), "{forbidden}");
        }
        for public in [
            "2001:200::1",
            "2001:db7:ffff::1",
            "2001:db9::1",
            "3ffe:ffff::1",
            "3fff:1000::1",
            "3ff0::1",
            "2002:808:808::1",
            "64:ff9b::808:808",
            "::ffff:8.8.8.8",
            "2606:4700:4700::1111",
        ] {
            assert_eq!(range(public), None, "{public}");
        }
        for forbidden in [
            "2001::1",
            "2001:1ff::1",
            "3fff::1",
            "3fff:fff::1",
            "fec0::1",
            "feff::1",
            "4000::1",
            "1fff::1",
            "64:ff9b:1::1",
        ] {
            assert!(range(forbidden).is_some(), "{forbidden}");
        }
    }
}
