//! mail-integration-operator: keeps mailbox integrations connected through OAuth 2.0.
#![forbid(unsafe_code)]
// Everything a tenant or a server sends is hostile: no panic on data, no unchecked arithmetic on
// times and durations. Tests may unwrap.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::arithmetic_side_effects,
        clippy::indexing_slicing
    )
)]

pub mod api;
pub mod cli;
pub mod gateway;
pub(crate) mod http_limit;
pub mod kube_client;
pub mod lease;
pub mod mailbox;
pub mod metrics;
pub mod oauth;
pub mod provider;
pub mod reason;
pub mod reconcile;
pub mod secret;
pub mod sync;
pub mod time;
pub mod web;
