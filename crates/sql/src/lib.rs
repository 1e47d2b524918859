//! SQL databases for workers.

pub mod database;
mod functions;
pub mod host;
pub mod memory;
