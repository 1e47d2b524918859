use std::os::unix::fs::PermissionsExt;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loads_compiled_code_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let options = || Options { data_dir: Some(&data), ..Options::default() };

    let first = start_with(&standard_workers(), options()).await;
    let health = first.health().await;
    for w in health["workers"].as_array().unwrap() {
        assert_eq!(w["code"], "compiled", "{w}");
    }
    first.shutdown().await;

    let cache_dir = data.join("cache/components");
    let mode = std::fs::metadata(&cache_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "only Cordon may write the cache");
    assert_eq!(std::fs::read_dir(&cache_dir).unwrap().count(), 2, "one entry per component");

    let second = start_with(&standard_workers(), options()).await;
    let health = second.health().await;
    for w in health["workers"].as_array().unwrap() {
        assert_eq!(w["code"], "cache", "restart must not recompile: {w}");
    }
    assert_eq!(second.get("hello.localhost", "/").await.status, 200);
    second.shutdown().await;

    // A damaged entry is detected and recompiled, never loaded.
    for entry in std::fs::read_dir(&cache_dir).unwrap() {
        let path = entry.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    }
    let third = start_with(&standard_workers(), options()).await;
    for w in third.health().await["workers"].as_array().unwrap() {
        assert_eq!(w["code"], "compiled", "{w}");
    }
    assert_eq!(third.get("hello.localhost", "/").await.status, 200);
}
