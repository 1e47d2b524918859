//! The Postgres accelerator's building blocks: the wire protocol with
//! bounded framing, SCRAM-SHA-256 authentication of clients, and the
//! classification of statements for pooling and caching, and the per-database
//! query result cache. The pooler and the proxy listener are built on these.

pub mod cache;
pub mod classify;
pub mod protocol;
pub mod scram;
