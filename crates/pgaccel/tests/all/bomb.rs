//! One tenant's pathological SQL costs that tenant's time only. The classifier bomb (hundreds of
//! deeply nested function calls joined by `;`, each statement just within the per-statement parse
//! limit) is sent by tenant acme, through the proxy and through the worker binding, while tenant
//! globex runs one-row queries. Bounds (generous for a loaded 2-core machine, far below what the
//! bomb cost when it was classified inline: seconds per text): globex's p99 latency stays under
//! 100 ms, and the process's resident memory grows by less than 256 MiB.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cordon_pgaccel::accel::Database;
use cordon_pgaccel::exec::{ExecLimits, QueryError, Value};

use crate::attack::{p99, rss_mib};
use crate::harness::{GLOBEX_PASSWORD, Proxy};

const VICTIM_P99: Duration = Duration::from_millis(100);
const RSS_GROWTH_MIB: u64 = 256;
const ATTACK: Duration = Duration::from_secs(3);

/// `count` statements of calls nested `depth` deep.
fn bomb(count: usize, depth: usize) -> String {
    let one = format!("SELECT {}1{}", "f(".repeat(depth), ")".repeat(depth));
    vec![one; count].join(";\n")
}

#[tokio::test]
async fn a_classifier_bomb_through_the_proxy_leaves_other_tenants_latency_alone() {
    let proxy = Proxy::start("pool_size = 4", "max_age_s = 60").await;
    let victim = proxy.client_as("acme_app", GLOBEX_PASSWORD, "globex.main").await;
    victim.simple_query("SELECT 1").await.unwrap();
    let rss_before = rss_mib();
    let text = Arc::new(bomb(300, 14));
    let deadline = Instant::now() + ATTACK;
    let mut attackers = Vec::new();
    for _ in 0..4 {
        let client = proxy.client().await;
        let text = text.clone();
        attackers.push(tokio::spawn(async move {
            let mut sent = 0;
            while Instant::now() < deadline {
                // The origin refuses the text (f does not exist); its classification is the cost.
                let _ = client.simple_query(&text).await;
                sent += 1;
            }
            sent
        }));
    }
    let mut latencies = Vec::new();
    while Instant::now() < deadline {
        let started = Instant::now();
        let rows = victim.simple_query("SELECT now()::text").await.unwrap();
        latencies.push(started.elapsed());
        assert!(rows.len() >= 2);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut sent = 0;
    for attacker in attackers {
        sent += attacker.await.unwrap();
    }
    assert!(latencies.len() >= 10, "the victim ran only {} queries", latencies.len());
    let p99 = p99(&mut latencies);
    let growth = rss_mib().saturating_sub(rss_before);
    eprintln!("proxy: {sent} bombs sent; victim p99 {p99:?}; RSS growth {growth} MiB");
    assert!(sent >= 4, "the attack ran");
    assert!(p99 < VICTIM_P99, "victim p99 {p99:?}");
    assert!(growth < RSS_GROWTH_MIB, "RSS grew by {growth} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classifier_bomb_through_the_binding_is_refused_or_bounded_and_leaves_other_tenants_alone() {
    let proxy = Proxy::start("pool_size = 4", "max_age_s = 60").await;
    let attacker: Arc<Database> = proxy.accel.database("acme", "main").unwrap().clone();
    let victim: Arc<Database> = proxy.accel.database("globex", "main").unwrap().clone();
    let limits = ExecLimits { max_result_bytes: 1 << 20 };

    // Several statements in one text are refused before any parsing.
    let started = Instant::now();
    let refused = attacker.query(&bomb(300, 14), &[], limits).await;
    assert!(
        matches!(&refused, Err(QueryError::Database { code, message }) if code == "42601" && message.contains("more than one statement")),
        "{refused:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(100), "refused in {:?}", started.elapsed());
    let refused = attacker.transaction(&[("SELECT 1".to_owned(), vec![]), (bomb(2, 3), vec![])], limits).await;
    assert!(matches!(&refused, Err((1, QueryError::Database { .. }))), "{refused:?}");

    victim.query("SELECT 1", &[], limits).await.unwrap();
    let rss_before = rss_mib();
    // One statement at the per-statement limit: classified on the pool, one at a time for acme.
    let single = Arc::new(bomb(1, 14));
    let deadline = Instant::now() + ATTACK;
    let mut attackers = Vec::new();
    for _ in 0..8 {
        let (attacker, single) = (attacker.clone(), single.clone());
        attackers.push(tokio::spawn(async move {
            let mut sent = 0;
            while Instant::now() < deadline {
                let _ = attacker.query(&single, &[Value::Null; 0], limits).await;
                let _ = attacker.query(&bomb(300, 14), &[], limits).await;
                sent += 1;
            }
            sent
        }));
    }
    let mut latencies = Vec::new();
    while Instant::now() < deadline {
        let started = Instant::now();
        let result = victim.query("SELECT now()::text", &[], limits).await.unwrap();
        latencies.push(started.elapsed());
        assert_eq!(result.rows.len(), 1);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut sent = 0;
    for attacker in attackers {
        sent += attacker.await.unwrap();
    }
    assert!(latencies.len() >= 10, "the victim ran only {} queries", latencies.len());
    let p99 = p99(&mut latencies);
    let growth = rss_mib().saturating_sub(rss_before);
    eprintln!("binding: {sent} bombs sent; victim p99 {p99:?}; RSS growth {growth} MiB");
    assert!(sent >= 8, "the attack ran");
    assert!(p99 < VICTIM_P99, "victim p99 {p99:?}");
    assert!(growth < RSS_GROWTH_MIB, "RSS grew by {growth} MiB");
}
