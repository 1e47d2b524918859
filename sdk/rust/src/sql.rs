//! SQL databases: `[[worker.sql]] binding = "NAME"` opens as
//! `Database::open("NAME")`. Statements take positional parameters (`?`),
//! which are bound, never spliced into the text, so values from requests
//! are safe to pass. One call runs one statement; [`Database::batch`] runs
//! several in one transaction.
//!
//! ```no_run
//! use cordon_sdk::sql::{Database, Value};
//! let db = Database::open("DB")?;
//! db.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)", &[])?;
//! let id = db.execute("INSERT INTO notes (text) VALUES (?)", &["hello".into()])?.last_insert_rowid;
//! let rows = db.execute("SELECT id, text FROM notes WHERE id = ?", &[Value::from(id.unwrap_or(0))])?;
//! for row in rows.iter() {
//!     let text = row.text("text");
//! }
//! # Ok::<(), cordon_sdk::Error>(())
//! ```

use crate::bindings::cordon::sql::sql;
use crate::{Error, ErrorKind};

pub use sql::Value;

impl From<sql::Error> for Error {
    fn from(e: sql::Error) -> Error {
        match e {
            sql::Error::NoSuchBinding(m) => Error::new(ErrorKind::NoSuchBinding, m),
            sql::Error::Denied(m) => Error::new(ErrorKind::Denied, m),
            sql::Error::ReadOnly => Error::new(ErrorKind::Denied, "this database binding is read-only"),
            sql::Error::LimitExceeded(m) => Error::new(ErrorKind::LimitExceeded, m),
            sql::Error::Constraint(m) => Error::new(ErrorKind::Constraint, m),
            sql::Error::Invalid(m) => Error::new(ErrorKind::Invalid, m),
            sql::Error::Other(m) => Error::new(ErrorKind::Other, m),
        }
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Integer(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Real(v)
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
        Value::Blob(v)
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
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
    /// Rows inserted, updated or deleted.
    pub rows_affected: u64,
    /// The rowid of the last row inserted, if the statement inserted one.
    pub last_insert_rowid: Option<i64>,
}

impl From<sql::RowSet> for Rows {
    fn from(r: sql::RowSet) -> Rows {
        Rows { columns: r.columns, rows: r.rows, rows_affected: r.rows_affected, last_insert_rowid: r.last_insert_rowid }
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
}

/// One row of [`Rows`].
pub struct Row<'a> {
    columns: &'a [String],
    values: &'a [Value],
}

impl Row<'_> {
    pub fn get(&self, column: &str) -> Option<&Value> {
        self.columns.iter().position(|c| c == column).and_then(|i| self.values.get(i))
    }

    pub fn integer(&self, column: &str) -> Option<i64> {
        match self.get(column)? {
            Value::Integer(i) => Some(*i),
            _ => None,
        }
    }

    pub fn text(&self, column: &str) -> Option<&str> {
        match self.get(column)? {
            Value::Text(t) => Some(t),
            _ => None,
        }
    }

    pub fn real(&self, column: &str) -> Option<f64> {
        match self.get(column)? {
            Value::Real(r) => Some(*r),
            Value::Integer(i) => Some(*i as f64),
            _ => None,
        }
    }
}

/// An open database.
pub struct Database {
    db: sql::Database,
}

impl Database {
    /// Opens the database granted to this worker under `binding`.
    pub fn open(binding: &str) -> Result<Database, Error> {
        Ok(Database { db: sql::Database::open(binding)? })
    }

    /// Runs one statement with positional parameters.
    pub fn execute(&self, statement: &str, params: &[Value]) -> Result<Rows, Error> {
        Ok(self.db.execute(statement, params)?.into())
    }

    /// Runs the statements in one transaction: all or nothing. On failure,
    /// the error comes with the index of the statement that failed.
    pub fn batch(&self, statements: &[(&str, Vec<Value>)]) -> Result<Vec<Rows>, (u32, Error)> {
        let statements: Vec<sql::Statement> =
            statements.iter().map(|(s, p)| sql::Statement { sql: s.to_string(), params: p.clone() }).collect();
        match self.db.batch(&statements) {
            Ok(sets) => Ok(sets.into_iter().map(Rows::from).collect()),
            Err((i, e)) => Err((i, e.into())),
        }
    }
}
