//! Capability bindings through a real server: key-value stores, SQL
//! databases, variables and secrets, each granted by name, attacked from a
//! guest (`tests/guests/bindings`).

use std::path::Path;

use cordon_config::Config;
use cordon_runtime::Runtime;

use crate::harness::{Options, TestServer, guest, logs, request, start_with};

/// A `bindings` worker of `tenant` routed at `NAME.localhost`, with
/// `grants` (TOML lines inside `[[worker]]`, where `{worker}` stands for
/// the worker's name) and `limits`. Each worker gets a `[[database]]` of
/// its own tenant named after it, which a `[[worker.postgres]]` grant in
/// `grants` may name; its origin is never reached here (see
/// `postgres_binding.rs` for Postgres itself).
pub(crate) fn worker(name: &str, tenant: &str, grants: &str, limits: &str) -> String {
    format!(
        "\n[[worker]]\nname = \"{name}\"\ntenant = \"{tenant}\"\ncomponent = \"{}\"\nroutes = [\"{name}.localhost/\"]\n{}\n[worker.limits]\ncpu_ms = 1000\n{limits}\n\n[[database]]\nname = \"{name}\"\ntenant = \"{tenant}\"\norigin = \"postgres://app@127.0.0.1:1/app\"\n",
        guest("bindings").display(),
        grants.replace("{worker}", name),
    )
}

/// Every kind the guest imports granted: KV `CACHE` (namespace `sessions`),
/// SQL `DB` (database `notes`), Postgres `PG` (the worker's own database),
/// and a variable.
pub(crate) const ALL: &str = "[[worker.kv]]\nbinding = \"CACHE\"\nnamespace = \"sessions\"\n\n[[worker.sql]]\nbinding = \"DB\"\ndatabase = \"notes\"\n\n[[worker.postgres]]\nbinding = \"PG\"\ndatabase = \"{worker}\"\n\n[worker.vars]\nGREETING = \"hello from vars\"\n";

async fn kv(s: &TestServer, worker: &str, query: &str) -> (u16, String) {
    let r = s.get(&format!("{worker}.localhost"), &format!("/kv?{query}")).await;
    (r.status, r.text())
}

async fn sql(s: &TestServer, worker: &str, binding: &str, body: serde_json::Value) -> (u16, String) {
    let r = request(
        s.addr,
        "POST",
        &format!("{worker}.localhost"),
        &format!("/sql?binding={binding}"),
        &[],
        Some(body.to_string().into_bytes()),
    )
    .await;
    (r.status, r.text())
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_value_works_end_to_end() {
    let s = start_with(&worker("app", "acme", ALL, ""), Options::default()).await;
    assert_eq!(kv(&s, "app", "binding=CACHE&op=get&key=a").await, (200, "(none)".into()));
    assert_eq!(kv(&s, "app", "binding=CACHE&op=set&key=a&value=1").await, (200, "ok".into()));
    assert_eq!(kv(&s, "app", "binding=CACHE&op=get&key=a").await, (200, "1".into()));
    assert_eq!(kv(&s, "app", "binding=CACHE&op=exists&key=a").await, (200, "true".into()));
    assert_eq!(kv(&s, "app", "binding=CACHE&op=incr&key=n&delta=5").await, (200, "5".into()));
    assert_eq!(kv(&s, "app", "binding=CACHE&op=incr&key=n").await, (200, "6".into()));
    for k in ["user:1", "user:2", "users", "other"] {
        kv(&s, "app", &format!("binding=CACHE&op=set&key={k}&value=x")).await;
    }
    assert_eq!(kv(&s, "app", "binding=CACHE&op=list&prefix=user:").await, (200, "user:1\nuser:2".into()));
    assert_eq!(kv(&s, "app", "binding=CACHE&op=delete&key=a").await, (200, "ok".into()));
    assert_eq!(kv(&s, "app", "binding=CACHE&op=exists&key=a").await, (200, "false".into()));
    assert_eq!(kv(&s, "app", "binding=CACHE&op=ttl&key=t&value=brief&seconds=1").await, (200, "ok".into()));
    assert_eq!(kv(&s, "app", "binding=CACHE&op=get&key=t").await, (200, "brief".into()));
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    assert_eq!(kv(&s, "app", "binding=CACHE&op=get&key=t").await, (200, "(none)".into()), "expired");

    let (status, text) = kv(&s, "app", "binding=NOPE&op=get&key=a").await;
    assert_eq!(status, 500);
    assert!(text.contains("NoSuchBinding") && text.contains("no such binding \"NOPE\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_works_end_to_end() {
    let s = start_with(&worker("app", "acme", ALL, ""), Options::default()).await;
    let (status, text) =
        sql(&s, "app", "DB", serde_json::json!({"sql": "CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL, n REAL, b BLOB)"}))
            .await;
    assert_eq!(status, 200, "{text}");
    let (_, text) = sql(
        &s,
        "app",
        "DB",
        serde_json::json!({"sql": "INSERT INTO notes (text, n, b) VALUES (?, ?, ?)", "params": ["first", 1.5, {"blob": [0, 255]}]}),
    )
    .await;
    let inserted = json(&text);
    assert_eq!((inserted["rows_affected"].as_u64(), inserted["last_insert_rowid"].as_i64()), (Some(1), Some(1)), "{text}");
    let (_, text) =
        sql(&s, "app", "DB", serde_json::json!({"sql": "SELECT id, text, n, b, NULL AS z FROM notes WHERE id = ?", "params": [1]})).await;
    let rows = json(&text);
    assert_eq!(rows["columns"], serde_json::json!(["id", "text", "n", "b", "z"]));
    assert_eq!(rows["rows"], serde_json::json!([[1, "first", 1.5, {"blob": [0, 255]}, null]]));

    // A batch is one transaction: the failing second statement undoes the first.
    let (_, text) = sql(
        &s,
        "app",
        "DB",
        serde_json::json!({"batch": [
            {"sql": "INSERT INTO notes (text) VALUES (?)", "params": ["second"]},
            {"sql": "INSERT INTO notes (text) VALUES (NULL)"},
        ]}),
    )
    .await;
    let failed = json(&text);
    assert_eq!(failed["failed_at"], 1, "{text}");
    assert!(failed["error"].as_str().unwrap().starts_with("Constraint"), "{text}");
    let (_, text) = sql(&s, "app", "DB", serde_json::json!({"sql": "SELECT count(*) AS n FROM notes"})).await;
    assert_eq!(json(&text)["rows"], serde_json::json!([[1]]), "the batch left nothing behind");

    let (status, text) = sql(&s, "app", "OTHER", serde_json::json!({"sql": "SELECT 1"})).await;
    assert_eq!(status, 500);
    assert!(text.contains("no such binding \"OTHER\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variables_are_read_through_wasi_config() {
    let s = start_with(&worker("app", "acme", ALL, ""), Options::default()).await;
    assert_eq!(s.get("app.localhost", "/config?key=GREETING").await.text(), "hello from vars");
    assert_eq!(s.get("app.localhost", "/config?key=MISSING").await.text(), "(none)");
    assert_eq!(s.get("app.localhost", "/config-all").await.text(), "GREETING=hello from vars\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_with_identical_names_see_only_their_own_data() {
    let workers = worker("a", "tenant-a", ALL, "") + &worker("b", "tenant-b", ALL, "");
    let s = start_with(&workers, Options::default()).await;
    kv(&s, "a", "binding=CACHE&op=set&key=secret&value=from-a").await;
    assert_eq!(kv(&s, "b", "binding=CACHE&op=get&key=secret").await, (200, "(none)".into()));
    assert_eq!(kv(&s, "b", "binding=CACHE&op=list&prefix=").await, (200, "".into()));
    kv(&s, "b", "binding=CACHE&op=set&key=secret&value=from-b").await;
    assert_eq!(kv(&s, "a", "binding=CACHE&op=get&key=secret").await, (200, "from-a".into()));

    for (w, text) in [("a", "from-a"), ("b", "from-b")] {
        sql(&s, w, "DB", serde_json::json!({"sql": "CREATE TABLE t (v TEXT)"})).await;
        sql(&s, w, "DB", serde_json::json!({"sql": "INSERT INTO t (v) VALUES (?)", "params": [text]})).await;
    }
    let (_, text) = sql(&s, "a", "DB", serde_json::json!({"sql": "SELECT v FROM t"})).await;
    assert_eq!(json(&text)["rows"], serde_json::json!([["from-a"]]));
}

/// Starts a runtime directly and returns why it failed.
async fn start_error(workers: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("[server]\ndata_dir = \"{}\"\n{workers}", dir.path().join("data").display());
    let path = dir.path().join("cordon.toml");
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap();
    match tokio::task::spawn_blocking(move || Runtime::start(&config).map(drop)).await.unwrap() {
        Ok(()) => panic!("the runtime started"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_without_a_grant_refuses_to_load() {
    let no_sql = "[[worker.kv]]\nbinding = \"CACHE\"\nnamespace = \"sessions\"\n[[worker.postgres]]\nbinding = \"PG\"\ndatabase = \"{worker}\"\n[worker.vars]\nX = \"1\"\n";
    let e = start_error(&worker("app", "acme", no_sql, "")).await;
    assert!(e.contains("cordon:sql/sql@0.1.0") && e.contains("[[worker.sql]]"), "{e}");
    let e = start_error(&worker("app", "acme", "", "")).await;
    assert!(e.contains("this worker has no grant"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_attacks_are_refused_with_their_reason() {
    let grants = format!("{ALL}\n[[worker.sql]]\nbinding = \"RO\"\ndatabase = \"notes\"\nread_only = true\n");
    let s = start_with(
        &worker("app", "acme", &grants, "sql_statement_timeout_ms = 200\nmax_sql_rows = 5\nmax_sql_result_bytes = 1000"),
        Options::default(),
    )
    .await;
    sql(&s, "app", "DB", serde_json::json!({"sql": "CREATE TABLE t (v TEXT)"})).await;

    // Parameters are data, never SQL.
    let evil = "x'); DROP TABLE t; --";
    sql(&s, "app", "DB", serde_json::json!({"sql": "INSERT INTO t (v) VALUES (?)", "params": [evil]})).await;
    let (_, text) = sql(&s, "app", "DB", serde_json::json!({"sql": "SELECT v FROM t"})).await;
    assert_eq!(json(&text)["rows"], serde_json::json!([[evil]]), "stored verbatim, table intact");

    for (statement, expected) in [
        ("SELECT 1; DROP TABLE t", "Invalid"),
        ("ATTACH DATABASE '/tmp/x.db' AS x", "ATTACH"),
        ("SELECT load_extension('/tmp/evil.so')", "load_extension"),
        ("PRAGMA writable_schema = 1", "writable_schema"),
        ("BEGIN", "Denied"),
    ] {
        let (status, text) = sql(&s, "app", "DB", serde_json::json!({"sql": statement})).await;
        assert_eq!(status, 500, "{statement}: {text}");
        assert!(text.contains(expected), "{statement}: {text}");
    }

    let (status, text) = sql(&s, "app", "RO", serde_json::json!({"sql": "DELETE FROM t"})).await;
    assert!(status == 500 && text.contains("read-only"), "{text}");
    let (_, text) = sql(&s, "app", "RO", serde_json::json!({"sql": "SELECT count(*) FROM t"})).await;
    assert_eq!(json(&text)["rows"], serde_json::json!([[1]]), "read-only reads, and nothing was deleted");

    let forever = "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) SELECT count(*) FROM r";
    let (_, text) = sql(&s, "app", "DB", serde_json::json!({"sql": forever})).await;
    assert!(text.contains("LimitExceeded") && text.contains("sql_statement_timeout_ms"), "{text}");
    let many = "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r LIMIT 100) SELECT i FROM r";
    let (_, text) = sql(&s, "app", "DB", serde_json::json!({"sql": many})).await;
    assert!(text.contains("LimitExceeded") && text.contains("max_sql_rows"), "{text}");
    let (_, text) = sql(&s, "app", "DB", serde_json::json!({"sql": "SELECT zeroblob(5000)"})).await;
    assert!(text.contains("LimitExceeded") && text.contains("max_sql_result_bytes"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_statement_budget_is_per_request() {
    let s = start_with(&worker("app", "acme", ALL, "max_sql_statements = 3"), Options::default()).await;
    let select = serde_json::json!({"sql": "SELECT 1"});
    let three = serde_json::json!({"batch": [select, select, select]});
    let (_, text) = sql(&s, "app", "DB", three).await;
    assert_eq!(json(&text).as_array().map(Vec::len), Some(3), "{text}");
    let four = serde_json::json!({"batch": [select, select, select, select]});
    let (_, text) = sql(&s, "app", "DB", four).await;
    let failed = json(&text);
    assert!(failed["error"].as_str().unwrap().contains("limits.max_sql_statements"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_value_limits_are_reported() {
    let s = start_with(&worker("app", "acme", ALL, "max_kv_operations = 20\nmax_kv_value_bytes = 1000"), Options::default()).await;
    let long_key = "k".repeat(513);
    let (status, text) = kv(&s, "app", &format!("binding=CACHE&op=set&key={long_key}&value=x")).await;
    assert!(status == 500 && text.contains("512"), "{text}");
    assert_eq!(kv(&s, "app", &format!("binding=CACHE&op=set&key={}&value=x", "k".repeat(512))).await.0, 200);
    let (status, text) = kv(&s, "app", "binding=CACHE&op=set-big&key=big&bytes=1001").await;
    assert!(status == 500 && text.contains("max_kv_value_bytes"), "{text}");
    assert_eq!(kv(&s, "app", "binding=CACHE&op=set-big&key=big&bytes=1000").await.0, 200);
    let (status, text) = kv(&s, "app", "binding=CACHE&op=many&key=m&n=25").await;
    assert!(status == 500 && text.contains("LimitExceeded") && text.contains("max_kv_operations"), "{text}");
    assert_eq!(kv(&s, "app", "binding=CACHE&op=many&key=m&n=19").await, (200, "did 19".into()), "the budget is per request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_parallel_increments_give_exactly_two_hundred() {
    let s = start_with(
        &(worker("app", "acme", ALL, "") + "[[tenant]]\nname = \"acme\"\nmax_instances = 255\n"),
        Options { max_instances: Some(256), ..Default::default() },
    )
    .await;
    let addr = s.addr;
    let mut tasks = Vec::new();
    for _ in 0..200 {
        tasks.push(tokio::spawn(
            async move { request(addr, "GET", "app.localhost", "/kv?binding=CACHE&op=incr&key=hits", &[], None).await },
        ));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(kv(&s, "app", "binding=CACHE&op=get&key=hits").await, (200, "200".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_reach_only_their_worker_and_never_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let value = "sk_live_UNIQUE-7f3a9c-do-not-log";
    put_secret(&data, "acme", "app", "API_KEY", value);
    // Keys of `[[worker]]` come before its sub-tables.
    let with_secret = format!("secrets = [\"API_KEY\"]\n{ALL}");
    let workers = worker("app", "acme", &with_secret, "") + &worker("other", "acme", ALL, "");
    let s = start_with(&workers, Options { data_dir: Some(&data), ..Default::default() }).await;

    assert_eq!(s.get("app.localhost", "/config?key=API_KEY").await.text(), value);
    assert_eq!(s.get("other.localhost", "/config?key=API_KEY").await.text(), "(none)", "another worker of the same tenant");
    let failed = s.get("app.localhost", "/config?key=API_KEY&then=panic").await;
    assert_eq!(failed.status, 500);
    assert!(!failed.text().contains(value));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let captured = String::from_utf8_lossy(&logs().lock().unwrap()).to_string();
    assert!(captured.contains("failing on purpose"), "the failure was logged");
    assert!(!captured.contains(value), "the secret value is in the logs");
    let health = s.health().await;
    assert!(!health.to_string().contains(value));
    let app = health["workers"].as_array().unwrap().iter().find(|w| w["name"] == "app").unwrap();
    assert_eq!(app["grants"]["secrets"], serde_json::json!(["API_KEY"]), "/health names the grant, not the value");
    assert_eq!(app["grants"]["vars"], serde_json::json!(["GREETING"]));
    assert_eq!(app["grants"]["kv"], serde_json::json!([{"binding": "CACHE", "namespace": "sessions"}]));
}

/// Stores a secret the way `cordon secret put` does.
fn put_secret(data: &Path, tenant: &str, worker: &str, name: &str, value: &str) {
    let (key, _) = cordon_vars::vault::MasterKey::load(data).unwrap();
    let vault = cordon_vars::vault::Vault::open(data, key).unwrap();
    vault.put(tenant, worker, name, &cordon_vars::vault::SecretValue::new(value.to_string())).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_secret_without_a_value_stops_the_start() {
    let e = start_error(&worker("app", "acme", &format!("secrets = [\"MISSING\"]\n{ALL}"), "")).await;
    assert!(e.contains("MISSING") && e.contains("cordon secret put"), "{e}");
}
