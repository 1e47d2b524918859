//! SQL databases for workers.

pub mod database;
pub mod host;
