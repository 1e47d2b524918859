//! The query cache, end to end through the proxy.

use std::time::Duration;

use tokio_postgres::SimpleQueryMessage;

use crate::harness::{ACME_RO_PASSWORD, GLOBEX_PASSWORD, Proxy};

fn first_value(messages: &[SimpleQueryMessage]) -> Option<String> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    })
}

#[tokio::test]
async fn hits_expiry_stale_while_revalidate_and_eviction_on_write() {
    let proxy = Proxy::start("", "max_age_s = 1\nstale_while_revalidate_s = 2").await;
    let origin = proxy.origin().await;
    origin.batch_execute("CREATE TABLE prices (sku text PRIMARY KEY, cents int); INSERT INTO prices VALUES ('a', 100)").await.unwrap();
    let client = proxy.client().await;
    let read = async || first_value(&client.simple_query("SELECT cents FROM prices WHERE sku = 'a'").await.unwrap());

    assert_eq!(read().await.as_deref(), Some("100"));
    let s = proxy.stats();
    assert_eq!((s.cache_hits, s.cache_misses), (0, 1));
    // A change made behind Cordon's back is not seen while the entry is fresh: proof of a hit.
    origin.batch_execute("UPDATE prices SET cents = 200").await.unwrap();
    assert_eq!(read().await.as_deref(), Some("100"));
    assert_eq!(proxy.stats().cache_hits, 1);

    // Past max_age: served stale once, refreshed in the background.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(read().await.as_deref(), Some("100"));
    assert_eq!(proxy.stats().cache_stale_hits, 1);
    crate::harness::eventually(5, "the background refresh lands", async || read().await.as_deref() == Some("200")).await;

    // Past max_age + stale_while_revalidate: a plain miss.
    origin.batch_execute("UPDATE prices SET cents = 300").await.unwrap();
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let misses = proxy.stats().cache_misses;
    assert_eq!(read().await.as_deref(), Some("300"));
    assert_eq!(proxy.stats().cache_misses, misses + 1);

    // A write through Cordon evicts what read the table, at once.
    client.simple_query("UPDATE public.prices SET cents = 400 WHERE sku = 'a'").await.unwrap();
    assert_eq!(read().await.as_deref(), Some("400"));
    // So does a write in a transaction, at commit.
    client.batch_execute("BEGIN; UPDATE prices SET cents = 500; COMMIT").await.unwrap();
    assert_eq!(read().await.as_deref(), Some("500"));

    // A statement can opt out of the cache with a hint.
    let uncached = "SELECT /* cordon:no-cache */ cents FROM prices WHERE sku = 'a'";
    let before = proxy.stats();
    for _ in 0..2 {
        assert_eq!(first_value(&client.simple_query(uncached).await.unwrap()).as_deref(), Some("500"));
    }
    origin.batch_execute("UPDATE prices SET cents = 501").await.unwrap();
    assert_eq!(first_value(&client.simple_query(uncached).await.unwrap()).as_deref(), Some("501"), "never served from the cache");
    let after = proxy.stats();
    assert_eq!((after.cache_hits, after.cache_misses), (before.cache_hits, before.cache_misses));
    client.simple_query("UPDATE prices SET cents = 500").await.unwrap();

    // Extended protocol with parameters: cached per parameter value.
    let row = client.query_one("SELECT cents FROM prices WHERE sku = $1", &[&"a"]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 500);
    let hits = proxy.stats().cache_hits;
    let row = client.query_one("SELECT cents FROM prices WHERE sku = $1", &[&"a"]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 500);
    assert_eq!(proxy.stats().cache_hits, hits + 1);
    assert!(client.query_opt("SELECT cents FROM prices WHERE sku = $1", &[&"b"]).await.unwrap().is_none());
}

#[tokio::test]
async fn volatile_and_stable_functions_are_never_cached() {
    let proxy = Proxy::start("", "max_age_s = 60").await;
    let client = proxy.client().await;
    for sql in [
        "SELECT now()::text",
        "SELECT random()::text",
        "SELECT current_user::text",
        "SELECT clock_timestamp()::text",
        "SELECT gen_random_uuid()::text",
        "SELECT current_timestamp::text",
        "SELECT current_date::text",
    ] {
        client.simple_query(sql).await.unwrap();
        client.simple_query(sql).await.unwrap();
    }
    let a = first_value(&client.simple_query("SELECT random()::text").await.unwrap());
    let b = first_value(&client.simple_query("SELECT random()::text").await.unwrap());
    assert_ne!(a, b);
    let s = proxy.stats();
    assert_eq!(s.cache_hits + s.cache_stale_hits, 0, "{s:?}");
    assert!(s.uncacheable >= 16);
    // Inside a transaction nothing is cached either.
    client.batch_execute("CREATE TABLE t (v int)").await.unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    client.simple_query("SELECT v FROM t").await.unwrap();
    client.simple_query("SELECT v FROM t").await.unwrap();
    client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(proxy.stats().cache_hits, 0);
}

#[tokio::test]
async fn tenants_and_roles_with_identical_sql_never_share_entries() {
    let proxy = Proxy::start("", "max_age_s = 60").await;
    proxy.origin().await.batch_execute("CREATE TABLE whoami (v text); INSERT INTO whoami VALUES ('acme')").await.unwrap();
    let globex_origin = cordon_testpg::connect(&proxy.pg.url_as("globex_origin", "globex-origin-pw", "globex")).await;
    globex_origin.batch_execute("CREATE TABLE whoami (v text); INSERT INTO whoami VALUES ('globex')").await.unwrap();

    let acme = proxy.client().await;
    let globex = proxy.client_as("acme_app", GLOBEX_PASSWORD, "globex.main").await;
    let ro = proxy.client_as("acme_ro", ACME_RO_PASSWORD, "acme.main").await;
    for _ in 0..2 {
        assert_eq!(first_value(&acme.simple_query("SELECT v FROM whoami").await.unwrap()).as_deref(), Some("acme"));
        assert_eq!(first_value(&globex.simple_query("SELECT v FROM whoami").await.unwrap()).as_deref(), Some("globex"));
    }
    let hits = proxy.stats().cache_hits;
    assert_eq!(hits, 1, "acme's second read hit acme's entry");
    // Another role of the same tenant has its own entries: a miss first.
    let misses = proxy.stats().cache_misses;
    assert_eq!(first_value(&ro.simple_query("SELECT v FROM whoami").await.unwrap()).as_deref(), Some("acme"));
    assert_eq!(proxy.stats().cache_misses, misses + 1);
}

#[tokio::test]
async fn identical_concurrent_misses_coalesce_into_one_origin_query() {
    let proxy = Proxy::start("pool_size = 10", "max_age_s = 60").await;
    proxy
        .origin()
        .await
        .batch_execute("CREATE TABLE slow (v int); INSERT INTO slow SELECT 7 FROM generate_series(1, 1500000)")
        .await
        .unwrap();
    let clients: Vec<_> = futures_util::future::join_all((0..10).map(|_| proxy.client())).await;
    let reads = clients.iter().map(|c| c.simple_query("SELECT count(*) FROM slow"));
    for r in futures_util::future::join_all(reads).await {
        assert_eq!(first_value(&r.unwrap()).as_deref(), Some("1500000"));
    }
    let s = proxy.stats();
    assert_eq!(s.cache_misses + s.cache_coalesced + s.cache_hits, 10, "{s:?}");
    assert!(s.cache_misses <= 2, "concurrent identical misses coalesced: {s:?}");
}
