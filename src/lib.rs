//! mail-integration-operator: keeps mailbox integrations connected through OAuth 2.0.
#![forbid(unsafe_code)]

pub mod api;
pub(crate) mod http_limit;
pub mod mailbox;
pub mod metrics;
pub mod oauth;
pub mod provider;
pub mod reason;
pub mod reconcile;
pub mod secret;
pub mod web;
