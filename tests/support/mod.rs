//! Shared by the integration tests: real servers started on loopback, stopped with the test binary.
#![allow(dead_code, unused_imports)]

pub mod alert_series;
pub mod api_audit;
pub mod api_proxy;
pub mod browser;
pub mod control_plane;
pub mod dovecot;
pub mod fault_proxy;
pub mod gateway;
pub mod helm;
pub mod keys;
pub mod oauth;
pub mod operator;
pub mod process;
pub mod provider_standin;
pub mod world;

pub use control_plane::{ensure_crd, unique_namespace};
