//! `cordon:sql` for guests. A guest opens a database by its binding name;
//! only the worker's `[[worker.sql]]` grants resolve, each to its tenant's
//! database, read-only if the grant says so. Statements run on the SQL
//! blocking pool ([`Databases::pool`]), off the threads that run guests,
//! under the tenant's share of it; a call whose request ends (its future is
//! dropped) is removed from the queue, or interrupted if it runs. The CPU
//! time a statement takes on its thread is charged to the request.

use std::sync::Arc;
use std::time::Duration;

use cordon_blocking::{BlockingPool, CpuCharge, PoolError};
use cordon_config::WorkerConfig;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::database::{Database, Databases, RowSet, SqlError, SqlLimits, Value};

mod generated {
    wasmtime::component::bindgen!({
        path: "../../wit/cordon-sql",
        world: "cordon:sql/imports",
        imports: { default: async | trappable },
        with: {
            "cordon:sql/sql.database": super::Handle,
        },
    });
}

use generated::cordon::sql::sql;

/// The WIT interfaces this capability implements; a component importing
/// any of them needs a `[[worker.sql]]` grant.
pub const INTERFACES: &[&str] = &["cordon:sql/sql@0.1.0"];

struct Grant {
    binding: String,
    database: Arc<Database>,
    read_only: bool,
}

/// A worker's SQL grants, opened once at startup.
pub struct WorkerSql {
    tenant: String,
    pool: Option<Arc<BlockingPool>>,
    grants: Vec<Grant>,
    limits: SqlLimits,
    max_statements: u64,
}

impl WorkerSql {
    /// Opens every database the worker is granted, and sets its tenant's
    /// storage quota and the free-space reserve from its config.
    pub fn open(worker: &WorkerConfig, databases: &Databases) -> Result<WorkerSql, SqlError> {
        let ledger = databases.ledger();
        ledger.set_tenant_quota(&worker.tenant, worker.storage.tenant_quota_bytes);
        ledger.set_free_space_reserve(worker.storage.free_space_reserve_bytes);
        let grants = worker
            .grants
            .sql
            .iter()
            .map(|g| {
                Ok(Grant { binding: g.binding.clone(), database: databases.open(&worker.tenant, &g.database)?, read_only: g.read_only })
            })
            .collect::<Result<Vec<_>, SqlError>>()?;
        let l = &worker.limits;
        let limits = SqlLimits {
            statement_timeout: Duration::from_millis(l.sql_statement_timeout_ms),
            max_rows: l.max_sql_rows as usize,
            max_result_bytes: l.max_sql_result_bytes as usize,
            max_memory_bytes: databases.statement_memory(),
            ..SqlLimits::default()
        };
        Ok(WorkerSql {
            tenant: worker.tenant.clone(),
            pool: Some(Arc::clone(databases.pool())),
            grants,
            limits,
            max_statements: l.max_sql_statements,
        })
    }

    /// No grants: every `open` fails.
    pub fn none() -> WorkerSql {
        WorkerSql { tenant: String::new(), pool: None, grants: Vec::new(), limits: SqlLimits::default(), max_statements: 0 }
    }
}

/// One request's SQL state.
pub struct RequestSql {
    worker: Arc<WorkerSql>,
    statements: cordon_config::OperationBudget,
    cpu: CpuCharge,
    memory: Arc<cordon_memory::Account>,
}

impl RequestSql {
    /// `cpu` collects the CPU time statements take on the pool's threads;
    /// `memory` is charged with the results while they are on the host.
    pub fn new(worker: Arc<WorkerSql>, cpu: CpuCharge, memory: Arc<cordon_memory::Account>) -> RequestSql {
        let statements = cordon_config::OperationBudget::new(worker.max_statements, "SQL statement", "max_sql_statements");
        RequestSql { worker, statements, cpu, memory }
    }

    /// The worker's limits, with the request's memory account to charge
    /// the results to.
    fn limits(&self) -> crate::database::SqlLimits {
        crate::database::SqlLimits { result_memory: Some(self.memory.clone()), ..self.worker.limits.clone() }
    }

    /// Gives back what a call's results were charged once they are handed
    /// to the guest (whose memory is charged as it takes them). The guest
    /// waits in the call, so nothing else of its request charged meanwhile.
    fn release_results(&self, charged_before: u64) {
        self.memory.release(self.memory.used().saturating_sub(charged_before));
    }

    /// Runs `job` on the SQL pool as the worker's tenant and charges its
    /// CPU time to the request. Dropping the returned future cancels it.
    async fn run<T: Send + 'static>(&self, job: impl FnOnce(&cordon_blocking::JobContext) -> T + Send + 'static) -> Result<T, sql::Error> {
        let Some(pool) = &self.worker.pool else {
            return Err(sql::Error::Other("SQL is not available to this worker".to_string()));
        };
        let done = pool.spawn(&self.worker.tenant, job).map_err(pool_error)?.await.map_err(pool_error)?;
        self.cpu.add(done.cpu_time);
        Ok(done.value)
    }

    /// Statements run so far.
    pub fn statements(&self) -> u64 {
        self.statements.used()
    }

    fn charge(&mut self, n: usize) -> Result<(), sql::Error> {
        self.statements.charge(n).map_err(sql::Error::LimitExceeded)
    }
}

/// An open database (`cordon:sql/sql.database`).
pub struct Handle {
    database: Arc<Database>,
    read_only: bool,
}

pub struct SqlView<'a> {
    pub state: &'a mut RequestSql,
    pub table: &'a mut ResourceTable,
}

struct Sql;

impl HasData for Sql {
    type Data<'a> = SqlView<'a>;
}

pub fn add_to_linker<T: Send + 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> SqlView<'_>) -> wasmtime::Result<()> {
    generated::Imports::add_to_linker::<T, Sql>(linker, get)
}

fn to_guest(e: SqlError) -> sql::Error {
    let text = e.to_string();
    match e {
        SqlError::Denied { .. } => sql::Error::Denied(text),
        SqlError::ReadOnly => sql::Error::ReadOnly,
        SqlError::Timeout { .. }
        | SqlError::TooComplex
        | SqlError::TooManyRows { .. }
        | SqlError::ResultTooLarge { .. }
        | SqlError::OverMemory(_)
        | SqlError::StatementTooLong { .. }
        | SqlError::TooManyParams { .. }
        | SqlError::Disk(_) => sql::Error::LimitExceeded(text),
        SqlError::Constraint(_) => sql::Error::Constraint(text),
        SqlError::Empty
        | SqlError::MultipleStatements
        | SqlError::ParamCount { .. }
        | SqlError::Invalid(_)
        | SqlError::InvalidName { .. } => sql::Error::Invalid(text),
        SqlError::Cancelled | SqlError::ShuttingDown => sql::Error::Other(text),
        SqlError::Storage(message) => {
            tracing::warn!(error = %message, "SQL storage failed");
            sql::Error::Other("SQL storage failed".to_string())
        }
    }
}

fn pool_error(e: PoolError) -> sql::Error {
    match e {
        PoolError::QueueFull { .. } | PoolError::TenantQueueFull { .. } => sql::Error::LimitExceeded(e.to_string()),
        PoolError::ShuttingDown | PoolError::Panicked { .. } => sql::Error::Other(e.to_string()),
    }
}

fn value_in(v: sql::Value) -> Value {
    match v {
        sql::Value::Null => Value::Null,
        sql::Value::Integer(i) => Value::Integer(i),
        sql::Value::Real(r) => Value::Real(r),
        sql::Value::Text(t) => Value::Text(t),
        sql::Value::Blob(b) => Value::Blob(b),
    }
}

fn value_out(v: Value) -> sql::Value {
    match v {
        Value::Null => sql::Value::Null,
        Value::Integer(i) => sql::Value::Integer(i),
        Value::Real(r) => sql::Value::Real(r),
        Value::Text(t) => sql::Value::Text(t),
        Value::Blob(b) => sql::Value::Blob(b),
    }
}

fn rows_out(r: RowSet) -> sql::RowSet {
    sql::RowSet {
        columns: r.columns,
        rows: r.rows.into_iter().map(|row| row.into_iter().map(value_out).collect()).collect(),
        rows_affected: r.rows_affected,
        last_insert_rowid: r.last_insert_rowid,
    }
}

impl sql::Host for SqlView<'_> {}

impl sql::HostDatabase for SqlView<'_> {
    async fn open(&mut self, binding: String) -> wasmtime::Result<Result<Resource<Handle>, sql::Error>> {
        let Some(grant) = self.state.worker.grants.iter().find(|g| g.binding == binding) else {
            return Ok(Err(sql::Error::NoSuchBinding(format!(
                "no such binding \"{binding}\": this worker has no [[worker.sql]] grant with binding = \"{binding}\""
            ))));
        };
        let handle = Handle { database: grant.database.clone(), read_only: grant.read_only };
        Ok(Ok(self.table.push(handle)?))
    }

    async fn execute(
        &mut self,
        db: Resource<Handle>,
        statement: String,
        params: Vec<sql::Value>,
    ) -> wasmtime::Result<Result<sql::RowSet, sql::Error>> {
        let handle = self.table.get(&db)?;
        let (database, read_only) = (handle.database.clone(), handle.read_only);
        if let Err(e) = self.state.charge(1) {
            return Ok(Err(e));
        }
        let limits = self.state.limits();
        let params: Vec<Value> = params.into_iter().map(value_in).collect();
        let charged_before = self.state.memory.used();
        let run = self.state.run(move |job| database.execute_job(Some(job), &statement, &params, read_only, &limits)).await;
        let result = run.and_then(|r| r.map(rows_out).map_err(to_guest));
        self.state.release_results(charged_before);
        Ok(result)
    }

    async fn batch(
        &mut self,
        db: Resource<Handle>,
        statements: Vec<sql::Statement>,
    ) -> wasmtime::Result<Result<Vec<sql::RowSet>, (u32, sql::Error)>> {
        let handle = self.table.get(&db)?;
        let (database, read_only) = (handle.database.clone(), handle.read_only);
        if let Err(e) = self.state.charge(statements.len().max(1)) {
            return Ok(Err((0, e)));
        }
        let limits = self.state.limits();
        let statements: Vec<(String, Vec<Value>)> =
            statements.into_iter().map(|s| (s.sql, s.params.into_iter().map(value_in).collect())).collect();
        let charged_before = self.state.memory.used();
        let run = self.state.run(move |job| database.batch_job(Some(job), &statements, read_only, &limits)).await;
        self.state.release_results(charged_before);
        Ok(match run {
            Ok(Ok(sets)) => Ok(sets.into_iter().map(rows_out).collect()),
            Ok(Err((i, e))) => Err((u32::try_from(i).unwrap_or(u32::MAX), to_guest(e))),
            Err(e) => Err((0, e)),
        })
    }

    async fn drop(&mut self, db: Resource<Handle>) -> wasmtime::Result<()> {
        self.table.delete(db)?;
        Ok(())
    }
}
