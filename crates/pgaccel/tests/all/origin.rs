//! Connections to the origin: against the real test cluster, and against fake servers on
//! loopback for TLS, authentication methods and misbehaviour that Postgres itself never shows.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use cordon_pgaccel::origin::{OriginAuthMethods, OriginConfig, OriginError, OriginPassword, OriginTls, ServerConn, send_cancel};
use cordon_pgaccel::protocol::{self, BackendMessage, FrontendMessage, Limits, StartupMessage, TransactionStatus};
use cordon_pgaccel::tls::{self, ClientStream, TlsError};
use rand::{Rng, SeedableRng};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use cordon_testpg::TestPostgres;

const TENANT: &str = "tenant_origin";
const TENANT_PASSWORD: &str = "origin-pw-Zq7xK2";
const TENANT_DB: &str = "origin_db";

fn config(port: u16, user: &str, password: &str, database: &str) -> OriginConfig {
    OriginConfig {
        host: "127.0.0.1".into(),
        port,
        user: user.into(),
        database: database.into(),
        password: Some(OriginPassword::new(password.into())),
        tls: OriginTls::Disable,
        auth_methods: OriginAuthMethods::default(),
        connect_timeout: Duration::from_secs(10),
        application_name: "cordon-test".into(),
        options: Vec::new(),
    }
}

async fn tenant(pg: &TestPostgres) -> OriginConfig {
    pg.create_role_and_database(TENANT, TENANT_PASSWORD, TENANT_DB).await;
    config(pg.port, TENANT, TENANT_PASSWORD, TENANT_DB)
}

fn param<'a>(conn: &'a ServerConn, name: &str) -> Option<&'a str> {
    conn.parameters().iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

fn server_code(error: &OriginError) -> &str {
    match error {
        OriginError::Server(fields) => &fields.code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// The text columns of a DataRow.
fn data_row(body: &Bytes) -> Vec<Option<String>> {
    let mut body = body.clone();
    let count = body.get_i16();
    (0..count)
        .map(|_| {
            let len = body.get_i32();
            (len >= 0).then(|| String::from_utf8(body.split_to(len as usize).to_vec()).unwrap())
        })
        .collect()
}

#[tokio::test]
async fn connects_with_scram_and_runs_simple_and_extended_queries() {
    let pg = TestPostgres::start();
    let config = tenant(&pg).await;
    let mut conn = ServerConn::connect(&config).await.unwrap();
    let other = ServerConn::connect(&config).await.unwrap();
    assert_ne!(conn.id(), other.id());
    assert!(!conn.is_tls());

    let (pid, key) = conn.backend_key();
    assert_ne!(pid, 0);
    assert_ne!(key, 0);
    assert!(param(&conn, "server_version").is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit())), "{:?}", conn.parameters());
    assert_eq!(param(&conn, "client_encoding"), Some("UTF8"));
    assert_eq!(param(&conn, "application_name"), Some("cordon-test"));
    assert_eq!(conn.parameter("client_encoding"), Some("UTF8"));
    assert!(!conn.has_buffered_frame());

    assert_eq!(conn.simple_query("SELECT 1").await.unwrap(), TransactionStatus::Idle);
    assert_eq!(conn.simple_query("BEGIN").await.unwrap(), TransactionStatus::InTransaction);
    assert_eq!(conn.simple_query("ROLLBACK").await.unwrap(), TransactionStatus::Idle);

    // A later ParameterStatus replaces the value in place.
    let count = conn.parameters().len();
    conn.simple_query("SET application_name = 'renamed'").await.unwrap();
    assert_eq!(param(&conn, "application_name"), Some("renamed"));
    assert_eq!(conn.parameters().len(), count);

    // The session really is the tenant's.
    let buf = conn.write_buf();
    FrontendMessage::Query("SELECT current_user::text, current_database()::text".into()).encode(buf).unwrap();
    conn.flush().await.unwrap();
    let mut rows = Vec::new();
    loop {
        let frame = conn.read_frame().await.unwrap();
        match frame.tag {
            b'D' => rows.push(data_row(&frame.body)),
            b'Z' => break,
            _ => {}
        }
    }
    assert_eq!(rows, vec![vec![Some(TENANT.to_owned()), Some(TENANT_DB.to_owned())]]);

    // The extended protocol, pipelined in one write.
    let buf = conn.write_buf();
    FrontendMessage::Parse { name: "s1".into(), query: "SELECT $1::int + 1, NULL::text".into(), param_types: vec![] }.encode(buf).unwrap();
    FrontendMessage::Bind {
        portal: String::new(),
        statement: "s1".into(),
        param_formats: vec![],
        params: vec![Some(Bytes::from_static(b"41"))],
        result_formats: vec![],
    }
    .encode(buf)
    .unwrap();
    FrontendMessage::Execute { portal: String::new(), max_rows: 0 }.encode(buf).unwrap();
    FrontendMessage::Sync.encode(buf).unwrap();
    conn.flush().await.unwrap();
    assert!(conn.write_buf().is_empty());
    let mut tags = Vec::new();
    let mut row = None;
    let status = loop {
        let frame = conn.read_frame().await.unwrap();
        tags.push(frame.tag);
        match frame.tag {
            b'D' => row = Some(data_row(&frame.body)),
            b'Z' => break TransactionStatus::from_ready_for_query(&frame).unwrap(),
            _ => {}
        }
    };
    assert_eq!(tags, b"12DCZ");
    assert_eq!(row, Some(vec![Some("42".to_owned()), None]));
    assert_eq!(status, TransactionStatus::Idle);
    assert!(!conn.has_buffered_frame());

    conn.terminate().await;
    other.terminate().await;
}

#[tokio::test]
async fn a_wrong_password_is_a_fatal_server_error_that_never_shows_the_password() {
    let pg = TestPostgres::start();
    pg.create_role_and_database(TENANT, TENANT_PASSWORD, TENANT_DB).await;
    let wrong = "wrong-Password-9f3k";
    let error = ServerConn::connect(&config(pg.port, TENANT, wrong, TENANT_DB)).await.unwrap_err();
    assert_eq!(server_code(&error), "28P01");
    assert_eq!(error.sqlstate(), "28P01");
    assert!(error.is_fatal());
    for shown in [error.to_string(), format!("{error:?}")] {
        assert!(!shown.contains(wrong), "{shown}");
        assert!(!shown.contains(TENANT_PASSWORD), "{shown}");
    }

    let mut no_password = config(pg.port, TENANT, "", TENANT_DB);
    no_password.password = None;
    let error = ServerConn::connect(&no_password).await.unwrap_err();
    assert!(matches!(error, OriginError::Auth(_)), "{error:?}");
    assert_eq!(error.sqlstate(), "08004");

    let error = ServerConn::connect(&config(pg.port, TENANT, TENANT_PASSWORD, "no_such_db")).await.unwrap_err();
    assert_eq!(server_code(&error), "3D000");
}

#[tokio::test]
async fn query_errors_arrive_after_ready_for_query_and_leave_the_connection_usable() {
    let pg = TestPostgres::start();
    let mut conn = ServerConn::connect(&tenant(&pg).await).await.unwrap();

    let error = conn.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(server_code(&error), "22012");
    assert!(!error.is_fatal());
    assert!(!conn.has_buffered_frame());
    assert_eq!(conn.simple_query("SELECT 1").await.unwrap(), TransactionStatus::Idle);

    // In a transaction the error leaves it failed; the reset brings it back.
    assert_eq!(conn.simple_query("BEGIN").await.unwrap(), TransactionStatus::InTransaction);
    assert_eq!(server_code(&conn.simple_query("SELECT 1; SELECT 1/0; SELECT 2").await.unwrap_err()), "22012");
    assert_eq!(server_code(&conn.simple_query("SELECT 1").await.unwrap_err()), "25P02");
    assert_eq!(conn.simple_query("ROLLBACK").await.unwrap(), TransactionStatus::Idle);

    // A COPY FROM STDIN cannot hang a reset query.
    conn.simple_query("CREATE TEMP TABLE t (n int)").await.unwrap();
    assert_eq!(server_code(&conn.simple_query("COPY t FROM STDIN").await.unwrap_err()), "57014");
    assert_eq!(conn.simple_query("DISCARD ALL").await.unwrap(), TransactionStatus::Idle);

    let error = conn.simple_query("SELECT '\0'").await.unwrap_err();
    assert!(matches!(error, OriginError::Protocol(_)), "{error:?}");
    assert!(conn.write_buf().is_empty(), "a message that cannot be encoded leaves nothing behind");
    assert_eq!(conn.simple_query("SELECT 1").await.unwrap(), TransactionStatus::Idle);
}

/// Waits until backend `pid` is running its `pg_sleep`.
async fn wait_until_sleeping(pg: &TestPostgres, pid: i32) {
    let observer = pg.connect("postgres").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let active: i64 = observer
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active' AND query LIKE '%pg_sleep%'", &[&pid])
            .await
            .unwrap()
            .get(0);
        if active == 1 {
            return;
        }
        assert!(Instant::now() < deadline, "the query never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn send_cancel_stops_the_running_query_and_nothing_else() {
    let pg = TestPostgres::start();
    let config = tenant(&pg).await;
    let mut sleeper = ServerConn::connect(&config).await.unwrap();
    let mut idle = ServerConn::connect(&config).await.unwrap();
    let (pid, key) = sleeper.backend_key();
    assert_ne!(pid, idle.backend_key().0);

    let running = tokio::spawn(async move {
        let result = sleeper.simple_query("SELECT pg_sleep(30)").await;
        (sleeper, result)
    });
    wait_until_sleeping(&pg, pid).await;

    // A wrong secret is ignored by the server.
    send_cancel(&config, pid, key.wrapping_add(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!running.is_finished(), "a cancel with the wrong key must not stop the query");

    let started = Instant::now();
    send_cancel(&config, pid, key).await.unwrap();
    let (mut sleeper, result) = tokio::time::timeout(Duration::from_secs(5), running).await.expect("cancelled in time").unwrap();
    assert_eq!(server_code(&result.unwrap_err()), "57014");
    assert!(started.elapsed() < Duration::from_secs(5));

    assert_eq!(sleeper.simple_query("SELECT 1").await.unwrap(), TransactionStatus::Idle);
    assert_eq!(idle.simple_query("SELECT 1").await.unwrap(), TransactionStatus::Idle);
}

#[tokio::test]
async fn a_terminated_backend_reports_the_servers_fatal_error() {
    let pg = TestPostgres::start();
    let mut conn = ServerConn::connect(&tenant(&pg).await).await.unwrap();
    let (pid, _) = conn.backend_key();
    let running = tokio::spawn(async move { conn.simple_query("SELECT pg_sleep(30)").await });
    wait_until_sleeping(&pg, pid).await;
    let admin = pg.connect("postgres").await;
    assert!(admin.query_one("SELECT pg_terminate_backend($1)", &[&pid]).await.unwrap().get::<_, bool>(0));
    let error = tokio::time::timeout(Duration::from_secs(5), running).await.unwrap().unwrap().unwrap_err();
    assert_eq!(server_code(&error), "57P01");
    assert!(error.is_fatal());
}

#[tokio::test]
async fn unreachable_and_silent_origins_fail_fast() {
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let started = Instant::now();
    let error = ServerConn::connect(&config(closed_port, "u", "p", "d")).await.unwrap_err();
    assert!(matches!(&error, OriginError::Connect { addr, .. } if *addr == format!("127.0.0.1:{closed_port}")), "{error:?}");
    assert_eq!(error.sqlstate(), "08001");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(send_cancel(&config(closed_port, "u", "p", "d"), 1, 2).await.is_err());

    // Accepts, then never says a word.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            held.push(socket);
        }
    });
    let (_dir, ca, _) = write_pki(&["127.0.0.1"]);
    for tls in [OriginTls::Disable, OriginTls::verify_full(Some(ca.as_path())).unwrap()] {
        let mut silent = config(port, "u", "p", "d");
        silent.connect_timeout = Duration::from_millis(300);
        silent.tls = tls;
        let started = Instant::now();
        let error = ServerConn::connect(&silent).await.unwrap_err();
        assert!(matches!(error, OriginError::Timeout(_)), "{error:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        let error = send_cancel(&silent, 1, 2).await.unwrap_err();
        assert!(matches!(error, OriginError::Timeout(_)), "{error:?}");
    }
    holder.abort();
}

#[tokio::test]
async fn verify_full_refuses_a_server_without_tls() {
    let pg = TestPostgres::start();
    let mut config = tenant(&pg).await;
    config.tls = OriginTls::verify_full(None).unwrap();
    let error = ServerConn::connect(&config).await.unwrap_err();
    assert!(matches!(error, OriginError::Tls(_)), "{error:?}");
    assert!(error.to_string().contains("does not support TLS"), "{error}");
    assert!(error.is_fatal());
    assert!(send_cancel(&config, 1, 2).await.is_err());

    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("missing-ca.pem");
    let error = OriginTls::verify_full(Some(missing.as_path())).unwrap_err();
    assert!(error.to_string().contains(&missing.display().to_string()), "{error}");
    let garbage = dir.path().join("garbage-ca.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n").unwrap();
    let error = OriginTls::verify_full(Some(garbage.as_path())).unwrap_err();
    assert!(error.to_string().contains(&garbage.display().to_string()), "{error}");
    let empty = dir.path().join("empty-ca.pem");
    std::fs::write(&empty, "no certificates here\n").unwrap();
    let error = OriginTls::verify_full(Some(empty.as_path())).unwrap_err();
    assert!(error.to_string().contains("contains no certificates"), "{error}");
}

// ---------------------------------------------------------------------------
// TLS for clients, and fake origins
// ---------------------------------------------------------------------------

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A throwaway CA and a server certificate for `names`, written as PEM files: returns the
/// directory, the CA file, and the server's (chain, key) files.
pub(crate) fn write_pki(names: &[&str]) -> (TempDir, PathBuf, (PathBuf, PathBuf)) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "cordon pgaccel test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();

    let dir = TempDir::new().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, pem("CERTIFICATE", ca.der())).unwrap();
    let chain = dir.path().join("server.pem");
    std::fs::write(&chain, pem("CERTIFICATE", cert.der()) + &pem("CERTIFICATE", ca.der())).unwrap();
    let key_file = dir.path().join("server.key");
    std::fs::write(&key_file, pem("PRIVATE KEY", &key.serialize_der())).unwrap();
    (dir, ca_file, (chain, key_file))
}

pub(crate) fn client_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(ca).unwrap()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[tokio::test]
async fn tls_acceptor_serves_a_handshake_from_its_pem_files() {
    let (dir, ca, (chain, key)) = write_pki(&["localhost"]);
    let acceptor = tls::acceptor(&chain, &key).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut stream = ClientStream::Tls(Box::new(acceptor.accept(tcp).await.unwrap()));
        assert!(stream.is_tls());
        let mut ping = [0u8; 4];
        stream.read_exact(&mut ping).await.unwrap();
        assert_eq!(&ping, b"ping");
        stream.write_all(b"pong").await.unwrap();
        stream.shutdown().await.unwrap();
    });
    let connector = tokio_rustls::TlsConnector::from(client_config(&ca));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut client = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    client.write_all(b"ping").await.unwrap();
    let mut pong = Vec::new();
    client.read_to_end(&mut pong).await.unwrap();
    assert_eq!(pong, b"pong");
    server.await.unwrap();

    // Every bad file is named in the error.
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n").unwrap();
    let error = acceptor_error(&garbage, &key);
    assert!(matches!(error, TlsError::Certificates { .. }), "{error:?}");
    assert!(error.to_string().contains(&garbage.display().to_string()), "{error}");
    let error = acceptor_error(&chain, &garbage);
    assert!(error.to_string().contains(&garbage.display().to_string()), "{error}");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "nothing\n").unwrap();
    assert!(matches!(acceptor_error(&empty, &key), TlsError::NoCertificates { path } if path == empty));
    assert!(matches!(acceptor_error(&chain, &empty), TlsError::NoKey { path } if path == empty));
    // The certificate file holds no key; the key file holds no certificate.
    assert!(matches!(acceptor_error(&chain, &chain), TlsError::NoKey { .. }));
    assert!(matches!(acceptor_error(&key, &key), TlsError::NoCertificates { .. }));
    let missing = dir.path().join("missing.pem");
    let error = acceptor_error(&missing, &key);
    assert!(error.to_string().contains(&missing.display().to_string()), "{error}");

    // A key that does not belong to the certificate.
    let (_other_dir, _, (_, other_key)) = write_pki(&["localhost"]);
    let error = acceptor_error(&chain, &other_key);
    assert!(matches!(error, TlsError::Config { .. }), "{error:?}");
}

/// `TlsAcceptor` has no `Debug`, so `unwrap_err` is not available.
fn acceptor_error(cert_chain: &Path, key: &Path) -> TlsError {
    match tls::acceptor(cert_chain, key) {
        Ok(_) => panic!("{} and {} were accepted", cert_chain.display(), key.display()),
        Err(e) => e,
    }
}

/// How a fake origin authenticates its one client.
#[derive(Clone, Copy)]
enum FakeAuth {
    Cleartext,
    Md5,
}

/// A fake origin that accepts one connection, optionally upgrades it with TLS, checks the
/// password the way `auth` says, and completes the startup. Returns the port and a task that
/// yields the startup parameters it received.
async fn fake_origin(
    tls: Option<tokio_rustls::TlsAcceptor>,
    auth: FakeAuth,
    password: &'static str,
) -> (u16, tokio::task::JoinHandle<Vec<(String, String)>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let (mut stream, mut buf) = (ClientStream::Plain(tcp), BytesMut::new());
        let limits = Limits::default();
        let mut startup = read_startup(&mut stream, &mut buf, &limits).await;
        if startup == StartupMessage::SslRequest {
            let ClientStream::Plain(mut tcp) = stream else { unreachable!() };
            match &tls {
                Some(acceptor) => {
                    tcp.write_all(b"S").await.unwrap();
                    // A client that rejects our certificate ends the test's interest here.
                    let Ok(tls) = acceptor.accept(tcp).await else { return Vec::new() };
                    stream = ClientStream::Tls(Box::new(tls));
                }
                None => {
                    tcp.write_all(b"N").await.unwrap();
                    stream = ClientStream::Plain(tcp);
                }
            }
            startup = read_startup(&mut stream, &mut buf, &limits).await;
        }
        let StartupMessage::Startup { params } = startup else { panic!("expected a startup packet, got {startup:?}") };
        let user = params.iter().find(|(k, _)| k == "user").unwrap().1.clone();
        let mut out = BytesMut::new();
        let salt = [1, 2, 3, 4];
        match auth {
            FakeAuth::Cleartext => BackendMessage::AuthenticationCleartextPassword.encode(&mut out).unwrap(),
            FakeAuth::Md5 => {
                out.put_u8(b'R');
                out.put_i32(12);
                out.put_i32(5);
                out.put_slice(&salt);
            }
        }
        stream.write_all(&out).await.unwrap();
        out.clear();
        let Some(frame) = read_frame(&mut stream, &mut buf, &limits).await else {
            return params;
        };
        assert_eq!(frame.tag, b'p');
        let sent = frame.body.strip_suffix(&[0]).unwrap();
        let expected = match auth {
            FakeAuth::Cleartext => password.to_owned(),
            FakeAuth::Md5 => postgres_protocol::authentication::md5_hash(user.as_bytes(), password.as_bytes(), salt),
        };
        assert_eq!(sent, expected.as_bytes());
        for message in [
            BackendMessage::AuthenticationOk,
            BackendMessage::ParameterStatus { name: "server_version".into(), value: "15.0 (fake)".into() },
            BackendMessage::BackendKeyData { process_id: 77, secret_key: 99 },
            BackendMessage::ReadyForQuery(TransactionStatus::Idle),
        ] {
            message.encode(&mut out).unwrap();
        }
        stream.write_all(&out).await.unwrap();
        // Answer one query, then wait for Terminate.
        let frame = read_frame(&mut stream, &mut buf, &limits).await.unwrap();
        assert_eq!(frame.tag, b'Q');
        out.clear();
        BackendMessage::ReadyForQuery(TransactionStatus::Idle).encode(&mut out).unwrap();
        stream.write_all(&out).await.unwrap();
        let frame = read_frame(&mut stream, &mut buf, &limits).await.unwrap();
        assert_eq!(frame.tag, b'X');
        params
    });
    (port, task)
}

async fn read_startup(stream: &mut ClientStream, buf: &mut BytesMut, limits: &Limits) -> StartupMessage {
    loop {
        if let Some(message) = protocol::decode_startup(buf, limits).unwrap() {
            return message;
        }
        assert_ne!(stream.read_buf(buf).await.unwrap(), 0, "the client hung up during startup");
    }
}

async fn read_frame(stream: &mut ClientStream, buf: &mut BytesMut, limits: &Limits) -> Option<protocol::Frame> {
    loop {
        if let Some(frame) = protocol::decode_frame(buf, limits).unwrap() {
            return Some(frame);
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

#[tokio::test]
async fn verify_full_connects_over_tls_and_sends_a_cleartext_password_only_there() {
    let (_dir, ca, (chain, key)) = write_pki(&["127.0.0.1"]);
    let acceptor = tls::acceptor(&chain, &key).unwrap();

    // Over verify-full TLS, but the database does not allow cleartext: nothing is sent.
    let (port, server) = fake_origin(Some(acceptor.clone()), FakeAuth::Cleartext, "clear-pw").await;
    let mut config = config(port, "alice", "clear-pw", "app");
    config.tls = OriginTls::verify_full(Some(ca.as_path())).unwrap();
    let error = ServerConn::connect(&config).await.unwrap_err();
    assert!(matches!(&error, OriginError::Auth(message) if message.contains("origin_auth_methods")), "{error:?}");
    server.await.unwrap();

    let (port, server) = fake_origin(Some(acceptor.clone()), FakeAuth::Cleartext, "clear-pw").await;
    config.port = port;
    config.auth_methods.password = true;
    let mut conn = ServerConn::connect(&config).await.unwrap();
    assert!(conn.is_tls());
    assert_eq!(conn.backend_key(), (77, 99));
    assert_eq!(conn.parameter("server_version"), Some("15.0 (fake)"));
    assert_eq!(conn.simple_query("SELECT 1").await.unwrap(), TransactionStatus::Idle);
    conn.terminate().await;
    let params = server.await.unwrap();
    for (key, value) in [("user", "alice"), ("database", "app"), ("client_encoding", "UTF8"), ("application_name", "cordon-test")] {
        assert!(params.contains(&(key.to_owned(), value.to_owned())), "{params:?}");
    }

    // Without TLS the same request is refused, even when allowed, and the password never leaves.
    let (port, server) = fake_origin(None, FakeAuth::Cleartext, "clear-pw").await;
    let mut plain = super_config(port, "clear-pw");
    plain.auth_methods.password = true;
    let error = ServerConn::connect(&plain).await.unwrap_err();
    assert!(matches!(&error, OriginError::Auth(message) if message.contains("cleartext")), "{error:?}");
    assert!(!format!("{error} {error:?}").contains("clear-pw"));
    server.await.unwrap();

    // A certificate for another name fails verification.
    let (_other_dir, other_ca, (other_chain, other_key)) = write_pki(&["db.example.com"]);
    let (port, server) = fake_origin(Some(tls::acceptor(&other_chain, &other_key).unwrap()), FakeAuth::Cleartext, "pw").await;
    let mut config = super_config(port, "pw");
    config.tls = OriginTls::verify_full(Some(other_ca.as_path())).unwrap();
    let error = ServerConn::connect(&config).await.unwrap_err();
    assert!(matches!(error, OriginError::Tls(_)), "{error:?}");
    assert!(server.await.unwrap().is_empty());

    // A certificate from a CA we do not trust fails too.
    let (port, server) = fake_origin(Some(acceptor), FakeAuth::Cleartext, "pw").await;
    let mut config = super_config(port, "pw");
    config.tls = OriginTls::verify_full(Some(other_ca.as_path())).unwrap();
    let error = ServerConn::connect(&config).await.unwrap_err();
    assert!(matches!(error, OriginError::Tls(_)), "{error:?}");
    assert!(server.await.unwrap().is_empty());
}

fn super_config(port: u16, password: &str) -> OriginConfig {
    config(port, "alice", password, "app")
}

#[tokio::test]
async fn md5_authentication_sends_the_salted_hash_over_verify_full_when_allowed() {
    let (_dir, ca, (chain, key)) = write_pki(&["127.0.0.1"]);
    let (port, server) = fake_origin(Some(tls::acceptor(&chain, &key).unwrap()), FakeAuth::Md5, "md5-pw").await;
    let mut config = super_config(port, "md5-pw");
    config.tls = OriginTls::verify_full(Some(ca.as_path())).unwrap();
    config.auth_methods.md5 = true;
    let mut conn = ServerConn::connect(&config).await.unwrap();
    assert!(conn.is_tls());
    conn.simple_query("SELECT 1").await.unwrap();
    conn.terminate().await;
    server.await.unwrap();
}

fn kind(error: &OriginError) -> &'static str {
    match error {
        OriginError::Connect { .. } => "connect",
        OriginError::Timeout(_) => "timeout",
        OriginError::Tls(_) => "tls",
        OriginError::Auth(_) => "auth",
        OriginError::Server(_) => "server",
        OriginError::Protocol(_) => "protocol",
        // A peer that hangs up may be seen as end of file or as a reset.
        OriginError::Closed | OriginError::Io(_) => "closed",
    }
}

/// A fake origin that reads the startup packet, answers with `reply`, and hangs up.
async fn garbage_origin(reply: Vec<u8>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut stream = ClientStream::Plain(tcp);
        read_startup(&mut stream, &mut BytesMut::new(), &Limits::default()).await;
        let _ = stream.write_all(&reply).await;
        let _ = stream.shutdown().await;
    });
    port
}

fn auth_request(code: i32, data: &[u8]) -> Vec<u8> {
    let mut out = vec![b'R'];
    out.extend_from_slice(&(8 + data.len() as i32).to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(data);
    out
}

#[tokio::test]
async fn misbehaving_origins_give_clean_errors() {
    let ok = auth_request(0, b"");
    let ready = b"Z\0\0\0\x05I".to_vec();
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("nothing", "closed", vec![]),
        ("huge length", "protocol", b"R\x7f\xff\xff\xff".to_vec()),
        ("negative length", "protocol", b"R\xff\xff\xff\xff".to_vec()),
        ("length below minimum", "protocol", b"R\0\0\0\x02".to_vec()),
        ("truncated frame", "closed", b"R\0\0\0\x10\0\0".to_vec()),
        ("short auth request", "protocol", b"R\0\0\0\x06\0\0".to_vec()),
        ("unknown auth method", "auth", auth_request(2, b"")),
        ("md5 without salt", "protocol", auth_request(5, b"\x01")),
        ("sasl without scram", "auth", auth_request(10, b"PLAIN\0\0")),
        ("sasl unterminated", "protocol", auth_request(10, b"SCRAM-SHA-256")),
        ("sasl continue first", "protocol", auth_request(11, b"r=abc")),
        ("sasl bogus continue", "auth", [auth_request(10, b"SCRAM-SHA-256\0\0"), auth_request(11, b"garbage")].concat()),
        ("sasl skipped to ok", "auth", [auth_request(10, b"SCRAM-SHA-256\0\0"), ok.clone()].concat()),
        ("sasl restarted", "auth", [auth_request(10, b"SCRAM-SHA-256\0\0"), auth_request(10, b"SCRAM-SHA-256\0\0")].concat()),
        ("unexpected message", "protocol", b"D\0\0\0\x04".to_vec()),
        ("bad error response", "protocol", b"E\0\0\0\x06X\0".to_vec()),
        ("ok then eof", "closed", ok.clone()),
        ("bad backend key", "protocol", [ok.clone(), b"K\0\0\0\x08\0\0\0\x01".to_vec()].concat()),
        ("bad parameter status", "protocol", [ok.clone(), b"S\0\0\0\x06a\0".to_vec()].concat()),
        ("bad ready status", "protocol", [ok.clone(), b"Z\0\0\0\x05Q".to_vec()].concat()),
        ("ready too long", "protocol", [ok.clone(), b"Z\0\0\0\x06II".to_vec()].concat()),
        ("row before ready", "protocol", [ok.clone(), b"D\0\0\0\x06\0\0".to_vec(), ready.clone()].concat()),
        ("fatal after ok", "server", [ok.clone(), b"E\0\0\0\x18SFATAL\0C57P01\0Mbye\0\0".to_vec()].concat()),
        // Before ReadyForQuery there is no session, so even an ERROR ends the connection.
        ("error after ok", "server", [ok.clone(), b"E\0\0\0\x18SERROR\0C08P01\0Mbye\0\0".to_vec()].concat()),
    ];
    for (name, expected, reply) in cases {
        // What follows an AuthenticationOk is reached only by a client without a password:
        // with one, an origin that skips authentication is refused before anything else.
        let trust = reply.starts_with(&ok);
        let port = garbage_origin(reply).await;
        let mut config = super_config(port, "pw");
        if trust {
            config.password = None;
        }
        config.connect_timeout = Duration::from_secs(2);
        let started = Instant::now();
        let result = ServerConn::connect(&config).await;
        assert!(result.is_err(), "{name}: connected");
        let error = result.unwrap_err();
        assert_eq!(kind(&error), expected, "{name}: {error:?}");
        assert!(error.is_fatal(), "{name}: {error:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "{name}");
    }

    // Random bytes, and random bytes after a valid beginning.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x0c0d0e);
    for round in 0..150 {
        let len = rng.random_range(0..64);
        let mut reply: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if round % 3 == 0 {
            reply = [ok.clone(), reply].concat();
        } else if round % 3 == 1 && !reply.is_empty() {
            reply[0] = b'R';
        }
        let port = garbage_origin(reply.clone()).await;
        let mut config = super_config(port, "pw");
        if round % 3 == 0 {
            config.password = None;
        }
        config.connect_timeout = Duration::from_secs(2);
        let result = ServerConn::connect(&config).await;
        assert!(result.is_err(), "round {round}: connected with {reply:?}");
        assert!(!matches!(result.unwrap_err(), OriginError::Timeout(_)), "round {round}: {reply:?}");
    }
}
