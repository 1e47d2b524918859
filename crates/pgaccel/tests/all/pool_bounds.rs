//! A pool never holds more origin connections than its size: statements abandoned mid-flight are
//! cancelled and keep their place until their backend is gone, timeouts cannot be raised past the
//! database's maximum, the pool's own deadline stops statements that escaped that check, and a
//! tenant's databases on one origin share one limit.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cordon_config::Config;
use cordon_pgaccel::accel::{Accelerator, Database};
use cordon_pgaccel::exec::{ExecLimits, QueryError, Value};
use cordon_pgaccel::pool::PoolError;
use cordon_testpg::TestPostgres;
use tokio_postgres::error::SqlState;

use crate::attack::{p99, rss_mib};
use crate::harness::{APP_PASSWORD, Proxy, eventually};

const POOL_SIZE: usize = 2;
/// Origin backends a pool may have beyond its size: the one side connection per tenant and origin
/// that ends a backend which ignored its cancel with `pg_terminate_backend`.
const CANCEL_HEADROOM: usize = 1;
/// The victim tenant's p99 latency for a one-row query through its own pool during the attack.
const VICTIM_P99: Duration = Duration::from_millis(250);
/// Growth of the test process's resident memory during the attack.
const RSS_GROWTH_MIB: u64 = 64;

const LIMITS: ExecLimits = ExecLimits { max_result_bytes: 1 << 20 };

/// Client backends of the origin role `app`, counted by the superuser.
async fn app_backends(monitor: &tokio_postgres::Client) -> usize {
    let row = monitor
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'", &[])
        .await
        .expect("counting backends");
    row.get::<_, i64>(0) as usize
}

/// Functions the attacks call. They are created by the superuser, so creating them is not part of
/// what the binding sees: `no_timeout()` disables the statement timeout where no text shows it,
/// and `stubborn()` sleeps and swallows every cancel.
async fn create_attack_functions(pg: &TestPostgres) {
    let admin = pg.connect("app").await;
    admin
        .batch_execute(
            "CREATE FUNCTION public.no_timeout() RETURNS text LANGUAGE sql AS $$ SELECT set_config('statement_timeout', '0', true) $$;
             CREATE FUNCTION public.stubborn() RETURNS void LANGUAGE plpgsql AS $$
             BEGIN
                 LOOP
                     BEGIN
                         PERFORM pg_sleep(60);
                     EXCEPTION WHEN query_canceled THEN NULL;
                     END;
                 END LOOP;
             END $$;",
        )
        .await
        .expect("creating the attack functions");
}

fn sql(text: &str) -> (String, Vec<Value>) {
    (text.to_owned(), Vec::new())
}

/// One abandoned request: the binding's call is dropped after `wall`, as a worker's is when its
/// request times out or its client goes away; or a proxy client vanishes mid-query.
async fn abandoned(proxy: &Proxy, db: &Arc<Database>, variant: usize, wall: Duration) {
    match variant % 5 {
        // Refused at once: the timeout cannot be disabled.
        0 => {
            let statements = [sql("SET LOCAL statement_timeout = 0"), sql("SELECT pg_sleep(120)")];
            let outcome = tokio::time::timeout(wall, db.transaction(&statements, LIMITS)).await;
            if let Ok(result) = outcome {
                match result {
                    Err((0, QueryError::Database { code, .. })) => assert_eq!(code, "42501"),
                    Err((_, QueryError::Unavailable { .. })) => {}
                    other => panic!("SET LOCAL statement_timeout = 0 was not refused: {other:?}"),
                }
            }
        }
        // The timeout disabled where no text shows it, then a long sleep, abandoned.
        1 => {
            let statements = [sql("SELECT no_timeout()"), sql("SELECT pg_sleep(120)")];
            let _ = tokio::time::timeout(wall, db.transaction(&statements, LIMITS)).await;
        }
        2 => {
            let _ = tokio::time::timeout(wall, db.query("SELECT pg_sleep(120)", &[], LIMITS)).await;
        }
        // A statement that swallows its cancel: only pg_terminate_backend ends it.
        3 => {
            let _ = tokio::time::timeout(wall, db.query("SELECT stubborn()", &[], LIMITS)).await;
        }
        // A proxy client that sends a long query and disappears.
        _ => {
            let Ok((client, connection)) =
                tokio_postgres::connect(&proxy.url("acme_app", crate::harness::ACME_APP_PASSWORD, "acme.main"), tokio_postgres::NoTls)
                    .await
            else {
                return;
            };
            let connection = tokio::spawn(connection);
            let _ = tokio::time::timeout(wall, client.simple_query("SELECT pg_sleep(120)")).await;
            connection.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_statements_never_leave_more_backends_than_the_pool_size() {
    let proxy = Proxy::start(&format!("pool_size = {POOL_SIZE}\nacquire_timeout_ms = 2000"), "enabled = false").await;
    create_attack_functions(&proxy.pg).await;
    let monitor = proxy.pg.connect("app").await;
    let db = proxy.accel.database("acme", "main").unwrap().clone();
    let victim = proxy.accel.database("globex", "main").unwrap().clone();
    victim.query("SELECT 1", &[], LIMITS).await.expect("the victim's first query");
    let rss_before = rss_mib();

    // The victim queries its own database on the same origin throughout.
    let attacking = Arc::new(AtomicBool::new(true));
    let victim_task = {
        let attacking = attacking.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while attacking.load(Ordering::Relaxed) {
                let started = Instant::now();
                victim.query("SELECT 1", &[], LIMITS).await.expect("the victim's query");
                samples.push(started.elapsed());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            samples
        })
    };
    // The origin's backends of the attacked pool, sampled throughout.
    let most_seen = Arc::new(AtomicUsize::new(0));
    let monitor_task = {
        let (attacking, most_seen) = (attacking.clone(), most_seen.clone());
        let monitor = proxy.pg.connect("app").await;
        tokio::spawn(async move {
            while attacking.load(Ordering::Relaxed) {
                most_seen.fetch_max(app_backends(&monitor).await, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };

    // Two at a time, over and over, each abandoned after 300 ms.
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(10) {
        let wall = Duration::from_millis(300);
        tokio::join!(abandoned(&proxy, &db, round, wall), abandoned(&proxy, &db, round + 1, wall));
        round += 2;
        let stats = db.stats().pool;
        assert!(stats.open <= POOL_SIZE, "/health counts {} open connections, more than the pool's size: {stats:?}", stats.open);
    }
    attacking.store(false, Ordering::Relaxed);
    let mut samples = victim_task.await.unwrap();
    monitor_task.await.unwrap();

    let most = most_seen.load(Ordering::Relaxed);
    assert!(most <= POOL_SIZE + CANCEL_HEADROOM, "{most} backends of the origin role at once, for a pool of {POOL_SIZE}");
    let stats = db.stats().pool;
    assert!(stats.discard_cancels > 0, "abandoned statements were cancelled: {stats:?}");
    assert!(stats.terminated > 0, "the statement that swallows its cancel was terminated: {stats:?}");

    // Afterwards every backend is accounted for, and /health tells the truth.
    eventually(30, "abandoned backends are gone and /health agrees", async || {
        let stats = db.stats().pool;
        stats.closing == 0 && app_backends(&monitor).await == stats.open
    })
    .await;
    assert!(app_backends(&monitor).await <= POOL_SIZE);
    // The attacked tenant itself still gets answers.
    let result = db.query("SELECT 41 + 1 AS answer", &[], LIMITS).await.expect("a query after the attack");
    assert_eq!(result.rows, vec![vec![Value::Int(42)]]);

    let p99 = p99(&mut samples);
    assert!(p99 < VICTIM_P99, "the victim's p99 was {p99:?} during the attack ({} samples)", samples.len());
    let growth = rss_mib().saturating_sub(rss_before);
    assert!(growth < RSS_GROWTH_MIB, "resident memory grew by {growth} MiB");
    eprintln!("abandoned statements: {round} requests, at most {most} backends, victim p99 {p99:?}, RSS +{growth} MiB");
}

#[tokio::test]
async fn the_pool_cancels_a_statement_past_its_deadline_whatever_the_session_set() {
    let proxy = Proxy::start("pool_size = 2\nstatement_timeout_ms = 1000", "enabled = false").await;
    create_attack_functions(&proxy.pg).await;
    let db = proxy.accel.database("acme", "main").unwrap().clone();

    // Binding: the origin's timeout is off for this transaction, the pool's deadline is not.
    let started = Instant::now();
    let statements = [sql("SELECT no_timeout()"), sql("SELECT pg_sleep(30)")];
    let error = db.transaction(&statements, LIMITS).await.expect_err("the sleep was cut short");
    let elapsed = started.elapsed();
    assert!(
        matches!(&error, (1, QueryError::Unavailable { code, .. }) | (1, QueryError::Database { code, .. }) if code == "57014"),
        "{error:?}"
    );
    assert!(elapsed < Duration::from_secs(5), "stopped after {elapsed:?}, not near the 1 s timeout plus slack");

    // Proxy: the same from a client.
    let client = proxy.client().await;
    let started = Instant::now();
    let error = client.batch_execute("BEGIN; SELECT no_timeout(); SELECT pg_sleep(30)").await.expect_err("cut short");
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "stopped after {:?}", started.elapsed());
    // The client's session goes on: later statements on that connection are not held to the
    // cancelled statement's deadline.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    client.batch_execute("ROLLBACK").await.expect("the client rolls back after the cancel");
    assert_eq!(client.query_one("SELECT 2 + 2", &[]).await.unwrap().get::<_, i32>(0), 4);
    drop(client);

    // Even a statement that swallows its cancel ends, and its connection with it.
    let started = Instant::now();
    let error = db.query("SELECT stubborn()", &[], LIMITS).await.expect_err("stubborn was stopped");
    assert!(started.elapsed() < Duration::from_secs(8), "stopped after {:?}: {error:?}", started.elapsed());
    let stats = db.stats().pool;
    assert!(stats.deadline_cancels >= 3, "{stats:?}");
    let monitor = proxy.pg.connect("app").await;
    eventually(30, "the stubborn backend is gone", async || {
        let stats = db.stats().pool;
        stats.closing == 0 && app_backends(&monitor).await == stats.open
    })
    .await;
    db.query("SELECT 1", &[], LIMITS).await.expect("the pool still works");
}

#[tokio::test]
async fn raising_a_timeout_is_refused_in_the_binding_and_the_proxy() {
    let proxy = Proxy::start("statement_timeout_ms = 5000\nidle_in_transaction_timeout_ms = 10000", "enabled = false").await;
    let db = proxy.accel.database("acme", "main").unwrap().clone();
    let refused = |result: Result<_, QueryError>| match result {
        Err(QueryError::Database { code, message }) => code == "42501" && message.contains("refused by Cordon"),
        _ => false,
    };
    for text in [
        "SELECT set_config('statement_timeout', '0', false)",
        "SELECT set_config('lock_timeout', '1h', true)",
        "UPDATE pg_settings SET setting = '0' WHERE name = 'statement_timeout'",
        "DO $$ BEGIN EXECUTE 'SET LOCAL idle_in_transaction_session_timeout = 0'; END $$",
    ] {
        assert!(refused(db.query(text, &[], LIMITS).await), "{text}");
    }
    let statements = [sql("SELECT 1"), sql("SET LOCAL statement_timeout = 0"), sql("SELECT pg_sleep(60)")];
    assert!(matches!(db.transaction(&statements, LIMITS).await, Err((1, QueryError::Database { code, .. })) if code == "42501"));
    // Within the maximum is fine.
    let statements = [sql("SET LOCAL statement_timeout = '2s'"), sql("SELECT current_setting('statement_timeout')")];
    let results = db.transaction(&statements, LIMITS).await.expect("a lower timeout is allowed");
    assert_eq!(results[1].rows, vec![vec![Value::Text("2s".into())]]);
    assert!(db.stats().timeout_changes_refused >= 5);

    let client = proxy.client().await;
    let error = client.simple_query("SET statement_timeout = 0").await.unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{error:?}");
    // Inside a transaction the refusal aborts it, as any error would.
    client.batch_execute("BEGIN").await.unwrap();
    let error = client.batch_execute("SET LOCAL lock_timeout = 0").await.unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{error:?}");
    let error = client.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION), "{error:?}");
    client.batch_execute("ROLLBACK").await.unwrap();
    // The extended protocol, with and without parameters.
    let error = client.execute("SET LOCAL statement_timeout = 0", &[]).await.unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{error:?}");
    let error = client.query("SELECT set_config('statement_timeout', $1, true)", &[&"0"]).await.unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{error:?}");
    let row = client.query_one("SELECT set_config('statement_timeout', '1s', true)", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "1s");
    assert_eq!(client.query_one("SELECT 1 + 1", &[]).await.unwrap().get::<_, i32>(0), 2);
}

/// An accelerator over `pg` with the given `[[database]]` tables; `{port}` is replaced.
fn accelerator(pg: &TestPostgres, databases: &str) -> Arc<Accelerator> {
    let text = databases.replace("{port}", &pg.port.to_string());
    let config = Config::parse(Path::new("/nonexistent/cordon.toml"), &text).unwrap_or_else(|e| panic!("{e}"));
    let env: HashMap<&str, &str> = HashMap::from([("APP_DB_PASSWORD", APP_PASSWORD)]);
    Arc::new(Accelerator::from_config(&config, &|k| env.get(k).map(|v| v.to_string())).expect("accelerator"))
}

#[tokio::test]
async fn a_tenants_databases_on_one_origin_share_its_connection_limit() {
    let pg = TestPostgres::start();
    pg.create_role_and_database("app", APP_PASSWORD, "app").await;
    pg.connect("postgres").await.batch_execute("CREATE DATABASE app2 OWNER app").await.unwrap();
    let accel = accelerator(
        &pg,
        r#"
[[database]]
name = "one"
tenant = "acme"
origin = "postgres://app@127.0.0.1:{port}/app"
origin_password_env = "APP_DB_PASSWORD"
pool_size = 2
acquire_timeout_ms = 500
tenant_origin_connections = 3

[[database]]
name = "two"
tenant = "acme"
origin = "postgres://app@127.0.0.1:{port}/app2"
origin_password_env = "APP_DB_PASSWORD"
pool_size = 2
acquire_timeout_ms = 500

[[database]]
name = "main"
tenant = "globex"
origin = "postgres://app@127.0.0.1:{port}/app"
origin_password_env = "APP_DB_PASSWORD"
pool_size = 2
"#,
    );
    let one = accel.database("acme", "one").unwrap().clone();
    let two = accel.database("acme", "two").unwrap().clone();
    let monitor = pg.connect("postgres").await;

    let a1 = one.pool.acquire().await.unwrap();
    let a2 = one.pool.acquire().await.unwrap();
    let b1 = two.pool.acquire().await.unwrap();
    // Each pool has room, the tenant has none.
    let started = Instant::now();
    let error = two.pool.acquire().await.expect_err("the tenant's limit is reached");
    assert!(matches!(error, PoolError::TenantLimit { limit: 3, .. }), "{error}");
    assert_eq!(error.sqlstate(), "53300");
    assert!(started.elapsed() < Duration::from_secs(2), "refused within the acquire timeout");
    assert_eq!(app_backends(&monitor).await, 3);
    assert_eq!((two.stats().pool.tenant_origin_open, two.stats().pool.tenant_origin_limit), (3, 3));
    assert_eq!(two.stats().pool.tenant_limited, 1);

    // An idle connection of the other pool is closed to make room.
    drop(a1);
    eventually(5, "the released connection is idle", async || one.stats().pool.idle == 1).await;
    let b2 = two.pool.acquire().await.expect("room made by closing the other pool's idle connection");
    assert_eq!(one.stats().pool.open, 1);
    assert!(app_backends(&monitor).await <= 3);
    let g1 = accel.database("globex", "main").unwrap().pool.acquire().await.expect("another tenant is not limited by this one");
    drop((a2, b1, b2, g1));

    // Another tenant on the same origin has a limit of its own.
    let globex = accel.database("globex", "main").unwrap().clone();
    let g1 = globex.pool.acquire().await.expect("another tenant is not limited by this one");
    let g2 = globex.pool.acquire().await.expect("another tenant is not limited by this one");
    drop((g1, g2));
}
