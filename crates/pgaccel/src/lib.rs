//! The Postgres accelerator's building blocks: the wire protocol with
//! bounded framing, and SCRAM-SHA-256 authentication of clients. The pooler,
//! the cache and the proxy listener are built on these.

pub mod protocol;
pub mod scram;
