//! `cordon serve`'s Postgres wire-protocol proxy: started when the config has `[postgres_proxy]`.
//!
//! The proxy runs on a thread of its own with a single-threaded async runtime, like PgBouncer's
//! event loop: each client's work is a few small reads and writes, and keeping them on one
//! thread avoids waking and migrating tasks between cores, which on a loaded machine costs more
//! than the work itself. The pools and caches it uses are shared with the worker binding on
//! the main runtime.

use std::sync::Arc;

use anyhow::Context as _;
use cordon_config::Config;
use cordon_pgaccel::accel::Accelerator;
use cordon_pgaccel::proxy::{ProxySettings, serve};

/// Binds the proxy listener and serves it on its own thread until `shutdown` resolves. `None`
/// when the config has no `[postgres_proxy]`.
pub fn start(
    config: &Config,
    accel: Option<Arc<Accelerator>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Option<std::thread::JoinHandle<()>>> {
    let Some(proxy) = &config.postgres_proxy else { return Ok(None) };
    // A proxy without databases still answers, refusing every dbname.
    let accel = accel.unwrap_or_else(|| Arc::new(Accelerator::new(Vec::new())));
    let tls = match &proxy.tls {
        Some(tls) => Some(cordon_pgaccel::tls::acceptor(&tls.cert, &tls.key).context("cannot load the Postgres proxy's TLS certificate")?),
        None => None,
    };
    let listener = std::net::TcpListener::bind(proxy.listen)
        .with_context(|| format!("cannot listen on {} for the Postgres proxy ([postgres_proxy] listen)", proxy.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the Postgres proxy's runtime")?;
    tracing::info!(listen = %addr, databases = accel.databases().len(), tls = tls.is_some(), require_tls = proxy.require_tls, "postgres proxy is serving");
    let settings = ProxySettings {
        tls,
        require_tls: proxy.require_tls,
        handshake_timeout: std::time::Duration::from_millis(proxy.handshake_timeout_ms),
        max_handshakes: proxy.max_handshakes as usize,
        max_handshakes_per_address: proxy.max_handshakes_per_address as usize,
    };
    let thread = std::thread::Builder::new().name("cordon-pg-proxy".into()).spawn(move || {
        runtime.block_on(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => serve(accel, listener, settings, shutdown).await,
                Err(error) => tracing::error!(error = %error, "the Postgres proxy cannot use its listener"),
            }
        });
        // Sessions still open are dropped; nothing blocking is waited for.
        runtime.shutdown_timeout(crate::RUNTIME_STOP);
    })?;
    Ok(Some(thread))
}
