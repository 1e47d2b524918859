//! The JSON front end, for specs sent to the control API: a worker or a
//! database as one JSON object, with the same keys as its `cordon.toml`
//! table. It runs the same validation as the file, and every error points
//! at its value with an RFC 6901 JSON pointer (`/limits/cpu_ms`,
//! `/kv/0/namespace`). Unknown keys are refused, as in the file.

use std::fmt;

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment as PathSegment;

use crate::spec::{ErrorKind, SpecError, SpecErrors};
use crate::{DatabaseConfig, DatabaseContext, DatabaseSpec, WorkerConfig, WorkerContext, WorkerSpec};

/// What kind of problem a [`JsonError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonErrorKind {
    /// The text is not one JSON value.
    Syntax,
    /// A key that the spec does not have.
    UnknownField,
    /// A key that the spec needs.
    MissingField,
    /// A key given twice in one object.
    DuplicateField,
    /// A value of the wrong type.
    Type,
    /// The spec's validation refused a value.
    Spec(ErrorKind),
}

/// One problem of a JSON spec, at the value it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{pointer}`: {message}")]
pub struct JsonError {
    /// RFC 6901: `""` is the whole document, `/limits/cpu_ms` a key in it.
    pub pointer: String,
    pub kind: JsonErrorKind,
    pub message: String,
    /// How to fix it.
    pub help: String,
}

impl From<SpecError> for JsonError {
    fn from(e: SpecError) -> Self {
        JsonError { pointer: e.path.json_pointer(), kind: JsonErrorKind::Spec(e.kind), message: e.message, help: e.help }
    }
}

/// Every problem found in a JSON spec; never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct JsonErrors(pub Vec<JsonError>);

impl From<SpecErrors> for JsonErrors {
    fn from(errors: SpecErrors) -> Self {
        JsonErrors(errors.0.into_iter().map(JsonError::from).collect())
    }
}

impl fmt::Display for JsonErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::spec::write_errors(f, self.0.iter().map(|e| (e as &dyn fmt::Display, e.help.as_str())))
    }
}

/// A worker spec from `text`, checked for shape only (keys and types).
pub fn worker_spec(text: &str) -> Result<WorkerSpec, JsonErrors> {
    read(text, "a worker")
}

/// A worker from `text`, validated on its own under `context`. Whether
/// its name and routes are free is [`crate::check_worker_among`]'s
/// question; its errors become pointers with [`JsonError::from`].
pub fn worker(text: &str, context: &WorkerContext<'_>) -> Result<WorkerConfig, JsonErrors> {
    Ok(worker_spec(text)?.validate(context)?)
}

/// A database spec from `text`, checked for shape only.
pub fn database_spec(text: &str) -> Result<DatabaseSpec, JsonErrors> {
    read(text, "a database")
}

/// A database from `text`, validated on its own under `context`; beside
/// other databases, [`crate::check_databases`] decides what they share.
pub fn database(text: &str, context: &DatabaseContext<'_>) -> Result<DatabaseConfig, JsonErrors> {
    Ok(database_spec(text)?.validate(context)?)
}

fn read<T: DeserializeOwned>(text: &str, what: &str) -> Result<T, JsonErrors> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let pointer = pointer(e.path());
        JsonErrors(vec![shape_error(pointer, e.into_inner(), what)])
    })?;
    // Text after the object is refused, as a second document would be.
    deserializer.end().map_err(|e| JsonErrors(vec![shape_error(String::new(), e, what)]))?;
    Ok(value)
}

fn pointer(path: &serde_path_to_error::Path) -> String {
    let mut pointer = String::new();
    for segment in path.iter() {
        match segment {
            PathSegment::Seq { index } => push_key(&mut pointer, &index.to_string()),
            PathSegment::Map { key } | PathSegment::Enum { variant: key } => push_key(&mut pointer, key),
            // A key that is not a string, which JSON does not have: the
            // pointer stops at the object that holds it.
            PathSegment::Unknown => break,
        }
    }
    pointer
}

/// A serde error as a [`JsonError`]: its message without serde_json's
/// " at line L column C" (the pointer says where, except for syntax
/// errors, which keep it), and a missing key's pointer extended to the key.
fn shape_error(mut pointer: String, e: serde_json::Error, what: &str) -> JsonError {
    let full = e.to_string();
    let located = format!(" at line {} column {}", e.line(), e.column());
    let bare = full.strip_suffix(&located).unwrap_or(&full).to_string();
    if !e.is_data() {
        return JsonError { pointer, kind: JsonErrorKind::Syntax, message: full, help: format!("send {what} as one JSON object") };
    }
    let (kind, help) = if bare.starts_with("unknown field") {
        (JsonErrorKind::UnknownField, "remove this key or fix its spelling; docs/config.md lists every key".to_string())
    } else if let Some(key) = backticked(&bare, "missing field `") {
        push_key(&mut pointer, key);
        (JsonErrorKind::MissingField, "add this key; docs/config.md describes it".to_string())
    } else if let Some(key) = backticked(&bare, "duplicate field `") {
        push_key(&mut pointer, key);
        (JsonErrorKind::DuplicateField, "give this key once".to_string())
    } else {
        (JsonErrorKind::Type, "give the value the type that docs/config.md shows for this key".to_string())
    };
    JsonError { pointer, kind, message: bare, help }
}

/// The key that serde names in a message that starts with `prefix`:
/// "missing field `routes`" gives `routes`. serde reports these two at the
/// object, so the pointer is extended to the key the message names.
fn backticked<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    message.strip_prefix(prefix)?.split('`').next()
}

fn push_key(pointer: &mut String, key: &str) {
    pointer.push('/');
    pointer.push_str(&key.replace('~', "~0").replace('/', "~1"));
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::StorageBounds;

    fn context(base: &Path) -> WorkerContext<'_> {
        WorkerContext { base, max_memory_mb: 4096, tenant_max_instances: 10, storage: StorageBounds::default(), databases: &[] }
    }

    /// A component file to point specs at, and its directory.
    fn component() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("api.wasm"), b"").unwrap();
        dir
    }

    fn errors(text: &str) -> Vec<JsonError> {
        let dir = component();
        worker(text, &context(dir.path())).unwrap_err().0
    }

    fn at<'a>(errors: &'a [JsonError], pointer: &str) -> &'a JsonError {
        errors.iter().find(|e| e.pointer == pointer).unwrap_or_else(|| panic!("no error at {pointer}: {errors:?}"))
    }

    #[test]
    fn a_valid_worker_validates_to_the_same_config_as_in_the_file() {
        let dir = component();
        let w = worker(
            r#"{"name": "api", "tenant": "acme", "component": "api.wasm", "routes": ["API.example.com/v1/"],
                "kv": [{"binding": "CACHE", "namespace": "cache"}], "vars": {"MODE": "live"},
                "limits": {"cpu_ms": 20, "max_instances": 4}}"#,
            &context(dir.path()),
        )
        .unwrap();
        assert_eq!((w.tenant.as_str(), w.name.as_str()), ("acme", "api"));
        assert_eq!(w.component, dir.path().join("api.wasm"));
        assert_eq!(w.routes[0].to_string(), "api.example.com/v1");
        assert_eq!((w.limits.cpu_ms, w.limits.max_instances, w.limits.wall_ms), (20, 4, 30_000));
        assert_eq!(w.grants.kv[0].namespace, "cache");
    }

    #[test]
    fn validation_errors_are_json_pointers() {
        let e = errors(
            r#"{"name": "api", "tenant": "acme", "component": "api.wasm", "routes": ["h/", "h:80/"],
                "kv": [{"binding": "CACHE", "namespace": "Not Valid"}],
                "limits": {"cpu_ms": 0, "max_instances": 11}}"#,
        );
        let cpu = at(&e, "/limits/cpu_ms");
        assert_eq!(cpu.message, "must be between 1 and 60000, got 0");
        assert_eq!(cpu.kind, JsonErrorKind::Spec(ErrorKind::OutOfRange));
        assert!(at(&e, "/limits/max_instances").message.contains("quota of 10 instances"), "{e:?}");
        assert!(at(&e, "/kv/0/namespace").message.contains("not a valid namespace name"), "{e:?}");
        assert!(at(&e, "/routes/1").message.contains("has a port"), "{e:?}");
        assert_eq!(e.len(), 4, "{e:?}");
    }

    #[test]
    fn unknown_keys_are_refused_at_their_pointer() {
        let e = errors(r#"{"name": "api", "tenant": "acme", "component": "api.wasm", "routes": ["h/"], "limits": {"cpu": 5}}"#);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].pointer.as_str(), e[0].kind), ("/limits/cpu", JsonErrorKind::UnknownField));
        assert!(e[0].message.starts_with("unknown field `cpu`"), "{}", e[0].message);

        let e = errors(
            r#"{"name": "api", "tenant": "acme", "component": "api.wasm", "routes": ["h/"], "kv": [{"binding": "A", "namespace": "n", "ttl": 1}]}"#,
        );
        assert_eq!(e[0].pointer, "/kv/0/ttl", "{e:?}");
    }

    #[test]
    fn shape_errors_point_at_the_value_or_the_missing_key() {
        let e = errors(r#"{"name": "api", "tenant": "acme", "component": "api.wasm", "routes": ["h/"], "limits": {"cpu_ms": "fast"}}"#);
        assert_eq!((e[0].pointer.as_str(), e[0].kind), ("/limits/cpu_ms", JsonErrorKind::Type));
        assert!(!e[0].message.contains("line"), "the pointer says where: {}", e[0].message);

        let e = errors(r#"{"name": "api", "tenant": "acme", "component": "api.wasm"}"#);
        assert_eq!((e[0].pointer.as_str(), e[0].kind), ("/routes", JsonErrorKind::MissingField));

        let e = errors(r#"{"name": "api", "name": "b", "tenant": "acme", "component": "api.wasm", "routes": ["h/"]}"#);
        assert_eq!((e[0].pointer.as_str(), e[0].kind), ("/name", JsonErrorKind::DuplicateField), "{e:?}");

        let e = errors(r#"{"name": "api""#);
        assert_eq!(e[0].kind, JsonErrorKind::Syntax, "{e:?}");
        let e = errors(r#"{"name": "api", "tenant": "acme", "component": "api.wasm", "routes": ["h/"]} {}"#);
        assert_eq!((e[0].pointer.as_str(), e[0].kind), ("", JsonErrorKind::Syntax), "{e:?}");
    }

    #[test]
    fn a_database_spec_reports_pointers_too() {
        let base = Path::new("/srv");
        let context = DatabaseContext { base, require_origin_tls: true };
        let d =
            database(r#"{"name": "main", "tenant": "acme", "origin": "postgres://app@127.0.0.1/app", "pool_size": 40}"#, &context).unwrap();
        assert_eq!((d.pool_size, d.tenant_origin_connections), (40, 40), "a database alone is its own origin group");

        let e = database(
            r#"{"name": "main", "tenant": "acme", "origin": "postgres://app@db.internal/app",
                "users": [{"name": "app", "password_env": "NOT-AN-ENV"}], "cache": {"max_age_s": 0}}"#,
            &context,
        )
        .unwrap_err()
        .0;
        assert!(at(&e, "/origin").message.contains("without TLS"), "{e:?}");
        assert!(at(&e, "/users/0/password_env").message.contains("not a valid environment variable name"), "{e:?}");
        assert_eq!(at(&e, "/cache/max_age_s").kind, JsonErrorKind::Spec(ErrorKind::OutOfRange));

        let e = database_spec(r#"{"name": "main", "tenant": "acme", "origin": "postgres://a@h/d", "cache": {"ttl": 1}}"#).unwrap_err().0;
        assert_eq!(e[0].pointer, "/cache/ttl");
    }
}
