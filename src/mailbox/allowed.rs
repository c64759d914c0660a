//! Which mail servers the operator may connect to. A MailIntegration names its mail server, and the
//! mailbox check sends a live access token there from inside the cluster: without a limit, whoever
//! may edit a MailIntegration could point the check at a server of theirs (and collect the token),
//! or at a service only the operator's pod can reach (and read its answers back from the status).
//! So the check connects only to hosts on this list: by default the providers' own mail hosts,
//! plus what the operator's admin adds with `--mailbox-allowed-hosts`, and loopback only when the
//! operator runs with `--allow-loopback` (for development and tests: on loopback are the pod's own
//! sidecars).
//!
//! A name on the list may resolve to anything its DNS says, so the check resolves it once, checks
//! every address ([`AllowedHosts::allows_address`]: no loopback, link-local (the cloud metadata
//! address among them), private or otherwise special address unless the list names it, as an
//! address or a network such as `10.20.0.0/16`), and connects to the addresses it checked.

use ipnet::IpNet;
use std::net::IpAddr;

/// The providers' mail hosts (Google, Microsoft 365).
pub const DEFAULT_ALLOWED_HOSTS: &[&str] = &[
    "imap.gmail.com",
    "pop.gmail.com",
    "smtp.gmail.com",
    "outlook.office365.com",
    "smtp.office365.com",
];

/// Loopback, allowed only with `--allow-loopback` ([`AllowedHosts::with_loopback`]).
pub const LOOPBACK_HOSTS: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// A list of host names (`mail.example.com`), suffix patterns (`*.example.com`: any name below
/// example.com, not example.com itself), IP addresses and networks (`10.20.0.0/16`: addresses
/// only), compared case-insensitively.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedHosts {
    entries: Vec<String>,
    nets: Vec<IpNet>,
}

/// Whether `ip` is an address a name on the list may not lead to unless the list names it:
/// loopback, unspecified, link-local (169.254.0.0/16 holds the cloud metadata address), private
/// (10/8, 172.16/12, 192.168/16, fc00::/7), shared (100.64/10), multicast, broadcast, documentation
/// and reserved ranges; an IPv6 address that carries such an IPv4 address for a translator or a
/// tunnel to reach (NAT64 `64:ff9b::/96`, 6to4 `2002::/16`, IPv4-compatible `::/96`), and the
/// prefixes whose IPv4 address is local or hidden (NAT64 local-use `64:ff9b:1::/48`, Teredo
/// `2001::/32`).
pub fn is_special(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let first = s[0];
            embedded_v4(v6).is_some_and(|v4| is_special(IpAddr::V4(v4)))
                || (first == 0x64 && s[1] == 0xff9b && s[2] == 1)
                || (first == 0x2001 && s[1] == 0)
                || v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8
        }
    }
}

/// The IPv4 address an IPv6 address hands to a NAT64 translator (`64:ff9b::/96`), a 6to4 relay
/// (`2002::/16`) or the deprecated IPv4-compatible form (`::/96`).
fn embedded_v4(v6: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    use std::net::Ipv4Addr;
    match v6.octets() {
        [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0, a, b, c, d]
        | [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, a, b, c, d] => Some(Ipv4Addr::new(a, b, c, d)),
        [0x20, 0x02, a, b, c, d, ..] => Some(Ipv4Addr::new(a, b, c, d)),
        _ => None,
    }
}

impl Default for AllowedHosts {
    fn default() -> Self {
        Self::new(DEFAULT_ALLOWED_HOSTS.iter().copied())
    }
}

fn normal(host: &str) -> String {
    host.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

impl AllowedHosts {
    /// Exactly these entries (empty ones are ignored).
    pub fn new<'a>(entries: impl IntoIterator<Item = &'a str>) -> Self {
        let mut entries: Vec<String> = entries
            .into_iter()
            .map(normal)
            .filter(|e| !e.is_empty())
            .collect();
        entries.sort();
        entries.dedup();
        let nets = entries.iter().filter_map(|e| e.parse().ok()).collect();
        Self { entries, nets }
    }

    /// The defaults plus `extra`.
    pub fn with_defaults<'a>(extra: impl IntoIterator<Item = &'a str>) -> Self {
        Self::new(DEFAULT_ALLOWED_HOSTS.iter().copied().chain(extra))
    }

    /// These entries and loopback (`--allow-loopback`, for development and tests).
    pub fn with_loopback(self) -> Self {
        Self::new(
            self.entries
                .iter()
                .map(String::as_str)
                .chain(LOOPBACK_HOSTS.iter().copied()),
        )
    }

    /// Whether the check may connect to `ip`, an address an allowed host resolved to: any address
    /// that is not [special](is_special), and a special one only when the list names it (as an
    /// address, or in a network).
    pub fn allows_address(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        !is_special(ip)
            || self.nets.iter().any(|n| n.contains(&ip))
            || self
                .entries
                .iter()
                .any(|e| e.parse::<IpAddr>().is_ok_and(|a| a.to_canonical() == ip))
    }

    /// Whether the check may connect to `host`.
    pub fn allows(&self, host: &str) -> bool {
        let host = normal(host);
        if host.is_empty() {
            return false;
        }
        let ip: Option<IpAddr> = host.parse().ok();
        self.entries.iter().any(|e| match e.strip_prefix("*.") {
            // A pattern covers names only, never an IP address.
            Some(suffix) => {
                ip.is_none()
                    && host.len() > suffix.len()
                    && host.ends_with(suffix)
                    && host
                        .len()
                        .checked_sub(suffix.len())
                        .and_then(|i| i.checked_sub(1))
                        .and_then(|i| host.as_bytes().get(i))
                        == Some(&b'.')
            }
            None => match (ip, e.parse::<IpAddr>().ok()) {
                (Some(a), Some(b)) => a == b,
                _ => *e == host,
            },
        })
    }

    /// The entries, for messages and logs.
    pub fn describe(&self) -> String {
        self.entries.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_cover_the_providers_and_loopback_only_with_the_flag() {
        let without = AllowedHosts::default();
        for no in ["localhost", "127.0.0.1", "::1"] {
            assert!(!without.allows(no), "{no}");
            assert!(!without.allows_address("127.0.0.1".parse().unwrap()));
        }
        let a = AllowedHosts::default().with_loopback();
        assert!(a.allows_address("127.0.0.1".parse().unwrap()));
        assert!(a.allows_address("::1".parse().unwrap()));
        assert!(!a.allows_address("127.0.0.2".parse().unwrap()));
        for ok in [
            "imap.gmail.com",
            "IMAP.Gmail.com.",
            "outlook.office365.com",
            "smtp.office365.com",
            "127.0.0.1",
            "::1",
            "[::1]",
            "localhost",
        ] {
            assert!(a.allows(ok), "{ok}");
        }
        for no in [
            "169.254.169.254",
            "kubernetes.default.svc",
            "10.0.0.1",
            "evil.example.com",
            "imap.gmail.com.evil.example",
            "127.0.0.2",
            "",
        ] {
            assert!(!a.allows(no), "{no}");
        }
    }

    #[test]
    fn patterns_match_names_below_a_domain_only() {
        let a = AllowedHosts::with_defaults(["*.mail.example.com", "10.1.2.3", " "]);
        assert!(a.allows("imap.mail.example.com"));
        assert!(a.allows("a.b.mail.example.com"));
        assert!(!a.allows("mail.example.com"));
        assert!(!a.allows("evilmail.example.com"));
        assert!(!a.allows("x.mail.example.com.evil"));
        assert!(a.allows("10.1.2.3"));
        assert!(!a.allows("10.1.2.4"));
        assert!(a.allows("imap.gmail.com"));
        assert!(a.describe().contains("*.mail.example.com"));
    }

    #[test]
    fn resolved_addresses_must_be_public_unless_the_list_names_them() {
        let a = AllowedHosts::with_defaults(["mail.example.com", "10.20.0.0/16", "192.168.1.5"]);
        for public in [
            "142.250.1.108",
            "2a00:1450:4001:c02::6c",
            "64:ff9b::8efa:16c",
            "2002:8efa:16c::1",
        ] {
            assert!(a.allows_address(public.parse().unwrap()), "{public}");
        }
        for special in [
            "127.0.0.1",
            "169.254.169.254",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.6",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "fe80::1",
            "fd00::1",
            "::",
            "224.0.0.1",
            // IPv4 addresses that a translator or tunnel would reach for the name.
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::a00:1",
            "64:ff9b::7f00:1",
            "2002:a9fe:a9fe::1",
            "2002:c0a8:101::1",
            "::a9fe:a9fe",
            "::7f00:1",
            "64:ff9b:1::a00:1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        ] {
            assert!(!a.allows_address(special.parse().unwrap()), "{special}");
        }
        assert!(
            a.allows_address("10.20.3.4".parse().unwrap()),
            "in a listed network"
        );
        assert!(
            a.allows_address("192.168.1.5".parse().unwrap()),
            "a listed address"
        );
        assert!(a.allows_address("::ffff:10.20.0.9".parse().unwrap()));
    }
}
