//! The process's way out: how names are resolved, how TCP connections are
//! opened and which certificate authorities TLS trusts. One [`Network`] is
//! shared by every worker; it holds no per-tenant state.
//!
//! Name resolution and dialing are traits so that tests can make a name
//! resolve to 127.0.0.1 or 169.254.169.254, or answer differently on each
//! lookup, and can see every address a connection was attempted to, without
//! sending a packet off the machine.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Turns a host name into addresses. Called exactly once per subrequest to
/// a name; the addresses it returns are the ones checked and dialed.
pub trait Resolve: Send + Sync + 'static {
    fn resolve<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Vec<IpAddr>>>;
}

/// The operating system's resolver (`getaddrinfo`, on a blocking thread).
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Vec<IpAddr>>> {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((name, 0)).await?;
            let mut ips: Vec<IpAddr> = Vec::new();
            for a in addrs {
                if !ips.contains(&a.ip()) {
                    ips.push(a.ip());
                }
            }
            Ok(ips)
        })
    }
}

/// Opens a TCP connection to an address that has already passed every check.
pub trait Dial: Send + Sync + 'static {
    fn dial(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>>;
}

/// Plain `connect(2)`.
pub struct TcpDialer;

impl Dial for TcpDialer {
    fn dial(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
        Box::pin(async move {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot set up TLS for outbound requests: {0}")]
    Tls(String),
}

/// Resolver, dialer and TLS trust, shared by all workers.
pub struct Network {
    pub(crate) resolver: Arc<dyn Resolve>,
    pub(crate) dialer: Arc<dyn Dial>,
    pub(crate) tls: tokio_rustls::TlsConnector,
    pub(crate) denied_total: AtomicU64,
}

impl Network {
    /// The system resolver, real TCP, and the Mozilla root certificates
    /// (webpki-roots), which do not depend on what the host has installed.
    pub fn system() -> Result<Network, NetworkError> {
        NetworkBuilder::default().build()
    }

    pub fn builder() -> NetworkBuilder {
        NetworkBuilder::default()
    }

    /// Outbound attempts refused by policy since start, over all workers.
    pub fn denied_total(&self) -> u64 {
        self.denied_total.load(Ordering::Relaxed)
    }

    pub(crate) fn count_denied(&self) {
        self.denied_total.fetch_add(1, Ordering::Relaxed);
    }
}

/// Builds a [`Network`] with other parts than the system's.
#[derive(Default)]
pub struct NetworkBuilder {
    resolver: Option<Arc<dyn Resolve>>,
    dialer: Option<Arc<dyn Dial>>,
    extra_roots: Vec<CertificateDer<'static>>,
}

impl NetworkBuilder {
    pub fn resolver(mut self, resolver: Arc<dyn Resolve>) -> Self {
        self.resolver = Some(resolver);
        self
    }

    pub fn dialer(mut self, dialer: Arc<dyn Dial>) -> Self {
        self.dialer = Some(dialer);
        self
    }

    /// Also trusts `ca` (DER) as a root, besides the public roots. Used by
    /// tests to serve HTTPS from loopback with a throwaway CA; the config
    /// file cannot reach it.
    pub fn trust_root(mut self, ca: CertificateDer<'static>) -> Self {
        self.extra_roots.push(ca);
        self
    }

    pub fn build(self) -> Result<Network, NetworkError> {
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        for ca in self.extra_roots {
            roots.add(ca).map_err(|e| NetworkError::Tls(format!("extra root certificate: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| NetworkError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // The outbound client speaks HTTP/1.1 only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Network {
            resolver: self.resolver.unwrap_or_else(|| Arc::new(SystemResolver)),
            dialer: self.dialer.unwrap_or_else(|| Arc::new(TcpDialer)),
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            denied_total: AtomicU64::new(0),
        })
    }
}
