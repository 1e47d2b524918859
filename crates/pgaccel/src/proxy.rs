//! The wire-protocol proxy: Postgres clients connect to Cordon, authenticate with SCRAM-SHA-256
//! against the database's proxy users, and share the database's pool in transaction mode.
//!
//! A client holds an origin connection only while it is inside a transaction (or, when it leaves
//! session state behind, until it disconnects; see [`crate::classify`] for what pins). Between
//! transactions its named prepared statements live here, in the session, and are prepared on
//! whichever origin connection runs its next `Bind`, under a server-side name derived from the
//! statement's text, so clients never collide on names and an origin connection keeps each
//! statement once for every client.
//!
//! Responses are matched to requests with a queue of [`Slot`]s, one per message sent (or answered
//! here without the origin), in order. That is what lets the session inject `Parse` messages the
//! client never sent and hide their `ParseComplete`, answer `Close` of a statement itself, and
//! skip to the next `Sync` after an error exactly as Postgres does.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::accel::{Accelerator, Database};
use crate::cache::{CacheKey, FetchFuture, Fetched, opted_out};
use crate::cancel::{CancelHandle, CancelTarget};
use crate::catalog::Invalidation;
use crate::classify::Classification;
use crate::origin::OriginError;
use crate::pool::{Pool, PoolError, PooledConn, Release, describe_origin_error};
use crate::protocol::{
    BackendMessage, ErrorFields, Frame, FrontendMessage, Limits, Phase, ProtocolError, Severity, StartupMessage, Target, TransactionStatus,
    decode_frame, decode_startup, parse_frontend,
};
use crate::scram::{MECHANISM, ScramServer};
use crate::tls::ClientStream;

/// Messages and bytes a client may queue before a Sync or Flush.
const MAX_BATCH_MESSAGES: usize = 4096;
const MAX_BATCH_BYTES: usize = 64 << 20;
/// Responses are written to the client once this much is buffered, or when the origin has
/// nothing more buffered.
const CLIENT_FLUSH_BYTES: usize = 64 << 10;
/// Bytes of a client's next messages read ahead while its statement runs, to notice a hang-up,
/// and how long the origin must have been quiet before the client is watched.
const CLIENT_WATCH_BYTES: usize = 64 << 10;
const CLIENT_WATCH_AFTER: Duration = Duration::from_millis(100);
/// Startup parameters a client may send. Others would be session state that transaction pooling
/// cannot carry from one origin connection to the next, so they are refused with a clear error.
const ACCEPTED_STARTUP_PARAMS: &[&str] = &["user", "database", "application_name", "fallback_application_name", "client_encoding"];

/// Settings of the proxy listener.
#[derive(Clone)]
pub struct ProxySettings {
    pub tls: Option<TlsAcceptor>,
    pub require_tls: bool,
    /// Time a new connection has to finish TLS, startup and authentication.
    pub handshake_timeout: Duration,
    /// Connections still in their handshake, across all databases: they are not yet counted
    /// against any database's client limit, so they get a limit of their own.
    pub max_handshakes: usize,
    /// Connections still in their handshake from one source address (IPv6 by its /64), so that
    /// one address cannot hold every handshake slot.
    pub max_handshakes_per_address: usize,
}

impl ProxySettings {
    /// The defaults of `[postgres_proxy]`, with the given TLS settings.
    pub fn new(tls: Option<TlsAcceptor>, require_tls: bool) -> ProxySettings {
        ProxySettings {
            tls,
            require_tls,
            handshake_timeout: Duration::from_millis(cordon_config::DEFAULT_HANDSHAKE_TIMEOUT_MS),
            max_handshakes: cordon_config::DEFAULT_MAX_HANDSHAKES as usize,
            max_handshakes_per_address: cordon_config::DEFAULT_MAX_HANDSHAKES_PER_ADDRESS as usize,
        }
    }
}

impl std::fmt::Debug for ProxySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxySettings")
            .field("tls", &self.tls.is_some())
            .field("require_tls", &self.require_tls)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_handshakes", &self.max_handshakes)
            .field("max_handshakes_per_address", &self.max_handshakes_per_address)
            .finish()
    }
}

/// Handshakes in progress by source address.
#[derive(Debug, Default)]
struct HandshakesByAddress(Mutex<HashMap<IpAddr, usize>>);

/// One handshake's place in its address's count, given back when dropped.
struct AddressSlot {
    table: Arc<HandshakesByAddress>,
    address: IpAddr,
}

impl HandshakesByAddress {
    /// The address a client is counted under: IPv4 as is (also when mapped into IPv6), IPv6 by
    /// its /64, the smallest block one subscriber is usually given.
    fn key(address: IpAddr) -> IpAddr {
        match address {
            IpAddr::V4(v4) => IpAddr::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
            },
        }
    }

    fn take(self: &Arc<Self>, address: IpAddr, limit: usize) -> Option<AddressSlot> {
        let address = HandshakesByAddress::key(address);
        let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = table.entry(address).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(AddressSlot { table: self.clone(), address })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut table = self.table.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = table.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                table.remove(&self.address);
            }
        }
    }
}

/// Refuses a connection before its handshake with a FATAL 53300, on a task of its own.
fn refuse_connection(socket: tokio::net::TcpStream, message: &'static str) {
    tokio::spawn(async move {
        let mut socket = socket;
        let fields = ErrorFields::new(Severity::Fatal, "53300", message);
        let _ = tokio::time::timeout(Duration::from_secs(1), write_message(&mut socket, &BackendMessage::ErrorResponse(fields))).await;
    });
}

/// Accepts proxy clients until `shutdown` resolves.
pub async fn serve(accel: Arc<Accelerator>, listener: TcpListener, settings: ProxySettings, shutdown: impl Future<Output = ()>) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(settings.max_handshakes));
    let by_address = Arc::new(HandshakesByAddress::default());
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(target: "cordon::pgaccel", error = %error, "accepting a proxy connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        // The address's own limit first, so that one address's flood takes none of the slots
        // that the global limit keeps for everyone else.
        let Some(address_slot) = by_address.take(peer.ip(), settings.max_handshakes_per_address) else {
            refuse_connection(socket, "too many connections from this address are being opened at once; retry");
            continue;
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            refuse_connection(socket, "too many connections are being opened at once; retry");
            continue;
        };
        let accel = accel.clone();
        let settings = settings.clone();
        tokio::spawn(async move {
            let handshake =
                tokio::time::timeout(settings.handshake_timeout, handshake(&accel, ClientStream::Plain(socket), &settings)).await;
            drop(permit);
            drop(address_slot);
            let session = match handshake {
                Ok(Ok(Some(session))) => session,
                Ok(Ok(None)) => return,
                Ok(Err(error)) => {
                    tracing::debug!(target: "cordon::pgaccel", %peer, error = %error, "proxy handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(target: "cordon::pgaccel", %peer, "proxy handshake timed out");
                    return;
                }
            };
            session.run().await;
        });
    }
}

#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("refused: {0}")]
    Refused(String),
}

/// Reads the startup packet, negotiates TLS, checks the database and its limits, and runs SCRAM.
/// Nothing touches the origin before the client has authenticated.
async fn handshake(
    accel: &Arc<Accelerator>,
    mut stream: ClientStream,
    settings: &ProxySettings,
) -> Result<Option<Session>, HandshakeError> {
    let limits = Limits::default();
    let mut rbuf = BytesMut::with_capacity(1024);
    let mut negotiated = false;
    let params = loop {
        let message = match decode_startup(&mut rbuf, &limits) {
            Ok(Some(message)) => message,
            Ok(None) => {
                if stream.read_buf(&mut rbuf).await? == 0 {
                    return Ok(None);
                }
                continue;
            }
            Err(error) => {
                let _ = write_message(&mut stream, &BackendMessage::ErrorResponse(error.to_error_fields())).await;
                return Err(error.into());
            }
        };
        match message {
            StartupMessage::SslRequest if !negotiated => {
                negotiated = true;
                if !rbuf.is_empty() {
                    // Bytes after the SSLRequest would be read as plaintext but believed encrypted.
                    return Err(HandshakeError::Refused("data sent after SSLRequest, before the TLS handshake".into()));
                }
                match (&settings.tls, stream) {
                    (Some(acceptor), ClientStream::Plain(mut socket)) => {
                        socket.write_all(b"S").await?;
                        let tls = acceptor.accept(socket).await?;
                        stream = ClientStream::Tls(Box::new(tls));
                    }
                    (_, other) => {
                        stream = other;
                        stream.write_all(b"N").await?;
                    }
                }
            }
            StartupMessage::GssEncRequest if !negotiated => {
                negotiated = true;
                stream.write_all(b"N").await?;
            }
            StartupMessage::SslRequest | StartupMessage::GssEncRequest => {
                return Err(HandshakeError::Refused("a second encryption request".into()));
            }
            StartupMessage::Cancel { process_id, secret_key } => {
                accel.cancels.cancel(process_id, secret_key).await;
                return Ok(None);
            }
            StartupMessage::Startup { params } => break params,
        }
    };
    let refuse = |code: &str, message: String, hint: Option<&str>| {
        let mut fields = ErrorFields::new(Severity::Fatal, code, message);
        if let Some(hint) = hint {
            fields = fields.with_hint(hint);
        }
        fields
    };
    let tls = matches!(stream, ClientStream::Tls(_));
    let param = |key: &str| params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let user = param("user").unwrap_or_default().to_owned();
    let dbname = param("database").filter(|d| !d.is_empty()).unwrap_or(&user).to_owned();
    let application_name = param("application_name").or(param("fallback_application_name")).unwrap_or("").to_owned();

    let refusal = if settings.require_tls && !tls {
        Some(refuse("28000", "this server requires TLS".into(), Some("connect with sslmode=require or stricter")))
    } else if let Some((key, _)) = params.iter().find(|(k, _)| !ACCEPTED_STARTUP_PARAMS.contains(&k.as_str())) {
        Some(refuse(
            "0A000",
            format!("startup parameter \"{}\" is not supported by the transaction pooler", truncate(key, 64)),
            Some("set session options with SET inside a transaction (SET LOCAL), or remove the parameter from the connection string"),
        ))
    } else if let Some(encoding) = param("client_encoding")
        && !matches!(encoding.to_ascii_uppercase().replace('-', "").as_str(), "UTF8" | "UNICODE")
    {
        Some(refuse(
            "22023",
            format!("client_encoding \"{}\" is not supported", truncate(encoding, 32)),
            Some("use client_encoding UTF8 (for psql: PGCLIENTENCODING=UTF8)"),
        ))
    } else {
        None
    };
    if let Some(fields) = refusal {
        return Err(refused(&mut stream, fields, "startup parameters").await);
    }
    let Some(db) = accel.database_for_client(&dbname).cloned() else {
        // Same answer whether the database exists for another tenant or not at all.
        let fields = refuse("3D000", format!("database \"{}\" does not exist", truncate(&dbname, 64)), None);
        return Err(refused(&mut stream, fields, "unknown database").await);
    };

    let clients = db.clients.fetch_add(1, Ordering::AcqRel) + 1;
    let slot = ClientSlot(db.clone());
    if clients > db.limits.max_client_connections {
        db.counters.clients_refused.fetch_add(1, Ordering::Relaxed);
        let fields = refuse(
            "53300",
            format!("too many clients connected to database \"{dbname}\" (limit {})", db.limits.max_client_connections),
            Some("retry later, or raise max_client_connections for this database"),
        );
        return Err(refused(&mut stream, fields, "client limit").await);
    }

    // SCRAM-SHA-256. An unknown user runs the same exchange against a mock verifier and fails
    // the same way as a wrong password.
    let mut scram = match db.users.get(&user) {
        Some(verifier) => ScramServer::new(verifier),
        None => ScramServer::new_for_unknown_user(&user, &accel.mock),
    };
    write_message(&mut stream, &BackendMessage::AuthenticationSasl { mechanisms: vec![MECHANISM.to_owned()] }).await?;
    // A failed proof is counted and logged as a security event; a malformed exchange is not.
    let scram_refusal = |error: crate::scram::ScramError| {
        if error.sqlstate() != "28P01" {
            return refuse(error.sqlstate(), error.to_string(), None);
        }
        db.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
        tracing::info!(target: "cordon::security", event = "pg_auth_failed", tenant = %db.tenant, database = %db.name, user = %truncate(&user, 64), reason = %error, "proxy authentication failed");
        refuse("28P01", format!("password authentication failed for user \"{}\"", truncate(&user, 64)), None)
    };
    let first = match read_auth_message(&mut stream, &mut rbuf, &limits, Phase::AwaitingSaslInitialResponse).await? {
        FrontendMessage::SaslInitialResponse { mechanism, data } if mechanism == MECHANISM => data.unwrap_or_default(),
        FrontendMessage::SaslInitialResponse { mechanism, .. } => {
            let fields = refuse("28000", format!("unsupported SASL mechanism \"{}\"", truncate(&mechanism, 32)), Some("use SCRAM-SHA-256"));
            return Err(refused(&mut stream, fields, "SASL mechanism").await);
        }
        _ => return Ok(None),
    };
    let server_first = match scram.client_first(&first) {
        Ok(reply) => reply,
        Err(error) => return Err(refused(&mut stream, scram_refusal(error), "SCRAM").await),
    };
    write_message(&mut stream, &BackendMessage::AuthenticationSaslContinue(server_first.into())).await?;
    let FrontendMessage::SaslResponse(client_final) =
        read_auth_message(&mut stream, &mut rbuf, &limits, Phase::AwaitingSaslResponse).await?
    else {
        return Ok(None);
    };
    let server_final = match scram.client_final(&client_final) {
        Ok(reply) => reply,
        Err(error) => return Err(refused(&mut stream, scram_refusal(error), "SCRAM").await),
    };
    let mut out = BytesMut::new();
    BackendMessage::AuthenticationSaslFinal(server_final.into()).encode(&mut out)?;
    BackendMessage::AuthenticationOk.encode(&mut out)?;

    // Authenticated: from here on the origin may be contacted on the client's behalf.
    let mut parameters = db.pool.parameters();
    if parameters.is_empty() {
        match db.pool.acquire().await {
            Ok(conn) => {
                parameters = conn.conn.parameters().to_vec();
                drop(conn);
            }
            Err(error) => {
                stream.write_all(&out).await?;
                let mut fields = error.to_error_fields();
                fields.severity = Severity::Fatal;
                return Err(refused(&mut stream, fields, "origin unavailable").await);
            }
        }
    }
    for (name, value) in &parameters {
        let value = match name.as_str() {
            // The origin's role name is Cordon's business; the client sees its own user.
            "session_authorization" => user.clone(),
            "is_superuser" => "off".into(),
            "application_name" => application_name.clone(),
            "client_encoding" => "UTF8".into(),
            _ => value.clone(),
        };
        BackendMessage::ParameterStatus { name: name.clone(), value }.encode(&mut out)?;
    }
    let cancel = accel.cancels.register(db.clone());
    BackendMessage::BackendKeyData { process_id: cancel.process_id, secret_key: cancel.secret_key }.encode(&mut out)?;
    BackendMessage::ReadyForQuery(TransactionStatus::Idle).encode(&mut out)?;
    stream.write_all(&out).await?;
    db.counters.client_connections.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(target: "cordon::pgaccel", tenant = %db.tenant, database = %db.name, user = %user, "proxy client authenticated");
    Ok(Some(Session::new(db, slot, stream, rbuf, user, cancel)))
}

async fn read_auth_message(
    stream: &mut ClientStream,
    rbuf: &mut BytesMut,
    limits: &Limits,
    phase: Phase,
) -> Result<FrontendMessage, HandshakeError> {
    loop {
        match decode_frame(rbuf, limits) {
            Ok(Some(frame)) => {
                return match parse_frontend(&frame, phase) {
                    Ok(message) => Ok(message),
                    Err(error) => {
                        let _ = write_message(stream, &BackendMessage::ErrorResponse(error.to_error_fields())).await;
                        Err(error.into())
                    }
                };
            }
            Ok(None) => {
                if stream.read_buf(rbuf).await? == 0 {
                    return Err(HandshakeError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
            }
            Err(error) => {
                let _ = write_message(stream, &BackendMessage::ErrorResponse(error.to_error_fields())).await;
                return Err(error.into());
            }
        }
    }
}

/// Sends a refusal and ends the handshake; `why` is for the debug log.
async fn refused(stream: &mut ClientStream, fields: ErrorFields, why: &str) -> HandshakeError {
    match write_message(stream, &BackendMessage::ErrorResponse(fields)).await {
        Ok(()) => HandshakeError::Refused(why.to_owned()),
        Err(error) => HandshakeError::Io(error),
    }
}

async fn write_message<S: AsyncWrite + Unpin>(stream: &mut S, message: &BackendMessage) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    message.encode(&mut buf).map_err(std::io::Error::other)?;
    stream.write_all(&buf).await
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).filter(|c| !c.is_control()).collect()
}

/// A client's place in its database's client count, released when the session ends.
struct ClientSlot(Arc<Database>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A statement the client prepared, known by its text.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) query: String,
    pub(crate) param_types: Vec<u32>,
    /// Name on every origin connection: derived from the text and parameter types.
    pub(crate) server_name: String,
    pub(crate) class: Classification,
    /// Cacheable by its classification and not opted out with the no-cache hint.
    pub(crate) cacheable: bool,
}

impl Prepared {
    pub(crate) fn new(query: String, param_types: Vec<u32>, class: Classification) -> Prepared {
        let mut hash = Sha256::new();
        hash.update(query.as_bytes());
        for oid in &param_types {
            hash.update(oid.to_be_bytes());
        }
        let digest = hash.finalize();
        let server_name = format!("cordon_{}", hex(&digest[..12]));
        let cacheable = class.cacheable && !opted_out(&query);
        Prepared { query, param_types, server_name, class, cacheable }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the session expects back for one message, in order.
#[derive(Debug)]
enum Slot {
    /// A simple Query: everything up to its ReadyForQuery.
    Query {
        class: Option<Box<Classification>>,
        completed: bool,
        failed: bool,
    },
    /// A Parse sent to the origin. `visible` is false for one the session injected, whose
    /// ParseComplete the client must not see. `client` is the client statement it created.
    Parse {
        server_name: String,
        visible: bool,
        client: Option<String>,
    },
    Bind,
    DescribeStatement,
    DescribePortal,
    Execute {
        statement: Option<Arc<Prepared>>,
    },
    /// A Close sent to the origin; invisible when the session evicts a statement itself.
    Close {
        visible: bool,
    },
    /// A response the session gives without the origin (ParseComplete, CloseComplete).
    Synthetic(u8),
    /// An error the session raises itself; the batch was cut before the next Sync.
    Error(ErrorFields),
    Sync,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("client connection: {0}")]
    ClientIo(#[from] std::io::Error),
    #[error("client protocol: {0}")]
    ClientProtocol(#[from] ProtocolError),
    #[error("origin: {0}")]
    Origin(#[from] OriginError),
    #[error("origin sent {tag:?} where {expected} was expected")]
    Desync { tag: char, expected: &'static str },
    #[error("{0}")]
    Fatal(String),
}

struct Session {
    db: Arc<Database>,
    _slot: ClientSlot,
    stream: ClientStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    limits: Limits,
    user: String,
    cancel: CancelHandle,
    /// The client's named statements ("" is the unnamed one).
    statements: HashMap<String, Arc<Prepared>>,
    /// Portals bound in the current transaction, for the effects of their Execute.
    portals: HashMap<String, Arc<Prepared>>,
    server: Option<PooledConn>,
    status: TransactionStatus,
    /// Why the client is pinned to its origin connection, if it is.
    pinned: Option<String>,
    /// Role set with a confirmed SET ROLE / SET SESSION AUTHORIZATION.
    role: Option<String>,
    /// An error occurred in the extended protocol: everything up to the next Sync is skipped.
    skipping: bool,
    /// Extended-protocol messages went to the origin without a Sync yet: the origin holds an
    /// implicit transaction and portals for the client, so the connection stays with it.
    unsynced: bool,
    /// What statements since the last idle ReadyForQuery invalidated, applied again when the
    /// transaction (explicit, or the implicit one of an extended-protocol batch) ends.
    txn_writes: Vec<Invalidation>,
    batch: Vec<FrontendMessage>,
    batch_bytes: usize,
}

impl Session {
    fn new(db: Arc<Database>, slot: ClientSlot, stream: ClientStream, rbuf: BytesMut, user: String, cancel: CancelHandle) -> Session {
        Session {
            db,
            _slot: slot,
            stream,
            rbuf,
            wbuf: BytesMut::with_capacity(16 << 10),
            limits: Limits::default(),
            user,
            cancel,
            statements: HashMap::new(),
            portals: HashMap::new(),
            server: None,
            status: TransactionStatus::Idle,
            pinned: None,
            role: None,
            skipping: false,
            unsynced: false,
            txn_writes: Vec::new(),
            batch: Vec::new(),
            batch_bytes: 0,
        }
    }

    async fn run(mut self) {
        let result = self.serve().await;
        if let Err(error) = &result {
            tracing::debug!(target: "cordon::pgaccel", tenant = %self.db.tenant, database = %self.db.name, error = %error, "proxy session ended");
            let fields = match error {
                SessionError::ClientIo(_) => None,
                SessionError::ClientProtocol(e) => Some(e.to_error_fields()),
                SessionError::Fatal(message) => Some(ErrorFields::new(Severity::Fatal, "08006", message.clone())),
                SessionError::Origin(e) => Some(ErrorFields::new(
                    Severity::Fatal,
                    e.sqlstate(),
                    format!("lost the connection to the origin: {}", describe_origin_error(e)),
                )),
                SessionError::Desync { .. } => {
                    Some(ErrorFields::new(Severity::Fatal, "08P01", "the origin connection went out of step; reconnect"))
                }
            };
            if let Some(fields) = fields {
                self.wbuf.clear();
                let _ = BackendMessage::ErrorResponse(fields).encode(&mut self.wbuf);
                let _ = self.flush_client().await;
            }
        }
        self.release_server(true).await;
    }

    async fn serve(&mut self) -> Result<(), SessionError> {
        loop {
            let Some(frame) = self.read_client_frame().await? else { return Ok(()) };
            let message = parse_frontend(&frame, Phase::Ready)?;
            match message {
                FrontendMessage::Terminate => return Ok(()),
                FrontendMessage::Query(sql) => {
                    if !self.batch.is_empty() {
                        self.run_batch().await?;
                    }
                    self.simple_query(sql).await?;
                }
                FrontendMessage::Sync => {
                    self.push_batch(FrontendMessage::Sync, frame.body.len())?;
                    self.run_batch().await?;
                }
                FrontendMessage::Flush => {
                    self.push_batch(FrontendMessage::Flush, 0)?;
                    self.run_batch().await?;
                }
                // Outside COPY mode these are ignored, as Postgres ignores them.
                FrontendMessage::CopyData(_) | FrontendMessage::CopyDone | FrontendMessage::CopyFail(_) => {}
                other @ (FrontendMessage::Parse { .. }
                | FrontendMessage::Bind { .. }
                | FrontendMessage::Describe { .. }
                | FrontendMessage::Execute { .. }
                | FrontendMessage::Close { .. }) => self.push_batch(other, frame.body.len())?,
                FrontendMessage::Password(_) | FrontendMessage::SaslInitialResponse { .. } | FrontendMessage::SaslResponse(_) => {
                    return Err(ProtocolError::UnexpectedMessage { tag: crate::protocol::Tag(b'p'), phase: Phase::Ready }.into());
                }
            }
            if self.server.is_some()
                && self.status == TransactionStatus::Idle
                && self.pinned.is_none()
                && !self.unsynced
                && self.batch.is_empty()
                && !self.client_has_frame()
            {
                self.check_session_state().await;
                self.release_server(false).await;
            }
        }
    }

    fn push_batch(&mut self, message: FrontendMessage, bytes: usize) -> Result<(), SessionError> {
        self.batch_bytes += bytes;
        self.batch.push(message);
        if self.batch.len() > MAX_BATCH_MESSAGES || self.batch_bytes > MAX_BATCH_BYTES {
            return Err(SessionError::Fatal(format!(
                "more than {MAX_BATCH_MESSAGES} messages or {} MiB sent without a Sync",
                MAX_BATCH_BYTES >> 20
            )));
        }
        Ok(())
    }

    fn client_has_frame(&self) -> bool {
        self.rbuf.len() >= 5 && {
            let len = i32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]]);
            len >= 4 && self.rbuf.len() > len as usize
        }
    }

    /// Reads the next client message, closing idle clients after the configured timeouts.
    async fn read_client_frame(&mut self) -> Result<Option<Frame>, SessionError> {
        loop {
            if let Some(frame) = decode_frame(&mut self.rbuf, &self.limits)? {
                return Ok(Some(frame));
            }
            let in_transaction = self.status != TransactionStatus::Idle;
            let timeout = if in_transaction { self.db.limits.idle_in_transaction_timeout } else { self.db.limits.idle_client_timeout };
            let read = self.stream.read_buf(&mut self.rbuf);
            let n = match timeout {
                Some(timeout) => match tokio::time::timeout(timeout, read).await {
                    Ok(n) => n?,
                    Err(_) => {
                        self.db.counters.idle_timeouts.fetch_add(1, Ordering::Relaxed);
                        let (code, what) = if in_transaction {
                            ("25P03", "terminating connection due to idle-in-transaction timeout")
                        } else {
                            ("57P05", "terminating connection due to idle-session timeout")
                        };
                        self.wbuf.clear();
                        BackendMessage::ErrorResponse(ErrorFields::new(Severity::Fatal, code, what)).encode(&mut self.wbuf)?;
                        let _ = self.flush_client().await;
                        return Ok(None);
                    }
                },
                None => read.await?,
            };
            if n == 0 {
                return Ok(None);
            }
        }
    }

    /// Writes the buffered responses to the client. A client that does not read them within the
    /// pool's statement deadline is treated as gone: while it stalls, the origin backend behind it
    /// stalls too, and a cancel cannot reach a backend blocked on sending.
    async fn flush_client(&mut self) -> std::io::Result<()> {
        if !self.wbuf.is_empty() {
            let write = self.stream.write_all(&self.wbuf);
            match self.db.pool.settings().statement_deadline {
                Some(limit) => tokio::time::timeout(limit, write)
                    .await
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "the client stopped reading its results"))??,
                None => write.await?,
            }
            self.wbuf.clear();
        }
        Ok(())
    }

    fn send_error(&mut self, fields: ErrorFields) -> Result<(), SessionError> {
        BackendMessage::ErrorResponse(fields).encode(&mut self.wbuf)?;
        Ok(())
    }

    fn send_ready(&mut self) -> Result<(), SessionError> {
        BackendMessage::ReadyForQuery(self.status).encode(&mut self.wbuf)?;
        Ok(())
    }

    /// Gets an origin connection for the client, unless it holds one.
    async fn ensure_server(&mut self) -> Result<bool, SessionError> {
        if self.server.is_some() {
            return Ok(true);
        }
        match self.db.pool.acquire().await {
            Ok(conn) => {
                let (process_id, secret_key) = conn.conn.backend_key();
                self.cancel.set(CancelTarget { origin: conn.pool().origin().clone(), process_id, secret_key }).await;
                self.server = Some(conn);
                Ok(true)
            }
            Err(error) => {
                self.pool_failure(&error);
                self.send_error(error.to_error_fields())?;
                Ok(false)
            }
        }
    }

    /// Checks, before the origin connection goes back to the pool, that it is in the state it was
    /// opened in, in one round trip that also resets what cannot be read (see
    /// [`crate::session_state`]). The classifier does not see every change (`UPDATE
    /// pg_settings`, `set_config(..., false)` in a function, a view, a trigger or a default): a
    /// connection whose state changed that way is reset before anyone else gets it, and the
    /// client, which did not ask to keep that state in a way Cordon can see, goes on without it.
    async fn check_session_state(&mut self) {
        let Some(server) = self.server.as_mut() else { return };
        match server.probe().await {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(target: "cordon::pgaccel", tenant = %self.db.tenant, database = %self.db.name, "a proxy client changed its session state unseen; its connection is reset");
            }
            // The connection is marked for discard; the client carries on with another one.
            Err(error) => {
                tracing::debug!(target: "cordon::pgaccel", tenant = %self.db.tenant, database = %self.db.name, error = %describe_origin_error(&error), "checking a proxy client's session state failed");
            }
        }
    }

    /// Why the database refuses `sql` (it would raise a timeout past the maximum), counted.
    fn refused_by_limits(&self, sql: &str) -> Option<String> {
        let reason = self.db.session_limits.check(sql)?;
        self.db.counters.timeout_changes_refused.fetch_add(1, Ordering::Relaxed);
        Some(reason)
    }

    /// A prepared statement for `query`; when the database refuses it, either one that fails with
    /// the refusal when executed (so that the refusal aborts the transaction, as an error from
    /// the origin would), or, for a statement with parameters, which that replacement could not
    /// take, the refusal itself, answered here.
    fn prepare(&self, query: String, param_types: Vec<u32>, class: Classification) -> Result<Prepared, ErrorFields> {
        match self.refused_by_limits(&query) {
            None => Ok(Prepared::new(query, param_types, class)),
            Some(reason) if param_types.is_empty() && !crate::session_limits::has_parameters(&query) => {
                let refused = Classification::over_budget(format!("refused by Cordon: {reason}"));
                Ok(Prepared::new(refusal_sql(&reason), Vec::new(), refused))
            }
            Some(reason) => Err(ErrorFields::new(Severity::Error, "42501", format!("refused by Cordon: {reason}"))),
        }
    }

    fn pool_failure(&self, error: &PoolError) {
        tracing::debug!(target: "cordon::pgaccel", tenant = %self.db.tenant, database = %self.db.name, error = %error, "no origin connection for a proxy client");
    }

    /// Gives the origin connection back: clean when idle and unpinned, otherwise reset first.
    async fn release_server(&mut self, ending: bool) {
        let Some(mut conn) = self.server.take() else { return };
        self.cancel.clear().await;
        if self.status != TransactionStatus::Idle || self.pinned.is_some() {
            conn.mark(Release::Reset);
        }
        if ending {
            self.status = TransactionStatus::Idle;
        }
        drop(conn);
    }

    /// The origin connection broke or went out of step: close it. A client inside a transaction
    /// or pinned to it has lost state it relies on, so it is disconnected too.
    fn server_lost(&mut self) -> bool {
        if let Some(mut conn) = self.server.take() {
            conn.mark(Release::Discard);
        }
        let keep_client = self.status == TransactionStatus::Idle && self.pinned.is_none();
        self.status = TransactionStatus::Idle;
        keep_client
    }

    fn role_key(&self) -> String {
        format!("{}\u{0}{}", self.user, self.role.as_deref().unwrap_or(""))
    }

    fn cache_usable(&self) -> bool {
        self.db.cache.is_some() && self.pinned.is_none() && self.status == TransactionStatus::Idle && self.server.is_none()
    }

    async fn simple_query(&mut self, sql: String) -> Result<(), SessionError> {
        self.db.counters.queries.fetch_add(1, Ordering::Relaxed);
        let sql = match self.refused_by_limits(&sql) {
            None => sql,
            // Outside a transaction the refusal is answered here; inside one it goes to the origin
            // as a statement that fails with it, so that the transaction is aborted as it would be.
            Some(reason) if self.server.is_none() || self.status == TransactionStatus::Idle => {
                self.statements.remove("");
                self.send_error(ErrorFields::new(Severity::Error, "42501", format!("refused by Cordon: {reason}")))?;
                self.send_ready()?;
                return Ok(self.flush_client().await?);
            }
            Some(reason) => refusal_sql(&reason),
        };
        let class = self.db.classifier.classify(&sql, self.status != TransactionStatus::Idle).await;
        // A simple Query replaces the unnamed statement.
        self.statements.remove("");
        let cacheable =
            class.cacheable && !opted_out(&sql) && (!self.cache_usable() || self.db.cache_refusal(&class, &[], &[]).await.is_none());
        if self.cache_usable() && cacheable {
            if let Some(normalized) = class.normalized.clone() {
                let session = self.db.pool.state_key();
                let key = CacheKey {
                    role: self.role_key(),
                    session: session.clone(),
                    query: normalized,
                    params: Vec::new(),
                    formats: Vec::new(),
                    protocol: b'Q',
                };
                let fetch = fetch_simple(self.db.pool.clone(), sql.clone(), self.db.cache_max_entry_bytes, session);
                if self.serve_cached(key, &class, fetch).await? {
                    return Ok(());
                }
            }
        } else if !cacheable {
            self.db.counters.uncacheable.fetch_add(1, Ordering::Relaxed);
        }
        if !self.ensure_server().await? {
            self.send_ready()?;
            return Ok(self.flush_client().await?);
        }
        let server = self.server.as_mut().expect("ensured");
        FrontendMessage::Query(sql).encode(server.conn.write_buf())?;
        let mut slots = VecDeque::from([Slot::Query { class: Some(Box::new(class)), completed: false, failed: false }]);
        self.exchange(&mut slots).await
    }

    /// Answers from the cache (or a coalesced, cached fetch). Returns false when the result was
    /// too large to go through the cache and the query must run on the client's own connection.
    async fn serve_cached(
        &mut self,
        key: CacheKey,
        class: &Classification,
        fetch: Arc<dyn Fn() -> FetchFuture<FetchError> + Send + Sync>,
    ) -> Result<bool, SessionError> {
        let cache = self.db.cache.clone().expect("checked by cache_usable");
        match cache.get_or_fetch(key, &class.reads, fetch).await {
            Ok((bytes, outcome)) => {
                self.db.counters.count_cache(outcome);
                self.wbuf.extend_from_slice(&bytes);
                self.send_ready()?;
                self.flush_client().await?;
                Ok(true)
            }
            Err(FetchError::TooLarge) => Ok(false),
            Err(FetchError::Pool(fields)) => {
                self.send_error(fields)?;
                self.send_ready()?;
                self.flush_client().await?;
                Ok(true)
            }
        }
    }

    /// Sends the queued extended-protocol messages, rewriting statement names, and relays the
    /// responses.
    async fn run_batch(&mut self) -> Result<(), SessionError> {
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        // Every Parse is classified before anything is sent, off this thread when it is costly.
        let mut classes = VecDeque::new();
        for message in &batch {
            if let FrontendMessage::Parse { query, .. } = message {
                classes.push_back(self.db.classifier.classify(query, false).await);
            }
        }
        if self.try_cached_batch(&batch, classes.front()).await? {
            return Ok(());
        }
        let needs_origin = batch
            .iter()
            .any(|m| !matches!(m, FrontendMessage::Sync | FrontendMessage::Close { kind: Target::Statement, .. } | FrontendMessage::Flush));
        if !needs_origin && self.server.is_none() {
            // Only statement closes and syncs: nothing for the origin to do.
            for message in &batch {
                match message {
                    FrontendMessage::Close { name, .. } if !self.skipping => {
                        self.statements.remove(name);
                        Frame::new(b'3', Bytes::new()).encode(&mut self.wbuf)?;
                    }
                    FrontendMessage::Sync => {
                        self.skipping = false;
                        self.send_ready()?;
                    }
                    _ => {}
                }
            }
            return Ok(self.flush_client().await?);
        }
        if !self.ensure_server().await? {
            // The error is queued; skip to the Sync like Postgres does after an error.
            if batch.iter().any(|m| matches!(m, FrontendMessage::Sync)) {
                self.send_ready()?;
            } else {
                self.skipping = true;
            }
            return Ok(self.flush_client().await?);
        }
        let mut slots = VecDeque::new();
        self.unsynced = !matches!(batch.last(), Some(FrontendMessage::Sync));
        let mut cut = self.skipping;
        for message in batch {
            if cut && !matches!(message, FrontendMessage::Sync) {
                continue;
            }
            let class = match &message {
                FrontendMessage::Parse { .. } => classes.pop_front(),
                _ => None,
            };
            if let Some(error) = self.queue_message(message, class, &mut slots)? {
                slots.push_back(Slot::Error(error));
                cut = true;
            }
            if matches!(slots.back(), Some(Slot::Sync)) {
                cut = false;
            }
        }
        self.exchange(&mut slots).await
    }

    /// Encodes one client message for the origin (or answers it here) and queues its slot.
    /// Returns an error the client must see, after which the batch is cut until the next Sync.
    fn queue_message(
        &mut self,
        message: FrontendMessage,
        class: Option<Classification>,
        slots: &mut VecDeque<Slot>,
    ) -> Result<Option<ErrorFields>, SessionError> {
        match message {
            FrontendMessage::Parse { name, query, param_types } => {
                if !name.is_empty() && self.statements.contains_key(&name) {
                    return Ok(Some(ErrorFields::new(
                        Severity::Error,
                        "42P05",
                        format!("prepared statement \"{}\" already exists", truncate(&name, 64)),
                    )));
                }
                let class = class.unwrap_or_else(|| Classification::over_budget("statement not classified".to_owned()));
                let prepared = match self.prepare(query, param_types, class) {
                    Ok(prepared) => Arc::new(prepared),
                    Err(refusal) => return Ok(Some(refusal)),
                };
                self.statements.insert(name.clone(), prepared.clone());
                let server = self.server.as_mut().expect("ensured");
                if server.prepared.contains(&prepared.server_name) {
                    server.prepared.touch(&prepared.server_name);
                    slots.push_back(Slot::Synthetic(b'1'));
                } else {
                    self.prepare_on_server(&prepared, true, Some(name), slots)?;
                }
            }
            FrontendMessage::Bind { portal, statement, param_formats, params, result_formats } => {
                let Some(prepared) = self.statements.get(&statement).cloned() else {
                    return Ok(Some(unknown_statement(&statement)));
                };
                self.ensure_prepared(&prepared, slots)?;
                self.portals.insert(portal.clone(), prepared.clone());
                let server = self.server.as_mut().expect("ensured");
                FrontendMessage::Bind { portal, statement: prepared.server_name.clone(), param_formats, params, result_formats }
                    .encode(server.conn.write_buf())?;
                slots.push_back(Slot::Bind);
            }
            FrontendMessage::Describe { kind: Target::Statement, name } => {
                let Some(prepared) = self.statements.get(&name).cloned() else {
                    return Ok(Some(unknown_statement(&name)));
                };
                self.ensure_prepared(&prepared, slots)?;
                let server = self.server.as_mut().expect("ensured");
                FrontendMessage::Describe { kind: Target::Statement, name: prepared.server_name.clone() }
                    .encode(server.conn.write_buf())?;
                slots.push_back(Slot::DescribeStatement);
            }
            FrontendMessage::Describe { kind: Target::Portal, name } => {
                let server = self.server.as_mut().expect("ensured");
                FrontendMessage::Describe { kind: Target::Portal, name }.encode(server.conn.write_buf())?;
                slots.push_back(Slot::DescribePortal);
            }
            FrontendMessage::Execute { portal, max_rows } => {
                let statement = self.portals.get(&portal).cloned();
                if let Some(prepared) = &statement {
                    self.db.counters.queries.fetch_add(1, Ordering::Relaxed);
                    if !prepared.cacheable {
                        self.db.counters.uncacheable.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let server = self.server.as_mut().expect("ensured");
                FrontendMessage::Execute { portal, max_rows }.encode(server.conn.write_buf())?;
                slots.push_back(Slot::Execute { statement });
            }
            FrontendMessage::Close { kind: Target::Statement, name } => {
                // The origin keeps the statement for other clients; only the client's name goes.
                self.statements.remove(&name);
                slots.push_back(Slot::Synthetic(b'3'));
            }
            FrontendMessage::Close { kind: Target::Portal, name } => {
                self.portals.remove(&name);
                let server = self.server.as_mut().expect("ensured");
                FrontendMessage::Close { kind: Target::Portal, name }.encode(server.conn.write_buf())?;
                slots.push_back(Slot::Close { visible: true });
            }
            FrontendMessage::Sync => {
                let server = self.server.as_mut().expect("ensured");
                FrontendMessage::Sync.encode(server.conn.write_buf())?;
                slots.push_back(Slot::Sync);
            }
            FrontendMessage::Flush => {
                let server = self.server.as_mut().expect("ensured");
                FrontendMessage::Flush.encode(server.conn.write_buf())?;
            }
            _ => {}
        }
        Ok(None)
    }

    /// Prepares the statement on the current origin connection if it is not there yet, hiding
    /// the ParseComplete from the client.
    fn ensure_prepared(&mut self, prepared: &Arc<Prepared>, slots: &mut VecDeque<Slot>) -> Result<(), SessionError> {
        let server = self.server.as_mut().expect("ensured");
        if server.prepared.contains(&prepared.server_name) {
            server.prepared.touch(&prepared.server_name);
            return Ok(());
        }
        self.prepare_on_server(prepared, false, None, slots)
    }

    fn prepare_on_server(
        &mut self,
        prepared: &Arc<Prepared>,
        visible: bool,
        client: Option<String>,
        slots: &mut VecDeque<Slot>,
    ) -> Result<(), SessionError> {
        let server = self.server.as_mut().expect("ensured");
        if let Some(victim) = server.prepared.victim(&[&prepared.server_name]) {
            server.prepared.remove(&victim);
            FrontendMessage::Close { kind: Target::Statement, name: victim }.encode(server.conn.write_buf())?;
            slots.push_back(Slot::Close { visible: false });
        }
        FrontendMessage::Parse {
            name: prepared.server_name.clone(),
            query: prepared.query.clone(),
            param_types: prepared.param_types.clone(),
        }
        .encode(server.conn.write_buf())?;
        server.prepared.touch(&prepared.server_name);
        slots.push_back(Slot::Parse { server_name: prepared.server_name.clone(), visible, client });
        Ok(())
    }

    /// Serves `[Parse] Bind [Describe portal] Execute Sync` from the cache when the statement is
    /// cacheable: the shape ORMs and drivers send for one parameterised query.
    async fn try_cached_batch(&mut self, batch: &[FrontendMessage], parsed: Option<&Classification>) -> Result<bool, SessionError> {
        if !self.cache_usable() || self.skipping {
            return Ok(false);
        }
        let mut messages = batch.iter().peekable();
        let parse = match messages.peek() {
            Some(FrontendMessage::Parse { name, query, param_types }) => {
                messages.next();
                Some((name, query, param_types))
            }
            _ => None,
        };
        let Some(FrontendMessage::Bind { portal, statement, param_formats, params, result_formats }) = messages.next() else {
            return Ok(false);
        };
        let describe = matches!(messages.peek(), Some(FrontendMessage::Describe { kind: Target::Portal, name }) if name == portal);
        if describe {
            messages.next();
        }
        let shape_ok = matches!(messages.next(), Some(FrontendMessage::Execute { portal: p, max_rows: 0 }) if p == portal)
            && matches!(messages.next(), Some(FrontendMessage::Sync))
            && messages.next().is_none()
            && portal.is_empty();
        if !shape_ok {
            return Ok(false);
        }
        let prepared = match parse {
            Some((name, query, param_types)) => {
                if name != statement
                    || (!name.is_empty() && self.statements.contains_key(name))
                    || self.db.session_limits.check(query).is_some()
                {
                    return Ok(false);
                }
                let Some(class) = parsed else { return Ok(false) };
                Arc::new(Prepared::new(query.clone(), param_types.clone(), class.clone()))
            }
            None => match self.statements.get(statement) {
                Some(prepared) => prepared.clone(),
                None => return Ok(false),
            },
        };
        let (true, Some(normalized)) = (prepared.cacheable, prepared.class.normalized.clone()) else { return Ok(false) };
        if self.db.cache_refusal(&prepared.class, params, &prepared.param_types).await.is_some() {
            return Ok(false);
        }
        self.db.counters.queries.fetch_add(1, Ordering::Relaxed);
        let mut formats: Vec<i16> = param_formats.clone();
        formats.push(i16::MIN);
        formats.extend(result_formats);
        formats.push(if describe { 1 } else { 0 });
        // Parameter types change how values are read; they are part of the statement.
        let query = format!("{normalized}\u{0}{:?}", prepared.param_types);
        let session = self.db.pool.state_key();
        let key = CacheKey { role: self.role_key(), session: session.clone(), query, params: params.clone(), formats, protocol: b'E' };
        let request = ExtendedRequest {
            prepared: prepared.clone(),
            param_formats: param_formats.clone(),
            params: params.clone(),
            result_formats: result_formats.clone(),
            describe,
        };
        let fetch = fetch_extended(self.db.pool.clone(), Arc::new(request), self.db.cache_max_entry_bytes, session);
        if let Some((name, _, _)) = parse {
            self.statements.insert(name.clone(), prepared.clone());
            Frame::new(b'1', Bytes::new()).encode(&mut self.wbuf)?;
        }
        let class = prepared.class.clone();
        if self.serve_cached(key, &class, fetch).await? {
            return Ok(true);
        }
        // Too large for the cache: run it on the client's own connection instead.
        self.wbuf.clear();
        if let Some((name, _, _)) = parse {
            self.statements.remove(name.as_str());
        }
        Ok(false)
    }

    /// Flushes the queued messages to the origin and relays responses until every slot is
    /// answered.
    async fn exchange(&mut self, slots: &mut VecDeque<Slot>) -> Result<(), SessionError> {
        match self.relay(slots).await {
            Ok(()) => Ok(()),
            Err(SessionError::Origin(error)) => {
                let fields = ErrorFields::new(
                    Severity::Error,
                    error.sqlstate(),
                    format!("lost the connection to the origin: {}", describe_origin_error(&error)),
                );
                if !self.server_lost() {
                    return Err(SessionError::Origin(error));
                }
                // Outside a transaction nothing the client relies on was lost: report the
                // failure of this request and carry on with a new connection next time.
                self.skipping = false;
                self.wbuf.clear();
                self.send_error(fields)?;
                if slots.iter().any(|s| matches!(s, Slot::Sync | Slot::Query { .. })) {
                    self.send_ready()?;
                } else {
                    self.skipping = true;
                }
                Ok(self.flush_client().await?)
            }
            Err(error @ SessionError::Desync { .. }) => {
                self.server_lost();
                Err(error)
            }
            Err(error) => Err(error),
        }
    }

    async fn relay(&mut self, slots: &mut VecDeque<Slot>) -> Result<(), SessionError> {
        {
            let server = self.server.as_mut().expect("ensured");
            server.begin_exchange();
            server.conn.flush().await?;
        }
        loop {
            self.answer_local_slots(slots)?;
            if slots.is_empty() {
                break;
            }
            // While the origin works on a statement, a client that hangs up is noticed: its
            // statement is then cancelled rather than left running with nobody to answer. The
            // client is watched only once the origin has been quiet for a moment, so a client's
            // next request, sent as soon as it saw an error, is not read early and mistaken for
            // pipelining.
            let watch_from = tokio::time::Instant::now() + CLIENT_WATCH_AFTER;
            let frame = loop {
                let server = self.server.as_mut().expect("ensured");
                let watching = self.rbuf.len() < CLIENT_WATCH_BYTES;
                let (stream, rbuf) = (&mut self.stream, &mut self.rbuf);
                let watch = async move {
                    tokio::time::sleep_until(watch_from).await;
                    stream.read_buf(rbuf).await
                };
                tokio::select! {
                    biased;
                    frame = server.read_frame() => break frame?,
                    read = watch, if watching => {
                        if read? == 0 {
                            return Err(SessionError::ClientIo(std::io::ErrorKind::UnexpectedEof.into()));
                        }
                    }
                }
            };
            self.handle_response(frame, slots).await?;
            let buffered = self.server.as_ref().is_some_and(|s| s.conn.has_buffered_frame());
            if self.wbuf.len() >= CLIENT_FLUSH_BYTES || !buffered {
                self.flush_client().await?;
            }
        }
        if let Some(server) = self.server.as_mut() {
            server.end_exchange();
        }
        self.flush_client().await?;
        Ok(())
    }

    /// Answers the slots at the front of the queue that need no origin response, and after an
    /// error drops everything up to the Sync, as the origin does.
    fn answer_local_slots(&mut self, slots: &mut VecDeque<Slot>) -> Result<(), SessionError> {
        while let Some(front) = slots.front() {
            if self.skipping {
                match front {
                    Slot::Sync | Slot::Query { .. } => break,
                    Slot::Parse { server_name, client, .. } => {
                        // The origin skipped it, so it was never prepared.
                        let (server_name, client) = (server_name.clone(), client.clone());
                        self.forget_parse(&server_name, client.as_deref());
                    }
                    _ => {}
                }
                slots.pop_front();
                continue;
            }
            match front {
                Slot::Synthetic(tag) => {
                    Frame::new(*tag, Bytes::new()).encode(&mut self.wbuf)?;
                }
                Slot::Error(fields) => {
                    BackendMessage::ErrorResponse(fields.clone()).encode(&mut self.wbuf)?;
                    self.skipping = true;
                }
                _ => break,
            }
            slots.pop_front();
        }
        Ok(())
    }

    fn forget_parse(&mut self, server_name: &str, client: Option<&str>) {
        if let Some(server) = self.server.as_mut() {
            server.prepared.remove(server_name);
        }
        if let Some(name) = client {
            self.statements.remove(name);
        }
    }

    fn forward(&mut self, frame: &Frame) -> Result<(), SessionError> {
        Ok(frame.encode(&mut self.wbuf)?)
    }

    async fn handle_response(&mut self, frame: Frame, slots: &mut VecDeque<Slot>) -> Result<(), SessionError> {
        let tag = frame.tag;
        // Asynchronous messages may arrive at any point.
        if matches!(tag, b'N' | b'A' | b'S') {
            return self.forward(&frame);
        }
        let Some(slot) = slots.front_mut() else {
            return Err(SessionError::Desync { tag: tag as char, expected: "nothing" });
        };
        let desync = |expected| SessionError::Desync { tag: tag as char, expected };
        // An error answers any extended-protocol message; the origin then skips to the Sync.
        if tag == b'E' && !matches!(slot, Slot::Query { .. } | Slot::Sync) {
            if let Slot::Parse { server_name, client, .. } = slot {
                let (server_name, client) = (server_name.clone(), client.clone());
                self.forget_parse(&server_name, client.as_deref());
            }
            slots.pop_front();
            self.skipping = true;
            return self.forward(&frame);
        }
        match slot {
            Slot::Query { class, completed, failed } => match tag {
                b'Z' => {
                    let status = TransactionStatus::from_ready_for_query(&frame)?;
                    let (class, completed, failed) = (class.take(), *completed, *failed);
                    slots.pop_front();
                    self.forward(&frame)?;
                    if let Some(class) = class {
                        self.after_statement(&class, completed, failed);
                    }
                    self.after_ready(status);
                }
                b'G' => {
                    self.forward(&frame)?;
                    self.flush_client().await?;
                    self.copy_in(false).await?;
                }
                b'C' => {
                    *completed = true;
                    self.forward(&frame)?;
                }
                b'E' => {
                    *failed = true;
                    self.forward(&frame)?;
                }
                _ => self.forward(&frame)?,
            },
            Slot::Parse { visible, .. } => match tag {
                b'1' => {
                    if *visible {
                        self.forward(&frame)?;
                    }
                    slots.pop_front();
                }
                _ => return Err(desync("ParseComplete")),
            },
            Slot::Bind => match tag {
                b'2' => {
                    slots.pop_front();
                    self.forward(&frame)?;
                }
                _ => return Err(desync("BindComplete")),
            },
            Slot::Close { visible } => match tag {
                b'3' => {
                    if *visible {
                        self.forward(&frame)?;
                    }
                    slots.pop_front();
                }
                _ => return Err(desync("CloseComplete")),
            },
            Slot::DescribeStatement => match tag {
                b't' => self.forward(&frame)?,
                b'T' | b'n' => {
                    self.forward(&frame)?;
                    slots.pop_front();
                }
                _ => return Err(desync("ParameterDescription")),
            },
            Slot::DescribePortal => match tag {
                b'T' | b'n' => {
                    self.forward(&frame)?;
                    slots.pop_front();
                }
                _ => return Err(desync("RowDescription")),
            },
            Slot::Execute { statement } => match tag {
                b'D' | b'H' | b'd' | b'c' => self.forward(&frame)?,
                b'C' | b'I' | b's' => {
                    let statement = statement.take();
                    slots.pop_front();
                    self.forward(&frame)?;
                    if let Some(prepared) = statement {
                        self.after_statement(&prepared.class, true, false);
                    }
                }
                b'G' => {
                    self.forward(&frame)?;
                    self.flush_client().await?;
                    self.copy_in(true).await?;
                }
                _ => return Err(desync("CommandComplete")),
            },
            Slot::Sync => match tag {
                b'Z' => {
                    let status = TransactionStatus::from_ready_for_query(&frame)?;
                    slots.pop_front();
                    self.skipping = false;
                    self.forward(&frame)?;
                    self.after_ready(status);
                }
                _ => return Err(desync("ReadyForQuery")),
            },
            Slot::Synthetic(_) | Slot::Error(_) => return Err(desync("a local answer")),
        }
        Ok(())
    }

    /// Relays COPY FROM STDIN data from the client until it finishes or fails the copy.
    ///
    /// In the extended protocol the origin ignores the Sync that followed the Execute (it arrived
    /// in COPY mode), and it holds the command's completion until the next Sync. Clients send
    /// that Sync right after CopyDone or CopyFail, so it is relayed here, and it answers the
    /// Sync slot already queued.
    async fn copy_in(&mut self, extended: bool) -> Result<(), SessionError> {
        loop {
            let Some(frame) = self.read_client_frame().await? else {
                return Err(SessionError::ClientIo(std::io::ErrorKind::UnexpectedEof.into()));
            };
            let message = parse_frontend(&frame, Phase::Ready)?;
            let done = matches!(message, FrontendMessage::CopyDone | FrontendMessage::CopyFail(_));
            let server = self.server.as_mut().expect("held during COPY");
            match message {
                FrontendMessage::CopyData(_) | FrontendMessage::CopyDone | FrontendMessage::CopyFail(_) => {
                    frame.encode(server.conn.write_buf())?;
                }
                // Ignored in COPY mode, as the origin would ignore them.
                FrontendMessage::Sync | FrontendMessage::Flush => {}
                _ => return Err(SessionError::Fatal("unexpected message during COPY FROM STDIN".into())),
            }
            if done && extended {
                let Some(frame) = self.read_client_frame().await? else {
                    return Err(SessionError::ClientIo(std::io::ErrorKind::UnexpectedEof.into()));
                };
                if !matches!(parse_frontend(&frame, Phase::Ready)?, FrontendMessage::Sync) {
                    return Err(SessionError::Fatal("expected Sync after the end of COPY FROM STDIN".into()));
                }
                let server = self.server.as_mut().expect("held during COPY");
                frame.encode(server.conn.write_buf())?;
            }
            let server = self.server.as_mut().expect("held during COPY");
            if done || server.conn.write_buf().len() >= CLIENT_FLUSH_BYTES {
                server.conn.flush().await?;
            }
            if done {
                return Ok(());
            }
        }
    }

    /// Applies what a statement that completed did: pins, role changes and cache invalidation.
    fn after_statement(&mut self, class: &Classification, completed: bool, failed: bool) {
        let invalidation = self.db.invalidation(class);
        if !invalidation.is_none() {
            self.db.invalidate(&invalidation);
            // Again when the transaction ends: its writes (and DDL) become visible only then.
            self.txn_writes.push(invalidation);
        }
        // A statement that failed outright changed nothing; one that completed (even if a later
        // statement of the same text failed) may have left session state.
        if !completed && failed {
            return;
        }
        if let Some(reason) = &class.pins_session {
            if self.pinned.is_none() {
                tracing::debug!(target: "cordon::pgaccel", tenant = %self.db.tenant, database = %self.db.name, reason = %reason, "proxy client pinned to its origin connection");
            }
            self.pinned = Some(reason.clone());
            if let Some(normalized) = &class.normalized
                && (normalized.starts_with("discard") || normalized.starts_with("deallocate"))
                && let Some(server) = self.server.as_mut()
            {
                // The client dropped prepared statements on the origin, ours included.
                server.prepared.clear();
            }
        }
        if let Some(role) = &class.role_change {
            self.role = role.clone();
        }
    }

    fn after_ready(&mut self, status: TransactionStatus) {
        self.status = status;
        if status == TransactionStatus::Idle {
            self.portals.clear();
            // Writes become visible at commit; invalidate again so that nothing read between the
            // statement and the commit stays cached, and no catalog read in between is trusted.
            for invalidation in std::mem::take(&mut self.txn_writes) {
                self.db.invalidate(&invalidation);
            }
        }
    }
}

/// A statement that fails with `reason` when it runs: a refusal that the origin reports, so that
/// it aborts the client's transaction there. The reason is reduced to characters that cannot end
/// the quoting.
fn refusal_sql(reason: &str) -> String {
    let safe: String = reason.chars().filter(|c| c.is_ascii_alphanumeric() || " _.,()=-".contains(*c)).take(200).collect();
    format!("DO $cordon_refusal$BEGIN RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = 'refused by Cordon: {safe}'; END$cordon_refusal$")
}

fn unknown_statement(name: &str) -> ErrorFields {
    ErrorFields::new(Severity::Error, "26000", format!("prepared statement \"{}\" does not exist", truncate(name, 64)))
}

/// Why a cached fetch produced no result for the client.
#[derive(Debug, Clone)]
pub(crate) enum FetchError {
    /// No origin connection: the error to report.
    Pool(ErrorFields),
    /// The result is larger than the cache's entry limit; the caller runs the query itself so
    /// that it is streamed rather than held in memory.
    TooLarge,
}

impl From<&PoolError> for FetchError {
    fn from(error: &PoolError) -> Self {
        FetchError::Pool(error.to_error_fields())
    }
}

/// Collects the response frames of a cacheable request on a pooled connection. Only results made
/// of row descriptions, rows and completions are stored; anything else (errors, notices) is
/// passed on but not stored.
/// `housekeeping` is the number of leading ParseComplete/CloseComplete answers to requests the
/// pooler injected, which are not part of the result.
pub(crate) async fn collect_response(conn: &mut PooledConn, max_bytes: usize, mut housekeeping: usize) -> Result<Fetched, FetchError> {
    let lost = |error: OriginError| {
        FetchError::Pool(ErrorFields::new(
            Severity::Error,
            error.sqlstate(),
            format!("lost the connection to the origin: {}", describe_origin_error(&error)),
        ))
    };
    conn.begin_exchange();
    if let Err(error) = conn.conn.flush().await {
        conn.mark(Release::Discard);
        return Err(lost(error));
    }
    let mut bytes = BytesMut::new();
    let mut store = true;
    let mut too_large = false;
    loop {
        let frame = match conn.read_frame().await {
            Ok(frame) => frame,
            Err(error) => {
                conn.mark(Release::Discard);
                return Err(lost(error));
            }
        };
        match frame.tag {
            b'Z' => {
                if TransactionStatus::from_ready_for_query(&frame).ok() != Some(TransactionStatus::Idle) {
                    conn.mark(Release::Reset);
                }
                conn.end_exchange();
                break;
            }
            b'1' | b'3' if housekeeping > 0 => {
                housekeeping -= 1;
                continue;
            }
            b'T' | b'D' | b'C' | b'I' | b'2' | b'n' => {}
            _ => store = false,
        }
        if !too_large {
            if frame.encode(&mut bytes).is_err() {
                store = false;
            }
            if bytes.len() > max_bytes {
                too_large = true;
                bytes = BytesMut::new();
            }
        }
    }
    if too_large {
        return Err(FetchError::TooLarge);
    }
    Ok(Fetched { bytes: bytes.freeze(), store })
}

/// Reads the answer of the session state probe queued behind a fetch: a result is stored only
/// when the connection was in the state the key names (`expected_state`) and the statement left
/// it so. A statement that changed it (a view or function calling `set_config`) is served to its
/// caller but not stored, and the connection is reset before anyone else gets it.
async fn finish_fetch(conn: &mut PooledConn, fetched: Result<Fetched, FetchError>, expected_state: &str) -> Result<Fetched, FetchError> {
    // A result too large to store was still read to its end; the probe's answer follows it.
    let mut fetched = match fetched {
        Ok(fetched) => fetched,
        Err(FetchError::TooLarge) => {
            let _ = conn.finish_probe().await;
            return Err(FetchError::TooLarge);
        }
        Err(error) => return Err(error),
    };
    let clean = conn.finish_probe().await.map_err(|error| {
        FetchError::Pool(ErrorFields::new(
            Severity::Error,
            error.sqlstate(),
            format!("lost the connection to the origin: {}", describe_origin_error(&error)),
        ))
    })?;
    if !clean || conn.state_key() != expected_state {
        fetched.store = false;
    }
    Ok(fetched)
}

fn fetch_simple(
    pool: Arc<Pool>,
    sql: String,
    max_bytes: usize,
    expected_state: String,
) -> Arc<dyn Fn() -> FetchFuture<FetchError> + Send + Sync> {
    let sql = Arc::new(sql);
    let expected_state = Arc::new(expected_state);
    Arc::new(move || {
        let pool = pool.clone();
        let sql = sql.clone();
        let expected_state = expected_state.clone();
        Box::pin(async move {
            let mut conn = pool.acquire().await.map_err(|e| FetchError::from(&e))?;
            let encode_error = |e: ProtocolError| FetchError::Pool(e.to_error_fields());
            FrontendMessage::Query(sql.to_string()).encode(conn.conn.write_buf()).map_err(encode_error)?;
            conn.queue_probe().map_err(|e| FetchError::Pool(ErrorFields::new(Severity::Error, e.sqlstate(), e.to_string())))?;
            let fetched = collect_response(&mut conn, max_bytes, 0).await;
            finish_fetch(&mut conn, fetched, &expected_state).await
        })
    })
}

pub(crate) struct ExtendedRequest {
    pub(crate) prepared: Arc<Prepared>,
    pub(crate) param_formats: Vec<i16>,
    pub(crate) params: Vec<Option<Bytes>>,
    pub(crate) result_formats: Vec<i16>,
    pub(crate) describe: bool,
}

impl ExtendedRequest {
    /// Encodes the execution of `statement` (already parsed on the connection) into the unnamed
    /// portal: Bind, Describe when asked, Execute for every row, Sync.
    pub(crate) fn encode_execution(&self, buf: &mut BytesMut, statement: &str) -> Result<(), ProtocolError> {
        FrontendMessage::Bind {
            portal: String::new(),
            statement: statement.to_owned(),
            param_formats: self.param_formats.clone(),
            params: self.params.clone(),
            result_formats: self.result_formats.clone(),
        }
        .encode(buf)?;
        if self.describe {
            FrontendMessage::Describe { kind: Target::Portal, name: String::new() }.encode(buf)?;
        }
        FrontendMessage::Execute { portal: String::new(), max_rows: 0 }.encode(buf)?;
        FrontendMessage::Sync.encode(buf)
    }
}

/// Runs a request on a pooled connection, with the session state probe queued behind it (see
/// [`finish_fetch`]); `expected_state` is the state the caller's cache key names.
pub(crate) fn fetch_extended(
    pool: Arc<Pool>,
    request: Arc<ExtendedRequest>,
    max_bytes: usize,
    expected_state: String,
) -> Arc<dyn Fn() -> FetchFuture<FetchError> + Send + Sync> {
    let expected_state = Arc::new(expected_state);
    Arc::new(move || {
        let pool = pool.clone();
        let request = request.clone();
        let expected_state = expected_state.clone();
        Box::pin(async move {
            let mut conn = pool.acquire().await.map_err(|e| FetchError::from(&e))?;
            let encode_error = |e: ProtocolError| FetchError::Pool(e.to_error_fields());
            let prepared = &request.prepared;
            let injected = !conn.prepared.contains(&prepared.server_name);
            let mut housekeeping = 0;
            if injected {
                if let Some(victim) = conn.prepared.victim(&[&prepared.server_name]) {
                    conn.prepared.remove(&victim);
                    FrontendMessage::Close { kind: Target::Statement, name: victim }.encode(conn.conn.write_buf()).map_err(encode_error)?;
                    housekeeping += 1;
                }
                housekeeping += 1;
                FrontendMessage::Parse {
                    name: prepared.server_name.clone(),
                    query: prepared.query.clone(),
                    param_types: prepared.param_types.clone(),
                }
                .encode(conn.conn.write_buf())
                .map_err(encode_error)?;
            }
            request.encode_execution(conn.conn.write_buf(), &prepared.server_name).map_err(encode_error)?;
            conn.queue_probe().map_err(|e| FetchError::Pool(ErrorFields::new(Severity::Error, e.sqlstate(), e.to_string())))?;
            let fetched = collect_response(&mut conn, max_bytes, housekeeping).await;
            let fetched = finish_fetch(&mut conn, fetched, &expected_state).await?;
            if injected {
                if fetched.bytes.first() == Some(&b'E') {
                    conn.prepared.remove(&prepared.server_name);
                } else {
                    conn.prepared.touch(&prepared.server_name);
                }
            }
            Ok(fetched)
        })
    })
}
