//! `cordon reload` and SIGHUP against a real `cordon serve`: a changed
//! component takes over without a failed request, workers come and go, an
//! invalid file or a changed `[server]` changes nothing, and what reloads
//! made survives `kill -9`.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::serve::{Server, free_port};
use crate::*;

/// What `hello` answers to `GET /`.
const HELLO: &str = "Hello from Cordon\nmethod: GET\npath: /\n";
/// What `hostile` answers to `GET /`.
const HOSTILE: &str = "ok from hostile";

/// A config file in a temp dir, with its ports; the data directory is the
/// default one beside it.
struct Site {
    dir: tempfile::TempDir,
    path: PathBuf,
    port: u16,
    admin: u16,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cordon.toml");
        Site { dir, path, port: free_port(), admin: free_port() }
    }

    /// Writes the file: `server` is added to `[server]`, then one worker of
    /// tenant `acme` per `(name, component, host)`, routed at `host/`.
    fn write(&self, server: &str, workers: &[(&str, &Path, &str)]) {
        let mut text = format!("[server]\nlisten = \"127.0.0.1:{}\"\nadmin_listen = \"127.0.0.1:{}\"\n{server}\n", self.port, self.admin);
        for (name, component, host) in workers {
            text.push_str(&format!(
                "[[worker]]\nname = \"{name}\"\ntenant = \"acme\"\ncomponent = \"{}\"\nroutes = [\"{host}/\"]\n\n",
                component.display()
            ));
        }
        std::fs::write(&self.path, text).unwrap();
    }

    fn serve(&self) -> Server {
        let server = Server::start(&self.path, self.port, None);
        server.wait_for("cordon is serving");
        server
    }

    /// `cordon reload --config FILE`: whether it exited 0, and what it printed.
    fn reload(&self) -> (bool, String) {
        let out = cordon().args(["reload", "--timeout", "120", "--config"]).arg(&self.path).output().unwrap();
        (out.status.success(), text(&out))
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join(".cordon")
    }

    /// `DATA_DIR/reload.json`, once it has `sequence`.
    fn report(&self, sequence: u64) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(bytes) = std::fs::read(self.data_dir().join("reload.json")) {
                let report: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                if report["sequence"] == sequence && report["state"] != "reloading" {
                    return report;
                }
            }
            assert!(Instant::now() < deadline, "no reload report with sequence {sequence}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `(name, version, component_sha256)` of every version served, from
    /// `/health`, sorted.
    fn health(&self) -> Vec<(String, u64, String)> {
        let (status, body) = get(self.admin, "localhost", "/health");
        assert_eq!(status, 200, "{body}");
        let health: serde_json::Value = serde_json::from_str(&body).unwrap();
        let mut workers: Vec<_> = health["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                (
                    w["name"].as_str().unwrap().to_string(),
                    w["version"].as_u64().unwrap(),
                    w["component_sha256"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        workers.sort();
        workers
    }

    /// How many versions of `worker` the registry keeps.
    fn versions(&self, worker: &str) -> i64 {
        let db = rusqlite::Connection::open(self.data_dir().join("registry.sqlite3")).unwrap();
        db.query_row("SELECT count(*) FROM versions WHERE tenant = 'acme' AND worker = ?1", [worker], |r| r.get(0)).unwrap()
    }
}

/// One response, read off a connection as HTTP/1.1 frames it.
struct Response {
    status: u16,
    close: bool,
    body: String,
}

fn read_response(r: &mut impl BufRead) -> std::io::Result<Response> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| bad(&line))?;
    let (mut length, mut chunked, mut close) = (None, false, false);
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').ok_or_else(|| bad(header))?;
        let (name, value) = (name.to_ascii_lowercase(), value.trim().to_ascii_lowercase());
        match name.as_str() {
            "content-length" => length = Some(value.parse::<usize>().map_err(|_| bad(header))?),
            "transfer-encoding" => chunked = value == "chunked",
            "connection" => close = value == "close",
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim_end(), 16).map_err(|_| bad(&line))?;
            if size == 0 {
                line.clear();
                r.read_line(&mut line)?;
                break;
            }
            let start = body.len();
            body.resize(start + size + 2, 0);
            r.read_exact(&mut body[start..])?;
            body.truncate(start + size);
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
        close = true;
    }
    Ok(Response { status, close, body: String::from_utf8_lossy(&body).into_owned() })
}

/// One request on a new connection: status and body.
fn get(port: u16, host: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let response = read_response(&mut BufReader::new(s)).unwrap();
    (response.status, response.body)
}

/// Which version answered: the body of `hello` or of `hostile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Hello,
    Hostile,
}

/// Every request a client sent: when, and who answered it.
#[derive(Default)]
struct Traffic {
    /// When each request was sent, when its answer came, and what it was.
    answers: Vec<(Instant, Instant, Answer)>,
    failures: Vec<String>,
}

impl Traffic {
    fn record(&mut self, sent: Instant, response: std::io::Result<Response>) -> bool {
        match response {
            Ok(r) if r.status == 200 && r.body == HELLO => self.answers.push((sent, Instant::now(), Answer::Hello)),
            Ok(r) if r.status == 200 && r.body == HOSTILE => self.answers.push((sent, Instant::now(), Answer::Hostile)),
            Ok(r) => self.failures.push(format!("{} {:?}", r.status, r.body)),
            Err(e) => self.failures.push(format!("{e}")),
        }
        self.failures.is_empty()
    }
}

/// Sends `GET /` to `app.localhost` without pause until `stop`: on one
/// kept-alive connection (a new one only after the server closed it), or
/// on a new connection each time.
fn client(port: u16, keep_alive: bool, stop: Arc<AtomicBool>, traffic: Arc<Mutex<Traffic>>) {
    let connect = || {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok::<_, std::io::Error>(BufReader::new(s))
    };
    let mut conn: Option<BufReader<TcpStream>> = None;
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let response = (|| {
            let reader = match &mut conn {
                Some(reader) => reader,
                None => conn.insert(connect()?),
            };
            let close = if keep_alive { "" } else { "Connection: close\r\n" };
            write!(reader.get_mut(), "GET / HTTP/1.1\r\nHost: app.localhost\r\n{close}\r\n")?;
            read_response(reader)
        })();
        if !matches!(&response, Ok(r) if !r.close) {
            conn = None;
        }
        if !traffic.lock().unwrap().record(sent, response) {
            return;
        }
    }
}

#[test]
fn a_reload_swaps_a_component_without_failing_a_request() {
    let site = Site::new();
    site.write("", &[("app", &hello_wasm(), "app.localhost")]);
    let hostile = test_guest_wasm("hostile");
    let server = site.serve();
    assert_eq!(get(site.port, "app.localhost", "/"), (200, HELLO.to_string()));

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = Arc::new(Mutex::new(Traffic::default()));
    let clients: Vec<_> = [true, true, true, false, false]
        .into_iter()
        .map(|keep_alive| {
            let (stop, traffic) = (stop.clone(), traffic.clone());
            std::thread::spawn(move || client(site.port, keep_alive, stop, traffic))
        })
        .collect();
    let answered = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        let start = traffic.lock().unwrap().answers.len();
        loop {
            let traffic = traffic.lock().unwrap();
            assert!(traffic.failures.is_empty(), "failed requests: {:?}", traffic.failures);
            if traffic.answers.len() >= start + n {
                break;
            }
            drop(traffic);
            assert!(Instant::now() < deadline, "the clients stalled");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    answered(200);

    // hello → hostile (compiled during the reload), then back to hello
    // (from the code cache): each time the file's worker gets a new version.
    let mut windows = Vec::new();
    for (component, version, answer) in [(&hostile, 2, Answer::Hostile), (&hello_wasm(), 3, Answer::Hello)] {
        site.write("", &[("app", component, "app.localhost")]);
        let started = Instant::now();
        let (ok, out) = site.reload();
        let done = Instant::now();
        assert!(ok, "{out}");
        assert!(out.contains(&format!("deployed acme/app@{version}")), "{out}");
        let body = if answer == Answer::Hello { HELLO } else { HOSTILE };
        assert_eq!(get(site.port, "app.localhost", "/"), (200, body.to_string()), "the new version answers once the reload returns");
        windows.push((started, done, answer));
        answered(200);
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }

    let traffic = traffic.lock().unwrap();
    assert!(traffic.failures.is_empty(), "failed requests across the reloads: {:?}", traffic.failures);
    // A request sent after a reload returned, and answered before the next
    // one started, is answered by that reload's version; during a reload,
    // either version may answer.
    for (i, (_, done, answer)) in windows.iter().enumerate() {
        let until = windows.get(i + 1).map(|(next, _, _)| *next);
        let after: Vec<Answer> = traffic
            .answers
            .iter()
            .filter(|(sent, received, _)| sent > done && until.is_none_or(|u| *received < u))
            .map(|(_, _, a)| *a)
            .collect();
        assert!(!after.is_empty(), "requests were sent after reload {}", i + 1);
        assert!(after.iter().all(|a| a == answer), "after reload {} only {answer:?} answers: {after:?}", i + 1);
    }
    drop(server);
}

#[test]
fn a_reload_adds_and_removes_workers_and_refuses_an_invalid_file_whole() {
    let site = Site::new();
    let (hello, hostile) = (hello_wasm(), test_guest_wasm("hostile"));
    site.write("", &[("a", &hello, "a.localhost"), ("b", &hostile, "b.localhost")]);
    let server = site.serve();

    // `b` goes; `c` takes its route in the same reload, and `d` is new.
    site.write("", &[("a", &hello, "a.localhost"), ("c", &hostile, "b.localhost"), ("d", &hello, "d.localhost")]);
    let (ok, out) = site.reload();
    assert!(ok, "{out}");
    for line in ["deployed acme/c@1", "deployed acme/d@1", "removed acme/b", "unchanged acme/a"] {
        assert!(out.contains(line), "{line:?} in {out}");
    }
    assert_eq!(get(site.port, "b.localhost", "/"), (200, HOSTILE.to_string()));
    assert_eq!(get(site.port, "d.localhost", "/"), (200, HELLO.to_string()));
    let served = site.health();
    let names: Vec<&str> = served.iter().map(|(name, _, _)| name.as_str()).collect();
    assert_eq!(names, ["a", "c", "d"]);
    let serves_what_it_served = || {
        assert_eq!(site.health(), served);
        assert_eq!(get(site.port, "a.localhost", "/"), (200, HELLO.to_string()));
        assert_eq!(get(site.port, "b.localhost", "/"), (200, HOSTILE.to_string()));
    };

    // A component that is not a file: the file does not load, so
    // `cordon reload` refuses it with its errors and signals nobody.
    let missing = site.dir.path().join("missing.wasm");
    site.write("", &[("a", &hello, "a.localhost"), ("c", &hostile, "b.localhost"), ("e", &missing, "e.localhost")]);
    let (ok, out) = site.reload();
    assert!(!ok, "{out}");
    assert!(out.contains("nothing was sent to the server") && out.contains("cordon.toml:"), "{out}");
    serves_what_it_served();

    // The same file by SIGHUP: the server refuses it, with the errors'
    // positions, and changes nothing (`d` stays, although the file dropped it).
    server.signal(libc::SIGHUP);
    let report = site.report(2);
    assert_eq!(report["state"], "refused", "{report}");
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("cordon.toml:") && error.contains("missing.wasm"), "{error}");
    server.wait_for("reload refused");
    serves_what_it_served();

    // A component that is a file but not a component: the file loads, the
    // server refuses it when it compiles it, and names it by its path.
    let bad = site.dir.path().join("bad.wasm");
    std::fs::write(&bad, b"not wasm").unwrap();
    site.write("", &[("a", &hello, "a.localhost"), ("c", &bad, "b.localhost"), ("d", &hello, "d.localhost")]);
    let (ok, out) = site.reload();
    assert!(!ok, "{out}");
    assert!(out.contains("refused") && out.contains("not a WebAssembly file") && out.contains(&bad.display().to_string()), "{out}");
    serves_what_it_served();

    // A changed [server] needs a restart: refused, naming the section.
    site.write(
        "keep_alive_timeout_ms = 1234",
        &[("a", &hello, "a.localhost"), ("c", &hostile, "b.localhost"), ("d", &hello, "d.localhost")],
    );
    let (ok, out) = site.reload();
    assert!(!ok, "{out}");
    assert!(out.contains("needs a restart: [server]"), "{out}");
    serves_what_it_served();

    // Put back, it reloads with nothing to change.
    site.write("", &[("a", &hello, "a.localhost"), ("c", &hostile, "b.localhost"), ("d", &hello, "d.localhost")]);
    let (ok, out) = site.reload();
    assert!(ok && out.contains("nothing changed"), "{out}");
    serves_what_it_served();
}

#[test]
fn what_reloads_made_survives_kill_9_and_an_unchanged_restart_makes_no_version() {
    let site = Site::new();
    let (hello, hostile) = (hello_wasm(), test_guest_wasm("hostile"));
    site.write("", &[("app", &hello, "app.localhost")]);
    let mut server = site.serve();
    // Versions 1 (hello, at start), 2 (hostile) and 3 (hello again).
    for (component, version) in [(&hostile, 2), (&hello, 3)] {
        site.write("", &[("app", component, "app.localhost")]);
        let (ok, out) = site.reload();
        assert!(ok && out.contains(&format!("deployed acme/app@{version}")), "{out}");
    }
    let served = site.health();
    assert_eq!(served.len(), 1);
    assert_eq!(served[0].1, 3, "{served:?}");

    server.child.kill().unwrap();
    server.child.wait().unwrap();
    drop(server);

    let server = site.serve();
    assert_eq!(site.health(), served, "the same version, with the same component");
    assert_eq!(get(site.port, "app.localhost", "/"), (200, HELLO.to_string()));
    assert_eq!(site.versions("app"), 3, "the unchanged file made no version at start");
    let (ok, out) = site.reload();
    assert!(ok && out.contains("unchanged acme/app") && out.contains("nothing changed"), "{out}");
    assert_eq!(site.versions("app"), 3);
    drop(server);
}

#[test]
fn reload_without_a_server_says_so() {
    let site = Site::new();
    site.write("", &[("app", &hello_wasm(), "app.localhost")]);
    let (ok, out) = site.reload();
    assert!(!ok);
    assert!(out.contains("no server holds"), "{out}");
}
