//! Integration tests of the whole serving path: a real server on loopback,
//! real guest components, real HTTP clients.

mod harness;

mod admin;
mod bindings;
mod cache;
mod connections;
mod egress;
mod egress_dns;
mod fair_cpu;
mod host_work_sql;
mod hostile_requests;
mod hostile_workers;
mod instance_quota;
mod isolation;
mod ledger;
mod lifecycle;
mod lingering_close;
mod log_flood;
mod memory_budget;
mod postgres_binding;
mod registry;
mod routing;
mod storage_quota;
mod streaming;
