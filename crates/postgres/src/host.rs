//! `cordon:postgres` for guests. A guest names a database by its binding;
//! only the worker's `[[worker.postgres]]` grants resolve, each to the
//! accelerator's database of the worker's own tenant, once at startup.
//! Statements go through the accelerator (`cordon_pgaccel::exec`): the
//! extended protocol with every parameter bound, the shared pool, and the
//! tenant's cache. Parameter values are never logged.

use std::sync::Arc;

use cordon_config::WorkerConfig;
use cordon_pgaccel::accel::{Accelerator, Database};
use cordon_pgaccel::exec::{ExecLimits, QueryError, QueryResult, Value};
use wasmtime::component::{HasData, Linker};

mod generated {
    wasmtime::component::bindgen!({
        path: "../../wit/cordon-postgres",
        world: "cordon:postgres/imports",
        imports: { default: async | trappable },
    });
}

use generated::cordon::postgres::postgres;

/// The WIT interfaces this capability implements; a component importing
/// any of them needs a `[[worker.postgres]]` grant.
pub const INTERFACES: &[&str] = &["cordon:postgres/postgres@0.1.0"];

/// Why a worker's Postgres grants cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// Validation guarantees the database is configured; the accelerator
    /// given at startup must then have it.
    #[error("[[worker.postgres]] binding \"{binding}\": the accelerator has no database \"{database}\" of tenant \"{tenant}\"")]
    NoSuchDatabase { binding: String, tenant: String, database: String },
}

struct Grant {
    binding: String,
    database: Arc<Database>,
}

/// A worker's Postgres grants, resolved once at startup.
pub struct WorkerPostgres {
    grants: Vec<Grant>,
    limits: ExecLimits,
    max_queries: u64,
}

impl WorkerPostgres {
    /// Resolves every `[[worker.postgres]]` grant of `worker` to the
    /// accelerator's database of the worker's tenant. A grant that does not
    /// resolve (or any grant without an accelerator) is an error.
    pub fn open(worker: &WorkerConfig, accel: Option<&Arc<Accelerator>>) -> Result<WorkerPostgres, GrantError> {
        let grants = worker
            .grants
            .postgres
            .iter()
            .map(|g| {
                let database = accel.and_then(|a| a.database(&worker.tenant, &g.database)).ok_or_else(|| GrantError::NoSuchDatabase {
                    binding: g.binding.clone(),
                    tenant: worker.tenant.clone(),
                    database: g.database.clone(),
                })?;
                Ok(Grant { binding: g.binding.clone(), database: database.clone() })
            })
            .collect::<Result<Vec<_>, GrantError>>()?;
        let l = &worker.limits;
        Ok(WorkerPostgres {
            grants,
            limits: ExecLimits { max_result_bytes: usize::try_from(l.max_postgres_result_bytes).unwrap_or(usize::MAX) },
            max_queries: l.max_postgres_queries,
        })
    }

    /// No grants: every call fails with `no-such-binding`.
    pub fn none() -> WorkerPostgres {
        WorkerPostgres { grants: Vec::new(), limits: ExecLimits { max_result_bytes: 0 }, max_queries: 0 }
    }

    fn database(&self, binding: &str) -> Result<&Arc<Database>, postgres::Error> {
        self.grants.iter().find(|g| g.binding == binding).map(|g| &g.database).ok_or_else(|| {
            postgres::Error::NoSuchBinding(format!(
                "no such binding \"{binding}\": this worker has no [[worker.postgres]] grant with binding = \"{binding}\""
            ))
        })
    }
}

/// One request's Postgres state.
pub struct RequestPostgres {
    worker: Arc<WorkerPostgres>,
    queries: cordon_config::OperationBudget,
}

impl RequestPostgres {
    pub fn new(worker: Arc<WorkerPostgres>) -> RequestPostgres {
        let queries = cordon_config::OperationBudget::new(worker.max_queries, "Postgres statement", "max_postgres_queries");
        RequestPostgres { worker, queries }
    }

    /// Statements charged so far.
    pub fn queries(&self) -> u64 {
        self.queries.used()
    }

    /// Charges `n` statements to the request's budget.
    fn charge(&mut self, n: usize) -> Result<(), postgres::Error> {
        self.queries.charge(n).map_err(postgres::Error::BudgetExceeded)
    }
}

pub struct PostgresView<'a> {
    pub state: &'a mut RequestPostgres,
}

struct Postgres;

impl HasData for Postgres {
    type Data<'a> = PostgresView<'a>;
}

pub fn add_to_linker<T: Send + 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> PostgresView<'_>) -> wasmtime::Result<()> {
    generated::Imports::add_to_linker::<T, Postgres>(linker, get)
}

fn to_guest(e: QueryError, database: &Database) -> postgres::Error {
    match e {
        QueryError::Database { code, message } => postgres::Error::Database(postgres::OriginError { code, message }),
        QueryError::Unavailable { code, message } => {
            // The pool's or the origin's condition, never a parameter.
            tracing::warn!(tenant = %database.tenant, database = %database.name, code = %code, error = %message, "Postgres unavailable to a worker");
            postgres::Error::Unavailable(postgres::OriginError { code, message })
        }
        QueryError::ResultTooLarge { limit } => postgres::Error::ResultTooLarge(limit as u64),
        QueryError::Invalid(message) => postgres::Error::Invalid(message),
    }
}

fn value_in(v: postgres::Value) -> Value {
    match v {
        postgres::Value::Null => Value::Null,
        postgres::Value::Boolean(b) => Value::Bool(b),
        postgres::Value::Int(i) => Value::Int(i),
        postgres::Value::Float(f) => Value::Float(f),
        postgres::Value::Text(t) => Value::Text(t),
        postgres::Value::Bytes(b) => Value::Bytes(b),
    }
}

fn value_out(v: Value) -> postgres::Value {
    match v {
        Value::Null => postgres::Value::Null,
        Value::Bool(b) => postgres::Value::Boolean(b),
        Value::Int(i) => postgres::Value::Int(i),
        Value::Float(f) => postgres::Value::Float(f),
        Value::Text(t) => postgres::Value::Text(t),
        Value::Bytes(b) => postgres::Value::Bytes(b),
    }
}

fn result_out(r: QueryResult) -> postgres::QueryResult {
    postgres::QueryResult {
        columns: r.columns.into_iter().map(|c| postgres::Column { name: c.name, type_oid: c.type_oid }).collect(),
        rows: r.rows.into_iter().map(|row| row.into_iter().map(value_out).collect()).collect(),
        rows_affected: r.rows_affected,
        cached: r.cached,
    }
}

impl postgres::Host for PostgresView<'_> {
    async fn query(
        &mut self,
        binding: String,
        sql: String,
        params: Vec<postgres::Value>,
    ) -> wasmtime::Result<Result<postgres::QueryResult, postgres::Error>> {
        let database = match self.state.worker.database(&binding) {
            Ok(database) => database.clone(),
            Err(e) => return Ok(Err(e)),
        };
        if let Err(e) = self.state.charge(1) {
            return Ok(Err(e));
        }
        let params: Vec<Value> = params.into_iter().map(value_in).collect();
        Ok(database.query(&sql, &params, self.state.worker.limits).await.map(result_out).map_err(|e| to_guest(e, &database)))
    }

    async fn transaction(
        &mut self,
        binding: String,
        statements: Vec<postgres::Statement>,
    ) -> wasmtime::Result<Result<Vec<postgres::QueryResult>, postgres::TransactionError>> {
        let database = match self.state.worker.database(&binding) {
            Ok(database) => database.clone(),
            Err(error) => return Ok(Err(postgres::TransactionError { index: 0, error })),
        };
        // Each statement counts; a transaction over the budget runs none of them.
        if let Err(error) = self.state.charge(statements.len().max(1)) {
            return Ok(Err(postgres::TransactionError { index: 0, error }));
        }
        let statements: Vec<(String, Vec<Value>)> =
            statements.into_iter().map(|s| (s.sql, s.params.into_iter().map(value_in).collect())).collect();
        Ok(match database.transaction(&statements, self.state.worker.limits).await {
            Ok(results) => Ok(results.into_iter().map(result_out).collect()),
            Err((index, e)) => {
                Err(postgres::TransactionError { index: u32::try_from(index).unwrap_or(u32::MAX), error: to_guest(e, &database) })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use cordon_config::Config;

    use super::*;
    use postgres::Host as _;

    /// Two tenants with a database `main` each; the origins are never
    /// reached by these tests.
    fn config(workers: &str) -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("w.wasm"), b"").unwrap();
        let text = format!(
            "[[database]]\nname = \"main\"\ntenant = \"acme\"\norigin = \"postgres://app@127.0.0.1:1/acme\"\n\n\
             [[database]]\nname = \"main\"\ntenant = \"globex\"\norigin = \"postgres://app@127.0.0.1:1/globex\"\n{workers}"
        );
        let config = Config::parse(&dir.path().join("cordon.toml"), &text).unwrap_or_else(|e| panic!("{e}"));
        (dir, config)
    }

    fn worker(name: &str, tenant: &str, extra: &str) -> String {
        format!("\n[[worker]]\nname = \"{name}\"\ntenant = \"{tenant}\"\ncomponent = \"w.wasm\"\nroutes = [\"{name}/\"]\n{extra}")
    }

    const GRANT: &str = "[[worker.postgres]]\nbinding = \"PG\"\ndatabase = \"main\"\n";

    #[test]
    fn grants_resolve_to_the_workers_own_tenant() {
        let (_dir, config) = config(&(worker("a", "acme", GRANT) + &worker("g", "globex", GRANT)));
        let accel = Arc::new(Accelerator::from_config(&config, &|_| None).unwrap());
        for w in &config.workers {
            let pg = WorkerPostgres::open(w, Some(&accel)).unwrap();
            let db = pg.database("PG").unwrap();
            assert!(Arc::ptr_eq(db, accel.database(&w.tenant, "main").unwrap()), "{} got another tenant's database", w.name);
            assert_eq!(db.tenant, w.tenant);
        }
    }

    #[test]
    fn a_grant_the_accelerator_cannot_serve_is_a_start_error() {
        let (_dir, config) = config(&worker("a", "acme", GRANT));
        let e = WorkerPostgres::open(&config.workers[0], None).err().expect("no accelerator");
        assert!(e.to_string().contains("binding \"PG\"") && e.to_string().contains("\"main\""), "{e}");
        // An accelerator built from another configuration, without acme's database.
        let (_other, only_globex) = config_without_acme();
        let accel = Arc::new(Accelerator::from_config(&only_globex, &|_| None).unwrap());
        assert!(matches!(WorkerPostgres::open(&config.workers[0], Some(&accel)), Err(GrantError::NoSuchDatabase { .. })));
        // No grants: nothing to resolve, even without an accelerator.
        let (_dir, config) = config_plain();
        assert!(WorkerPostgres::open(&config.workers[0], None).is_ok());
    }

    fn config_without_acme() -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        let text = "[[database]]\nname = \"main\"\ntenant = \"globex\"\norigin = \"postgres://app@127.0.0.1:1/globex\"\n";
        let config = Config::parse(&dir.path().join("cordon.toml"), text).unwrap();
        (dir, config)
    }

    fn config_plain() -> (tempfile::TempDir, Config) {
        config(&worker("a", "acme", ""))
    }

    #[tokio::test]
    async fn an_ungranted_binding_is_no_such_binding_and_costs_nothing() {
        let (_dir, config) = config(&worker("a", "acme", GRANT));
        let accel = Arc::new(Accelerator::from_config(&config, &|_| None).unwrap());
        let mut state = RequestPostgres::new(Arc::new(WorkerPostgres::open(&config.workers[0], Some(&accel)).unwrap()));
        let mut view = PostgresView { state: &mut state };
        let r = view.query("OTHER".into(), "SELECT 1".into(), vec![]).await.unwrap();
        assert!(matches!(&r, Err(postgres::Error::NoSuchBinding(m)) if m.contains("\"OTHER\"")), "{r:?}");
        let r = view.transaction("OTHER".into(), vec![]).await.unwrap();
        assert!(matches!(&r, Err(postgres::TransactionError { index: 0, error: postgres::Error::NoSuchBinding(_) })), "{r:?}");
        assert_eq!(state.queries(), 0);
    }

    #[tokio::test]
    async fn the_budget_is_charged_per_statement_before_anything_runs() {
        let (_dir, config) = config(&worker("a", "acme", &format!("{GRANT}[worker.limits]\nmax_postgres_queries = 2\n")));
        let accel = Arc::new(Accelerator::from_config(&config, &|_| None).unwrap());
        let mut state = RequestPostgres::new(Arc::new(WorkerPostgres::open(&config.workers[0], Some(&accel)).unwrap()));
        let statement = || postgres::Statement { sql: "SELECT 1".into(), params: vec![] };
        let mut view = PostgresView { state: &mut state };
        // Three statements against a budget of two: refused before the (unreachable) origin is tried.
        let r = view.transaction("PG".into(), vec![statement(), statement(), statement()]).await.unwrap();
        match r {
            Err(postgres::TransactionError { index: 0, error: postgres::Error::BudgetExceeded(m) }) => {
                assert!(m.contains("limits.max_postgres_queries") && m.contains("at most 2"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        let r = view.query("PG".into(), "SELECT 1".into(), vec![]).await.unwrap();
        assert!(matches!(r, Err(postgres::Error::BudgetExceeded(_))), "{r:?}");
    }

    #[test]
    fn values_cross_the_boundary_unchanged() {
        for v in [
            Value::Null,
            Value::Bool(true),
            Value::Int(i64::MIN),
            Value::Float(1.5),
            Value::Text("'; DROP TABLE t; --".into()),
            Value::Bytes(vec![0, 255]),
        ] {
            assert_eq!(value_in(value_out(v.clone())), v);
        }
    }
}
