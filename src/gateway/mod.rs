//! The mail gateway (`mail-integration-operator gateway`): IMAP, POP3 and SMTP for apps that speak
//! passwords only, with the operator's access tokens upstream (docs/gateway.md).
//!
//! The operator writes, per integration with `spec.gateway`, a gateway Secret holding the current
//! access token and [`config::GatewayConfig`] (verifiers of the apps' passwords, never a password);
//! the gateway reads only those Secrets.

pub mod config;
pub mod session;
pub mod smtp;
pub mod upstream;
