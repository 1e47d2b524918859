//! A worker's `allowed_outbound` list: which scheme, host and port it may
//! send requests to. Empty means no egress at all. A bare `*` (any public
//! destination) is refused unless the operator sets the explicit escape
//! hatch; even then the forbidden address ranges still apply.
//!
//! Entry syntax: `scheme://host[:port]`, where scheme is `http` or `https`,
//! the port defaults to the scheme's (80, 443), and host is one of
//! - a DNS name (`api.example.com`), matched exactly, case-insensitively;
//! - `*.` and a name of at least two labels (`*.stripe.com`), matching
//!   exactly one more label (`api.stripe.com`, not `stripe.com` nor
//!   `a.b.stripe.com`);
//! - an IP literal (`127.0.0.1`, `[::1]`) or a CIDR (`10.1.0.0/16`,
//!   `[fd00::/8]`), matched against the target's literal address and, for a
//!   name, against the addresses it resolves to. Only entries of this kind
//!   can open a forbidden range such as loopback or a private network.

use std::fmt;
use std::net::IpAddr;

use crate::address::{ForbiddenRange, forbidden_range};
use crate::host::{TargetHost, parse_host};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    pub fn parse(s: &str) -> Option<Scheme> {
        match s.to_ascii_lowercase().as_str() {
            "http" => Some(Scheme::Http),
            "https" => Some(Scheme::Https),
            _ => None,
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Any public destination (the `*` escape hatch).
    Any,
    Exact(String),
    /// `*.suffix`: exactly one label, then `.suffix`.
    OneLabelUnder(String),
    Ip(IpAddr),
    Cidr {
        network: IpAddr,
        prefix: u8,
    },
}

/// One parsed `allowed_outbound` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRule {
    /// `None` only for `*`, which admits both schemes.
    pub scheme: Option<Scheme>,
    pub host: HostPattern,
    /// `None` only for `*`, which admits any port.
    pub port: Option<u16>,
    /// The entry as written, for logs and errors.
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllowlistError {
    #[error(
        "`*` allows every public destination; if that is really intended, also set `allow_any_outbound_dangerously = true` for this worker, otherwise list the origins it needs"
    )]
    WildcardWithoutOptIn,
    #[error("`{entry}`: {why}; write entries as scheme://host[:port], for example \"https://api.example.com\"")]
    Invalid { entry: String, why: String },
}

impl OutboundRule {
    pub fn parse(entry: &str) -> Result<OutboundRule, AllowlistError> {
        let invalid = |why: &str| AllowlistError::Invalid { entry: entry.to_string(), why: why.to_string() };
        if entry == "*" {
            return Ok(OutboundRule { scheme: None, host: HostPattern::Any, port: None, text: entry.to_string() });
        }
        let (scheme, rest) = entry.split_once("://").ok_or_else(|| invalid("missing scheme"))?;
        let scheme = Scheme::parse(scheme).ok_or_else(|| invalid("the scheme must be http or https"))?;
        if rest.contains(['?', '#', '@']) || rest.chars().any(char::is_whitespace) {
            return Err(invalid("an entry names an origin only: no path, query, fragment or user info"));
        }
        let (host, port) = split_port(rest).map_err(&invalid)?;
        let port = match port {
            Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| invalid("the port must be a number from 1 to 65535"))?),
            None => Some(scheme.default_port()),
        };
        let host = parse_pattern(host).map_err(|why| invalid(&why))?;
        Ok(OutboundRule { scheme: Some(scheme), host, port, text: entry.to_string() })
    }

    /// Whether this entry admits a request to `scheme://host:port`, before
    /// any name is resolved.
    pub fn matches(&self, scheme: Scheme, host: &TargetHost, port: u16) -> bool {
        if self.scheme.is_some_and(|s| s != scheme) || self.port.is_some_and(|p| p != port) {
            return false;
        }
        match (&self.host, host) {
            (HostPattern::Any, _) => true,
            (HostPattern::Exact(name), TargetHost::Name(h)) => name == h,
            (HostPattern::OneLabelUnder(suffix), TargetHost::Name(h)) => h
                .strip_suffix(suffix.as_str())
                .and_then(|label| label.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
            (HostPattern::Ip(_) | HostPattern::Cidr { .. }, TargetHost::Ip(ip)) => self.names_address(*ip),
            _ => false,
        }
    }

    /// Whether this entry names `ip` literally, as an IP or inside a CIDR.
    pub fn names_address(&self, ip: IpAddr) -> bool {
        match self.host {
            HostPattern::Ip(rule) => rule == ip,
            HostPattern::Cidr { network, prefix } => cidr_contains(network, prefix, ip),
            _ => false,
        }
    }
}

/// A worker's whole egress grant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    rules: Vec<OutboundRule>,
}

impl Allowlist {
    /// Parses `entries`; `*` is accepted only with `allow_any_outbound_dangerously`.
    pub fn new<S: AsRef<str>>(entries: &[S], allow_any_outbound_dangerously: bool) -> Result<Allowlist, AllowlistError> {
        let rules = entries
            .iter()
            .map(|e| {
                let rule = OutboundRule::parse(e.as_ref())?;
                if rule.host == HostPattern::Any && !allow_any_outbound_dangerously {
                    return Err(AllowlistError::WildcardWithoutOptIn);
                }
                Ok(rule)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Allowlist { rules })
    }

    /// The entries as written, in order.
    pub fn entries(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.text.as_str())
    }

    /// No entries: the worker may not send any request.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether the `*` escape hatch is in the list (`cordon check` warns).
    pub fn allows_any(&self) -> bool {
        self.rules.iter().any(|r| r.host == HostPattern::Any)
    }

    /// The first entry that admits `scheme://host:port`.
    pub fn find(&self, scheme: Scheme, host: &TargetHost, port: u16) -> Option<&OutboundRule> {
        self.rules.iter().find(|r| r.matches(scheme, host, port))
    }

    /// Whether a connection to `ip` (resolved or literal) may be made for a
    /// request to `scheme` and `port`: yes for a public address; for one in a
    /// forbidden range, only if an entry for that scheme and port names it
    /// literally.
    pub fn check_address(&self, scheme: Scheme, port: u16, ip: IpAddr) -> Result<(), ForbiddenRange> {
        let Some(range) = forbidden_range(ip) else { return Ok(()) };
        let named = self.rules.iter().any(|r| r.scheme == Some(scheme) && r.port == Some(port) && r.names_address(ip));
        if named { Ok(()) } else { Err(range) }
    }
}

/// `host[:port]`, where host may be `[v6]`, `[v6/prefix]` or contain `/prefix`.
fn split_port(rest: &str) -> Result<(&str, Option<&str>), &'static str> {
    if rest.starts_with('[') {
        let end = rest.find(']').ok_or("unclosed `[`")?;
        let (host, after) = rest.split_at(end + 1);
        return match after {
            "" => Ok((host, None)),
            p => p.strip_prefix(':').map(|p| (host, Some(p))).ok_or("unexpected text after `]`"),
        };
    }
    Ok(match rest.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (rest, None),
    })
}

fn parse_pattern(host: &str) -> Result<HostPattern, String> {
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    let unbracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    if let Some((addr, prefix)) = unbracketed.unwrap_or(host).split_once('/') {
        let network: IpAddr = if unbracketed.is_some() {
            addr.parse::<std::net::Ipv6Addr>().map(IpAddr::V6).map_err(|_| format!("`{addr}` is not an IPv6 address"))?
        } else {
            addr.parse::<std::net::Ipv4Addr>().map(IpAddr::V4).map_err(|_| format!("`{addr}` is not an IPv4 address"))?
        };
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("the prefix length must be 0 to {max}"))?;
        return Ok(HostPattern::Cidr { network, prefix });
    }
    if let Some(suffix) = host.strip_prefix("*.") {
        return match parse_host(suffix) {
            Ok(TargetHost::Name(name)) if name.contains('.') => Ok(HostPattern::OneLabelUnder(name)),
            Ok(TargetHost::Name(_)) => Err("a wildcard needs at least two labels after `*.` (`*.example.com`, not `*.com`)".into()),
            _ => Err("only a host name can follow `*.`".into()),
        };
    }
    if host.contains('*') {
        return Err("`*` is allowed only as a whole leading label (`*.example.com`)".into());
    }
    match parse_host(host) {
        Ok(TargetHost::Name(name)) => Ok(HostPattern::Exact(name)),
        Ok(TargetHost::Ip(ip)) => Ok(HostPattern::Ip(ip)),
        Err(e) => Err(e.to_string()),
    }
}

fn cidr_contains(network: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    match (network, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix)) };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> TargetHost {
        TargetHost::Name(s.into())
    }

    fn ip(s: &str) -> TargetHost {
        TargetHost::Ip(s.parse().unwrap())
    }

    #[test]
    fn entries_parse_with_default_ports() {
        let r = OutboundRule::parse("https://API.example.com").unwrap();
        assert_eq!((r.scheme, r.host, r.port), (Some(Scheme::Https), HostPattern::Exact("api.example.com".into()), Some(443)));
        let r = OutboundRule::parse("http://127.0.0.1:9000").unwrap();
        assert_eq!((r.host, r.port), (HostPattern::Ip("127.0.0.1".parse().unwrap()), Some(9000)));
        let r = OutboundRule::parse("https://*.stripe.com:443").unwrap();
        assert_eq!(r.host, HostPattern::OneLabelUnder("stripe.com".into()));
        let r = OutboundRule::parse("http://[::1]:8080").unwrap();
        assert_eq!((r.host, r.port), (HostPattern::Ip("::1".parse().unwrap()), Some(8080)));
        let r = OutboundRule::parse("http://10.1.0.0/16").unwrap();
        assert_eq!((r.host, r.port), (HostPattern::Cidr { network: "10.1.0.0".parse().unwrap(), prefix: 16 }, Some(80)));
        let r = OutboundRule::parse("https://[fd00::/8]:8443").unwrap();
        assert_eq!((r.host, r.port), (HostPattern::Cidr { network: "fd00::".parse().unwrap(), prefix: 8 }, Some(8443)));
    }

    #[test]
    fn malformed_entries_say_what_is_wrong() {
        for (entry, why) in [
            ("api.example.com", "missing scheme"),
            ("ftp://example.com", "http or https"),
            ("https://example.com/path", "path"),
            ("https://example.com?q", "path, query"),
            ("https://user@example.com", "user info"),
            ("https://example.com:0", "port"),
            ("https://example.com:99999", "port"),
            ("https://*.com", "two labels"),
            ("https://a.*.example.com", "whole leading label"),
            ("https://*", "whole leading label"),
            ("http://2130706433", "integer"),
            ("http://0x7f000001", "integer"),
            ("http://10.0.0.0/40", "prefix length"),
            ("https://", "empty"),
        ] {
            let e = OutboundRule::parse(entry).expect_err(entry).to_string();
            assert!(e.contains(why), "{entry}: {e}");
            assert!(e.contains("scheme://host[:port]"), "{entry}: the fix is named: {e}");
        }
    }

    #[test]
    fn a_bare_star_needs_the_escape_hatch() {
        assert_eq!(Allowlist::new(&["*"], false), Err(AllowlistError::WildcardWithoutOptIn));
        let any = Allowlist::new(&["*"], true).unwrap();
        assert!(any.allows_any());
        assert!(any.find(Scheme::Http, &name("anything.example"), 8080).is_some());
        // Still no private or loopback destination through `*`.
        assert_eq!(any.check_address(Scheme::Http, 80, "127.0.0.1".parse().unwrap()), Err(ForbiddenRange::Loopback));
        assert_eq!(any.check_address(Scheme::Http, 80, "169.254.169.254".parse().unwrap()), Err(ForbiddenRange::LinkLocal));
    }

    #[test]
    fn matching_is_by_scheme_host_and_port() {
        let list = Allowlist::new(&["https://api.example.com", "https://*.stripe.com:443", "http://127.0.0.1:9000"], false).unwrap();
        assert!(list.find(Scheme::Https, &name("api.example.com"), 443).is_some());
        assert!(list.find(Scheme::Http, &name("api.example.com"), 443).is_none(), "scheme");
        assert!(list.find(Scheme::Https, &name("api.example.com"), 8443).is_none(), "port");
        assert!(list.find(Scheme::Https, &name("www.example.com"), 443).is_none(), "host");
        assert!(list.find(Scheme::Https, &name("api.stripe.com"), 443).is_some());
        assert!(list.find(Scheme::Https, &name("stripe.com"), 443).is_none(), "the wildcard needs one label");
        assert!(list.find(Scheme::Https, &name("a.b.stripe.com"), 443).is_none(), "and only one");
        assert!(list.find(Scheme::Https, &name("evilstripe.com"), 443).is_none());
        assert!(list.find(Scheme::Http, &ip("127.0.0.1"), 9000).is_some());
        assert!(list.find(Scheme::Http, &ip("127.0.0.1"), 9001).is_none(), "another port on the same host");
        assert!(list.find(Scheme::Http, &name("localhost"), 9000).is_none(), "an IP entry does not admit a name");
        assert!(Allowlist::new::<&str>(&[], false).unwrap().find(Scheme::Https, &name("api.example.com"), 443).is_none());
    }

    #[test]
    fn forbidden_ranges_open_only_to_literal_entries() {
        let list = Allowlist::new(&["http://127.0.0.1:9000", "http://10.1.0.0/16:8080", "https://internal.example"], false).unwrap();
        let addr = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(list.check_address(Scheme::Http, 9000, addr("127.0.0.1")), Ok(()));
        assert_eq!(list.check_address(Scheme::Http, 9000, addr("127.0.0.2")), Err(ForbiddenRange::Loopback));
        assert_eq!(
            list.check_address(Scheme::Http, 9001, addr("127.0.0.1")),
            Err(ForbiddenRange::Loopback),
            "the port is part of the grant"
        );
        assert_eq!(list.check_address(Scheme::Http, 8080, addr("10.1.200.3")), Ok(()));
        assert_eq!(list.check_address(Scheme::Http, 8080, addr("10.2.0.1")), Err(ForbiddenRange::Private));
        // A name that resolves into a private range stays forbidden...
        assert_eq!(list.check_address(Scheme::Https, 443, addr("10.1.0.5")), Err(ForbiddenRange::Private));
        assert_eq!(list.check_address(Scheme::Https, 443, addr("169.254.169.254")), Err(ForbiddenRange::LinkLocal));
        assert_eq!(list.check_address(Scheme::Https, 443, addr("::ffff:127.0.0.1")), Err(ForbiddenRange::Loopback));
        // ...and a public address is fine.
        assert_eq!(list.check_address(Scheme::Https, 443, addr("93.184.215.14")), Ok(()));
    }
}
