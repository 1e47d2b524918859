//! The resource ledger in `docs/SECURITY.md` is the contract of what a
//! tenant can make the host spend; each of its rows must name tests that
//! exist, so that the table cannot drift from the code.

use std::path::{Path, PathBuf};

use crate::harness::repo_root;

/// The rows of the table under `## The resource ledger`.
fn ledger_rows(security: &str) -> Vec<String> {
    let start = security.find("## The resource ledger").expect("docs/SECURITY.md has a resource ledger");
    let section = &security[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    section[..end].lines().filter(|l| l.starts_with('|')).skip(2).map(str::to_string).collect()
}

/// The test names of a row's last cell: every backticked `crate::path`.
fn tests_of(row: &str) -> Vec<String> {
    let cell = row.trim_end().trim_end_matches('|').rsplit('|').next().unwrap_or_default();
    cell.split('`').skip(1).step_by(2).filter(|t| t.contains("::")).map(str::to_string).collect()
}

/// The directory of each workspace package, by package name.
fn packages(root: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root.join("crates")).unwrap() {
        let dir = entry.unwrap().path();
        let Ok(manifest) = std::fs::read_to_string(dir.join("Cargo.toml")) else { continue };
        let name = manifest
            .lines()
            .find_map(|l| l.strip_prefix("name = \""))
            .map(|n| n.trim_end_matches('"').to_string())
            .expect("every crate names itself");
        out.push((name, dir));
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Whether `crate::module::…::name` is a test: a function `name` right
/// after a test attribute, in a file of that crate whose name, or a `mod`
/// in it, is the module the path names.
fn test_exists(packages: &[(String, PathBuf)], name: &str) -> Result<(), String> {
    let parts: Vec<&str> = name.split("::").collect();
    let (krate, function) = (parts[0], parts[parts.len() - 1]);
    let module = parts[..parts.len() - 1].iter().rev().find(|p| **p != "tests" && **p != "all").copied().unwrap_or(krate);
    let (_, dir) = packages.iter().find(|(n, _)| n == krate).ok_or_else(|| format!("no crate `{krate}`"))?;
    let mut files = Vec::new();
    rust_files(dir, &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let stem = file.file_stem().unwrap().to_string_lossy();
        let in_module = stem == module || module == krate || text.contains(&format!("mod {module}"));
        if !in_module {
            continue;
        }
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let trimmed = line.trim_start();
            let declares = trimmed.starts_with(&format!("fn {function}(")) || trimmed.starts_with(&format!("async fn {function}("));
            let attributed = lines[i.saturating_sub(3)..i].iter().any(|l| l.contains("#[test]") || l.contains("::test"));
            if declares && attributed {
                return Ok(());
            }
        }
    }
    Err(format!("no test `{function}` in module `{module}` of `{krate}`"))
}

#[test]
fn every_ledger_row_names_tests_that_exist() {
    let root = repo_root();
    let security = std::fs::read_to_string(root.join("docs/SECURITY.md")).unwrap();
    let rows = ledger_rows(&security);
    assert!(rows.len() >= 15, "the ledger lists every resource; found {} rows", rows.len());
    let packages = packages(&root);
    let mut problems = Vec::new();
    for row in &rows {
        let resource = row.split('|').nth(1).unwrap_or_default().trim();
        let tests = tests_of(row);
        if tests.is_empty() {
            problems.push(format!("{resource}: names no test"));
        }
        for t in tests {
            if let Err(e) = test_exists(&packages, &t) {
                problems.push(format!("{resource}: {t}: {e}"));
            }
        }
    }
    for resource in [
        "instances",
        "linear memory",
        "host-side memory",
        "CPU",
        "blocking threads",
        "file descriptors",
        "connections",
        "disk",
        "log",
        "kernel socket buffers",
    ] {
        if !rows.iter().any(|r| r.split('|').nth(1).is_some_and(|c| c.contains(resource))) {
            problems.push(format!("no row for {resource}"));
        }
    }
    assert!(problems.is_empty(), "the resource ledger in docs/SECURITY.md is out of date:\n{}", problems.join("\n"));
}

#[test]
fn the_ledger_check_catches_a_missing_test() {
    let packages = packages(&repo_root());
    test_exists(&packages, "cordon-gateway::all::ledger::every_ledger_row_names_tests_that_exist").unwrap();
    assert!(test_exists(&packages, "cordon-gateway::all::ledger::no_such_test").is_err());
    assert!(
        test_exists(&packages, "cordon-gateway::all::memory_budget::every_ledger_row_names_tests_that_exist").is_err(),
        "the module must match"
    );
    assert!(test_exists(&packages, "cordon-nothing::x::y").is_err());
    assert!(tests_of("| a | b | `x` and `cordon-kv::store::tests::t` |") == ["cordon-kv::store::tests::t"]);
}
