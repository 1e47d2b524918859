//! Noisy neighbours: tenants that keep every guest thread busy, against a
//! tenant that wants a little CPU now.
//!
//! - busy tenants share the guest threads by weight, not by requests in
//!   flight, and a tenant alone gets all of them;
//! - a tenant at its CPU limit leaves another tenant's latency near idle;
//! - past its queue a tenant is shed with `tenant_overloaded` and
//!   `Retry-After`, and no other tenant is refused;
//! - time queued counts towards the wall-clock limit, never the CPU limit,
//!   which still stops a spinning guest within a tick.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::harness::*;

/// Two tenants with a CPU hog each (every request spins to its 50 ms CPU
/// limit), and a third with hello-world.
fn tenants(alpha_weight: u32, beta_weight: u32, extra: &str) -> String {
    let hostile = guest("hostile");
    let hog = |name: &str, tenant: &str| {
        format!(
            "[[worker]]\nname = \"{name}\"\ntenant = \"{tenant}\"\ncomponent = \"{}\"\nroutes = [\"{tenant}.localhost/\"]\n[worker.limits]\ncpu_ms = 50\nwall_ms = 20000\n",
            hostile.display()
        )
    };
    format!(
        "{}{}[[worker]]\nname = \"hello\"\ntenant = \"gamma\"\ncomponent = \"{}\"\nroutes = [\"hello.localhost/\"]\n[[tenant]]\nname = \"alpha\"\ncpu_weight = {alpha_weight}\n[[tenant]]\nname = \"beta\"\ncpu_weight = {beta_weight}\n{extra}",
        hog("hog-a", "alpha"),
        hog("hog-b", "beta"),
        guest("hello").display(),
    )
}

/// `connections` clients of `host`, each sending `path` again as soon as
/// its previous request is answered, until dropped.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<BTreeMap<String, u64>>>,
}

impl Load {
    fn start(s: &TestServer, host: &'static str, path: &'static str, connections: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let addr = s.addr;
        let tasks = (0..connections)
            .map(|_| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut outcomes = BTreeMap::new();
                    while !stop.load(Ordering::Relaxed) {
                        let r = request(addr, "GET", host, path, &[], None).await;
                        let key = if r.status == 200 { "200".to_string() } else { format!("{} {}", r.status, r.error_code()) };
                        *outcomes.entry(key).or_insert(0) += 1;
                    }
                    outcomes
                })
            })
            .collect();
        Load { stop, tasks }
    }

    /// Stops the clients and returns how their requests ended.
    async fn finish(self) -> BTreeMap<String, u64> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = BTreeMap::new();
        for t in self.tasks {
            for (k, n) in t.await.unwrap() {
                *all.entry(k).or_insert(0) += n;
            }
        }
        all
    }
}

/// Every tenant's guest CPU so far, in microseconds, from `/health`.
async fn guest_cpu(s: &TestServer) -> BTreeMap<String, u64> {
    let h = s.health().await;
    h["cpu"]["tenants"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v["guest_cpu_us"].as_u64().unwrap())).collect()
}

/// The guest CPU each tenant used over `window`, in microseconds.
async fn cpu_over(s: &TestServer, window: Duration) -> BTreeMap<String, u64> {
    let before = guest_cpu(s).await;
    tokio::time::sleep(window).await;
    let after = guest_cpu(s).await;
    after.iter().map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0))).collect()
}

fn share(cpu: &BTreeMap<String, u64>, of: &str, and: &str) -> f64 {
    cpu[of] as f64 / (cpu[of] + cpu[and]).max(1) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_tenants_share_the_guest_threads_equally_whatever_their_requests_in_flight() {
    let s = start(&tenants(100, 100, "")).await;
    // Work conservation: beta alone has a guest on every guest thread, in
    // (almost) every sample, whatever else the machine runs.
    let beta = Load::start(&s, "beta.localhost", "/loop", 16);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let threads = s.health().await["cpu"]["guest_threads"].as_u64().unwrap();
    let mut full = 0;
    for _ in 0..50 {
        let h = s.health().await;
        full += u32::from(h["cpu"]["tenants"]["beta"]["running"].as_u64() == Some(threads));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(full >= 45, "beta alone ran on all {threads} guest threads in only {full} of 50 samples");
    // Two requests of alpha in flight against sixteen of beta.
    let alpha = Load::start(&s, "alpha.localhost", "/loop", 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let both = cpu_over(&s, Duration::from_secs(5)).await;
    let (a, b) = (alpha.finish().await, beta.finish().await);
    let alpha_share = share(&both, "alpha", "beta");
    eprintln!(
        "beta alone on all guest threads in {full} of 50 samples; together in 5 s: alpha {} ms, beta {} ms, alpha's share {alpha_share:.3}; alpha {a:?}, beta {b:?}",
        both["alpha"] / 1000,
        both["beta"] / 1000
    );
    assert!((0.40..=0.60).contains(&alpha_share), "alpha got {alpha_share:.3} of the guest CPU with 2 requests against 16");
    // Every request ran to its CPU limit, none was refused or timed out.
    for outcomes in [&a, &b] {
        assert_eq!(outcomes.keys().collect::<Vec<_>>(), ["503 cpu_limit_exceeded"], "{outcomes:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_of_three_to_one_give_the_heavier_tenant_three_quarters() {
    let s = start(&tenants(300, 100, "")).await;
    let alpha = Load::start(&s, "alpha.localhost", "/loop", 4);
    let beta = Load::start(&s, "beta.localhost", "/loop", 16);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu = cpu_over(&s, Duration::from_secs(5)).await;
    alpha.finish().await;
    beta.finish().await;
    let alpha_share = share(&cpu, "alpha", "beta");
    eprintln!("weights 3:1: alpha {} ms, beta {} ms, alpha's share {alpha_share:.3}", cpu["alpha"] / 1000, cpu["beta"] / 1000);
    assert!((0.65..=0.85).contains(&alpha_share), "alpha, weighted 3:1, got {alpha_share:.3} of the guest CPU");
    let h = s.health().await;
    assert_eq!(
        (h["cpu"]["tenants"]["alpha"]["cpu_weight"].as_u64(), h["cpu"]["tenants"]["beta"]["cpu_weight"].as_u64()),
        (Some(300), Some(100))
    );
}

async fn hello_latencies(s: &TestServer, n: usize) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = request(s.addr, "GET", "hello.localhost", "/", &[], None).await;
        latencies.push(t.elapsed());
        assert_eq!(r.status, 200, "the victim's request failed: {}", r.text());
    }
    latencies.sort();
    latencies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_cpu_limit_leaves_another_tenants_latency_near_idle() {
    let s = start(&tenants(100, 100, "")).await;
    hello_latencies(&s, 20).await;
    let idle = hello_latencies(&s, 100).await;
    let beta = Load::start(&s, "beta.localhost", "/loop", 16);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = hello_latencies(&s, 200).await;
    let outcomes = beta.finish().await;
    let (idle_p50, during_p50) = (percentile(&idle, 0.5), percentile(&during, 0.5));
    eprintln!(
        "hello p50 {idle_p50:?} idle, {during_p50:?} while beta spins (p99 {:?} -> {:?}); beta {outcomes:?}",
        percentile(&idle, 0.99),
        percentile(&during, 0.99)
    );
    let bound = idle_p50 * 3 + Duration::from_millis(3);
    assert!(during_p50 < bound, "the victim's median went from {idle_p50:?} to {during_p50:?} (bound {bound:?})");
    assert!(outcomes["503 cpu_limit_exceeded"] > 10, "beta was not at its limit: {outcomes:?}");

    // Accounting: every request of beta waited for a guest thread, and
    // each was still stopped within about a tick of its 50 ms of CPU.
    let mut cpu_us: Vec<u64> = log_events("\"request\"")
        .into_iter()
        .filter(|e| e["tenant"] == "beta" && e["outcome"] == "cpu_limit_exceeded")
        .map(|e| e["cpu_us"].as_u64().unwrap())
        .collect();
    cpu_us.sort();
    assert!(cpu_us.len() > 10, "{cpu_us:?}");
    let (least, p90, most) = (cpu_us[0], cpu_us[cpu_us.len() * 9 / 10], cpu_us[cpu_us.len() - 1]);
    eprintln!("beta's stopped requests used {least}..{most} us of CPU, p90 {p90}");
    assert!(least >= 50_000, "a request was stopped before its CPU limit: {least} us");
    assert!(p90 <= 52_000, "stopped requests overran their 50 ms limit by more than a tick: p90 {p90} us");
    assert!(most <= 60_000, "a stopped request overran its 50 ms limit to {most} us");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_queue_a_tenant_is_shed_with_retry_after_and_no_other_tenant_is() {
    // Beta: two instances in flight, four more requests may wait.
    let extra = "[[worker]]\nname = \"sleeper\"\ntenant = \"delta\"\ncomponent = \"HOSTILE\"\nroutes = [\"delta.localhost/\"]\n[worker.limits]\nwall_ms = 5000\n[[tenant]]\nname = \"delta\"\nmax_instances = 2\nmax_queued = 4\n"
        .replace("HOSTILE", &guest("hostile").display().to_string());
    let s = start(&tenants(100, 100, &extra)).await;
    let victim_stop = Arc::new(AtomicBool::new(false));
    let victim = {
        let (addr, stop) = (s.addr, victim_stop.clone());
        tokio::spawn(async move {
            let mut statuses = BTreeMap::new();
            while !stop.load(Ordering::Relaxed) {
                let r = request(addr, "GET", "hello.localhost", "/", &[], None).await;
                *statuses.entry(r.status).or_insert(0) += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            statuses
        })
    };
    let started = Instant::now();
    let addr = s.addr;
    let requests: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(async move {
                let r = request(addr, "GET", "delta.localhost", "/sleep?ms=300", &[], None).await;
                (r, started.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let h = s.health().await;
    assert_eq!(h["tenants"]["delta"]["in_flight"], 2, "{}", h["tenants"]["delta"]);
    assert_eq!(h["tenants"]["delta"]["queued"], 4, "{}", h["tenants"]["delta"]);
    let mut served = Vec::new();
    let mut shed = 0;
    for r in requests {
        let (r, at) = r.await.unwrap();
        match r.status {
            200 => served.push(at),
            503 => {
                assert_eq!(r.error_code(), "tenant_overloaded");
                assert_eq!(r.header("retry-after"), Some("1"));
                assert!(at < Duration::from_millis(150), "a refusal is at once, not after a wait: {at:?}");
                shed += 1;
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    victim_stop.store(true, Ordering::Relaxed);
    let victim = victim.await.unwrap();
    served.sort();
    eprintln!("delta: {} served at {served:?}, {shed} shed; the victim's statuses {victim:?}", served.len());
    assert_eq!((served.len(), shed), (6, 14), "two run, four wait, the rest are shed");
    // The queued ones ran after the first two, in two more rounds.
    assert!(served[5] >= Duration::from_millis(850), "the last queued request ended at {:?}", served[5]);
    assert_eq!(victim.keys().collect::<Vec<_>>(), [&200], "another tenant was refused: {victim:?}");
    let h = s.health().await;
    assert_eq!((h["tenants"]["delta"]["refused"].as_u64(), h["tenants"]["delta"]["queued"].as_u64()), (Some(14), Some(0)));
    assert_eq!(h["tenants"]["gamma"]["refused"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_in_the_queue_counts_towards_the_wall_clock_limit() {
    let hostile = guest("hostile").display().to_string();
    let extra = format!(
        "[[worker]]\nname = \"sleeper\"\ntenant = \"delta\"\ncomponent = \"{hostile}\"\nroutes = [\"delta.localhost/\"]\n[worker.limits]\nwall_ms = 600\n\
         [[worker]]\nname = \"quick\"\ntenant = \"delta\"\ncomponent = \"{hostile}\"\nroutes = [\"quick.localhost/\"]\n[worker.limits]\nwall_ms = 300\n\
         [[tenant]]\nname = \"delta\"\nmax_instances = 1\nmax_queued = 2\n"
    );
    let s = start(&tenants(100, 100, &extra)).await;
    let addr = s.addr;
    let first = tokio::spawn(async move { request(addr, "GET", "delta.localhost", "/sleep?ms=400", &[], None).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    // Waits about 350 ms for the slot, then would need 400 ms more: its
    // 600 ms run out while it sleeps.
    let second = request(addr, "GET", "delta.localhost", "/sleep?ms=400", &[], None).await;
    let took = started.elapsed();
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!((second.status, second.error_code()), (504, "wall_time_exceeded".to_string()), "{}", second.text());
    assert!(took < Duration::from_millis(900), "the wall-clock limit started when the request was queued: {took:?}");

    // A request whose 300 ms run out before the slot comes free ends
    // without an instance.
    let holder = tokio::spawn(async move { request(addr, "GET", "delta.localhost", "/sleep?ms=500", &[], None).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let r = request(addr, "GET", "quick.localhost", "/", &[], None).await;
    let took = started.elapsed();
    assert_eq!((r.status, r.error_code()), (504, "wall_time_exceeded".to_string()), "{}", r.text());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("waited"), "{}", r.text());
    assert!((Duration::from_millis(250)..Duration::from_millis(450)).contains(&took), "gave up after {took:?}");
    assert_eq!(holder.await.unwrap().status, 200);
    let quick = s.health().await["workers"].as_array().unwrap().iter().find(|w| w["name"] == "quick").unwrap().clone();
    assert_eq!(quick["stats"]["requests"], 0, "no instance was created for it: {quick}");
}
