//! Pooled connections go back exactly as they came: session state changed where the classifier
//! cannot see it (`UPDATE pg_settings`, `set_config(..., false)` in a function, a view, a
//! procedure, a column default, a trigger, a temporary table made by a function) never reaches
//! another client, and never reaches the cache.

use std::time::{Duration, Instant};

use cordon_pgaccel::exec::{ExecLimits, Value};
use tokio_postgres::SimpleQueryMessage;

use crate::attack::{p99, rss_mib};
use crate::harness::{ACME_RO_PASSWORD, Proxy};

/// The victim's p99 for one read (through the cache, past it, or through the binding) while the
/// attacks run, and the growth of resident memory.
const VICTIM_P99: Duration = Duration::from_millis(250);
const RSS_GROWTH_MIB: u64 = 64;

const LIMITS: ExecLimits = ExecLimits { max_result_bytes: 1 << 20 };

/// Statements that change the session's state where the classifier cannot see it.
const ATTACKS: &[&str] = &[
    "UPDATE pg_settings SET setting = 'other' WHERE name = 'search_path'",
    "SELECT switch_path()",
    "SELECT * FROM switching_view",
    "CALL switch_proc()",
    "INSERT INTO switching_default DEFAULT VALUES",
    "INSERT INTO switching_trigger VALUES (1)",
    "SELECT make_temp()",
    "SELECT set_role_setting()",
];

async fn create_schema(proxy: &Proxy) {
    let owner = proxy.origin().await;
    owner
        .batch_execute(
            "CREATE SCHEMA other;
             CREATE TABLE public.t (v text); INSERT INTO public.t VALUES ('public');
             CREATE TABLE other.t (v text); INSERT INTO other.t VALUES ('other');
             CREATE FUNCTION public.switch_path() RETURNS text LANGUAGE sql AS $$ SELECT set_config('search_path', 'other', false) $$;
             CREATE VIEW public.switching_view AS SELECT set_config('search_path', 'other', false) AS s;
             CREATE PROCEDURE public.switch_proc() LANGUAGE sql AS $$ SELECT set_config('search_path', 'other', false) $$;
             CREATE TABLE public.switching_default (s text DEFAULT set_config('search_path', 'other', false));
             CREATE TABLE public.switching_trigger (x int);
             CREATE FUNCTION public.switch_trigger() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM set_config('search_path', 'other', false); RETURN NEW; END $$;
             CREATE TRIGGER switch BEFORE INSERT ON public.switching_trigger FOR EACH ROW EXECUTE FUNCTION public.switch_trigger();
             CREATE FUNCTION public.make_temp() RETURNS void LANGUAGE plpgsql AS
                 $$ BEGIN CREATE TEMP TABLE t (v text); INSERT INTO t VALUES ('temp'); END $$;
             CREATE FUNCTION public.set_role_setting() RETURNS text LANGUAGE sql AS $$ SELECT set_config('app.tenant_id', '7', false) $$;",
        )
        .await
        .expect("creating the schema");
}

fn first_value(messages: &[SimpleQueryMessage]) -> String {
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a row")
}

#[tokio::test]
async fn changed_session_state_never_reaches_another_client_or_the_cache() {
    // One connection, so every client gets the one the attack ran on; no timeout maxima, so that
    // `UPDATE pg_settings` reaches the origin and only the state check stands in its way.
    let proxy = Proxy::start("pool_size = 1\nstatement_timeout_ms = 0\nidle_in_transaction_timeout_ms = 0", "max_age_s = 600").await;
    create_schema(&proxy).await;
    let db = proxy.accel.database("acme", "main").unwrap().clone();
    let rss_before = rss_mib();
    let mut samples = Vec::new();

    for (i, attack) in ATTACKS.iter().enumerate() {
        // A proxy user changes its session's state by a statement the classifier passes. Inside
        // its transaction the change holds; when the connection goes back to the pool it is
        // reset, so the client itself continues from a clean session, off no poisoned cache.
        let attacker = proxy.client().await;
        let reads = format!("SELECT v, {i} AS round FROM t");
        attacker.batch_execute("BEGIN").await.unwrap();
        attacker.simple_query(attack).await.unwrap_or_else(|e| panic!("{attack}: {e:?}"));
        let inside = first_value(&attacker.simple_query(&reads).await.unwrap());
        attacker.batch_execute("COMMIT").await.unwrap();
        attacker.simple_query(attack).await.unwrap_or_else(|e| panic!("{attack}: {e:?}"));
        let own = first_value(&attacker.simple_query(&reads).await.unwrap());
        assert_eq!(own, "public", "{attack}: the change was reset with the connection (inside the transaction: {inside})");
        drop(attacker);

        // Another proxy user on the same pool, through the cache, the extended protocol and past
        // the cache; and a worker through the binding.
        let victim = proxy.client_as("acme_ro", ACME_RO_PASSWORD, "acme.main").await;
        for _ in 0..2 {
            let started = Instant::now();
            assert_eq!(first_value(&victim.simple_query(&reads).await.unwrap()), "public", "{attack}: cached read");
            samples.push(started.elapsed());
            let row = victim.query_one(&format!("SELECT v FROM t WHERE {i} = $1"), &[&(i as i32)]).await.unwrap();
            assert_eq!(row.get::<_, String>(0), "public", "{attack}: extended read");
            let uncached = format!("/* cordon:no-cache */ SELECT v, current_setting('app.tenant_id', true) FROM t WHERE {i} >= 0");
            let row = victim.simple_query(&uncached).await.unwrap();
            assert_eq!(first_value(&row), "public", "{attack}: read past the cache");
            let started = Instant::now();
            let result = db.query(&reads, &[], LIMITS).await.unwrap();
            assert_eq!(result.rows[0][0], Value::Text("public".into()), "{attack}: binding read");
            samples.push(started.elapsed());
        }
        let setting = victim
            .simple_query("SELECT coalesce(current_setting('app.tenant_id', true), '') FROM (SELECT 1) s WHERE random() >= 0")
            .await
            .unwrap();
        assert_eq!(first_value(&setting), "", "{attack}: custom settings do not leak");

        // The binding runs the attack itself: its next statement finds the connection clean.
        db.query(attack, &[], LIMITS).await.unwrap_or_else(|e| panic!("binding {attack}: {e:?}"));
        let after = db.query(&format!("SELECT v, {i} + 100 AS round FROM t"), &[], LIMITS).await.unwrap();
        assert_eq!(after.rows[0][0], Value::Text("public".into()), "binding {attack}: the next statement");
    }
    let stats = db.stats().pool;
    assert!(stats.state_resets >= ATTACKS.len() as u64, "every changed connection was reset: {stats:?}");

    // Sequence state is session state too: lastval() must not tell one client another's id.
    let owner = proxy.origin().await;
    owner.batch_execute("CREATE SEQUENCE ids").await.unwrap();
    let writer = proxy.client().await;
    writer.simple_query("SELECT nextval('ids')").await.unwrap();
    drop(writer);
    let reader = proxy.client_as("acme_ro", ACME_RO_PASSWORD, "acme.main").await;
    let error = reader.simple_query("SELECT lastval()").await.expect_err("no sequence was used in this session");
    assert_eq!(error.code(), Some(&tokio_postgres::error::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE), "{error:?}");

    let p99 = p99(&mut samples);
    assert!(p99 < VICTIM_P99, "the victim's read p99 was {p99:?}");
    let growth = rss_mib().saturating_sub(rss_before);
    assert!(growth < RSS_GROWTH_MIB, "resident memory grew by {growth} MiB");
    eprintln!("session state attacks: victim read p99 {p99:?}, RSS +{growth} MiB");
}

#[tokio::test]
async fn a_cacheable_read_that_changes_the_session_is_not_stored() {
    let proxy = Proxy::start("pool_size = 2", "max_age_s = 600").await;
    create_schema(&proxy).await;
    let client = proxy.client().await;
    // Read through the cache; the view changes search_path while the result is computed.
    for _ in 0..3 {
        client.simple_query("SELECT s FROM switching_view").await.unwrap();
    }
    let stats = proxy.stats();
    assert_eq!(stats.cache_hits, 0, "a result whose fetch changed the session was never stored: {stats:?}");
    assert_eq!(first_value(&client.simple_query("SELECT v FROM t").await.unwrap()), "public");
}

/// The price of the state check, printed for the documentation: a one-row statement through the
/// binding (probe pipelined behind it) and a proxy transaction (probe on release), against the
/// same through a direct connection.
#[tokio::test]
async fn the_state_check_costs_little() {
    let proxy = Proxy::start("pool_size = 2", "enabled = false").await;
    let db = proxy.accel.database("acme", "main").unwrap().clone();
    let direct = proxy.origin().await;
    let client = proxy.client().await;
    const N: u32 = 300;
    macro_rules! mean {
        ($label:expr, $statement:expr) => {{
            for _ in 0..20 {
                $statement;
            }
            let started = Instant::now();
            for _ in 0..N {
                $statement;
            }
            let mean = started.elapsed() / N;
            eprintln!("{}: {mean:?} per statement", $label);
            mean
        }};
    }
    let direct_mean = mean!("direct", direct.simple_query("SELECT 1").await.unwrap());
    mean!("probe alone", direct.simple_query(cordon_pgaccel::session_state::PROBE_SQL).await.unwrap());
    mean!("reset", direct.simple_query(cordon_pgaccel::session_state::RESET_SQL).await.unwrap());
    let prepared = direct.prepare(cordon_pgaccel::session_state::PROBE_SQL).await.unwrap();
    mean!("probe prepared", direct.query(&prepared, &[]).await.unwrap());
    let binding_mean = mean!("binding", db.query("SELECT 1", &[], LIMITS).await.unwrap());
    let proxy_mean = mean!("proxy", client.simple_query("SELECT 1").await.unwrap());
    // Generous: the point is that the check is one pipelined query, not a multiple of the work.
    assert!(binding_mean < direct_mean * 10 + Duration::from_millis(5), "binding {binding_mean:?} vs direct {direct_mean:?}");
    assert!(proxy_mean < direct_mean * 10 + Duration::from_millis(5), "proxy {proxy_mean:?} vs direct {direct_mean:?}");
}
