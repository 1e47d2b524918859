//! Postgres databases: `[[worker.postgres]] binding = "NAME"` opens as
//! `Database::open("NAME")`, the tenant's `[[database]]` reached through
//! Cordon's Postgres accelerator (pooled connections, and a cache for reads).
//! Statements take positional parameters (`$1`, `$2`, ...), which are always
//! bound, never spliced into the text, so values from requests are safe to
//! pass. One call runs one statement; [`Database::transaction`] runs several
//! in one transaction.
//!
//! ```no_run
//! use cordon_sdk::postgres::{Database, Value};
//! let db = Database::open("PG");
//! db.query("INSERT INTO notes (author, body) VALUES ($1, $2)", &["ada".into(), "hello".into()])?;
//! let notes = db.query("SELECT id, body FROM notes WHERE author = $1 ORDER BY id", &[Value::from("ada")])?;
//! for row in notes.iter() {
//!     let (id, body) = (row.int("id"), row.text("body"));
//! }
//! // All or nothing: on failure, nothing of the transaction is left.
//! db.transaction(&[
//!     ("UPDATE accounts SET balance = balance - $1 WHERE id = $2", vec![10.into(), 1.into()]),
//!     ("UPDATE accounts SET balance = balance + $1 WHERE id = $2", vec![10.into(), 2.into()]),
//! ])
//! .map_err(|(_index, e)| e)?;
//! # Ok::<(), cordon_sdk::Error>(())
//! ```
//!
//! Values: `NULL`, booleans, integers (`int2`, `int4`, `int8`, `oid`),
//! floats (`float4`, `float8`) and `bytea` come back as their own kinds;
//! every other type (`numeric`, dates, `json`, arrays, ...) as text, exactly
//! as Postgres prints it. A parameter's type is inferred by Postgres from
//! where it is used, as for an untyped literal; cast it (`$1::int8`) where
//! that is ambiguous. Bytes are always sent as `bytea`.

use crate::bindings::cordon::postgres::postgres;
use crate::{Error, ErrorKind};

pub use postgres::{Column, Value};

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Error {
        match e {
            postgres::Error::NoSuchBinding(m) => Error::new(ErrorKind::NoSuchBinding, m),
            postgres::Error::Database(e) => {
                // Class 23: integrity constraint violations, as for `sql`.
                let kind = if e.code.starts_with("23") { ErrorKind::Constraint } else { ErrorKind::Database };
                Error::with_code(kind, format!("{} (SQLSTATE {})", e.message, e.code), e.code)
            }
            postgres::Error::Unavailable(e) => {
                Error::with_code(ErrorKind::Unavailable, format!("{} (SQLSTATE {})", e.message, e.code), e.code)
            }
            postgres::Error::ResultTooLarge(limit) => {
                Error::new(ErrorKind::LimitExceeded, format!("the result is larger than {limit} bytes (limits.max_postgres_result_bytes)"))
            }
            postgres::Error::Invalid(m) => Error::new(ErrorKind::Invalid, m),
            postgres::Error::BudgetExceeded(m) => Error::new(ErrorKind::LimitExceeded, m),
        }
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Boolean(v)
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}

impl From<i32> for Value {
    fn from(v: i32) -> Value {
        Value::Int(v.into())
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Float(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_string())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(v)
    }
}

impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Value {
        Value::Bytes(v)
    }
}

impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Value {
        Value::Bytes(v.to_vec())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

/// The result of one statement.
#[derive(Debug, Clone)]
pub struct Rows {
    pub columns: Vec<Column>,
    pub rows: Vec<Vec<Value>>,
    /// Rows inserted, updated, deleted or returned.
    pub rows_affected: u64,
    /// Whether the result came from the accelerator's cache.
    pub cached: bool,
}

impl From<postgres::QueryResult> for Rows {
    fn from(r: postgres::QueryResult) -> Rows {
        Rows { columns: r.columns, rows: r.rows, rows_affected: r.rows_affected, cached: r.cached }
    }
}

impl Rows {
    /// The rows, each readable by column name.
    pub fn iter(&self) -> impl Iterator<Item = Row<'_>> {
        self.rows.iter().map(move |values| Row { columns: &self.columns, values })
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// The column names, in order.
    pub fn column_names(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|c| c.name.as_str())
    }
}

/// One row of [`Rows`].
pub struct Row<'a> {
    columns: &'a [Column],
    values: &'a [Value],
}

impl Row<'_> {
    pub fn get(&self, column: &str) -> Option<&Value> {
        self.columns.iter().position(|c| c.name == column).and_then(|i| self.values.get(i))
    }

    pub fn is_null(&self, column: &str) -> bool {
        matches!(self.get(column), Some(Value::Null))
    }

    pub fn int(&self, column: &str) -> Option<i64> {
        match self.get(column)? {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn float(&self, column: &str) -> Option<f64> {
        match self.get(column)? {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    pub fn boolean(&self, column: &str) -> Option<bool> {
        match self.get(column)? {
            Value::Boolean(b) => Some(*b),
            _ => None,
        }
    }

    /// A text value; also how `numeric`, dates, `json` and other types
    /// without a kind of their own arrive.
    pub fn text(&self, column: &str) -> Option<&str> {
        match self.get(column)? {
            Value::Text(t) => Some(t),
            _ => None,
        }
    }

    pub fn bytes(&self, column: &str) -> Option<&[u8]> {
        match self.get(column)? {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }
}

/// A Postgres database granted to this worker.
pub struct Database {
    binding: String,
}

impl Database {
    /// The database granted under `binding`. Nothing is checked until the
    /// first statement: a binding this worker was not granted fails there
    /// with [`ErrorKind::NoSuchBinding`].
    pub fn open(binding: &str) -> Database {
        Database { binding: binding.to_string() }
    }

    /// Runs one statement with positional parameters (`$1`, `$2`, ...),
    /// outside any transaction. A read may be served from the cache
    /// ([`Rows::cached`]); a write evicts the cached reads of its tables.
    pub fn query(&self, statement: &str, params: &[Value]) -> Result<Rows, Error> {
        Ok(postgres::query(&self.binding, statement, params)?.into())
    }

    /// Runs the statements in one transaction: all of them commit, or none
    /// does. On failure, the error comes with the index of the statement
    /// that failed (the number of statements if the commit failed).
    pub fn transaction(&self, statements: &[(&str, Vec<Value>)]) -> Result<Vec<Rows>, (u32, Error)> {
        let statements: Vec<postgres::Statement> =
            statements.iter().map(|(s, p)| postgres::Statement { sql: s.to_string(), params: p.clone() }).collect();
        match postgres::transaction(&self.binding, &statements) {
            Ok(results) => Ok(results.into_iter().map(Rows::from).collect()),
            Err(e) => Err((e.index, e.error.into())),
        }
    }
}
