//! HTTP: health, readiness and metrics on their own port.

pub mod health;
