//! `cordon serve`'s Postgres wire-protocol proxy: started when the config has `[postgres_proxy]`.

use std::sync::Arc;

use anyhow::Context as _;
use cordon_config::Config;
use cordon_pgaccel::accel::Accelerator;
use cordon_pgaccel::proxy::{ProxySettings, serve};

/// Binds the proxy listener and serves it until `shutdown` resolves. `None` when the config has
/// no `[postgres_proxy]`.
pub async fn start(
    config: &Config,
    accel: Option<Arc<Accelerator>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(proxy) = &config.postgres_proxy else { return Ok(None) };
    // A proxy without databases still answers, refusing every dbname.
    let accel = accel.unwrap_or_else(|| Arc::new(Accelerator::new(Vec::new())));
    let tls = match &proxy.tls {
        Some(tls) => Some(cordon_pgaccel::tls::acceptor(&tls.cert, &tls.key).context("cannot load the Postgres proxy's TLS certificate")?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(proxy.listen)
        .await
        .with_context(|| format!("cannot listen on {} for the Postgres proxy ([postgres_proxy] listen)", proxy.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(listen = %addr, databases = accel.databases().len(), tls = tls.is_some(), require_tls = proxy.require_tls, "postgres proxy is serving");
    let settings = ProxySettings { tls, require_tls: proxy.require_tls };
    Ok(Some(tokio::spawn(serve(accel, listener, settings, shutdown))))
}
