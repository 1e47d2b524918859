//! The capability grants of a worker: `[[worker.kv]]`, `[[worker.sql]]`,
//! `[[worker.postgres]]`, `[worker.vars]` and `secrets`. Each grant gives
//! the guest a name (the binding) that it opens at run time; storage behind
//! it is always scoped to the worker's tenant.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use crate::raw::RawWorker;
use crate::validate::{NAME_MAX_LEN, Validator, is_valid_name};

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvGrant {
    /// The name the guest opens (`wasi:keyvalue/store.open`).
    pub binding: String,
    /// The store, scoped to the tenant: tenants with the same namespace
    /// name have different stores.
    pub namespace: String,
}

/// `[[worker.sql]]`: a SQL database of the worker's tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlGrant {
    /// The name the guest opens (`cordon:sql`).
    pub binding: String,
    /// The database, scoped to the tenant.
    pub database: String,
    /// Statements that write are refused.
    pub read_only: bool,
}

/// `[[worker.postgres]]`: a `[[database]]` of the worker's tenant, reached
/// through the Postgres accelerator.
#[derive(Debug, Clone, PartialEq, Eq)]
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKv {
    pub binding: Spanned<String>,
    pub namespace: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPostgres {
    pub binding: Spanned<String>,
    pub database: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSql {
    pub binding: Spanned<String>,
    pub database: Spanned<String>,
    #[serde(default)]
    pub read_only: bool,
}

impl Validator<'_> {
    pub(crate) fn grants(&mut self, i: usize, raw: &RawWorker) -> Grants {
        let key = |k: String| format!("worker[{i}].{k}");
        let mut grants = Grants::default();
        let mut bindings: Vec<&str> = Vec::new();
        let name_help = format!("use 1 to {BINDING_MAX_LEN} characters: a letter or `_`, then letters, digits or `_`");
        let store_help = format!("use 1 to {NAME_MAX_LEN} characters from a-z, 0-9, `_` and `-`");

        for (j, kv) in raw.kv.iter().enumerate() {
            self.binding_name(&kv.binding, key(format!("kv[{j}].binding")), &name_help, &mut bindings);
            if !is_valid_name(kv.namespace.get_ref()) {
                self.error(
                    Some(kv.namespace.span()),
                    key(format!("kv[{j}].namespace")),
                    format!("`{}` is not a valid namespace name", kv.namespace.get_ref()),
                    store_help.clone(),
                );
            }
            grants.kv.push(KvGrant { binding: kv.binding.get_ref().clone(), namespace: kv.namespace.get_ref().clone() });
        }
        for (j, sql) in raw.sql.iter().enumerate() {
            self.binding_name(&sql.binding, key(format!("sql[{j}].binding")), &name_help, &mut bindings);
            if !is_valid_name(sql.database.get_ref()) {
                self.error(
                    Some(sql.database.span()),
                    key(format!("sql[{j}].database")),
                    format!("`{}` is not a valid database name", sql.database.get_ref()),
                    store_help.clone(),
                );
            }
            grants.sql.push(SqlGrant {
                binding: sql.binding.get_ref().clone(),
                database: sql.database.get_ref().clone(),
                read_only: sql.read_only,
            });
        }
        // Whether the database exists for this tenant is checked once all
        // `[[database]]` tables are read (`postgres_grant_checks`).
        for (j, pg) in raw.postgres.iter().enumerate() {
            self.binding_name(&pg.binding, key(format!("postgres[{j}].binding")), &name_help, &mut bindings);
            grants.postgres.push(PostgresGrant { binding: pg.binding.get_ref().clone(), database: pg.database.get_ref().clone() });
        }

        let mut config_names: Vec<&str> = Vec::new();
        for (name, value) in raw.vars.iter().flat_map(|v| v.get_ref()) {
            if !is_valid_binding(name) {
                self.error(
                    Some(value.span()),
                    key(format!("vars.{name}")),
                    format!("`{name}` is not a valid variable name"),
                    name_help.clone(),
                );
            }
            config_names.push(name);
            grants.vars.insert(name.clone(), value.get_ref().clone());
        }
        for (j, secret) in raw.secrets.iter().enumerate() {
            let name = secret.get_ref();
            let k = key(format!("secrets[{j}]"));
            if !is_valid_binding(name) {
                self.error(Some(secret.span()), k, format!("`{name}` is not a valid secret name"), name_help.clone());
            } else if config_names.contains(&name.as_str()) {
                let what = if grants.vars.contains_key(name) { "a variable in [worker.vars]" } else { "listed twice" };
                self.error(
                    Some(secret.span()),
                    k,
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

    fn binding_name<'a>(&mut self, binding: &'a Spanned<String>, key: String, help: &str, seen: &mut Vec<&'a str>) {
        let name = binding.get_ref().as_str();
        if !is_valid_binding(name) {
            self.error(Some(binding.span()), key, format!("`{name}` is not a valid binding name"), help.to_string());
        } else if seen.contains(&name) {
            self.error(
                Some(binding.span()),
                key,
                format!("binding `{name}` is already granted to this worker"),
                "give every binding of a worker its own name",
            );
        } else {
            seen.push(name);
        }
    }
}
