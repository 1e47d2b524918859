//! The Postgres accelerator: `[postgres_proxy]`, the listener that clients
//! connect to, and `[[database]]`, the tenants' origin databases that it
//! pools and caches. Workers reach a database through a `[[worker.postgres]]`
//! grant (see `crate::grants`), which may only name a database of the
//! worker's own tenant.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::ServerConfig;
use crate::spec::{Checker, ErrorKind, KeyPath, SpecError, SpecErrors};
use crate::validate::Validator;

/// Longest name of an environment variable that holds a password.
pub const ENV_NAME_MAX_LEN: usize = 128;

/// Longest Postgres role or database name: Postgres truncates identifiers
/// to `NAMEDATALEN - 1` bytes, so a longer name would silently mean another.
const PG_IDENT_MAX_LEN: usize = 63;

/// Names of environment variables: `[A-Za-z_][A-Za-z0-9_]*`, 1 to 128
/// characters. Only the name is in the config; the value is read from the
/// environment at startup, so passwords stay out of the file.
pub fn is_valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && name.len() <= ENV_NAME_MAX_LEN
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `[postgres_proxy]`: where Postgres clients connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresProxyConfig {
    pub listen: SocketAddr,
    /// Certificate and key offered to clients that ask for TLS; `None`
    /// answers every `SSLRequest` with "no".
    pub tls: Option<ProxyTls>,
    /// Refuse clients that do not switch to TLS before authenticating.
    /// Always `false` when `tls` is `None`.
    pub require_tls: bool,
    /// Time a new connection has to finish TLS, startup and authentication.
    pub handshake_timeout_ms: u64,
    /// Connections still in their handshake, from all addresses together.
    pub max_handshakes: u32,
    /// Connections still in their handshake from one source address (an
    /// IPv6 client by its /64), so that one address cannot take them all.
    pub max_handshakes_per_address: u32,
}

/// Default of `[postgres_proxy] handshake_timeout_ms`.
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 5000;
/// Default of `[postgres_proxy] max_handshakes`.
pub const DEFAULT_MAX_HANDSHAKES: u32 = 1024;
/// Default of `[postgres_proxy] max_handshakes_per_address`.
pub const DEFAULT_MAX_HANDSHAKES_PER_ADDRESS: u32 = 64;
/// Default of `[[database]] tenant_origin_connections`, raised to the largest
/// `pool_size` among the tenant's databases on that origin.
pub const DEFAULT_TENANT_ORIGIN_CONNECTIONS: u32 = 20;

/// The proxy's TLS certificate chain and private key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyTls {
    /// Absolute path of the certificate chain.
    pub cert: PathBuf,
    /// Absolute path of the private key.
    pub key: PathBuf,
}

/// One `[[database]]`: a tenant's origin Postgres and how the accelerator
/// pools and caches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseConfig {
    /// Unique together with `tenant`.
    pub name: String,
    pub tenant: String,
    pub origin: OriginUrl,
    /// Name of the environment variable that holds the origin password;
    /// `None` connects without one, to an origin that trusts this role.
    pub origin_password_env: Option<String>,
    /// How the accelerator may prove to the origin that it knows the
    /// password. Only SCRAM-SHA-256 unless the file opts in, and MD5 or
    /// cleartext only with `sslmode=verify-full`.
    pub origin_auth_methods: OriginAuthMethods,
    /// Origin connections kept open and shared between clients.
    pub pool_size: u32,
    /// Origin connections of this database's tenant on this origin server
    /// (host and port), across all of the tenant's databases there. Resolved:
    /// the same in every database of the group.
    pub tenant_origin_connections: u32,
    /// Clients connected through the proxy at once.
    pub max_client_connections: u32,
    /// Clients waiting for a pooled connection at once; past it a client's
    /// query fails at once instead of queueing.
    pub max_waiting_clients: u32,
    /// Time a client waits for a pooled connection.
    pub acquire_timeout_ms: u64,
    /// Time one statement may run on the origin; 0 means no limit.
    pub statement_timeout_ms: u64,
    /// A connected client that sends nothing for this long is closed; 0
    /// means never.
    pub idle_client_timeout_ms: u64,
    /// A client idle inside a transaction, and so holding a pooled
    /// connection, is closed after this long; 0 means never.
    pub idle_in_transaction_timeout_ms: u64,
    /// Time to open one origin connection, TLS and authentication included.
    pub connect_timeout_ms: u64,
    /// Who may connect through the proxy (SCRAM-SHA-256).
    pub users: Vec<DatabaseUser>,
    pub cache: DatabaseCache,
}

/// `origin_auth_methods` of a `[[database]]`: the methods the accelerator
/// answers when the origin asks for the password, named as libpq's
/// `require_auth` names them.
///
/// SCRAM-SHA-256 is the only one in which the server proves that it knows
/// the password too. MD5 hands the server a salted hash that can be cracked
/// offline, and `password` hands it the password itself; neither proves
/// anything about the server, so the config allows them only when TLS
/// verifies the origin's certificate and host name (`sslmode=verify-full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginAuthMethods {
    /// `"scram-sha-256"`.
    pub scram_sha_256: bool,
    /// `"md5"`.
    pub md5: bool,
    /// `"password"`: the cleartext password.
    pub password: bool,
}

impl Default for OriginAuthMethods {
    fn default() -> Self {
        Self { scram_sha_256: true, md5: false, password: false }
    }
}

/// `[[database.users]]`: a login that the proxy accepts for this database.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseUser {
    /// Unique within the database.
    pub name: String,
    /// Name of the environment variable that holds the password.
    pub password_env: String,
}

/// `[database.cache]`: the result cache of one database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseCache {
    pub enabled: bool,
    /// Seconds a cached result is served as fresh.
    pub max_age_s: u64,
    /// Seconds after `max_age_s` during which a stale result is still served
    /// while a fresh one is fetched in the background.
    pub stale_while_revalidate_s: u64,
    /// Largest result that is cached, in bytes.
    pub max_entry_bytes: u64,
    /// Memory bound of this database's cache, in bytes.
    pub max_bytes: u64,
}

impl Default for DatabaseCache {
    fn default() -> Self {
        Self { enabled: true, max_age_s: 60, stale_while_revalidate_s: 15, max_entry_bytes: 1 << 20, max_bytes: 64 << 20 }
    }
}

/// An origin `postgres://` URL, checked and taken apart. It never holds a
/// password: that comes from `origin_password_env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginUrl {
    /// Lowercase host name or IP address; an IPv6 address has no brackets.
    pub host: String,
    pub port: u16,
    /// Percent-decoded.
    pub user: String,
    /// Percent-decoded.
    pub database: String,
    pub tls: OriginTlsMode,
}

/// `sslmode` of the origin URL. Only the two modes that mean what they say
/// are accepted: `require` and `verify-ca` encrypt without checking whom
/// they talk to, and `prefer`/`allow` fall back to plain text silently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginTlsMode {
    /// `sslmode=disable`, the default: plain TCP.
    Disable,
    /// `sslmode=verify-full`: TLS, with the certificate chain and the host
    /// name checked.
    VerifyFull {
        /// Absolute path of the PEM roots from `sslrootcert`; `None` trusts
        /// the webpki roots.
        root_cert: Option<PathBuf>,
    },
}

impl OriginUrl {
    /// Whether `host` is this machine: `localhost`, 127.0.0.0/8 or `::1`.
    /// Traffic to it never crosses a network that someone else could be on.
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost" || self.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

impl fmt::Display for OriginUrl {
    /// The URL for logs, in a form that parses back to the same value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("postgres://")?;
        percent_encode(f, &self.user, b"")?;
        if self.host.contains(':') {
            write!(f, "@[{}]:{}/", self.host, self.port)?;
        } else {
            write!(f, "@{}:{}/", self.host, self.port)?;
        }
        percent_encode(f, &self.database, b"")?;
        match &self.tls {
            OriginTlsMode::Disable => f.write_str("?sslmode=disable"),
            OriginTlsMode::VerifyFull { root_cert: None } => f.write_str("?sslmode=verify-full"),
            OriginTlsMode::VerifyFull { root_cert: Some(path) } => {
                f.write_str("?sslmode=verify-full&sslrootcert=")?;
                percent_encode(f, &path.to_string_lossy(), b"/")
            }
        }
    }
}

fn percent_encode(f: &mut fmt::Formatter<'_>, s: &str, keep: &[u8]) -> fmt::Result {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            write!(f, "{}", b as char)?;
        } else {
            write!(f, "%{b:02X}")?;
        }
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPostgresProxy {
    pub listen: Spanned<String>,
    pub tls_cert: Option<Spanned<String>>,
    pub tls_key: Option<Spanned<String>>,
    pub require_tls: Option<Spanned<bool>>,
    pub handshake_timeout_ms: Option<Spanned<i64>>,
    pub max_handshakes: Option<Spanned<i64>>,
    pub max_handshakes_per_address: Option<Spanned<i64>>,
}

/// One database as written: `[[database]]` in `cordon.toml`, or a JSON
/// document for the control API. Integers are `i64` so that a negative or
/// oversized value reaches the range check; each `None` takes its default
/// (see [`DatabaseConfig`] for what each setting means).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSpec {
    /// Unique within its tenant.
    pub name: String,
    pub tenant: String,
    /// A `postgres://` URL without a password.
    pub origin: String,
    pub origin_password_env: Option<String>,
    pub origin_auth_methods: Option<Vec<String>>,
    pub pool_size: Option<i64>,
    pub tenant_origin_connections: Option<i64>,
    pub max_client_connections: Option<i64>,
    pub max_waiting_clients: Option<i64>,
    pub acquire_timeout_ms: Option<i64>,
    pub statement_timeout_ms: Option<i64>,
    pub idle_client_timeout_ms: Option<i64>,
    pub idle_in_transaction_timeout_ms: Option<i64>,
    pub connect_timeout_ms: Option<i64>,
    #[serde(default)]
    pub users: Vec<DatabaseUser>,
    #[serde(default)]
    pub cache: DatabaseCacheSpec,
}

/// `cache` of a [`DatabaseSpec`]; each `None` takes its default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseCacheSpec {
    pub enabled: Option<bool>,
    pub max_age_s: Option<i64>,
    pub stale_while_revalidate_s: Option<i64>,
    pub max_entry_bytes: Option<i64>,
    pub max_bytes: Option<i64>,
}

/// What validating a database needs to know beyond its spec.
#[derive(Debug, Clone, Copy)]
pub struct DatabaseContext<'a> {
    /// The directory a relative `sslrootcert` path starts at.
    pub base: &'a Path,
    /// `security.require_postgres_origin_tls`: refuse an origin reached in
    /// plain TCP over a network.
    pub require_origin_tls: bool,
}

/// The names of `origin_auth_methods`, as libpq's `require_auth` spells them.
const SCRAM_SHA_256: &str = "scram-sha-256";
const MD5: &str = "md5";
const PASSWORD: &str = "password";

const ENV_HELP: &str = "name an environment variable: a letter or `_`, then letters, digits or `_`, up to 128 characters";

impl Validator<'_> {
    pub(crate) fn postgres_proxy(&mut self, raw: &RawPostgresProxy, server: &ServerConfig, base: &Path) -> PostgresProxyConfig {
        let listen = self.socket_addr(&raw.listen, "postgres_proxy.listen");
        if let Some(listen) = listen
            && (listen == server.listen || listen == server.admin_listen)
            && listen.port() != 0
        {
            self.error(
                Some(raw.listen.span()),
                "postgres_proxy.listen",
                "is the same address as a listener in [server]",
                "give the Postgres proxy its own port, for example \"127.0.0.1:6432\"",
            );
        }
        let listen = listen.unwrap_or(server.listen);
        let cert = self.path(&raw.tls_cert, "postgres_proxy.tls_cert", base);
        let key = self.path(&raw.tls_key, "postgres_proxy.tls_key", base);
        let tls = match (&raw.tls_cert, &raw.tls_key) {
            (Some(_), Some(_)) => cert.zip(key).map(|(cert, key)| ProxyTls { cert, key }),
            (None, None) => None,
            (Some(given), None) | (None, Some(given)) => {
                let (k, missing) = if raw.tls_cert.is_some() { ("tls_cert", "tls_key") } else { ("tls_key", "tls_cert") };
                self.error(
                    Some(given.span()),
                    format!("postgres_proxy.{k}"),
                    format!("is set without {missing}"),
                    "set both tls_cert (the PEM certificate chain) and tls_key (its PEM private key), or neither",
                );
                None
            }
        };
        let require_tls = raw.require_tls.as_ref().is_some_and(|r| *r.get_ref());
        if let Some(flag) = &raw.require_tls
            && require_tls
            && raw.tls_cert.is_none()
            && raw.tls_key.is_none()
        {
            self.error(
                Some(flag.span()),
                "postgres_proxy.require_tls",
                "is true, but the proxy has no certificate",
                "set tls_cert and tls_key, or set require_tls = false",
            );
        }
        let handshake_timeout_ms = self.int(
            &raw.handshake_timeout_ms,
            "postgres_proxy.handshake_timeout_ms",
            DEFAULT_HANDSHAKE_TIMEOUT_MS,
            100,
            60_000,
            "the time a new connection has to authenticate, in ms",
        );
        let max_handshakes = self.int(
            &raw.max_handshakes,
            "postgres_proxy.max_handshakes",
            DEFAULT_MAX_HANDSHAKES as u64,
            1,
            100_000,
            "the number of connections authenticating at once",
        ) as u32;
        let max_handshakes_per_address = self.int(
            &raw.max_handshakes_per_address,
            "postgres_proxy.max_handshakes_per_address",
            (DEFAULT_MAX_HANDSHAKES_PER_ADDRESS).min(max_handshakes) as u64,
            1,
            100_000,
            "the number of connections authenticating at once from one address",
        ) as u32;
        if max_handshakes_per_address > max_handshakes {
            self.error(
                raw.max_handshakes_per_address.as_ref().map(|v| v.span()),
                "postgres_proxy.max_handshakes_per_address",
                format!("is {max_handshakes_per_address}, more than max_handshakes ({max_handshakes})"),
                "one address cannot have more handshakes than all of them: lower max_handshakes_per_address or raise max_handshakes",
            );
        }
        PostgresProxyConfig {
            listen,
            require_tls: require_tls && tls.is_some(),
            tls,
            handshake_timeout_ms,
            max_handshakes,
            max_handshakes_per_address,
        }
    }

    /// A path relative to the config file's directory, made absolute.
    fn path(&mut self, value: &Option<Spanned<String>>, key: &str, base: &Path) -> Option<PathBuf> {
        let value = value.as_ref()?;
        if value.get_ref().trim().is_empty() {
            self.error(Some(value.span()), key, "is empty", "give the path of a PEM file");
            return None;
        }
        Some(absolute(base, value.get_ref()))
    }
}

impl DatabaseSpec {
    /// Checks this database on its own, as the only one of its tenant on
    /// its origin server. Among other databases, [`check_databases`] over
    /// the whole set decides the shared `tenant_origin_connections` and
    /// refuses a name its tenant already uses.
    pub fn validate(&self, context: &DatabaseContext<'_>) -> Result<DatabaseConfig, SpecErrors> {
        let mut c = Checker::default();
        let mut database = [self.check(context, &mut c)];
        c.errors.extend(check_databases(std::slice::from_ref(self), &mut database).into_iter().map(|(_, e)| e));
        let [database] = database;
        c.finish(database)
    }

    /// [`Self::validate`] without the checks across databases, recording
    /// problems in `c`; `tenant_origin_connections` is left for
    /// [`check_databases`] to resolve.
    pub(crate) fn check(&self, context: &DatabaseContext<'_>, c: &mut Checker) -> DatabaseConfig {
        c.name(&self.name, "name".into());
        c.name(&self.tenant, "tenant".into());

        let parsed = parse_origin(&self.origin, context.base);
        let origin = match &parsed {
            Ok(origin) => origin.clone(),
            Err(e) => {
                c.error("origin".into(), ErrorKind::Invalid, e.message.clone(), e.help.clone());
                OriginUrl { host: String::new(), port: 5432, user: String::new(), database: String::new(), tls: OriginTlsMode::Disable }
            }
        };
        let origin_password_env = self.origin_password_env.as_ref().map(|env| {
            env_name(c, env, "origin_password_env".into());
            env.clone()
        });
        // An origin that did not parse has its own error; judging the methods against its
        // placeholder TLS mode would add a second, misleading one.
        let origin_auth_methods = self.origin_auth_methods(c, parsed.as_ref().ok());
        if context.require_origin_tls {
            self.origin_tls_policy(c, &origin);
        }

        let max_client_connections = c.int(
            self.max_client_connections,
            "max_client_connections".into(),
            1000,
            1,
            100_000,
            "the number of clients connected through the proxy at once",
        );
        DatabaseConfig {
            name: self.name.clone(),
            tenant: self.tenant.clone(),
            origin,
            origin_password_env,
            origin_auth_methods,
            pool_size: c.int(self.pool_size, "pool_size".into(), 10, 1, 1000, "the number of origin connections kept open") as u32,
            // Resolved across the tenant's databases on the same origin in `check_databases`.
            tenant_origin_connections: c.int(
                self.tenant_origin_connections,
                "tenant_origin_connections".into(),
                0,
                1,
                10_000,
                "the number of origin connections of the tenant's databases on this origin together",
            ) as u32,
            max_client_connections: max_client_connections as u32,
            max_waiting_clients: c.int(
                self.max_waiting_clients,
                "max_waiting_clients".into(),
                max_client_connections,
                0,
                100_000,
                "the number of clients that may wait for a pooled connection at once (the default is max_client_connections)",
            ) as u32,
            acquire_timeout_ms: c.int(
                self.acquire_timeout_ms,
                "acquire_timeout_ms".into(),
                5000,
                1,
                600_000,
                "the time a client waits for a pooled connection, in ms",
            ),
            statement_timeout_ms: c.int(
                self.statement_timeout_ms,
                "statement_timeout_ms".into(),
                30_000,
                0,
                86_400_000,
                "the time one statement may run, in ms, or 0 for no limit",
            ),
            idle_client_timeout_ms: c.int(
                self.idle_client_timeout_ms,
                "idle_client_timeout_ms".into(),
                600_000,
                0,
                86_400_000,
                "the time a silent client stays connected, in ms, or 0 for no limit",
            ),
            idle_in_transaction_timeout_ms: c.int(
                self.idle_in_transaction_timeout_ms,
                "idle_in_transaction_timeout_ms".into(),
                60_000,
                0,
                86_400_000,
                "the time a client may sit idle inside a transaction, in ms, or 0 for no limit",
            ),
            connect_timeout_ms: c.int(
                self.connect_timeout_ms,
                "connect_timeout_ms".into(),
                5000,
                1,
                600_000,
                "the time to open one origin connection, in ms",
            ),
            users: self.users(c),
            cache: self.cache(c),
        }
    }

    /// `origin_auth_methods`: known names, each once, with a password to send, and MD5 or
    /// cleartext only where TLS has verified whom the password goes to.
    fn origin_auth_methods(&self, c: &mut Checker, origin: Option<&OriginUrl>) -> OriginAuthMethods {
        let path = KeyPath::from("origin_auth_methods");
        let Some(list) = &self.origin_auth_methods else {
            return OriginAuthMethods::default();
        };
        if self.origin_password_env.is_none() {
            c.error(
                path.clone(),
                ErrorKind::Conflict,
                "is set, but origin_password_env is not, so there is no password for these methods to send",
                "set origin_password_env to the environment variable that holds the origin password, or remove origin_auth_methods",
            );
        }
        if list.is_empty() {
            c.error(
                path,
                ErrorKind::Invalid,
                "is empty, so no login to the origin could succeed",
                format!("list at least one method, for example [\"{SCRAM_SHA_256}\"] (the default), or remove the key"),
            );
            return OriginAuthMethods::default();
        }
        let mut methods = OriginAuthMethods { scram_sha_256: false, md5: false, password: false };
        for (j, name) in list.iter().enumerate() {
            let name = name.as_str();
            let (flag, sends) = match name {
                SCRAM_SHA_256 => (&mut methods.scram_sha_256, None),
                MD5 => (&mut methods.md5, Some("an MD5 hash of the password, which can be cracked offline")),
                PASSWORD => (&mut methods.password, Some("the password itself")),
                other => {
                    c.error(
                        path.clone().index(j),
                        ErrorKind::Invalid,
                        format!("`{}` is not an authentication method that Cordon answers", other.escape_debug()),
                        format!(
                            "use \"{SCRAM_SHA_256}\", \"{MD5}\" or \"{PASSWORD}\" (lowercase); for an origin that trusts this role without a password, leave out origin_password_env and origin_auth_methods"
                        ),
                    );
                    continue;
                }
            };
            if *flag {
                c.error(path.clone().index(j), ErrorKind::Duplicate, format!("lists `{name}` twice"), "list each method once");
                continue;
            }
            *flag = true;
            let Some(sends) = sends else { continue };
            if let Some(origin) = origin
                && origin.tls == OriginTlsMode::Disable
            {
                c.error(
                    path.clone().index(j),
                    ErrorKind::Conflict,
                    format!("allows `{name}`, but the origin URL has sslmode=disable"),
                    format!(
                        "`{name}` gives the server {sends} without the server proving who it is, so it is allowed only over TLS that verifies the origin: add sslmode=verify-full to origin (and sslrootcert for a private CA), or remove \"{name}\" and have the origin store the role's password as SCRAM-SHA-256"
                    ),
                );
            }
        }
        methods
    }

    /// `security.require_postgres_origin_tls`: refuses an origin reached in plain TCP over a
    /// network, where anyone on the path could read the traffic or pose as the origin. Loopback
    /// never leaves the machine, so it is allowed.
    fn origin_tls_policy(&self, c: &mut Checker, origin: &OriginUrl) {
        // An origin that did not parse is already an error, with an empty host.
        if origin.tls != OriginTlsMode::Disable || origin.is_loopback() || origin.host.is_empty() {
            return;
        }
        c.error(
            "origin".into(),
            ErrorKind::Conflict,
            format!("reaches the host `{}` without TLS (sslmode=disable), and security.require_postgres_origin_tls is true", origin.host),
            "add sslmode=verify-full to the origin URL (and sslrootcert for a private CA), or set security.require_postgres_origin_tls = false to allow plain TCP to a host that is not loopback",
        );
    }

    fn users(&self, c: &mut Checker) -> Vec<DatabaseUser> {
        let mut users: Vec<DatabaseUser> = Vec::with_capacity(self.users.len());
        for (j, user) in self.users.iter().enumerate() {
            let path = |k: &str| KeyPath::from("users").index(j).field(k);
            let name = &user.name;
            if name.is_empty() || name.len() > PG_IDENT_MAX_LEN || name.chars().any(char::is_control) {
                c.error(
                    path("name"),
                    ErrorKind::Invalid,
                    format!("`{}` is not a valid user name", name.escape_debug()),
                    format!("use 1 to {PG_IDENT_MAX_LEN} bytes without control characters"),
                );
            } else if let Some(first) = users.iter().position(|u| &u.name == name) {
                c.error(
                    path("name"),
                    ErrorKind::Duplicate,
                    format!("user `{name}` is already users[{first}] of this database"),
                    "list every user of a database once",
                );
            }
            env_name(c, &user.password_env, path("password_env"));
            users.push(user.clone());
        }
        users
    }

    fn cache(&self, c: &mut Checker) -> DatabaseCache {
        let s = &self.cache;
        let d = DatabaseCache::default();
        let path = |k: &str| KeyPath::from("cache").field(k);
        let cache = DatabaseCache {
            enabled: s.enabled.unwrap_or(d.enabled),
            max_age_s: c.int(s.max_age_s, path("max_age_s"), d.max_age_s, 1, 86_400, "the seconds a result is served as fresh"),
            stale_while_revalidate_s: c.int(
                s.stale_while_revalidate_s,
                path("stale_while_revalidate_s"),
                d.stale_while_revalidate_s,
                0,
                86_400,
                "the seconds a stale result is still served while it is refreshed",
            ),
            max_entry_bytes: c.int(
                s.max_entry_bytes,
                path("max_entry_bytes"),
                d.max_entry_bytes,
                1,
                64 << 20,
                "the largest result that is cached, in bytes",
            ),
            max_bytes: c.int(
                s.max_bytes,
                path("max_bytes"),
                d.max_bytes,
                1 << 20,
                16 << 30,
                "the memory this database's cache may use, in bytes",
            ),
        };
        if cache.max_entry_bytes > cache.max_bytes {
            // Point at whichever of the two the spec sets (max_entry_bytes if both).
            let name = if s.max_entry_bytes.is_none() && s.max_bytes.is_some() { "max_bytes" } else { "max_entry_bytes" };
            c.error(
                path(name),
                ErrorKind::Conflict,
                format!("max_entry_bytes ({}) is more than max_bytes ({})", cache.max_entry_bytes, cache.max_bytes),
                "an entry cannot be larger than the whole cache: lower max_entry_bytes or raise max_bytes",
            );
        }
        cache
    }
}

fn env_name(c: &mut Checker, value: &str, path: KeyPath) {
    if !is_valid_env_name(value) {
        c.error(
            path,
            ErrorKind::Invalid,
            format!("`{}` is not a valid environment variable name", value.escape_debug()),
            format!("{ENV_HELP}; the password itself goes in that variable, never in this file"),
        );
    }
}

/// The checks across a set of databases, `specs[i]` checked into
/// `databases[i]`: each tenant's database names are unique, and each
/// group of one tenant's databases on one origin server gets its shared
/// `tenant_origin_connections`, written into `databases`. The problems of
/// `specs[i]` come as `(i, error)`; `database[i]` in a message is
/// `specs[i]`.
pub fn check_databases(specs: &[DatabaseSpec], databases: &mut [DatabaseConfig]) -> Vec<(usize, SpecError)> {
    let mut errors = tenant_origin_connections(specs, databases);
    for (i, d) in databases.iter().enumerate() {
        if let Some(first) = databases[..i].iter().position(|o| o.tenant == d.tenant && o.name == d.name) {
            errors.push((
                i,
                SpecError {
                    path: "name".into(),
                    kind: ErrorKind::NameTaken,
                    message: format!("tenant `{}` already has a database `{}` (database[{first}])", d.tenant, d.name),
                    help: "give every database of a tenant its own name".into(),
                },
            ));
        }
    }
    errors
}

/// Resolves `tenant_origin_connections` for each group of a tenant's databases on one origin
/// server: the value they set (they must agree), or the default raised to the group's largest
/// `pool_size`. A pool larger than its group's limit could never fill, so that is an error.
fn tenant_origin_connections(specs: &[DatabaseSpec], databases: &mut [DatabaseConfig]) -> Vec<(usize, SpecError)> {
    let mut errors = Vec::new();
    let same_group =
        |a: &DatabaseConfig, b: &DatabaseConfig| a.tenant == b.tenant && a.origin.host == b.origin.host && a.origin.port == b.origin.port;
    for i in 0..databases.len() {
        let members: Vec<usize> = (0..databases.len()).filter(|&j| same_group(&databases[i], &databases[j])).collect();
        let explicit: Vec<(usize, u32)> = members
            .iter()
            .filter(|&&j| specs[j].tenant_origin_connections.is_some())
            .map(|&j| (j, databases[j].tenant_origin_connections))
            .collect();
        let largest_pool = members.iter().map(|&j| databases[j].pool_size).max().unwrap_or(1);
        let limit = match explicit.first() {
            Some(&(first, value)) => {
                if let Some(own) = specs[i].tenant_origin_connections
                    && databases[i].tenant_origin_connections != value
                {
                    errors.push((
                        i,
                        SpecError {
                            path: "tenant_origin_connections".into(),
                            kind: ErrorKind::Conflict,
                            message: format!("is {own}, but database[{first}] of the same tenant on the same origin sets {value}"),
                            help: "the limit is shared by the tenant's databases on one origin server: set the same value in each, or in one of them only".into(),
                        },
                    ));
                }
                value
            }
            None => DEFAULT_TENANT_ORIGIN_CONNECTIONS.max(largest_pool),
        };
        if databases[i].pool_size > limit {
            errors.push((
                i,
                SpecError {
                    path: "pool_size".into(),
                    kind: ErrorKind::Conflict,
                    message: format!("is {}, more than the tenant_origin_connections ({limit}) of its tenant on this origin", databases[i].pool_size),
                    help: "a pool cannot have more connections than its tenant may open on the origin: lower pool_size or raise tenant_origin_connections".into(),
                },
            ));
        }
        databases[i].tenant_origin_connections = limit;
    }
    errors
}

fn absolute(base: &Path, path: &str) -> PathBuf {
    let joined = base.join(path);
    std::path::absolute(&joined).unwrap_or(joined)
}

/// Why an origin URL was refused. The message never repeats the URL, which
/// may hold a password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OriginUrlError {
    pub message: String,
    pub help: String,
}

const URL_HELP: &str = "write it as postgres://USER@HOST[:PORT]/DATABASE[?sslmode=verify-full]";

fn url_error(message: impl Into<String>, help: impl Into<String>) -> OriginUrlError {
    OriginUrlError { message: message.into(), help: help.into() }
}

/// Parses the subset of libpq's URL syntax that the accelerator supports.
/// Anything it does not understand is an error rather than ignored, since
/// an ignored `sslmode` or host list would silently change what is trusted.
pub(crate) fn parse_origin(url: &str, base: &Path) -> Result<OriginUrl, OriginUrlError> {
    let rest = ["postgres://", "postgresql://"]
        .iter()
        .find_map(|scheme| url.get(..scheme.len()).filter(|s| s.eq_ignore_ascii_case(scheme)).map(|_| &url[scheme.len()..]))
        .ok_or_else(|| url_error("origin is not a postgres:// URL", URL_HELP))?;
    if rest.contains('#') {
        return Err(url_error("origin URL has a `#` fragment", URL_HELP));
    }
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));

    // The last `@` ends the user part, so an unescaped `@` inside a password
    // is still seen as part of the password.
    let Some((userinfo, hostport)) = authority.rsplit_once('@') else {
        return Err(url_error("origin URL has no user", URL_HELP));
    };
    if userinfo.contains(':') {
        return Err(url_error(
            "origin URL has a password",
            "remove `:PASSWORD` from the URL and put the password in an environment variable named by origin_password_env",
        ));
    }
    let user = decode(userinfo, "user")?;
    check_ident(&user, "user")?;
    let (host, port) = parse_hostport(hostport)?;
    let database = decode(path, "database")?;
    check_ident(&database, "database")?;

    let mut sslmode: Option<&str> = None;
    let mut root_cert: Option<String> = None;
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let Some((name, value)) = param.split_once('=') else {
            return Err(url_error(
                format!("origin URL parameter `{}` has no value", param.escape_debug()),
                "write parameters as NAME=VALUE",
            ));
        };
        match name {
            "sslmode" if sslmode.is_some() => return Err(url_error("origin URL sets sslmode twice", "keep one sslmode")),
            "sslmode" => sslmode = Some(value),
            "sslrootcert" if root_cert.is_some() => {
                return Err(url_error("origin URL sets sslrootcert twice", "keep one sslrootcert"));
            }
            "sslrootcert" => {
                let path = decode(value, "sslrootcert")?;
                if path.is_empty() {
                    return Err(url_error("origin URL has an empty sslrootcert", "give the path of a PEM file of root certificates"));
                }
                root_cert = Some(path);
            }
            other => {
                return Err(url_error(
                    format!("origin URL has the parameter `{}`, which is not supported", other.escape_debug()),
                    "remove it: only sslmode and sslrootcert are accepted; the pool's own settings are keys of [[database]]",
                ));
            }
        }
    }
    let tls = match sslmode.unwrap_or("disable") {
        "disable" => {
            if root_cert.is_some() {
                return Err(url_error(
                    "origin URL sets sslrootcert, but sslmode is not verify-full",
                    "add sslmode=verify-full to use the certificate, or remove sslrootcert",
                ));
            }
            OriginTlsMode::Disable
        }
        "verify-full" => OriginTlsMode::VerifyFull { root_cert: root_cert.map(|p| absolute(base, &p)) },
        mode @ ("require" | "prefer" | "allow" | "verify-ca") => {
            return Err(url_error(
                format!("origin URL has sslmode={mode}, which is not supported"),
                "use sslmode=verify-full (certificate and host name checked) or sslmode=disable",
            ));
        }
        other => {
            return Err(url_error(
                format!("origin URL has an unknown sslmode `{}`", other.escape_debug()),
                "use sslmode=verify-full (certificate and host name checked) or sslmode=disable",
            ));
        }
    };
    Ok(OriginUrl { host, port, user, database, tls })
}

fn parse_hostport(hostport: &str) -> Result<(String, u16), OriginUrlError> {
    let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
        let Some((ip, after)) = bracketed.split_once(']') else {
            return Err(url_error("origin URL has a `[` without `]` in its host", "write an IPv6 address as [ADDRESS]"));
        };
        if ip.parse::<Ipv6Addr>().is_err() {
            return Err(url_error(
                format!("origin URL host `[{}]` is not an IPv6 address", ip.escape_debug()),
                "write an IPv6 address as [ADDRESS], for example [::1]",
            ));
        }
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return Err(url_error("origin URL has text after its IPv6 host", URL_HELP)),
            },
        };
        (ip.to_ascii_lowercase(), port)
    } else {
        let (host, port) = match hostport.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        };
        if port.is_some_and(|p| p.contains(':')) {
            return Err(url_error("origin URL host has more than one `:`", "write an IPv6 address in brackets, as [ADDRESS]:PORT"));
        }
        if host.is_empty() {
            return Err(url_error("origin URL has no host", URL_HELP));
        }
        let valid = host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
            && !host.starts_with('.')
            && !host.ends_with('.')
            && !host.contains("..");
        if !valid {
            return Err(url_error(
                format!("origin URL host `{}` is not a host name or IP address", host.escape_debug()),
                "give one host: a name, an IPv4 address or an [IPv6] address (host lists are not supported)",
            ));
        }
        (host.to_ascii_lowercase(), port)
    };
    let port = match port {
        None => 5432,
        Some(p) => match p.parse::<u16>() {
            Ok(port) if port != 0 && p.bytes().all(|b| b.is_ascii_digit()) => port,
            _ => {
                return Err(url_error(
                    format!("origin URL port `{}` is not a port number", p.escape_debug()),
                    "use a port from 1 to 65535, or leave it out for 5432",
                ));
            }
        },
    };
    Ok((host, port))
}

/// Percent-decoding; the result must be UTF-8.
fn decode(s: &str, what: &str) -> Result<String, OriginUrlError> {
    let bad = || url_error(format!("origin URL {what} has an invalid percent escape"), "escape a byte as % and two hex digits");
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).ok_or_else(bad)?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| url_error(format!("origin URL {what} is not UTF-8 once decoded"), "percent-encode UTF-8 text"))
}

fn check_ident(value: &str, what: &str) -> Result<(), OriginUrlError> {
    if value.is_empty() {
        return Err(url_error(format!("origin URL has no {what}"), URL_HELP));
    }
    if value.len() > PG_IDENT_MAX_LEN || value.chars().any(char::is_control) {
        return Err(url_error(
            format!("origin URL {what} is not a valid Postgres name"),
            format!("use 1 to {PG_IDENT_MAX_LEN} bytes without control characters"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, ConfigError};

    const FILE: &str = "/srv/cordon/cordon.toml";

    fn errors(text: &str) -> Vec<ConfigError> {
        Config::parse(Path::new(FILE), text).unwrap_err().0
    }

    /// The error with `key`, which must exist and carry a position and a help.
    fn error_at(text: &str, key: &str) -> ConfigError {
        let e = errors(text);
        let found = e.iter().find(|e| e.key.as_deref() == Some(key)).unwrap_or_else(|| panic!("no error at {key}: {e:?}")).clone();
        assert!(found.location.is_some(), "{found:?}");
        assert!(!found.help.is_empty(), "{found:?}");
        found
    }

    fn origin(url: &str) -> Result<OriginUrl, OriginUrlError> {
        parse_origin(url, Path::new("/srv/cordon"))
    }

    fn db(extra: &str) -> String {
        format!("[[database]]\nname = \"main\"\ntenant = \"acme\"\norigin = \"postgres://app@db.internal/app\"\n{extra}")
    }

    #[test]
    fn a_full_example_parses() {
        let text = r#"
[postgres_proxy]
listen = "127.0.0.1:6432"
tls_cert = "certs/proxy.pem"
tls_key = "certs/proxy.key"
require_tls = true

[[database]]
name = "main"
tenant = "acme"
origin = "postgresql://app@127.0.0.1:5433/app?sslmode=verify-full&sslrootcert=ca.pem"
origin_password_env = "APP_DB_PASSWORD"
origin_auth_methods = ["scram-sha-256", "md5"]
pool_size = 20
max_client_connections = 5000
max_waiting_clients = 100
acquire_timeout_ms = 2000
statement_timeout_ms = 0
idle_client_timeout_ms = 0
idle_in_transaction_timeout_ms = 1000
connect_timeout_ms = 3000

[[database.users]]
name = "acme_app"
password_env = "ACME_APP_PASSWORD"

[[database.users]]
name = "Reporting User"
password_env = "_REPORTING"

[database.cache]
enabled = false
max_age_s = 1
stale_while_revalidate_s = 0
max_entry_bytes = 4096
max_bytes = 1048576

[[database]]
name = "main"
tenant = "other"
origin = "postgres://u@[::1]/d"
"#;
        let c = Config::parse(Path::new(FILE), text).unwrap();
        let proxy = c.postgres_proxy.as_ref().unwrap();
        assert_eq!(proxy.listen.to_string(), "127.0.0.1:6432");
        assert_eq!(proxy.tls, Some(ProxyTls { cert: "/srv/cordon/certs/proxy.pem".into(), key: "/srv/cordon/certs/proxy.key".into() }));
        assert!(proxy.require_tls);

        assert_eq!(c.databases.len(), 2);
        let main = c.database("acme", "main").unwrap();
        assert_eq!(
            *main,
            DatabaseConfig {
                name: "main".into(),
                tenant: "acme".into(),
                origin: OriginUrl {
                    host: "127.0.0.1".into(),
                    port: 5433,
                    user: "app".into(),
                    database: "app".into(),
                    tls: OriginTlsMode::VerifyFull { root_cert: Some("/srv/cordon/ca.pem".into()) },
                },
                origin_password_env: Some("APP_DB_PASSWORD".into()),
                origin_auth_methods: OriginAuthMethods { scram_sha_256: true, md5: true, password: false },
                pool_size: 20,
                tenant_origin_connections: 20,
                max_client_connections: 5000,
                max_waiting_clients: 100,
                acquire_timeout_ms: 2000,
                statement_timeout_ms: 0,
                idle_client_timeout_ms: 0,
                idle_in_transaction_timeout_ms: 1000,
                connect_timeout_ms: 3000,
                users: vec![
                    DatabaseUser { name: "acme_app".into(), password_env: "ACME_APP_PASSWORD".into() },
                    DatabaseUser { name: "Reporting User".into(), password_env: "_REPORTING".into() },
                ],
                cache: DatabaseCache {
                    enabled: false,
                    max_age_s: 1,
                    stale_while_revalidate_s: 0,
                    max_entry_bytes: 4096,
                    max_bytes: 1 << 20
                },
            }
        );
        assert_eq!(c.database("other", "main").unwrap().origin.host, "::1");
        assert!(c.database("acme", "nope").is_none());
        assert!(c.database("nobody", "main").is_none());
    }

    #[test]
    fn defaults_fill_a_minimal_database() {
        let c = Config::parse(Path::new(FILE), &db("")).unwrap();
        assert!(c.postgres_proxy.is_none());
        let d = &c.databases[0];
        assert_eq!(d.origin.port, 5432);
        assert_eq!(d.origin.tls, OriginTlsMode::Disable);
        assert_eq!(d.origin_password_env, None);
        assert_eq!(d.origin_auth_methods, OriginAuthMethods { scram_sha_256: true, md5: false, password: false });
        assert!(!c.security.require_postgres_origin_tls);
        assert_eq!((d.pool_size, d.max_client_connections, d.max_waiting_clients), (10, 1000, 1000));
        assert_eq!((d.acquire_timeout_ms, d.statement_timeout_ms, d.connect_timeout_ms), (5000, 30_000, 5000));
        assert_eq!((d.idle_client_timeout_ms, d.idle_in_transaction_timeout_ms), (600_000, 60_000));
        assert_eq!(d.tenant_origin_connections, DEFAULT_TENANT_ORIGIN_CONNECTIONS);
        assert!(d.users.is_empty());
        assert_eq!(d.cache, DatabaseCache::default());
        assert_eq!(
            d.cache,
            DatabaseCache { enabled: true, max_age_s: 60, stale_while_revalidate_s: 15, max_entry_bytes: 1 << 20, max_bytes: 64 << 20 }
        );

        // The waiting-room default follows the connection limit.
        let c = Config::parse(Path::new(FILE), &db("max_client_connections = 7\n")).unwrap();
        assert_eq!(c.databases[0].max_waiting_clients, 7);
    }

    #[test]
    fn the_proxy_section_alone_is_valid() {
        let c = Config::parse(Path::new(FILE), "[postgres_proxy]\nlisten = \"[::1]:6432\"\n").unwrap();
        let proxy = c.postgres_proxy.clone().unwrap();
        assert_eq!(
            proxy,
            PostgresProxyConfig {
                listen: "[::1]:6432".parse().unwrap(),
                tls: None,
                require_tls: false,
                handshake_timeout_ms: 5000,
                max_handshakes: 1024,
                max_handshakes_per_address: 64,
            }
        );
        assert!(c.databases.is_empty());
        assert!(c.warnings().is_empty());
    }

    #[test]
    fn handshake_limits_are_validated() {
        let base = "[postgres_proxy]\nlisten = \"127.0.0.1:6432\"\n";
        let c = Config::parse(
            Path::new(FILE),
            &format!("{base}handshake_timeout_ms = 1500\nmax_handshakes = 100\nmax_handshakes_per_address = 4\n"),
        )
        .unwrap();
        let proxy = c.postgres_proxy.unwrap();
        assert_eq!((proxy.handshake_timeout_ms, proxy.max_handshakes, proxy.max_handshakes_per_address), (1500, 100, 4));
        // A small global limit lowers the per-address default with it.
        let c = Config::parse(Path::new(FILE), &format!("{base}max_handshakes = 10\n")).unwrap();
        assert_eq!(c.postgres_proxy.unwrap().max_handshakes_per_address, 10);
        for (key, value) in
            [("handshake_timeout_ms", "0"), ("handshake_timeout_ms", "60001"), ("max_handshakes", "0"), ("max_handshakes_per_address", "0")]
        {
            error_at(&format!("{base}{key} = {value}\n"), &format!("postgres_proxy.{key}"));
        }
        let e =
            error_at(&format!("{base}max_handshakes = 8\nmax_handshakes_per_address = 9\n"), "postgres_proxy.max_handshakes_per_address");
        assert!(e.message.contains("more than max_handshakes"), "{e:?}");
    }

    #[test]
    fn tenant_origin_connections_is_shared_by_a_tenants_databases_on_one_origin() {
        let two = |a: &str, b: &str, origin_b: &str| {
            format!(
                "[[database]]\nname = \"a\"\ntenant = \"acme\"\norigin = \"postgres://u@db:5432/a\"\n{a}\n\
                 [[database]]\nname = \"b\"\ntenant = \"acme\"\norigin = \"postgres://u@{origin_b}/b\"\n{b}\n"
            )
        };
        // The default is raised to the group's largest pool.
        let c = Config::parse(Path::new(FILE), &two("pool_size = 30", "pool_size = 5", "db:5432")).unwrap();
        assert_eq!((c.databases[0].tenant_origin_connections, c.databases[1].tenant_origin_connections), (30, 30));
        // Set in one database, it applies to the group.
        let c = Config::parse(Path::new(FILE), &two("tenant_origin_connections = 12", "", "db:5432")).unwrap();
        assert_eq!((c.databases[0].tenant_origin_connections, c.databases[1].tenant_origin_connections), (12, 12));
        // Another origin server is another group.
        let c = Config::parse(Path::new(FILE), &two("tenant_origin_connections = 12", "", "db:5433")).unwrap();
        assert_eq!(c.databases[1].tenant_origin_connections, DEFAULT_TENANT_ORIGIN_CONNECTIONS);
        // Disagreeing values, and a pool larger than its group's limit, are errors.
        let e = error_at(
            &two("tenant_origin_connections = 12", "tenant_origin_connections = 13", "db:5432"),
            "database[1].tenant_origin_connections",
        );
        assert!(e.message.contains("database[0]"), "{e:?}");
        let e = error_at(&two("tenant_origin_connections = 12", "pool_size = 13", "db:5432"), "database[1].pool_size");
        assert!(e.help.contains("raise tenant_origin_connections"), "{e:?}");
        error_at(&two("tenant_origin_connections = 0", "", "db:5432"), "database[0].tenant_origin_connections");
    }

    #[test]
    fn proxy_errors_point_at_their_key() {
        let e = errors("[postgres_proxy]\ntls_cert = \"a.pem\"\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].message.contains("missing field `listen`"), "{e:?}");
        assert_eq!(e[0].key.as_deref(), Some("postgres_proxy"));
        assert!(e[0].help.contains("add this key"));

        let bad = error_at("[postgres_proxy]\nlisten = \"localhost:6432\"\n", "postgres_proxy.listen");
        assert_eq!(bad.location, Some(crate::Location { line: 2, column: 10 }));

        let clash = error_at("[postgres_proxy]\nlisten = \"127.0.0.1:8080\"\n", "postgres_proxy.listen");
        assert!(clash.message.contains("[server]"), "{clash:?}");

        let half = error_at("[postgres_proxy]\nlisten = \"127.0.0.1:6432\"\ntls_key = \"k.pem\"\n", "postgres_proxy.tls_key");
        assert_eq!(half.location.unwrap().line, 3);
        assert!(half.message.contains("without tls_cert"), "{half:?}");
        assert!(half.help.contains("or neither"));

        let half = error_at("[postgres_proxy]\nlisten = \"127.0.0.1:6432\"\ntls_cert = \"c.pem\"\n", "postgres_proxy.tls_cert");
        assert!(half.message.contains("without tls_key"), "{half:?}");

        let require = error_at("[postgres_proxy]\nlisten = \"127.0.0.1:6432\"\nrequire_tls = true\n", "postgres_proxy.require_tls");
        assert_eq!(require.location, Some(crate::Location { line: 3, column: 15 }));
        assert!(require.help.contains("tls_cert and tls_key"), "{require:?}");

        let e = errors("[postgres_proxy]\nlisten = \"127.0.0.1:6432\"\nrequire_tls = \"yes\"\n");
        assert_eq!(e[0].key.as_deref(), Some("postgres_proxy.require_tls"));
        let e = errors("[postgres_proxy]\nlisten = \"127.0.0.1:6432\"\ntls = true\n");
        assert!(e[0].message.contains("unknown field `tls`"), "{e:?}");
    }

    #[test]
    fn database_errors_point_at_their_key() {
        let name = error_at(&db("").replace("\"main\"", "\"Main\""), "database[0].name");
        assert_eq!(name.location, Some(crate::Location { line: 2, column: 8 }));
        let tenant = error_at(&db("").replace("\"acme\"", "\"ac me\""), "database[0].tenant");
        assert_eq!(tenant.location.unwrap().line, 3);

        let env = error_at(&db("origin_password_env = \"1PASS\"\n"), "database[0].origin_password_env");
        assert!(env.help.contains("environment variable"), "{env:?}");
        error_at(&db(&format!("origin_password_env = \"{}\"\n", "A".repeat(129))), "database[0].origin_password_env");
        Config::parse(Path::new(FILE), &db(&format!("origin_password_env = \"{}\"\n", "A".repeat(128)))).unwrap();

        for (key, bad) in [
            ("pool_size", "0"),
            ("pool_size", "1001"),
            ("max_client_connections", "0"),
            ("max_client_connections", "100001"),
            ("max_waiting_clients", "-1"),
            ("max_waiting_clients", "100001"),
            ("acquire_timeout_ms", "0"),
            ("acquire_timeout_ms", "600001"),
            ("statement_timeout_ms", "86400001"),
            ("statement_timeout_ms", "-1"),
            ("idle_client_timeout_ms", "-1"),
            ("idle_in_transaction_timeout_ms", "-1"),
            ("connect_timeout_ms", "0"),
        ] {
            let e = error_at(&db(&format!("{key} = {bad}\n")), &format!("database[0].{key}"));
            assert_eq!(e.location, Some(crate::Location { line: 5, column: key.len() + 4 }), "{key}");
            assert!(e.message.contains("must be between"), "{e:?}");
        }
        let waiting = error_at(&db("max_client_connections = 20\nmax_waiting_clients = -1\n"), "database[0].max_waiting_clients");
        assert!(waiting.help.contains("default 20"), "{waiting:?}");

        let dup = error_at(&[db(""), db("")].concat(), "database[1].name");
        assert!(dup.message.contains("database[0]"), "{dup:?}");
        assert_eq!(dup.location.unwrap().line, 6);
        // The same name under another tenant is another database.
        Config::parse(Path::new(FILE), &[db(""), db("").replace("acme", "other")].concat()).unwrap();
    }

    #[test]
    fn user_errors_point_at_their_key() {
        let user = |name: &str, env: &str| format!("[[database.users]]\nname = \"{name}\"\npassword_env = \"{env}\"\n");
        let dup = error_at(&db(&[user("app", "A"), user("app", "B")].concat()), "database[0].users[1].name");
        assert!(dup.message.contains("users[0]"), "{dup:?}");
        assert_eq!(dup.location.unwrap().line, 9);

        error_at(&db(&user("", "A")), "database[0].users[0].name");
        error_at(&db(&user(&"u".repeat(64), "A")), "database[0].users[0].name");
        error_at(&db(&user("a\\u0000b", "A")), "database[0].users[0].name");
        error_at(&db(&user("a\\tb", "A")), "database[0].users[0].name");
        Config::parse(Path::new(FILE), &db(&user(&"u".repeat(63), "A"))).unwrap();

        let env = error_at(&db(&user("app", "MY-PASSWORD")), "database[0].users[0].password_env");
        assert_eq!(env.location.unwrap().line, 7);

        let e = errors(&db("[[database.users]]\nname = \"app\"\n"));
        assert!(e[0].message.contains("missing field `password_env`"), "{e:?}");
    }

    #[test]
    fn cache_errors_point_at_their_key() {
        for (key, bad) in [
            ("max_age_s", "0"),
            ("max_age_s", "86401"),
            ("stale_while_revalidate_s", "-1"),
            ("stale_while_revalidate_s", "86401"),
            ("max_entry_bytes", "0"),
            ("max_entry_bytes", "67108865"),
            ("max_bytes", "1048575"),
            ("max_bytes", "17179869185"),
        ] {
            let e = error_at(&db(&format!("[database.cache]\n{key} = {bad}\n")), &format!("database[0].cache.{key}"));
            assert_eq!(e.location.unwrap().line, 6, "{key}");
        }
        let c = Config::parse(Path::new(FILE), &db("[database.cache]\nmax_bytes = 17179869184\nmax_entry_bytes = 67108864\n")).unwrap();
        assert_eq!(c.databases[0].cache.max_bytes, 16 << 30);

        let e = error_at(&db("[database.cache]\nmax_entry_bytes = 2097152\nmax_bytes = 1048576\n"), "database[0].cache.max_entry_bytes");
        assert!(e.help.contains("larger than the whole cache"), "{e:?}");
        let e = errors(&db("[database.cache]\nttl = 5\n"));
        assert!(e[0].message.contains("unknown field `ttl`"), "{e:?}");
    }

    /// A database with a password, whose origin URL ends with `query`.
    fn db_with_password(query: &str, extra: &str) -> String {
        format!(
            "[[database]]\nname = \"main\"\ntenant = \"acme\"\norigin = \"postgres://app@db.internal/app{query}\"\n\
             origin_password_env = \"APP_DB_PASSWORD\"\n{extra}"
        )
    }

    #[test]
    fn md5_and_cleartext_are_allowed_only_by_opt_in_and_only_with_verify_full() {
        let methods = |text: &str| Config::parse(Path::new(FILE), text).unwrap().databases[0].origin_auth_methods;
        assert_eq!(methods(&db_with_password("", "")), OriginAuthMethods::default());
        assert_eq!(
            methods(&db_with_password("?sslmode=verify-full", "origin_auth_methods = [\"scram-sha-256\", \"md5\", \"password\"]\n")),
            OriginAuthMethods { scram_sha_256: true, md5: true, password: true }
        );
        assert_eq!(
            methods(&db_with_password("?sslmode=verify-full", "origin_auth_methods = [\"md5\"]\n")),
            OriginAuthMethods { scram_sha_256: false, md5: true, password: false }
        );
        assert_eq!(
            methods(&db_with_password("?sslmode=disable", "origin_auth_methods = [\"scram-sha-256\"]\n")),
            OriginAuthMethods::default()
        );

        // Over plain TCP an impostor would collect the hash or the password: refused at load.
        for (query, list, index, method) in
            [("", "[\"scram-sha-256\", \"md5\"]", 1, "md5"), ("?sslmode=disable", "[\"password\"]", 0, "password")]
        {
            let text = db_with_password(query, &format!("origin_auth_methods = {list}\n"));
            let e = error_at(&text, &format!("database[0].origin_auth_methods[{index}]"));
            assert_eq!(e.location.unwrap().line, 6, "{e:?}");
            assert!(e.message.contains(&format!("allows `{method}`, but the origin URL has sslmode=disable")), "{e:?}");
            assert!(e.help.contains("add sslmode=verify-full to origin") && e.help.contains(&format!("remove \"{method}\"")), "{e:?}");
            assert_eq!(errors(&text).len(), 1);
        }
        let e = error_at(&db_with_password("", "origin_auth_methods = [\"md5\"]\n"), "database[0].origin_auth_methods[0]");
        assert!(e.help.contains("cracked offline"), "{e:?}");
    }

    #[test]
    fn origin_auth_methods_must_be_known_distinct_and_have_a_password_to_send() {
        let verified = |extra: &str| db_with_password("?sslmode=verify-full", extra);
        let e = error_at(&verified("origin_auth_methods = [\"scram-sha-256\", \"trust\"]\n"), "database[0].origin_auth_methods[1]");
        assert!(e.message.contains("`trust` is not an authentication method"), "{e:?}");
        assert!(e.help.contains("\"scram-sha-256\", \"md5\" or \"password\"") && e.help.contains("leave out origin_password_env"), "{e:?}");
        error_at(&verified("origin_auth_methods = [\"SCRAM-SHA-256\"]\n"), "database[0].origin_auth_methods[0]");

        let e = error_at(&verified("origin_auth_methods = [\"md5\", \"md5\"]\n"), "database[0].origin_auth_methods[1]");
        assert!(e.message.contains("twice"), "{e:?}");

        let e = error_at(&verified("origin_auth_methods = []\n"), "database[0].origin_auth_methods");
        assert!(e.message.contains("is empty") && e.help.contains("[\"scram-sha-256\"]"), "{e:?}");

        let e = error_at(&db("origin_auth_methods = [\"scram-sha-256\"]\n"), "database[0].origin_auth_methods");
        assert!(e.message.contains("origin_password_env is not"), "{e:?}");
        assert_eq!(e.location, Some(crate::Location { line: 5, column: 23 }));

        let e = errors(&verified("origin_auth_methods = \"md5\"\n"));
        assert!(e[0].message.contains("expected a sequence"), "{e:?}");
        assert_eq!(e[0].location, Some(crate::Location { line: 6, column: 23 }));
        // A broken origin URL has its own error, not a second one about the methods.
        let text = db_with_password("?sslmode=bogus", "origin_auth_methods = [\"md5\"]\n");
        let e = errors(&text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].key.as_deref(), Some("database[0].origin"));
    }

    #[test]
    fn plain_tcp_to_a_host_off_the_machine_is_a_warning_or_under_the_policy_an_error() {
        let on = "[security]\nrequire_postgres_origin_tls = true\n";
        let with_origin = |url: &str| db("").replace("postgres://app@db.internal/app", url);

        let c = Config::parse(Path::new(FILE), &with_origin("postgres://app@db.internal/app")).unwrap();
        assert!(!c.security.require_postgres_origin_tls);
        let warnings = c.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        for part in ["database `main`", "tenant `acme`", "host `db.internal`", "sslmode=disable", "require_postgres_origin_tls = true"] {
            assert!(warnings[0].contains(part), "{part}: {warnings:?}");
        }

        let text = format!("{on}{}", with_origin("postgres://app@db.internal/app?sslmode=disable"));
        let e = error_at(&text, "database[0].origin");
        assert_eq!(e.location, Some(crate::Location { line: 6, column: 10 }));
        assert!(e.message.contains("`db.internal` without TLS"), "{e:?}");
        assert!(e.help.contains("sslmode=verify-full") && e.help.contains("require_postgres_origin_tls = false"), "{e:?}");
        for host in ["10.0.0.5", "[2001:db8::1]", "localhost.example.com", "[::ffff:10.0.0.1]", "128.0.0.1"] {
            let text = format!("{on}{}", with_origin(&format!("postgres://app@{host}/app")));
            error_at(&text, "database[0].origin");
        }

        // Loopback never leaves the machine, and verify-full is what the policy asks for.
        for url in [
            "postgres://app@127.0.0.1:5433/app",
            "postgres://app@127.8.9.10/app",
            "postgres://app@[::1]/app",
            "postgres://app@LOCALHOST/app",
            "postgres://app@db.internal/app?sslmode=verify-full",
        ] {
            let c = Config::parse(Path::new(FILE), &format!("{on}{}", with_origin(url))).unwrap();
            assert!(c.security.require_postgres_origin_tls);
            let c = Config::parse(Path::new(FILE), &with_origin(url)).unwrap();
            assert!(c.warnings().is_empty(), "{url}: {:?}", c.warnings());
        }

        let e = errors("[security]\nrequire_postgres_origin_tls = \"yes\"\n");
        assert_eq!(e[0].key.as_deref(), Some("security.require_postgres_origin_tls"), "{e:?}");
    }

    #[test]
    fn origin_errors_point_at_the_origin_value() {
        let text = db("").replace("postgres://app@db.internal/app", "postgres://app:hunter2@db.internal/app");
        let e = error_at(&text, "database[0].origin");
        assert_eq!(e.location, Some(crate::Location { line: 4, column: 10 }));
        assert!(e.message.contains("password"), "{e:?}");
        assert!(e.help.contains("origin_password_env"), "{e:?}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn origin_urls_parse() {
        let u = origin("postgres://app@db.example.com/app").unwrap();
        assert_eq!(
            u,
            OriginUrl {
                host: "db.example.com".into(),
                port: 5432,
                user: "app".into(),
                database: "app".into(),
                tls: OriginTlsMode::Disable
            }
        );
        let u = origin("POSTGRESQL://app@DB.Example.com:6543/app?sslmode=disable").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("db.example.com", 6543));

        let u = origin("postgres://app@[2001:DB8::1]:5433/app").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("2001:db8::1", 5433));
        assert_eq!(u.to_string(), "postgres://app@[2001:db8::1]:5433/app?sslmode=disable");
        assert_eq!(origin("postgres://app@[::1]/app").unwrap().port, 5432);

        let u = origin("postgres://us%40er%20x@10.0.0.1/my%2Fdb%C3%A9").unwrap();
        assert_eq!((u.user.as_str(), u.database.as_str()), ("us@er x", "my/dbé"));
        assert_eq!(u.to_string(), "postgres://us%40er%20x@10.0.0.1:5432/my%2Fdb%C3%A9?sslmode=disable");

        let u = origin("postgres://app@db/app?sslmode=verify-full").unwrap();
        assert_eq!(u.tls, OriginTlsMode::VerifyFull { root_cert: None });
        let u = origin("postgres://app@db/app?sslrootcert=certs/ca.pem&sslmode=verify-full").unwrap();
        assert_eq!(u.tls, OriginTlsMode::VerifyFull { root_cert: Some("/srv/cordon/certs/ca.pem".into()) });
        let u = origin("postgres://app@db/app?sslmode=verify-full&sslrootcert=/etc/ssl/ca%20roots.pem").unwrap();
        assert_eq!(u.tls, OriginTlsMode::VerifyFull { root_cert: Some("/etc/ssl/ca roots.pem".into()) });
        assert_eq!(u.to_string(), "postgres://app@db:5432/app?sslmode=verify-full&sslrootcert=/etc/ssl/ca%20roots.pem");
    }

    #[test]
    fn display_parses_back() {
        for url in [
            "postgres://a%3Ab@[fe80::1]:1/x%3Fy?sslmode=verify-full&sslrootcert=%2Fr%26s%3D.pem",
            "postgresql://app@h-1.example:65535/app",
            "postgres://app@db/app?sslmode=verify-full",
        ] {
            let u = origin(url).unwrap();
            assert_eq!(origin(&u.to_string()).unwrap(), u, "{url} -> {u}");
        }
    }

    #[test]
    fn origin_urls_are_refused() {
        let refused = |url: &str, message: &str, help: &str| {
            let e = origin(url).expect_err(url);
            assert!(e.message.contains(message), "{url}: {e:?}");
            assert!(e.help.contains(help), "{url}: {e:?}");
            e
        };
        let e = refused("postgres://app:secret@db/app", "password", "origin_password_env");
        assert!(!e.message.contains("secret") && !e.help.contains("secret"));
        refused("postgres://app:@db/app", "password", "origin_password_env");
        refused("postgres://app:p@ss@db/app", "password", "origin_password_env");

        refused("mysql://app@db/app", "not a postgres:// URL", "postgres://USER@HOST");
        refused("postgres://db/app", "no user", "USER@HOST");
        refused("postgres://@db/app", "no user", "USER@HOST");
        refused("postgres://app@/app", "no host", "HOST");
        refused("postgres://app@db", "no database", "DATABASE");
        refused("postgres://app@db/", "no database", "DATABASE");
        refused("postgres://app@db:0/app", "port", "1 to 65535");
        refused("postgres://app@db:65536/app", "port", "1 to 65535");
        refused("postgres://app@db:/app", "port", "1 to 65535");
        refused("postgres://app@db:+5/app", "port", "1 to 65535");
        refused("postgres://app@::1/app", "more than one `:`", "[ADDRESS]");
        refused("postgres://app@[::1/app", "without `]`", "IPv6");
        refused("postgres://app@[db]/app", "not an IPv6 address", "IPv6");
        refused("postgres://app@[::1]x/app", "after its IPv6 host", "postgres://");
        refused("postgres://app@a,b/app", "not a host name", "host lists");
        refused("postgres://app@db/app#x", "fragment", "postgres://");
        refused("postgres://app@db/a%zzb", "percent escape", "hex digits");
        refused("postgres://app@db/a%2", "percent escape", "hex digits");
        refused("postgres://app@db/a%FF", "UTF-8", "UTF-8");
        refused(&format!("postgres://app@db/{}", "d".repeat(64)), "not a valid Postgres name", "63 bytes");

        for mode in ["require", "prefer", "allow", "verify-ca"] {
            refused(
                &format!("postgres://app@db/app?sslmode={mode}"),
                &format!("sslmode={mode}"),
                "use sslmode=verify-full (certificate and host name checked) or sslmode=disable",
            );
        }
        refused("postgres://app@db/app?sslmode=on", "unknown sslmode `on`", "sslmode=verify-full");
        refused("postgres://app@db/app?sslmode=disable&sslmode=verify-full", "twice", "one sslmode");
        refused("postgres://app@db/app?sslrootcert=ca.pem", "sslrootcert", "sslmode=verify-full");
        refused("postgres://app@db/app?sslmode=disable&sslrootcert=ca.pem", "sslrootcert", "sslmode=verify-full");
        refused("postgres://app@db/app?sslmode=verify-full&sslrootcert=", "empty sslrootcert", "PEM");
        refused("postgres://app@db/app?application_name=x", "parameter `application_name`", "only sslmode and sslrootcert");
        refused("postgres://app@db/app?sslmode", "has no value", "NAME=VALUE");
    }

    fn worker(tenant: &str, database: &str) -> String {
        format!(
            "[[worker]]\nname = \"w-{tenant}\"\ntenant = \"{tenant}\"\ncomponent = \"w.wasm\"\nroutes = [\"{tenant}.localhost/\"]\n\
             [[worker.kv]]\nbinding = \"PG\"\nnamespace = \"n\"\n\
             [[worker.postgres]]\nbinding = \"PG2\"\ndatabase = \"{database}\"\n"
        )
    }

    #[test]
    fn postgres_grants_reach_only_the_workers_tenant() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("w.wasm"), b"").unwrap();
        let path = dir.path().join("cordon.toml");

        let text = [db(""), worker("acme", "main")].concat();
        let c = Config::parse(&path, &text).unwrap();
        assert_eq!(c.workers[0].grants.postgres, vec![crate::PostgresGrant { binding: "PG2".into(), database: "main".into() }]);

        // `main` exists, but belongs to acme.
        let text = [db(""), worker("other", "main")].concat();
        let e = Config::parse(&path, &text).unwrap_err().0;
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].key.as_deref(), Some("worker[0].postgres[0].database"));
        assert_eq!(e[0].location, Some(crate::Location { line: 15, column: 12 }));
        assert!(e[0].message.contains("tenant `other` has no database `main`"), "{e:?}");
        assert!(e[0].help.contains("tenant `other` has no [[database]]"), "{e:?}");

        let text = [db(""), db("").replace("main", "reports"), worker("acme", "mian")].concat();
        let e = Config::parse(&path, &text).unwrap_err().0;
        assert_eq!(e[0].key.as_deref(), Some("worker[0].postgres[0].database"));
        assert!(e[0].help.contains("tenant `acme` has `main`, `reports`"), "{e:?}");
    }

    #[test]
    fn postgres_bindings_share_the_workers_binding_names() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("w.wasm"), b"").unwrap();
        let text = [db(""), worker("acme", "main").replace("PG2", "PG")].concat();
        let e = Config::parse(&dir.path().join("cordon.toml"), &text).unwrap_err().0;
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].key.as_deref(), Some("worker[0].postgres[0].binding"));
        assert!(e[0].message.contains("already granted"), "{e:?}");

        let text = [db(""), worker("acme", "main").replace("PG2", "2PG")].concat();
        let e = Config::parse(&dir.path().join("cordon.toml"), &text).unwrap_err().0;
        assert_eq!(e[0].key.as_deref(), Some("worker[0].postgres[0].binding"));
    }

    #[test]
    fn relative_paths_start_at_the_config_directory() {
        let text = "[postgres_proxy]\nlisten = \"127.0.0.1:6432\"\ntls_cert = \"c.pem\"\ntls_key = \"/etc/k.pem\"\n";
        let c = Config::parse(Path::new("cordon.toml"), text).unwrap();
        let tls = c.postgres_proxy.unwrap().tls.unwrap();
        assert!(tls.cert.is_absolute(), "{tls:?}");
        assert_eq!(tls.cert, std::env::current_dir().unwrap().join("c.pem"));
        assert_eq!(tls.key, Path::new("/etc/k.pem"));

        let u = parse_origin("postgres://a@h/d?sslmode=verify-full&sslrootcert=ca.pem", Path::new(".")).unwrap();
        let OriginTlsMode::VerifyFull { root_cert: Some(root) } = u.tls else { panic!("{u:?}") };
        assert!(root.is_absolute(), "{root:?}");
    }

    #[test]
    fn env_names_are_restricted() {
        assert!(is_valid_env_name("APP_DB_PASSWORD"));
        assert!(is_valid_env_name("_x1"));
        assert!(!is_valid_env_name(""));
        assert!(!is_valid_env_name("1X"));
        assert!(!is_valid_env_name("A-B"));
        assert!(!is_valid_env_name("A B"));
        assert!(!is_valid_env_name(&"A".repeat(129)));
    }
}
