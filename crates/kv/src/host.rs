//! `wasi:keyvalue` (store, atomics, batch) and `cordon:kv/ext` for guests.
//! A guest opens a bucket by its binding name; only the worker's
//! `[[worker.kv]]` grants resolve, each to its tenant's namespace. Storage
//! calls block, so they run on the key-value pool ([`Namespaces::pool`]),
//! off the threads that run guests, under the tenant's share of it; a call
//! whose request ends is dropped from the queue or interrupted, and the CPU
//! time a call takes on its thread is charged to the request.

use std::sync::Arc;
use std::time::Duration;

use cordon_blocking::{BlockingPool, CpuCharge, JobContext, PoolError};
use cordon_config::WorkerConfig;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::store::{KvError, KvLimits, Namespace, Namespaces};

mod generated {
    wasmtime::component::bindgen!({
        path: ["../../wit/keyvalue", "../../wit/cordon-kv"],
        world: "cordon:kv/imports",
        imports: { default: async | trappable },
        with: {
            "wasi:keyvalue/store.bucket": super::Bucket,
        },
    });
}

use generated::cordon::kv::ext;
use generated::wasi::keyvalue::{atomics, batch, store};

/// The WIT interfaces this capability implements, as a component names its
/// imports; a component importing any of them needs a `[[worker.kv]]` grant.
pub const INTERFACES: &[&str] =
    &["wasi:keyvalue/store@0.2.0-draft", "wasi:keyvalue/atomics@0.2.0-draft", "wasi:keyvalue/batch@0.2.0-draft", "cordon:kv/ext@0.1.0"];

/// A worker's key-value grants, opened once at startup.
pub struct WorkerKv {
    tenant: String,
    pool: Option<Arc<BlockingPool>>,
    buckets: Vec<(String, Arc<Namespace>)>,
    limits: KvLimits,
    max_operations: u64,
}

impl WorkerKv {
    /// Opens every namespace the worker is granted, and sets its tenant's
    /// storage quota and the free-space reserve from its config.
    pub fn open(worker: &WorkerConfig, namespaces: &Namespaces) -> Result<WorkerKv, KvError> {
        let ledger = namespaces.ledger();
        ledger.set_tenant_quota(&worker.tenant, worker.storage.tenant_quota_bytes);
        ledger.set_free_space_reserve(worker.storage.free_space_reserve_bytes);
        let buckets = worker
            .grants
            .kv
            .iter()
            .map(|g| Ok((g.binding.clone(), namespaces.open(&worker.tenant, &g.namespace)?)))
            .collect::<Result<Vec<_>, KvError>>()?;
        let limits = KvLimits { max_value_bytes: worker.limits.max_kv_value_bytes as usize, ..KvLimits::default() };
        Ok(WorkerKv {
            tenant: worker.tenant.clone(),
            pool: Some(Arc::clone(namespaces.pool())),
            buckets,
            limits,
            max_operations: worker.limits.max_kv_operations,
        })
    }

    /// No grants: every `open` fails.
    pub fn none() -> WorkerKv {
        WorkerKv { tenant: String::new(), pool: None, buckets: Vec::new(), limits: KvLimits::default(), max_operations: 0 }
    }
}

/// One request's key-value state.
pub struct RequestKv {
    worker: Arc<WorkerKv>,
    operations: cordon_config::OperationBudget,
    cpu: CpuCharge,
    memory: Arc<cordon_memory::Account>,
}

impl RequestKv {
    /// `cpu` collects the CPU time calls take on the pool's threads;
    /// `memory` is charged with the values a batch read holds on the host.
    pub fn new(worker: Arc<WorkerKv>, cpu: CpuCharge, memory: Arc<cordon_memory::Account>) -> RequestKv {
        let operations = cordon_config::OperationBudget::new(worker.max_operations, "key-value operation", "max_kv_operations");
        RequestKv { worker, operations, cpu, memory }
    }

    /// Operations made so far.
    pub fn operations(&self) -> u64 {
        self.operations.used()
    }

    /// Counts `n` operations against `max_kv_operations`.
    fn charge(&mut self, n: usize) -> Result<(), store::Error> {
        self.operations.charge(n).map_err(store::Error::Other)
    }
}

/// An open bucket (`wasi:keyvalue/store.bucket`).
pub struct Bucket {
    namespace: Arc<Namespace>,
}

/// What the host functions see of the store's data.
pub struct KvView<'a> {
    pub state: &'a mut RequestKv,
    pub table: &'a mut ResourceTable,
}

struct Kv;

impl HasData for Kv {
    type Data<'a> = KvView<'a>;
}

/// Adds the key-value interfaces to `linker`.
pub fn add_to_linker<T: Send + 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> KvView<'_>) -> wasmtime::Result<()> {
    generated::Imports::add_to_linker::<T, Kv>(linker, get)
}

fn guest_error(e: KvError) -> store::Error {
    match e {
        KvError::Storage(message) => {
            tracing::warn!(error = %message, "key-value storage failed");
            store::Error::Other("key-value storage failed".to_string())
        }
        other => store::Error::Other(other.to_string()),
    }
}

impl RequestKv {
    /// Runs a blocking storage call on the key-value pool as the worker's
    /// tenant, and charges its CPU time to the request. Dropping the future
    /// cancels the call.
    async fn blocking<R: Send + 'static>(&self, f: impl FnOnce() -> Result<R, KvError> + Send + 'static) -> Result<R, store::Error> {
        let Some(pool) = &self.worker.pool else {
            return Err(store::Error::Other("key-value storage is not available to this worker".to_string()));
        };
        let pool_error = |e: PoolError| store::Error::Other(format!("key-value call refused: {e}"));
        let done = pool.spawn(&self.worker.tenant, move |_: &JobContext| f()).map_err(pool_error)?.await.map_err(pool_error)?;
        self.cpu.add(done.cpu_time);
        done.value.map_err(guest_error)
    }
}

impl KvView<'_> {
    fn namespace(&self, bucket: &Resource<Bucket>) -> wasmtime::Result<Arc<Namespace>> {
        Ok(self.table.get(bucket)?.namespace.clone())
    }
}

impl store::Host for KvView<'_> {
    async fn open(&mut self, identifier: String) -> wasmtime::Result<Result<Resource<Bucket>, store::Error>> {
        let Some((_, namespace)) = self.state.worker.buckets.iter().find(|(b, _)| *b == identifier) else {
            return Ok(Err(store::Error::Other(format!(
                "no such binding \"{identifier}\": this worker has no [[worker.kv]] grant with binding = \"{identifier}\""
            ))));
        };
        let bucket = Bucket { namespace: namespace.clone() };
        Ok(Ok(self.table.push(bucket)?))
    }
}

impl store::HostBucket for KvView<'_> {
    async fn get(&mut self, bucket: Resource<Bucket>, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, store::Error>> {
        let ns = self.namespace(&bucket)?;
        if let Err(e) = self.state.charge(1) {
            return Ok(Err(e));
        }
        Ok(self.state.blocking(move || ns.get(&key)).await)
    }

    async fn set(&mut self, bucket: Resource<Bucket>, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), store::Error>> {
        let ns = self.namespace(&bucket)?;
        if let Err(e) = self.state.charge(1) {
            return Ok(Err(e));
        }
        let limits = self.state.worker.limits.clone();
        Ok(self.state.blocking(move || ns.set(&key, &value, None, &limits)).await)
    }

    async fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> wasmtime::Result<Result<(), store::Error>> {
        let ns = self.namespace(&bucket)?;
        if let Err(e) = self.state.charge(1) {
            return Ok(Err(e));
        }
        Ok(self.state.blocking(move || ns.delete(&key)).await)
    }

    async fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> wasmtime::Result<Result<bool, store::Error>> {
        let ns = self.namespace(&bucket)?;
        if let Err(e) = self.state.charge(1) {
            return Ok(Err(e));
        }
        Ok(self.state.blocking(move || ns.exists(&key)).await)
    }

    async fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> wasmtime::Result<Result<store::KeyResponse, store::Error>> {
        self.list(bucket, String::new(), cursor).await
    }

    async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl KvView<'_> {
    async fn list(
        &mut self,
        bucket: Resource<Bucket>,
        prefix: String,
        cursor: Option<u64>,
    ) -> wasmtime::Result<Result<store::KeyResponse, store::Error>> {
        let ns = self.namespace(&bucket)?;
        if let Err(e) = self.state.charge(1) {
            return Ok(Err(e));
        }
        let limits = self.state.worker.limits.clone();
        Ok(self.state.blocking(move || ns.list(&prefix, cursor, &limits)).await.map(|(keys, cursor)| store::KeyResponse { keys, cursor }))
    }
}

impl atomics::Host for KvView<'_> {
    async fn increment(&mut self, bucket: Resource<Bucket>, key: String, delta: u64) -> wasmtime::Result<Result<u64, store::Error>> {
        let ns = self.namespace(&bucket)?;
        if let Err(e) = self.state.charge(1) {
            return Ok(Err(e));
        }
        Ok(self.state.blocking(move || ns.increment(&key, delta)).await)
    }
}

impl batch::Host for KvView<'_> {
    async fn get_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> wasmtime::Result<Result<Vec<Option<(String, Vec<u8>)>>, store::Error>> {
        let ns = self.namespace(&bucket)?;
        if let Err(e) = self.state.charge(keys.len().max(1)) {
            return Ok(Err(e));
        }
        // The values are held on the host until they are copied into the
        // guest's memory (which is charged again as it grows): each is
        // charged before it is read, and given back when this call returns.
        let mut held = match self.state.memory.hold(0) {
            Ok(held) => held,
            Err(e) => return Ok(Err(store::Error::Other(e.to_string()))),
        };
        let result = self.state.blocking(move || ns.get_many_within(&keys, |bytes| Ok(held.grow(bytes as u64)?)).map(|v| (v, held))).await;
        Ok(result.map(|(values, _held)| values))
    }

    async fn set_many(&mut self, bucket: Resource<Bucket>, entries: Vec<(String, Vec<u8>)>) -> wasmtime::Result<Result<(), store::Error>> {
        let ns = self.namespace(&bucket)?;
        if let Err(e) = self.state.charge(entries.len().max(1)) {
            return Ok(Err(e));
        }
        let limits = self.state.worker.limits.clone();
        Ok(self.state.blocking(move || ns.set_many(&entries, &limits)).await)
    }

    async fn delete_many(&mut self, bucket: Resource<Bucket>, keys: Vec<String>) -> wasmtime::Result<Result<(), store::Error>> {
        let ns = self.namespace(&bucket)?;
        if let Err(e) = self.state.charge(keys.len().max(1)) {
            return Ok(Err(e));
        }
        Ok(self.state.blocking(move || ns.delete_many(&keys)).await)
    }
}

impl ext::Host for KvView<'_> {
    async fn list_prefix(
        &mut self,
        bucket: Resource<Bucket>,
        prefix: String,
        cursor: Option<u64>,
    ) -> wasmtime::Result<Result<store::KeyResponse, store::Error>> {
        self.list(bucket, prefix, cursor).await
    }

    async fn set_with_ttl(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
        ttl_seconds: u64,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let ns = self.namespace(&bucket)?;
        if let Err(e) = self.state.charge(1) {
            return Ok(Err(e));
        }
        let limits = self.state.worker.limits.clone();
        let ttl = Duration::from_secs(ttl_seconds.max(1));
        Ok(self.state.blocking(move || ns.set(&key, &value, Some(ttl), &limits)).await)
    }
}
