//! `cordon secret put`, `list` and `delete`: grants are enforced, values
//! come from stdin only, and a value never shows up in output or, in plain
//! text, on disk.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use cordon_vars::vault::{MasterKey, Vault};

use crate::*;

const VALUE: &str = "sup3r-s3cret-VALUE-xyz";
const OTHER_VALUE: &str = "an0ther-s3cret-VALUE-abc";
const WRONG_KEY: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A config with worker `notes` of tenant `acme`, granted `secrets`.
fn setup(secrets: &str) -> (tempfile::TempDir, PathBuf) {
    config(&format!("{}secrets = [{secrets}]\n", worker_toml("notes", &hello_wasm())))
}

fn data_dir(config: &Path) -> PathBuf {
    config.parent().unwrap().join(".cordon")
}

/// Runs `cordon secret <args[0]> --config CONFIG <args[1..]>` with `stdin`,
/// and checks that no secret value appears in what it printed.
fn secret(config: &Path, args: &[&str], stdin: &[u8], master_key: Option<&str>) -> Output {
    let mut cmd = cordon();
    cmd.arg("secret").arg(args[0]).arg("--config").arg(config).args(&args[1..]);
    cmd.env_remove("CORDON_MASTER_KEY").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(key) = master_key {
        cmd.env("CORDON_MASTER_KEY", key);
    }
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    // A refused command may exit without reading: a broken pipe is fine.
    let _ = input.write_all(stdin);
    drop(input);
    let out = child.wait_with_output().unwrap();
    let shown = text(&out);
    for value in [VALUE, OTHER_VALUE, WRONG_KEY] {
        assert!(!shown.contains(value), "the output shows {value:?}:\n{shown}");
    }
    out
}

fn put(config: &Path, key: &str, value: &str) -> Output {
    secret(config, &["put", "--worker", "notes", key], value.as_bytes(), None)
}

fn failed_with(out: &Output, needle: &str) {
    assert_eq!(out.status.code(), Some(1), "{}", text(out));
    assert!(String::from_utf8_lossy(&out.stderr).contains(needle), "expected {needle:?} in:\n{}", text(out));
}

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "{}", text(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value stored for worker `notes`, read with the key file's key.
fn stored(config: &Path, name: &str) -> Option<String> {
    let dir = data_dir(config);
    let hex: String = std::fs::read(dir.join("master.key")).unwrap().iter().map(|b| format!("{b:02x}")).collect();
    let vault = Vault::open(&dir, MasterKey::from_env_value(&hex).unwrap()).unwrap();
    vault.get("acme", "notes", name).unwrap().map(|v| v.expose().to_string())
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { out.extend(files(&path)) } else { out.push(path) }
    }
    out
}

#[test]
fn put_then_list_shows_the_name_and_marks_the_rest() {
    let (_dir, path) = setup("\"API_KEY\", \"DB_PASSWORD\"");
    let out = put(&path, "API_KEY", &format!("{VALUE}\n"));
    assert_eq!(stdout(&out), "secret API_KEY stored for worker notes (tenant acme)\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("created a new master key"), "{}", text(&out));
    assert_eq!(stored(&path, "API_KEY").as_deref(), Some(VALUE));

    let list = stdout(&secret(&path, &["list", "--worker", "notes"], b"", None));
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 2, "{list}");
    assert_eq!(lines[0], "API_KEY");
    assert!(lines[1].starts_with("DB_PASSWORD  (granted but not stored"), "{list}");

    // No longer granted: still listed, and marked.
    std::fs::write(&path, format!("{}secrets = [\"DB_PASSWORD\"]\n", worker_toml("notes", &hello_wasm()))).unwrap();
    let list = stdout(&secret(&path, &["list", "--worker", "notes"], b"", None));
    assert!(list.lines().any(|l| l.starts_with("API_KEY  (stored but no longer granted")), "{list}");
}

#[test]
fn a_name_not_granted_or_an_unknown_worker_is_refused_with_a_hint() {
    let (_dir, path) = setup("\"API_KEY\"");
    let out = put(&path, "OTHER", VALUE);
    failed_with(&out, "secret `OTHER` is not granted to worker `notes`");
    failed_with(&out, "(`secrets = [\"API_KEY\", \"OTHER\"]`)");
    assert!(!data_dir(&path).exists(), "nothing is created for a refused put");

    let out = secret(&path, &["put", "--worker", "nobody", "API_KEY"], VALUE.as_bytes(), None);
    failed_with(&out, "there is no worker `nobody` in");
    failed_with(&out, "its workers are notes");
}

#[test]
fn a_name_that_two_tenants_use_needs_the_tenant() {
    let acme = format!("{}secrets = [\"API_KEY\"]\n", worker_toml("notes", &hello_wasm()));
    let globex = acme.replace("tenant = \"acme\"", "tenant = \"globex\"").replace("notes.localhost", "notes.globex.localhost");
    let (_dir, path) = config(&format!("{acme}{globex}"));

    // Without --tenant, neither tenant's worker is picked for the other.
    let out = secret(&path, &["put", "--worker", "notes", "API_KEY"], VALUE.as_bytes(), None);
    failed_with(&out, "workers of several tenants are named `notes`");
    failed_with(&out, "--tenant acme");
    assert!(!data_dir(&path).exists(), "nothing is created for a refused put");

    stdout(&secret(&path, &["put", "--tenant", "globex", "--worker", "notes", "API_KEY"], VALUE.as_bytes(), None));
    let dir = data_dir(&path);
    let hex: String = std::fs::read(dir.join("master.key")).unwrap().iter().map(|b| format!("{b:02x}")).collect();
    let vault = Vault::open(&dir, MasterKey::from_env_value(&hex).unwrap()).unwrap();
    assert_eq!(vault.get("globex", "notes", "API_KEY").unwrap().map(|v| v.expose().to_string()).as_deref(), Some(VALUE));
    assert!(vault.get("acme", "notes", "API_KEY").unwrap().is_none(), "acme's worker of the same name has no value");
    drop(vault);

    let list = stdout(&secret(&path, &["list", "--tenant", "acme", "--worker", "notes"], b"", None));
    assert!(list.contains("API_KEY  (granted but not stored"), "{list}");
    let out = secret(&path, &["list", "--tenant", "initech", "--worker", "notes"], b"", None);
    failed_with(&out, "there is no worker `notes` of tenant `initech`");
    failed_with(&out, "belong to the tenants acme, globex");
}

#[test]
fn the_value_is_read_from_stdin_without_one_line_ending() {
    let (_dir, path) = setup("\"API_KEY\"");
    for (input, expected) in [("a\r\n", "a"), ("a\n\n", "a\n"), ("a", "a"), (" a b \n", " a b ")] {
        stdout(&put(&path, "API_KEY", input));
        assert_eq!(stored(&path, "API_KEY").as_deref(), Some(expected), "{input:?}");
    }
    let max = "x".repeat(64 * 1024);
    stdout(&put(&path, "API_KEY", &format!("{max}\n")));
    assert_eq!(stored(&path, "API_KEY").map(|v| v.len()), Some(64 * 1024));

    failed_with(&put(&path, "API_KEY", ""), "the value of API_KEY on stdin is empty");
    failed_with(&put(&path, "API_KEY", "\n"), "the value of API_KEY on stdin is empty");
    failed_with(&put(&path, "API_KEY", &format!("{max}y")), "more than 65536 bytes");
    failed_with(&secret(&path, &["put", "--worker", "notes", "API_KEY"], b"\xff\xfe", None), "not UTF-8");
    assert_eq!(stored(&path, "API_KEY").map(|v| v.len()), Some(64 * 1024), "a refused value replaces nothing");

    // There is no argument for the value.
    let out = secret(&path, &["put", "--worker", "notes", "API_KEY", "hunter2"], b"v", None);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn delete_removes_a_secret() {
    let (_dir, path) = setup("\"API_KEY\"");
    failed_with(&secret(&path, &["delete", "--worker", "notes", "API_KEY"], b"", None), "nothing to delete");
    stdout(&put(&path, "API_KEY", VALUE));
    let out = secret(&path, &["delete", "--worker", "notes", "API_KEY"], b"", None);
    assert_eq!(stdout(&out), "secret API_KEY deleted for worker notes (tenant acme)\n");
    assert_eq!(stored(&path, "API_KEY"), None);
    let list = stdout(&secret(&path, &["list", "--worker", "notes"], b"", None));
    assert!(list.starts_with("API_KEY  (granted but not stored"), "{list}");
    failed_with(&secret(&path, &["delete", "--worker", "notes", "API_KEY"], b"", None), "nothing to delete");
}

#[test]
fn a_wrong_master_key_is_refused_clearly() {
    let (_dir, path) = setup("\"API_KEY\"");
    stdout(&put(&path, "API_KEY", VALUE));
    for args in [&["put", "--worker", "notes", "API_KEY"][..], &["list", "--worker", "notes"], &["delete", "--worker", "notes", "API_KEY"]]
    {
        let out = secret(&path, args, OTHER_VALUE.as_bytes(), Some(WRONG_KEY));
        failed_with(&out, "the master key from the CORDON_MASTER_KEY environment variable does not match the key");
        failed_with(&out, "secrets.sqlite3");
    }
    let out = secret(&path, &["list", "--worker", "notes"], b"", Some("not-hex"));
    failed_with(&out, "CORDON_MASTER_KEY must be 64 hexadecimal characters");
    assert_eq!(stored(&path, "API_KEY").as_deref(), Some(VALUE), "the wrong key changed nothing");
}

#[test]
fn the_plaintext_is_absent_from_every_file_in_the_data_dir() {
    let (_dir, path) = setup("\"API_KEY\", \"DB_PASSWORD\"");
    stdout(&put(&path, "API_KEY", OTHER_VALUE));
    stdout(&put(&path, "API_KEY", VALUE));
    stdout(&put(&path, "DB_PASSWORD", OTHER_VALUE));
    let dir = data_dir(&path);
    let all = files(&dir);
    assert!(all.iter().any(|p| p.ends_with("secrets.sqlite3")) && all.iter().any(|p| p.ends_with("master.key")), "{all:?}");
    for file in all {
        let bytes = std::fs::read(&file).unwrap();
        for value in [VALUE, OTHER_VALUE] {
            assert!(!bytes.windows(value.len()).any(|w| w == value.as_bytes()), "{} contains {value:?}", file.display());
        }
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600, "{}", file.display());
    }
}

#[test]
fn secret_commands_run_beside_a_server_holding_the_lock() {
    use std::os::fd::AsRawFd;
    let (_dir, path) = setup("\"API_KEY\"");
    let dir = data_dir(&path);
    std::fs::create_dir(&dir).unwrap();
    let lock = std::fs::File::create(dir.join("lock")).unwrap();
    // SAFETY: flock on a file descriptor this test owns; no memory-safety preconditions.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    stdout(&put(&path, "API_KEY", VALUE));
    assert_eq!(stdout(&secret(&path, &["list", "--worker", "notes"], b"", None)), "API_KEY\n");
    stdout(&secret(&path, &["delete", "--worker", "notes", "API_KEY"], b"", None));
    drop(lock);
}

#[test]
fn a_data_directory_that_others_can_write_is_refused_by_secret_commands_and_serve() {
    use std::os::unix::fs::PermissionsExt as _;
    let (_dir, config) = setup("\"API_KEY\"");
    assert!(put(&config, "API_KEY", VALUE).status.success());
    let data = data_dir(&config);
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
    let fix = format!("chmod 700 {}", data.display());
    failed_with(&secret(&config, &["list", "--worker", "notes"], b"", None), &fix);
    failed_with(&put(&config, "API_KEY", OTHER_VALUE), &fix);
    let out = cordon().args(["serve", "--config"]).arg(&config).env_remove("CORDON_MASTER_KEY").output().unwrap();
    assert!(!out.status.success() && text(&out).contains(&fix), "{}", text(&out));
    // A store directory beside it is checked as well.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::create_dir_all(data.join("sql")).unwrap();
    std::fs::set_permissions(data.join("sql"), std::fs::Permissions::from_mode(0o777)).unwrap();
    failed_with(&secret(&config, &["list", "--worker", "notes"], b"", None), &format!("chmod 700 {}", data.join("sql").display()));
    std::fs::set_permissions(data.join("sql"), std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(secret(&config, &["list", "--worker", "notes"], b"", None).status.success());
    assert_eq!(stored(&config, "API_KEY").as_deref(), Some(VALUE));
}

/// The store opened the way `serve` opens it: with the key file, finishing
/// a rotation that was interrupted.
fn open_store(data: &Path) -> Vault {
    Vault::open(data, MasterKey::load_with_env(None, data).unwrap().0).unwrap()
}

/// Every one of `secrets` (tenant, name, value) of worker `w` reads back
/// from `vault` as `expected` says.
fn check_secrets<'a>(vault: &Vault, secrets: impl IntoIterator<Item = &'a (String, String, String)>, expected: impl Fn(&str) -> bool) {
    for (tenant, name, value) in secrets {
        let read = vault.get(tenant, "w", name).unwrap().map(|v| v.expose().to_string());
        assert_eq!(read.as_deref(), expected(tenant).then_some(value.as_str()), "{tenant}/{name}");
    }
}

/// A store of 4 tenants × 100 secrets beside the config's worker.
fn many_secrets(config: &Path) -> Vec<(String, String, String)> {
    stdout(&put(config, "API_KEY", VALUE));
    let data = data_dir(config);
    let vault = Vault::open(&data, MasterKey::load_with_env(None, &data).unwrap().0).unwrap();
    let mut all = Vec::new();
    for t in 0..4 {
        for i in 0..100 {
            let (tenant, name, value) = (format!("tenant{t}"), format!("S{i}"), format!("value-{t}-{i}"));
            vault.put(&tenant, "w", &name, &cordon_vars::vault::SecretValue::new(value.clone())).unwrap();
            all.push((tenant, name, value));
        }
    }
    all
}

fn rotate_key(config: &Path) -> std::process::Child {
    cordon()
        .args(["secret", "rotate-key", "--config"])
        .arg(config)
        .env_remove("CORDON_MASTER_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn key_file(data: &Path) -> Vec<u8> {
    std::fs::read(data.join("master.key")).unwrap()
}

#[test]
fn rotate_key_reseals_every_secret_under_a_new_key_file() {
    let (_dir, config) = setup("\"API_KEY\"");
    let all = many_secrets(&config);
    let data = data_dir(&config);
    let before = key_file(&data);
    let out = secret(&config, &["rotate-key"], b"", None);
    let shown = stdout(&out);
    assert!(shown.contains("re-encrypted 401 secret(s) of 5 tenant(s)"), "{shown}");
    assert!(text(&out).contains("back it up"), "{}", text(&out));
    assert_ne!(key_file(&data), before);
    assert!(!data.join("master.key.next").exists());
    // The old key opens nothing any more.
    let old: String = before.iter().map(|b| format!("{b:02x}")).collect();
    failed_with(&secret(&config, &["list", "--worker", "notes"], b"", Some(&old)), "does not match the key");
    check_secrets(&open_store(&data), &all, |_| true);
    // One tenant alone.
    let shown = stdout(&secret(&config, &["rotate-key", "--tenant", "tenant2"], b"", None));
    assert!(shown.contains("re-encrypted 100 secret(s) of tenant tenant2"), "{shown}");
    check_secrets(&open_store(&data), &all, |_| true);
}

#[test]
fn rotate_key_with_the_key_in_the_environment_needs_the_new_key_from_the_operator() {
    let (_dir, config) = setup("\"API_KEY\"");
    let old = "11".repeat(32);
    let new = "22".repeat(32);
    stdout(&secret(&config, &["put", "--worker", "notes", "API_KEY"], VALUE.as_bytes(), Some(&old)));
    failed_with(&secret(&config, &["rotate-key"], b"", Some(&old)), "CORDON_NEW_MASTER_KEY");
    let out = cordon()
        .args(["secret", "rotate-key", "--config"])
        .arg(&config)
        .env("CORDON_MASTER_KEY", &old)
        .env("CORDON_NEW_MASTER_KEY", &new)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("restart `cordon serve`"), "{}", text(&out));
    failed_with(&secret(&config, &["list", "--worker", "notes"], b"", Some(&old)), "does not match the key");
    assert_eq!(stdout(&secret(&config, &["list", "--worker", "notes"], b"", Some(&new))), "API_KEY\n");
    assert!(!data_dir(&config).join("master.key").exists(), "no key file is written for a key from the environment");
}

/// `rotate-key` killed with SIGKILL at points spread over its whole run:
/// each time, the store opens with the key files as they were left, and
/// every secret reads back unchanged.
#[test]
fn a_rotation_killed_at_any_point_loses_nothing() {
    let (_dir, config) = setup("\"API_KEY\"");
    let all = many_secrets(&config);
    let data = data_dir(&config);
    let started = std::time::Instant::now();
    assert!(rotate_key(&config).wait().unwrap().success());
    let full = started.elapsed();
    let (mut rotated, mut interrupted) = (0, 0);
    const KILLS: u32 = 16;
    for i in 0..KILLS {
        let before = key_file(&data);
        let mut child = rotate_key(&config);
        std::thread::sleep(full * i / KILLS);
        let _ = child.kill();
        child.wait().unwrap();
        if data.join("master.key.next").exists() {
            interrupted += 1;
        }
        // Opening finishes a rotation that committed; every secret is there.
        check_secrets(&open_store(&data), &all, |_| true);
        if key_file(&data) != before {
            rotated += 1;
        }
    }
    eprintln!("{KILLS} kills over {full:?}: {rotated} rotations completed, {interrupted} left master.key.next behind");
    assert_eq!(stored(&config, "API_KEY").as_deref(), Some(VALUE));
}

#[test]
fn shred_tenant_destroys_a_removed_tenants_secrets_only() {
    let (_dir, config) = setup("\"API_KEY\"");
    let all = many_secrets(&config);
    let data = data_dir(&config);
    failed_with(&secret(&config, &["shred-tenant", "acme", "--yes"], b"", None), "still has workers");
    failed_with(&secret(&config, &["shred-tenant", "tenant1"], b"", None), "--yes");
    let shown = stdout(&secret(&config, &["shred-tenant", "tenant1", "--yes"], b"", None));
    assert!(shown.contains("100 secret(s) and its key are gone"), "{shown}");
    check_secrets(&open_store(&data), &all, |tenant| tenant != "tenant1");
    failed_with(&secret(&config, &["shred-tenant", "tenant1", "--yes"], b"", None), "nothing to re-key or shred");
}
