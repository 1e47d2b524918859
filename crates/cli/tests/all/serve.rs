//! `cordon serve` as a process: startup report, refusal, and signals.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::*;

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub(crate) struct Server {
    pub child: Child,
    pub port: u16,
    log: std::sync::mpsc::Receiver<String>,
    /// While set, nobody reads the process's stderr, as with a stalled
    /// journal or a full pipe.
    pub stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    _dir: Option<tempfile::TempDir>,
}

/// `cordon --log-format json serve --config path`.
fn serve_command(path: &std::path::Path) -> std::process::Command {
    let mut command = cordon();
    command.args(["--log-format", "json", "serve", "--config"]).arg(path);
    command
}

fn spawn(extra: &str) -> Server {
    let (port, admin) = (free_port(), free_port());
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n{extra}\n{}",
        worker_toml("hello", &hello_wasm())
    );
    let (dir, path) = config(&toml);
    Server::start(&path, port, Some(dir))
}

impl Server {
    /// `cordon serve --config path` (listening on `port`), with its JSON log
    /// lines collected; dropped, it kills the process.
    pub(crate) fn start(path: &std::path::Path, port: u16, dir: Option<tempfile::TempDir>) -> Server {
        Self::start_with_env(path, port, dir, &[])
    }

    /// [`Server::start`] with `env` added to the process's environment.
    pub(crate) fn start_with_env(path: &std::path::Path, port: u16, dir: Option<tempfile::TempDir>, env: &[(&str, &str)]) -> Server {
        let mut command = serve_command(path);
        command.envs(env.iter().copied());
        Self::spawn(command, port, dir)
    }

    /// Runs `command` (a [`serve_command`]), collecting its log lines.
    fn spawn(mut command: std::process::Command, port: u16, dir: Option<tempfile::TempDir>) -> Server {
        let mut child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = std::sync::mpsc::channel();
        let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stall = stalled.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
                while stall.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
        Server { child, port, log, stalled, _dir: dir }
    }

    pub(crate) fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(line) = self.log.recv_timeout(Duration::from_millis(100))
                && line.contains(needle)
            {
                return line;
            }
        }
        panic!("no log line containing {needle:?}");
    }

    pub(crate) fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stalled.store(false, std::sync::atomic::Ordering::Relaxed);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: hello.localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn serve_reports_its_posture_and_stops_cleanly_on_sigterm() {
    let mut s = spawn("");
    let posture = s.wait_for("sandbox posture");
    assert!(posture.contains("\"allocator\":\"pooling\""), "{posture}");
    let mpk = s.wait_for("memory protection keys");
    assert!(mpk.contains("\"reason\""), "{mpk}");
    s.wait_for("cordon is serving");
    let reply = get(s.port, "/");
    assert!(reply.starts_with("HTTP/1.1 200 OK") && reply.contains("Hello from Cordon"), "{reply}");
    let line = s.wait_for("\"request\"");
    assert!(line.contains("\"tenant\":\"acme\"") && line.contains("\"status\":200"), "{line}");

    // A request in flight when SIGTERM arrives still gets its answer.
    let mut slow = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    write!(slow, "GET / HTTP/1.1\r\nHost: hello.localhost\r\n").unwrap();
    s.signal(libc::SIGTERM);
    s.wait_for("shutting down");
    write!(slow, "\r\n").unwrap();
    let mut reply = String::new();
    let _ = slow.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply:?}\nserver log:\n{}", s.log.try_iter().collect::<Vec<_>>().join("\n"));
    assert!(reply.to_ascii_lowercase().contains("connection: close"), "{reply}");

    let status = s.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn sigint_also_stops_the_server() {
    let mut s = spawn("");
    s.wait_for("cordon is serving");
    s.signal(libc::SIGINT);
    s.wait_for("shut down");
    assert!(s.child.wait().unwrap().success());
}

#[test]
fn serve_refuses_required_memory_protection_keys_without_cpu_support() {
    if cordon_runtime::policy::cpu_has_memory_protection_keys() {
        return; // This CPU has them: nothing to refuse. The check test covers both cases.
    }
    let mut s = spawn("[security]\nmemory_protection_keys = \"required\"");
    let status = s.child.wait().unwrap();
    assert!(!status.success());
    let mut all = String::new();
    while let Ok(line) = s.log.recv_timeout(Duration::from_secs(5)) {
        all.push_str(&line);
    }
    assert!(all.contains("memory protection keys are required"), "{all}");
}

#[test]
fn a_second_server_on_the_same_data_directory_is_refused() {
    let shared = tempfile::tempdir().unwrap();
    let data_dir = format!("data_dir = \"{}\"", shared.path().join("data").display());
    let first = spawn(&data_dir);
    first.wait_for("cordon is serving");
    let mut second = spawn(&data_dir);
    let status = second.child.wait().unwrap();
    assert!(!status.success());
    let mut all = String::new();
    while let Ok(line) = second.log.recv_timeout(Duration::from_secs(5)) {
        all.push_str(&line);
    }
    assert!(all.contains("is in use by another Cordon process"), "{all}");
    // The first one is unaffected.
    assert!(get(first.port, "/").starts_with("HTTP/1.1 200 OK"));
}

#[test]
fn serve_starts_the_postgres_proxy_and_stops_it_with_the_server() {
    let pg_port = free_port();
    let mut s = spawn(&format!("[postgres_proxy]\nlisten = \"127.0.0.1:{pg_port}\"\n"));
    let line = s.wait_for("postgres proxy is serving");
    assert!(line.contains(&format!("127.0.0.1:{pg_port}")), "{line}");
    s.wait_for("cordon is serving");
    // A startup packet for a database that is not configured: a Postgres error, 3D000.
    let mut client = TcpStream::connect(("127.0.0.1", pg_port)).unwrap();
    let mut packet = Vec::new();
    for part in [&b"user"[..], b"someone", b"database", b"nosuch"] {
        packet.extend_from_slice(part);
        packet.push(0);
    }
    packet.push(0);
    let mut message = ((packet.len() + 8) as u32).to_be_bytes().to_vec();
    message.extend_from_slice(&(3u32 << 16).to_be_bytes());
    message.extend_from_slice(&packet);
    client.write_all(&message).unwrap();
    let mut reply = Vec::new();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = client.read_to_end(&mut reply);
    assert_eq!(reply.first(), Some(&b'E'), "{reply:?}");
    let text = String::from_utf8_lossy(&reply);
    assert!(text.contains("3D000") && text.contains("database \"nosuch\" does not exist"), "{text}");

    s.signal(libc::SIGTERM);
    assert!(s.child.wait().unwrap().success());
    assert!(TcpStream::connect(("127.0.0.1", pg_port)).is_err(), "the proxy stopped with the server");
}

/// `cordon serve` under a descriptor limit of `soft`/`hard`, as systemd or a
/// shell would set it.
fn serve_with_descriptor_limit(extra: &str, soft: u64, hard: u64) -> Server {
    use std::os::unix::process::CommandExt;
    let (port, admin) = (free_port(), free_port());
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n{extra}\n{}",
        worker_toml("hello", &hello_wasm())
    );
    let (dir, path) = config(&toml);
    let mut command = serve_command(&path);
    // SAFETY: between fork and exec the closure only calls setrlimit, which
    // is async-signal-safe, on a value on its own stack.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Server::spawn(command, port, Some(dir))
}

#[test]
fn serve_raises_its_descriptor_limit_and_refuses_limits_that_do_not_fit() {
    // The soft limit is raised to the hard one, which holds the defaults.
    let s = serve_with_descriptor_limit("", 1024, 16_384);
    let line = s.wait_for("file descriptors");
    assert!(line.contains("\"limit\":16384"), "{line}");
    s.wait_for("serving");
    drop(s);
    // A hard limit below what the defaults may need: refused, with the numbers.
    let mut s = serve_with_descriptor_limit("", 1024, 4096);
    let status = s.child.wait().unwrap();
    assert!(!status.success());
    let mut all = String::new();
    while let Ok(line) = s.log.recv_timeout(Duration::from_secs(5)) {
        all.push_str(&line);
    }
    assert!(all.contains("may open only 4096"), "{all}");
    assert!(all.contains("server.max_connections"), "{all}");
    // Lower limits fit under the same hard limit.
    let s = serve_with_descriptor_limit("max_connections = 2000", 1024, 4096);
    s.wait_for("serving");
}

/// The environment block of process `pid`, as other processes see it.
fn environ_of(pid: u32) -> Vec<u8> {
    std::fs::read(format!("/proc/{pid}/environ")).unwrap()
}

#[test]
fn serve_takes_its_secrets_out_of_its_environment_and_cannot_dump_core() {
    let key: String = (0..32).map(|i| format!("{:02x}", 0xa0 + i)).collect();
    let (pg_port, origin_password, proxy_password) = (free_port(), "origin-pw-0ffb7a", "proxy-pw-5c1e2d");
    let (port, admin) = (free_port(), free_port());
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
         [postgres_proxy]\nlisten = \"127.0.0.1:{pg_port}\"\n\
         [[database]]\nname = \"app\"\ntenant = \"acme\"\norigin = \"postgres://app@127.0.0.1:1/app\"\norigin_password_env = \"CORDON_TEST_ORIGIN_PW\"\n\
         [[database.users]]\nname = \"reader\"\npassword_env = \"CORDON_TEST_PROXY_PW\"\n\
         {}secrets = [\"API_KEY\"]\n",
        worker_toml("hello", &hello_wasm())
    );
    let (dir, path) = config(&toml);
    let data = path.parent().unwrap().join(".cordon");
    let vault = cordon_vars::vault::Vault::open(&data, cordon_vars::vault::MasterKey::from_env_value(&key).unwrap()).unwrap();
    vault.put("acme", "hello", "API_KEY", &cordon_vars::vault::SecretValue::new("v".into())).unwrap();
    drop(vault);

    let env = [
        ("CORDON_MASTER_KEY", key.as_str()),
        ("CORDON_TEST_ORIGIN_PW", origin_password),
        ("CORDON_TEST_PROXY_PW", proxy_password),
        ("CORDON_TEST_HARMLESS", "stays"),
    ];
    let server = Server::start_with_env(&path, port, Some(dir), &env);
    server.wait_for("cordon is serving");
    // It started with the key from the environment: the worker's secret
    // was decrypted at start.
    let environ = environ_of(server.child.id());
    let text = String::from_utf8_lossy(&environ);
    assert!(text.contains("CORDON_TEST_HARMLESS=stays"), "other variables are left alone");
    for secret in [key.as_str(), origin_password, proxy_password] {
        assert!(!text.contains(secret), "a secret is still in /proc/PID/environ");
    }
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.child.id())).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    assert!(core.split_whitespace().filter(|w| *w == "0").count() == 2, "{core}");
    // Not dumpable: /proc/PID/environ and mem are root's, not the user's.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let meta = std::fs::metadata(format!("/proc/{}/environ", server.child.id())).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 0, "a non-dumpable process's /proc files belong to root");
    }
}
