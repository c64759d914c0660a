//! The reconciler: a pure decision (what should happen, given the resource, its Secrets and the
//! clock) and a small layer that applies it to the API and the provider.

mod act;
pub mod cache;
pub mod cached_secret;
pub mod context;
pub mod controller;
pub mod decide;
pub mod error;
pub mod events;
pub mod finalizer;
pub mod held;
pub mod inflight;
pub mod lifetime;
pub mod mailbox_check;
pub mod marked;
mod observe;
pub mod observed;
pub mod refresh;
pub mod remembered;
mod report;
pub mod schedule;
pub mod secrets;
pub mod share;
pub mod slots;
pub mod template;
pub mod watches;
