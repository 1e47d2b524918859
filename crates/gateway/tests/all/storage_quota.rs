//! Per-tenant storage quotas and the free-space reserve: a tenant that
//! fills its quota, through either binding and any of its namespaces and
//! databases, gets `storage_quota_exceeded` while another tenant keeps
//! writing; over its quota it can still read and delete, and once it has
//! deleted, the host gives the space back and it can write again. Below the
//! data directory's free-space reserve every write is refused with
//! `storage_disk_full`, and reads still work.
//!
//! Both tenants run the `bindings` guest, each with two key-value
//! namespaces and two SQL databases. The attacker `evil` has a 4 MiB quota.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{Options, TestServer, guest, request, start_with};

const QUOTA: u64 = 4 << 20;
/// What deletes may add past the quota (`cordon_disk::delete_headroom`).
const HEADROOM: u64 = cordon_disk::DELETE_HEADROOM;

/// One statement that would store 200 MB: 2000 rows of 100 kB.
const FILL: &str =
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000) INSERT INTO t (b) SELECT zeroblob(100000) FROM n";
/// One statement that would store a million small rows.
const SMALL_ROWS: &str =
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000) INSERT INTO t (b) SELECT randomblob(16) FROM n";

/// A `bindings` worker named after its tenant, at `TENANT.localhost`, with
/// KV `CACHE` and `OTHER`, SQL `DB` and `DB2`, and the Postgres grant and
/// variable the guest imports (the Postgres origin is never reached).
fn worker(tenant: &str) -> String {
    format!(
        r#"
[[worker]]
name = "{tenant}"
tenant = "{tenant}"
component = "{component}"
routes = ["{tenant}.localhost/"]

[[worker.kv]]
binding = "CACHE"
namespace = "cache"

[[worker.kv]]
binding = "OTHER"
namespace = "other"

[[worker.sql]]
binding = "DB"
database = "main"

[[worker.sql]]
binding = "DB2"
database = "second"

[[worker.postgres]]
binding = "PG"
database = "{tenant}"

[worker.vars]
GREETING = "hello"

[worker.limits]
cpu_ms = 5000
wall_ms = 20000
sql_statement_timeout_ms = 5000

[[database]]
name = "{tenant}"
tenant = "{tenant}"
origin = "postgres://app@127.0.0.1:1/app"
"#,
        component = guest("bindings").display(),
    )
}

/// Both tenants, `evil` with its quota, and `[storage]` lines.
fn config(storage: &str) -> String {
    format!("[storage]\n{storage}\n\n[[tenant]]\nname = \"evil\"\nstorage_quota_mb = {}\n{}{}", QUOTA >> 20, worker("evil"), worker("good"))
}

async fn start(data: &Path, storage: &str) -> TestServer {
    start_with(&config(storage), Options { data_dir: Some(data), ..Options::default() }).await
}

async fn kv(s: &TestServer, tenant: &str, query: &str) -> (u16, String) {
    let r = s.get(&format!("{tenant}.localhost"), &format!("/kv?{query}")).await;
    (r.status, r.text())
}

async fn sql(s: &TestServer, tenant: &str, binding: &str, statement: &str) -> (u16, String) {
    let body = serde_json::json!({ "sql": statement }).to_string().into_bytes();
    let r = request(s.addr, "POST", &format!("{tenant}.localhost"), &format!("/sql?binding={binding}"), &[], Some(body)).await;
    (r.status, r.text())
}

/// Bytes of the tenant's files on disk, both stores.
fn tenant_bytes(data: &Path, tenant: &str) -> u64 {
    ["kv", "sql"]
        .iter()
        .filter_map(|store| std::fs::read_dir(data.join(store).join(tenant)).ok())
        .flatten()
        .map(|entry| entry.unwrap().metadata().unwrap().len())
        .sum()
}

fn refused(answer: &(u16, String), code: &str) {
    assert_eq!(answer.0, 500, "{answer:?}");
    assert!(answer.1.contains(&format!("{code}: ")), "expected {code}: {answer:?}");
}

fn ok(answer: &(u16, String)) {
    assert_eq!(answer.0, 200, "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_filling_its_quota_gets_storage_quota_exceeded_while_another_keeps_writing() {
    let data = tempfile::tempdir().unwrap();
    let s = start(data.path(), "free_space_reserve_mb = 0").await;
    for tenant in ["evil", "good"] {
        for db in ["DB", "DB2"] {
            ok(&sql(&s, tenant, db, "CREATE TABLE t (id INTEGER PRIMARY KEY, b BLOB)").await);
        }
    }

    // One statement that would write 200 MB stops at the quota, at once.
    let started = Instant::now();
    let fill = sql(&s, "evil", "DB", FILL).await;
    let took = started.elapsed();
    refused(&fill, "storage_quota_exceeded");
    assert!(fill.1.contains("LimitExceeded") && fill.1.contains("delete keys or rows"), "{fill:?}");
    assert!(took < Duration::from_secs(5), "the fill took {took:?}");
    assert!(tenant_bytes(data.path(), "evil") < QUOTA / 2, "the refused statement left nothing behind");

    // Up to the quota one row at a time: rows of 100 kB, then of 4 kB.
    for row in ["zeroblob(100000)", "zeroblob(4000)"] {
        let mut rows = 0;
        loop {
            let answer = sql(&s, "evil", "DB", &format!("INSERT INTO t (b) VALUES ({row})")).await;
            if answer.0 != 200 {
                refused(&answer, "storage_quota_exceeded");
                break;
            }
            rows += 1;
            assert!(rows < 100, "rows of {row} kept fitting");
        }
    }
    let stored = tenant_bytes(data.path(), "evil");
    assert!(stored <= QUOTA && stored > QUOTA - (64 << 10), "evil stores {stored} bytes of its {QUOTA}");

    // The quota covers every database and namespace of the tenant, and
    // every shape of write: big values, many small rows, an index.
    refused(&sql(&s, "evil", "DB2", FILL).await, "storage_quota_exceeded");
    refused(&sql(&s, "evil", "DB2", SMALL_ROWS).await, "storage_quota_exceeded");
    refused(&sql(&s, "evil", "DB", "CREATE INDEX t_b ON t (b)").await, "storage_quota_exceeded");
    refused(&kv(&s, "evil", "binding=CACHE&op=set-big&key=k&bytes=1048576").await, "storage_quota_exceeded");
    refused(&kv(&s, "evil", "binding=OTHER&op=set-big&key=k&bytes=1048576").await, "storage_quota_exceeded");
    let (status, text) = kv(&s, "evil", "binding=OTHER&op=many&key=small&n=1000").await;
    assert!(status == 500 && text.contains("storage_quota_exceeded"), "{status} {text}");
    let stored = tenant_bytes(data.path(), "evil");
    assert!(stored <= QUOTA, "evil stores {stored} bytes, over its {QUOTA}");

    // The other tenant's writes keep working, through both bindings.
    for i in 0..8 {
        ok(&kv(&s, "good", &format!("binding=CACHE&op=set-big&key=k{i}&bytes=1048576")).await);
        ok(&sql(&s, "good", "DB", "INSERT INTO t (b) VALUES (zeroblob(1000000))").await);
    }
    assert!(tenant_bytes(data.path(), "good") > 3 * QUOTA, "the other tenant stored more than the quota it does not have");
    eprintln!("evil stores {stored} bytes of its {QUOTA}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_its_quota_a_tenant_reads_and_deletes_and_after_deleting_writes_again() {
    let data = tempfile::tempdir().unwrap();
    let s = start(data.path(), "free_space_reserve_mb = 0").await;
    ok(&sql(&s, "evil", "DB", "CREATE TABLE t (id INTEGER PRIMARY KEY, b BLOB)").await);
    ok(&sql(&s, "evil", "DB", "INSERT INTO t (b) VALUES (zeroblob(500000)), (zeroblob(500000))").await);

    // Fill the rest of the quota through key-value, 256 KiB at a time.
    let mut keys = 0;
    loop {
        let answer = kv(&s, "evil", &format!("binding=CACHE&op=set-big&key=k{keys}&bytes=262144")).await;
        if answer.0 != 200 {
            refused(&answer, "storage_quota_exceeded");
            break;
        }
        keys += 1;
        assert!(keys < 64, "the quota never refused a write");
    }
    assert!(keys >= 4, "{keys}");
    refused(&sql(&s, "evil", "DB", "INSERT INTO t (b) VALUES (zeroblob(500000))").await, "storage_quota_exceeded");
    let full = tenant_bytes(data.path(), "evil");
    assert!(full <= QUOTA, "{full}");

    // Reads work over the quota.
    assert_eq!(kv(&s, "evil", "binding=CACHE&op=get&key=k0").await.0, 200);
    assert_eq!(kv(&s, "evil", "binding=CACHE&op=exists&key=k0").await, (200, "true".into()));
    let (status, listed) = kv(&s, "evil", "binding=CACHE&op=list&prefix=k").await;
    assert_eq!((status, listed.lines().count()), (200, keys), "{listed}");
    let (status, counted) = sql(&s, "evil", "DB", "SELECT count(*) AS n, sum(length(b)) AS bytes FROM t").await;
    assert_eq!(status, 200, "{counted}");
    assert!(counted.contains("[[2,1000000]]"), "{counted}");

    // Deletes work over the quota, through both bindings.
    for i in 0..keys {
        ok(&kv(&s, "evil", &format!("binding=CACHE&op=delete&key=k{i}")).await);
    }
    ok(&sql(&s, "evil", "DB", "DELETE FROM t").await);

    // The host gave the space back: the files shrank, and writes work again.
    let after = tenant_bytes(data.path(), "evil");
    assert!(after < QUOTA / 4, "{full} bytes before the deletes, {after} after");
    ok(&sql(&s, "evil", "DB", "INSERT INTO t (b) VALUES (zeroblob(1000000))").await);
    ok(&kv(&s, "evil", "binding=OTHER&op=set-big&key=again&bytes=1048576").await);
    let stored = tenant_bytes(data.path(), "evil");
    assert!(stored <= QUOTA + HEADROOM, "{stored}");
    eprintln!("evil: {full} bytes at the quota, {after} after deleting");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_free_space_reserve_writes_get_storage_disk_full_and_reads_work() {
    let data = tempfile::tempdir().unwrap();
    let s = start(data.path(), "free_space_reserve_mb = 0").await;
    for tenant in ["evil", "good"] {
        ok(&kv(&s, tenant, "binding=CACHE&op=set&key=a&value=kept").await);
        ok(&sql(&s, tenant, "DB", "CREATE TABLE t (id INTEGER PRIMARY KEY, s TEXT)").await);
        ok(&sql(&s, tenant, "DB", "INSERT INTO t (s) VALUES ('kept')").await);
    }
    s.shutdown().await;

    // A reserve larger than the free space of the test's file system.
    let free = cordon_disk::statvfs_available(data.path()).unwrap();
    let reserve_mb = (free >> 20) + 1024;
    let s = start(data.path(), &format!("free_space_reserve_mb = {reserve_mb}")).await;
    for tenant in ["evil", "good"] {
        let refused_kv = kv(&s, tenant, "binding=CACHE&op=set&key=b&value=new").await;
        refused(&refused_kv, "storage_disk_full");
        assert!(refused_kv.1.contains("storage.free_space_reserve_mb"), "{refused_kv:?}");
        refused(&kv(&s, tenant, "binding=OTHER&op=incr&key=n").await, "storage_disk_full");
        let refused_sql = sql(&s, tenant, "DB", "INSERT INTO t (s) VALUES ('new')").await;
        refused(&refused_sql, "storage_disk_full");
        assert!(refused_sql.1.contains("LimitExceeded"), "{refused_sql:?}");
        refused(&sql(&s, tenant, "DB2", "CREATE TABLE u (s TEXT)").await, "storage_disk_full");

        // Reads work, and so do deletes.
        assert_eq!(kv(&s, tenant, "binding=CACHE&op=get&key=a").await, (200, "kept".into()));
        let (status, rows) = sql(&s, tenant, "DB", "SELECT s FROM t").await;
        assert!(status == 200 && rows.contains("[[\"kept\"]]"), "{status} {rows}");
        ok(&kv(&s, tenant, "binding=CACHE&op=delete&key=a").await);
        ok(&sql(&s, tenant, "DB", "DELETE FROM t").await);
    }
    s.shutdown().await;
}
