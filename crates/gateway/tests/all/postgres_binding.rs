//! `cordon:postgres` through a real server and the accelerator, against a
//! real throwaway Postgres (`cordon_testpg::TestPostgres`): two tenants,
//! `acme` and `globex`, each with a `[[database]] main` on its own origin
//! database and role, driven from the `bindings` guest (`/pg`, `/pg-many`).
//!
//! These tests share nextest's `postgres-cluster` group (one cluster at a
//! time; `.config/nextest.toml`).

use cordon_config::Config;
use cordon_runtime::Runtime;
use cordon_testpg::TestPostgres;
use serde_json::{Value as Json, json};

use crate::harness::{Options, TestServer, guest, logs, request, rss_bytes, start_with};

const ACME_PASSWORD: &str = "acme-origin-pw-5Rt";
const GLOBEX_PASSWORD: &str = "globex-origin-pw-9Kq";
const ENV: &[(&str, &str)] = &[("ACME_DB_PASSWORD", ACME_PASSWORD), ("GLOBEX_DB_PASSWORD", GLOBEX_PASSWORD)];

/// The grants of the guest's other imports, which a worker running it needs.
const OTHERS: &str = "[[worker.kv]]\nbinding = \"CACHE\"\nnamespace = \"sessions\"\n\n[[worker.sql]]\nbinding = \"DB\"\ndatabase = \"notes\"\n\n[worker.vars]\nX = \"1\"\n";
/// `PG`: the tenant's `main`.
const PG: &str = "[[worker.postgres]]\nbinding = \"PG\"\ndatabase = \"main\"\n";

/// A `bindings` worker of `tenant` at `NAME.localhost`.
fn worker(name: &str, tenant: &str, grants: &str, limits: &str) -> String {
    format!(
        "\n[[worker]]\nname = \"{name}\"\ntenant = \"{tenant}\"\ncomponent = \"{}\"\nroutes = [\"{name}.localhost/\"]\n{grants}\n[worker.limits]\ncpu_ms = 1000\n{limits}\n",
        guest("bindings").display()
    )
}

/// `[[database]] main` of `acme` and of `globex`, each on its own origin
/// database (`acme` and `globex`, owned by roles of the same names) of the
/// cluster listening on `port`.
fn databases(port: u16) -> String {
    format!(
        "\n[[database]]\nname = \"main\"\ntenant = \"acme\"\norigin = \"postgres://acme@127.0.0.1:{port}/acme\"\norigin_password_env = \"ACME_DB_PASSWORD\"\n\
         \n[[database]]\nname = \"main\"\ntenant = \"globex\"\norigin = \"postgres://globex@127.0.0.1:{port}/globex\"\norigin_password_env = \"GLOBEX_DB_PASSWORD\"\n"
    )
}

/// A cluster with the two tenants' origin databases, and a server with
/// `workers` in front of it.
async fn start(workers: &str) -> (TestPostgres, TestServer) {
    let pg = tokio::task::spawn_blocking(TestPostgres::start).await.unwrap();
    pg.create_role_and_database("acme", ACME_PASSWORD, "acme").await;
    pg.create_role_and_database("globex", GLOBEX_PASSWORD, "globex").await;
    let s = start_with(&format!("{}{workers}", databases(pg.port)), Options { env: ENV, ..Default::default() }).await;
    (pg, s)
}

async fn pg(s: &TestServer, worker: &str, binding: &str, body: Json) -> (u16, String) {
    let r = request(
        s.addr,
        "POST",
        &format!("{worker}.localhost"),
        &format!("/pg?binding={binding}"),
        &[],
        Some(body.to_string().into_bytes()),
    )
    .await;
    (r.status, r.text())
}

/// One statement that must succeed; its result.
async fn ok(s: &TestServer, worker: &str, sql: &str, params: Json) -> Json {
    let (status, text) = pg(s, worker, "PG", json!({"sql": sql, "params": params})).await;
    assert_eq!(status, 200, "{sql}: {text}");
    json(&text)
}

fn json(text: &str) -> Json {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_values_parameters_and_refusals_end_to_end() {
    let (_pg, s) = start(&worker("app", "acme", &format!("{OTHERS}{PG}"), "")).await;
    ok(&s, "app", "CREATE TABLE t (id int8 PRIMARY KEY, f float8, b bool, s text, raw bytea, n numeric, z text)", json!([])).await;
    let inserted = ok(
        &s,
        "app",
        "INSERT INTO t (id, f, b, s, raw, n, z) VALUES ($1, $2, $3, $4, $5, $6::numeric, $7)",
        json!([9_007_199_254_740_993_i64, 1.5, true, "héllo", {"bytes": [0, 1, 255]}, "3.14159265358979323846", null]),
    )
    .await;
    assert_eq!(inserted["rows_affected"], 1, "{inserted}");

    let read = ok(&s, "app", "SELECT id, f, b, s, raw, n, z FROM t WHERE id = $1", json!([9_007_199_254_740_993_i64])).await;
    let types: Vec<(String, u64)> = read["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap().to_owned(), c["type_oid"].as_u64().unwrap()))
        .collect();
    let expected = [("id", 20), ("f", 701), ("b", 16), ("s", 25), ("raw", 17), ("n", 1700), ("z", 25)];
    assert_eq!(types, expected.map(|(n, t)| (n.to_owned(), t)), "{read}");
    assert_eq!(
        read["rows"],
        json!([[9_007_199_254_740_993_i64, 1.5, true, "héllo", {"bytes": [0, 1, 255]}, "3.14159265358979323846", null]]),
        "int8 exactly, bytea as bytes, numeric as its text, NULL as null"
    );

    // Parameters are data, never SQL: the attempt is stored verbatim and the table survives.
    let evil = "'; DROP TABLE t; --";
    ok(&s, "app", "INSERT INTO t (id, s) VALUES ($1, $2)", json!([2, evil])).await;
    let read = ok(&s, "app", "SELECT s FROM t WHERE s = $1", json!([evil])).await;
    assert_eq!(read["rows"], json!([[evil]]));
    let read = ok(&s, "app", "SELECT count(*) AS n FROM t", json!([])).await;
    assert_eq!(read["rows"], json!([[2]]), "the table is still there with both rows");

    // More than one statement in a text is refused by the origin's parser (extended protocol).
    let (status, text) = pg(&s, "app", "PG", json!({"sql": "SELECT 1; DROP TABLE t"})).await;
    assert!(status == 500 && text.contains("Database") && text.contains("42601"), "{text}");
    // Transaction control and session state belong to the transaction call.
    for statement in ["BEGIN", "COMMIT", "SET search_path = evil"] {
        let (status, text) = pg(&s, "app", "PG", json!({"sql": statement})).await;
        assert!(status == 500 && text.contains("Invalid"), "{statement}: {text}");
    }
    // A database error comes with its SQLSTATE.
    let (status, text) = pg(&s, "app", "PG", json!({"sql": "INSERT INTO t (id) VALUES ($1)", "params": [2]})).await;
    assert!(status == 500 && text.contains("Constraint") && text.contains("23505"), "{text}");
    let (status, text) = pg(&s, "app", "PG", json!({"sql": "SELECT * FROM missing"})).await;
    assert!(status == 500 && text.contains("42P01"), "{text}");
    let read = ok(&s, "app", "SELECT count(*) AS n FROM t", json!([])).await;
    assert_eq!(read["rows"], json!([[2]]), "nothing was dropped");

    // Parameter values are never logged.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let captured = String::from_utf8_lossy(&logs().lock().unwrap()).to_string();
    assert!(!captured.contains("DROP TABLE t; --"), "a parameter value reached the logs");
    let health = s.health().await;
    let app = health["workers"].as_array().unwrap().iter().find(|w| w["name"] == "app").unwrap();
    assert_eq!(app["grants"]["postgres"], json!([{"binding": "PG", "database": "main"}]), "/health names the grant");
    // Metrics and metering per tenant and database, on the admin listener.
    let db = health["postgres"].as_array().unwrap().iter().find(|d| d["database"] == "main").expect("/health reports the database");
    assert_eq!(db["tenant"], "acme");
    assert!(db["queries"].as_u64().unwrap() > 0, "{db}");
    assert!(db["pool"]["size"].as_u64().unwrap() > 0, "{db}");
    assert!(db["pool"]["acquires"].as_u64().unwrap() > 0, "{db}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_transactions_commit_all_or_nothing() {
    let (_pg, s) = start(&worker("app", "acme", &format!("{OTHERS}{PG}"), "")).await;
    ok(&s, "app", "CREATE TABLE accounts (id int8 PRIMARY KEY, balance int8 NOT NULL CHECK (balance >= 0))", json!([])).await;
    let (status, text) = pg(
        &s,
        "app",
        "PG",
        json!({"transaction": [
            {"sql": "INSERT INTO accounts VALUES ($1, $2)", "params": [1, 100]},
            {"sql": "INSERT INTO accounts VALUES ($1, $2) RETURNING id", "params": [2, 0]},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let results = json(&text);
    assert_eq!(results.as_array().map(Vec::len), Some(2), "{text}");
    assert_eq!(results[1]["rows"], json!([[2]]), "{text}");

    // The second statement fails: the first is rolled back, and the error names index 1.
    let (_, text) = pg(
        &s,
        "app",
        "PG",
        json!({"transaction": [
            {"sql": "UPDATE accounts SET balance = balance + $1 WHERE id = $2", "params": [50, 2]},
            {"sql": "UPDATE accounts SET balance = balance - $1 WHERE id = $2", "params": [500, 1]},
        ]}),
    )
    .await;
    let failed = json(&text);
    assert_eq!(failed["failed_at"], 1, "{text}");
    assert!(failed["error"].as_str().unwrap().contains("23514"), "{text}");
    let read = ok(&s, "app", "SELECT id, balance FROM accounts ORDER BY id", json!([])).await;
    assert_eq!(read["rows"], json!([[1, 100], [2, 0]]), "nothing of the failed transaction is left");

    // A successful transfer commits both sides.
    let (_, text) = pg(
        &s,
        "app",
        "PG",
        json!({"transaction": [
            {"sql": "UPDATE accounts SET balance = balance - $1 WHERE id = $2", "params": [30, 1]},
            {"sql": "UPDATE accounts SET balance = balance + $1 WHERE id = $2", "params": [30, 2]},
        ]}),
    )
    .await;
    assert_eq!(json(&text).as_array().map(Vec::len), Some(2), "{text}");
    let read = ok(&s, "app", "SELECT id, balance FROM accounts ORDER BY id", json!([])).await;
    assert_eq!(read["rows"], json!([[1, 70], [2, 30]]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_reads_are_cached_and_writes_through_the_binding_evict_them() {
    let (_pg, s) = start(&worker("app", "acme", &format!("{OTHERS}{PG}"), "")).await;
    ok(&s, "app", "CREATE TABLE notes (id int8 PRIMARY KEY, body text)", json!([])).await;
    ok(&s, "app", "INSERT INTO notes VALUES ($1, $2)", json!([1, "first"])).await;

    let read = "SELECT body FROM notes WHERE id = $1";
    let first = ok(&s, "app", read, json!([1])).await;
    assert_eq!((first["rows"].clone(), first["cached"].clone()), (json!([["first"]]), json!(false)), "{first}");
    let second = ok(&s, "app", read, json!([1])).await;
    assert_eq!((second["rows"].clone(), second["cached"].clone()), (json!([["first"]]), json!(true)), "{second}");
    let other = ok(&s, "app", read, json!([2])).await;
    assert_eq!(other["cached"], false, "other parameters are another entry: {other}");

    let updated = ok(&s, "app", "UPDATE notes SET body = $1 WHERE id = $2", json!(["edited", 1])).await;
    assert_eq!(updated["rows_affected"], 1);
    let after = ok(&s, "app", read, json!([1])).await;
    assert_eq!((after["rows"].clone(), after["cached"].clone()), (json!([["edited"]]), json!(false)), "the write evicted it: {after}");
    let again = ok(&s, "app", read, json!([1])).await;
    assert_eq!(again["cached"], true, "{again}");

    // A write inside a transaction evicts too, once committed.
    let (status, text) =
        pg(&s, "app", "PG", json!({"transaction": [{"sql": "UPDATE notes SET body = $1 WHERE id = $2", "params": ["in tx", 1]}]})).await;
    assert_eq!(status, 200, "{text}");
    let after = ok(&s, "app", read, json!([1])).await;
    assert_eq!((after["rows"].clone(), after["cached"].clone()), (json!([["in tx"]]), json!(false)), "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tenants_with_the_same_database_name_see_only_their_own_data() {
    let workers = worker("a", "acme", &format!("{OTHERS}{PG}"), "") + &worker("g", "globex", &format!("{OTHERS}{PG}"), "");
    let (pg_cluster, s) = start(&workers).await;
    for (w, text) in [("a", "from acme"), ("g", "from globex")] {
        ok(&s, w, "CREATE TABLE t (v text)", json!([])).await;
        ok(&s, w, "INSERT INTO t (v) VALUES ($1)", json!([text])).await;
    }
    // The same text and parameters, cached for acme first: globex still reads its own.
    let a = ok(&s, "a", "SELECT v FROM t", json!([])).await;
    let a_cached = ok(&s, "a", "SELECT v FROM t", json!([])).await;
    assert_eq!((a["rows"].clone(), a_cached["cached"].clone()), (json!([["from acme"]]), json!(true)));
    let g = ok(&s, "g", "SELECT v FROM t", json!([])).await;
    assert_eq!((g["rows"].clone(), g["cached"].clone()), (json!([["from globex"]]), json!(false)), "{g}");

    // Each binding reaches its own origin database, as its own role.
    let a_db = ok(&s, "a", "SELECT current_database() AS d, current_user AS u", json!([])).await;
    assert_eq!(a_db["rows"], json!([["acme", "acme"]]));
    let g_db = ok(&s, "g", "SELECT current_database() AS d, current_user AS u", json!([])).await;
    assert_eq!(g_db["rows"], json!([["globex", "globex"]]));

    // The origin agrees: each table holds only its tenant's row.
    let acme = cordon_testpg::connect(&pg_cluster.url_as("acme", ACME_PASSWORD, "acme")).await;
    let rows = acme.query("SELECT v FROM t", &[]).await.unwrap();
    assert_eq!(rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>(), ["from acme"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_budget_and_result_size_limits_give_their_errors() {
    let limits = "max_postgres_queries = 3\nmax_postgres_result_bytes = 1024";
    let (_pg, s) = start(&worker("app", "acme", &format!("{OTHERS}{PG}"), limits)).await;
    assert_eq!(s.get("app.localhost", "/pg-many?binding=PG&n=3").await.text(), "did 3");
    let r = s.get("app.localhost", "/pg-many?binding=PG&n=4").await;
    assert!(r.status == 500 && r.text().contains("LimitExceeded") && r.text().contains("limits.max_postgres_queries"), "{}", r.text());

    // Each statement of a transaction counts; over the budget, none runs.
    let select = json!({"sql": "SELECT 1"});
    let (_, text) = pg(&s, "app", "PG", json!({"transaction": [select, select, select]})).await;
    assert_eq!(json(&text).as_array().map(Vec::len), Some(3), "{text}");
    let (_, text) = pg(&s, "app", "PG", json!({"transaction": [select, select, select, select]})).await;
    let failed = json(&text);
    assert_eq!(failed["failed_at"], 0, "{text}");
    assert!(failed["error"].as_str().unwrap().contains("limits.max_postgres_queries"), "{text}");

    let (status, text) = pg(&s, "app", "PG", json!({"sql": "SELECT repeat('x', $1::int4) AS big", "params": [5000]})).await;
    assert!(status == 500 && text.contains("LimitExceeded") && text.contains("max_postgres_result_bytes"), "{text}");
    let small = ok(&s, "app", "SELECT repeat('x', $1::int4) AS small", json!([100])).await;
    assert_eq!(small["rows"][0][0].as_str().map(str::len), Some(100));
}

/// Starts a runtime directly and returns why it failed.
async fn start_error(text: String) -> String {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("[server]\ndata_dir = \"{}\"\n{text}", dir.path().join("data").display());
    let path = dir.path().join("cordon.toml");
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap();
    let env = |name: &str| ENV.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
    let network = std::sync::Arc::new(cordon_runtime::Network::system().unwrap());
    match tokio::task::spawn_blocking(move || Runtime::start_with_env(&config, network, &env).map(drop)).await.unwrap() {
        Ok(()) => panic!("the runtime started"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_binding_needs_its_grant_and_names_only_granted_bindings() {
    // Importing cordon:postgres without a [[worker.postgres]] grant: refused at start.
    let e = start_error(format!("{}{}", databases(1), worker("app", "acme", OTHERS, ""))).await;
    assert!(e.contains("cordon:postgres/postgres@0.1.0") && e.contains("[[worker.postgres]]"), "{e}");
    // A missing password is a start error that names the variable, not a value.
    let text =
        format!("{}{}", databases(1).replace("ACME_DB_PASSWORD", "UNSET_PASSWORD"), worker("app", "acme", &format!("{OTHERS}{PG}"), ""));
    let e = start_error(text).await;
    assert!(e.contains("UNSET_PASSWORD") && e.contains("Postgres accelerator"), "{e}");
    // Config validation keeps a grant inside its tenant.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("w.wasm"), b"").unwrap();
    let other =
        format!("{}\n[[worker]]\nname = \"x\"\ntenant = \"initech\"\ncomponent = \"w.wasm\"\nroutes = [\"x/\"]\n{PG}", databases(1));
    let e = Config::parse(&dir.path().join("cordon.toml"), &other).unwrap_err().to_string();
    assert!(e.contains("tenant `initech` has no database `main`"), "{e}");

    // Granted, but naming a binding it was not granted: no-such-binding, for both calls.
    let (_pg, s) = start(&worker("app", "acme", &format!("{OTHERS}{PG}"), "")).await;
    let (status, text) = pg(&s, "app", "OTHER", json!({"sql": "SELECT 1"})).await;
    assert!(status == 500 && text.contains("NoSuchBinding") && text.contains("no such binding \"OTHER\""), "{text}");
    let (_, text) = pg(&s, "app", "OTHER", json!({"transaction": [{"sql": "SELECT 1"}]})).await;
    assert!(text.contains("NoSuchBinding"), "{text}");
    let read = ok(&s, "app", "SELECT 1 AS one", json!([])).await;
    assert_eq!(read["rows"], json!([[1]]), "the granted binding works");
}

/// Workers whose requests run out of `wall_ms` in the middle of a long statement, two at a
/// time, over and over: the abandoned statements are cancelled and keep their pool slots until
/// their backends are gone, so the origin never sees more than `pool_size` + 1 (the cancel
/// headroom) backends of the tenant, `/health` counts what is really open, and the other
/// tenant's latency holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_requests_that_time_out_mid_statement_leave_no_backends_behind() {
    const POOL_SIZE: u64 = 2;
    let cluster = tokio::task::spawn_blocking(TestPostgres::start).await.unwrap();
    cluster.create_role_and_database("acme", ACME_PASSWORD, "acme").await;
    cluster.create_role_and_database("globex", GLOBEX_PASSWORD, "globex").await;
    let admin = cluster.connect("acme").await;
    admin
        .batch_execute(
            "CREATE FUNCTION public.no_timeout() RETURNS text LANGUAGE sql AS $$ SELECT set_config('statement_timeout', '0', true) $$",
        )
        .await
        .unwrap();
    let port = cluster.port;
    let config = format!(
        "\n[[database]]\nname = \"main\"\ntenant = \"acme\"\norigin = \"postgres://acme@127.0.0.1:{port}/acme\"\norigin_password_env = \"ACME_DB_PASSWORD\"\npool_size = {POOL_SIZE}\n\
         \n[[database]]\nname = \"main\"\ntenant = \"globex\"\norigin = \"postgres://globex@127.0.0.1:{port}/globex\"\norigin_password_env = \"GLOBEX_DB_PASSWORD\"\n{}{}",
        worker("attacker", "acme", &format!("{OTHERS}{PG}"), "wall_ms = 1000"),
        worker("victim", "globex", &format!("{OTHERS}{PG}"), ""),
    );
    let s = start_with(&config, Options { env: ENV, ..Default::default() }).await;
    ok(&s, "victim", "SELECT 1", json!([])).await;
    let rss_before = rss_bytes() >> 20;
    let backends = async || -> u64 {
        let row = admin
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE usename = 'acme' AND backend_type = 'client backend'", &[])
            .await
            .unwrap();
        row.get::<_, i64>(0) as u64
    };

    let attacks = [
        json!({"transaction": [{"sql": "SET LOCAL statement_timeout = 0"}, {"sql": "SELECT pg_sleep(120)"}]}),
        json!({"transaction": [{"sql": "SELECT no_timeout()"}, {"sql": "SELECT pg_sleep(120)"}]}),
        json!({"sql": "SELECT pg_sleep(120)"}),
    ];
    let mut most = 0;
    let mut victim = Vec::new();
    let started = std::time::Instant::now();
    let mut round = 0;
    while started.elapsed() < std::time::Duration::from_secs(8) {
        let (a, b, v) = tokio::join!(
            pg(&s, "attacker", "PG", attacks[round % attacks.len()].clone()),
            pg(&s, "attacker", "PG", attacks[(round + 1) % attacks.len()].clone()),
            async {
                let t = std::time::Instant::now();
                ok(&s, "victim", "SELECT 1", json!([])).await;
                t.elapsed()
            }
        );
        assert!(a.0 != 200 || !a.1.contains("\"rows\""), "an attack ran to the end: {a:?}");
        assert!(b.0 != 200 || !b.1.contains("\"rows\""), "an attack ran to the end: {b:?}");
        victim.push(v);
        most = most.max(backends().await);
        let health = s.health().await;
        let open = health["postgres"].as_array().unwrap().iter().find(|d| d["tenant"] == "acme").unwrap()["pool"]["open"].as_u64().unwrap();
        assert!(open <= POOL_SIZE, "/health says {open} open");
        round += 2;
    }
    assert!(most <= POOL_SIZE + 1, "{most} backends of the origin role for a pool of {POOL_SIZE}");
    // Once the abandoned statements are gone, /health and the origin agree.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let health = s.health().await;
        let pool = &health["postgres"].as_array().unwrap().iter().find(|d| d["tenant"] == "acme").unwrap()["pool"];
        if pool["closing"] == 0 && backends().await == pool["open"].as_u64().unwrap() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "abandoned backends are still there: {pool}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    ok(&s, "attacker", "SELECT 1", json!([])).await;
    victim.sort();
    let p99 = victim[(victim.len() * 99).div_ceil(100) - 1];
    assert!(p99 < std::time::Duration::from_millis(250), "the victim's p99 was {p99:?}");
    let growth = (rss_bytes() >> 20).saturating_sub(rss_before);
    assert!(growth < 128, "resident memory grew by {growth} MiB");
    eprintln!("requests timing out mid-statement: {round} requests, at most {most} backends, victim p99 {p99:?}, RSS +{growth} MiB");
}
