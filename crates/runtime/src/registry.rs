//! The live registry: what the runtime serves, changed while it serves.
//!
//! Everything a request needs to find its worker is one immutable
//! [`Snapshot`] behind an atomic pointer. The gateway takes one snapshot per
//! request, so a request in flight finishes on the version it started with,
//! however many changes land meanwhile. A change ([`Runtime::deploy`],
//! [`Runtime::rollback`], [`Runtime::set_split`], [`Runtime::disable`],
//! [`Runtime::enable`], [`Runtime::remove`]) is written to the durable
//! record first ([`cordon_registry::RegistryStore`]), then a new snapshot
//! is built and swapped in. Changes are serialised: one at a time, so two
//! concurrent deploys of one worker both land, in some order, and no
//! snapshot is ever built from half of one.
//!
//! `cordon.toml` is the first deployment of its workers: at start (and at
//! reload) each `[[worker]]` whose spec or component differs from the
//! version the file last made gets a new version, deployed alone. A worker
//! whose file entry did not change keeps what is active, a rollback, a
//! split or the kill switch included, so a restart serves exactly what was
//! active before it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use cordon_config::{Route, WorkerConfig, WorkerSpec};
use cordon_registry::{ComponentHash, Deployment, RegistryError, RegistryStore, VersionRecord, random_roll, sticky_roll};
use http::{HeaderMap, HeaderName};

use crate::{LoadError, Runtime, Worker, WorkerLoadError};

/// The actor of the versions that `cordon.toml` makes.
pub const CONFIG_ACTOR: &str = "cordon.toml";

/// What the runtime serves at one moment.
pub struct Snapshot {
    /// Higher for every snapshot swapped in: a cheap way to tell that a
    /// snapshot is not the one seen last.
    pub generation: u64,
    workers: BTreeMap<(String, String), Arc<Deployed>>,
}

impl Snapshot {
    /// Every deployed worker, by tenant and name.
    pub fn workers(&self) -> impl Iterator<Item = &Arc<Deployed>> {
        self.workers.values()
    }

    pub fn worker(&self, tenant: &str, name: &str) -> Option<&Arc<Deployed>> {
        self.workers.get(&(tenant.to_string(), name.to_string()))
    }
}

/// A deployed worker: its routes, its deployment with the loaded versions
/// it serves, and its kill switch.
pub struct Deployed {
    pub tenant: String,
    pub name: String,
    /// The routes of its versions (the versions of a split share them).
    pub routes: Vec<Route>,
    pub deployment: Deployment,
    /// With the kill switch on, its routes answer 503 `worker_disabled`.
    pub disabled: bool,
    /// In the deployment's order.
    versions: Vec<(u64, Arc<Worker>)>,
    /// The validated spec of its first version: routes, limits, grants.
    config: WorkerConfig,
    /// The request header whose value makes a split sticky.
    sticky: Option<HeaderName>,
}

impl Deployed {
    /// The version a request with `headers` goes to, and its worker: the
    /// only one, or by the split, with the sticky header's value if it has
    /// one and at random otherwise.
    pub fn pick(&self, headers: &HeaderMap) -> (u64, &Arc<Worker>) {
        if let [(version, worker)] = self.versions.as_slice() {
            return (*version, worker);
        }
        let roll = match self.sticky.as_ref().and_then(|h| headers.get(h)) {
            Some(key) => sticky_roll(key.as_bytes()),
            None => random_roll(),
        };
        let version = self.deployment.pick(roll);
        let (v, worker) = self.versions.iter().find(|(v, _)| *v == version).unwrap_or(&self.versions[0]);
        (*v, worker)
    }

    /// The versions it serves, with their workers.
    pub fn versions(&self) -> impl Iterator<Item = (u64, &Arc<Worker>)> {
        self.versions.iter().map(|(v, w)| (*v, w))
    }
}

/// Why a change to the registry was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{0}")]
    Spec(#[from] cordon_config::SpecErrors),
    #[error(transparent)]
    Load(Box<WorkerLoadError>),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("there is no deployed worker `{name}` of tenant `{tenant}`")]
    NoSuchWorker { tenant: String, name: String },
    #[error("worker `{name}` of tenant `{tenant}` has no version before version {current} to roll back to")]
    NothingToRollBackTo { tenant: String, name: String, current: u64 },
    #[error(
        "the versions of a split must have the same routes, but version {version} of worker `{name}` has {theirs} and version {first} has {ours}; deploy the new routes alone first"
    )]
    SplitRoutesDiffer { name: String, first: u64, ours: String, version: u64, theirs: String },
    #[error("the stored spec of version {version} of worker `{name}` (tenant `{tenant}`) cannot be read: {problem}")]
    DamagedSpec { tenant: String, name: String, version: u64, problem: String },
    #[error("cannot read the component {}: {source}", path.display())]
    Component { path: std::path::PathBuf, source: std::io::Error },
}

impl From<WorkerLoadError> for DeployError {
    fn from(e: WorkerLoadError) -> Self {
        DeployError::Load(Box::new(e))
    }
}

/// The registry's part of the runtime.
pub(crate) struct Live {
    pub store: RegistryStore,
    pub current: ArcSwap<Snapshot>,
    /// Held for the whole of a change.
    pub changes: Mutex<Changes>,
    pub sticky: Option<HeaderName>,
}

/// What the change in progress works with: the loaded versions, which are
/// kept while a snapshot serves them, and the last generation.
#[derive(Default)]
pub(crate) struct Changes {
    loaded: HashMap<(String, String, u64), Loaded>,
    generation: u64,
}

#[derive(Clone)]
struct Loaded {
    worker: Arc<Worker>,
    config: WorkerConfig,
}

/// What a reload or a start changed.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Synced {
    /// `tenant/name@version` of each new version deployed from the file.
    pub deployed: Vec<String>,
    /// `tenant/name` of each worker left as it was.
    pub unchanged: Vec<String>,
    /// `tenant/name` of each worker removed because the file no longer has it.
    pub removed: Vec<String>,
}

impl Live {
    pub fn new(store: RegistryStore, sticky: Option<HeaderName>) -> Live {
        Live {
            store,
            current: ArcSwap::from_pointee(Snapshot { generation: 0, workers: BTreeMap::new() }),
            changes: Mutex::new(Changes::default()),
            sticky,
        }
    }
}

impl Runtime {
    /// What the runtime serves now. Take one per request.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.live.current.load_full()
    }

    /// The kept versions of a worker, newest first.
    pub fn versions(&self, tenant: &str, name: &str) -> Result<Vec<VersionRecord>, DeployError> {
        Ok(self.live.store.versions(tenant, name)?)
    }

    /// Deploys a new version of `(spec.tenant, spec.name)`: `component` is
    /// stored by its hash and compiled, the spec is checked on its own and
    /// among the other deployed workers (a route of another tenant is
    /// refused), and the version serves every new request once this returns.
    /// `spec.component` is ignored. Returns the version's number.
    pub fn deploy(&self, spec: &WorkerSpec, component: &[u8], actor: &str) -> Result<u64, DeployError> {
        self.check_component_size(spec, component)?;
        let mut changes = self.changes();
        let hash = self.live.store.store_component(component)?;
        let mut spec = spec.clone();
        spec.component = component_file(&hash);
        let version = self.new_version(&mut changes, &spec, &hash, actor)?;
        self.publish(&mut changes)?;
        Ok(version)
    }

    /// Serves `to`, or the newest version older than the one active now,
    /// alone. Returns the version now active.
    pub fn rollback(&self, tenant: &str, name: &str, to: Option<u64>) -> Result<u64, DeployError> {
        let mut changes = self.changes();
        let current = self.deployed(tenant, name)?;
        let active = current.deployment.versions().max().unwrap_or(0);
        let to = match to {
            Some(v) => v,
            None => self
                .live
                .store
                .versions(tenant, name)?
                .into_iter()
                .map(|v| v.version)
                .find(|v| *v < active)
                .ok_or_else(|| DeployError::NothingToRollBackTo { tenant: tenant.into(), name: name.into(), current: active })?,
        };
        self.switch(&mut changes, tenant, name, &Deployment::single(to))?;
        Ok(to)
    }

    /// Splits the worker's requests between versions, which must exist and
    /// have the same routes.
    pub fn set_split(&self, tenant: &str, name: &str, deployment: &Deployment) -> Result<(), DeployError> {
        let mut changes = self.changes();
        self.deployed(tenant, name)?;
        self.switch(&mut changes, tenant, name, deployment)
    }

    /// The kill switch: every new request to the worker's routes gets 503
    /// `worker_disabled` once this returns. With `abort_in_flight`, its
    /// guests that still run are stopped too. Returns how many were.
    pub fn disable(&self, tenant: &str, name: &str, abort_in_flight: bool) -> Result<usize, DeployError> {
        let mut changes = self.changes();
        let deployed = self.deployed(tenant, name)?;
        self.live.store.set_disabled(tenant, name, true)?;
        self.publish(&mut changes)?;
        if !abort_in_flight {
            return Ok(0);
        }
        Ok(deployed.versions().map(|(_, w)| w.abort_in_flight()).sum())
    }

    /// Turns the kill switch off: the worker serves the deployment it had.
    pub fn enable(&self, tenant: &str, name: &str) -> Result<(), DeployError> {
        let mut changes = self.changes();
        self.deployed(tenant, name)?;
        self.live.store.set_disabled(tenant, name, false)?;
        self.publish(&mut changes)
    }

    /// Removes a worker and its versions; `false` if there was none.
    pub fn remove(&self, tenant: &str, name: &str) -> Result<bool, DeployError> {
        let mut changes = self.changes();
        let removed = self.live.store.remove_worker(tenant, name)?;
        self.publish(&mut changes)?;
        Ok(removed)
    }

    /// Makes the registry follow `workers`, the `[[worker]]`s of the config
    /// file: a new version of each one whose spec or component changed
    /// since the file last made one, deployed alone, and, with
    /// `remove_missing`, the removal of every worker that only the file
    /// ever deployed and that the file no longer has. Every new version is
    /// checked and compiled before anything is written: an invalid one
    /// changes nothing.
    pub fn sync_config_workers(&self, workers: &[WorkerConfig], remove_missing: bool) -> Result<Synced, DeployError> {
        let mut changes = self.changes();
        let mut synced = Synced::default();
        let mut plan = Vec::new();
        let records = self.live.store.workers()?;
        for w in workers {
            let bytes = std::fs::read(&w.component).map_err(|source| DeployError::Component { path: w.component.clone(), source })?;
            let hash = ComponentHash::of(&bytes);
            let spec = w.to_spec(&component_file(&hash));
            let spec_json = spec_json(&spec);
            let last_from_file = self.live.store.versions(&w.tenant, &w.name)?.into_iter().find(|v| v.actor == CONFIG_ACTOR);
            let deployed = records.iter().any(|r| r.tenant == w.tenant && r.worker == w.name && r.deployment.is_some());
            match last_from_file {
                Some(v) if v.component == hash && v.spec == spec_json && deployed => {
                    synced.unchanged.push(format!("{}/{}", w.tenant, w.name))
                }
                _ => plan.push((w, bytes, hash, spec)),
            }
        }
        // The workers this sync removes, found first: their routes are free
        // for the new versions checked below (a rename moves a route).
        let mut removals = Vec::new();
        if remove_missing {
            for record in &records {
                if workers.iter().any(|w| w.tenant == record.tenant && w.name == record.worker) {
                    continue;
                }
                let versions = self.live.store.versions(&record.tenant, &record.worker)?;
                if !versions.is_empty() && versions.iter().all(|v| v.actor == CONFIG_ACTOR) {
                    removals.push((record.tenant.clone(), record.worker.clone()));
                }
            }
        }
        // Checked (among the file's other workers and those deployed
        // otherwise) and compiled before anything is written.
        let mut ready = Vec::new();
        for (w, bytes, hash, spec) in plan {
            self.live.store.store_component(&bytes)?;
            let config = self.validate(&spec)?;
            let others: Vec<WorkerConfig> = workers.iter().filter(|o| !(o.tenant == w.tenant && o.name == w.name)).cloned().collect();
            self.check_among(&others, &removals, &config)?;
            // Named by the file's path, which the operator knows, rather
            // than by the stored copy's.
            let worker = self.load(&config, &hash).map_err(|e| match e {
                DeployError::Load(load) => DeployError::from(WorkerLoadError { component: w.component.clone(), ..*load }),
                other => other,
            })?;
            ready.push((w, hash, spec_json(&spec), worker, config));
        }
        for (w, hash, spec_json, worker, config) in ready {
            let record = self.live.store.create_version(&w.tenant, &w.name, &hash, &spec_json, CONFIG_ACTOR)?;
            self.live.store.deploy(&w.tenant, &w.name, &Deployment::single(record.version))?;
            changes.loaded.insert((w.tenant.clone(), w.name.clone(), record.version), Loaded { worker, config });
            synced.deployed.push(format!("{}/{}@{}", w.tenant, w.name, record.version));
        }
        for (tenant, name) in removals {
            self.live.store.remove_worker(&tenant, &name)?;
            synced.removed.push(format!("{tenant}/{name}"));
        }
        self.publish(&mut changes)?;
        Ok(synced)
    }

    /// Refuses a component over `sandbox.max_component_mb` before it is stored.
    fn check_component_size(&self, spec: &WorkerSpec, component: &[u8]) -> Result<(), DeployError> {
        let limit = self.config.sandbox.max_component_bytes;
        if component.len() as u64 <= limit {
            return Ok(());
        }
        Err(DeployError::from(WorkerLoadError {
            worker: spec.name.clone(),
            tenant: spec.tenant.clone(),
            component: std::path::PathBuf::from("(deployed)"),
            error: LoadError::OverCeiling(Box::new(crate::cache::OverCeiling {
                ceiling: "sandbox.max_component_mb",
                what: "bytes of component",
                limit: limit >> 20,
                needed: component.len() as u64,
            })),
        }))
    }

    fn changes(&self) -> MutexGuard<'_, Changes> {
        self.live.changes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deployed(&self, tenant: &str, name: &str) -> Result<Arc<Deployed>, DeployError> {
        self.snapshot().worker(tenant, name).cloned().ok_or_else(|| DeployError::NoSuchWorker { tenant: tenant.into(), name: name.into() })
    }

    /// Refuses `candidate` if its name or a route is taken among the
    /// workers `others` and the deployed ones it does not replace, apart
    /// from those `(tenant, name)` in `gone`, which the same change removes:
    /// checked before anything is written.
    fn check_among(&self, others: &[WorkerConfig], gone: &[(String, String)], candidate: &WorkerConfig) -> Result<(), DeployError> {
        let snapshot = self.snapshot();
        let mut existing: Vec<WorkerConfig> = snapshot
            .workers()
            .filter(|d| !(d.tenant == candidate.tenant && d.name == candidate.name))
            .filter(|d| !others.iter().any(|o| o.tenant == d.tenant && o.name == d.name))
            .filter(|d| !gone.iter().any(|(tenant, name)| *tenant == d.tenant && *name == d.name))
            .map(|d| d.config.clone())
            .collect();
        existing.extend(others.iter().cloned());
        let errors = cordon_config::check_worker_among(&existing, candidate);
        if errors.is_empty() { Ok(()) } else { Err(DeployError::Spec(cordon_config::SpecErrors(errors))) }
    }

    /// Checks, compiles and records a new version and deploys it alone; the
    /// caller publishes.
    fn new_version(&self, changes: &mut Changes, spec: &WorkerSpec, hash: &ComponentHash, actor: &str) -> Result<u64, DeployError> {
        let config = self.validate(spec)?;
        self.check_among(&[], &[], &config)?;
        let worker = self.load(&config, hash)?;
        let record = self.live.store.create_version(&spec.tenant, &spec.name, hash, &spec_json(spec), actor)?;
        self.live.store.deploy(&spec.tenant, &spec.name, &Deployment::single(record.version))?;
        changes.loaded.insert((spec.tenant.clone(), spec.name.clone(), record.version), Loaded { worker, config });
        Ok(record.version)
    }

    /// Deploys existing versions and publishes.
    fn switch(&self, changes: &mut Changes, tenant: &str, name: &str, deployment: &Deployment) -> Result<(), DeployError> {
        let mut first: Option<(u64, Vec<Route>)> = None;
        for version in deployment.versions() {
            let loaded = self.loaded(changes, tenant, name, version)?;
            match &first {
                None => {
                    self.check_among(&[], &[], &loaded.config)?;
                    first = Some((version, loaded.config.routes.clone()));
                }
                Some((v, routes)) if routes != &loaded.config.routes => {
                    return Err(DeployError::SplitRoutesDiffer {
                        name: name.into(),
                        first: *v,
                        ours: routes_text(routes),
                        version,
                        theirs: routes_text(&loaded.config.routes),
                    });
                }
                Some(_) => {}
            }
        }
        self.live.store.deploy(tenant, name, deployment)?;
        self.publish(changes)
    }

    /// A version's worker, loaded from its record if no snapshot serves it.
    fn loaded(&self, changes: &mut Changes, tenant: &str, name: &str, version: u64) -> Result<Loaded, DeployError> {
        let key = (tenant.to_string(), name.to_string(), version);
        if let Some(loaded) = changes.loaded.get(&key) {
            return Ok(loaded.clone());
        }
        let record =
            self.live.store.version(tenant, name, version)?.ok_or_else(|| {
                DeployError::Registry(RegistryError::NoSuchVersion { tenant: tenant.into(), worker: name.into(), version })
            })?;
        let damaged = |problem: String| DeployError::DamagedSpec { tenant: tenant.into(), name: name.into(), version, problem };
        let spec: WorkerSpec = serde_json::from_str(&record.spec).map_err(|e| damaged(e.to_string()))?;
        if spec.tenant != tenant || spec.name != name {
            return Err(damaged(format!("it names worker `{}` of tenant `{}`", spec.name, spec.tenant)));
        }
        let config = self.validate(&spec)?;
        let loaded = Loaded { worker: self.load(&config, &record.component)?, config };
        changes.loaded.insert(key, loaded.clone());
        Ok(loaded)
    }

    /// `spec` as a worker of this runtime's platform, its component in the
    /// registry's store.
    fn validate(&self, spec: &WorkerSpec) -> Result<WorkerConfig, DeployError> {
        let base = self.live.store.component_path(&ComponentHash::of(b"")).parent().map(ToOwned::to_owned).unwrap_or_default();
        Ok(spec.validate(&self.config.worker_context(&spec.tenant, &base))?)
    }

    /// Compiles (or takes from the code cache) and links one version.
    fn load(&self, config: &WorkerConfig, hash: &ComponentHash) -> Result<Arc<Worker>, DeployError> {
        let err = |error| WorkerLoadError {
            worker: config.name.clone(),
            tenant: config.tenant.clone(),
            component: config.component.clone(),
            error,
        };
        let wasm =
            self.live.store.read_component(hash).map_err(|e| err(LoadError::Read(Arc::new(std::io::Error::other(e.to_string())))))?;
        let (component, source) = crate::cache::load_component(&self.engine, &wasm, Some(&self.cache)).map_err(err)?;
        crate::grants::check(&self.engine, &component, config).map_err(err)?;
        crate::grants::check_ceilings(&component, wasm.len() as u64, &self.config.sandbox).map_err(err)?;
        let caps = self.stores.capabilities(config, &self.network).map_err(err)?;
        let quotas = self.quotas(config);
        let worker = Worker::new(config, &self.linker, &component, source, hash.to_string(), caps, quotas).map_err(err)?;
        tracing::info!(worker = %config.name, tenant = %config.tenant, component_sha256 = %hash, code = ?source, "worker version ready");
        Ok(Arc::new(worker))
    }

    /// Builds the snapshot of what the durable record says is deployed,
    /// checks that no two workers share a route, and swaps it in. Versions
    /// no snapshot serves any more are let go.
    fn publish(&self, changes: &mut Changes) -> Result<(), DeployError> {
        let mut workers = BTreeMap::new();
        let mut configs: Vec<WorkerConfig> = Vec::new();
        for record in self.live.store.workers()? {
            let Some(deployment) = record.deployment else { continue };
            let mut versions = Vec::new();
            let mut routes = None;
            for version in deployment.versions() {
                let loaded = self.loaded(changes, &record.tenant, &record.worker, version)?;
                if routes.is_none() {
                    routes = Some(loaded.config.routes.clone());
                    configs.push(loaded.config.clone());
                }
                versions.push((version, loaded.worker));
            }
            let Some(config) = configs.last().cloned() else { continue };
            let deployed = Deployed {
                tenant: record.tenant.clone(),
                name: record.worker.clone(),
                config,
                routes: routes.unwrap_or_default(),
                deployment,
                disabled: record.disabled,
                versions,
                sticky: self.live.sticky.clone(),
            };
            workers.insert((record.tenant, record.worker), Arc::new(deployed));
        }
        let conflicts = cordon_config::check_workers(&configs);
        if let Some((i, e)) = conflicts.into_iter().next() {
            let w = &configs[i];
            return Err(DeployError::Spec(cordon_config::SpecErrors(vec![cordon_config::SpecError {
                message: format!("worker `{}` of tenant `{}`: {}", w.name, w.tenant, e.message),
                ..e
            }])));
        }
        changes.loaded.retain(|(tenant, name, version), _| {
            workers.get(&(tenant.clone(), name.clone())).is_some_and(|d: &Arc<Deployed>| d.deployment.versions().any(|v| v == *version))
        });
        changes.generation += 1;
        self.live.current.store(Arc::new(Snapshot { generation: changes.generation, workers }));
        Ok(())
    }
}

/// The file name of a stored component, as a spec in the registry names it.
fn component_file(hash: &ComponentHash) -> String {
    format!("{hash}.wasm")
}

fn spec_json(spec: &WorkerSpec) -> String {
    serde_json::to_string(spec).expect("a worker spec is plain data")
}

fn routes_text(routes: &[Route]) -> String {
    routes.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}
