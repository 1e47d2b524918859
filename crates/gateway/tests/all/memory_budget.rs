//! Memory budgets: what a tenant's requests make the host hold, in their
//! linear memory and in host-side buffers, is bounded per request, per
//! tenant and for the process, and the worst case is checked at start.
//!
//! Each attack runs the `hostile` or `bindings` guest as tenant `evil`
//! beside the `hello` worker of tenant `good`, and measures this process's
//! resident memory (the server runs in it) while the attack runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use cordon_config::Config;
use cordon_memory::host::HostMemory;
use cordon_runtime::{MemoryBudgets, MemoryConfigError};

use crate::bindings;
use crate::harness::*;

const MIB: u64 = 1 << 20;

/// Samples this process's resident memory every 10 ms until `stop`, and
/// keeps the peak.
fn sample_peak_rss(stop: Arc<AtomicBool>) -> (Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let peak = Arc::new(AtomicU64::new(rss_bytes()));
    let p = peak.clone();
    let task = tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            p.fetch_max(rss_bytes(), Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    (peak, task)
}

/// The victim's requests while `stop` is unset: every one must be 200.
fn victim(s: Arc<TestServer>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u32, Vec<String>)> {
    tokio::spawn(async move {
        let (mut ok, mut failures) = (0, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            let r = s.get("hello.localhost", "/").await;
            if r.status == 200 {
                ok += 1;
            } else {
                failures.push(format!("{} {}", r.status, r.text()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (ok, failures)
    })
}

/// `n` requests for `path` on `host`, all sent at once.
async fn at_once(s: &Arc<TestServer>, n: usize, host: &'static str, path: &'static str) -> Vec<Response> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.get(host, path).await })
        })
        .collect();
    let mut responses = Vec::with_capacity(n);
    for t in tasks {
        responses.push(t.await.unwrap());
    }
    responses
}

fn hostile_worker(limits: &str) -> String {
    format!(
        "[[worker]]\nname = \"hello\"\ntenant = \"good\"\ncomponent = \"{}\"\nroutes = [\"hello.localhost/\"]\n\n[[worker]]\nname = \"hostile\"\ntenant = \"evil\"\ncomponent = \"{}\"\nroutes = [\"hostile.localhost/\"]\n[worker.limits]\n{limits}\n",
        guest("hello").display(),
        guest("hostile").display(),
    )
}

/// Finding: requests that each touch 100 MiB grew the process until the
/// kernel killed it, since nothing bounded the sum of `memory_mb` over a
/// tenant's instances. With a tenant budget of 256 MiB, twelve such
/// requests at once get two or so through, the rest 503
/// `tenant_over_capacity` with `Retry-After`, and the other tenant is
/// served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_memory_budget_is_refused_and_leaves_the_rest_to_others() {
    let options = Options { sandbox: "memory_budget_mb = 1024\ntenant_memory_budget_mb = 256\n", ..Options::default() };
    let s = Arc::new(start_with(&hostile_worker("memory_mb = 128\nwall_ms = 10000\ncpu_ms = 2000\n"), options).await);
    assert_eq!(s.get("hello.localhost", "/").await.status, 200);
    let baseline = rss_bytes();
    let stop = Arc::new(AtomicBool::new(false));
    let (peak, sampler) = sample_peak_rss(stop.clone());
    let victim = victim(s.clone(), stop.clone());

    let (mut held, mut refused) = (0, 0);
    for r in at_once(&s, 12, "hostile.localhost", "/hold?mb=100&ms=1500").await {
        match r.status {
            200 => held += 1,
            503 => {
                assert_eq!(r.error_code(), "tenant_over_capacity", "{}", r.text());
                assert!(r.text().contains("memory budget of 256 MiB"), "{}", r.text());
                assert_eq!(r.header("retry-after"), Some("1"));
                refused += 1;
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let (ok, failures) = victim.await.unwrap();

    assert!(failures.is_empty(), "the other tenant was refused: {failures:?}");
    assert!(ok > 10, "the other tenant was served {ok} times");
    assert!((1..=2).contains(&held), "{held} requests of 100 MiB held memory at once within a 256 MiB budget");
    assert_eq!(held + refused, 12);
    let growth = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    assert!(growth < 400 * MIB, "the process grew by {} MiB; the tenant's budget is 256 MiB", growth / MIB);

    // Everything is given back once the instances are gone.
    let health = evil_memory_given_back(&s).await;
    assert!(health["memory"]["tenants"]["evil"]["refused"].as_u64().unwrap() >= refused as u64);
    assert_eq!(health["memory"]["process"]["limit_bytes"], 1024 * MIB);
}

/// Waits (up to 2 s) for tenant `evil` to hold no memory: its instances are
/// dropped on their guest threads just after their responses. Returns
/// `/health` as it was then.
async fn evil_memory_given_back(s: &TestServer) -> serde_json::Value {
    let health = s.health_once(|h| h["memory"]["tenants"]["evil"]["used_bytes"] == 0).await;
    assert_eq!(health["memory"]["tenants"]["evil"]["used_bytes"], 0, "{health:#}");
    health
}

/// Finding: a worker limited to 16 MiB held +80 MiB of host memory through
/// 40 outgoing bodies it filled and never sent. Every body's buffer is now
/// charged to the request: 20 fit in 16 MiB, 200 stop the guest with
/// `memory_limit_exceeded`, and the host holds a few MiB, not hundreds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outgoing_body_buffers_count_against_the_requests_memory_limit() {
    let s = Arc::new(start_with(&hostile_worker("memory_mb = 16\ncpu_ms = 2000\n"), Options::default()).await);
    let r = s.get("hostile.localhost", "/bodies?n=20").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().starts_with("filled 20 bodies"), "{}", r.text());

    let baseline = rss_bytes();
    let stop = Arc::new(AtomicBool::new(false));
    let (peak, sampler) = sample_peak_rss(stop.clone());
    let victim = victim(s.clone(), stop.clone());
    for r in at_once(&s, 8, "hostile.localhost", "/bodies?n=200").await {
        assert_eq!((r.status, r.error_code()), (500, "memory_limit_exceeded".to_string()), "{}", r.text());
    }
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let (_, failures) = victim.await.unwrap();
    assert!(failures.is_empty(), "the other tenant was refused: {failures:?}");
    let growth = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    assert!(growth < 160 * MIB, "8 requests of a 16 MiB worker grew the process by {} MiB", growth / MIB);
    evil_memory_given_back(&s).await;

    // Header fields are host memory too: clones of a 64 KiB field set.
    let r = s.get("hostile.localhost", "/fields?n=20&kb=64").await;
    assert_eq!((r.status, r.text()), (200, "cloned 20 fields".to_string()));
    let baseline = rss_bytes();
    for r in at_once(&s, 8, "hostile.localhost", "/fields?n=2000&kb=64").await {
        assert_eq!((r.status, r.error_code()), (500, "memory_limit_exceeded".to_string()), "{}", r.text());
    }
    let growth = rss_bytes().saturating_sub(baseline);
    assert!(growth < 160 * MIB, "8 requests cloning header fields left the process {} MiB larger", growth / MIB);
}

/// Finding: `get-many` read every value into host memory before the guest
/// saw a byte, so a 16 MiB worker made the host hold the whole batch. The
/// batch now stops at the request's memory limit while it reads: the guest
/// gets an error naming the limit, and the other tenant's store works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_read_stops_at_the_memory_limit_while_it_reads() {
    let workers = format!(
        "{}{}",
        bindings::worker("evil", "evil", bindings::ALL, "memory_mb = 16\n"),
        bindings::worker("good", "good", bindings::ALL, "")
    );
    let s = Arc::new(start_with(&workers, Options::default()).await);
    for i in 0..40 {
        let r = s.get("evil.localhost", &format!("/kv?binding=CACHE&op=set-big&key=v{i}&bytes={}", MIB)).await;
        assert_eq!((r.status, r.text()), (200, "ok".to_string()));
    }
    let r = s.get("evil.localhost", "/kv?binding=CACHE&op=get-many&key=v&n=8").await;
    assert_eq!((r.status, r.text()), (200, format!("read {} bytes", 8 * MIB)), "a batch within the limit is read whole");

    let baseline = rss_bytes();
    let stop = Arc::new(AtomicBool::new(false));
    let (peak, sampler) = sample_peak_rss(stop.clone());
    for r in at_once(&s, 4, "evil.localhost", "/kv?binding=CACHE&op=get-many&key=v&n=40").await {
        assert_eq!(r.status, 500, "{}", r.text());
        assert!(r.text().contains("more than its memory limit of 16 MiB"), "the store stopped the read: {}", r.text());
    }
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let growth = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    assert!(growth < 100 * MIB, "4 batch reads of a 16 MiB worker grew the process by {} MiB", growth / MIB);

    let r = s.get("good.localhost", "/kv?binding=CACHE&op=set&key=a&value=1").await;
    assert_eq!((r.status, r.text()), (200, "ok".to_string()));
    evil_memory_given_back(&s).await;
}

fn config(sandbox: &str) -> Config {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cordon.toml");
    let text = format!("[server]\ndata_dir = \"{}\"\n[sandbox]\n{sandbox}\n{}", dir.path().display(), hostile_worker("memory_mb = 128\n"));
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap()
}

/// Finding: `max_instances × memory_mb` was 125 GiB by default, five times
/// this machine's RAM, and in a 3 GiB cgroup the server grew until the
/// kernel killed it. The budgets now derive from the host's memory (half of
/// it, the cgroup's limit when lower), and a budget that cannot fit is
/// refused at start unless an overcommit ratio accepts it.
#[test]
fn the_worst_case_is_checked_against_the_host_and_its_cgroup_at_start() {
    let cgroup = HostMemory { ram_bytes: 24 << 30, cgroup_limit_bytes: Some(3 << 30) };
    let defaults = MemoryBudgets::from_config(&config(""), Some(cgroup)).unwrap();
    assert_eq!(defaults.process.limit(), 1536 * MIB, "half of the cgroup's 3 GiB");

    let e = MemoryBudgets::from_config(&config("memory_budget_mb = 4096\n"), Some(cgroup)).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, MemoryConfigError::DoesNotFit(_)), "{text}");
    assert!(text.contains("3072 MiB of the process's cgroup memory limit"), "{text}");
    assert!(text.contains("sandbox.memory_overcommit"), "{text}");
    MemoryBudgets::from_config(&config("memory_budget_mb = 4096\nmemory_overcommit = 2\n"), Some(cgroup)).unwrap();

    let e = MemoryBudgets::from_config(&config("memory_budget_mb = 1024\ntenant_memory_budget_mb = 1024\n"), Some(cgroup)).unwrap_err();
    assert!(e.to_string().contains("has a memory budget of 1024 MiB, not below the server's budget of 1024 MiB"), "{e}");

    // The real host: the defaults always fit.
    let here = HostMemory::detect().expect("this machine's memory is readable");
    let budgets = MemoryBudgets::from_config(&config(""), Some(here)).unwrap();
    assert!(budgets.process.limit() <= here.usable_bytes() / 2);
}
