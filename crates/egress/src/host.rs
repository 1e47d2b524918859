//! The host part of an outbound target, parsed strictly. An IPv4 address is
//! accepted only in canonical dotted-decimal form: the integer (`2130706433`),
//! hex (`0x7f000001`), octal (`0177.0.0.1`) and shortened (`127.1`) spellings
//! that some resolvers and URL parsers accept, and others do not, are
//! refused, so that no component can disagree with the check about which
//! address a host names.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A host that passed [`parse_host`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetHost {
    /// A DNS name: lowercase, without a trailing dot.
    Name(String),
    Ip(IpAddr),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("the host is empty")]
    Empty,
    #[error("`{0}` spells an IPv4 address in integer, octal, hex or shortened form; write it as four decimal numbers, like 192.0.2.1")]
    IntegerForm(String),
    #[error("`{0}` is not a valid host name or IP address")]
    Invalid(String),
}

/// Parses the host of an outbound target (without its port; IPv6 in brackets).
pub fn parse_host(raw: &str) -> Result<TargetHost, HostError> {
    if raw.is_empty() {
        return Err(HostError::Empty);
    }
    if let Some(inner) = raw.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or_else(|| HostError::Invalid(raw.to_string()))?;
        // Zone identifiers (`%eth0`) select an interface: never a destination.
        return inner.parse::<Ipv6Addr>().map(|ip| TargetHost::Ip(IpAddr::V6(ip))).map_err(|_| HostError::Invalid(raw.to_string()));
    }
    let host = raw.to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(&host);
    if host.is_empty() {
        return Err(HostError::Empty);
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(TargetHost::Ip(IpAddr::V4(ip)));
    }
    // A name whose last label is a number is an IPv4 address in disguise
    // (WHATWG URL calls this "ends in a number"); no real top-level domain
    // is numeric.
    let last = host.rsplit('.').next().unwrap_or(host);
    if looks_numeric(last) {
        return Err(HostError::IntegerForm(raw.to_string()));
    }
    if host.len() > 253 || !host.split('.').all(valid_label) {
        return Err(HostError::Invalid(raw.to_string()));
    }
    Ok(TargetHost::Name(host.to_string()))
}

fn looks_numeric(label: &str) -> bool {
    let hex = label.strip_prefix("0x").or_else(|| label.strip_prefix("0X"));
    match hex {
        Some(digits) => digits.bytes().all(|b| b.is_ascii_hexdigit()),
        None => !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()),
    }
}

fn valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && !label.starts_with('-')
        && !label.ends_with('-')
        && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_canonical_literals_parse() {
        assert_eq!(parse_host("API.Example.com."), Ok(TargetHost::Name("api.example.com".into())));
        assert_eq!(parse_host("127.0.0.1"), Ok(TargetHost::Ip("127.0.0.1".parse().unwrap())));
        assert_eq!(parse_host("[::1]"), Ok(TargetHost::Ip("::1".parse().unwrap())));
        assert_eq!(parse_host("[::ffff:127.0.0.1]"), Ok(TargetHost::Ip("::ffff:127.0.0.1".parse().unwrap())));
        assert_eq!(parse_host("a-b.c_d.example"), Ok(TargetHost::Name("a-b.c_d.example".into())));
        assert_eq!(parse_host("1password.com"), Ok(TargetHost::Name("1password.com".into())));
    }

    #[test]
    fn integer_octal_hex_and_short_ipv4_forms_are_refused() {
        for host in [
            "2130706433",
            "0x7f000001",
            "0X7F000001",
            "0177.0.0.1",
            "0x7f.0.0.1",
            "127.1",
            "127.0.1",
            "017700000001",
            "1.2.3.4.5",
            "0x",
            "169.254.43518",
        ] {
            assert!(matches!(parse_host(host), Err(HostError::IntegerForm(_))), "{host}: {:?}", parse_host(host));
        }
    }

    #[test]
    fn malformed_hosts_are_refused() {
        for host in [
            "",
            ".",
            "a..b",
            "-a.example",
            "a-.example",
            "a b",
            "a/b",
            "[::1",
            "[127.0.0.1]",
            "[fe80::1%eth0]",
            "exa\u{e9}mple.com",
            &"a".repeat(64),
        ] {
            assert!(parse_host(host).is_err(), "{host:?}");
        }
    }
}
