//! What every spec shares, whatever it was read from: the key path an error
//! points at, the error itself, and the checks that record errors under a
//! key path.
//!
//! A spec is a plain value (a [`crate::WorkerSpec`], a
//! [`crate::DatabaseSpec`]) that a front end built from its source: the
//! TOML file or a JSON document. Validation sees only the spec, so it
//! reports where a problem is as a [`KeyPath`] inside the spec, and each
//! front end turns that path back into something its reader can find:
//! file:line:column for `cordon.toml`, a JSON pointer for the control API.

use std::fmt;

/// Where in a spec a value is: fields and array indices from the spec's
/// root, displayed as `limits.cpu_ms` or `kv[0].namespace`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct KeyPath(Vec<Segment>);

/// One step of a [`KeyPath`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Segment {
    /// A key of a table or object.
    Field(String),
    /// A position in an array, from 0.
    Index(usize),
}

impl KeyPath {
    /// The spec itself.
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// This path, then the key `name`.
    pub fn field(mut self, name: impl Into<String>) -> Self {
        self.0.push(Segment::Field(name.into()));
        self
    }

    /// This path, then position `index` of the array it names.
    pub fn index(mut self, index: usize) -> Self {
        self.0.push(Segment::Index(index));
        self
    }

    /// `self` followed by `rest`: the path of a spec's key inside the
    /// document that holds the spec.
    pub fn join(&self, rest: &KeyPath) -> KeyPath {
        KeyPath(self.0.iter().chain(&rest.0).cloned().collect())
    }

    pub fn segments(&self) -> &[Segment] {
        &self.0
    }

    /// The RFC 6901 JSON pointer to the same value: `/limits/cpu_ms`,
    /// `/kv/0/namespace`, and `""` for the root. `~` and `/` in a key are
    /// escaped as `~0` and `~1`.
    pub fn json_pointer(&self) -> String {
        let mut pointer = String::new();
        for segment in &self.0 {
            pointer.push('/');
            match segment {
                Segment::Field(name) => pointer.push_str(&name.replace('~', "~0").replace('/', "~1")),
                Segment::Index(i) => pointer.push_str(&i.to_string()),
            }
        }
        pointer
    }
}

impl From<&str> for KeyPath {
    /// The path of one top-level key.
    fn from(name: &str) -> Self {
        KeyPath::root().field(name)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Field(name) if i == 0 => f.write_str(name)?,
                Segment::Field(name) => write!(f, ".{name}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// What kind of problem a [`SpecError`] is, for a caller that answers
/// differently to each (the control API's status and error code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A number outside its range.
    OutOfRange,
    /// A value that is malformed: a name, route, URL or outbound entry.
    Invalid,
    /// The same thing listed twice inside one spec.
    Duplicate,
    /// Two values of one spec that contradict each other.
    Conflict,
    /// Something the spec names does not exist: the component file, the
    /// tenant's database.
    NotFound,
    /// The name is already used by another worker of the same tenant, or
    /// another database of the same tenant.
    NameTaken,
    /// The route is already served by another worker.
    RouteTaken,
}

impl ErrorKind {
    /// A stable snake_case name, for machine-readable errors.
    pub fn code(self) -> &'static str {
        match self {
            Self::OutOfRange => "out_of_range",
            Self::Invalid => "invalid",
            Self::Duplicate => "duplicate",
            Self::Conflict => "conflict",
            Self::NotFound => "not_found",
            Self::NameTaken => "name_taken",
            Self::RouteTaken => "route_taken",
        }
    }
}

/// One problem of a spec: where it is, what is wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{path}`: {message}")]
pub struct SpecError {
    /// Relative to the spec that was validated.
    pub path: KeyPath,
    pub kind: ErrorKind,
    pub message: String,
    /// How to fix it.
    pub help: String,
}

/// Every problem found in a spec; never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_errors(f, self.0.iter().map(|e| (e as &dyn fmt::Display, e.help.as_str())))
    }
}

/// A list of errors as every front end prints it: `error: ...` and its
/// `help:` line, one after the other.
pub(crate) fn write_errors<'a>(f: &mut fmt::Formatter<'_>, errors: impl Iterator<Item = (&'a dyn fmt::Display, &'a str)>) -> fmt::Result {
    for (i, (error, help)) in errors.enumerate() {
        if i > 0 {
            f.write_str("\n")?;
        }
        write!(f, "error: {error}\n  help: {help}")?;
    }
    Ok(())
}

/// The message and help of an integer outside `min..=max`, the same for
/// every source and section.
pub(crate) fn out_of_range(n: i64, default: u64, min: u64, max: u64, what: &str) -> (String, String) {
    (format!("must be between {min} and {max}, got {n}"), format!("set it to {what} (default {default}), or remove it to use the default"))
}

/// Collects the problems of one spec. Checks never stop at the first
/// problem: a bad value is replaced by its default so that the checks
/// after it still run, and the problem is recorded.
#[derive(Debug, Default)]
pub(crate) struct Checker {
    pub errors: Vec<SpecError>,
}

impl Checker {
    pub fn error(&mut self, path: KeyPath, kind: ErrorKind, message: impl Into<String>, help: impl Into<String>) {
        self.errors.push(SpecError { path, kind, message: message.into(), help: help.into() });
    }

    /// An integer with a default and an inclusive range.
    pub fn int(&mut self, value: Option<i64>, path: KeyPath, default: u64, min: u64, max: u64, what: &str) -> u64 {
        let Some(n) = value else { return default };
        if n < min as i64 || n > max as i64 {
            let (message, help) = out_of_range(n, default, min, max, what);
            self.error(path, ErrorKind::OutOfRange, message, help);
            return default;
        }
        n as u64
    }

    /// A worker, tenant, namespace or database name ([`crate::is_valid_name`]).
    pub fn name(&mut self, value: &str, path: KeyPath) {
        if !crate::is_valid_name(value) {
            self.error(
                path,
                ErrorKind::Invalid,
                format!("`{value}` is not a valid name"),
                format!("use 1 to {} characters from a-z, 0-9, `_` and `-`", crate::NAME_MAX_LEN),
            );
        }
    }

    /// The errors, or `value` when there are none.
    pub fn finish<T>(self, value: T) -> Result<T, SpecErrors> {
        if self.errors.is_empty() { Ok(value) } else { Err(SpecErrors(self.errors)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_display_as_dotted_keys_and_as_json_pointers() {
        let path = KeyPath::from("kv").index(0).field("namespace");
        assert_eq!(path.to_string(), "kv[0].namespace");
        assert_eq!(path.json_pointer(), "/kv/0/namespace");
        let limits = KeyPath::from("limits").field("cpu_ms");
        assert_eq!(limits.to_string(), "limits.cpu_ms");
        assert_eq!(limits.json_pointer(), "/limits/cpu_ms");
        assert_eq!(KeyPath::from("worker").index(3).join(&limits).to_string(), "worker[3].limits.cpu_ms");
        assert_eq!(KeyPath::root().json_pointer(), "");
        // A key that holds the pointer's own separators is escaped, `~` first.
        assert_eq!(KeyPath::from("vars").field("a/b~c").json_pointer(), "/vars/a~1b~0c");
    }
}
