//! mail-integration-operator: keeps mailbox integrations connected through OAuth 2.0.
#![forbid(unsafe_code)]

pub mod api;
pub mod mailbox;
pub mod secret;
