//! Address ranges that no worker may reach by name: the host itself, the
//! operator's private networks, link-local services (the cloud metadata
//! endpoint at 169.254.169.254 among them), and ranges that are never a
//! legitimate public destination. IPv6 forms that embed an IPv4 address at a
//! fixed place (IPv4-mapped, IPv4-compatible, the well-known NAT64 prefix,
//! 6to4) are judged by the IPv4 address they carry. Forms that carry it
//! where only the local network knows (a local-use NAT64 prefix) or
//! obfuscated (Teredo) are refused outright: the check fails closed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an address is not a public destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForbiddenRange {
    /// 0.0.0.0/8, `::`
    ThisNetwork,
    /// 127.0.0.0/8, `::1`
    Loopback,
    /// 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16
    Private,
    /// 100.64.0.0/10
    SharedAddressSpace,
    /// 169.254.0.0/16 (cloud metadata lives here), fe80::/10
    LinkLocal,
    /// 192.0.0.0/24
    ProtocolAssignments,
    /// 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32, 3fff::/20
    Documentation,
    /// 198.18.0.0/15, 2001:2::/48
    Benchmarking,
    /// 224.0.0.0/4, ff00::/8
    Multicast,
    /// 255.255.255.255
    Broadcast,
    /// 240.0.0.0/4, 192.88.99.0/24, fec0::/10, 100::/64
    Reserved,
    /// fc00::/7
    UniqueLocal,
    /// 64:ff9b:1::/48, NAT64 prefixes for local use (RFC 8215). Where the
    /// IPv4 address sits in them depends on the local translator's prefix
    /// length, so the whole range is refused.
    LocalUseNat64,
    /// 2001::/32, Teredo tunnels: the IPv4 address inside is obfuscated and
    /// reached through a relay, so the whole range is refused.
    Teredo,
}

impl fmt::Display for ForbiddenRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ThisNetwork => "this-network",
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::SharedAddressSpace => "shared address space (CGNAT)",
            Self::LinkLocal => "link-local",
            Self::ProtocolAssignments => "IETF protocol assignments",
            Self::Documentation => "documentation",
            Self::Benchmarking => "benchmarking",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::Reserved => "reserved",
            Self::UniqueLocal => "unique local",
            Self::LocalUseNat64 => "local-use NAT64",
            Self::Teredo => "Teredo",
        })
    }
}

/// The range that makes `ip` forbidden, or `None` for a public address.
pub fn forbidden_range(ip: IpAddr) -> Option<ForbiddenRange> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<ForbiddenRange> {
    use ForbiddenRange::*;
    const RANGES: &[([u8; 4], u32, ForbiddenRange)] = &[
        ([0, 0, 0, 0], 8, ThisNetwork),
        ([10, 0, 0, 0], 8, Private),
        ([100, 64, 0, 0], 10, SharedAddressSpace),
        ([127, 0, 0, 0], 8, Loopback),
        ([169, 254, 0, 0], 16, LinkLocal),
        ([172, 16, 0, 0], 12, Private),
        ([192, 0, 0, 0], 24, ProtocolAssignments),
        ([192, 0, 2, 0], 24, Documentation),
        ([192, 88, 99, 0], 24, Reserved),
        ([192, 168, 0, 0], 16, Private),
        ([198, 18, 0, 0], 15, Benchmarking),
        ([198, 51, 100, 0], 24, Documentation),
        ([203, 0, 113, 0], 24, Documentation),
        ([224, 0, 0, 0], 4, Multicast),
        ([255, 255, 255, 255], 32, Broadcast),
        ([240, 0, 0, 0], 4, Reserved),
    ];
    RANGES.iter().find(|(net, prefix, _)| in_v4(ip, *net, *prefix)).map(|(_, _, range)| *range)
}

fn in_v6(ip: Ipv6Addr, net: [u16; 8], prefix: u32) -> bool {
    let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix) };
    u128::from(ip) & mask == u128::from(Ipv6Addr::from(net)) & mask
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<ForbiddenRange> {
    use ForbiddenRange::*;
    if let Some(v4) = embedded_v4(ip) {
        return forbidden_v4(v4);
    }
    if ip.is_unspecified() {
        return Some(ThisNetwork);
    }
    if ip.is_loopback() {
        return Some(Loopback);
    }
    const RANGES: &[([u16; 8], u32, ForbiddenRange)] = &[
        ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, LinkLocal),
        ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, Reserved),
        ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, UniqueLocal),
        ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, Multicast),
        ([0x2001, 0x0db8, 0, 0, 0, 0, 0, 0], 32, Documentation),
        ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, Documentation),
        ([0x2001, 0x0002, 0, 0, 0, 0, 0, 0], 48, Benchmarking),
        ([0x0100, 0, 0, 0, 0, 0, 0, 0], 64, Reserved),
        ([0x0064, 0xff9b, 0x0001, 0, 0, 0, 0, 0], 48, LocalUseNat64),
        ([0x2001, 0, 0, 0, 0, 0, 0, 0], 32, Teredo),
    ];
    RANGES.iter().find(|(net, prefix, _)| in_v6(ip, *net, *prefix)).map(|(_, _, range)| *range)
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`),
/// IPv4-compatible (`::a.b.c.d`), well-known NAT64 (`64:ff9b::a.b.c.d`) or
/// 6to4 (`2002:AABB:CCDD::/48`) address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    let tail = v4(s[6], s[7]);
    match s {
        [0x2002, hi, lo, ..] => Some(v4(hi, lo)),
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(tail),
        // `::` and `::1` are IPv6's own unspecified and loopback addresses,
        // judged as such by the caller.
        [0, 0, 0, 0, 0, 0, _, _] if u128::from(ip) > 1 => Some(tail),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(tail),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(s: &str) -> Option<ForbiddenRange> {
        forbidden_range(s.parse().unwrap())
    }

    #[test]
    fn every_forbidden_ipv4_range() {
        use ForbiddenRange::*;
        for (ip, expected) in [
            ("0.0.0.0", ThisNetwork),
            ("0.255.1.2", ThisNetwork),
            ("10.0.0.1", Private),
            ("10.255.255.255", Private),
            ("100.64.0.1", SharedAddressSpace),
            ("100.127.255.255", SharedAddressSpace),
            ("127.0.0.1", Loopback),
            ("127.255.0.9", Loopback),
            ("169.254.169.254", LinkLocal),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.0.0.8", ProtocolAssignments),
            ("192.0.2.1", Documentation),
            ("192.168.1.1", Private),
            ("198.18.0.1", Benchmarking),
            ("198.19.255.255", Benchmarking),
            ("198.51.100.7", Documentation),
            ("203.0.113.9", Documentation),
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("240.0.0.1", Reserved),
            ("255.255.255.255", Broadcast),
        ] {
            assert_eq!(range(ip), Some(expected), "{ip}");
        }
    }

    #[test]
    fn public_ipv4_neighbours_of_forbidden_ranges_are_allowed() {
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
        ] {
            assert_eq!(range(ip), None, "{ip}");
        }
    }

    #[test]
    fn every_forbidden_ipv6_range() {
        use ForbiddenRange::*;
        for (ip, expected) in [
            ("::", ThisNetwork),
            ("::1", Loopback),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("fec0::1", Reserved),
            ("fc00::1", UniqueLocal),
            ("fdff:ffff::1", UniqueLocal),
            ("ff02::1", Multicast),
            ("2001:db8::1", Documentation),
            ("3fff::1", Documentation),
            ("2001:2::1", Benchmarking),
            ("100::1", Reserved),
            ("64:ff9b:1::", LocalUseNat64),
            ("64:ff9b:1::808:808", LocalUseNat64),
            ("64:ff9b:1:ffff:ffff:ffff:ffff:ffff", LocalUseNat64),
            ("64:ff9b:1:7f00:1::", LocalUseNat64),
            ("2001::1", Teredo),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", Teredo),
        ] {
            assert_eq!(range(ip), Some(expected), "{ip}");
        }
        for ip in ["2606:4700:4700::1111", "2001:4860:4860::8888", "2a00:1450::1"] {
            assert_eq!(range(ip), None, "{ip}");
        }
        // The neighbours of the local-use NAT64 and Teredo ranges.
        for ip in ["64:ff9b:0:ffff:ffff:ffff::", "64:ff9b:2::808:808", "64:ff9a:1::1", "2001:1::1", "2000:ffff::1"] {
            assert_eq!(range(ip), None, "{ip}");
        }
    }

    #[test]
    fn ipv6_forms_of_forbidden_ipv4_addresses_are_forbidden() {
        use ForbiddenRange::*;
        for (ip, expected) in [
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:7f00:1", Loopback),
            ("::ffff:169.254.169.254", LinkLocal),
            ("::ffff:10.1.2.3", Private),
            ("::127.0.0.1", Loopback),
            ("::169.254.169.254", LinkLocal),
            ("::192.168.0.1", Private),
            ("64:ff9b::127.0.0.1", Loopback),
            ("64:ff9b::a9fe:a9fe", LinkLocal),
            ("2002:7f00:1::", Loopback),
            ("2002:a9fe:a9fe::1", LinkLocal),
            ("2002:c0a8:101:5::9", Private),
            ("2002::", ThisNetwork),
        ] {
            assert_eq!(range(ip), Some(expected), "{ip}");
        }
        assert_eq!(range("::ffff:8.8.8.8"), None);
        assert_eq!(range("64:ff9b::8.8.8.8"), None);
        assert_eq!(range("2002:808:808::1"), None, "6to4 of a public address");
    }
}
