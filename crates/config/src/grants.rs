//! The capability grants of a worker: `[[worker.kv]]`, `[[worker.sql]]`,
//! `[[worker.postgres]]`, `[worker.vars]` and `secrets`. Each grant gives
//! the guest a name (the binding) that it opens at run time; storage behind
//! it is always scoped to the worker's tenant.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::spec::{Checker, ErrorKind, KeyPath};
use crate::validate::{NAME_MAX_LEN, is_valid_name};
use crate::worker::WorkerSpec;

/// Longest binding, variable or secret name.
pub const BINDING_MAX_LEN: usize = 63;

/// Binding, variable and secret names: an ASCII letter or `_`, then
/// letters, digits or `_`, up to 63 characters (`CACHE`, `db`, `API_KEY`).
pub fn is_valid_binding(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && name.len() <= BINDING_MAX_LEN
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `[[worker.kv]]`: a key-value namespace of the worker's tenant.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KvGrant {
    /// The name the guest opens (`wasi:keyvalue/store.open`).
    pub binding: String,
    /// The store, scoped to the tenant: tenants with the same namespace
    /// name have different stores.
    pub namespace: String,
}

/// `[[worker.sql]]`: a SQL database of the worker's tenant.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SqlGrant {
    /// The name the guest opens (`cordon:sql`).
    pub binding: String,
    /// The database, scoped to the tenant.
    pub database: String,
    /// Statements that write are refused.
    #[serde(default)]
    pub read_only: bool,
}

/// `[[worker.postgres]]`: a `[[database]]` of the worker's tenant, reached
/// through the Postgres accelerator.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresGrant {
    /// The name the guest opens.
    pub binding: String,
    /// The `name` of a `[[database]]` whose `tenant` is the worker's;
    /// validation refuses any other.
    pub database: String,
}

/// Every grant of one worker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    pub kv: Vec<KvGrant>,
    pub sql: Vec<SqlGrant>,
    pub postgres: Vec<PostgresGrant>,
    /// Plain configuration values, readable through `wasi:config/store`.
    pub vars: BTreeMap<String, String>,
    /// Names of the secrets this worker may read through `wasi:config/store`;
    /// the values are set with `cordon secret put` and stored encrypted.
    pub secrets: Vec<String>,
}

/// The grants of `spec`, each checked, with the key path of each problem
/// relative to the worker.
pub(crate) fn check(spec: &WorkerSpec, c: &mut Checker) -> Grants {
    let mut grants = Grants::default();
    let mut bindings: Vec<&str> = Vec::new();
    let name_help = format!("use 1 to {BINDING_MAX_LEN} characters: a letter or `_`, then letters, digits or `_`");
    let store_help = format!("use 1 to {NAME_MAX_LEN} characters from a-z, 0-9, `_` and `-`");

    for (j, kv) in spec.kv.iter().enumerate() {
        let path = KeyPath::from("kv").index(j);
        binding_name(c, &kv.binding, path.clone().field("binding"), &name_help, &mut bindings);
        if !is_valid_name(&kv.namespace) {
            c.error(
                path.field("namespace"),
                ErrorKind::Invalid,
                format!("`{}` is not a valid namespace name", kv.namespace),
                store_help.clone(),
            );
        }
        grants.kv.push(kv.clone());
    }
    for (j, sql) in spec.sql.iter().enumerate() {
        let path = KeyPath::from("sql").index(j);
        binding_name(c, &sql.binding, path.clone().field("binding"), &name_help, &mut bindings);
        if !is_valid_name(&sql.database) {
            c.error(
                path.field("database"),
                ErrorKind::Invalid,
                format!("`{}` is not a valid database name", sql.database),
                store_help.clone(),
            );
        }
        grants.sql.push(sql.clone());
    }
    // Whether the database exists for this tenant is checked against the
    // tenant's databases (`WorkerContext::databases`).
    for (j, pg) in spec.postgres.iter().enumerate() {
        binding_name(c, &pg.binding, KeyPath::from("postgres").index(j).field("binding"), &name_help, &mut bindings);
        grants.postgres.push(pg.clone());
    }

    let mut config_names: Vec<&str> = Vec::new();
    for (name, value) in &spec.vars {
        if !is_valid_binding(name) {
            c.error(
                KeyPath::from("vars").field(name.as_str()),
                ErrorKind::Invalid,
                format!("`{name}` is not a valid variable name"),
                name_help.clone(),
            );
        }
        config_names.push(name);
        grants.vars.insert(name.clone(), value.clone());
    }
    for (j, name) in spec.secrets.iter().enumerate() {
        let path = KeyPath::from("secrets").index(j);
        if !is_valid_binding(name) {
            c.error(path, ErrorKind::Invalid, format!("`{name}` is not a valid secret name"), name_help.clone());
        } else if config_names.contains(&name.as_str()) {
            let what = if grants.vars.contains_key(name) { "a variable in [worker.vars]" } else { "listed twice" };
            c.error(
                path,
                ErrorKind::Duplicate,
                format!("`{name}` is also {what}"),
                "a name is either a plain variable or a secret, once: rename or remove one",
            );
        } else {
            config_names.push(name);
            grants.secrets.push(name.clone());
        }
    }
    grants
}

fn binding_name<'a>(c: &mut Checker, name: &'a str, path: KeyPath, help: &str, seen: &mut Vec<&'a str>) {
    if !is_valid_binding(name) {
        c.error(path, ErrorKind::Invalid, format!("`{name}` is not a valid binding name"), help.to_string());
    } else if seen.contains(&name) {
        c.error(
            path,
            ErrorKind::Duplicate,
            format!("binding `{name}` is already granted to this worker"),
            "give every binding of a worker its own name",
        );
    } else {
        seen.push(name);
    }
}
