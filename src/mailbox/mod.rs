//! The mailbox connection check.

pub mod sasl;
