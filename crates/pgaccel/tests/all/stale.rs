//! The cache never serves a result that a write through Cordon has made stale, however the write
//! reaches the table read (ONLY, views, triggers, foreign-key actions, partitions, inheritance,
//! rules), and never caches what the tenant's own functions, operators, domains or time-relative
//! parameters make unstable. Each case first proves that the read is cached at all (a change
//! behind Cordon's back is not seen), so that a pass is not an accident of uncacheability.

use std::sync::Arc;
use std::time::Duration;

use cordon_pgaccel::accel::Database;
use cordon_pgaccel::exec::{ExecLimits, Value};
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::Proxy;

fn first_value(messages: &[SimpleQueryMessage]) -> Option<String> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    })
}

async fn read(client: &Client, sql: &str) -> Option<String> {
    first_value(&client.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}")))
}

/// Reads `sql` through the proxy until a read is a cache hit, and returns its value.
async fn cached(proxy: &Proxy, client: &Client, sql: &str) -> Option<String> {
    for _ in 0..20 {
        let hits = proxy.stats().cache_hits;
        let value = read(client, sql).await;
        if proxy.stats().cache_hits > hits {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{sql} was never served from the cache");
}

/// One link: `setup` (run through the proxy), a read that is cached, a write through the proxy
/// that changes what the read returns, and the read again, which must match the origin.
async fn assert_write_evicts(proxy: &Proxy, client: &Client, origin: &Client, reading: &str, writing: &str) {
    let before = cached(proxy, client, reading).await;
    client.batch_execute(writing).await.unwrap_or_else(|e| panic!("{writing}: {e}"));
    let truth = read(origin, reading).await;
    assert_ne!(before, truth, "the write {writing:?} must change {reading:?} for this case to mean anything");
    assert_eq!(read(client, reading).await, truth, "{reading:?} after {writing:?} was served stale");
}

#[tokio::test]
async fn writes_through_only_views_triggers_keys_partitions_inheritance_and_rules_evict_what_they_change() {
    let proxy = Proxy::start("", "max_age_s = 60").await;
    let client = proxy.client().await;
    let origin = proxy.origin().await;
    // Every link is created through the proxy: DDL makes the catalog be read again.
    client
        .batch_execute(
            "CREATE TABLE plain (id int PRIMARY KEY, v int); INSERT INTO plain VALUES (1, 1);
             CREATE TABLE base (id int PRIMARY KEY, v int); INSERT INTO base VALUES (1, 1);
             CREATE VIEW over_base AS SELECT id, v * 10 AS v FROM base;
             CREATE VIEW over_view AS SELECT v + 1 AS v FROM over_base;
             CREATE TABLE src (id int); CREATE TABLE audit (n int);
             CREATE FUNCTION note() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO audit VALUES (NEW.id); RETURN NEW; END $$;
             CREATE TRIGGER noting AFTER INSERT ON src FOR EACH ROW EXECUTE FUNCTION note();
             CREATE TABLE parent (id int PRIMARY KEY); CREATE TABLE child (id int, parent_id int REFERENCES parent ON DELETE CASCADE);
             INSERT INTO parent VALUES (1), (2); INSERT INTO child VALUES (1, 1), (2, 2);
             CREATE TABLE measures (k int, v int) PARTITION BY LIST (k);
             CREATE TABLE measures_1 PARTITION OF measures FOR VALUES IN (1); CREATE TABLE measures_2 PARTITION OF measures FOR VALUES IN (2);
             INSERT INTO measures VALUES (1, 1), (2, 2);
             CREATE TABLE animals (v int); CREATE TABLE dogs () INHERITS (animals); INSERT INTO dogs VALUES (1);
             CREATE TABLE orders (id int); CREATE TABLE order_log (id int);
             CREATE RULE logged AS ON INSERT TO orders DO ALSO INSERT INTO order_log VALUES (NEW.id);",
        )
        .await
        .unwrap();

    // ONLY: the write names the table, and so does the read.
    assert_write_evicts(&proxy, &client, &origin, "SELECT v FROM plain WHERE id = 1", "UPDATE ONLY plain SET v = v + 1").await;
    assert_write_evicts(&proxy, &client, &origin, "SELECT v FROM ONLY plain WHERE id = 1", "UPDATE plain SET v = v + 1").await;
    assert_write_evicts(&proxy, &client, &origin, "SELECT v FROM plain WHERE id = 1", "DELETE FROM ONLY plain").await;
    client.batch_execute("INSERT INTO plain VALUES (1, 5)").await.unwrap();
    assert_write_evicts(&proxy, &client, &origin, "SELECT count(*) FROM plain", "TRUNCATE ONLY plain").await;
    assert_write_evicts(
        &proxy,
        &client,
        &origin,
        "SELECT count(*) FROM plain",
        "MERGE INTO ONLY plain p USING (VALUES (3, 3)) s(id, v) ON p.id = s.id WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.v)",
    )
    .await;
    // Views, and a view over a view, read their base table.
    assert_write_evicts(&proxy, &client, &origin, "SELECT v FROM over_base WHERE id = 1", "UPDATE base SET v = v + 1").await;
    assert_write_evicts(&proxy, &client, &origin, "SELECT v FROM over_view", "UPDATE base SET v = v + 1").await;
    // A write through an updatable view changes the base.
    assert_write_evicts(&proxy, &client, &origin, "SELECT v FROM base WHERE id = 1", "UPDATE over_base SET id = 5 WHERE id = 1").await;
    // A trigger writes a table the statement does not name.
    assert_write_evicts(&proxy, &client, &origin, "SELECT count(*) FROM audit", "INSERT INTO src VALUES (1)").await;
    // ON DELETE CASCADE.
    assert_write_evicts(&proxy, &client, &origin, "SELECT count(*) FROM child", "DELETE FROM parent WHERE id = 1").await;
    // Partitions: through the parent, and through a partition.
    assert_write_evicts(&proxy, &client, &origin, "SELECT v FROM measures_1", "UPDATE measures SET v = v + 1 WHERE k = 1").await;
    assert_write_evicts(&proxy, &client, &origin, "SELECT sum(v) FROM measures", "UPDATE measures_2 SET v = v + 1").await;
    // Inheritance: a read of the parent includes the children.
    assert_write_evicts(&proxy, &client, &origin, "SELECT sum(v) FROM animals", "INSERT INTO dogs VALUES (10)").await;
    // A rule writes another table.
    assert_write_evicts(&proxy, &client, &origin, "SELECT count(*) FROM order_log", "INSERT INTO orders VALUES (1)").await;

    // A trigger created after the catalog was read is seen before anything is cached again.
    client
        .batch_execute(
            "CREATE TABLE late_src (id int); CREATE TABLE late_log (n int);
             CREATE FUNCTION late_note() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO late_log VALUES (1); RETURN NEW; END $$",
        )
        .await
        .unwrap();
    cached(&proxy, &client, "SELECT count(*) FROM late_log").await;
    client.batch_execute("CREATE TRIGGER late AFTER INSERT ON late_src FOR EACH ROW EXECUTE FUNCTION late_note()").await.unwrap();
    assert_write_evicts(&proxy, &client, &origin, "SELECT count(*) FROM late_log", "INSERT INTO late_src VALUES (1)").await;
    // Also when the trigger is created inside a transaction with other statements.
    client
        .batch_execute(
            "CREATE TABLE tx_src (id int); CREATE TABLE tx_log (n int);
             CREATE FUNCTION tx_note() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO tx_log VALUES (1); RETURN NEW; END $$",
        )
        .await
        .unwrap();
    cached(&proxy, &client, "SELECT count(*) FROM tx_log").await;
    client.batch_execute("BEGIN; CREATE TRIGGER tx AFTER INSERT ON tx_src FOR EACH ROW EXECUTE FUNCTION tx_note(); COMMIT").await.unwrap();
    assert_write_evicts(&proxy, &client, &origin, "SELECT count(*) FROM tx_log", "INSERT INTO tx_src VALUES (1)").await;
}

#[tokio::test]
async fn the_tenants_own_functions_operators_domains_and_relative_times_are_never_cached() {
    let proxy = Proxy::start("", "max_age_s = 60").await;
    let client = proxy.client().await;
    let origin = proxy.origin().await;
    client
        .batch_execute(
            "CREATE TABLE counter (n int); INSERT INTO counter VALUES (1);
             CREATE TABLE limits (max int); INSERT INTO limits VALUES (10);
             CREATE FUNCTION public.lower(int) RETURNS int LANGUAGE sql VOLATILE AS $$ SELECT n FROM counter $$;
             CREATE FUNCTION bump(int, int) RETURNS int LANGUAGE sql VOLATILE AS $$ SELECT n FROM counter $$;
             CREATE OPERATOR @@ (LEFTARG = int, RIGHTARG = int, FUNCTION = bump);
             CREATE FUNCTION within(int) RETURNS bool LANGUAGE sql STABLE AS $$ SELECT $1 <= max FROM limits $$;
             CREATE DOMAIN bounded AS int CHECK (within(VALUE));
             CREATE TABLE plain (v int); INSERT INTO plain VALUES (1);",
        )
        .await
        .unwrap();
    // The catalog is current and ordinary reads are cached.
    cached(&proxy, &client, "SELECT v FROM plain").await;

    let change = "UPDATE counter SET n = n + 1";
    for sql in ["SELECT lower(1)", "SELECT 1 @@ 1"] {
        let first = read(&client, sql).await;
        origin.batch_execute(change).await.unwrap();
        let second = read(&client, sql).await;
        assert_ne!(first, second, "{sql} resolves to the tenant's volatile code and must not be cached");
    }
    // A cast to a domain runs its check.
    assert_eq!(read(&client, "SELECT 5::bounded").await.as_deref(), Some("5"));
    origin.batch_execute("UPDATE limits SET max = 1").await.unwrap();
    let error = client.simple_query("SELECT 5::bounded").await.expect_err("the domain check fails now");
    assert_eq!(error.code().map(|c| c.code()), Some("23514"), "{error}");

    // 'now' bound as a parameter is the current time, not a constant.
    let a: String = client.query_one("SELECT $1::text::timestamptz::text", &[&"now"]).await.unwrap().get(0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let b: String = client.query_one("SELECT $1::text::timestamptz::text", &[&"now"]).await.unwrap().get(0);
    assert_ne!(a, b, "a bound 'now' was served from the cache");
    // ... also through the worker binding.
    let db: Arc<Database> = proxy.accel.database("acme", "main").unwrap().clone();
    let limits = ExecLimits { max_result_bytes: 1 << 20 };
    let mut seen = Vec::new();
    for _ in 0..2 {
        let result = db.query("SELECT $1::text::timestamptz::text", &[Value::Text("today".into())], limits).await.unwrap();
        assert!(!result.cached);
        let result = db.query("SELECT $1::text::timestamptz::text", &[Value::Text("now".into())], limits).await.unwrap();
        assert!(!result.cached, "a bound 'now' was served from the cache");
        seen.push(result.rows[0][0].clone());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_ne!(seen[0], seen[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_writes_through_links_evict_what_they_change() {
    let proxy = Proxy::start("", "max_age_s = 60").await;
    let db: Arc<Database> = proxy.accel.database("acme", "main").unwrap().clone();
    let limits = ExecLimits { max_result_bytes: 1 << 20 };
    let origin = proxy.origin().await;
    for ddl in [
        "CREATE TABLE src (id int)",
        "CREATE TABLE audit (n int)",
        "CREATE FUNCTION note() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO audit VALUES (NEW.id); RETURN NEW; END $$",
        "CREATE TRIGGER noting AFTER INSERT ON src FOR EACH ROW EXECUTE FUNCTION note()",
        "CREATE TABLE base (v int)",
        "INSERT INTO base VALUES (1)",
        "CREATE VIEW over_base AS SELECT v FROM base",
    ] {
        db.query(ddl, &[], limits).await.unwrap_or_else(|e| panic!("{ddl}: {e}"));
    }
    let value = |r: cordon_pgaccel::exec::QueryResult| r.rows[0][0].clone();
    for (reading, writing) in
        [("SELECT count(*) FROM audit", "INSERT INTO src VALUES (1)"), ("SELECT v FROM over_base", "UPDATE ONLY base SET v = v + 1")]
    {
        let mut hit = false;
        for _ in 0..20 {
            if db.query(reading, &[], limits).await.unwrap().cached {
                hit = true;
                break;
            }
        }
        assert!(hit, "{reading} is cached");
        db.query(writing, &[], limits).await.unwrap();
        let truth = first_value(&origin.simple_query(reading).await.unwrap());
        let after = db.query(reading, &[], limits).await.unwrap();
        assert!(!after.cached, "{reading} after {writing} was served from the cache");
        assert_eq!(Some(format!("{:?}", value(after))), truth.map(|t| format!("{:?}", Value::Int(t.parse().unwrap()))));
    }
    // The same through a transaction: judged after the commit.
    db.query("SELECT count(*) FROM audit", &[], limits).await.unwrap();
    assert!(db.query("SELECT count(*) FROM audit", &[], limits).await.unwrap().cached);
    db.transaction(&[("INSERT INTO src VALUES (2)".to_owned(), vec![])], limits).await.unwrap();
    assert!(!db.query("SELECT count(*) FROM audit", &[], limits).await.unwrap().cached);
}
