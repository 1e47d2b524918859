//! A real, throwaway Postgres cluster per test: `initdb` into a temporary
//! directory, `pg_ctl start` on a free loopback port, `pg_ctl stop` and
//! removal of the directory on drop. Shared by the tests of every crate that
//! needs a real Postgres (`cordon-pgaccel`, `cordon-gateway`); a
//! dev-dependency only, never published.
//!
//! Guarantees:
//! - TCP connections always authenticate with SCRAM-SHA-256; nothing is
//!   trusted over TCP. The generated superuser password is only known to the
//!   test. Unix-socket connections (in the temporary directory only) are
//!   trusted.
//! - Every `TestPostgres` has its own directory and port, so clusters in one
//!   process or in parallel test processes never share anything.
//! - The cluster is stopped even if the test process dies without dropping it
//!   (a panic that aborts, a kill by a test timeout): a watchdog process,
//!   outside the test's process group, waits for the test process to go away
//!   and then stops the cluster and removes its directory.
//! - Tests never skip silently: if the Postgres server binaries are missing,
//!   `start` fails and says how to install them.
//!
//! Postgres refuses to run as root. When the tests run as root, `initdb`,
//! `pg_ctl` and the server run as the unprivileged `postgres` user (created
//! by Debian's `postgresql` package), or `nobody` if there is no such user,
//! and the temporary directory belongs to that user.

use std::fmt::Write as _;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::Duration;

use rand::Rng;
use rand::distr::Alphanumeric;
use tempfile::TempDir;
use tokio_postgres::{Client, NoTls};

/// The name of the bootstrap superuser of every test cluster.
const SUPERUSER: &str = "postgres";
/// How long `pg_ctl` may wait for the server to start or stop.
const PG_CTL_TIMEOUT_SECS: &str = "60";
/// How many free ports `start` tries before it gives up (another process may
/// take a port between the moment it is found free and the server's bind).
const PORT_ATTEMPTS: usize = 5;

/// A running Postgres cluster that belongs to one test.
pub struct TestPostgres {
    /// The loopback TCP port the server listens on (127.0.0.1 only).
    pub port: u16,
    /// The cluster's data directory.
    pub data_dir: PathBuf,
    /// The directory of the server's Unix socket (`.s.PGSQL.<port>`).
    pub socket_dir: PathBuf,
    password: String,
    bin: PgBin,
    run_as: Option<Account>,
    log_file: PathBuf,
    watchdog: Option<Child>,
    /// Declared last: removed after `Drop::drop` has stopped the server.
    dir: TempDir,
}

impl TestPostgres {
    /// Creates a cluster with `initdb` (SCRAM-SHA-256 with a generated
    /// superuser password for TCP, trust only on the private Unix socket),
    /// starts it on `127.0.0.1:<free port>` and waits until it accepts
    /// connections. Panics with the server log's tail if it does not start.
    pub fn start() -> TestPostgres {
        let bin = PgBin::find();
        let run_as = Account::for_current_user();
        // When the server runs as another user, its directory must sit in a
        // directory that user can traverse: /tmp, whatever TMPDIR says.
        let base = if run_as.is_some() { PathBuf::from("/tmp") } else { std::env::temp_dir() };
        let dir = tempfile::Builder::new()
            .prefix("cordon-pg-")
            // Private: the Unix socket inside trusts whoever reaches it.
            .permissions(fs::Permissions::from_mode(0o700))
            .tempdir_in(&base)
            .unwrap_or_else(|e| panic!("creating a temporary directory in {}: {e}", base.display()));
        let mut pg = TestPostgres {
            port: 0,
            data_dir: dir.path().join("data"),
            socket_dir: dir.path().to_path_buf(),
            password: rand::rng().sample_iter(Alphanumeric).take(32).map(char::from).collect(),
            bin,
            run_as,
            log_file: dir.path().join("server.log"),
            watchdog: None,
            dir,
        };
        if let Some(account) = &pg.run_as {
            account.give(pg.dir.path());
        }
        pg.watchdog = Some(pg.spawn_watchdog());
        pg.initdb();
        for attempt in 1..=PORT_ATTEMPTS {
            pg.port = free_port();
            pg.write_settings();
            match pg.pg_ctl_start() {
                Ok(()) => return pg,
                Err(e) if attempt < PORT_ATTEMPTS && e.port_taken => {
                    eprintln!("postgres could not bind port {}; trying another port", pg.port);
                }
                Err(e) => pg.fail(&format!("starting postgres on port {}: {}", pg.port, e.message)),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// The bootstrap superuser's name.
    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    /// The bootstrap superuser's password (SCRAM-SHA-256 over TCP).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// A `postgresql://` connection string for the superuser and `database`,
    /// accepted by `tokio_postgres::connect`.
    pub fn url(&self, database: &str) -> String {
        self.url_as(SUPERUSER, &self.password, database)
    }

    /// A `postgresql://` connection string for any role and database.
    pub fn url_as(&self, role: &str, password: &str, database: &str) -> String {
        format!("postgresql://{}:{}@127.0.0.1:{}/{}", percent_encode(role), percent_encode(password), self.port, percent_encode(database))
    }

    /// Connects to `database` as the superuser over TCP (SCRAM).
    pub async fn connect(&self, database: &str) -> Client {
        connect(&self.url(database)).await
    }

    /// Creates a login role with `password` (stored as a SCRAM verifier) and
    /// a database it owns. Other roles lose the right to connect to that
    /// database (`REVOKE CONNECT ... FROM PUBLIC`), as with real tenants:
    /// only its owner and superusers can use it.
    pub async fn create_role_and_database(&self, role: &str, password: &str, database: &str) {
        let client = self.connect("postgres").await;
        let (role, database) = (quote_ident(role), quote_ident(database));
        // One statement per call: CREATE DATABASE cannot run in the implicit
        // transaction of a multi-statement query.
        for sql in [
            format!("CREATE ROLE {role} LOGIN PASSWORD {}", quote_literal(password)),
            format!("CREATE DATABASE {database} OWNER {role}"),
            format!("REVOKE CONNECT, TEMPORARY ON DATABASE {database} FROM PUBLIC"),
        ] {
            client.batch_execute(&sql).await.unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
        }
    }

    /// Stops the server (fast shutdown: open connections are closed) and
    /// starts it again on the same port with the same data.
    pub fn restart(&self) {
        self.stop();
        self.start_again();
    }

    /// Stops the server (fast shutdown) and waits until it is down.
    pub fn stop(&self) {
        if let Err(e) = self.pg_ctl_stop("fast") {
            self.fail(&format!("stopping postgres: {e}"));
        }
    }

    /// Starts a stopped server again on the same port and waits until it
    /// accepts connections.
    pub fn start_again(&self) {
        // The port was free a moment ago; if something holds it (a socket
        // still closing), give it a few seconds.
        for _ in 0..10 {
            match self.pg_ctl_start() {
                Ok(()) => return,
                Err(e) if e.port_taken => thread::sleep(Duration::from_millis(500)),
                Err(e) => self.fail(&format!("starting postgres again on port {}: {}", self.port, e.message)),
            }
        }
        self.fail(&format!("starting postgres again: port {} stays taken", self.port));
    }

    fn initdb(&self) {
        let pwfile = self.dir.path().join("pwfile");
        self.write_file(&pwfile, &format!("{}\n", self.password));
        let output = self
            .command(&self.bin.initdb)
            .arg("--pgdata")
            .arg(&self.data_dir)
            .arg(format!("--username={SUPERUSER}"))
            .arg("--pwfile")
            .arg(&pwfile)
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .args(["--encoding=UTF8", "--locale=C", "--no-sync"])
            .output();
        let _ = fs::remove_file(&pwfile);
        if let Err(e) = check(output, "initdb") {
            panic!("{e}");
        }
        // Written out rather than left to initdb's defaults so that the rule
        // is visible here: SCRAM for every TCP connection, trust only on the
        // Unix socket in our private directory.
        self.write_file(
            &self.data_dir.join("pg_hba.conf"),
            "local all all trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n\
             host all all ::1/128 scram-sha-256\n",
        );
        // The settings that change per start (the port) live in their own
        // file, included from the end of postgresql.conf.
        let conf = self.data_dir.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).expect("reading postgresql.conf");
        text.push_str("\ninclude 'cordon-test.conf'\n");
        self.write_file(&conf, &text);
    }

    fn write_settings(&self) {
        let socket_dir = self.socket_dir.to_str().expect("a UTF-8 temporary directory").replace('\'', "''");
        let settings = format!(
            "listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{socket_dir}'\n\
             unix_socket_permissions = 0700\n\
             password_encryption = 'scram-sha-256'\n\
             max_connections = 200\n\
             shared_buffers = '16MB'\n\
             huge_pages = off\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             logging_collector = off\n",
            port = self.port,
        );
        self.write_file(&self.data_dir.join("cordon-test.conf"), &settings);
    }

    fn pg_ctl_start(&self) -> Result<(), StartError> {
        let log_before = fs::metadata(&self.log_file).map_or(0, |m| m.len());
        let output = self
            .command(&self.bin.pg_ctl)
            .arg("start")
            .arg("--pgdata")
            .arg(&self.data_dir)
            .arg("--log")
            .arg(&self.log_file)
            .args(["--wait", "--timeout", PG_CTL_TIMEOUT_SECS, "--silent"])
            .output();
        check(output, "pg_ctl start").map_err(|message| {
            // Only this attempt's part of the log counts.
            let log = fs::read(&self.log_file).unwrap_or_default();
            let log = String::from_utf8_lossy(log.get(log_before as usize..).unwrap_or_default());
            let port_taken = log.contains("could not bind") && log.contains("Address already in use");
            StartError { message, port_taken }
        })
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<(), String> {
        let output = self
            .command(&self.bin.pg_ctl)
            .arg("stop")
            .arg("--pgdata")
            .arg(&self.data_dir)
            .args(["--mode", mode, "--wait", "--timeout", PG_CTL_TIMEOUT_SECS, "--silent"])
            .output();
        check(output, "pg_ctl stop")
    }

    /// A process that outlives the test process (its own process group, so a
    /// test runner killing the test's group leaves it alone) and, when the
    /// test process ends without `Drop` having run, stops the server and
    /// removes the directory. It notices the end when its stdin, a pipe whose
    /// only writer is this process, reaches end-of-file. An `initdb` or
    /// `pg_ctl start` of the dead process may still be running: the watchdog
    /// gives it a second and repeats until the directory stays gone.
    fn spawn_watchdog(&self) -> Child {
        const SCRIPT: &str = r#"read _
for _ in 1 2 3 4 5 6 7 8 9 10; do
    sleep 1
    [ -e "$2" ] || break
    "$0" stop -D "$1" -m immediate -w -t 30; rm -rf "$2"
done"#;
        self.command(Path::new("/bin/sh"))
            .arg("-c")
            .arg(SCRIPT)
            .arg(&self.bin.pg_ctl)
            .arg(&self.data_dir)
            .arg(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawning /bin/sh for the postgres watchdog")
    }

    /// A command for a Postgres tool: as the unprivileged account if we are
    /// root, with a predictable locale and no inherited libpq settings.
    fn command(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        command.stdin(Stdio::null()).env("LC_ALL", "C").env_remove("PGDATA").env_remove("PGPORT").env_remove("PGHOST");
        if let Some(account) = &self.run_as {
            // std drops the supplementary groups when root changes uid.
            command.uid(account.uid).gid(account.gid).current_dir(self.dir.path());
        }
        command
    }

    /// Writes a file the server can read: owned by the server's account.
    fn write_file(&self, path: &Path, contents: &str) {
        fs::write(path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        if let Some(account) = &self.run_as {
            account.give(path);
        }
    }

    fn fail(&self, what: &str) -> ! {
        let log = fs::read_to_string(&self.log_file).unwrap_or_else(|e| format!("(no log: {e})"));
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        panic!("{what}\n--- last lines of {} ---\n{tail}", self.log_file.display());
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        // The server may already be down (a test called `stop`); a stop that
        // fails because there is no server is not an error here.
        if self.data_dir.join("postmaster.pid").exists()
            && let Err(e) = self.pg_ctl_stop("immediate")
        {
            eprintln!("stopping the test postgres in {}: {e}", self.data_dir.display());
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        // `self.dir` (a `TempDir`) removes the directory when it drops next.
    }
}

/// Why `pg_ctl start` failed.
struct StartError {
    message: String,
    /// The server could not bind its port: another process holds it.
    port_taken: bool,
}

/// Connects with a connection string and drives the connection on a task.
pub async fn connect(url: &str) -> Client {
    let (client, connection) =
        tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|e| panic!("connecting to {}: {}", redact(url), describe(&e)));
    tokio::spawn(async move {
        // Errors (the server restarting, say) reach the client's calls.
        let _ = connection.await;
    });
    client
}

/// A client error with the server's message, which `Display` leaves out.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match (e.as_db_error(), std::error::Error::source(e)) {
        (Some(db), _) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        (None, Some(source)) => format!("{e}: {source}"),
        (None, None) => e.to_string(),
    }
}

/// The connection string without its password, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) => match url[scheme + 3..at].find(':') {
            Some(colon) => format!("{}:***{}", &url[..scheme + 3 + colon], &url[at..]),
            None => url.to_owned(),
        },
        _ => url.to_owned(),
    }
}

/// Where the Postgres server programs are.
struct PgBin {
    initdb: PathBuf,
    pg_ctl: PathBuf,
}

impl PgBin {
    /// `initdb` on PATH (with the `pg_ctl` beside it), else the newest
    /// `/usr/lib/postgresql/<version>/bin` (Debian keeps them off PATH).
    fn find() -> PgBin {
        let on_path = std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .map(|dir| dir.join("initdb"))
            .find(|initdb| initdb.is_file())
            // Debian links initdb into PATH at most; its real directory
            // holds pg_ctl and postgres of the same version.
            .and_then(|initdb| initdb.canonicalize().ok())
            .and_then(|initdb| initdb.parent().map(Path::to_path_buf));
        let dir = on_path.filter(|dir| dir.join("pg_ctl").is_file()).or_else(newest_debian_bin_dir);
        match dir {
            Some(dir) => PgBin { initdb: dir.join("initdb"), pg_ctl: dir.join("pg_ctl") },
            None => panic!(
                "the Postgres server programs (initdb, pg_ctl) are not installed: neither on PATH \
                 nor in /usr/lib/postgresql/*/bin. The Postgres tests run a real Postgres; install \
                 it with `sudo apt-get install postgresql` (scripts/test.sh does this)"
            ),
        }
    }
}

fn newest_debian_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name.split('.').map(|n| n.parse().ok()).collect::<Option<Vec<u32>>>()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// The unprivileged account the server runs as when the tests run as root.
struct Account {
    uid: u32,
    gid: u32,
}

impl Account {
    /// `None` when we are not root (the server runs as us); otherwise the
    /// `postgres` account, or `nobody`.
    fn for_current_user() -> Option<Account> {
        if id(&["-u"]) != Some(0) {
            return None;
        }
        for name in ["postgres", "nobody"] {
            if let (Some(uid), Some(gid)) = (id(&["-u", name]), id(&["-g", name]))
                && uid != 0
            {
                return Some(Account { uid, gid });
            }
        }
        panic!(
            "the tests run as root and Postgres refuses to: there is no `postgres` or `nobody` \
             account to run it as (installing Debian's postgresql package creates `postgres`)"
        )
    }

    fn give(&self, path: &Path) {
        chown(path, Some(self.uid), Some(self.gid)).unwrap_or_else(|e| panic!("giving {} to uid {}: {e}", path.display(), self.uid));
    }
}

/// Runs `id` and parses its numeric answer.
fn id(args: &[&str]) -> Option<u32> {
    let output = Command::new("id").args(args).stderr(Stdio::null()).output().ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8(output.stdout).ok()?.trim().parse().ok()
}

fn check(output: std::io::Result<Output>, what: &str) -> Result<(), String> {
    let output = output.map_err(|e| format!("running {what}: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{what} failed ({}): {} {}",
        output.status,
        String::from_utf8_lossy(&output.stdout).trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

/// A port that was free on 127.0.0.1 a moment ago.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0 to find a free port");
    listener.local_addr().expect("the local address of a bound listener").port()
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for byte in s.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// A SQL identifier, double-quoted.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A SQL string literal, single-quoted (standard_conforming_strings is on).
fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}
