//! Name lookups for outbound requests, through the real resolver, against
//! name servers on loopback: one that answers from a table, and a black hole
//! that reads every query and never answers (over UDP and TCP alike), which
//! is what a tenant controlling the DNS of an allowed wildcard name can make
//! its zone do.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cordon_egress::{DnsConfig, LookupLimits, Network};
use tokio::net::{TcpListener, UdpSocket};

use crate::harness::{Options, TestServer, guest, log_events, percentile, request, rss_bytes, start_with};

// ---------------------------------------------------------------------------
// Name servers
// ---------------------------------------------------------------------------

/// A UDP socket and a TCP listener on the same loopback port.
async fn bind_udp_and_tcp() -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
            return (udp, tcp);
        }
    }
    panic!("no loopback port free for both UDP and TCP");
}

/// Reads every query and never answers; TCP connections are accepted and
/// held open in silence. With
/// `truncate`, each UDP query gets an empty answer with the truncation bit
/// set, which sends the resolver to TCP, where nothing answers either.
struct BlackHole {
    addr: SocketAddr,
    queries: Arc<AtomicU64>,
    tcp_accepted: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl BlackHole {
    async fn start() -> BlackHole {
        BlackHole::start_with(false).await
    }

    async fn start_with(truncate: bool) -> BlackHole {
        let (udp, tcp) = bind_udp_and_tcp().await;
        let addr = udp.local_addr().unwrap();
        let queries = Arc::new(AtomicU64::new(0));
        let count = queries.clone();
        let udp_task = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                count.fetch_add(1, Ordering::Relaxed);
                if truncate && n >= 12 {
                    let mut reply = buf[..n].to_vec();
                    // QR and TC set, no answers, no additional records.
                    reply[2] = 0x80 | 0x02 | (reply[2] & 0x01);
                    reply[3] = 0x80;
                    reply[6..12].fill(0);
                    let _ = udp.send_to(&reply, peer).await;
                }
            }
        });
        let tcp_accepted = Arc::new(AtomicU64::new(0));
        let accepted = tcp_accepted.clone();
        let tcp_task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = tcp.accept().await {
                accepted.fetch_add(1, Ordering::Relaxed);
                held.push(stream);
            }
        });
        BlackHole { addr, queries, tcp_accepted, tasks: vec![udp_task, tcp_task] }
    }

    fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

/// Answers A and AAAA queries over UDP from a table; any other name is
/// NXDOMAIN. Records which names it was asked.
struct Responder {
    addr: SocketAddr,
    asked: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Responder {
    async fn start(table: &[(&str, &[&str])]) -> Responder {
        let table: HashMap<String, Vec<IpAddr>> =
            table.iter().map(|(name, ips)| (name.to_string(), ips.iter().map(|ip| ip.parse().unwrap()).collect())).collect();
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let asked: Arc<Mutex<Vec<String>>> = Arc::default();
        let log = asked.clone();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                if let Some((name, reply)) = answer(&buf[..n], &table) {
                    log.lock().unwrap().push(name);
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        });
        Responder { addr, asked, task }
    }

    fn asked(&self, name: &str) -> usize {
        self.asked.lock().unwrap().iter().filter(|n| *n == name).count()
    }
}

/// The reply to one DNS query (RFC 1035 wire format): the question echoed,
/// and one record per address of the asked family.
fn answer(query: &[u8], table: &HashMap<String, Vec<IpAddr>>) -> Option<(String, Vec<u8>)> {
    let mut labels = Vec::new();
    let mut at = 12;
    loop {
        let len = *query.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question = &query[12..at + 4];
    let name = labels.join(".");
    let found = table.get(&name);
    let ips: Vec<IpAddr> = found
        .map(|ips| ips.iter().copied().filter(|ip| matches!((ip, qtype), (IpAddr::V4(_), 1) | (IpAddr::V6(_), 28))).collect())
        .unwrap_or_default();
    let rcode: u8 = if found.is_some() { 0 } else { 3 };
    let mut reply = Vec::new();
    reply.extend_from_slice(&query[0..2]);
    reply.extend_from_slice(&[0x81, 0x80 | rcode]);
    reply.extend_from_slice(&[0, 1]);
    reply.extend_from_slice(&(ips.len() as u16).to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(question);
    for ip in ips {
        reply.extend_from_slice(&[0xc0, 12]);
        reply.extend_from_slice(&qtype.to_be_bytes());
        reply.extend_from_slice(&[0, 1, 0, 0, 0, 60]);
        match ip {
            IpAddr::V4(v4) => {
                reply.extend_from_slice(&[0, 4]);
                reply.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                reply.extend_from_slice(&[0, 16]);
                reply.extend_from_slice(&v6.octets());
            }
        }
    }
    Some((name, reply))
}

// ---------------------------------------------------------------------------
// Workers and measurements
// ---------------------------------------------------------------------------

/// A `hostile` worker of `tenant`, routed at `NAME.localhost`.
fn fetcher(name: &str, tenant: &str, allowed: &[String], limits: &str) -> String {
    let list = allowed.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ");
    format!(
        "\n[[worker]]\nname = \"{name}\"\ntenant = \"{tenant}\"\ncomponent = \"{}\"\nroutes = [\"{name}.localhost/\"]\nallowed_outbound = [{list}]\n\n[worker.limits]\nmemory_mb = 16\n{limits}\n",
        guest("hostile").display()
    )
}

/// The victim: a `bindings` worker with a key-value store and an SQL
/// database, and a `hello` worker, both of tenant `victim`.
fn victim() -> String {
    format!(
        r#"
[[worker]]
name = "victim"
tenant = "victim"
component = "{bindings}"
routes = ["victim.localhost/"]

[[worker.kv]]
binding = "CACHE"
namespace = "sessions"

[[worker.sql]]
binding = "DB"
database = "notes"

[[worker.postgres]]
binding = "PG"
database = "victim"

[worker.vars]
GREETING = "hello"

[worker.limits]
cpu_ms = 1000

[[database]]
name = "victim"
tenant = "victim"
origin = "postgres://app@127.0.0.1:1/app"

[[worker]]
name = "hello"
tenant = "victim"
component = "{hello}"
routes = ["hello.localhost/"]
"#,
        bindings = guest("bindings").display(),
        hello = guest("hello").display(),
    )
}

async fn fetch(s: &TestServer, worker: &str, url: &str) -> String {
    s.get(&format!("{worker}.localhost"), &format!("/fetch?url={url}")).await.text()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// One round of the victim's work: a key-value write and read, an SQL
/// write and read, and a plain request; each must succeed.
async fn victim_round(s: &TestServer, round: usize, latencies: &mut Vec<Duration>) {
    let kv = |op: String| async move {
        let started = Instant::now();
        let r = s.get("victim.localhost", &format!("/kv?binding=CACHE&{op}")).await;
        (started.elapsed(), r.status, r.text())
    };
    let (took, status, text) = kv(format!("op=set&key=k{round}&value=v{round}")).await;
    assert_eq!((status, text.as_str()), (200, "ok"));
    latencies.push(took);
    let (took, status, text) = kv(format!("op=get&key=k{round}")).await;
    assert_eq!((status, text), (200, format!("v{round}")));
    latencies.push(took);
    for body in [
        serde_json::json!({"sql": "INSERT INTO t (v) VALUES (?)", "params": [round as i64]}),
        serde_json::json!({"sql": "SELECT count(*) FROM t"}),
    ] {
        let started = Instant::now();
        let r = request(s.addr, "POST", "victim.localhost", "/sql?binding=DB", &[], Some(body.to_string().into_bytes())).await;
        latencies.push(started.elapsed());
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let started = Instant::now();
    let r = s.get("hello.localhost", "/").await;
    latencies.push(started.elapsed());
    assert_eq!(r.status, 200);
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// The real resolver: names from a loopback name server, from the host
/// table (which no name server is asked about), NXDOMAIN, and the forbidden
/// ranges by name, the local-use NAT64 prefix among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_resolver_answers_from_a_name_server_and_the_host_table() {
    let origin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let p = origin.local_addr().unwrap().port();
    let serve = tokio::spawn(async move {
        while let Ok((stream, _)) = origin.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::from("via dns"))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
            });
        }
    });
    let ns = Responder::start(&[
        ("api.dns.test", &["127.0.0.1"]),
        ("nat64.dns.test", &["64:ff9b:1::7f00:1"]),
        ("nat64-public.dns.test", &["64:ff9b:1::808:808"]),
        ("sixtofour.dns.test", &["2002:a9fe:a9fe::1"]),
    ])
    .await;
    let mut dns =
        DnsConfig::parse("nameserver 192.0.2.1\nsearch dns.test\noptions ndots:5\n", "127.0.0.1 localhost\n127.0.0.1 hosts.test\n")
            .unwrap();
    dns.name_servers = vec![ns.addr];
    let network = Arc::new(Network::builder().dns(dns).build().unwrap());
    // The names resolve to loopback, so the literal entry has to open it.
    let allowed =
        [format!("http://*.dns.test:{p}"), "http://*.dns.test".into(), format!("http://hosts.test:{p}"), format!("http://127.0.0.1:{p}")];
    let s = start_with(&fetcher("dns", "t-dns", &allowed, ""), Options { network: Some(network), ..Default::default() }).await;

    assert_eq!(fetch(&s, "dns", &format!("http://api.dns.test:{p}/")).await, "via dns");
    assert!(ns.asked("api.dns.test") >= 1, "the name server was asked");
    assert_eq!(fetch(&s, "dns", &format!("http://hosts.test:{p}/")).await, "via dns");
    assert_eq!(ns.asked("hosts.test") + ns.asked("hosts.test.dns.test"), 0, "a name in the host table asks no name server");
    let missing = fetch(&s, "dns", "http://missing.dns.test/").await;
    assert!(missing.starts_with("fetch error: ErrorCode::DnsError(") && missing.contains("NXDOMAIN"), "{missing}");
    assert_eq!(ns.asked("missing.dns.test.dns.test"), 0, "no search domain is appended, whatever ndots says");

    for name in ["nat64.dns.test", "nat64-public.dns.test", "sixtofour.dns.test"] {
        assert_eq!(fetch(&s, "dns", &format!("http://{name}/")).await, "fetch error: ErrorCode::DestinationIpProhibited", "{name}");
    }
    let events = log_events("egress_denied");
    let nat64 = events.iter().find(|e| e["destination"] == "http://nat64-public.dns.test:80").expect("logged");
    assert!(nat64["reason"].as_str().unwrap().contains("a local-use NAT64 address"), "{nat64}");
    serve.abort();
}

/// The local-use NAT64 prefix (and Teredo, and 6to4 of a forbidden IPv4)
/// by literal, with `*` and the escape hatch on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_use_nat64_addresses_are_refused_by_literal() {
    let ns = Responder::start(&[]).await;
    let network = Arc::new(Network::builder().dns(DnsConfig::name_servers(vec![ns.addr])).build().unwrap());
    let any = format!(
        "\n[[worker]]\nname = \"any\"\ntenant = \"t-any\"\ncomponent = \"{}\"\nroutes = [\"any.localhost/\"]\nallowed_outbound = [\"*\"]\nallow_any_outbound_dangerously = true\n",
        guest("hostile").display()
    );
    let s = start_with(&any, Options { network: Some(network), ..Default::default() }).await;
    for ip in
        ["64:ff9b:1::7f00:1", "64:ff9b:1::808:808", "64:ff9b:1:ffff::1", "64:ff9b:1:7f00:1::", "2001::1", "2002:7f00:1::1", "2002:a00:1::"]
    {
        assert_eq!(fetch(&s, "any", &format!("http://[{ip}]:8080/")).await, "fetch error: ErrorCode::DestinationIpProhibited", "{ip}");
    }
    assert_eq!(ns.asked.lock().unwrap().len(), 0);
}

/// A tenant at its cap of lookups in flight waits for one of its own
/// lookups (over all its workers), never for another tenant's; and a lookup
/// gives up at the resolver's own timeout when it is shorter than the
/// subrequest's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_lookup_cap_waits_for_its_own_lookups_only() {
    let hole = BlackHole::start().await;
    let network = Network::builder()
        .dns(DnsConfig::name_servers(vec![hole.addr]))
        .lookup_timeout(Duration::from_millis(1500))
        .lookup_limits(LookupLimits { per_tenant: 2, total: 64 })
        .build()
        .unwrap();
    let silent = ["http://*.silent.test".to_string()];
    let workers = fetcher("holder", "t-capped", &silent, "subrequest_timeout_ms = 5000")
        + &fetcher("capped", "t-capped", &silent, "subrequest_timeout_ms = 500")
        + &fetcher("other", "t-other", &silent, "subrequest_timeout_ms = 5000");
    let s = Arc::new(start_with(&workers, Options { network: Some(Arc::new(network)), ..Default::default() }).await);
    let spawn_fetch = |worker: &'static str, url: String| {
        let s = s.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let text = fetch(&s, worker, &url).await;
            (started.elapsed(), text)
        })
    };

    // Two lookups of tenant t-capped hold both its slots until the resolver's timeout.
    let holders: Vec<_> = (0..2).map(|i| spawn_fetch("holder", format!("http://h{i}.silent.test/"))).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Another worker of the same tenant waits for a slot until its 500 ms deadline.
    let capped: Vec<_> = (0..2).map(|i| spawn_fetch("capped", format!("http://c{i}.silent.test/"))).collect();
    // Another tenant's lookup starts at once, and runs to the resolver's timeout.
    let (other_took, other) = spawn_fetch("other", "http://o.silent.test/".into()).await.unwrap();
    assert_eq!(other, "fetch error: ErrorCode::DnsTimeout");
    assert!(other_took >= Duration::from_millis(1400) && other_took < Duration::from_secs(3), "{other_took:?}");

    for c in capped {
        let (took, text) = c.await.unwrap();
        assert!(text.starts_with("fetch error: ErrorCode::InternalError(Some(\"name lookup for c"), "{text}");
        assert!(text.contains("2 lookups of this tenant were already in flight") && text.contains("at most 2 at once"), "{text}");
        assert!(took < Duration::from_millis(1400), "refused at its own deadline, before a slot came free: {took:?}");
    }
    for h in holders {
        let (took, text) = h.await.unwrap();
        assert_eq!(text, "fetch error: ErrorCode::DnsTimeout");
        assert!(took >= Duration::from_millis(1400) && took < Duration::from_secs(3), "{took:?}");
    }
    assert!(hole.queries() >= 3, "real queries reached the name server: {}", hole.queries());

    let events: Vec<_> = log_events("egress_limit").into_iter().filter(|e| e["tenant"] == "t-other").collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0]["reason"].as_str().unwrap().contains("no name server answered for o.silent.test within 1500 ms"), "{events:?}");
    assert_eq!(events[0]["target"], "cordon::security");
    let capped_event = log_events("egress_limit").into_iter().find(|e| e["worker"] == "capped").expect("the refusal is logged");
    assert!(capped_event["reason"].as_str().unwrap().contains("at most 2 at once"), "{capped_event}");
}

/// A name server that truncates every answer, to send the resolver over
/// to TCP, where it would accept connections and say nothing: lookups are
/// UDP only, so each fails at once with `DNS-error` and no TCP connection
/// is ever opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncating_name_server_cannot_lead_lookups_to_tcp() {
    let hole = BlackHole::start_with(true).await;
    let network = Arc::new(Network::builder().dns(DnsConfig::name_servers(vec![hole.addr])).build().unwrap());
    // 24 lookups at once from one tenant: above the default quota of 16
    // instances in flight.
    let workers = fetcher("tcp", "t-tcp", &["http://*.silent.test".into()], "subrequest_timeout_ms = 5000")
        + "[[tenant]]\nname = \"t-tcp\"\nmax_instances = 32\n";
    let s = Arc::new(start_with(&workers, Options { network: Some(network), ..Default::default() }).await);
    let fetches: Vec<_> = (0..24)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                (fetch(&s, "tcp", &format!("http://t{i}.silent.test/")).await, started.elapsed())
            })
        })
        .collect();
    for f in fetches {
        let (text, took) = f.await.unwrap();
        assert!(text.starts_with("fetch error: ErrorCode::DnsError("), "{text}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
    assert!(hole.queries() >= 24, "every lookup asked over UDP: {}", hole.queries());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(hole.tcp_accepted.load(Ordering::Relaxed), 0, "no lookup went over to TCP");
}

/// `cordon serve`'s way in: the `[server]` lookup limits reach the network
/// that `Runtime::start` builds with the system's name servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lookup_limits_come_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        format!("[server]\ndata_dir = \"{}\"\nmax_name_lookups = 40\nmax_name_lookups_per_tenant = 3\n", dir.path().join("data").display());
    let path = dir.path().join("cordon.toml");
    std::fs::write(&path, text).unwrap();
    let config = cordon_config::Config::load(&path).unwrap();
    let runtime = tokio::task::spawn_blocking(move || cordon_runtime::Runtime::start(&config)).await.unwrap().unwrap();
    assert_eq!(runtime.network().lookup_limits(), LookupLimits { per_tenant: 3, total: 40 });
}

/// The attack: one tenant's worker sends subrequests to names under its
/// allowed wildcard whose name server never answers, 48 requests at a time
/// for 6 s. Every subrequest fails by its deadline with `DNS-timeout` (or,
/// waiting for one of the tenant's lookup slots, with the lookup limit),
/// while the victim tenant's key-value, SQL and plain requests keep
/// p99 ≤ 200 ms and no call over 1 s, and the process's resident memory grows by less than 256 MiB.
/// With lookups on the shared blocking pool, each timed-out lookup kept a
/// blocking thread for the C library's 10 s: at 48 at a time and 300 ms each,
/// the pool's 512 threads are all held after about 3 s, and from then on
/// the victim's key-value and SQL calls queue behind them for seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_name_server_costs_other_tenants_nothing() {
    const ATTACKERS: usize = 48;
    const ATTACK: Duration = Duration::from_secs(6);
    let hole = BlackHole::start().await;
    let network = Arc::new(Network::builder().dns(DnsConfig::name_servers(vec![hole.addr])).build().unwrap());
    let workers = fetcher("attacker", "t-attacker", &["http://*.silent.test".into()], "subrequest_timeout_ms = 300")
        + &victim()
        + "[[tenant]]\nname = \"t-attacker\"\nmax_instances = 127\n";
    let s = Arc::new(start_with(&workers, Options { network: Some(network), max_instances: Some(128), ..Default::default() }).await);
    let r = request(
        s.addr,
        "POST",
        "victim.localhost",
        "/sql?binding=DB",
        &[],
        Some(serde_json::json!({"sql": "CREATE TABLE t (v INTEGER)"}).to_string().into_bytes()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut quiet = Vec::new();
    for round in 0..10 {
        victim_round(&s, round, &mut quiet).await;
    }
    let (rss_before, fds_before) = (rss_bytes() / 1024, open_fds());

    let stop = Arc::new(AtomicBool::new(false));
    let attackers: Vec<_> = (0..ATTACKERS)
        .map(|a| {
            let (s, stop) = (s.clone(), stop.clone());
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                let mut k = 0;
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let text = fetch(&s, "attacker", &format!("http://a{a}-{k}.silent.test/")).await;
                    outcomes.push((started.elapsed(), text));
                    k += 1;
                }
                outcomes
            })
        })
        .collect();
    let attack_started = Instant::now();
    let mut latencies = Vec::new();
    let mut rss_peak = rss_before;
    let mut round = 10;
    while attack_started.elapsed() < ATTACK {
        victim_round(&s, round, &mut latencies).await;
        rss_peak = rss_peak.max(rss_bytes() / 1024);
        round += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for a in attackers {
        outcomes.extend(a.await.unwrap());
    }

    latencies.sort();
    quiet.sort();
    let (p50, p99, max) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99), *latencies.last().unwrap());
    let growth_mib = rss_peak.saturating_sub(rss_before) / 1024;
    eprintln!(
        "victim calls: {} before the attack (p50 {:?}, p99 {:?}), {} during it: p50 {p50:?}, p99 {p99:?}, max {max:?}; attacker subrequests: {}; queries the name server got: {}; RSS {} MiB before, peak +{growth_mib} MiB",
        quiet.len(),
        percentile(&quiet, 0.5),
        percentile(&quiet, 0.99),
        latencies.len(),
        outcomes.len(),
        hole.queries(),
        rss_before / 1024,
    );
    assert!(p99 <= Duration::from_millis(200), "the victim's p99 was {p99:?} during the attack");
    assert!(max <= Duration::from_secs(1), "a victim call took {max:?} during the attack");
    assert!(growth_mib < 256, "resident memory grew by {growth_mib} MiB");

    assert!(outcomes.len() >= ATTACKERS * 5, "the attack ran: {} subrequests", outcomes.len());
    for (took, text) in &outcomes {
        let dns_timeout = text == "fetch error: ErrorCode::DnsTimeout";
        let at_cap = text.starts_with("fetch error: ErrorCode::InternalError(Some(\"name lookup for")
            && text.contains("16 lookups of this tenant were already in flight");
        assert!(dns_timeout || at_cap, "{text}");
        assert!(*took < Duration::from_secs(3), "an attacking request took {took:?}: {text}");
    }
    assert!(outcomes.iter().any(|(_, t)| t == "fetch error: ErrorCode::DnsTimeout"));
    assert!(hole.queries() >= 16, "the lookups reached the silent name server: {}", hole.queries());

    // Nothing of the attack outlives it: the lookups' sockets are closed, and
    // the tenant's lookup slots are free again, so 16 new lookups all start.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds_after = open_fds();
    assert!(fds_after <= fds_before + 16, "open descriptors: {fds_before} before the attack, {fds_after} after it");
    let again: Vec<_> = (0..16)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { fetch(&s, "attacker", &format!("http://again{i}.silent.test/")).await })
        })
        .collect();
    for a in again {
        assert_eq!(a.await.unwrap(), "fetch error: ErrorCode::DnsTimeout");
    }
    let events = log_events("egress_limit");
    let event = events.iter().find(|e| e["tenant"] == "t-attacker").expect("the attacker's timeouts are logged");
    assert_eq!(event["target"], "cordon::security");
}
