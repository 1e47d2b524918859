//! The process's way out: how names are resolved, how TCP connections are
//! opened and which certificate authorities TLS trusts. One [`Network`] is
//! shared by every worker. The only per-tenant state it keeps is how many
//! name lookups each tenant has in flight.
//!
//! Name resolution and dialing are traits so that tests can make a name
//! resolve to 127.0.0.1 or 169.254.169.254, or answer differently on each
//! lookup, and can see every address a connection was attempted to, without
//! sending a packet off the machine.
//!
//! The real resolver ([`DnsResolver`]) is asynchronous: it sends its own
//! queries from the serving threads' event loop and never blocks a thread,
//! so a name server that never answers costs a timer and a socket per query,
//! which the lookup's timeout (and the subrequest's) take back. A
//! `getaddrinfo` on a blocking thread could not be cancelled, and it would
//! hold a thread of the pool that key-value and SQL calls run on.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Turns a host name into addresses. Called exactly once per subrequest to
/// a name; the addresses it returns are the ones checked and dialed. An
/// empty list means the name has no address; an error of kind
/// [`io::ErrorKind::TimedOut`] means no name server answered in time.
///
/// The future must never block a thread: the caller bounds it with a
/// timeout, which can only take back what a dropped future holds.
pub trait Resolve: Send + Sync + 'static {
    fn resolve<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Vec<IpAddr>>>;
}

/// What the real resolver is configured with: the name servers, the static
/// host table, and how long one query may wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Asked in this order, over UDP only: an answer too large for one
    /// datagram (1,232 bytes, some 70 addresses) is an error.
    pub name_servers: Vec<SocketAddr>,
    /// Names answered without asking a name server.
    pub hosts: HostsFile,
    /// How long one query waits for a name server (`options timeout:` in
    /// resolv.conf).
    pub query_timeout: Duration,
    /// Rounds of queries over the name servers (`options attempts:`).
    pub attempts: u32,
}

/// Bounds on a whole lookup, whatever resolv.conf says: a lookup is never
/// allowed less than one second, nor more than thirty.
const MIN_LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);

impl DnsConfig {
    /// The machine's own configuration: `/etc/resolv.conf` and `/etc/hosts`.
    pub fn system() -> Result<DnsConfig, NetworkError> {
        DnsConfig::from_files(Path::new("/etc/resolv.conf"), Path::new("/etc/hosts"))
    }

    /// A resolv.conf and a hosts file. A missing file counts as empty, as
    /// the C library treats it: no name server means 127.0.0.1 port 53.
    pub fn from_files(resolv_conf: &Path, hosts: &Path) -> Result<DnsConfig, NetworkError> {
        let read = |path: &Path| match std::fs::read_to_string(path) {
            Ok(text) => Ok(text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(NetworkError::Dns(format!("cannot read {}: {e}", path.display()))),
        };
        DnsConfig::parse(&read(resolv_conf)?, &read(hosts)?)
    }

    /// The text of a resolv.conf and of a hosts file.
    ///
    /// Of resolv.conf, the name servers and the `timeout` and `attempts`
    /// options count. `search`, `domain` and `ndots` do not: an outbound
    /// target is the name its allowlist entry admitted, so it is always
    /// looked up as an absolute name, never with a search domain appended.
    pub fn parse(resolv_conf: &str, hosts: &str) -> Result<DnsConfig, NetworkError> {
        let hosts = HostsFile::parse(hosts);
        let has_name_server = resolv_conf.lines().any(|l| l.split_whitespace().next() == Some("nameserver"));
        if !has_name_server {
            let mut config = DnsConfig::name_servers(vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 53)]);
            config.hosts = hosts;
            return Ok(config);
        }
        let (parsed, options) =
            hickory_resolver::system_conf::parse_resolv_conf(resolv_conf).map_err(|e| NetworkError::Dns(format!("resolv.conf: {e}")))?;
        let name_servers = parsed.name_servers().iter().map(|ns| SocketAddr::new(ns.ip, 53)).collect();
        Ok(DnsConfig {
            name_servers,
            hosts,
            query_timeout: options.timeout.max(Duration::from_secs(1)),
            attempts: u32::try_from(options.attempts).unwrap_or(u32::MAX).clamp(1, 5),
        })
    }

    /// Only these name servers (each with its own port), no static host
    /// table, the C library's defaults for the rest. Tests use it to point
    /// the real resolver at a name server on loopback.
    pub fn name_servers(name_servers: Vec<SocketAddr>) -> DnsConfig {
        DnsConfig { name_servers, hosts: HostsFile::default(), query_timeout: Duration::from_secs(5), attempts: 2 }
    }

    /// The longest a whole lookup may take: every round of queries, within
    /// [1 s, 30 s].
    pub fn lookup_timeout(&self) -> Duration {
        self.query_timeout.saturating_mul(self.attempts).clamp(MIN_LOOKUP_TIMEOUT, MAX_LOOKUP_TIMEOUT)
    }
}

/// A static host table in the format of `/etc/hosts`: an address, then the
/// names it answers for. As with the C library, a name found here is
/// answered from here alone (every address listed for it, both families),
/// and no name server is asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostsFile {
    names: HashMap<String, Vec<IpAddr>>,
}

impl HostsFile {
    /// Parses the text of a hosts file. Lines that do not start with an IP
    /// address (zone-scoped IPv6 addresses among them) are skipped, as the
    /// C library skips them.
    pub fn parse(text: &str) -> HostsFile {
        let mut names: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or_default();
            let mut fields = line.split_whitespace();
            let Some(Ok(ip)) = fields.next().map(str::parse::<IpAddr>) else { continue };
            for name in fields {
                let name = name.to_ascii_lowercase();
                let name = name.strip_suffix('.').unwrap_or(&name);
                let ips = names.entry(name.to_string()).or_default();
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
        HostsFile { names }
    }

    /// The addresses listed for `name` (lowercase, no trailing dot).
    pub fn get(&self, name: &str) -> Option<&[IpAddr]> {
        self.names.get(name).map(Vec::as_slice)
    }
}

/// The real resolver: the static host table first, then the name servers,
/// asked asynchronously (hickory-resolver) over UDP for A and AAAA at once.
pub struct DnsResolver {
    resolver: TokioResolver,
    hosts: HostsFile,
}

impl DnsResolver {
    pub fn new(config: &DnsConfig) -> Result<DnsResolver, NetworkError> {
        if config.name_servers.is_empty() {
            return Err(NetworkError::Dns("no name server to ask".into()));
        }
        let servers = config
            .name_servers
            .iter()
            .map(|addr| {
                // UDP only. Over TCP the resolver keeps its connections
                // past the lookups that opened them, so a name server that
                // truncates its answers and then stays silent over TCP would
                // leave sockets behind; a truncated answer is an error instead.
                let mut server = NameServerConfig::udp(addr.ip());
                for connection in &mut server.connections {
                    connection.port = addr.port();
                }
                server
            })
            .collect();
        let mut options = ResolverOpts::default();
        options.timeout = config.query_timeout;
        options.attempts = config.attempts as usize;
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        // The host table is consulted here, with the C library's meaning.
        options.use_hosts_file = ResolveHosts::Never;
        // One name server at a time, as the C library asks them: a lookup
        // holds at most one socket per record type and retry.
        options.num_concurrent_reqs = 1;
        // Answers are cached (bounded in entries and in time), so a burst
        // of subrequests to one name asks once.
        options.cache_size = 4096;
        options.positive_max_ttl = Some(Duration::from_secs(300));
        options.negative_max_ttl = Some(Duration::from_secs(30));
        let resolver = Resolver::builder_with_config(ResolverConfig::from_parts(None, vec![], servers), TokioRuntimeProvider::default())
            .with_options(options)
            .build()
            .map_err(|e| NetworkError::Dns(e.to_string()))?;
        Ok(DnsResolver { resolver, hosts: config.hosts.clone() })
    }
}

impl Resolve for DnsResolver {
    fn resolve<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Vec<IpAddr>>> {
        if let Some(ips) = self.hosts.get(name) {
            let ips = ips.to_vec();
            return Box::pin(async move { Ok(ips) });
        }
        Box::pin(async move {
            // Absolute: no search domain is ever appended (see `DnsConfig::parse`).
            match self.resolver.lookup_ip(format!("{name}.")).await {
                Ok(lookup) => {
                    let mut ips: Vec<IpAddr> = Vec::new();
                    for ip in lookup.iter() {
                        if !ips.contains(&ip) {
                            ips.push(ip);
                        }
                    }
                    Ok(ips)
                }
                Err(e) if e.is_no_records_found() || e.is_nx_domain() => Ok(Vec::new()),
                Err(NetError::Timeout) => Err(io::Error::new(io::ErrorKind::TimedOut, "no name server answered")),
                Err(e) => Err(io::Error::other(e.to_string())),
            }
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
    #[error("cannot set up name resolution for outbound requests: {0}")]
    Dns(String),
}

/// How many name lookups may be in flight at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupLimits {
    /// Per tenant, over all its workers and requests. A lookup beyond it
    /// waits for one of the tenant's own to finish, until its subrequest's
    /// deadline.
    pub per_tenant: u32,
    /// Over the whole process.
    pub total: u32,
}

impl Default for LookupLimits {
    fn default() -> Self {
        LookupLimits { per_tenant: 16, total: 1024 }
    }
}

/// Why [`Network::lookup`] gave no addresses.
#[derive(Debug)]
pub(crate) enum LookupError {
    /// The deadline passed while the tenant (or the process) had every
    /// lookup slot in use; the lookup never started.
    Busy {
        limit: u32,
        per_tenant: bool,
    },
    /// The resolver's own timeout passed without an answer.
    TimedOut {
        after: Duration,
    },
    /// The subrequest's deadline passed during the lookup.
    Deadline,
    Failed(io::Error),
}

/// One semaphore for each tenant, made on first use: of `per_tenant`
/// permits, or of the tenant's own number in `overrides`.
struct TenantSemaphores {
    per_tenant: u32,
    overrides: HashMap<String, u32>,
    tenants: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl TenantSemaphores {
    fn new(per_tenant: u32) -> TenantSemaphores {
        Self::with_overrides(per_tenant, HashMap::new())
    }

    fn with_overrides(per_tenant: u32, overrides: HashMap<String, u32>) -> TenantSemaphores {
        TenantSemaphores { per_tenant, overrides, tenants: Mutex::default() }
    }

    /// The permits of `tenant`'s semaphore.
    fn limit(&self, tenant: &str) -> u32 {
        self.overrides.get(tenant).copied().unwrap_or(self.per_tenant)
    }

    fn tenant(&self, tenant: &str) -> Arc<Semaphore> {
        let mut tenants = self.tenants.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(semaphore) = tenants.get(tenant) {
            return semaphore.clone();
        }
        let semaphore = Arc::new(Semaphore::new(self.limit(tenant) as usize));
        tenants.insert(tenant.to_string(), semaphore.clone());
        semaphore
    }
}

/// Lookup slots: one semaphore per tenant, one for the process.
struct LookupSlots {
    limits: LookupLimits,
    total: Semaphore,
    tenants: TenantSemaphores,
}

/// Outbound connections a tenant holds open at once, over all its workers
/// and requests: each subrequest holds one of its tenant's slots from before
/// it connects until its connection is closed, so that no tenant can spend
/// the process's file descriptors.
pub(crate) struct ConnectionSlots {
    tenants: TenantSemaphores,
}

/// Default of [`NetworkBuilder::outbound_connections_per_tenant`].
pub const DEFAULT_OUTBOUND_CONNECTIONS_PER_TENANT: u32 = 256;

impl ConnectionSlots {
    /// A slot of `tenant`'s, or `None` when all of them are held: a
    /// subrequest over the cap fails at once rather than waiting, since the
    /// ones holding the slots may hang until their deadline.
    pub(crate) fn try_acquire(&self, tenant: &str) -> Option<OwnedSemaphorePermit> {
        self.tenants.tenant(tenant).try_acquire_owned().ok()
    }
}

/// Resolver, dialer and TLS trust, shared by all workers.
pub struct Network {
    pub(crate) resolver: Arc<dyn Resolve>,
    lookup_timeout: Duration,
    lookups: LookupSlots,
    pub(crate) connections: ConnectionSlots,
    pub(crate) dialer: Arc<dyn Dial>,
    pub(crate) tls: tokio_rustls::TlsConnector,
    pub(crate) denied_total: AtomicU64,
}

impl Network {
    /// The system's name servers and host table (resolved asynchronously),
    /// real TCP, and the Mozilla root certificates (webpki-roots), which do
    /// not depend on what the host has installed.
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

    /// The longest one lookup may take, whatever the subrequest's deadline.
    pub fn lookup_timeout(&self) -> Duration {
        self.lookup_timeout
    }

    /// The most outbound connections one tenant holds open at once, for a
    /// tenant without a limit of its own.
    pub fn outbound_connections_per_tenant(&self) -> u32 {
        self.connections.tenants.per_tenant
    }

    /// The most outbound connections `tenant` holds open at once.
    pub fn outbound_connections_of(&self, tenant: &str) -> u32 {
        self.connections.tenants.limit(tenant)
    }

    pub fn lookup_limits(&self) -> LookupLimits {
        self.lookups.limits
    }

    /// Resolves `name` for `tenant` within one of its lookup slots, by
    /// `deadline` and within the lookup timeout. Nothing of it outlives the
    /// returned future: dropping it releases the slots and closes the
    /// lookup's sockets.
    pub(crate) async fn lookup(&self, tenant: &str, name: &str, deadline: Instant) -> Result<Vec<IpAddr>, LookupError> {
        let limits = self.lookups.limits;
        let tenant_slots = self.lookups.tenants.tenant(tenant);
        let Ok(Ok(_tenant_slot)) = tokio::time::timeout_at(deadline, tenant_slots.acquire_owned()).await else {
            return Err(LookupError::Busy { limit: limits.per_tenant, per_tenant: true });
        };
        let Ok(Ok(_slot)) = tokio::time::timeout_at(deadline, self.lookups.total.acquire()).await else {
            return Err(LookupError::Busy { limit: limits.total, per_tenant: false });
        };
        let own_limit = Instant::now() + self.lookup_timeout;
        match tokio::time::timeout_at(deadline.min(own_limit), self.resolver.resolve(name)).await {
            Err(_) if own_limit < deadline => Err(LookupError::TimedOut { after: self.lookup_timeout }),
            Err(_) => Err(LookupError::Deadline),
            Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut => Err(LookupError::TimedOut { after: self.lookup_timeout }),
            Ok(Err(e)) => Err(LookupError::Failed(e)),
            Ok(Ok(ips)) => Ok(ips),
        }
    }
}

/// Builds a [`Network`] with other parts than the system's.
#[derive(Default)]
pub struct NetworkBuilder {
    resolver: Option<Arc<dyn Resolve>>,
    dns: Option<DnsConfig>,
    lookup_timeout: Option<Duration>,
    lookup_limits: LookupLimits,
    outbound_connections_per_tenant: Option<u32>,
    outbound_connections_of_tenants: HashMap<String, u32>,
    dialer: Option<Arc<dyn Dial>>,
    extra_roots: Vec<CertificateDer<'static>>,
}

impl NetworkBuilder {
    /// Resolves names with `resolver` instead of the real resolver.
    pub fn resolver(mut self, resolver: Arc<dyn Resolve>) -> Self {
        self.resolver = Some(resolver);
        self
    }

    /// The real resolver, configured with `dns` instead of the system's
    /// files; for example [`DnsConfig::name_servers`] to ask a name server
    /// on loopback. The config file cannot reach it.
    pub fn dns(mut self, dns: DnsConfig) -> Self {
        self.dns = Some(dns);
        self
    }

    /// The longest one lookup may take (by default the resolver's query
    /// timeout times its attempts, or 10 s for a resolver set with
    /// [`NetworkBuilder::resolver`]).
    pub fn lookup_timeout(mut self, timeout: Duration) -> Self {
        self.lookup_timeout = Some(timeout);
        self
    }

    pub fn lookup_limits(mut self, limits: LookupLimits) -> Self {
        self.lookup_limits = limits;
        self
    }

    /// The most outbound connections one tenant holds open at once, over
    /// all its workers and requests (default
    /// [`DEFAULT_OUTBOUND_CONNECTIONS_PER_TENANT`]).
    pub fn outbound_connections_per_tenant(mut self, limit: u32) -> Self {
        self.outbound_connections_per_tenant = Some(limit);
        self
    }

    /// The most outbound connections `tenant` holds open at once, in place
    /// of [`NetworkBuilder::outbound_connections_per_tenant`].
    pub fn outbound_connections_of_tenant(mut self, tenant: &str, limit: u32) -> Self {
        self.outbound_connections_of_tenants.insert(tenant.to_string(), limit);
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
        let (resolver, default_timeout): (Arc<dyn Resolve>, Duration) = match (self.resolver, self.dns) {
            (Some(resolver), _) => (resolver, Duration::from_secs(10)),
            (None, dns) => {
                let dns = match dns {
                    Some(dns) => dns,
                    None => DnsConfig::system()?,
                };
                tracing::info!(
                    name_servers = ?dns.name_servers,
                    hosts = dns.hosts.names.len(),
                    lookup_timeout_ms = dns.lookup_timeout().as_millis() as u64,
                    lookups_per_tenant = self.lookup_limits.per_tenant,
                    "outbound name lookups"
                );
                (Arc::new(DnsResolver::new(&dns)?), dns.lookup_timeout())
            }
        };
        let limits = self.lookup_limits;
        if limits.per_tenant == 0 || limits.total == 0 {
            return Err(NetworkError::Dns("lookup limits must be at least 1".into()));
        }
        let per_tenant = self.outbound_connections_per_tenant.unwrap_or(DEFAULT_OUTBOUND_CONNECTIONS_PER_TENANT);
        if per_tenant == 0 || self.outbound_connections_of_tenants.values().any(|&limit| limit == 0) {
            return Err(NetworkError::Dns("the outbound connection limit must be at least 1".into()));
        }
        Ok(Network {
            resolver,
            lookup_timeout: self.lookup_timeout.unwrap_or(default_timeout),
            lookups: LookupSlots {
                limits,
                total: Semaphore::new(limits.total as usize),
                tenants: TenantSemaphores::new(limits.per_tenant),
            },
            connections: ConnectionSlots { tenants: TenantSemaphores::with_overrides(per_tenant, self.outbound_connections_of_tenants) },
            dialer: self.dialer.unwrap_or_else(|| Arc::new(TcpDialer)),
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            denied_total: AtomicU64::new(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    #[test]
    fn the_hosts_file_answers_every_address_of_a_name_from_every_line() {
        let hosts = HostsFile::parse(
            "# comment\n127.0.0.1\tlocalhost\n::1 localhost ip6-localhost # trailing\n\n192.0.2.7 API.Example.COM api \nfe80::1%eth0 scoped\nnot-an-ip name\n192.0.2.8 api.example.com.\n",
        );
        assert_eq!(hosts.get("localhost"), Some(ips(&["127.0.0.1", "::1"]).as_slice()));
        assert_eq!(hosts.get("ip6-localhost"), Some(ips(&["::1"]).as_slice()));
        assert_eq!(hosts.get("api.example.com"), Some(ips(&["192.0.2.7", "192.0.2.8"]).as_slice()));
        assert_eq!(hosts.get("api"), Some(ips(&["192.0.2.7"]).as_slice()));
        assert_eq!((hosts.get("scoped"), hosts.get("name"), hosts.get("comment")), (None, None, None));
    }

    #[test]
    fn resolv_conf_gives_name_servers_and_timeouts_but_no_search_list() {
        let config = DnsConfig::parse(
            "search corp.example svc.cluster.local\noptions ndots:5 timeout:3 attempts:4\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n",
            "",
        )
        .unwrap();
        assert_eq!(config.name_servers, vec!["192.0.2.53:53".parse().unwrap(), "[2001:db8::53]:53".parse().unwrap()]);
        assert_eq!((config.query_timeout, config.attempts), (Duration::from_secs(3), 4));
        assert_eq!(config.lookup_timeout(), Duration::from_secs(12));
        // Absurd values are held within the bounds.
        let config = DnsConfig::parse("nameserver 192.0.2.53\noptions timeout:30 attempts:5\n", "").unwrap();
        assert_eq!(config.lookup_timeout(), MAX_LOOKUP_TIMEOUT);
    }

    #[test]
    fn without_a_name_server_the_local_one_is_asked_as_the_c_library_does() {
        let config = DnsConfig::parse("# empty\n", "127.0.0.1 localhost\n").unwrap();
        assert_eq!(config.name_servers, vec!["127.0.0.1:53".parse().unwrap()]);
        assert_eq!(config.hosts.get("localhost"), Some(ips(&["127.0.0.1"]).as_slice()));
        let missing = DnsConfig::from_files(Path::new("/nonexistent/resolv.conf"), Path::new("/nonexistent/hosts")).unwrap();
        assert_eq!(missing.name_servers, vec!["127.0.0.1:53".parse().unwrap()]);
    }

    /// A name in the host table is answered without a packet: the name
    /// server here is a port nothing listens on, so asking it would fail.
    #[tokio::test]
    async fn names_in_the_host_table_never_reach_a_name_server() {
        let mut config = DnsConfig::name_servers(vec!["127.0.0.1:9".parse().unwrap()]);
        config.hosts = HostsFile::parse("127.0.0.1 localhost\n203.0.113.5 only-v4.test\n");
        let resolver = DnsResolver::new(&config).unwrap();
        assert_eq!(resolver.resolve("localhost").await.unwrap(), ips(&["127.0.0.1"]));
        assert_eq!(resolver.resolve("only-v4.test").await.unwrap(), ips(&["203.0.113.5"]), "no AAAA query for a listed name");
    }

    /// The machine's own files: `localhost` resolves without a packet,
    /// from /etc/hosts (or, where that lacks it, from the resolver's own
    /// RFC 6761 answer).
    #[tokio::test]
    async fn the_system_configuration_resolves_localhost() {
        let config = DnsConfig::system().unwrap();
        assert!(!config.name_servers.is_empty());
        let ips = DnsResolver::new(&config).unwrap().resolve("localhost").await.unwrap();
        assert!(ips.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{ips:?}");
    }

    /// Real time, short durations: a resolver that never answers, 2 slots
    /// per tenant, 3 for the process, a 400 ms lookup timeout.
    #[tokio::test]
    async fn a_tenant_waits_only_for_its_own_lookups() {
        struct Hang;
        impl Resolve for Hang {
            fn resolve<'a>(&'a self, _: &'a str) -> BoxFuture<'a, io::Result<Vec<IpAddr>>> {
                Box::pin(std::future::pending())
            }
        }
        let network = Arc::new(
            Network::builder()
                .resolver(Arc::new(Hang))
                .lookup_limits(LookupLimits { per_tenant: 2, total: 3 })
                .lookup_timeout(Duration::from_millis(400))
                .build()
                .unwrap(),
        );
        let later = || Instant::now() + Duration::from_secs(10);
        let soon = || Instant::now() + Duration::from_millis(100);
        let hold = |tenant: &'static str| {
            let (network, deadline) = (network.clone(), later());
            tokio::spawn(async move { network.lookup(tenant, "x.test", deadline).await })
        };
        let held = [hold("a"), hold("a")];
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A third lookup of tenant a waits for one of a's; at its deadline it is refused as busy.
        assert!(matches!(network.lookup("a", "x.test", soon()).await, Err(LookupError::Busy { limit: 2, per_tenant: true })));
        // Tenant b takes the process's last slot; tenant c then waits for the process.
        let b = hold("b");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(network.lookup("c", "x.test", soon()).await, Err(LookupError::Busy { limit: 3, per_tenant: false })));
        // Each held lookup stops at the resolver's timeout, and the slots come back.
        for h in held.into_iter().chain([b]) {
            assert!(matches!(h.await.unwrap(), Err(LookupError::TimedOut { .. })));
        }
        // A deadline before the resolver's timeout is the subrequest's.
        assert!(matches!(network.lookup("a", "x.test", soon()).await, Err(LookupError::Deadline)));
        assert!(
            matches!(network.lookup("c", "x.test", later()).await, Err(LookupError::TimedOut { after }) if after == Duration::from_millis(400))
        );
    }
}
