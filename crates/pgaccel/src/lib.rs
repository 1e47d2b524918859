//! The Postgres accelerator's building blocks: the wire protocol with
//! bounded framing, SCRAM-SHA-256 authentication of clients, the
//! classification of statements for pooling and caching, authenticated
//! connections to the origin database, and TLS for clients. The pooler, the
//! cache and the proxy listener are built on these.

pub mod classify;
pub mod origin;
pub mod protocol;
pub mod scram;
pub mod tls;
