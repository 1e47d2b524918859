//! What was acknowledged survives `kill -9`: the key-value and SQL examples
//! served by a real `cordon serve`, killed without warning mid-stream and
//! restarted on the same data directory.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use crate::serve::{Server, free_port};
use crate::*;

/// Serves the counter and notes examples on `data`, and waits until ready.
fn serve(dir: &Path) -> Server {
    let (port, admin) = (free_port(), free_port());
    let toml = format!(
        r#"[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
data_dir = "data"

[[worker]]
name = "counter"
tenant = "acme"
component = "{counter}"
routes = ["counter.localhost/"]

[[worker.kv]]
binding = "COUNTS"
namespace = "visits"

[worker.vars]
GREETING = "hi"

[[worker]]
name = "notes"
tenant = "acme"
component = "{notes}"
routes = ["notes.localhost/"]

[[worker.sql]]
binding = "DB"
database = "notes"
"#,
        counter = example_wasm("kv-counter").display(),
        notes = example_wasm("notes").display(),
    );
    let path = dir.join("cordon.toml");
    std::fs::write(&path, toml).unwrap();
    let server = Server::start(&path, port, None);
    server.wait_for("cordon is serving");
    server
}

/// One request; the status and body.
fn call(port: u16, method: &str, host: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    let status = reply.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

#[test]
fn acknowledged_writes_survive_kill_9_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = serve(dir.path());
    let mut acknowledged = 0;
    for _ in 0..40 {
        let (status, body) = call(server.port, "GET", "counter.localhost", "/page", "");
        assert_eq!(status, 200, "{body}");
        acknowledged += 1;
        assert!(body.contains(&format!("visited {acknowledged} times")), "{body}");
    }
    for i in 0..10 {
        let (status, body) = call(server.port, "POST", "notes.localhost", "/notes", &format!("{{\"text\": \"note {i}\"}}"));
        assert_eq!(status, 201, "{body}");
    }
    // No shutdown: SIGKILL right after the last acknowledgement.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    drop(server);

    let server = serve(dir.path());
    let (_, counts) = call(server.port, "GET", "counter.localhost", "/_counts", "");
    assert!(counts.contains(&format!("/page {acknowledged}")), "every acknowledged increment is there: {counts}");
    let (status, notes) = call(server.port, "GET", "notes.localhost", "/notes", "");
    assert_eq!(status, 200);
    for i in 0..10 {
        assert!(notes.contains(&format!("note {i}")), "note {i} survived: {notes}");
    }
}
