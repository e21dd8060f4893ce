//! The network part of a policy: where a worker's traffic may go.
//!
//! Every worker has its own network namespace with only `lo`. In mode
//! `proxy`, what leaves goes through wardend's proxy on the worker's
//! loopback, which asks [`NetworkPolicy::check`] about each destination by
//! name; nothing here touches the network (resolution and the address
//! checks after it happen in the daemon, with [`internal_address`] and
//! [`NetworkPolicy::lists_address`]).
//!
//! Host names are canonicalised once ([`Host::parse`]), and the same
//! matcher serves HTTP CONNECT, absolute-form HTTP and SOCKS5.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;

use crate::units::deserialize_via;

/// Where wardend's HTTP proxy listens inside every `proxy` worker (its own
/// loopback, in its own network namespace).
pub const HTTP_PROXY_PORT: u16 = 3128;
/// Where wardend's SOCKS5 proxy listens inside every `proxy` worker.
pub const SOCKS_PORT: u16 = 1080;
/// Reserved inside every `proxy` worker for wardend's Anthropic API gateway.
pub const GATEWAY_PORT: u16 = 4180;
/// The ports above: no profile may bind them.
pub const RESERVED_PORTS: [u16; 3] = [HTTP_PROXY_PORT, SOCKS_PORT, GATEWAY_PORT];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Loopback only: nothing leaves.
    None,
    /// Loopback, plus egress through wardend's proxy by name.
    Proxy,
}

deserialize_via!(String: NetworkMode);

impl TryFrom<String> for NetworkMode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "none" => Ok(NetworkMode::None),
            "proxy" => Ok(NetworkMode::Proxy),
            "tcp" => Err(
                "network mode \"tcp\" was removed: it shared the host's network namespace. Use \"proxy\" \
                 (egress by name through wardend; list hosts in [network] allow) or \"none\""
                    .into(),
            ),
            _ => Err(format!("expected network mode \"none\" or \"proxy\", got {s:?}")),
        }
    }
}

/// A destination host as a worker names it, canonicalised: lower-case, no
/// trailing dot, letters, digits, '-' and '.' only; or an IP address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

impl Host {
    /// Canonicalises `raw` (a name, a dotted IPv4 address, or an IPv6
    /// address with or without brackets). Anything else is refused with
    /// the reason: NUL, CR/LF, '%', spaces, non-ASCII, empty labels, and
    /// numbers that are not a plain dotted quad (which resolvers would read
    /// as an address: `127.1`, `0x7f000001`).
    pub fn parse(raw: &str) -> Result<Host, HostError> {
        if let Some(c) = raw
            .chars()
            .find(|c| !c.is_ascii() || c.is_ascii_control() || matches!(c, ' ' | '%' | '/' | '\\' | '@'))
        {
            return Err(HostError::Char(c));
        }
        let inner = raw.strip_prefix('[').and_then(|s| s.strip_suffix(']'));
        if let Some(v6) = inner {
            return v6
                .parse::<Ipv6Addr>()
                .map(|a| Host::Ip(canonical_ip(IpAddr::V6(a))))
                .map_err(|_| HostError::BadAddress);
        }
        if let Ok(ip) = raw.parse::<IpAddr>() {
            return Ok(Host::Ip(canonical_ip(ip)));
        }
        let name = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
        if name.is_empty() {
            return Err(HostError::Empty);
        }
        if name.len() > 253 {
            return Err(HostError::TooLong);
        }
        for label in name.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(HostError::Label);
            }
            if let Some(c) = label.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-')) {
                return Err(HostError::Char(c));
            }
        }
        if name.split('.').all(looks_numeric) {
            return Err(HostError::BadAddress);
        }
        Ok(Host::Name(name))
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Host::Ip(a) => write!(f, "{a}"),
        }
    }
}

/// A label an address parser would take as a number (decimal, octal or hex).
fn looks_numeric(label: &str) -> bool {
    let hex = label.strip_prefix("0x").or_else(|| label.strip_prefix("0X"));
    match hex {
        Some(h) => h.chars().all(|c| c.is_ascii_hexdigit()),
        None => label.chars().all(|c| c.is_ascii_digit()),
    }
}

/// IPv4-mapped IPv6 addresses are the IPv4 address they carry.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Why a host name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("the host name is empty")]
    Empty,
    #[error("the host name is longer than 253 characters")]
    TooLong,
    #[error("the host name has an empty or over-long label")]
    Label,
    #[error("the host name contains {0:?}")]
    Char(char),
    #[error("the host is not a name or a canonical IP address")]
    BadAddress,
}

/// Which hosts a rule names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Exactly this name.
    Exact(String),
    /// Any name below this one (`*.example.com`: not `example.com` itself).
    Below(String),
    /// An address, or a range of them (`10.0.0.0/8`).
    Net { addr: IpAddr, prefix: u8 },
}

/// One `[network] allow` or `deny` entry: a host pattern and, optionally,
/// the one port it applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct NetRule {
    pub host: HostPattern,
    pub port: Option<u16>,
}

deserialize_via!(String: NetRule);

impl TryFrom<String> for NetRule {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let bad = |why: String| format!("{text:?}: {why}");
        // A port follows the last ':' unless that ':' is inside an IPv6 address.
        let (host, port) = match text.rsplit_once(':') {
            Some((h, p)) if h.ends_with(']') || !h.contains(':') => {
                let port: u16 = p
                    .parse()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad(format!("expected a port from 1 to 65535, got {p:?}")))?;
                (h, Some(port))
            }
            _ => (text.as_str(), None),
        };
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let pattern = if let Some(below) = host.strip_prefix("*.") {
            match Host::parse(below).map_err(|e| bad(e.to_string()))? {
                Host::Name(n) => HostPattern::Below(n),
                Host::Ip(_) => return Err(bad("a wildcard needs a name after \"*.\"".into())),
            }
        } else if let Some((addr, prefix)) = host.split_once('/') {
            let addr: IpAddr = addr
                .parse()
                .map_err(|_| bad(format!("expected an address range like 10.0.0.0/8, got {host:?}")))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix: u8 = prefix
                .parse()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| bad(format!("expected a prefix length from 0 to {max}")))?;
            HostPattern::Net {
                addr: canonical_ip(addr),
                prefix,
            }
        } else {
            match Host::parse(host).map_err(|e| bad(e.to_string()))? {
                Host::Name(n) => HostPattern::Exact(n),
                Host::Ip(addr) => HostPattern::Net {
                    addr,
                    prefix: if addr.is_ipv4() { 32 } else { 128 },
                },
            }
        };
        if host.contains('*') && !matches!(pattern, HostPattern::Below(_)) {
            return Err(bad("'*' may only start a name, as in \"*.example.com\"".into()));
        }
        Ok(NetRule { host: pattern, port })
    }
}

impl fmt::Display for NetRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match &self.host {
            HostPattern::Exact(n) => n.clone(),
            HostPattern::Below(n) => format!("*.{n}"),
            HostPattern::Net { addr, prefix } => {
                let full = if addr.is_ipv4() { 32 } else { 128 };
                match (addr, *prefix == full) {
                    (IpAddr::V6(a), true) => format!("[{a}]"),
                    (IpAddr::V6(a), false) => format!("[{a}/{prefix}]"),
                    (a, true) => a.to_string(),
                    (a, false) => format!("{a}/{prefix}"),
                }
            }
        };
        match self.port {
            Some(p) => write!(f, "{host}:{p}"),
            None => f.write_str(&host),
        }
    }
}

impl From<NetRule> for String {
    fn from(r: NetRule) -> String {
        r.to_string()
    }
}

impl NetRule {
    /// The rule for exactly `host`:`port`.
    pub fn exactly(host: &Host, port: u16) -> NetRule {
        let host = match host {
            Host::Name(n) => HostPattern::Exact(n.clone()),
            Host::Ip(addr) => HostPattern::Net {
                addr: *addr,
                prefix: if addr.is_ipv4() { 32 } else { 128 },
            },
        };
        NetRule { host, port: Some(port) }
    }

    fn matches_host(&self, host: &Host) -> bool {
        match (&self.host, host) {
            (HostPattern::Exact(n), Host::Name(h)) => n == h,
            (HostPattern::Below(n), Host::Name(h)) => {
                h.len() > n.len() + 1 && h.ends_with(n.as_str()) && h[..h.len() - n.len()].ends_with('.')
            }
            (HostPattern::Net { addr, prefix }, Host::Ip(ip)) => in_net(*ip, *addr, *prefix),
            _ => false,
        }
    }
}

fn in_net(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// The network part of a resolved profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkPolicy {
    pub mode: NetworkMode,
    /// Destinations the proxy may reach (mode `proxy`).
    pub allow: Vec<NetRule>,
    /// Destinations it never reaches, whatever `allow` says.
    pub deny: Vec<NetRule>,
    /// The ports an `allow` entry without its own port stands for.
    pub tcp_connect: BTreeSet<u16>,
    /// Loopback ports the worker may listen on and connect to (its own
    /// servers, inside its own network namespace).
    pub tcp_bind: BTreeSet<u16>,
    /// UDP sockets (loopback only, in the worker's own namespace).
    pub udp: bool,
}

/// Why the proxy refused a destination; said in-band to the worker and in
/// the `network_denial` event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{host} is not a valid host: {why}")]
    BadHost { host: String, why: HostError },
    #[error("{host}:{port} is on the deny list of profile {profile} ({rule})")]
    Denied {
        host: Host,
        port: u16,
        profile: String,
        rule: String,
    },
    #[error("{host} is not on the allowlist of profile {profile}")]
    NotAllowed { host: Host, profile: String },
    #[error("port {port} of {host} is not allowed by profile {profile}")]
    Port { host: Host, port: u16, profile: String },
    #[error("profile {profile} has no network access (mode none)")]
    Offline { profile: String },
}

impl Refusal {
    /// A short machine-readable reason (the `X-Warden-Denied` header, the
    /// event's `reason`).
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::BadHost { .. } => "bad-host",
            Refusal::Denied { .. } => "deny-list",
            Refusal::NotAllowed { .. } => "not-allowed",
            Refusal::Port { .. } => "port",
            Refusal::Offline { .. } => "offline",
        }
    }
}

impl NetworkPolicy {
    /// Whether the proxy may reach `host`:`port` for profile `profile`.
    /// Deny wins; an IP address passes only an entry that names it.
    pub fn check(&self, profile: &str, host: &Host, port: u16) -> Result<(), Refusal> {
        if self.mode == NetworkMode::None {
            return Err(Refusal::Offline {
                profile: profile.to_string(),
            });
        }
        if let Some(rule) = self
            .deny
            .iter()
            .find(|r| r.matches_host(host) && r.port.is_none_or(|p| p == port))
        {
            return Err(Refusal::Denied {
                host: host.clone(),
                port,
                profile: profile.to_string(),
                rule: rule.to_string(),
            });
        }
        let named: Vec<&NetRule> = self.allow.iter().filter(|r| r.matches_host(host)).collect();
        if named.is_empty() {
            return Err(Refusal::NotAllowed {
                host: host.clone(),
                profile: profile.to_string(),
            });
        }
        let port_ok = named
            .iter()
            .any(|r| r.port.map_or(self.tcp_connect.contains(&port), |p| p == port));
        if !port_ok {
            return Err(Refusal::Port {
                host: host.clone(),
                port,
                profile: profile.to_string(),
            });
        }
        Ok(())
    }

    /// Whether an allow entry names `ip` (or a range holding it): what makes
    /// an internal address reachable.
    pub fn lists_address(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.allow
            .iter()
            .any(|r| matches!(r.host, HostPattern::Net { addr, prefix } if in_net(ip, addr, prefix)))
    }
}

/// The class of an address the proxy never dials unless a profile lists it:
/// loopback, link-local (cloud metadata lives there), private (RFC 1918,
/// unique-local), shared (carrier-grade NAT), multicast, broadcast,
/// unspecified and reserved ranges.
pub fn internal_address(ip: IpAddr) -> Option<&'static str> {
    match canonical_ip(ip) {
        IpAddr::V4(a) => internal_v4(a),
        IpAddr::V6(a) => {
            let seg0 = a.segments()[0];
            if a.is_loopback() {
                Some("loopback")
            } else if a.is_unspecified() {
                Some("unspecified")
            } else if a.is_multicast() {
                Some("multicast")
            } else if seg0 & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if seg0 & 0xfe00 == 0xfc00 {
                Some("private")
            } else if seg0 & 0xffc0 == 0xfec0 {
                Some("site-local")
            } else if let Some(v4) = nat64_or_compatible(a) {
                internal_v4(v4)
            } else {
                None
            }
        }
    }
}

fn internal_v4(a: Ipv4Addr) -> Option<&'static str> {
    let o = a.octets();
    if a.is_loopback() {
        Some("loopback")
    } else if a.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if a.is_link_local() {
        Some("link-local")
    } else if a.is_private() {
        Some("private")
    } else if o[0] == 100 && o[1] & 0xc0 == 64 {
        Some("shared")
    } else if a.is_multicast() {
        Some("multicast")
    } else if a.is_broadcast() || o[0] >= 240 {
        Some("reserved")
    } else {
        None
    }
}

/// The IPv4 address inside an IPv4-compatible (`::a.b.c.d`) or NAT64
/// (`64:ff9b::a.b.c.d`) address.
fn nat64_or_compatible(a: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = a.segments();
    let tail = Ipv4Addr::new(
        u8::try_from(s[6] >> 8).ok()?,
        u8::try_from(s[6] & 0xff).ok()?,
        u8::try_from(s[7] >> 8).ok()?,
        u8::try_from(s[7] & 0xff).ok()?,
    );
    let compatible = s[..6].iter().all(|x| *x == 0);
    let nat64 = s[0] == 0x64 && s[1] == 0xff9b && s[2..6].iter().all(|x| *x == 0);
    (compatible || nat64).then_some(tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> NetRule {
        NetRule::try_from(s.to_string()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn host(s: &str) -> Host {
        Host::parse(s).unwrap()
    }

    fn policy(allow: &[&str], deny: &[&str]) -> NetworkPolicy {
        NetworkPolicy {
            mode: NetworkMode::Proxy,
            allow: allow.iter().map(|r| rule(r)).collect(),
            deny: deny.iter().map(|r| rule(r)).collect(),
            tcp_connect: BTreeSet::from([443]),
            tcp_bind: BTreeSet::new(),
            udp: false,
        }
    }

    #[test]
    fn hosts_are_canonicalised_or_refused() {
        assert_eq!(host("GitHub.COM."), Host::Name("github.com".into()));
        assert_eq!(host("[::1]"), Host::Ip("::1".parse().unwrap()));
        assert_eq!(host("::ffff:127.0.0.1"), Host::Ip("127.0.0.1".parse().unwrap()));
        for (bad, why) in [
            ("evil.com\0.github.com", HostError::Char('\0')),
            ("evil.com\r\nx", HostError::Char('\r')),
            ("evil%2ecom", HostError::Char('%')),
            ("bücher.de", HostError::Char('ü')),
            ("a b", HostError::Char(' ')),
            ("user@host", HostError::Char('@')),
            ("a..b", HostError::Label),
            ("", HostError::Empty),
            ("127.1", HostError::BadAddress),
            ("0x7f000001", HostError::BadAddress),
            ("2130706433", HostError::BadAddress),
            ("under_score.com", HostError::Char('_')),
        ] {
            assert_eq!(Host::parse(bad), Err(why), "{bad:?}");
        }
    }

    #[test]
    fn deny_wins_wildcards_cover_subdomains_and_ports_default_to_tcp_connect() {
        let p = policy(
            &["*.github.com", "github.com", "pypi.org:8443", "10.1.2.0/24"],
            &["gist.github.com"],
        );
        assert_eq!(p.check("t", &host("api.github.com"), 443), Ok(()));
        assert_eq!(p.check("t", &host("github.com"), 443), Ok(()));
        assert_eq!(
            p.check("t", &host("gist.github.com"), 443).unwrap_err().code(),
            "deny-list",
            "a deny entry beats a wildcard allow"
        );
        assert_eq!(
            p.check("t", &host("notgithub.com"), 443).unwrap_err().code(),
            "not-allowed"
        );
        assert_eq!(p.check("t", &host("github.com"), 80).unwrap_err().code(), "port");
        assert_eq!(p.check("t", &host("pypi.org"), 8443), Ok(()));
        assert_eq!(p.check("t", &host("pypi.org"), 443).unwrap_err().code(), "port");
        assert_eq!(p.check("t", &host("10.1.2.3"), 443), Ok(()));
        assert!(p.lists_address("10.1.2.3".parse().unwrap()));
        assert!(!p.lists_address("10.1.3.3".parse().unwrap()));
        // A name rule never admits an address, whatever it resolves to.
        assert_eq!(
            p.check("t", &host("140.82.112.3"), 443).unwrap_err().code(),
            "not-allowed"
        );
        let e = p.check("claude-code", &host("evil.example"), 443).unwrap_err();
        assert_eq!(
            e.to_string(),
            "evil.example is not on the allowlist of profile claude-code"
        );
    }

    #[test]
    fn rules_parse_and_print_back() {
        for text in [
            "example.com",
            "*.example.com:8443",
            "10.0.0.0/8",
            "10.1.2.3:22",
            "[::1]:443",
            "[fd00::/8]",
        ] {
            assert_eq!(rule(text).to_string(), text);
        }
        for bad in [
            "*",
            "a.*.com",
            "*.10.0.0.1",
            "10.0.0.0/33",
            "host:0",
            "host:x",
            "ex%41mple.com",
        ] {
            assert!(NetRule::try_from(bad.to_string()).is_err(), "{bad}");
        }
    }

    #[test]
    fn internal_addresses_are_classified() {
        for (ip, class) in [
            ("127.0.0.1", Some("loopback")),
            ("169.254.169.254", Some("link-local")),
            ("10.0.0.5", Some("private")),
            ("192.168.1.1", Some("private")),
            ("172.16.0.1", Some("private")),
            ("100.64.0.1", Some("shared")),
            ("0.0.0.0", Some("unspecified")),
            ("224.0.0.1", Some("multicast")),
            ("255.255.255.255", Some("reserved")),
            ("::1", Some("loopback")),
            ("fe80::1", Some("link-local")),
            ("fd00::1", Some("private")),
            ("::ffff:10.0.0.1", Some("private")),
            ("64:ff9b::a9fe:a9fe", Some("link-local")),
            ("140.82.112.3", None),
            ("2606:4700::1", None),
        ] {
            assert_eq!(internal_address(ip.parse().unwrap()), class, "{ip}");
        }
    }

    #[test]
    fn the_removed_tcp_mode_says_what_replaced_it() {
        let e = NetworkMode::try_from("tcp".to_string()).unwrap_err();
        assert!(e.contains("was removed") && e.contains("\"proxy\""), "{e}");
    }
}
