//! Integration tests of the Postgres accelerator against a real Postgres:
//! each test starts its own throwaway cluster (`cordon_testpg::TestPostgres`).
//! Behaviour Postgres never shows (TLS origins, other authentication methods,
//! broken servers) is tested against fake servers on loopback.

mod origin;
mod smoke;

mod harness;

mod bomb;
mod caching;
mod keys;
mod proxy;
mod stale;

mod attack;
mod handshake_flood;
mod pool_bounds;
mod session_state;
