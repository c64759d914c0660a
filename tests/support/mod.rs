//! Shared by the integration tests: real servers started on loopback, stopped with the test binary.
#![allow(dead_code)]

pub mod control_plane;
pub mod operator;
pub mod process;

pub use control_plane::{ensure_crd, unique_namespace};
