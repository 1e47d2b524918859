//! What a multi-tenant server serves, as a durable record: each worker,
//! `(tenant, name)`, has immutable versions (a component stored by its
//! SHA-256 and the spec it was deployed with) and one active deployment (a
//! version, or a split of up to four), which can be disabled and enabled.
//!
//! [`RegistryStore`] keeps that record in `DATA_DIR/registry.sqlite3` and the
//! components in `DATA_DIR/components/`. Every change is one transaction,
//! on disk when it returns, so a restart, after `kill -9` too, finds exactly
//! what was acknowledged. The live registry in the runtime builds what it
//! serves from this record.

pub mod deployment;
pub mod store;

pub use deployment::{Deployment, DeploymentError, MAX_SPLIT, Target, random_roll, sticky_roll};
pub use store::{ComponentHash, MIN_KEPT_VERSIONS, RegistryError, RegistryStore, VersionRecord, WorkerRecord};
