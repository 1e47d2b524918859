//! The wire-protocol proxy with real clients (tokio-postgres) against a real origin.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt, TryStreamExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage};

use crate::harness::{ACME_APP_PASSWORD, ACME_RO_PASSWORD, GLOBEX_PASSWORD, Proxy, eventually};

fn simple_rows(messages: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some((0..row.len()).map(|i| row.get(i).map(str::to_owned)).collect()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn simple_extended_prepared_copy_notices_errors_and_large_results() {
    let proxy = Proxy::start("pool_size = 2", "enabled = false").await;
    let client = proxy.client().await;

    // Simple protocol, several statements in one text.
    let messages = client.simple_query("CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items VALUES (1, 'one'), (2, 'two'); SELECT name FROM items ORDER BY id").await.unwrap();
    assert_eq!(simple_rows(&messages), vec![vec![Some("one".to_owned())], vec![Some("two".to_owned())]]);

    // Extended protocol with parameters, and errors that leave the session usable.
    let row = client.query_one("SELECT name FROM items WHERE id = $1", &[&2i32]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "two");
    let err = client.query_one("SELECT 1 / $1::int", &[&0i32]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO));
    let err = client.simple_query("SELEC 1").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::SYNTAX_ERROR));
    assert_eq!(client.query_one("SELECT count(*) FROM items", &[]).await.unwrap().get::<_, i64>(0), 2);

    // A prepared statement is reused across transactions, which land on different origin
    // connections: each other client holds one connection in a transaction meanwhile.
    let statement = client.prepare("SELECT name, pg_backend_pid() FROM items WHERE id = $1").await.unwrap();
    let mut backends = std::collections::HashSet::new();
    for round in 0..6 {
        let blocker = proxy.client().await;
        let hold = round % 2 == 0;
        if hold {
            blocker.batch_execute("BEGIN; SELECT 1").await.unwrap();
        }
        let row = client.query_one(&statement, &[&1i32]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "one");
        backends.insert(row.get::<_, i32>(1));
        drop(blocker);
        // The blocker's connection is reset on its own task; wait until it is back.
        eventually(5, "the blocker's connection is back", async || proxy.stats().pool.in_use == 0).await;
    }
    assert!(backends.len() >= 2, "the statement ran on several origin connections: {backends:?}");
    // Two clients preparing the same text under the same name never see "already exists".
    let other = proxy.client().await;
    for _ in 0..5 {
        let a = client.prepare("SELECT id FROM items WHERE name = $1").await.unwrap();
        let b = other.prepare("SELECT id FROM items WHERE name = $1").await.unwrap();
        assert_eq!(client.query_one(&a, &[&"two"]).await.unwrap().get::<_, i32>(0), 2);
        assert_eq!(other.query_one(&b, &[&"one"]).await.unwrap().get::<_, i32>(0), 1);
    }

    // COPY in both directions.
    let sink = client.copy_in("COPY items (id, name) FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 10..1010 {
        data.push_str(&format!("{i}\titem {i}\n"));
    }
    sink.send(bytes::Bytes::from(data)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 1000);
    let out = client.copy_out("COPY (SELECT id FROM items WHERE id < 13 ORDER BY id) TO STDOUT").await.unwrap();
    let chunks: Vec<bytes::Bytes> = out.try_collect().await.unwrap();
    let text: String = chunks.iter().map(|c| String::from_utf8_lossy(c).into_owned()).collect();
    assert_eq!(text, "1\n2\n10\n11\n12\n");

    // A large result streams through.
    let rows = client.query("SELECT g, repeat('x', 100) FROM generate_series(1, 100000) g", &[]).await.unwrap();
    assert_eq!(rows.len(), 100_000);
    assert_eq!(rows[99_999].get::<_, i32>(0), 100_000);

    // NOTICE messages reach the client.
    let (notice_client, mut connection) =
        tokio_postgres::connect(&proxy.url("acme_app", ACME_APP_PASSWORD, "acme.main"), NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = stream.next().await {
            if let AsyncMessage::Notice(notice) = message {
                let _ = tx.send(notice.message().to_owned());
            }
        }
    });
    notice_client.batch_execute("DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$").await.unwrap();
    let notice = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
    assert_eq!(notice, "hello from plpgsql");

    // Transactions hold one connection and roll back as a unit.
    client.batch_execute("BEGIN; INSERT INTO items VALUES (3, 'three')").await.unwrap();
    client.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(client.query_one("SELECT count(*) FROM items WHERE id = 3", &[]).await.unwrap().get::<_, i64>(0), 0);
}

#[tokio::test]
async fn session_state_never_leaks_between_clients() {
    let proxy = Proxy::start("pool_size = 1\nacquire_timeout_ms = 500", "enabled = false").await;
    let setup = proxy.client().await;
    setup.batch_execute("CREATE SCHEMA private; CREATE TABLE private.t (v text); CREATE TABLE public.t (v text); INSERT INTO private.t VALUES ('private'); INSERT INTO public.t VALUES ('public')").await.unwrap();
    drop(setup);

    let a = proxy.client().await;
    a.batch_execute("SET search_path = private").await.unwrap();
    a.batch_execute("CREATE TEMP TABLE scratch (v int); INSERT INTO scratch VALUES (1)").await.unwrap();
    assert_eq!(a.query_one("SELECT v FROM t", &[]).await.unwrap().get::<_, String>(0), "private");
    assert_eq!(proxy.stats().pool.in_use, 1, "client A is pinned to the only connection");

    // B waits for the pool while A holds it pinned, and times out cleanly.
    let b = proxy.client().await;
    let err = b.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err:?}");

    drop(a);
    // After A leaves, its connection is reset before B gets it.
    eventually(10, "A's connection is back in the pool", async || proxy.stats().pool.idle == 1).await;
    assert_eq!(b.query_one("SELECT v FROM t", &[]).await.unwrap().get::<_, String>(0), "public");
    let err = b.query_one("SELECT v FROM scratch", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE));
    let path: String = b.query_one("SHOW search_path", &[]).await.unwrap().get(0);
    assert_eq!(path, "\"$user\", public");
    assert!(proxy.stats().pool.resets >= 1);
}

#[tokio::test]
async fn set_role_is_cleared_by_the_reset_and_a_rejected_one_changes_nothing() {
    let proxy = Proxy::start("pool_size = 1", "max_age_s = 60").await;
    let origin = proxy.origin().await;
    origin.batch_execute("CREATE TABLE secrets (v text); INSERT INTO secrets VALUES ('owner only')").await.unwrap();
    // A role `app` may switch to, which cannot read the table.
    let admin = proxy.pg.connect("app").await;
    admin.batch_execute("CREATE ROLE reader NOLOGIN; GRANT reader TO app; CREATE ROLE stranger NOLOGIN").await.unwrap();

    let a = proxy.client().await;
    a.batch_execute("SET ROLE reader").await.unwrap();
    let err = a.query_one("SELECT v FROM secrets", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    // `RESET ALL` leaves the role in place; only the reset on release clears it.
    a.batch_execute("RESET ALL").await.unwrap();
    let role: String = a.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(role, "reader");
    drop(a);
    eventually(10, "the pinned connection is reset", async || proxy.stats().pool.idle == 1).await;
    let b = proxy.client().await;
    let role: String = b.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(role, "app", "SET ROLE did not survive the reset");

    // Same with SET SESSION AUTHORIZATION: refused for a non-superuser, and changes nothing.
    let c = proxy.client().await;
    let cached = c.simple_query("SELECT v FROM secrets").await.unwrap();
    assert_eq!(simple_rows(&cached), vec![vec![Some("owner only".to_owned())]]);
    let err = c.batch_execute("SET ROLE stranger").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    let hits = proxy.stats().cache_hits;
    // The rejected SET ROLE did not change the role the cache sees: same entry, served.
    let again = c.simple_query("SELECT v FROM secrets").await.unwrap();
    assert_eq!(simple_rows(&again), vec![vec![Some("owner only".to_owned())]]);
    assert_eq!(proxy.stats().cache_hits, hits + 1);
    assert_eq!(proxy.stats().pool.in_use, 0, "a rejected SET ROLE does not pin");
}

#[tokio::test]
async fn a_client_killed_mid_transaction_is_rolled_back_before_reuse() {
    let proxy = Proxy::start("pool_size = 1", "enabled = false").await;
    let origin = proxy.origin().await;
    origin.batch_execute("CREATE TABLE ledger (v int)").await.unwrap();

    let (victim, connection) = tokio_postgres::connect(&proxy.url("acme_app", ACME_APP_PASSWORD, "acme.main"), NoTls).await.unwrap();
    let task = tokio::spawn(connection);
    victim.batch_execute("BEGIN; INSERT INTO ledger VALUES (1); SELECT pg_advisory_xact_lock(42)").await.unwrap();
    task.abort();
    drop(victim);

    eventually(10, "the abandoned connection is rolled back and back in the pool", async || proxy.stats().pool.idle == 1).await;
    let next = proxy.client().await;
    let row = next.query_one("SELECT count(*), pg_try_advisory_xact_lock(42) FROM ledger", &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 0, "the insert was rolled back");
    assert!(row.get::<_, bool>(1), "the lock was released");
    let status = next.simple_query("SELECT 1").await.unwrap();
    assert!(!status.is_empty());
    assert_eq!(proxy.stats().pool.open, 1, "the same connection was reused, not leaked");
}

#[tokio::test]
async fn cancel_reaches_the_backend_running_the_query_and_no_other() {
    let proxy = Proxy::start("pool_size = 4", "enabled = false").await;
    let a = proxy.client().await;
    let b = proxy.client().await;
    let token = a.cancel_token();
    let slow_a = tokio::spawn(async move { a.simple_query("SELECT pg_sleep(20)").await });
    let slow_b = tokio::spawn(async move { b.simple_query("SELECT pg_sleep(1.5)").await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    token.cancel_query(NoTls).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), slow_a).await.expect("cancelled quickly").unwrap().unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED));
    slow_b.await.unwrap().expect("the other client's query was not cancelled");
    assert_eq!(proxy.stats().cancels, 1, "the forwarded cancel is counted");

    // A cancel with a wrong secret does nothing.
    let c = proxy.client().await;
    let forged = c.cancel_token();
    let c_task = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(1)").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut socket = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    use tokio::io::AsyncWriteExt;
    let mut packet = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    packet.extend_from_slice(&rand_i32().to_be_bytes());
    packet.extend_from_slice(&rand_i32().to_be_bytes());
    socket.write_all(&packet).await.unwrap();
    drop(forged);
    c_task.await.unwrap().expect("a forged cancel request has no effect");
    assert_eq!(proxy.stats().cancels, 1, "a forged cancel is not forwarded");
}

fn rand_i32() -> i32 {
    rand::random()
}

#[tokio::test]
async fn scram_refuses_wrong_passwords_and_nothing_reaches_the_origin_first() {
    let proxy = Proxy::start("", "enabled = false").await;
    for (user, password, db) in
        [("acme_app", "wrong", "acme.main"), ("nobody", "x", "acme.main"), ("acme_app", GLOBEX_PASSWORD, "acme.main")]
    {
        let err = tokio_postgres::connect(&proxy.url(user, password, db), NoTls).await.err().expect("refused");
        assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{user}: {err:?}");
    }
    // The origin's own credentials are not proxy credentials.
    let err = tokio_postgres::connect(&proxy.url("app", crate::harness::APP_PASSWORD, "acme.main"), NoTls).await.err().expect("refused");
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD));
    let err = tokio_postgres::connect(&proxy.url("acme_app", ACME_APP_PASSWORD, "nosuch"), NoTls).await.err().expect("refused");
    assert_eq!(err.code(), Some(&SqlState::INVALID_CATALOG_NAME));
    // No password at all: the client gives up without ever reaching the origin.
    let none = format!("host=127.0.0.1 port={} user=acme_app dbname=acme.main", proxy.addr.port());
    assert!(tokio_postgres::connect(&none, NoTls).await.is_err());
    let stats = proxy.stats();
    assert_eq!(stats.pool.connects, 0, "nothing ran on the origin before authentication: {stats:?}");
    assert!(stats.auth_failures >= 4);

    // The same user name on another tenant's database has its own password.
    let globex = proxy.client_as("acme_app", GLOBEX_PASSWORD, "globex.main").await;
    let db: String = globex.query_one("SELECT current_database()::text", &[]).await.unwrap().get(0);
    assert_eq!(db, "globex");
    let acme = proxy.client_as("acme_ro", ACME_RO_PASSWORD, "acme.main").await;
    let db: String = acme.query_one("SELECT current_database()::text", &[]).await.unwrap().get(0);
    assert_eq!(db, "app");
    assert_eq!(proxy.stats().pool.connects, 1);
}

#[tokio::test]
async fn client_flood_beyond_the_limit_gets_53300_while_admitted_clients_work() {
    let proxy = Proxy::start("pool_size = 2\nmax_client_connections = 5", "enabled = false").await;
    let mut admitted = Vec::new();
    for _ in 0..5 {
        admitted.push(proxy.client().await);
    }
    let mut refused = 0;
    let url = proxy.url("acme_app", ACME_APP_PASSWORD, "acme.main");
    let flood: Vec<_> = (0..30).map(|_| tokio_postgres::connect(&url, NoTls)).collect();
    for attempt in futures_util::future::join_all(flood).await {
        let err = attempt.err().expect("beyond the limit");
        assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err:?}");
        refused += 1;
    }
    assert_eq!(refused, 30);
    let work = admitted.iter().map(|c| c.query_one("SELECT 41 + 1", &[]));
    for row in futures_util::future::join_all(work).await {
        assert_eq!(row.unwrap().get::<_, i32>(0), 42);
    }
    drop(admitted);
    eventually(5, "client slots are released", async || proxy.stats().clients == 0).await;
    proxy.client().await.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn origin_restart_gives_errors_then_recovers_without_poisoned_connections() {
    let proxy = Proxy::start("pool_size = 4\nacquire_timeout_ms = 2000", "enabled = false").await;
    let clients: Vec<_> = futures_util::future::join_all((0..8).map(|_| proxy.client())).await;
    for c in &clients {
        c.simple_query("SELECT 1").await.unwrap();
    }
    proxy.pg.restart();
    // Every client gets a clean answer: an error or (after reconnecting) a result, never a hang.
    let mut errors = 0;
    for c in &clients {
        match tokio::time::timeout(Duration::from_secs(10), c.query_one("SELECT 1", &[])).await.expect("no hang") {
            Ok(_) => {}
            Err(_) => errors += 1,
        }
    }
    // Recovery: within a few seconds every client works again.
    eventually(15, "all clients work again after the restart", async || {
        let mut ok = true;
        for c in &clients {
            ok &= c.query_one("SELECT 1", &[]).await.is_ok();
        }
        ok
    })
    .await;
    let stats = proxy.stats();
    assert!(stats.pool.open <= 4, "{stats:?}");
    eprintln!("errors during the restart: {errors}; pool: {:?}", stats.pool);

    // A stopped origin answers with an error naming it, quickly, and backs off.
    proxy.pg.stop();
    proxy.accel.close_idle();
    let c = proxy.client().await;
    let started = std::time::Instant::now();
    let err = c.simple_query("SELECT 1").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(err.code(), Some(&SqlState::CANNOT_CONNECT_NOW), "{err:?}");
    proxy.pg.start_again();
    eventually(15, "the origin is reachable again", async || c.simple_query("SELECT 1").await.is_ok()).await;
}

#[tokio::test]
async fn garbage_and_hostile_lengths_get_errors_not_hangs_or_panics() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proxy = Proxy::start("", "enabled = false").await;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut cases: Vec<Vec<u8>> = vec![
        vec![0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0], // a 2 GiB startup packet
        vec![0xff, 0xff, 0xff, 0xf0, 0, 3, 0, 0], // a negative length
        vec![0, 0, 0, 8, 0, 2, 0, 0],             // protocol 2
        vec![0, 0, 0, 9, 0, 3, 0, 0, b'x'],       // truncated parameters
        b"\x00\x00\x00\x08\x04\xd2\x16\x2f\x00\x00\x00\x08\x04\xd2\x16\x2f".to_vec(), // two SSL requests
    ];
    for _ in 0..40 {
        let len = (next() % 64) as usize;
        cases.push((0..len).map(|_| next() as u8).collect());
    }
    for case in cases {
        let mut socket = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let _ = socket.write_all(&case).await;
        let _ = socket.shutdown().await;
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(12), socket.read_to_end(&mut reply)).await.expect("the proxy answers or closes").ok();
    }
    // A client that authenticates and then sends a message with a hostile length.
    let client = proxy.client().await;
    client.simple_query("SELECT 1").await.unwrap();
    assert_eq!(proxy.stats().pool.connects, 1, "garbage never reached the origin");
}

#[tokio::test]
async fn statement_idle_and_idle_in_transaction_timeouts_answer_with_sqlstates() {
    let proxy =
        Proxy::start("statement_timeout_ms = 300\nidle_client_timeout_ms = 1500\nidle_in_transaction_timeout_ms = 400", "enabled = false")
            .await;
    let client = proxy.client().await;
    let err = client.simple_query("SELECT pg_sleep(3)").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
    client.simple_query("SELECT 1").await.expect("the session survives a statement timeout");

    // Idle inside a transaction: the client is closed and its connection rolled back.
    client.batch_execute("BEGIN").await.unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(client.simple_query("SELECT 1").await.is_err(), "the idle transaction was ended");
    assert!(client.is_closed());
    crate::harness::eventually(5, "the connection is back after its rollback", async || proxy.stats().pool.in_use == 0).await;

    // Idle outside a transaction, past idle_client_timeout_ms: closed.
    let idle = proxy.client().await;
    idle.simple_query("SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(idle.simple_query("SELECT 1").await.is_err());
    assert!(proxy.stats().idle_timeouts >= 2, "{:?}", proxy.stats());
}

#[tokio::test]
async fn tls_is_negotiated_and_plaintext_is_refused_when_tls_is_required() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_dir, ca, (chain, key)) = crate::origin::write_pki(&["localhost"]);
    let acceptor = cordon_pgaccel::tls::acceptor(&chain, &key).unwrap();
    let settings = cordon_pgaccel::proxy::ProxySettings::new(Some(acceptor), true);
    let proxy = Proxy::start_with("", "enabled = false", settings).await;

    // Plaintext: refused before authentication, with the reason.
    let err =
        tokio_postgres::connect(&proxy.url("acme_app", ACME_APP_PASSWORD, "acme.main"), NoTls).await.err().expect("plaintext refused");
    assert_eq!(err.code(), Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION), "{err:?}");
    assert!(format!("{err:?}").contains("requires TLS"), "{err:?}");

    // SSLRequest, 'S', a verified handshake, and then the startup packet over TLS gets the
    // SCRAM challenge.
    let mut socket = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    socket.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await.unwrap();
    let mut answer = [0u8; 1];
    socket.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S");
    let connector = tokio_rustls::TlsConnector::from(crate::origin::client_config(&ca));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, socket).await.expect("handshake with the configured certificate");
    let mut params = Vec::new();
    for part in [&b"user"[..], b"acme_app", b"database", b"acme.main"] {
        params.extend_from_slice(part);
        params.push(0);
    }
    params.push(0);
    let mut startup = ((params.len() + 8) as u32).to_be_bytes().to_vec();
    startup.extend_from_slice(&(3u32 << 16).to_be_bytes());
    startup.extend_from_slice(&params);
    tls.write_all(&startup).await.unwrap();
    let mut head = [0u8; 9];
    tls.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0], b'R', "an authentication request");
    assert_eq!(i32::from_be_bytes([head[5], head[6], head[7], head[8]]), 10, "SASL");
    assert_eq!(proxy.stats().pool.connects, 0);
}

#[tokio::test]
async fn waiting_clients_beyond_the_limit_are_refused_at_once() {
    let proxy = Proxy::start("pool_size = 1\nmax_waiting_clients = 1\nacquire_timeout_ms = 5000", "enabled = false").await;
    let holder = proxy.client().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let waiter = proxy.client().await;
    let waiting = tokio::spawn(async move { waiter.simple_query("SELECT 2").await.map(|m| m.len()) });
    crate::harness::eventually(5, "one client waits for the pool", async || proxy.stats().pool.waiting == 1).await;

    let refused = proxy.client().await;
    let started = std::time::Instant::now();
    let err = refused.simple_query("SELECT 3").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err:?}");
    assert!(format!("{err:?}").contains("waiting"), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "refused at once, not after the acquire timeout");

    holder.batch_execute("COMMIT").await.unwrap();
    assert!(waiting.await.unwrap().is_ok(), "the waiting client got the connection");
    refused.simple_query("SELECT 4").await.expect("the refused client can retry");
    assert_eq!(proxy.stats().pool.refused_waiting, 1);
}
