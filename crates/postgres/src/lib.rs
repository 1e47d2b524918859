//! Postgres for workers: the `cordon:postgres` binding. The databases, their
//! pools and caches belong to the accelerator (`cordon-pgaccel`); this crate
//! resolves a worker's grants to them and serves the guest's calls.

pub mod host;
