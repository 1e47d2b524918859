//! Write Cordon workers in Rust.
//!
//! A worker is a `wasi:http/proxy` component: it handles HTTP with the
//! [`wasi`](https://docs.rs/wasi) crate and uses this crate for what its
//! config grants it:
//!
//! - [`kv`]: key-value stores (`[[worker.kv]]`, the `wasi:keyvalue`
//!   interfaces plus Cordon's prefix listing and expiry);
//! - [`sql`]: SQL databases (`[[worker.sql]]`, `cordon:sql`);
//! - [`postgres`]: the tenant's Postgres databases through the accelerator
//!   (`[[worker.postgres]]`, `cordon:postgres`);
//! - [`config`]: variables and secrets (`[worker.vars]` and `secrets`,
//!   `wasi:config/store`).
//!
//! A component imports only the interfaces it calls, and Cordon refuses to
//! load one that imports an interface its worker was not granted, so using
//! a module here is what asks for the grant.
//!
//! ```no_run
//! let counts = cordon_sdk::kv::Store::open("COUNTS")?;
//! let n = counts.increment("/home", 1)?;
//!
//! let db = cordon_sdk::sql::Database::open("DB")?;
//! db.execute("INSERT INTO visits (path, n) VALUES (?, ?)", &["/home".into(), (n as i64).into()])?;
//!
//! let pg = cordon_sdk::postgres::Database::open("PG");
//! let user = pg.query("SELECT name FROM users WHERE id = $1", &[42.into()])?;
//!
//! let greeting = cordon_sdk::config::get("GREETING")?.unwrap_or_default();
//! # Ok::<(), cordon_sdk::Error>(())
//! ```

mod bindings {
    wit_bindgen::generate!({
        inline: "
            package cordon:sdk;

            world worker {
                import wasi:keyvalue/store@0.2.0-draft;
                import wasi:keyvalue/atomics@0.2.0-draft;
                import wasi:keyvalue/batch@0.2.0-draft;
                import cordon:kv/ext@0.1.0;
                import wasi:config/store@0.2.0-rc.1;
                import cordon:sql/sql@0.1.0;
                import cordon:postgres/postgres@0.1.0;
            }
        ",
        path: ["../../wit/keyvalue", "../../wit/cordon-kv", "../../wit/config", "../../wit/cordon-sql", "../../wit/cordon-postgres"],
        world: "cordon:sdk/worker",
        generate_all,
    });
}

pub mod config;
pub mod kv;
pub mod postgres;
pub mod sql;

/// An error from a Cordon capability, with the host's message (which names
/// the binding, rule or limit involved).
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    code: Option<String>,
}

/// What kind of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The name is not granted to this worker.
    NoSuchBinding,
    /// The operation is not allowed (a denied SQL statement, a write to a read-only database).
    Denied,
    /// A limit was reached; the message names it.
    LimitExceeded,
    /// A SQL constraint failed (for Postgres, SQLSTATE class 23).
    Constraint,
    /// The request was malformed (bad SQL, key too long, ...).
    Invalid,
    /// Postgres refused or failed the statement; [`Error::code`] has its SQLSTATE.
    Database,
    /// Postgres could not be reached (pool limits, origin down); [`Error::code`] has a SQLSTATE.
    Unavailable,
    /// Anything else.
    Other,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The SQLSTATE of a Postgres error (`23505`, `42601`, ...), if it has one.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error { kind, message: message.into(), code: None }
    }

    pub(crate) fn with_code(kind: ErrorKind, message: impl Into<String>, code: String) -> Error {
        Error { kind, message: message.into(), code: Some(code) }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}
