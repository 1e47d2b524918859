//! The `cordon` binary as an operator runs it.

mod check;
mod durability;
mod reload;
mod secret;
mod serve;
mod shutdown;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn cordon() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cordon"))
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// The hello component, built once per test process.
pub fn hello_wasm() -> PathBuf {
    example_wasm("hello")
}

/// Builds the guest crates `names` under `dir` (relative to the repository)
/// for `wasm32-wasip2` into `target/guests`, and returns where the
/// components are.
fn build_guests(dir: &str, names: &[&str]) -> PathBuf {
    let root = repo_root();
    for name in names {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--release", "--target", "wasm32-wasip2", "--manifest-path"])
            .arg(root.join(format!("{dir}/{name}/Cargo.toml")))
            .arg("--target-dir")
            .arg(root.join("target/guests"))
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .status()
            .unwrap();
        assert!(status.success(), "building {dir}/{name} failed");
    }
    root.join("target/guests/wasm32-wasip2/release")
}

/// The component of `examples/NAME`; all examples are built once per test
/// process.
pub fn example_wasm(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| build_guests("examples", &["hello", "fetch", "kv-counter", "notes"]));
    dir.join(format!("{}.wasm", name.replace('-', "_")))
}

/// A component of `tests/guests` (`bindings`, `hostile`); all are built
/// once per test process.
pub fn test_guest_wasm(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| build_guests("tests/guests", &["bindings", "hostile"])).join(format!("{name}.wasm"))
}

/// Writes `toml` as `cordon.toml` in a new temp dir.
pub fn config(toml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cordon.toml");
    std::fs::write(&path, toml).unwrap();
    (dir, path)
}

pub fn worker_toml(name: &str, component: &Path) -> String {
    format!("[[worker]]\nname = \"{name}\"\ntenant = \"acme\"\ncomponent = \"{}\"\nroutes = [\"{name}.localhost/\"]\n", component.display())
}

pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}
