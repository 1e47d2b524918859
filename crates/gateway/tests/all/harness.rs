//! A real server on ephemeral loopback ports, real guest components built
//! from `tests/guests` and `examples`, and small HTTP clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use cordon_config::Config;
use cordon_gateway::{Gateway, RequestFilter};
use cordon_runtime::Runtime;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// Builds the guest components once per test process and returns the path
/// of `name.wasm` (`hostile`, `bindings`, `hello`, `kv_counter`, `notes`).
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let out = BUILT.get_or_init(|| {
        let root = repo_root();
        let target_dir = root.join("target/guests");
        for manifest in [
            "tests/guests/hostile/Cargo.toml",
            "tests/guests/bindings/Cargo.toml",
            "examples/hello/Cargo.toml",
            "examples/kv-counter/Cargo.toml",
            "examples/notes/Cargo.toml",
        ] {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--quiet", "--release", "--target", "wasm32-wasip2", "--manifest-path"])
                .arg(root.join(manifest))
                .arg("--target-dir")
                .arg(&target_dir)
                .env_remove("RUSTFLAGS")
                .env_remove("CARGO_ENCODED_RUSTFLAGS")
                .status()
                .expect("running cargo to build the guest components");
            assert!(
                status.success(),
                "building {manifest} for wasm32-wasip2 failed (is the target installed? `rustup target add wasm32-wasip2`)"
            );
        }
        target_dir.join("wasm32-wasip2/release")
    });
    out.join(format!("{name}.wasm"))
}

/// Captures every log event of this process as JSON lines.
pub fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: Arc<Mutex<Vec<u8>>> = Arc::default();
        let writer = buf.clone();
        let _ = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_env_filter("info")
            .with_writer(move || LogWriter(writer.clone()))
            .try_init();
        buf
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The captured log events that mention `needle`, parsed.
pub fn log_events(needle: &str) -> Vec<serde_json::Value> {
    let text = String::from_utf8_lossy(&logs().lock().unwrap()).to_string();
    text.lines().filter(|l| l.contains(needle)).filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Waits up to 5 s for a log event mentioning `needle` that satisfies `pred`.
pub async fn wait_for_log(needle: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    for _ in 0..100 {
        if let Some(e) = log_events(needle).into_iter().find(&pred) {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no log event matching {needle}; logs:\n{}", String::from_utf8_lossy(&logs().lock().unwrap()));
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The runtime it serves, for changes to its registry.
    pub runtime: Arc<Runtime>,
    data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _tmp: tempfile::TempDir,
}

#[derive(Default)]
pub struct Options<'a> {
    /// Extra lines for the `[server]` table.
    pub server: &'a str,
    pub filter: Option<Arc<dyn RequestFilter>>,
    /// Reuse a data directory (for cache tests).
    pub data_dir: Option<&'a Path>,
    /// Slots in the instance pool (default 64).
    pub max_instances: Option<u32>,
    /// Extra lines for the `[sandbox]` table.
    pub sandbox: &'a str,
    /// Resolver, dialer and TLS roots for outbound requests (default: the system's).
    pub network: Option<Arc<cordon_runtime::Network>>,
    /// The environment the runtime reads `[[database]]` passwords from,
    /// instead of the process's (default: empty).
    pub env: &'a [(&'a str, &'a str)],
}

/// The standard pair: `hello` (well-behaved) and `hostile` (the fixture),
/// with tight limits for the hostile one.
pub fn standard_workers() -> String {
    format!(
        r#"
[[worker]]
name = "hello"
tenant = "good"
component = "{hello}"
routes = ["hello.localhost/", "localhost/hello"]

[[worker]]
name = "hostile"
tenant = "evil"
component = "{hostile}"
routes = ["hostile.localhost/"]

[worker.limits]
cpu_ms = 50
wall_ms = 2000
memory_mb = 16
max_request_body_bytes = 65536
max_response_body_bytes = 1048576
max_log_bytes = 4096
"#,
        hello = guest("hello").display(),
        hostile = guest("hostile").display(),
    )
}

pub async fn start(workers: &str) -> TestServer {
    start_with(workers, Options::default()).await
}

pub async fn start_with(workers: &str, options: Options<'_>) -> TestServer {
    logs();
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = options.data_dir.map(Path::to_path_buf).unwrap_or_else(|| tmp.path().join("data"));
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nshutdown_grace_ms = 5000\n{}\n\n[sandbox]\nmax_instances = {}\n{}\n{workers}",
        data_dir.display(),
        options.server,
        options.max_instances.unwrap_or(64),
        options.sandbox,
    );
    let path = tmp.path().join("cordon.toml");
    std::fs::write(&path, &text).unwrap();
    let config = Config::load(&path).unwrap_or_else(|e| panic!("test config is invalid: {e}\n{text}"));
    let network = options.network.unwrap_or_else(|| Arc::new(cordon_runtime::Network::system().unwrap()));
    let env: std::collections::HashMap<String, String> = options.env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let runtime =
        tokio::task::spawn_blocking(move || Runtime::start_with_env(&config, network, &|name| env.get(name).cloned()).map(|r| (r, config)))
            .await
            .unwrap();
    let (runtime, config) = runtime.unwrap_or_else(|e| panic!("runtime failed to start: {e}"));
    let runtime = Arc::new(runtime);
    let mut gateway = Gateway::bind(&config, runtime.clone()).await.unwrap();
    if let Some(f) = options.filter {
        gateway = gateway.with_request_filter(f);
    }
    let (addr, admin) = (gateway.local_addr(), gateway.admin_addr());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(gateway.run(async {
        let _ = stopped.await;
    }));
    TestServer { addr, admin, runtime, data_dir, stop: Some(stop), task: Some(task), _tmp: tmp }
}

impl TestServer {
    /// Signals shutdown and waits for the server to return.
    pub async fn shutdown(mut self) {
        self.begin_shutdown();
        self.wait().await;
    }

    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub async fn wait(&mut self) {
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task).await.expect("server shut down in time").unwrap();
        }
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone()
    }

    pub async fn get(&self, host: &str, path: &str) -> Response {
        request(self.addr, "GET", host, path, &[], None).await
    }

    pub async fn health(&self) -> serde_json::Value {
        let r = request(self.admin, "GET", "localhost", "/health", &[], None).await;
        assert_eq!(r.status, 200);
        serde_json::from_slice(&r.body).unwrap()
    }

    /// `/health` once `done` holds of it, or as it is after 2 s: what an
    /// instance holds is given back when it is dropped on its guest thread,
    /// just after its response.
    pub async fn health_once(&self, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let mut health = self.health().await;
        for _ in 0..100 {
            if done(&health) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            health = self.health().await;
        }
        health
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
    /// Set when the body ended in an error (cut off).
    pub body_error: Option<String>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the gateway's JSON error shape and returns its code.
    pub fn error_code(&self) -> String {
        let j = self.json();
        let id = self.header("x-request-id").expect("x-request-id on every response");
        assert_eq!(j["error"]["request_id"], id, "the body names the same request id: {j}");
        assert!(j["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{j}");
        j["error"]["code"].as_str().unwrap().to_string()
    }
}

/// One request on a new connection, with a real HTTP/1.1 client.
pub async fn request(addr: SocketAddr, method: &str, host: &str, path: &str, headers: &[(&str, &str)], body: Option<Vec<u8>>) -> Response {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut builder = http::Request::builder().method(method).uri(path).header("host", host);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let req = builder.body(Full::new(Bytes::from(body.unwrap_or_default()))).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req)).await.expect("response head in time").unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = resp.into_body();
    let mut bytes = Vec::new();
    let mut body_error = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), body.frame()).await.expect("body in time") {
            None => break,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    bytes.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => {
                body_error = Some(e.to_string());
                break;
            }
        }
    }
    Response { status, headers, body: bytes, body_error }
}

/// Writes `bytes` on a fresh connection and returns everything the server
/// sends until it closes the connection (or 10 s pass).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_until_close(&mut s, Duration::from_secs(10)).await
}

pub async fn read_until_close(s: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of the first response in a raw reply.
pub fn raw_status(reply: &str) -> u16 {
    reply.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status line in {reply:?}"))
}

/// The resident memory of this process (the server runs in it), in bytes,
/// from `/proc/self/status`.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

/// The `p` quantile (0 to 1) of latencies sorted in ascending order.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}
