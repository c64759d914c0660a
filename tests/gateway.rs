//! The mail gateway (issue 22, docs/gateway.md), against the real kube-apiserver and oidc-provider:
//! the operator's per-app credentials and the gateway Secret, and the gateway process in front of
//! Dovecot. One control plane for the whole binary; each test has its own namespace and operator.
//!
//! Each helper's tests live in a module of their own under tests/gateway/.

mod support;

#[path = "gateway/credentials.rs"]
mod credentials;

#[path = "gateway/smtp.rs"]
mod smtp;

#[path = "gateway/imap_pop3.rs"]
mod imap_pop3;

#[path = "gateway/operator_gateway.rs"]
mod operator_gateway;

#[path = "gateway/upstream_tls.rs"]
mod upstream_tls;

#[path = "gateway/login_path.rs"]
mod login_path;

#[path = "gateway/reuse.rs"]
mod reuse;
