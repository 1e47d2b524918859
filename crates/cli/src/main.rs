//! `cordon`: serve workers, reload a server's config, check a config and
//! its components, or manage the secrets of workers.

mod descriptors;
mod log_writer;
mod postgres;
mod reload;
mod secret;
mod secret_env;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use cordon_config::Config;
use cordon_gateway::Gateway;
use cordon_runtime::{Posture, Runtime};

/// How long the last log lines get to reach stderr before the process
/// exits; a stalled stderr (a full pipe, a stalled journal) costs them
/// rather than holding the exit, and the data directory's lock, longer.
const LOG_DRAIN: Duration = Duration::from_millis(300);

/// How long the async runtimes get to stop once the gateway has returned:
/// tasks still there are dropped, and nothing started with
/// `spawn_blocking` is waited for past it.
const RUNTIME_STOP: Duration = Duration::from_millis(200);

#[derive(Parser)]
#[command(name = "cordon", version, about = "Run untrusted WebAssembly workers in hardened sandboxes")]
struct Cli {
    /// Log format for everything the server writes to stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the workers of a config.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
        /// Overrides `server.listen`.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Overrides `server.admin_listen`.
        #[arg(long)]
        admin_listen: Option<std::net::SocketAddr>,
    },
    /// Make the server that serves a config read it again: deploy the
    /// workers that changed and remove those deleted from it. Prints what
    /// changed, or why nothing did (then exits non-zero).
    Reload {
        /// The config file the server was started with.
        #[arg(long, short)]
        config: PathBuf,
        /// How long to wait for the server's answer, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Validate a config and every component it names, print the sandbox
    /// posture, and exit non-zero if anything is wrong.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Store, list and delete the encrypted secrets of a worker.
    Secret {
        #[command(subcommand)]
        command: secret::SecretCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_writer = init_logging(cli.log_format);
    let result = match cli.command {
        Command::Serve { config, listen, admin_listen } => serve(&config, listen, admin_listen),
        Command::Reload { config, timeout } => reload::request(&config, Duration::from_secs(timeout)),
        Command::Check { config } => check(&config),
        Command::Secret { command } => secret::run(command),
    };
    if let Some(w) = log_writer {
        w.drain(LOG_DRAIN);
    }
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every event is formatted on the thread that logs it and written by
/// the log writer's own thread, through a bounded queue that never waits
/// (see `log_writer`). Request lines and worker output are logged from the
/// gateway's request log thread, so the threads serving requests only queue.
fn init_logging(format: LogFormat) -> Option<log_writer::NonBlocking> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let notice = match format {
        LogFormat::Text => log_writer::NoticeFormat::Text,
        LogFormat::Json => log_writer::NoticeFormat::Json,
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let Ok(writer) = log_writer::NonBlocking::start(std::io::stderr(), notice) else {
        // No thread for the writer: write directly rather than not at all.
        let builder = builder.with_writer(std::io::stderr);
        match format {
            LogFormat::Text => builder.init(),
            LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
        }
        return None;
    };
    let handle = writer.clone();
    let builder = builder.with_writer(move || writer.clone());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
    Some(handle)
}

fn load_config(path: &std::path::Path) -> anyhow::Result<Config> {
    // Each error already starts with `error:`; main adds one more in front.
    Config::load(path).map_err(|e| anyhow::anyhow!("{} error(s) in {}:\n{e}", e.0.len(), path.display()))
}

fn serve(
    path: &std::path::Path,
    listen: Option<std::net::SocketAddr>,
    admin_listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<ExitCode> {
    let mut config = load_config(path)?;
    if let Some(a) = listen {
        config.server.listen = a;
    }
    if let Some(a) = admin_listen {
        config.server.admin_listen = a;
    }
    if config.server.listen == config.server.admin_listen && config.server.listen.port() != 0 {
        anyhow::bail!("the admin listener needs its own address, but both are {}: change --admin-listen or --listen", config.server.listen);
    }
    if !config.server.admin_listen.ip().is_loopback() {
        tracing::warn!(
            admin_listen = %config.server.admin_listen,
            "the admin listener is not on loopback; it is unauthenticated and discloses the configuration, so firewall it"
        );
    }
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    // Before any thread that could read the environment starts (the log
    // writer never does).
    // SAFETY: the only other thread now is the log writer, which does not
    // read or change the environment.
    let secrets = unsafe { secret_env::SecretEnv::take(&secret_env::SecretEnv::names(&config)) };
    let failed = secret_env::forbid_core_dumps();
    if !failed.is_empty() {
        tracing::warn!(failed = ?failed, "cannot forbid core dumps; a crash may write keys and passwords to disk");
    }
    let (soft, hard) = descriptors::raise_limit()?;
    let budget = descriptors::DescriptorBudget::of(&config);
    budget.check(soft, hard)?;
    tracing::info!(limit = soft, hard, needed_at_most = budget.total(), "file descriptors");
    let network = cordon_runtime::network(&config).context("cannot start the sandbox")?;
    let runtime =
        Arc::new(Runtime::start_with_env(&config, Arc::new(network), &|name| secrets.get(name)).context("cannot start the sandbox")?);
    drop(secrets);
    // The same pools and caches serve the worker binding and the wire-protocol proxy.
    let accelerator = runtime.accelerator();
    log_posture(runtime.posture());
    if runtime.workers().is_empty() {
        tracing::warn!("the config has no [[worker]]; every request will get 404");
    }

    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    let served = tokio.block_on(async {
        let gateway = Gateway::bind(&config, runtime.clone()).await?;
        // Handlers first: a signal after the "serving" line must never find
        // the default disposition, which would kill requests in flight (or,
        // for SIGHUP, the server).
        let signal = shutdown_signal()?;
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let until_stopped = move |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let reloader = reload::Reloader::new(path, &config, listen, admin_listen, (soft, hard), runtime.clone());
        // Only now may `cordon reload` signal this process.
        reloader.announce();
        tokio::spawn(reloader.run(hangup, until_stopped(stopped.clone())));
        let proxy = postgres::start(&config, accelerator, until_stopped(stopped.clone()))?;
        tracing::info!(listen = %gateway.local_addr(), admin = %gateway.admin_addr(), workers = runtime.workers().len(), "cordon is serving");
        tokio::spawn(async move {
            signal.await;
            let _ = stop.send(true);
        });
        gateway.run(until_stopped(stopped)).await;
        // Every request has ended or been cut; the guests that outlived them
        // go now, while their timers and sockets still exist.
        runtime.stop_guests(RUNTIME_STOP);
        if let Some(proxy) = proxy {
            // It stopped accepting at the signal, long before the gateway's
            // grace period ended; its runtime is stopped within RUNTIME_STOP.
            let _ = tokio::time::timeout(RUNTIME_STOP * 2, tokio::task::spawn_blocking(move || proxy.join())).await;
        }
        anyhow::Ok(())
    });
    // Dropping the runtime would wait for every blocking task without bound.
    tokio.shutdown_timeout(RUNTIME_STOP);
    served?;
    // Dropping `runtime` shuts the storage pools down: queued calls are
    // dropped and running ones interrupted; their threads are not waited for.
    Ok(ExitCode::SUCCESS)
}

/// Installs the SIGTERM and SIGINT handlers now; the future resolves on
/// the first of them.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

fn log_posture(p: &Posture) {
    let mpk = &p.memory_protection_keys;
    tracing::info!(
        allocator = p.allocator.strategy,
        max_instances = p.allocator.max_instances,
        max_memory_bytes = p.allocator.max_memory_bytes,
        guard_pages = p.guard_pages.enabled,
        memory_reservation_bytes = p.guard_pages.memory_reservation_bytes,
        guard_bytes = p.guard_pages.guard_bytes_after,
        copy_on_write = p.copy_on_write_memory_init,
        wasm_threads = p.wasm_threads,
        clock_resolution_ns = p.clock_resolution_ns,
        "sandbox posture"
    );
    tracing::info!(setting = %mpk.setting, active = mpk.active, reason = %mpk.reason, "memory protection keys");
}

fn check(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            println!("{e}");
            println!("\n{} error(s) in {}", e.0.len(), path.display());
            return Ok(ExitCode::FAILURE);
        }
    };
    let (posture, results) = match Runtime::check(&config) {
        Ok(r) => r,
        Err(e) => {
            println!("error: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    println!("sandbox posture:\n{}", serde_json::to_string_pretty(&posture)?);
    let mut failed = 0;
    for (w, result) in config.workers.iter().zip(results) {
        match result {
            Ok(()) => println!("ok: worker `{}` (tenant `{}`): {}", w.name, w.tenant, w.component.display()),
            Err(e) => {
                failed += 1;
                println!("error: {e}");
            }
        }
    }
    if failed > 0 {
        println!("\n{failed} of {} worker(s) failed the check", config.workers.len());
        return Ok(ExitCode::FAILURE);
    }
    let warnings = config.warnings();
    for warning in &warnings {
        println!("warning: {warning}");
    }
    println!("\n{}: ok ({} worker(s), {} warning(s))", path.display(), config.workers.len(), warnings.len());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cordon_egress::LookupLimits;

    #[test]
    fn the_network_takes_each_tenants_own_outbound_connection_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join("x.wasm"), b"").unwrap();
        let worker = |name: &str, tenant: &str| {
            format!("[[worker]]\nname = \"{name}\"\ntenant = \"{tenant}\"\ncomponent = \"x.wasm\"\nroutes = [\"{name}/\"]\n")
        };
        let text = format!(
            "[server]\nmax_outbound_connections_per_tenant = 16\nmax_name_lookups = 40\nmax_name_lookups_per_tenant = 3\n\
             [[tenant]]\nname = \"big\"\nmax_outbound_connections = 64\n{}{}",
            worker("a", "big"),
            worker("b", "small")
        );
        let config = Config::parse(&dir.join("cordon.toml"), &text).unwrap();
        let network = cordon_runtime::network(&config).unwrap();
        assert_eq!((network.outbound_connections_of("big"), network.outbound_connections_of("small")), (64, 16));
        assert_eq!(network.lookup_limits(), LookupLimits { per_tenant: 3, total: 40 });
    }
}
