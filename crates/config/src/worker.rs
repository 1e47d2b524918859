//! A worker as a tenant deploys it: [`WorkerSpec`], its validation into a
//! [`WorkerConfig`], and the checks that span workers (names unique within
//! a tenant, routes unique across all tenants).
//!
//! Nothing here knows where the spec came from. A worker is identified by
//! `(tenant, name)`: two tenants may each have a worker `api`, and only
//! routes are shared by every tenant, since a request's host and path must
//! lead to one worker.

use std::collections::BTreeMap;
use std::path::Path;

use cordon_egress::{Allowlist, AllowlistError};
use serde::{Deserialize, Serialize};

use crate::grants::{KvGrant, PostgresGrant, SqlGrant};
use crate::spec::{Checker, ErrorKind, KeyPath, SpecError, SpecErrors};
use crate::{DatabaseConfig, Limits, Route, StorageBounds, WorkerConfig};

/// One worker as written: `[[worker]]` in `cordon.toml`, or a JSON document
/// for the control API. Integers are `i64` so that a negative or oversized
/// value reaches the range check with its own message rather than failing
/// as a type error. Unknown keys are refused by every front end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSpec {
    /// Unique within its tenant.
    pub name: String,
    pub tenant: String,
    /// Path of the component file; a relative path starts at
    /// [`WorkerContext::base`].
    pub component: String,
    /// `HOST/PATH-PREFIX` each.
    pub routes: Vec<String>,
    #[serde(default)]
    pub allowed_outbound: Vec<String>,
    /// Confirms a `*` entry in `allowed_outbound`; an error without one.
    #[serde(default)]
    pub allow_any_outbound_dangerously: bool,
    #[serde(default)]
    pub kv: Vec<KvGrant>,
    #[serde(default)]
    pub sql: Vec<SqlGrant>,
    #[serde(default)]
    pub postgres: Vec<PostgresGrant>,
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    #[serde(default)]
    pub secrets: Vec<String>,
    #[serde(default)]
    pub limits: LimitsSpec,
}

/// `limits` of a [`WorkerSpec`]: each `None` takes its default (see
/// [`Limits`] for what each limit bounds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    pub max_instances: Option<i64>,
    pub cpu_ms: Option<i64>,
    pub wall_ms: Option<i64>,
    pub memory_mb: Option<i64>,
    pub max_request_body_bytes: Option<i64>,
    pub max_response_body_bytes: Option<i64>,
    pub max_log_bytes: Option<i64>,
    pub max_subrequests: Option<i64>,
    pub subrequest_timeout_ms: Option<i64>,
    pub max_subrequest_response_bytes: Option<i64>,
    pub max_egress_bytes: Option<i64>,
    pub max_kv_operations: Option<i64>,
    pub max_kv_value_bytes: Option<i64>,
    pub max_sql_statements: Option<i64>,
    pub sql_statement_timeout_ms: Option<i64>,
    pub max_sql_rows: Option<i64>,
    pub max_sql_result_bytes: Option<i64>,
    pub max_postgres_queries: Option<i64>,
    pub max_postgres_result_bytes: Option<i64>,
}

/// What validating a worker needs to know beyond its spec: the platform
/// around it, as the process's configuration sets it for the worker's
/// tenant.
#[derive(Debug, Clone, Copy)]
pub struct WorkerContext<'a> {
    /// The directory a relative `component` path starts at.
    pub base: &'a Path,
    /// The engine's ceiling on `limits.memory_mb` (`sandbox.max_memory_mb`).
    pub max_memory_mb: u64,
    /// The instance quota of the worker's tenant: the default of
    /// `limits.max_instances`, and its upper bound.
    pub tenant_max_instances: u32,
    /// The storage quota of the worker's tenant and the free-space reserve.
    pub storage: StorageBounds,
    /// Every `[[database]]`; a `postgres` grant may name only those of the
    /// worker's own tenant.
    pub databases: &'a [DatabaseConfig],
}

impl WorkerSpec {
    /// Checks this worker on its own: names, component, routes, outbound
    /// entries, grants and limits. Whether its name and routes are free
    /// among other workers is [`check_worker_among`]'s question.
    pub fn validate(&self, context: &WorkerContext<'_>) -> Result<WorkerConfig, SpecErrors> {
        let mut checker = Checker::default();
        let worker = self.check(context, &mut checker);
        checker.finish(worker)
    }

    /// [`Self::validate`], recording problems in `c` and returning a worker
    /// with defaults in place of bad values, so that checks across workers
    /// can still run on it.
    pub(crate) fn check(&self, context: &WorkerContext<'_>, c: &mut Checker) -> WorkerConfig {
        c.name(&self.name, "name".into());
        c.name(&self.tenant, "tenant".into());

        let component = context.base.join(&self.component);
        if self.component.is_empty() {
            c.error("component".into(), ErrorKind::Invalid, "is empty", "give the path of the worker's .wasm component");
        } else if !component.is_file() {
            c.error(
                "component".into(),
                ErrorKind::NotFound,
                format!("no file at `{}`", self.component),
                "build the component first, or fix the path (relative paths start at the config file's directory)",
            );
        }

        let mut routes = Vec::new();
        if self.routes.is_empty() {
            c.error("routes".into(), ErrorKind::Invalid, "no routes", "add at least one route, for example \"hello.localhost/\"");
        }
        for (j, r) in self.routes.iter().enumerate() {
            let path = KeyPath::from("routes").index(j);
            match parse_route(r) {
                Ok(route) if routes.contains(&route) => {
                    c.error(path, ErrorKind::Duplicate, format!("`{route}` is listed twice"), "remove the duplicate")
                }
                Ok(route) => routes.push(route),
                Err(why) => c.error(
                    path,
                    ErrorKind::Invalid,
                    format!("`{r}` {why}"),
                    "write a route as HOST/PATH-PREFIX, for example \"hello.localhost/\" or \"localhost/hello\"",
                ),
            }
        }

        let allowed_outbound = self.allowed_outbound(c);
        let grants = crate::grants::check(self, c);
        self.postgres_grants_resolve(context.databases, c);
        let mut limits = self.limits.check(context.tenant_max_instances, c);
        if self.limits.memory_mb.is_none() {
            // The default fits under any ceiling.
            limits.memory_mb = limits.memory_mb.min(context.max_memory_mb);
        } else if limits.memory_mb > context.max_memory_mb {
            c.error(
                KeyPath::from("limits").field("memory_mb"),
                ErrorKind::OutOfRange,
                format!("is {} MiB, above the engine's ceiling sandbox.max_memory_mb = {}", limits.memory_mb, context.max_memory_mb),
                "lower it, or raise sandbox.max_memory_mb (the instance slots are sized at start, so that takes a restart)",
            );
        }
        WorkerConfig {
            name: self.name.clone(),
            tenant: self.tenant.clone(),
            component,
            routes,
            allowed_outbound,
            grants,
            limits,
            storage: context.storage,
        }
    }

    /// `allowed_outbound`, entry by entry, so that each error points at its
    /// entry; a bare `*` needs `allow_any_outbound_dangerously = true`.
    fn allowed_outbound(&self, c: &mut Checker) -> Allowlist {
        let dangerous = self.allow_any_outbound_dangerously;
        let mut entries = Vec::new();
        for (j, entry) in self.allowed_outbound.iter().enumerate() {
            let path = KeyPath::from("allowed_outbound").index(j);
            match Allowlist::new(&[entry], dangerous) {
                Ok(_) => entries.push(entry.as_str()),
                Err(e @ AllowlistError::WildcardWithoutOptIn) => {
                    c.error(path, ErrorKind::Invalid, "`*` would let this worker reach any public host", e.to_string())
                }
                Err(AllowlistError::Invalid { why, .. }) => c.error(
                    path,
                    ErrorKind::Invalid,
                    format!("`{entry}`: {why}"),
                    "write entries as scheme://host[:port], for example \"https://api.example.com\" or \"http://127.0.0.1:9000\"",
                ),
            }
        }
        if dangerous && !entries.contains(&"*") {
            c.error(
                "allow_any_outbound_dangerously".into(),
                ErrorKind::Conflict,
                "is set, but allowed_outbound has no `*` entry",
                "remove it: it only exists to confirm a `*` entry",
            );
        }
        Allowlist::new(&entries, dangerous).unwrap_or_default()
    }

    /// A `postgres` grant reaches only its own tenant's databases.
    fn postgres_grants_resolve(&self, databases: &[DatabaseConfig], c: &mut Checker) {
        let own: Vec<&str> = databases.iter().filter(|d| d.tenant == self.tenant).map(|d| d.name.as_str()).collect();
        for (j, grant) in self.postgres.iter().enumerate() {
            if own.contains(&grant.database.as_str()) {
                continue;
            }
            let help = if own.is_empty() {
                format!("tenant `{}` has no [[database]]; add one with tenant = \"{}\", or remove this grant", self.tenant, self.tenant)
            } else {
                let names: Vec<String> = own.iter().map(|n| format!("`{n}`")).collect();
                format!("a worker may use only its own tenant's databases; tenant `{}` has {}", self.tenant, names.join(", "))
            };
            c.error(
                KeyPath::from("postgres").index(j).field("database"),
                ErrorKind::NotFound,
                format!("tenant `{}` has no database `{}`", self.tenant, grant.database),
                help,
            );
        }
    }
}

impl WorkerConfig {
    /// This worker as a spec again, with every limit written out and
    /// `component` in place of its file: what a version records of it.
    /// Validating the result in the same context gives this worker back.
    pub fn to_spec(&self, component: &str) -> WorkerSpec {
        let l = &self.limits;
        let int = |v: u64| Some(i64::try_from(v).unwrap_or(i64::MAX));
        WorkerSpec {
            name: self.name.clone(),
            tenant: self.tenant.clone(),
            component: component.to_string(),
            routes: self.routes.iter().map(ToString::to_string).collect(),
            allowed_outbound: self.allowed_outbound.entries().map(str::to_string).collect(),
            allow_any_outbound_dangerously: self.allowed_outbound.allows_any(),
            kv: self.grants.kv.clone(),
            sql: self.grants.sql.clone(),
            postgres: self.grants.postgres.clone(),
            vars: self.grants.vars.clone(),
            secrets: self.grants.secrets.clone(),
            limits: LimitsSpec {
                max_instances: int(l.max_instances.into()),
                cpu_ms: int(l.cpu_ms),
                wall_ms: int(l.wall_ms),
                memory_mb: int(l.memory_mb),
                max_request_body_bytes: int(l.max_request_body_bytes),
                max_response_body_bytes: int(l.max_response_body_bytes),
                max_log_bytes: int(l.max_log_bytes),
                max_subrequests: int(l.max_subrequests.into()),
                subrequest_timeout_ms: int(l.subrequest_timeout_ms),
                max_subrequest_response_bytes: int(l.max_subrequest_response_bytes),
                max_egress_bytes: int(l.max_egress_bytes),
                max_kv_operations: int(l.max_kv_operations),
                max_kv_value_bytes: int(l.max_kv_value_bytes),
                max_sql_statements: int(l.max_sql_statements),
                sql_statement_timeout_ms: int(l.sql_statement_timeout_ms),
                max_sql_rows: int(l.max_sql_rows),
                max_sql_result_bytes: int(l.max_sql_result_bytes),
                max_postgres_queries: int(l.max_postgres_queries),
                max_postgres_result_bytes: int(l.max_postgres_result_bytes),
            },
        }
    }
}

impl LimitsSpec {
    fn check(&self, tenant_max_instances: u32, c: &mut Checker) -> Limits {
        let d = Limits::default();
        let path = |k: &str| KeyPath::from("limits").field(k);
        let max_instances = match self.max_instances {
            None => tenant_max_instances,
            Some(n) if n < 1 || n > i64::from(tenant_max_instances) => {
                c.error(
                    path("max_instances"),
                    ErrorKind::OutOfRange,
                    format!("must be between 1 and its tenant's quota of {tenant_max_instances} instances, got {n}"),
                    "lower it, or raise the tenant's quota ([[tenant]] max_instances or sandbox.tenant_max_instances); without it the worker may use its tenant's whole quota",
                );
                tenant_max_instances
            }
            Some(n) => n as u32,
        };
        let limits = Limits {
            max_instances,
            cpu_ms: c.int(self.cpu_ms, path("cpu_ms"), d.cpu_ms, 1, 60_000, "the CPU time one request may use, in ms"),
            wall_ms: c.int(self.wall_ms, path("wall_ms"), d.wall_ms, 1, 3_600_000, "the wall-clock time one request may take, in ms"),
            memory_mb: c.int(self.memory_mb, path("memory_mb"), d.memory_mb, 1, 4096, "the linear memory one instance may use, in MiB"),
            max_request_body_bytes: c.int(
                self.max_request_body_bytes,
                path("max_request_body_bytes"),
                d.max_request_body_bytes,
                0,
                1 << 32,
                "the largest request body, in bytes",
            ),
            max_response_body_bytes: c.int(
                self.max_response_body_bytes,
                path("max_response_body_bytes"),
                d.max_response_body_bytes,
                0,
                1 << 32,
                "the largest response body, in bytes",
            ),
            max_log_bytes: c.int(
                self.max_log_bytes,
                path("max_log_bytes"),
                d.max_log_bytes,
                0,
                16 << 20,
                "the stdout and stderr bytes kept per request",
            ),
            max_subrequests: c.int(
                self.max_subrequests,
                path("max_subrequests"),
                d.max_subrequests.into(),
                0,
                10_000,
                "the outbound requests one request may start",
            ) as u32,
            subrequest_timeout_ms: c.int(
                self.subrequest_timeout_ms,
                path("subrequest_timeout_ms"),
                d.subrequest_timeout_ms,
                1,
                3_600_000,
                "the time one outbound request may take, in ms",
            ),
            max_subrequest_response_bytes: c.int(
                self.max_subrequest_response_bytes,
                path("max_subrequest_response_bytes"),
                d.max_subrequest_response_bytes,
                0,
                1 << 32,
                "the largest response body of one outbound request, in bytes",
            ),
            max_egress_bytes: c.int(
                self.max_egress_bytes,
                path("max_egress_bytes"),
                d.max_egress_bytes,
                0,
                1 << 36,
                "the body bytes all outbound requests of one request may send and receive",
            ),
            max_kv_operations: c.int(
                self.max_kv_operations,
                path("max_kv_operations"),
                d.max_kv_operations,
                0,
                1_000_000,
                "the key-value operations one request may make",
            ),
            max_kv_value_bytes: c.int(
                self.max_kv_value_bytes,
                path("max_kv_value_bytes"),
                d.max_kv_value_bytes,
                1,
                64 << 20,
                "the largest value a key-value store accepts, in bytes",
            ),
            max_sql_statements: c.int(
                self.max_sql_statements,
                path("max_sql_statements"),
                d.max_sql_statements,
                0,
                1_000_000,
                "the SQL statements one request may run",
            ),
            sql_statement_timeout_ms: c.int(
                self.sql_statement_timeout_ms,
                path("sql_statement_timeout_ms"),
                d.sql_statement_timeout_ms,
                1,
                600_000,
                "the time one SQL statement may run, in ms",
            ),
            max_sql_rows: c.int(
                self.max_sql_rows,
                path("max_sql_rows"),
                d.max_sql_rows,
                1,
                10_000_000,
                "the rows one SQL statement may return",
            ),
            max_sql_result_bytes: c.int(
                self.max_sql_result_bytes,
                path("max_sql_result_bytes"),
                d.max_sql_result_bytes,
                1,
                1 << 30,
                "the bytes of values one SQL statement may return",
            ),
            max_postgres_queries: c.int(
                self.max_postgres_queries,
                path("max_postgres_queries"),
                d.max_postgres_queries,
                1,
                10_000,
                "the Postgres statements one request may run",
            ),
            max_postgres_result_bytes: c.int(
                self.max_postgres_result_bytes,
                path("max_postgres_result_bytes"),
                d.max_postgres_result_bytes,
                1024,
                256 << 20,
                "the largest result of one Postgres call, in bytes",
            ),
        };
        if limits.cpu_ms > limits.wall_ms {
            // Point at whichever of the two the spec sets (cpu_ms if both).
            let name = if self.cpu_ms.is_none() && self.wall_ms.is_some() { "wall_ms" } else { "cpu_ms" };
            c.error(
                path(name),
                ErrorKind::Conflict,
                format!("cpu_ms ({}) is more than wall_ms ({})", limits.cpu_ms, limits.wall_ms),
                "CPU time cannot exceed wall-clock time: lower cpu_ms or raise wall_ms",
            );
        }
        limits
    }
}

/// Checks `candidate` against workers that already exist: its name must be
/// free within its tenant, and each of its routes free across every
/// tenant. A worker being replaced (the same tenant and name, deployed
/// again) is left out of `existing` by the caller.
///
/// A route taken by another tenant's worker is refused with the route
/// alone: the error never says which tenant or worker serves it, since
/// that is another tenant's business. Within its own tenant the error
/// names the worker, and a name taken names `existing[i]` as `worker[i]`.
pub fn check_worker_among(existing: &[WorkerConfig], candidate: &WorkerConfig) -> Vec<SpecError> {
    let mut c = Checker::default();
    if let Some(first) = existing.iter().position(|o| o.tenant == candidate.tenant && o.name == candidate.name) {
        c.error(
            "name".into(),
            ErrorKind::NameTaken,
            format!("`{}` is already the name of worker[{first}]", candidate.name),
            "give every worker of a tenant its own name",
        );
    }
    for route in &candidate.routes {
        if let Some(holder) = existing.iter().find(|o| o.routes.contains(route)) {
            let message = if holder.tenant == candidate.tenant {
                format!("route `{route}` is already served by worker `{}`", holder.name)
            } else {
                format!("route `{route}` is already served by another tenant")
            };
            c.error("routes".into(), ErrorKind::RouteTaken, message, "each host and path prefix may belong to one worker only");
            continue;
        }
        // A prefix inside another tenant's, or around it, would take some of
        // that tenant's requests (the longest prefix wins), or hand some of
        // its own to that tenant. Within one tenant, nesting is the tenant's
        // own business.
        let nested =
            existing.iter().filter(|o| o.tenant != candidate.tenant).flat_map(|o| &o.routes).find(|r| {
                r.host == route.host && (covers(&r.path_prefix, &route.path_prefix) || covers(&route.path_prefix, &r.path_prefix))
            });
        if let Some(other) = nested {
            c.error(
                "routes".into(),
                ErrorKind::RouteTaken,
                format!("route `{route}` overlaps `{other}`, which another tenant serves"),
                "a host's path prefixes may nest only within one tenant; choose a prefix beside it, or another host",
            );
        }
    }
    c.errors
}

/// Whether requests under `outer` include those under `inner`: the whole
/// segments of `outer` begin `inner` (`/a` covers `/a` and `/a/b`, not `/ab`).
fn covers(outer: &str, inner: &str) -> bool {
    outer == "/" || inner == outer || (inner.starts_with(outer) && inner.as_bytes().get(outer.len()) == Some(&b'/'))
}

/// [`check_worker_among`] over a whole set, each worker against those
/// before it: the problems of `workers[i]` come as `(i, error)`.
pub fn check_workers(workers: &[WorkerConfig]) -> Vec<(usize, SpecError)> {
    (0..workers.len()).flat_map(|i| check_worker_among(&workers[..i], &workers[i]).into_iter().map(move |e| (i, e))).collect()
}

/// `host/prefix` to a [`Route`]. The host is matched without its port and
/// case-insensitively; the prefix is matched by whole path segments.
pub(crate) fn parse_route(s: &str) -> Result<Route, &'static str> {
    let Some(slash) = s.find('/') else { return Err("has no path: add `/` after the host") };
    let (host, path) = s.split_at(slash);
    if host.is_empty() {
        return Err("has no host");
    }
    if host.contains(':') {
        return Err("has a port: routes match the Host header without its port, so drop `:PORT`");
    }
    if !host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') || host.starts_with('.') || host.ends_with('.') {
        return Err("has an invalid host: use letters, digits, `.` and `-`");
    }
    if path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b'?' || b == b'#' || b == b'%') {
        return Err("has a character not allowed in a path prefix (whitespace, `?`, `#` or `%`)");
    }
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("has a `.` or `..` segment");
    }
    let trimmed = path.trim_end_matches('/');
    let path_prefix = if trimmed.is_empty() { "/".to_string() } else { trimmed.to_string() };
    Ok(Route { host: host.to_ascii_lowercase(), path_prefix })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validated(tenant: &str, name: &str, routes: &[&str], base: &Path) -> WorkerConfig {
        let spec = WorkerSpec {
            name: name.into(),
            tenant: tenant.into(),
            component: "x.wasm".into(),
            routes: routes.iter().map(|r| r.to_string()).collect(),
            ..WorkerSpec::default()
        };
        let context =
            WorkerContext { base, max_memory_mb: 4096, tenant_max_instances: 4, storage: StorageBounds::default(), databases: &[] };
        spec.validate(&context).unwrap()
    }

    #[test]
    fn an_operation_budget_refuses_past_its_limit_and_names_it() {
        let mut b = crate::OperationBudget::new(3, "key-value operation", "max_kv_operations");
        assert_eq!(b.charge(2), Ok(()));
        assert_eq!(b.charge(1), Ok(()), "exactly at the limit");
        let e = b.charge(1).unwrap_err();
        assert_eq!(e, "key-value operation limit reached: at most 3 per request (limits.max_kv_operations)");
        assert_eq!(b.used(), 4);
        let mut batch = crate::OperationBudget::new(3, "SQL statement", "max_sql_statements");
        assert!(batch.charge(4).is_err(), "a batch counts each of its statements");
    }

    #[test]
    fn a_worker_written_back_as_a_spec_validates_to_itself() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.wasm"), b"").unwrap();
        let spec = WorkerSpec {
            name: "api".into(),
            tenant: "acme".into(),
            component: "x.wasm".into(),
            routes: vec!["API.acme.example/v1".into(), "acme.example/".into()],
            allowed_outbound: vec!["https://api.example.com".into(), "http://10.0.0.0/8:8080".into()],
            kv: vec![KvGrant { binding: "CACHE".into(), namespace: "cache".into() }],
            sql: vec![SqlGrant { binding: "DB".into(), database: "main".into(), read_only: true }],
            vars: [("GREETING".to_string(), "hi".to_string())].into(),
            secrets: vec!["TOKEN".into()],
            limits: LimitsSpec { cpu_ms: Some(20), memory_mb: Some(64), max_sql_rows: Some(7), ..LimitsSpec::default() },
            ..WorkerSpec::default()
        };
        let context = WorkerContext {
            base: dir.path(),
            max_memory_mb: 4096,
            tenant_max_instances: 4,
            storage: StorageBounds::default(),
            databases: &[],
        };
        let worker = spec.validate(&context).unwrap();
        let again = worker.to_spec("x.wasm");
        let json = serde_json::to_string(&again).unwrap();
        let back: WorkerSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, again);
        assert_eq!(back.validate(&context).unwrap(), worker);
    }

    #[test]
    fn one_worker_deployed_among_others_is_checked_by_tenant_and_route() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.wasm"), b"").unwrap();
        let base = dir.path();
        let existing = [validated("acme", "api", &["api.acme.example/"], base), validated("acme", "web", &["acme.example/"], base)];

        // Another tenant's `api` on its own route: accepted.
        assert_eq!(check_worker_among(&existing, &validated("globex", "api", &["api.globex.example/"], base)), []);

        // Its own tenant's name: refused at `name`.
        let e = check_worker_among(&existing, &validated("acme", "api", &["new.acme.example/"], base));
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].path.to_string(), e[0].kind), ("name".into(), ErrorKind::NameTaken));

        // A prefix inside another tenant's, or around it: refused too, while
        // one tenant may nest its own.
        let e = check_worker_among(&existing, &validated("globex", "admin", &["acme.example/admin"], base));
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].message, "route `acme.example/admin` overlaps `acme.example/`, which another tenant serves");
        let e = check_worker_among(&existing, &validated("globex", "all", &["api.acme.example/v2", "other.example/"], base));
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(check_worker_among(&existing, &validated("acme", "admin", &["acme.example/admin"], base)), []);
        assert_eq!(check_worker_among(&existing, &validated("globex", "x", &["acme.example.org/"], base)), []);

        // Another tenant's route: refused at `routes`, naming the route only.
        let e = check_worker_among(&existing, &validated("globex", "api", &["api.globex.example/", "ACME.example/"], base));
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].path.json_pointer(), e[0].kind), ("/routes".into(), ErrorKind::RouteTaken));
        assert_eq!(e[0].message, "route `acme.example/` is already served by another tenant");

        // Its own tenant's route: the worker that serves it is named.
        let e = check_worker_among(&existing, &validated("acme", "admin", &["acme.example/"], base));
        assert_eq!(e[0].message, "route `acme.example/` is already served by worker `web`");
    }

    #[test]
    fn a_spec_alone_reports_key_paths() {
        let spec = WorkerSpec {
            name: "api".into(),
            tenant: "Acme".into(),
            component: "missing.wasm".into(),
            routes: vec!["h/".into()],
            kv: vec![KvGrant { binding: "1X".into(), namespace: "n".into() }],
            limits: LimitsSpec { wall_ms: Some(10), ..LimitsSpec::default() },
            ..WorkerSpec::default()
        };
        let context = WorkerContext {
            base: Path::new("/nonexistent"),
            max_memory_mb: 4096,
            tenant_max_instances: 4,
            storage: StorageBounds::default(),
            databases: &[],
        };
        let e = spec.validate(&context).unwrap_err().0;
        let paths: Vec<String> = e.iter().map(|e| e.path.to_string()).collect();
        assert_eq!(paths, ["tenant", "component", "kv[0].binding", "limits.wall_ms"]);
        assert_eq!(e[2].path.json_pointer(), "/kv/0/binding");
    }
}
