//! Integration tests of the Postgres accelerator against a real Postgres:
//! each test starts its own throwaway cluster (`postgres::TestPostgres`).

mod postgres;

mod smoke;
