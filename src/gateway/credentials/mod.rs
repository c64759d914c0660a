//! The gateway credentials (issue 22, point 1; docs/gateway.md "Giving an app a credential"): for
//! each MailIntegration with `spec.gateway`, the operator writes
//!
//! - per app, the Secret `<integration>-gateway-<app>` the app mounts: username
//!   `<namespace>/<integration>/<app>`, a password of 256 random bits, the gateway's host and ports
//!   and URL snippets; the gateway never reads it;
//! - the gateway Secret `<integration>-gateway`, the only thing the gateway reads: `gateway.json`
//!   ([`crate::gateway::config::GatewayConfig`], with salted SHA-256 verifiers of the passwords, never
//!   a password) and the current access token (written with the token Secret, see [`token`]).
//!
//! A part of its own beside the main controller, run by the same process while it leads
//! ([`run`]): it reacts to MailIntegrations and to the Secrets it owns. The decisions are pure
//! ([`decide`], [`secrets`], [`status`]); [`reconcile`] reads the caches and writes.

pub mod decide;
pub mod reconcile;
pub mod secrets;
pub mod status;
pub mod token;

pub use reconcile::{Credentials, run};

/// Where apps reach the gateway: written into every app Secret (flags `--gateway-host` and
/// `--gateway-*-port` of `run`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewaySettings {
    pub host: String,
    pub ports: GatewayPorts,
}

/// The gateway Service's ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GatewayPorts {
    /// IMAP with STARTTLS.
    pub imap: u16,
    /// IMAP over TLS.
    pub imaps: u16,
    /// POP3 over TLS.
    pub pop3s: u16,
    /// SMTP submission with STARTTLS.
    pub smtp: u16,
    /// SMTP submission over TLS.
    pub smtps: u16,
}

impl Default for GatewayPorts {
    fn default() -> Self {
        Self {
            imap: 143,
            imaps: 993,
            pop3s: 995,
            smtp: 587,
            smtps: 465,
        }
    }
}

/// The default `--gateway-host`: the chart's gateway Service in the operator's namespace.
pub fn default_host(pod_namespace: Option<&str>) -> String {
    format!(
        "mail-integration-operator-gateway.{}.svc",
        pod_namespace.filter(|n| !n.is_empty()).unwrap_or("default")
    )
}
