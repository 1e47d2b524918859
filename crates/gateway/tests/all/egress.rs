//! Egress control, attacked through a real worker: origins on loopback
//! ports, a resolver that answers what each test needs (including a
//! rebinding one), and a dialer that records every address a connection is
//! attempted to and never leaves the machine.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cordon_egress::{BoxFuture, Dial, Network, Resolve, TcpDialer};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

use crate::harness::{Options, guest, log_events, request, start_with, wait_for_log};

// ---------------------------------------------------------------------------
// Origins
// ---------------------------------------------------------------------------

/// What an origin saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    host: Option<String>,
    chunked: bool,
}

/// An HTTP (or HTTPS) server on a loopback port that counts connections.
struct Origin {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type OriginBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

impl Origin {
    async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (count, log) = (connections.clone(), seen.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                count.fetch_add(1, Ordering::SeqCst);
                let log = log.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| serve(req, log.clone()));
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                        }
                        Some(config) => {
                            let Ok(stream) = tokio_rustls::TlsAcceptor::from(config).accept(stream).await else { return };
                            let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        Origin { addr, connections, seen, task }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

fn param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| v)
}

/// The origin's routes: `/echo` streams the body back, `/redirect` points at
/// the metadata service, `/big?bytes=N[&declared=1]`, `/slow?ms=N`, and
/// anything else says hello.
async fn serve(req: http::Request<Incoming>, seen: Arc<Mutex<Vec<Seen>>>) -> Result<http::Response<OriginBody>, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let host = req.headers().get("host").and_then(|v| v.to_str().ok()).map(str::to_string);
    let chunked = req.headers().get("transfer-encoding").is_some_and(|v| v == "chunked");
    seen.lock().unwrap().push(Seen { path: path.clone(), host: host.clone(), chunked });
    let full = |text: &str| Full::new(Bytes::from(text.to_string())).map_err(|never| match never {}).boxed();
    let response = match path.as_str() {
        "/echo" => {
            http::Response::builder().header("x-origin-host", host.unwrap_or_default()).body(req.into_body().map_err(Into::into).boxed())
        }
        "/redirect" => http::Response::builder().status(302).header("location", "http://169.254.169.254/latest/meta-data/").body(full("")),
        "/big" => {
            let bytes: usize = param(&query, "bytes").and_then(|b| b.parse().ok()).unwrap_or(1024);
            if param(&query, "declared").is_some() {
                http::Response::builder().body(full(&"z".repeat(bytes)))
            } else {
                http::Response::builder().body(Chunks(bytes).boxed())
            }
        }
        "/slow" => {
            let ms: u64 = param(&query, "ms").and_then(|b| b.parse().ok()).unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            http::Response::builder().body(full("slow"))
        }
        _ => http::Response::builder().body(full("hello from origin")),
    };
    Ok(response.unwrap())
}

/// `n` bytes of `z` in 1 KiB frames, with no declared length (chunked).
struct Chunks(usize);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.0 == 0 {
            return Poll::Ready(None);
        }
        let n = self.0.min(1024);
        self.0 -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'z'; n])))))
    }
}

/// A throwaway CA and a server certificate it signed for `names`.
struct TestPki {
    ca: CertificateDer<'static>,
    server: Arc<rustls::ServerConfig>,
}

fn test_pki(names: &[&str]) -> TestPki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "cordon test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone(), ca.der().clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
        .unwrap();
    TestPki { ca: ca.der().clone(), server: Arc::new(server) }
}

// ---------------------------------------------------------------------------
// Resolver and dialer
// ---------------------------------------------------------------------------

/// Answers from a table. A name with several answers gives them in turn (the
/// last one repeats), which is how a rebinding DNS server behaves.
#[derive(Default)]
struct TestResolver {
    answers: Mutex<HashMap<String, VecDeque<Vec<IpAddr>>>>,
    lookups: Mutex<Vec<String>>,
}

impl TestResolver {
    fn answer(self: &Arc<Self>, name: &str, answers: &[&[&str]]) -> Arc<Self> {
        let parsed = answers.iter().map(|a| a.iter().map(|ip| ip.parse().unwrap()).collect()).collect();
        self.answers.lock().unwrap().insert(name.to_string(), parsed);
        self.clone()
    }

    fn lookups(&self, name: &str) -> usize {
        self.lookups.lock().unwrap().iter().filter(|n| *n == name).count()
    }
}

impl Resolve for TestResolver {
    fn resolve<'a>(&'a self, name: &'a str) -> BoxFuture<'a, std::io::Result<Vec<IpAddr>>> {
        self.lookups.lock().unwrap().push(name.to_string());
        let mut answers = self.answers.lock().unwrap();
        let answer = answers.get_mut(name).and_then(|q| if q.len() > 1 { q.pop_front() } else { q.front().cloned() });
        Box::pin(async move { answer.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such name")) })
    }
}

/// Records every address dialed; connects only to loopback, so a test that
/// goes wrong can never send a packet elsewhere.
#[derive(Default)]
struct RecordingDialer {
    dialed: Mutex<Vec<SocketAddr>>,
}

impl RecordingDialer {
    fn dialed(&self) -> Vec<SocketAddr> {
        self.dialed.lock().unwrap().clone()
    }
}

impl Dial for RecordingDialer {
    fn dial(&self, addr: SocketAddr) -> BoxFuture<'static, std::io::Result<tokio::net::TcpStream>> {
        self.dialed.lock().unwrap().push(addr);
        if addr.ip().is_loopback() {
            TcpDialer.dial(addr)
        } else {
            Box::pin(async { Err(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "tests stay on loopback")) })
        }
    }
}

struct Net {
    resolver: Arc<TestResolver>,
    dialer: Arc<RecordingDialer>,
}

impl Net {
    fn new() -> Net {
        Net { resolver: Arc::default(), dialer: Arc::default() }
    }

    fn network(&self, ca: Option<&CertificateDer<'static>>) -> Arc<Network> {
        let mut b = Network::builder().resolver(self.resolver.clone()).dialer(self.dialer.clone());
        if let Some(ca) = ca {
            b = b.trust_root(ca.clone());
        }
        Arc::new(b.build().unwrap())
    }
}

// ---------------------------------------------------------------------------
// Workers
// ---------------------------------------------------------------------------

/// A hostile worker routed at `NAME.localhost` with the given grant;
/// `worker_keys` go in `[[worker]]`, `limits` in `[worker.limits]`.
fn worker(name: &str, allowed: &[String], worker_keys: &str, limits: &str) -> String {
    let list = allowed.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ");
    format!(
        "\n[[worker]]\nname = \"{name}\"\ntenant = \"t-{name}\"\ncomponent = \"{}\"\nroutes = [\"{name}.localhost/\"]\nallowed_outbound = [{list}]\n{worker_keys}\n[worker.limits]\n{limits}\n",
        guest("hostile").display()
    )
}

async fn fetch(s: &crate::harness::TestServer, worker: &str, url: &str) -> crate::harness::Response {
    s.get(&format!("{worker}.localhost"), &format!("/fetch?url={url}")).await
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_origin_works_with_bodies_streamed_both_ways() {
    let origin = Origin::start(None).await;
    let net = Net::new();
    let p = origin.port();
    let s = start_with(
        &worker("out", &[format!("http://127.0.0.1:{p}")], "", ""),
        Options { network: Some(net.network(None)), ..Default::default() },
    )
    .await;

    let r = fetch(&s, "out", &format!("http://127.0.0.1:{p}/hello")).await;
    assert_eq!((r.status, r.header("x-fetch-status")), (200, Some("200")), "{}", r.text());
    assert_eq!(r.text(), "hello from origin");

    // 256 KiB out through the worker to the origin's echo, and back.
    let body: Vec<u8> = (0..256 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    let url = format!("/fetch?url=http://127.0.0.1:{p}/echo");
    let r = request(s.addr, "POST", "out.localhost", &url, &[], Some(body.clone())).await;
    assert_eq!(r.header("x-fetch-status"), Some("200"), "{}", r.text());
    assert!(r.body == body, "the echoed body is intact ({} bytes back)", r.body.len());
    let seen = origin.seen.lock().unwrap().clone();
    let echo = seen.iter().find(|s| s.path == "/echo").unwrap();
    assert!(echo.chunked, "the worker's body is streamed out (chunked), not buffered: {echo:?}");
    assert_eq!(echo.host.as_deref(), Some(format!("127.0.0.1:{p}").as_str()), "Host names the checked destination");

    let health = s.health().await;
    let out = health["workers"].as_array().unwrap().iter().find(|w| w["name"] == "out").unwrap();
    assert_eq!(out["stats"]["egress"]["subrequests"], 2, "{out}");
    assert!(out["stats"]["egress"]["bytes_sent"].as_u64().unwrap() >= body.len() as u64, "{out}");
    assert!(out["stats"]["egress"]["bytes_received"].as_u64().unwrap() >= body.len() as u64, "{out}");
    assert_eq!(out["stats"]["egress"]["denied"], 0);
    let logged = wait_for_log("subrequests", |e| e["worker"] == "out" && e["method"] == "POST").await;
    assert_eq!(logged["subrequests"], 1, "{logged}");
    assert!(logged["egress_bytes"].as_u64().unwrap() >= 2 * body.len() as u64, "{logged}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_allowed_outbound_reaches_nothing() {
    let origin = Origin::start(None).await;
    let net = Net::new();
    net.resolver.answer("origin.test", &[&["127.0.0.1"]]);
    let s = start_with(&worker("none", &[], "", ""), Options { network: Some(net.network(None)), ..Default::default() }).await;
    for url in
        [format!("http://127.0.0.1:{}/", origin.port()), format!("http://origin.test:{}/", origin.port()), "https://example.com/".into()]
    {
        let r = fetch(&s, "none", &url).await;
        assert_eq!((r.status, r.text()), (502, "fetch error: ErrorCode::HttpRequestDenied".to_string()), "{url}");
    }
    assert_eq!(origin.connections(), 0);
    assert!(net.dialer.dialed().is_empty() && net.resolver.lookups.lock().unwrap().is_empty(), "denied before any lookup or connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_ports_hosts_and_integer_spellings_are_denied_and_logged() {
    let origin = Origin::start(None).await;
    let other = Origin::start(None).await;
    let net = Net::new();
    net.resolver.answer("elsewhere.test", &[&["127.0.0.1"]]);
    let p = origin.port();
    let s = start_with(
        &worker("deny", &[format!("http://127.0.0.1:{p}"), "https://*.example.com".into()], "", ""),
        Options { network: Some(net.network(None)), ..Default::default() },
    )
    .await;
    let denied = [
        format!("http://127.0.0.1:{}/", other.port()),
        format!("https://127.0.0.1:{p}/"),
        format!("http://elsewhere.test:{p}/"),
        "https://example.com/".to_string(),
        "https://a.b.example.com/".to_string(),
        format!("http://2130706433:{p}/"),
        format!("http://0x7f000001:{p}/"),
        format!("http://0177.0.0.1:{p}/"),
        format!("http://127.1:{p}/"),
        format!("http://user@127.0.0.1:{p}/"),
    ];
    for url in &denied {
        let r = fetch(&s, "deny", url).await;
        assert_eq!(r.text(), "fetch error: ErrorCode::HttpRequestDenied", "{url}");
    }
    assert_eq!((origin.connections(), other.connections()), (0, 0));
    assert!(net.dialer.dialed().is_empty(), "{:?}", net.dialer.dialed());
    assert!(net.resolver.lookups.lock().unwrap().is_empty(), "nothing denied by the list is even looked up");

    // Each refusal is a security event naming tenant, worker, request, target and reason.
    let events: Vec<_> = log_events("egress_denied").into_iter().filter(|e| e["worker"] == "deny").collect();
    assert_eq!(events.len(), denied.len(), "{events:?}");
    let e = events.iter().find(|e| e["destination"] == format!("http://127.0.0.1:{}", other.port())).expect("the other-port attempt");
    assert_eq!((e["target"].as_str(), e["tenant"].as_str(), e["level"].as_str()), (Some("cordon::security"), Some("t-deny"), Some("WARN")));
    assert!(e["request_id"].as_str().is_some_and(|id| id.len() > 8), "{e}");
    assert!(e["reason"].as_str().unwrap().contains("not in this worker's allowed_outbound"), "{e}");
    let integer = events.iter().find(|e| e["destination"] == format!("http://2130706433:{p}")).expect("the integer-host attempt");
    assert!(integer["reason"].as_str().unwrap().contains("integer"), "{integer}");

    let health = s.health().await;
    assert!(health["security"]["egress_denied"].as_u64().unwrap() >= denied.len() as u64, "{health}");
    let w = health["workers"].as_array().unwrap().iter().find(|w| w["name"] == "deny").unwrap();
    assert_eq!(w["stats"]["egress"]["denied"], denied.len() as u64);
}

/// Every forbidden range, by literal IP and through a name, with the `*`
/// escape hatch on: `*` never opens them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_ranges_are_refused_by_literal_and_by_name() {
    let net = Net::new();
    let forbidden = [
        "127.0.0.1",
        "127.8.9.10",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "192.0.2.1",
        "198.51.100.7",
        "203.0.113.9",
        "198.18.0.1",
        "240.0.0.1",
        "::1",
        "::",
        "fc00::1",
        "fd12:3456::1",
        "fe80::1",
        "ff02::1",
        "2001:db8::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:10.0.0.1",
        "::127.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b:1::7f00:1",
        "64:ff9b:1::808:808",
        "2001::1",
        "2002:7f00:1::1",
        "2002:a9fe:a9fe::",
    ];
    for (i, ip) in forbidden.iter().enumerate() {
        net.resolver.answer(&format!("n{i}.test"), &[&[ip]]);
    }
    let s = start_with(
        &worker("any", &["*".into()], "allow_any_outbound_dangerously = true", ""),
        Options { network: Some(net.network(None)), ..Default::default() },
    )
    .await;
    for (i, ip) in forbidden.iter().enumerate() {
        let literal = if ip.contains(':') { format!("[{ip}]") } else { ip.to_string() };
        let r = fetch(&s, "any", &format!("http://{literal}:8080/latest/meta-data/")).await;
        assert_eq!(r.text(), "fetch error: ErrorCode::DestinationIpProhibited", "literal {ip}");
        let r = fetch(&s, "any", &format!("http://n{i}.test/")).await;
        assert_eq!(r.text(), "fetch error: ErrorCode::DestinationIpProhibited", "a name resolving to {ip}");
    }
    // One forbidden address among public ones is enough to refuse.
    net.resolver.answer("mixed.test", &[&["93.184.215.14", "127.0.0.1"]]);
    assert_eq!(fetch(&s, "any", "http://mixed.test/").await.text(), "fetch error: ErrorCode::DestinationIpProhibited");
    assert!(net.dialer.dialed().is_empty(), "no connection was attempted: {:?}", net.dialer.dialed());
    let events = log_events("egress_denied");
    let metadata = events.iter().find(|e| e["worker"] == "any" && e["destination"] == "http://169.254.169.254:8080").expect("logged");
    assert!(metadata["reason"].as_str().unwrap().contains("link-local"), "{metadata}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebinding_name_never_leads_to_loopback() {
    let origin = Origin::start(None).await;
    let net = Net::new();
    // Public first, loopback from then on: the classic rebinding answer.
    net.resolver.answer("rebind.test", &[&["93.184.215.14"], &["127.0.0.1"]]);
    let p = origin.port();
    let s = start_with(
        &worker("rebind", &[format!("http://rebind.test:{p}")], "", ""),
        Options { network: Some(net.network(None)), ..Default::default() },
    )
    .await;

    let first = fetch(&s, "rebind", &format!("http://rebind.test:{p}/")).await;
    assert_eq!(first.text(), "fetch error: ErrorCode::ConnectionRefused", "the public answer is dialed (and refused by the test dialer)");
    for _ in 0..3 {
        let r = fetch(&s, "rebind", &format!("http://rebind.test:{p}/")).await;
        assert_eq!(r.text(), "fetch error: ErrorCode::DestinationIpProhibited");
    }
    let dialed = net.dialer.dialed();
    assert_eq!(dialed, vec![SocketAddr::new("93.184.215.14".parse().unwrap(), p)], "only the checked public address was dialed");
    assert_eq!(origin.connections(), 0, "nothing reached the loopback origin");
    assert_eq!(net.resolver.lookups("rebind.test"), 4, "one lookup per subrequest: the checked answer is the one used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_returned_to_the_worker_not_followed() {
    let origin = Origin::start(None).await;
    let net = Net::new();
    let p = origin.port();
    let s = start_with(
        &worker("redir", &[format!("http://127.0.0.1:{p}")], "", ""),
        Options { network: Some(net.network(None)), ..Default::default() },
    )
    .await;
    let r = fetch(&s, "redir", &format!("http://127.0.0.1:{p}/redirect")).await;
    assert_eq!(r.header("x-fetch-status"), Some("302"), "{}", r.text());
    assert_eq!(r.header("x-fetch-location"), Some("http://169.254.169.254/latest/meta-data/"));
    assert_eq!(origin.connections(), 1);
    // Following it is the worker's own, checked, request.
    let r = fetch(&s, "redir", "http://169.254.169.254/latest/meta-data/").await;
    assert_eq!(r.text(), "fetch error: ErrorCode::HttpRequestDenied");
    assert_eq!(net.dialer.dialed(), vec![origin.addr], "only the allowed origin was ever dialed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subrequest_limit_defaults_to_50_and_names_itself() {
    let origin = Origin::start(None).await;
    let p = origin.port();
    let allowed = [format!("http://127.0.0.1:{p}")];
    let workers = worker("dflt", &allowed, "", "") + &worker("three", &allowed, "", "max_subrequests = 3");
    let s = start_with(&workers, Options { network: Some(Net::new().network(None)), ..Default::default() }).await;

    let r = s.get("dflt.localhost", &format!("/fetch-n?n=60&url=http://127.0.0.1:{p}/hello")).await;
    assert!(
        r.text().starts_with("fetched 50; then error: ErrorCode::InternalError(Some(\"subrequest limit reached: at most 50"),
        "{}",
        r.text()
    );
    assert!(r.text().contains("limits.max_subrequests"), "{}", r.text());
    let r = s.get("three.localhost", &format!("/fetch-n?n=5&url=http://127.0.0.1:{p}/hello")).await;
    assert!(
        r.text().starts_with("fetched 3; then error: ErrorCode::InternalError(Some(\"subrequest limit reached: at most 3"),
        "{}",
        r.text()
    );
    assert_eq!(origin.connections(), 53);
    // The budget is per request: the next one starts afresh.
    let r = s.get("three.localhost", &format!("/fetch-n?n=3&url=http://127.0.0.1:{p}/hello")).await;
    assert_eq!(r.text(), "fetched 3");
    let limit_events = log_events("egress_limit").into_iter().filter(|e| e["worker"] == "dflt").count();
    assert_eq!(limit_events, 1, "the first limit hit of a request is logged once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_size_egress_bytes_and_time_are_limited() {
    let origin = Origin::start(None).await;
    let p = origin.port();
    let allowed = [format!("http://127.0.0.1:{p}")];
    let workers = worker("small", &allowed, "", "max_subrequest_response_bytes = 1000")
        + &worker("budget", &allowed, "", "max_egress_bytes = 10000")
        + &worker("quick", &allowed, "", "subrequest_timeout_ms = 300");
    let s = start_with(&workers, Options { network: Some(Net::new().network(None)), ..Default::default() }).await;

    // Streamed past the limit: cut off, with the limit's error code.
    let r = fetch(&s, "small", &format!("http://127.0.0.1:{p}/big?bytes=5000")).await;
    assert_eq!(r.header("x-fetch-status"), Some("200"));
    assert!(
        r.text().ends_with(
            "[fetch body error: internal error: the response body is larger than 1000 bytes (limits.max_subrequest_response_bytes)]"
        ),
        "{}",
        r.text()
    );
    assert!(r.body.iter().filter(|b| **b == b'z').count() <= 1024, "no more than one frame past the limit reaches the guest");
    // Declared past the limit: refused before the body.
    let r = fetch(&s, "small", &format!("http://127.0.0.1:{p}/big?bytes=5000&declared=1")).await;
    assert_eq!(r.text(), "fetch error: ErrorCode::HttpResponseBodySize(Some(1000))");
    assert_eq!(fetch(&s, "small", &format!("http://127.0.0.1:{p}/big?bytes=900")).await.body.len(), 900);

    let r = s.get("budget.localhost", &format!("/fetch-n?n=5&url=http://127.0.0.1:{p}/big?bytes=4000")).await;
    assert!(
        r.text().starts_with("fetched 3; then error: ErrorCode::InternalError(Some(\"egress byte limit reached: at most 10000"),
        "{}",
        r.text()
    );

    let started = Instant::now();
    let r = fetch(&s, "quick", &format!("http://127.0.0.1:{p}/slow?ms=5000")).await;
    assert_eq!(r.text(), "fetch error: ErrorCode::HttpResponseTimeout");
    assert!(started.elapsed() < Duration::from_secs(3), "the subrequest gave up at its limit: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_verifies_the_certificate_against_the_name() {
    let pki = test_pki(&["secure.test"]);
    let origin = Origin::start(Some(pki.server.clone())).await;
    let p = origin.port();
    let net = Net::new();
    net.resolver.answer("secure.test", &[&["127.0.0.1"]]).answer("wrong.test", &[&["127.0.0.1"]]);
    // The names resolve to loopback, so the literal entry has to open it.
    let allowed = [format!("https://secure.test:{p}"), format!("https://wrong.test:{p}"), format!("https://127.0.0.1:{p}")];
    let s = start_with(&worker("tls", &allowed, "", ""), Options { network: Some(net.network(Some(&pki.ca))), ..Default::default() }).await;

    let r = fetch(&s, "tls", &format!("https://secure.test:{p}/echo")).await;
    assert_eq!((r.header("x-fetch-status"), r.text().as_str()), (Some("200"), ""), "{}", r.text());
    let seen = origin.seen.lock().unwrap().clone();
    assert_eq!(seen[0].host.as_deref(), Some(format!("secure.test:{p}").as_str()), "Host names the checked destination");

    let r = fetch(&s, "tls", &format!("https://wrong.test:{p}/")).await;
    assert_eq!(r.text(), "fetch error: ErrorCode::TlsCertificateError", "a certificate for another name is refused");
    let r = fetch(&s, "tls", &format!("https://127.0.0.1:{p}/")).await;
    assert_eq!(r.text(), "fetch error: ErrorCode::TlsCertificateError", "and one without the IP");
    drop(s);

    // Without the test CA, the same origin is untrusted.
    let s = start_with(&worker("tls", &allowed, "", ""), Options { network: Some(net.network(None)), ..Default::default() }).await;
    let r = fetch(&s, "tls", &format!("https://secure.test:{p}/")).await;
    assert_eq!(r.text(), "fetch error: ErrorCode::TlsCertificateError");
    assert_eq!(origin.seen.lock().unwrap().len(), 1, "no request was sent over an unverified connection");
}
