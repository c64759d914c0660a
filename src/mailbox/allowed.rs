//! Which mail servers the operator may connect to. A MailIntegration names its mail server, and the
//! mailbox check sends a live access token there from inside the cluster: without a limit, whoever
//! may edit a MailIntegration could point the check at a server of theirs (and collect the token),
//! or at a service only the operator's pod can reach (and read its answers back from the status).
//! So the check connects only to hosts on this list: by default the providers' own mail hosts and
//! loopback, plus what the operator's admin adds with `--mailbox-allowed-hosts`.

use std::net::IpAddr;

/// The providers' mail hosts (Google, Microsoft 365) and loopback.
pub const DEFAULT_ALLOWED_HOSTS: &[&str] = &[
    "imap.gmail.com",
    "pop.gmail.com",
    "smtp.gmail.com",
    "outlook.office365.com",
    "smtp.office365.com",
    "localhost",
    "127.0.0.1",
    "::1",
];

/// A list of host names (`mail.example.com`), suffix patterns (`*.example.com`: any name below
/// example.com, not example.com itself) and IP addresses, compared case-insensitively.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedHosts {
    entries: Vec<String>,
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
        Self { entries }
    }

    /// The defaults plus `extra`.
    pub fn with_defaults<'a>(extra: impl IntoIterator<Item = &'a str>) -> Self {
        Self::new(DEFAULT_ALLOWED_HOSTS.iter().copied().chain(extra))
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
    fn defaults_cover_the_providers_and_loopback_only() {
        let a = AllowedHosts::default();
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
}
