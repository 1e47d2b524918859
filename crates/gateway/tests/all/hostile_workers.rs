//! Hostile guests, each answered correctly while a well-behaved worker on
//! the same server keeps answering within its normal latency.

use std::time::{Duration, Instant};

use crate::harness::*;

/// Budget for one `hello` request while an attack runs: far above its normal
/// latency (a few ms) and far below anything a starved server would show.
const HELLO_BUDGET: Duration = Duration::from_millis(300);

/// Runs `attack` `copies` times concurrently while timing `hello` requests
/// back to back; returns the attack responses.
async fn under_attack(s: &TestServer, path: &str, copies: usize) -> Vec<Response> {
    // Baseline first, also warming the hello worker.
    for _ in 0..5 {
        assert_eq!(s.get("hello.localhost", "/").await.status, 200);
    }
    let attacks: Vec<_> = (0..copies)
        .map(|_| {
            let (addr, path) = (s.addr, path.to_string());
            tokio::spawn(async move { request(addr, "GET", "hostile.localhost", &path, &[], None).await })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    let mut served = 0;
    while !attacks.iter().all(|a| a.is_finished()) {
        let started = Instant::now();
        let r = s.get("hello.localhost", "/").await;
        assert_eq!(r.status, 200, "hello must keep working during {path}");
        slowest = slowest.max(started.elapsed());
        served += 1;
    }
    let mut out = Vec::new();
    for a in attacks {
        out.push(a.await.unwrap());
    }
    assert!(slowest < HELLO_BUDGET, "hello took {slowest:?} during {path} ({served} requests)");
    // And the hostile worker itself still serves.
    assert_eq!(s.get("hostile.localhost", "/").await.text(), "ok from hostile");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_is_stopped_at_its_cpu_limit() {
    let s = start(&standard_workers()).await;
    let started = Instant::now();
    // More loops than threads: only yielding at every tick keeps hello alive.
    let responses = under_attack(&s, "/loop", 4).await;
    for r in &responses {
        assert_eq!(r.status, 503);
        assert_eq!(r.error_code(), "cpu_limit_exceeded");
    }
    assert!(started.elapsed() < Duration::from_secs(3), "stopped close to the 50 ms limit, not at the wall clock: {:?}", started.elapsed());
    let id = responses[0].header("x-request-id").unwrap().to_string();
    let line = wait_for_log(&id, |e| e["message"] == "request").await;
    let cpu_us = line["cpu_us"].as_u64().unwrap();
    assert!((50_000..120_000).contains(&cpu_us), "charged {cpu_us} us of CPU for a 50 ms limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_hits_its_memory_limit() {
    let s = start(&standard_workers()).await;
    for r in under_attack(&s, "/oom", 2).await {
        assert_eq!(r.status, 500);
        assert_eq!(r.error_code(), "memory_limit_exceeded");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_recursion_traps() {
    let s = start(&standard_workers()).await;
    for r in under_attack(&s, "/recurse", 2).await {
        assert_eq!(r.status, 500);
        assert_eq!(r.error_code(), "worker_crashed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_is_a_500_without_internals() {
    let s = start(&standard_workers()).await;
    for r in under_attack(&s, "/trap", 2).await {
        assert_eq!(r.status, 500);
        assert_eq!(r.error_code(), "worker_crashed");
        let text = r.text();
        for leak in ["/work", "/root", "src/", ".rs", "wasm backtrace", "0x"] {
            assert!(!text.contains(leak), "error leaks `{leak}`: {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_over_the_limit_is_cut_off() {
    let s = start(&standard_workers()).await;
    // Streamed without a length: the head is already out, so the body stops
    // at the limit and the client sees an incomplete response.
    for r in under_attack(&s, "/big", 2).await {
        assert_eq!(r.status, 200);
        assert!(r.body_error.is_some(), "the cut-off must be visible to the client");
        assert!(r.body.len() <= 1024 * 1024 + 64 * 1024, "{} bytes got through a 1 MiB limit", r.body.len());
    }
    // Declared up front: refused before anything is sent.
    let r = s.get("hostile.localhost", "/big-declared?bytes=2000000").await;
    assert_eq!(r.status, 500);
    assert_eq!(r.error_code(), "response_too_large");
    // The refused request is still charged for the CPU it used.
    let id = r.header("x-request-id").unwrap().to_string();
    let line = wait_for_log(&id, |e| e["message"] == "request").await;
    assert_eq!(line["outcome"], "response_too_large");
    assert!(line["cpu_us"].as_u64().unwrap() > 0, "{line}");
    // Under the limit, both work.
    let r = s.get("hostile.localhost", "/big-declared?bytes=1000").await;
    assert_eq!((r.status, r.body.len()), (200, 1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_after_the_head_cuts_the_body() {
    let s = start(&standard_workers()).await;
    let r = s.get("hostile.localhost", "/panic-after-headers").await;
    assert_eq!(r.status, 200);
    assert!(r.body_error.is_some(), "a worker that dies mid-body must not look like a complete response");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interim_status_is_not_a_response() {
    let s = start(&standard_workers()).await;
    for code in ["100", "101", "103"] {
        let r = s.get("hostile.localhost", &format!("/status?code={code}")).await;
        assert_eq!(r.status, 500, "{code}");
        assert_eq!(r.error_code(), "invalid_response");
    }
    assert_eq!(s.get("hostile.localhost", "/status?code=418").await.status, 418);
}
