//! Variables and secrets for workers.

pub mod host;
pub mod vault;
