//! `cordon check`, `--version`, and every kind of config or component error.

use std::path::Path;

use crate::*;

fn check(path: &Path) -> (bool, String) {
    let out = cordon().args(["check", "--config"]).arg(path).output().unwrap();
    (out.status.success(), text(&out))
}

#[test]
fn version() {
    let out = cordon().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("cordon {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn a_good_config_passes_and_prints_the_posture() {
    let (_dir, path) = config(&worker_toml("hello", &hello_wasm()));
    let (ok, out) = check(&path);
    assert!(ok, "{out}");
    assert!(out.contains("\"strategy\": \"pooling\""), "{out}");
    assert!(out.contains("\"memory_protection_keys\""), "{out}");
    assert!(out.contains("ok: worker `hello`"), "{out}");
}

#[test]
fn the_example_config_passes() {
    // A copy of examples/, so the test writes nothing into the source tree.
    let dir = tempfile::tempdir().unwrap();
    for example in ["hello", "fetch", "kv-counter", "notes"] {
        std::fs::create_dir(dir.path().join(example)).unwrap();
        std::fs::copy(example_wasm(example), dir.path().join(format!("{example}/{example}.wasm"))).unwrap();
    }
    std::fs::copy(repo_root().join("examples/cordon.toml"), dir.path().join("cordon.toml")).unwrap();
    let (ok, out) = check(&dir.path().join("cordon.toml"));
    assert!(ok, "{out}");
    assert!(out.contains("ok: worker `fetch`") && out.contains("ok: worker `notes`") && out.contains("0 warning(s)"), "{out}");
}

#[test]
fn a_star_in_allowed_outbound_is_refused_or_warned_about() {
    let star = format!("{}allowed_outbound = [\"*\"]\n", worker_toml("hello", &hello_wasm()));
    let (_dir, path) = config(&star);
    let (ok, out) = check(&path);
    assert!(!ok, "`*` without the escape hatch is an error: {out}");
    assert!(out.contains("allowed_outbound[0]") && out.contains("allow_any_outbound_dangerously = true"), "{out}");

    let hatch = format!("{}allowed_outbound = [\"*\"]\nallow_any_outbound_dangerously = true\n", worker_toml("hello", &hello_wasm()));
    let (_dir, path) = config(&hatch);
    let (ok, out) = check(&path);
    assert!(ok, "{out}");
    assert!(out.contains("warning: worker `hello`") && out.contains("any public host") && out.contains("1 warning(s)"), "{out}");
}

#[test]
fn config_errors_name_the_file_line_and_key() {
    let (dir, path) = config("[server]\nlisten = \"127.0.0.1:8080\"\nlisen = \"oops\"\n");
    let (ok, out) = check(&path);
    assert!(!ok);
    let expected = format!("{}:3:1: `server.lisen`: unknown field `lisen`", path.display());
    assert!(out.contains(&expected), "expected {expected:?} in:\n{out}");
    assert!(out.contains("help: remove this key or fix its spelling"), "{out}");
    drop(dir);

    let toml = format!("{}\n[worker.limits]\ncpu_ms = 0\nmemory_mb = 99999\n", worker_toml("hello", &hello_wasm()));
    let (_dir, path) = config(&toml);
    let (ok, out) = check(&path);
    assert!(!ok);
    assert!(out.contains(":8:10: `worker[0].limits.cpu_ms`: must be between 1 and 60000, got 0"), "{out}");
    assert!(out.contains(":9:13: `worker[0].limits.memory_mb`: must be between 1 and 4096, got 99999"), "{out}");
    assert!(out.contains("2 error(s)"), "{out}");
}

#[test]
fn a_missing_config_file_is_named() {
    let (ok, out) = check(Path::new("/nonexistent/cordon.toml"));
    assert!(!ok);
    assert!(out.contains("/nonexistent/cordon.toml") && out.contains("cannot read"), "{out}");
}

#[test]
fn component_errors_are_each_reported() {
    let dir = tempfile::tempdir().unwrap();
    let text_file = dir.path().join("notes.wasm");
    std::fs::write(&text_file, "this is not wasm").unwrap();
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, wat::parse_str("(module (func (export \"f\")))").unwrap()).unwrap();
    let importer = dir.path().join("importer.wasm");
    std::fs::write(&importer, wat::parse_str("(component (import \"cordon:nope/thing\" (instance (export \"f\" (func)))))").unwrap())
        .unwrap();
    let no_handler = dir.path().join("empty.wasm");
    std::fs::write(&no_handler, wat::parse_str("(component)").unwrap()).unwrap();

    let toml = [("a", &text_file), ("b", &core), ("c", &importer), ("d", &no_handler)]
        .iter()
        .map(|(n, p)| worker_toml(n, p))
        .chain([worker_toml("good", &hello_wasm())])
        .collect::<Vec<_>>()
        .join("\n");
    let (_cfg, path) = config(&toml);
    let (ok, out) = check(&path);
    assert!(!ok);
    assert!(out.contains("worker `a`") && out.contains("not a WebAssembly file"), "{out}");
    assert!(out.contains("worker `b`") && out.contains("a core WebAssembly module, not a component"), "{out}");
    assert!(out.contains("worker `c`") && out.contains("imports `cordon:nope/thing`, which Cordon does not provide"), "{out}");
    assert!(out.contains("worker `d`") && out.contains("does not export `wasi:http/incoming-handler`"), "{out}");
    assert!(out.contains("ok: worker `good`"), "{out}");
    assert!(out.contains("4 of 5 worker(s) failed"), "{out}");
}

#[test]
fn required_memory_protection_keys_follow_the_cpu() {
    let toml = format!("[security]\nmemory_protection_keys = \"required\"\n{}", worker_toml("hello", &hello_wasm()));
    let (_dir, path) = config(&toml);
    let (ok, out) = check(&path);
    if cordon_runtime::policy::cpu_has_memory_protection_keys() {
        assert!(ok, "{out}");
        assert!(out.contains("\"active\": true"), "{out}");
    } else {
        assert!(!ok, "`required` must refuse on a CPU without PKU:\n{out}");
        assert!(out.contains("memory protection keys are required"), "{out}");
        assert!(out.contains("set memory_protection_keys = \"auto\""), "the message says how to fix it: {out}");
    }
}

#[test]
fn auto_reports_which_protection_is_in_force() {
    let (_dir, path) = config(&worker_toml("hello", &hello_wasm()));
    let (ok, out) = check(&path);
    assert!(ok, "{out}");
    let active = cordon_runtime::policy::cpu_has_memory_protection_keys();
    assert!(out.contains(&format!("\"active\": {active}")), "{out}");
    if !active {
        assert!(out.contains("guard pages"), "the fallback is named: {out}");
    }
}

#[test]
fn shared_memory_and_threads_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let threaded = dir.path().join("threads.wasm");
    let component = "(component (core module (memory 1 1 shared) (func (export \"f\") (drop (i32.atomic.load (i32.const 0))))))";
    std::fs::write(&threaded, wat::parse_str(component).unwrap()).unwrap();
    let (_cfg, path) = config(&worker_toml("threads", &threaded));
    let (ok, out) = check(&path);
    assert!(!ok, "{out}");
    assert!(out.contains("worker `threads`") && out.contains("not a valid component"), "{out}");
    assert!(out.to_ascii_lowercase().contains("thread"), "the reason names the threads proposal: {out}");
}

#[test]
fn check_refuses_a_data_directory_others_can_write() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
    let toml = format!("[server]\ndata_dir = \"{}\"\n{}", data.display(), worker_toml("hello", &hello_wasm()));
    let (_cfg, path) = config(&toml);
    let (ok, out) = check(&path);
    assert!(!ok, "{out}");
    assert!(out.contains("writable by group or others") && out.contains("chmod 700"), "{out}");
}

#[test]
fn an_import_without_its_grant_is_refused_by_check() {
    let (_dir, path) = config(&worker_toml("notes", &example_wasm("notes")));
    let (ok, out) = check(&path);
    assert!(!ok, "{out}");
    assert!(out.contains("imports `cordon:sql/sql@0.1.0`") && out.contains("add a [[worker.sql]] grant"), "{out}");

    let granted = format!("{}\n[[worker.sql]]\nbinding = \"DB\"\ndatabase = \"notes\"\n", worker_toml("notes", &example_wasm("notes")));
    let (_dir, path) = config(&granted);
    let (ok, out) = check(&path);
    assert!(ok, "{out}");
}
