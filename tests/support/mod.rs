//! Shared by the integration tests: real servers started on loopback, stopped with the test binary.
#![allow(dead_code)]

pub mod control_plane;
pub mod fault_proxy;
pub mod oauth;
pub mod process;

#[allow(unused_imports)] // not every test binary uses them
pub use control_plane::{ensure_crd, unique_namespace};
