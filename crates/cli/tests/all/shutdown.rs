//! `cordon serve` stops on time however much work its tenants left behind:
//! SIGTERM with a full SQL pool queue, guests still running after their
//! responses and a stderr nobody reads, and a second server on the same
//! data directory right after.
//!
//! Bound (docs/SECURITY.md, "Shutdown"): the process exits within
//! `shutdown_grace_ms` + [`EXIT_BOUND`] of SIGTERM.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::serve::{Server, free_port};

/// The grace period the servers here run with.
const GRACE: Duration = Duration::from_millis(1000);
/// How long after the grace period the process may take to exit.
const EXIT_BOUND: Duration = Duration::from_millis(1000);
/// Slow statements sent at once by the attacking tenant, as in the review.
const FLOOD: usize = 600;

/// A statement that takes a few hundred ms of CPU.
const SLOW: &str =
    "SELECT count(*) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1500000) SELECT x FROM c)";

/// A `bindings` worker of `tenant` (it imports every capability, so it is
/// granted each), with its own SQL database.
fn worker(name: &str, tenant: &str, limits: &str) -> String {
    format!(
        r#"
[[worker]]
name = "{name}"
tenant = "{tenant}"
component = "{component}"
routes = ["{name}.localhost/"]

[[worker.kv]]
binding = "CACHE"
namespace = "kv"

[[worker.sql]]
binding = "DB"
database = "main"

[[worker.postgres]]
binding = "PG"
database = "{name}"

[worker.vars]
GREETING = "hi"

[worker.limits]
{limits}

[[database]]
name = "{name}"
tenant = "{tenant}"
origin = "postgres://app@127.0.0.1:1/app"
"#,
        component = crate::test_guest_wasm("bindings").display(),
    )
}

/// Serves an attacking tenant `evil` (whose requests may run for a minute
/// and may hold almost every instance) and a victim tenant `good` on the
/// data directory `dir/data`.
fn serve(dir: &Path) -> Server {
    let (port, admin) = (free_port(), free_port());
    let long = "cpu_ms = 60000\nwall_ms = 60000\nsql_statement_timeout_ms = 60000";
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\ndata_dir = \"data\"\nshutdown_grace_ms = {grace}\n\n\
         [sandbox]\nmax_instances = 1000\n\n[[tenant]]\nname = \"evil\"\nmax_instances = 999\n{flood}{victim}\n\
         [[worker]]\nname = \"lingering\"\ntenant = \"evil\"\ncomponent = \"{hostile}\"\nroutes = [\"lingering.localhost/\"]\n[worker.limits]\n{long}\n",
        grace = GRACE.as_millis(),
        flood = worker("flood", "evil", long),
        victim = worker("victim", "good", ""),
        hostile = crate::test_guest_wasm("hostile").display(),
    );
    let path = dir.join("cordon.toml");
    std::fs::write(&path, toml).unwrap();
    Server::start(&path, port, None)
}

/// Sends one request without waiting for its answer.
fn send(port: u16, host: &str, path: &str, body: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    s
}

fn send_sql(port: u16, host: &str, sql: &str) -> TcpStream {
    send(port, host, "/sql?binding=DB", &format!("{{\"sql\": \"{sql}\", \"params\": []}}"))
}

fn answer(mut s: TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply
}

#[test]
fn sigterm_with_a_full_storage_queue_exits_within_the_grace_period_and_frees_the_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = serve(dir.path());
    server.wait_for("cordon is serving");
    let ok = answer(send_sql(server.port, "victim.localhost", "SELECT 1"));
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");

    // Guests that answer at once and keep running until their wall_ms.
    for _ in 0..50 {
        let early = answer(send(server.port, "lingering.localhost", "/late-read?ms=60000", ""));
        assert!(early.starts_with("HTTP/1.1 200") && early.contains("answered early"), "{early}");
    }
    // From here on the log is not read: its pipe fills up with the flood's
    // request lines.
    server.stalled.store(true, Ordering::Relaxed);
    // The attacker fills its share of the SQL pool and its queue: two
    // statements run, a few hundred wait, the rest are refused at once.
    let flood: Vec<TcpStream> = (0..FLOOD).map(|_| send_sql(server.port, "flood.localhost", SLOW)).collect();
    let refused = answer(send_sql(server.port, "flood.localhost", SLOW));
    assert!(refused.contains("calls waiting"), "the attacker's queue is full: {refused}");

    let sent = Instant::now();
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) }, 0);
    let limit = GRACE + EXIT_BOUND;
    let exited = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break Some(status);
        }
        if sent.elapsed() > limit + Duration::from_secs(60) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = sent.elapsed();
    server.stalled.store(false, Ordering::Relaxed);
    drop(flood);
    eprintln!("exited {took:?} after SIGTERM: {exited:?}");
    assert!(exited.is_some_and(|s| s.success()), "the server did not exit cleanly: {exited:?}");
    assert!(took < limit, "the server took {took:?} to exit after SIGTERM; at most {limit:?} (grace {GRACE:?} + {EXIT_BOUND:?})");
    drop(server);

    // The data directory's lock is free: a new server starts on it at once.
    let restarted = serve(dir.path());
    restarted.wait_for("cordon is serving");
    let ok = answer(send_sql(restarted.port, "victim.localhost", "SELECT 1"));
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}
