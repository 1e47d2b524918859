//! The Postgres accelerator: a transaction-mode pooler with a per-tenant query cache in front of
//! real Postgres, offered as a wire-protocol proxy ([`proxy`]) and to workers ([`exec`]).
//!
//! - [`protocol`]: the v3 wire protocol with bounded framing; [`scram`]: SCRAM-SHA-256 for clients;
//!   [`tls`]: TLS for clients; [`origin`]: authenticated connections to the origin database.
//! - [`classify`]: what a statement reads, writes and leaves behind, for pinning and caching;
//!   [`classifier`]: where texts are classified (inline when cheap, else a bounded pool);
//!   [`catalog`]: what the origin's catalog adds (views, triggers, keys, inheritance, user code).
//! - [`pool`]: the bounded pool of origin connections; [`cache`]: the encrypted result cache;
//!   [`cancel`]: routing of cancel requests to the right backend.
//! - [`session_limits`]: the timeouts clients may not raise; [`session_state`]: the probe that
//!   proves a connection is back in the state it was opened in.
//! - [`accel`]: every configured database, built from the configuration.

pub mod accel;
pub mod cache;
pub mod cancel;
pub mod catalog;
pub mod classifier;
pub mod classify;
pub mod exec;
pub mod origin;
pub mod pool;
pub mod protocol;
pub mod proxy;
pub mod scram;
pub mod session_limits;
pub mod session_state;
pub mod tls;
