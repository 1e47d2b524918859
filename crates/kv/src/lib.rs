//! Key-value stores for workers.

pub mod host;
pub mod store;
