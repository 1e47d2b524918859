//! `cordon secret`: store, list and delete the encrypted secrets of a
//! worker, rotate the master key, and shred a removed tenant's secrets.
//!
//! A value is read from stdin, never from an argument, so that it stays out
//! of shell history and `ps`, and it is never printed. A secret can only be
//! stored under a name that the worker's `secrets = [...]` grants, so the
//! config stays the one list of what a worker may read. These commands do not
//! take the data directory's lock: they run next to `cordon serve`, and
//! SQLite arbitrates the concurrent access to the secrets database.

use std::collections::BTreeSet;
use std::io::{IsTerminal as _, Read as _};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use cordon_config::{Config, WorkerConfig};
use cordon_vars::vault::{
    KeySource, MASTER_KEY_ENV, MASTER_KEY_FILE, MAX_SECRET_BYTES, MasterKey, NEW_MASTER_KEY_ENV, RotationLock, SecretValue, Vault,
    VaultError,
};
use zeroize::Zeroizing;

#[derive(Subcommand)]
pub enum SecretCommand {
    /// Store a secret of a worker, reading its value from stdin (one trailing
    /// newline is removed).
    Put {
        #[command(flatten)]
        worker: WorkerArgs,
        /// The secret's name, as listed in the worker's `secrets`.
        key: String,
    },
    /// List the names of a worker's secrets, marking those granted but not
    /// stored and those stored but no longer granted.
    List {
        #[command(flatten)]
        worker: WorkerArgs,
    },
    /// Delete a stored secret of a worker.
    Delete {
        #[command(flatten)]
        worker: WorkerArgs,
        /// The secret's name.
        key: String,
    },
    /// Re-encrypt every secret under a new master key, in one transaction.
    /// With the key file (the default), a new key is made and replaces it;
    /// with CORDON_MASTER_KEY, the new key is read from
    /// CORDON_NEW_MASTER_KEY. With --tenant, only that tenant's secrets get
    /// a new key of their own.
    RotateKey {
        /// The config whose data directory holds the secrets.
        #[arg(long, short)]
        config: PathBuf,
        /// Re-key only this tenant's secrets, under a new key derived for it.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Destroy every secret of a tenant that was removed from the config,
    /// and the key they were sealed with (crypto-shredding). Cannot be undone.
    ShredTenant {
        /// The config whose data directory holds the secrets; it must no
        /// longer name a worker of the tenant.
        #[arg(long, short)]
        config: PathBuf,
        /// The tenant.
        tenant: String,
        /// Confirms that the secrets are to be destroyed.
        #[arg(long)]
        yes: bool,
    },
}

/// Which worker's secrets: a worker is its tenant and its name, and the
/// tenant may be left out when no other tenant has a worker of that name.
#[derive(clap::Args)]
pub struct WorkerArgs {
    /// The config that names the worker and its granted secrets.
    #[arg(long, short)]
    config: PathBuf,
    /// The worker whose secrets these are.
    #[arg(long, short)]
    worker: String,
    /// The worker's tenant; needed when workers of several tenants have
    /// this name.
    #[arg(long, short)]
    tenant: Option<String>,
}

pub fn run(command: SecretCommand) -> anyhow::Result<ExitCode> {
    match command {
        SecretCommand::Put { worker, key } => put(&worker, &key),
        SecretCommand::List { worker } => list(&worker),
        SecretCommand::Delete { worker, key } => delete(&worker, &key),
        SecretCommand::RotateKey { config, tenant } => rotate_key(&config, tenant.as_deref()),
        SecretCommand::ShredTenant { config, tenant, yes } => shred_tenant(&config, &tenant, yes),
    }
}

fn put(args: &WorkerArgs, key: &str) -> anyhow::Result<ExitCode> {
    let path = &args.config;
    let config = crate::load_config(path)?;
    let worker = find_worker(&config, args)?;
    if !worker.grants.secrets.iter().any(|s| s == key) {
        let mut names: Vec<String> = worker.grants.secrets.iter().map(|s| format!("{s:?}")).collect();
        names.push(format!("{key:?}"));
        bail!(
            "secret `{key}` is not granted to worker `{}`: add it to that worker's secrets in {} (`secrets = [{}]`), then run this again",
            worker.name,
            path.display(),
            names.join(", ")
        );
    }
    // The value is read only once the command is known to be valid.
    let value = read_value(key)?;
    let vault = open_vault(&config)?;
    vault.put(&worker.tenant, &worker.name, key, &value).map_err(render)?;
    println!("secret {key} stored for worker {} (tenant {})", worker.name, worker.tenant);
    Ok(ExitCode::SUCCESS)
}

fn list(args: &WorkerArgs) -> anyhow::Result<ExitCode> {
    let path = &args.config;
    let config = crate::load_config(path)?;
    let worker = find_worker(&config, args)?;
    // Listing never creates a key or a database.
    let stored = match vault_if_exists(&config)? {
        Some(vault) => vault.list(&worker.tenant, &worker.name).map_err(render)?,
        None => Vec::new(),
    };
    let granted = &worker.grants.secrets;
    let names: BTreeSet<&String> = granted.iter().chain(&stored).collect();
    for name in &names {
        match (granted.contains(name), stored.contains(name)) {
            (true, true) => println!("{name}"),
            (true, false) => println!("{name}  (granted but not stored: store it with `cordon secret put`)"),
            (false, _) => {
                println!("{name}  (stored but no longer granted, so the worker cannot read it: `cordon secret delete` removes it)")
            }
        }
    }
    if names.is_empty() {
        eprintln!("worker `{}` has no secrets granted in {} and none stored", worker.name, path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn delete(args: &WorkerArgs, key: &str) -> anyhow::Result<ExitCode> {
    let config = crate::load_config(&args.config)?;
    let worker = find_worker(&config, args)?;
    let deleted = match vault_if_exists(&config)? {
        Some(vault) => vault.delete(&worker.tenant, &worker.name, key).map_err(render)?,
        None => false,
    };
    if !deleted {
        bail!("secret `{key}` is not stored for worker `{}` (tenant `{}`), so there is nothing to delete", worker.name, worker.tenant);
    }
    println!("secret {key} deleted for worker {} (tenant {})", worker.name, worker.tenant);
    Ok(ExitCode::SUCCESS)
}

fn rotate_key(path: &Path, tenant: Option<&str>) -> anyhow::Result<ExitCode> {
    let config = crate::load_config(path)?;
    let data_dir = &config.server.data_dir;
    if !Vault::database_path(data_dir).exists() {
        bail!("no secret is stored in {}, so there is no key to rotate", data_dir.display());
    }
    if let Some(tenant) = tenant {
        let done = open_vault(&config)?.rekey_tenant(tenant).map_err(render)?;
        println!("re-encrypted {} secret(s) of tenant {tenant} under a new key of its own", done.secrets);
        return Ok(ExitCode::SUCCESS);
    }
    let done = if std::env::var_os(MASTER_KEY_ENV).is_some() {
        // The new key must be kept safe before anything is sealed with it:
        // the operator makes it and holds it, and this command only uses it.
        let Some(new) = std::env::var_os(NEW_MASTER_KEY_ENV) else {
            bail!(
                "{MASTER_KEY_ENV} is set, so the new key must come from {NEW_MASTER_KEY_ENV}: make one with `openssl rand -hex 32`, \
                 keep it where you keep {MASTER_KEY_ENV}, and run this again with both set"
            );
        };
        let new = Zeroizing::new(new.into_encoded_bytes());
        let new = MasterKey::new_from_env_value(std::str::from_utf8(&new).unwrap_or("")).map_err(render)?;
        let done = open_vault(&config)?.rotate_master_key(new).map_err(render)?;
        eprintln!(
            "set {MASTER_KEY_ENV} to the value of {NEW_MASTER_KEY_ENV} everywhere it is used, and restart `cordon serve` with it: \
             a server that still holds the old key refuses secret reads until then"
        );
        done
    } else {
        // Taken before the vault opens, because opening may finish an
        // interrupted rotation's rename.
        let lock = RotationLock::acquire(data_dir).map_err(render)?;
        let done = open_vault(&config)?.rotate_key_file(&lock).map_err(render)?;
        eprintln!(
            "the new key is in {}; back it up now, because the old one no longer opens the secrets. \
             A running `cordon serve` picks it up at its next secret read",
            data_dir.join(MASTER_KEY_FILE).display()
        );
        done
    };
    println!(
        "re-encrypted {} secret(s) of {} tenant(s) under the new master key (key id {}, was {})",
        done.secrets, done.tenants, done.new_key_id, done.old_key_id
    );
    Ok(ExitCode::SUCCESS)
}

fn shred_tenant(path: &Path, tenant: &str, yes: bool) -> anyhow::Result<ExitCode> {
    let config = crate::load_config(path)?;
    let workers: Vec<&str> = config.workers.iter().filter(|w| w.tenant == tenant).map(|w| w.name.as_str()).collect();
    if !workers.is_empty() {
        bail!(
            "tenant `{tenant}` still has workers in {} ({}); remove them from the config first, because shredding destroys the secrets they read",
            path.display(),
            workers.join(", ")
        );
    }
    if !yes {
        bail!(
            "this destroys every secret of tenant `{tenant}` and the key they were sealed with, and cannot be undone; run it again with --yes"
        );
    }
    let Some(vault) = vault_if_exists(&config)? else {
        bail!("no secret is stored in {}, so tenant `{tenant}` has none to shred", config.server.data_dir.display());
    };
    let shredded = vault.shred_tenant(tenant).map_err(render)?;
    println!("shredded tenant {tenant}: {shredded} secret(s) and its key are gone");
    Ok(ExitCode::SUCCESS)
}

/// The worker that `args` names. Without `--tenant`, the name must belong
/// to one tenant only: picking one of several would read or change another
/// tenant's secrets.
fn find_worker<'a>(config: &'a Config, args: &WorkerArgs) -> anyhow::Result<&'a WorkerConfig> {
    let name = args.worker.as_str();
    let named: Vec<&WorkerConfig> = config.workers.iter().filter(|w| w.name == name).collect();
    let file = config.source.display();
    match (&args.tenant, named.as_slice()) {
        (Some(tenant), _) => {
            if let Some(w) = named.iter().find(|w| &w.tenant == tenant) {
                return Ok(w);
            }
            let tenants: Vec<&str> = named.iter().map(|w| w.tenant.as_str()).collect();
            let known = if tenants.is_empty() {
                workers_in(config)
            } else {
                format!("workers named `{name}` belong to the tenants {}", tenants.join(", "))
            };
            bail!("there is no worker `{name}` of tenant `{tenant}` in {file}: {known}")
        }
        (None, [w]) => Ok(w),
        (None, []) => bail!("there is no worker `{name}` in {file}: {}", workers_in(config)),
        (None, several) => {
            let tenants: Vec<&str> = several.iter().map(|w| w.tenant.as_str()).collect();
            bail!(
                "workers of several tenants are named `{name}` in {file} ({}): say whose with --tenant, for example --tenant {}",
                tenants.join(", "),
                tenants[0]
            )
        }
    }
}

/// The workers of `config` with their tenants, for an error message.
fn workers_in(config: &Config) -> String {
    let ids: Vec<String> = config.workers.iter().map(|w| format!("{} (tenant {})", w.name, w.tenant)).collect();
    if ids.is_empty() { "it has no [[worker]]".to_string() } else { format!("its workers are {}", ids.join(", ")) }
}

fn open_vault(config: &Config) -> anyhow::Result<Vault> {
    let data_dir = &config.server.data_dir;
    let (key, source) = MasterKey::load(data_dir).map_err(render)?;
    let vault = Vault::open(data_dir, key).map_err(render)?;
    if let KeySource::Created(path) = source {
        eprintln!("note: created a new master key in {}; back it up, because without it the secrets cannot be decrypted", path.display());
    }
    Ok(vault)
}

fn vault_if_exists(config: &Config) -> anyhow::Result<Option<Vault>> {
    if Vault::database_path(&config.server.data_dir).exists() { open_vault(config).map(Some) } else { Ok(None) }
}

/// The vault's messages already name the underlying cause; rendering the
/// message alone keeps `{:#}` from printing the cause twice.
fn render(e: VaultError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// The value on stdin, without one trailing "\n" or "\r\n". It is read
/// straight from the file descriptor into a buffer of fixed size that is
/// zeroed afterwards: stdin's own buffer, or a growing `Vec`, would leave
/// copies of the value in memory.
fn read_value(key: &str) -> anyhow::Result<SecretValue> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("type the value of {key}, then Enter and Ctrl-D (it is shown as you type; pipe it in to avoid that)");
    }
    let mut input = std::fs::File::from(stdin.as_fd().try_clone_to_owned().context("cannot read stdin")?);
    // Room for one byte past the largest value and its line ending, to tell
    // "too large" from "exactly the limit".
    let mut buf = Zeroizing::new(vec![0u8; MAX_SECRET_BYTES + 3]);
    let mut len = 0;
    while len < buf.len() {
        match input.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("cannot read the value from stdin"),
        }
    }
    let value = &buf[..len];
    let value = value.strip_suffix(b"\r\n").or_else(|| value.strip_suffix(b"\n")).unwrap_or(value);
    if value.is_empty() {
        bail!("the value of {key} on stdin is empty; pipe it in, for example `cordon secret put ... {key} < file`");
    }
    if value.len() > MAX_SECRET_BYTES {
        bail!("the value of {key} on stdin is more than {MAX_SECRET_BYTES} bytes, the largest a secret can be");
    }
    let Ok(text) = std::str::from_utf8(value) else {
        bail!("the value of {key} on stdin is not UTF-8 text");
    };
    Ok(SecretValue::new(text.to_owned()))
}
