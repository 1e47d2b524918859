//! Reloading `cordon.toml` while serving: on SIGHUP, `cordon serve` reads
//! its config file again and makes the live registry follow its
//! `[[worker]]`s; `cordon reload` sends that SIGHUP and prints what it did.
//!
//! The server and `cordon reload` meet in the data directory. The
//! directory's lock file names the server's pid (`DataDirLock`), and the
//! server writes `DATA_DIR/reload.json` ([`Report`]): once when it can take
//! a SIGHUP (sequence 0, `serving`), then before and after every reload
//! (`reloading`, then `applied` or `refused`, with the next sequence
//! number). `cordon reload` signals only a server that holds the lock and
//! has written that first report (a SIGHUP before the handler exists would
//! kill it), and waits for a finished report newer than the one it read
//! before signalling. A reload that was already running then might have
//! read the file before the operator's edit, so it does not count: the
//! server runs one more after it, for the SIGHUP that arrived meanwhile.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cordon_config::Config;
use cordon_runtime::{DataDirLock, Runtime};

/// The report's file in the data directory.
pub const REPORT_FILE: &str = "reload.json";

/// How often `cordon reload` looks for the server's answer.
const POLL: Duration = Duration::from_millis(50);

/// What the server last said about reloading, as `DATA_DIR/reload.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// The server that wrote it.
    pub pid: u32,
    /// 0 for the report written at start, then one more for each reload.
    pub sequence: u64,
    pub state: State,
    /// The config file the server reads, as it resolved it at start.
    pub config: PathBuf,
    /// `tenant/name@version` of each new version deployed.
    #[serde(default)]
    pub deployed: Vec<String>,
    /// `tenant/name` of each worker removed.
    #[serde(default)]
    pub removed: Vec<String>,
    /// `tenant/name` of each worker the reload left as it was.
    #[serde(default)]
    pub unchanged: Vec<String>,
    /// The sections that differ from what the server started with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restart_needed: Vec<String>,
    /// Why the reload was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Written at start, once the server takes SIGHUP.
    Serving,
    /// A reload has started and may not have read the file yet.
    Reloading,
    Applied,
    Refused,
}

impl State {
    fn finished(self) -> bool {
        matches!(self, State::Applied | State::Refused)
    }
}

/// Why a reload was refused; nothing changed.
struct Refusal {
    restart_needed: Vec<String>,
    message: String,
}

impl Refusal {
    fn new(message: String) -> Refusal {
        Refusal { restart_needed: Vec::new(), message }
    }
}

/// What a reload changed.
#[derive(Default)]
struct Changes {
    deployed: Vec<String>,
    removed: Vec<String>,
    unchanged: Vec<String>,
}

/// The server's side: what a reload compares the file with, and how it
/// applies it.
pub struct Reloader {
    /// The path `serve` was given, read again as it was.
    path: PathBuf,
    /// The config the server started with, address overrides applied.
    started: Config,
    listen: Option<std::net::SocketAddr>,
    admin_listen: Option<std::net::SocketAddr>,
    /// The descriptor limits (soft, hard) the start checked the config against.
    descriptors: (u64, u64),
    runtime: Arc<Runtime>,
}

impl Reloader {
    pub fn new(
        path: &Path,
        started: &Config,
        listen: Option<std::net::SocketAddr>,
        admin_listen: Option<std::net::SocketAddr>,
        descriptors: (u64, u64),
        runtime: Arc<Runtime>,
    ) -> Reloader {
        Reloader { path: path.to_path_buf(), started: started.clone(), listen, admin_listen, descriptors, runtime }
    }

    /// Writes the report that says this server takes reloads. Call it once
    /// the SIGHUP handler is installed.
    pub fn announce(&self) {
        self.write(&self.report(0, State::Serving));
    }

    /// Reloads once for each SIGHUP, one at a time, until `stop` resolves.
    /// SIGHUPs that arrive during a reload make one more reload after it.
    pub async fn run(self, mut hangup: tokio::signal::unix::Signal, stop: impl std::future::Future<Output = ()>) {
        let this = Arc::new(self);
        tokio::pin!(stop);
        let mut sequence = 0;
        loop {
            tokio::select! {
                () = &mut stop => return,
                got = hangup.recv() => if got.is_none() { return },
            }
            sequence += 1;
            tracing::info!(config = %this.path.display(), reload = sequence, "SIGHUP received: reloading the config");
            // Before the file is read: `cordon reload` tells from it that
            // this reload may predate the operator's edit.
            this.write(&this.report(sequence, State::Reloading));
            let reloader = this.clone();
            // It compiles: never on the threads that serve connections.
            let outcome = match tokio::task::spawn_blocking(move || reloader.reload()).await {
                Ok(outcome) => outcome,
                Err(e) => Err(Refusal::new(format!("the reload failed: {e}"))),
            };
            let report = match outcome {
                Ok(changes) => {
                    tracing::info!(
                        reload = sequence,
                        deployed = ?changes.deployed,
                        removed = ?changes.removed,
                        unchanged = changes.unchanged.len(),
                        "reload applied"
                    );
                    Report {
                        deployed: changes.deployed,
                        removed: changes.removed,
                        unchanged: changes.unchanged,
                        ..this.report(sequence, State::Applied)
                    }
                }
                Err(refusal) => {
                    tracing::warn!(reload = sequence, error = %refusal.message, "reload refused; nothing changed");
                    Report { restart_needed: refusal.restart_needed, error: Some(refusal.message), ..this.report(sequence, State::Refused) }
                }
            };
            this.write(&report);
        }
    }

    fn report(&self, sequence: u64, state: State) -> Report {
        Report {
            pid: std::process::id(),
            sequence,
            state,
            config: std::fs::canonicalize(&self.path).unwrap_or_else(|_| self.path.clone()),
            deployed: Vec::new(),
            removed: Vec::new(),
            unchanged: Vec::new(),
            restart_needed: Vec::new(),
            error: None,
        }
    }

    /// A report that cannot be written costs `cordon reload` its answer,
    /// never the server its reload.
    fn write(&self, report: &Report) {
        if let Err(e) = write_report(&self.started.server.data_dir, report) {
            tracing::warn!(error = %format!("{e:#}"), "cannot write the reload report");
        }
    }

    /// Reads the file again and applies its `[[worker]]`s, or refuses the
    /// whole of it.
    fn reload(&self) -> Result<Changes, Refusal> {
        let mut new = crate::load_config(&self.path).map_err(|e| Refusal::new(format!("{e:#}")))?;
        if let Some(a) = self.listen {
            new.server.listen = a;
        }
        if let Some(a) = self.admin_listen {
            new.server.admin_listen = a;
        }
        let restart_needed = sections_that_differ(&self.started, &new);
        if !restart_needed.is_empty() {
            return Err(Refusal {
                message: format!(
                    "{} changed, but {} read only at start: restart the server to apply {}, or put back what it started with",
                    restart_needed.join(", "),
                    if restart_needed.len() == 1 { "it is" } else { "they are" },
                    if restart_needed.len() == 1 { "it" } else { "them" },
                ),
                restart_needed: restart_needed.into_iter().map(String::from).collect(),
            });
        }
        check_what_start_sized(&self.started, &new).map_err(Refusal::new)?;
        let (soft, hard) = self.descriptors;
        crate::descriptors::DescriptorBudget::of(&new).check(soft, hard).map_err(|e| Refusal::new(format!("{e:#}")))?;
        for warning in new.warnings() {
            tracing::warn!("{warning}");
        }
        let synced = self.runtime.sync_config_workers(&new.workers, true).map_err(|e| Refusal::new(e.to_string()))?;
        Ok(Changes { deployed: synced.deployed, removed: synced.removed, unchanged: synced.unchanged })
    }
}

/// The sections, other than `[[worker]]`, in which `new` differs from the
/// config the server started with: each sizes or configures something
/// built once at start (listeners, the engine and its pool, the storage
/// pools, the tenants' quotas, the Postgres accelerator and its proxy).
fn sections_that_differ(started: &Config, new: &Config) -> Vec<&'static str> {
    let mut differ = Vec::new();
    if started.server != new.server {
        differ.push("[server]");
    }
    if started.security != new.security {
        differ.push("[security]");
    }
    if started.sandbox != new.sandbox {
        differ.push("[sandbox]");
    }
    if started.storage != new.storage {
        differ.push("[storage]");
    }
    if started.tenants != new.tenants {
        differ.push("[[tenant]]");
    }
    if started.databases != new.databases {
        differ.push("[[database]]");
    }
    if started.postgres_proxy != new.postgres_proxy {
        differ.push("[postgres_proxy]");
    }
    differ
}

/// Worker settings that the start sized something for: the allocator's
/// memory slots (`sandbox.max_memory_mb`, by default the largest
/// `memory_mb` of the workers then).
fn check_what_start_sized(started: &Config, new: &Config) -> Result<(), String> {
    let slot_mb = started.max_worker_memory_mb();
    if let Some(w) = new.workers.iter().find(|w| w.limits.memory_mb > slot_mb) {
        return Err(format!(
            "worker `{}` of tenant `{}` has limits.memory_mb = {}, more than the {slot_mb} MiB memory slots the server sized at start \
             (for the largest memory_mb of its workers then); restart the server to serve it",
            w.name, w.tenant, w.limits.memory_mb
        ));
    }
    Ok(())
}

/// Replaces `DATA_DIR/reload.json` at once: written beside it, then
/// renamed over it, so a reader sees the old report or the new one. Not
/// synced: after a crash the report belongs to a dead pid, and nobody reads it.
fn write_report(data_dir: &Path, report: &Report) -> anyhow::Result<()> {
    let path = data_dir.join(REPORT_FILE);
    let tmp = data_dir.join(format!(".{REPORT_FILE}.tmp"));
    let text = serde_json::to_vec_pretty(report)?;
    // A leftover of a crash may have any mode; mode 0600 applies to new files only.
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(&text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// The report in `data_dir`, if there is one that can be read.
fn read_report(data_dir: &Path) -> Option<Report> {
    serde_json::from_slice(&std::fs::read(data_dir.join(REPORT_FILE)).ok()?).ok()
}

/// `cordon reload`: signals the server that serves `path` and prints what
/// its reload changed. Exits 1 when the reload was refused.
pub fn request(path: &Path, timeout: Duration) -> anyhow::Result<ExitCode> {
    // The server would refuse it too; nothing is sent for a file that does
    // not load (and only a file that loads names the data directory).
    let config = crate::load_config(path).context("the reload is refused; nothing was sent to the server")?;
    let data_dir = &config.server.data_dir;
    let pid = DataDirLock::holder(data_dir)?.ok_or_else(|| {
        anyhow::anyhow!("no server holds {}: start one with `cordon serve --config {}`", data_dir.display(), path.display())
    })?;
    let before = read_report(data_dir).filter(|r| r.pid == pid).ok_or_else(|| {
        anyhow::anyhow!(
            "the server holding {} (pid {pid}) is not ready for reloads yet; try again once it logs `cordon is serving`",
            data_dir.display()
        )
    })?;
    let file = std::fs::canonicalize(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    if before.config != file {
        anyhow::bail!(
            "the server holding {} (pid {pid}) serves {}, not {}; a reload reads the file the server started with",
            data_dir.display(),
            before.config.display(),
            file.display()
        );
    }
    let pid_t = libc::pid_t::try_from(pid).context("the lock names an impossible pid")?;
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is the
    // lock's holder, which has installed its SIGHUP handler (it wrote the
    // report above).
    if unsafe { libc::kill(pid_t, libc::SIGHUP) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("cannot signal the server (pid {pid})"));
    }
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(report) = read_report(data_dir).filter(|r| r.pid == pid && r.state.finished() && r.sequence > before.sequence) {
            return Ok(print(&report));
        }
        if DataDirLock::holder(data_dir)? != Some(pid) {
            anyhow::bail!("the server (pid {pid}) stopped before it answered; see its log");
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "the server (pid {pid}) has not finished the reload within {} s; it may still be compiling: see its log",
                timeout.as_secs()
            );
        }
        std::thread::sleep(POLL);
    }
}

fn print(report: &Report) -> ExitCode {
    let config = report.config.display();
    if report.state == State::Refused {
        println!("reload {} of {config} refused; the server serves what it served before:", report.sequence);
        println!("{}", report.error.as_deref().unwrap_or("(no reason given)"));
        if !report.restart_needed.is_empty() {
            println!("needs a restart: {}", report.restart_needed.join(", "));
        }
        return ExitCode::FAILURE;
    }
    println!("reload {} of {config} applied:", report.sequence);
    for (what, list) in [("deployed", &report.deployed), ("removed", &report.removed), ("unchanged", &report.unchanged)] {
        for item in list {
            println!("  {what} {item}");
        }
    }
    if report.deployed.is_empty() && report.removed.is_empty() {
        println!("  nothing changed");
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config in `dir` with `extra` before one worker per `(name, memory_mb)`.
    fn config(dir: &Path, extra: &str, workers: &[(&str, u64)]) -> Config {
        std::fs::write(dir.join("x.wasm"), b"").unwrap();
        let mut text = format!("{extra}\n");
        for (name, memory_mb) in workers {
            text.push_str(&format!(
                "[[worker]]\nname = \"{name}\"\ntenant = \"acme\"\ncomponent = \"x.wasm\"\nroutes = [\"{name}/\"]\n[worker.limits]\nmemory_mb = {memory_mb}\n"
            ));
        }
        Config::parse(&dir.join("cordon.toml"), &text).unwrap()
    }

    #[test]
    fn workers_may_change_and_every_other_section_is_named_when_it_differs() {
        let tmp = tempfile::tempdir().unwrap();
        let started = config(tmp.path(), "", &[("a", 64)]);
        let workers_only = config(tmp.path(), "", &[("b", 32), ("c", 64)]);
        assert!(sections_that_differ(&started, &workers_only).is_empty());
        let changed = config(
            tmp.path(),
            "[server]\nkeep_alive_timeout_ms = 1234\n[sandbox]\nmax_instances = 10\n[storage]\nkv_threads = 2\n[[tenant]]\nname = \"acme\"\ncpu_weight = 5",
            &[("a", 64)],
        );
        assert_eq!(sections_that_differ(&started, &changed), ["[server]", "[sandbox]", "[storage]", "[[tenant]]"]);
    }

    #[test]
    fn a_worker_larger_than_the_memory_slots_sized_at_start_needs_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let started = config(tmp.path(), "", &[("a", 64), ("b", 128)]);
        assert_eq!(check_what_start_sized(&started, &config(tmp.path(), "", &[("a", 128)])), Ok(()));
        let err = check_what_start_sized(&started, &config(tmp.path(), "", &[("a", 256)])).unwrap_err();
        assert!(err.contains("worker `a`") && err.contains("128 MiB memory slots"), "{err}");
    }
}
