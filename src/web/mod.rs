//! HTTP: health, readiness and metrics on their own port; the sign-in pages and the OAuth callback
//! on another.

pub mod health;
pub mod serve;
pub mod signin;
