//! Connections from the accelerator to the origin database.
//!
//! A [`ServerConn`] is one authenticated backend connection: it negotiates TLS when configured,
//! authenticates, and then exposes the raw frame stream to the pooler, which encodes frontend
//! messages into [`ServerConn::write_buf`] and reads backend frames with
//! [`ServerConn::read_frame`].
//!
//! Authentication is SCRAM-SHA-256 unless [`OriginConfig::auth_methods`] allows more. MD5 and the
//! cleartext password are answered only when allowed there *and* the connection is TLS with the
//! certificate and host name verified: neither proves anything about the server, so without that
//! TLS an impostor would collect a hash to crack offline, or the password itself. With a
//! password configured, AuthenticationOk is believed only after SCRAM has ended with the server's
//! signature verified, or after a password answer over that TLS; a server that lets Cordon in
//! before either has proved nothing and may be an impostor. Without a password (an origin that
//! trusts the role) there is nothing of Cordon's to give away, and AuthenticationOk is the only
//! answer accepted.
//!
//! The origin is configured by the operator, but it is still a peer on the network: every frame
//! it sends goes through the bounded decoder, and connecting (TCP, TLS, authentication, startup)
//! is bounded as a whole by [`OriginConfig::connect_timeout`], so a stalled or misbehaving
//! server costs a connection attempt, never a hung task.
//!
//! The origin password is Cordon's credential, not the client's: it never appears in `Debug`
//! output or error messages, and the buffers that carried it are wiped after use.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use zeroize::{Zeroize, Zeroizing};

pub use cordon_config::OriginAuthMethods;

use crate::protocol::{self, ErrorFields, Frame, FrontendMessage, Limits, Severity, StartupMessage, Tag, TransactionStatus};

/// Reads ask for at least this much room, so a stream of small messages costs one system call
/// per chunk rather than one per message.
const READ_CHUNK: usize = 16 << 10;
/// The origin may legitimately send very large rows; Postgres itself allows 1 GiB.
const MAX_MESSAGE_BYTES: usize = 256 << 20;
/// Authentication and startup messages are small; a server that sends a huge one before the
/// connection is usable is broken, and should not make us buffer a quarter gigabyte.
const STARTUP_MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Tag byte plus length word.
const FRAME_HEADER_BYTES: usize = 5;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A password, redacted in Debug, zeroized on drop.
#[derive(Clone)]
pub struct OriginPassword(Arc<Zeroizing<String>>);

impl OriginPassword {
    pub fn new(s: String) -> Self {
        OriginPassword(Arc::new(Zeroizing::new(s)))
    }

    fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for OriginPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OriginPassword(<redacted>)")
    }
}

#[derive(Clone, Debug)]
pub struct OriginConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub database: String,
    pub password: Option<OriginPassword>,
    pub tls: OriginTls,
    /// The methods Cordon may answer with the password; MD5 and cleartext are used only over
    /// verify-full TLS even when allowed here.
    pub auth_methods: OriginAuthMethods,
    pub connect_timeout: Duration,
    /// Sent in the startup packet, so the origin's `pg_stat_activity` shows who is connected.
    pub application_name: String,
    /// Server settings sent in the startup packet (such as `statement_timeout`). They become the
    /// session's defaults, so `DISCARD ALL` and `RESET ALL` return to them rather than to the
    /// server's.
    pub options: Vec<(String, String)>,
}

#[derive(Clone)]
pub enum OriginTls {
    Disable,
    VerifyFull(Arc<rustls::ClientConfig>),
}

impl fmt::Debug for OriginTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OriginTls::Disable => "Disable",
            OriginTls::VerifyFull(_) => "VerifyFull",
        })
    }
}

impl OriginTls {
    /// verify-full: certificate chain AND host name checked. `root_cert` PEM file, or the webpki
    /// roots when None.
    pub fn verify_full(root_cert: Option<&Path>) -> Result<OriginTls, OriginError> {
        let mut roots = rustls::RootCertStore::empty();
        match root_cert {
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            Some(path) => {
                let shown = path.display();
                let iter = CertificateDer::pem_file_iter(path)
                    .map_err(|e| OriginError::Tls(format!("cannot read the origin root certificate file {shown}: {e}")))?;
                for cert in iter {
                    let cert =
                        cert.map_err(|e| OriginError::Tls(format!("the origin root certificate file {shown} is not valid PEM: {e}")))?;
                    roots.add(cert).map_err(|e| {
                        OriginError::Tls(format!("a certificate in the origin root certificate file {shown} is unusable: {e}"))
                    })?;
                }
                if roots.is_empty() {
                    return Err(OriginError::Tls(format!("the origin root certificate file {shown} contains no certificates")));
                }
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| OriginError::Tls(format!("building the TLS client configuration: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(OriginTls::VerifyFull(Arc::new(config)))
    }
}

/// Everything that can go wrong talking to the origin. No variant ever carries the password.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("cannot connect to the origin at {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("TLS to the origin: {0}")]
    Tls(String),
    #[error("authenticating to the origin: {0}")]
    Auth(String),
    #[error("the origin answered {} {}: {}", .0.severity.as_str(), .0.code, .0.message)]
    Server(ErrorFields),
    #[error("the origin broke the protocol: {0}")]
    Protocol(String),
    #[error("the origin closed the connection")]
    Closed,
    #[error("I/O error on the origin connection: {0}")]
    Io(#[from] io::Error),
}

impl OriginError {
    /// SQLSTATE to report to a client. A failed origin authentication is Cordon's credential
    /// problem, not the client's, so it is reported as the server rejecting the connection rather
    /// than forwarded as an authorization error the client would try to fix.
    pub fn sqlstate(&self) -> &str {
        match self {
            OriginError::Server(fields) => &fields.code,
            // sqlserver_rejected_establishment_of_sqlconnection
            OriginError::Auth(_) => "08004",
            // sqlclient_unable_to_establish_sqlconnection
            OriginError::Connect { .. } | OriginError::Timeout(_) | OriginError::Tls(_) => "08001",
            // connection_failure
            OriginError::Protocol(_) | OriginError::Closed | OriginError::Io(_) => "08006",
        }
    }

    /// Whether the connection this came from must be discarded. An ERROR in a query cycle leaves
    /// the session usable; a FATAL or PANIC means the server is closing it, and everything that
    /// is not a server error means the stream is broken or out of sync.
    pub fn is_fatal(&self) -> bool {
        match self {
            OriginError::Server(fields) => !matches!(fields.severity, Severity::Error | Severity::Warning | Severity::Notice),
            _ => true,
        }
    }
}

impl From<protocol::ProtocolError> for OriginError {
    fn from(e: protocol::ProtocolError) -> Self {
        OriginError::Protocol(e.to_string())
    }
}

/// The transport under a [`ServerConn`].
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One authenticated connection to the origin.
pub struct ServerConn {
    id: u64,
    stream: Stream,
    read_buf: BytesMut,
    write_buf: BytesMut,
    limits: Limits,
    backend_key: (i32, i32),
    parameters: Vec<(String, String)>,
}

impl fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConn")
            .field("id", &self.id)
            .field("backend_pid", &self.backend_key.0)
            .field("tls", &self.is_tls())
            .finish_non_exhaustive()
    }
}

impl ServerConn {
    /// Connects, negotiates TLS when configured, authenticates, and waits for the first
    /// ReadyForQuery. The whole exchange is bounded by `connect_timeout`.
    pub async fn connect(config: &OriginConfig) -> Result<ServerConn, OriginError> {
        let deadline = Instant::now() + config.connect_timeout;
        let stream = open_stream(config, deadline).await?;
        let mut conn = ServerConn {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            stream,
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            write_buf: BytesMut::with_capacity(READ_CHUNK),
            limits: Limits { max_message_bytes: STARTUP_MAX_MESSAGE_BYTES, ..Limits::default() },
            backend_key: (0, 0),
            parameters: Vec::new(),
        };
        within(deadline, "authenticating to the origin", conn.startup(config)).await?;
        conn.limits.max_message_bytes = MAX_MESSAGE_BYTES;
        tracing::debug!(conn = conn.id, backend_pid = conn.backend_key.0, tls = conn.is_tls(), "connected to the origin");
        Ok(conn)
    }

    /// Whether an idle connection is unusable: the origin closed it (a restart, an idle timeout,
    /// an administrator's `pg_terminate_backend`) or sent something unprompted, which on an idle
    /// connection is only ever a FATAL error before closing. Checked without blocking before the
    /// pool hands a connection out.
    pub fn is_broken(&mut self) -> bool {
        if !self.read_buf.is_empty() {
            return true;
        }
        let mut probe = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // Data or end of stream: either way the connection is done.
        Pin::new(&mut self.stream).poll_read(&mut cx, &mut buf).is_ready()
    }

    /// Process-unique id, for logs and bookkeeping.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// (process_id, secret_key) from BackendKeyData.
    pub fn backend_key(&self) -> (i32, i32) {
        self.backend_key
    }

    /// ParameterStatus values received so far, in order of first arrival, latest value per name.
    pub fn parameters(&self) -> &[(String, String)] {
        &self.parameters
    }

    /// The latest value of one ParameterStatus, such as `server_version`.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::Tls(_))
    }

    /// The outgoing buffer: callers encode frontend messages straight into it, then call `flush`.
    pub fn write_buf(&mut self) -> &mut BytesMut {
        &mut self.write_buf
    }

    /// Writes out and clears the outgoing buffer. Bytes are dropped from the buffer as they are
    /// written, so if the future is cancelled midway, what remains is exactly what was not sent.
    pub async fn flush(&mut self) -> Result<(), OriginError> {
        while !self.write_buf.is_empty() {
            let n = self.stream.write(&self.write_buf).await?;
            if n == 0 {
                return Err(OriginError::Closed);
            }
            self.write_buf.advance(n);
        }
        self.stream.flush().await?;
        self.write_buf.clear();
        Ok(())
    }

    /// Reads one backend message, keeping `parameters` up to date. Cancel-safe: a cancelled call
    /// loses no bytes, they stay in the read buffer.
    pub async fn read_frame(&mut self) -> Result<Frame, OriginError> {
        loop {
            if let Some(frame) = protocol::decode_frame(&mut self.read_buf, &self.limits)? {
                if frame.tag == b'S' {
                    self.record_parameter(&frame)?;
                }
                return Ok(frame);
            }
            if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK {
                self.read_buf.reserve(READ_CHUNK);
            }
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return Err(OriginError::Closed);
            }
        }
    }

    /// Whether a complete frame is already buffered. A header that the decoder will reject also
    /// counts: `read_frame` then fails without touching the socket.
    pub fn has_buffered_frame(&self) -> bool {
        let Some(header) = self.read_buf.get(..FRAME_HEADER_BYTES) else {
            return false;
        };
        let claimed = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        match usize::try_from(claimed) {
            Ok(len) if (4..=self.limits.max_message_bytes).contains(&len) => self.read_buf.len() > len,
            _ => true,
        }
    }

    /// Runs one simple-protocol query (for resets like `ROLLBACK` and `DISCARD ALL`) and returns
    /// the final transaction status. On an ErrorResponse it still reads up to ReadyForQuery, so
    /// the connection stays in sync, and then returns the error.
    pub async fn simple_query(&mut self, sql: &str) -> Result<TransactionStatus, OriginError> {
        FrontendMessage::Query(sql.to_owned()).encode(&mut self.write_buf)?;
        self.flush().await?;
        let mut error = None;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'Z' => {
                    let status = TransactionStatus::from_ready_for_query(&frame)?;
                    return match error {
                        Some(fields) => Err(OriginError::Server(fields)),
                        None => Ok(status),
                    };
                }
                b'E' => {
                    let fields = ErrorFields::parse(&frame.body)?;
                    // The server hangs up after a FATAL; waiting for ReadyForQuery would turn
                    // its explanation into a bare "closed".
                    if matches!(fields.severity, Severity::Fatal | Severity::Panic) {
                        return Err(OriginError::Server(fields));
                    }
                    if error.is_none() {
                        error = Some(fields);
                    }
                }
                // A COPY FROM STDIN would wait for data forever; failing it keeps the cycle going.
                b'G' | b'W' => {
                    FrontendMessage::CopyFail("COPY is not supported in a reset query".to_owned()).encode(&mut self.write_buf)?;
                    self.flush().await?;
                }
                _ => {}
            }
        }
    }

    /// Sends Terminate and closes the connection, so the origin ends the session at once instead
    /// of noticing a dropped socket later.
    pub async fn terminate(mut self) {
        if FrontendMessage::Terminate.encode(&mut self.write_buf).is_ok() && self.flush().await.is_ok() {
            let _ = self.stream.shutdown().await;
        }
    }

    /// Sends Terminate and reads (discarding whatever is still in flight) until the origin closes
    /// the connection, which a backend does only as it exits. Returns whether that was seen before
    /// `wait` ran out: a backend busy with a statement that ignores cancels is still alive then.
    pub async fn terminate_and_confirm(&mut self, wait: Duration) -> bool {
        self.read_buf.clear();
        self.write_buf.clear();
        let _ = FrontendMessage::Terminate.encode(&mut self.write_buf);
        let confirmed = tokio::time::timeout(wait, async {
            if self.flush().await.is_err() {
                // The origin already reset the connection.
                return true;
            }
            let mut sink = vec![0u8; READ_CHUNK];
            loop {
                match self.stream.read(&mut sink).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => {}
                }
            }
        })
        .await;
        confirmed.unwrap_or(false)
    }

    fn record_parameter(&mut self, frame: &Frame) -> Result<(), OriginError> {
        let (name, value) = parse_parameter_status(&frame.body)?;
        match self.parameters.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = value,
            None => self.parameters.push((name, value)),
        }
        Ok(())
    }

    async fn startup(&mut self, config: &OriginConfig) -> Result<(), OriginError> {
        let params = vec![
            ("user".to_owned(), config.user.clone()),
            ("database".to_owned(), config.database.clone()),
            ("client_encoding".to_owned(), "UTF8".to_owned()),
            ("application_name".to_owned(), config.application_name.clone()),
        ];
        let params = params.into_iter().chain(config.options.iter().cloned()).collect();
        StartupMessage::Startup { params }.encode(&mut self.write_buf)?;
        self.flush().await?;
        self.authenticate(config).await?;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'Z' => {
                    TransactionStatus::from_ready_for_query(&frame)?;
                    return Ok(());
                }
                // Recorded by read_frame.
                b'S' => {}
                b'K' => self.backend_key = parse_backend_key(&frame.body)?,
                b'N' => {}
                b'E' => return Err(server_error(&frame)?),
                tag => return Err(OriginError::Protocol(format!("unexpected message {} during startup", Tag(tag)))),
            }
        }
    }

    async fn authenticate(&mut self, config: &OriginConfig) -> Result<(), OriginError> {
        let mut exchange = Exchange::NotStarted;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'R' => {}
                b'E' => return Err(server_error(&frame)?),
                b'N' => continue,
                // Sent when the server does not support a requested minor version or protocol
                // option; we request neither, but it is harmless.
                b'v' => continue,
                tag => return Err(OriginError::Protocol(format!("unexpected message {} during authentication", Tag(tag)))),
            }
            let mut body = frame.body.clone();
            if body.len() < 4 {
                return Err(OriginError::Protocol("authentication request is shorter than its code".to_owned()));
            }
            let code = body.get_i32();
            // A server asks for one method, once. A second request can only be a way to get the
            // password out by another method, such as MD5 in the middle of SCRAM.
            if matches!(code, 3 | 5 | 10) && !matches!(exchange, Exchange::NotStarted) {
                return Err(OriginError::Auth(format!(
                    "the origin asked for authentication method {code} after another had begun; refusing, since a server never switches methods midway"
                )));
            }
            match code {
                0 => return accept_ok(config, &exchange),
                3 => {
                    let password = password(config)?;
                    self.check_password_method(config.auth_methods.password, "a cleartext password", "the password", "password")?;
                    self.send_password(password.as_bytes()).await?;
                    exchange = Exchange::PasswordOverTls;
                }
                5 => {
                    let salt: [u8; 4] = body
                        .get(..4)
                        .and_then(|s| s.try_into().ok())
                        .ok_or_else(|| OriginError::Protocol("AuthenticationMD5Password has no salt".to_owned()))?;
                    let password = password(config)?;
                    self.check_password_method(config.auth_methods.md5, "MD5 authentication", "a hash of the password", "md5")?;
                    let hash =
                        Zeroizing::new(postgres_protocol::authentication::md5_hash(config.user.as_bytes(), password.as_bytes(), salt));
                    self.send_password(hash.as_bytes()).await?;
                    exchange = Exchange::PasswordOverTls;
                }
                10 => {
                    let mechanisms = parse_mechanisms(&body)?;
                    if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                        return Err(OriginError::Auth(format!(
                            "the origin offers only SASL mechanisms {mechanisms:?}; SCRAM-SHA-256 is required"
                        )));
                    }
                    let password = password(config)?;
                    if !config.auth_methods.scram_sha_256 {
                        return Err(OriginError::Auth(
                            "the origin asked for SCRAM-SHA-256, which is not in this database's origin_auth_methods; add \"scram-sha-256\" to it".to_owned(),
                        ));
                    }
                    // Channel binding is not attempted: "n,," says so honestly, which servers
                    // that offer SCRAM-SHA-256-PLUS accept too.
                    let client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                    FrontendMessage::SaslInitialResponse {
                        mechanism: SCRAM_SHA_256.to_owned(),
                        data: Some(Bytes::copy_from_slice(client.message())),
                    }
                    .encode(&mut self.write_buf)?;
                    self.flush().await?;
                    exchange = Exchange::Scram(Box::new(client));
                }
                11 => {
                    let Exchange::Scram(client) = &mut exchange else {
                        return Err(OriginError::Protocol("AuthenticationSASLContinue outside a SCRAM exchange".to_owned()));
                    };
                    // Checked before any proof is computed: a server that
                    // picks a tiny iteration count gets a proof it could
                    // attack offline by guessing passwords cheaply.
                    if !self.is_tls() {
                        check_scram_iterations(&body)?;
                    }
                    client.update(&body).map_err(|e| OriginError::Auth(format!("SCRAM exchange failed: {e}")))?;
                    FrontendMessage::SaslResponse(Bytes::copy_from_slice(client.message())).encode(&mut self.write_buf)?;
                    self.flush_secret().await?;
                }
                12 => {
                    let Exchange::Scram(client) = &mut exchange else {
                        return Err(OriginError::Protocol("AuthenticationSASLFinal outside a SCRAM exchange".to_owned()));
                    };
                    client.finish(&body).map_err(|e| OriginError::Auth(format!("the origin's SCRAM signature is invalid: {e}")))?;
                    exchange = Exchange::ScramVerified;
                }
                other => {
                    return Err(OriginError::Auth(format!(
                        "the origin requested authentication method {other}, which is not supported; configure the origin to use SCRAM-SHA-256 for this role"
                    )));
                }
            }
        }
    }

    /// Whether the origin may be answered with MD5 or the cleartext password: only when the
    /// database allows `method` and the connection is TLS, which this module opens only in
    /// verify-full mode, so the server has proved its name with a certificate.
    fn check_password_method(&self, allowed: bool, asked: &str, gives: &str, method: &str) -> Result<(), OriginError> {
        if !allowed {
            return Err(OriginError::Auth(format!(
                "the origin asked for {asked}, which this database does not allow; refusing to send {gives}. \
                 Have the origin store the role's password as SCRAM-SHA-256 (password_encryption = 'scram-sha-256', then set the password again), \
                 or, if the origin is reached with sslmode=verify-full, add \"{method}\" to origin_auth_methods"
            )));
        }
        if !self.is_tls() {
            return Err(OriginError::Auth(format!(
                "the origin asked for {asked} over a connection without verified TLS; refusing to send {gives}, \
                 since an impostor could be collecting it. Use sslmode=verify-full, or have the origin use SCRAM-SHA-256"
            )));
        }
        Ok(())
    }

    /// Sends a PasswordMessage carrying `secret` (a cleartext password or an MD5 hash), built
    /// by hand so that no copy of it outlives the send.
    async fn send_password(&mut self, secret: &[u8]) -> Result<(), OriginError> {
        if secret.contains(&0) {
            return Err(OriginError::Auth("the origin password contains a NUL byte, which the protocol cannot carry".to_owned()));
        }
        let len = i32::try_from(secret.len() + 5).map_err(|_| OriginError::Auth("the origin password is too long".to_owned()))?;
        self.write_buf.put_u8(b'p');
        self.write_buf.put_i32(len);
        self.write_buf.put_slice(secret);
        self.write_buf.put_u8(0);
        self.flush_secret().await
    }

    /// Like `flush`, but wipes the buffer afterwards, whether or not the write succeeded.
    async fn flush_secret(&mut self) -> Result<(), OriginError> {
        let result = async {
            self.stream.write_all(&self.write_buf).await?;
            self.stream.flush().await
        }
        .await;
        self.write_buf.as_mut().zeroize();
        self.write_buf.clear();
        result.map_err(OriginError::from)
    }
}

/// The fewest SCRAM iterations an origin may ask for over a connection
/// without verified TLS: PostgreSQL's default (`scram_iterations`).
pub const MIN_SCRAM_ITERATIONS: u32 = 4096;

/// Refuses a SCRAM server-first message (`r=…,s=…,i=N`) whose iteration
/// count is below [`MIN_SCRAM_ITERATIONS`]. Whoever sits between Cordon and
/// an origin reached without TLS can answer for it; with a low count the
/// client proof it gets is cheap to attack offline.
fn check_scram_iterations(server_first: &[u8]) -> Result<(), OriginError> {
    // Malformed SCRAM is an authentication failure, as the SCRAM client reports it.
    let malformed = |what: &str| OriginError::Auth(format!("SCRAM exchange failed: the server-first message {what}"));
    let text = std::str::from_utf8(server_first).map_err(|_| malformed("is not UTF-8"))?;
    let iterations = text
        .split(',')
        .find_map(|attr| attr.strip_prefix("i="))
        .and_then(|i| i.parse::<u32>().ok())
        .ok_or_else(|| malformed("has no iteration count"))?;
    if iterations < MIN_SCRAM_ITERATIONS {
        return Err(OriginError::Auth(format!(
            "the origin asked for SCRAM with {iterations} iterations over a connection without verified TLS; at least \
             {MIN_SCRAM_ITERATIONS} are required there, since a low count makes the proof Cordon sends cheap to attack \
             offline. Set the role's password again with scram_iterations of at least {MIN_SCRAM_ITERATIONS} on the \
             origin, or use sslmode=verify-full"
        )));
    }
    Ok(())
}

/// Sends a CancelRequest for (process_id, secret_key) on a new connection, negotiating TLS as
/// `connect` does, then waits (bounded by connect_timeout) for the server to close that
/// connection, which it does once it has processed the request.
pub async fn send_cancel(config: &OriginConfig, process_id: i32, secret_key: i32) -> Result<(), OriginError> {
    let deadline = Instant::now() + config.connect_timeout;
    let mut stream = open_stream(config, deadline).await?;
    let mut buf = BytesMut::with_capacity(16);
    StartupMessage::Cancel { process_id, secret_key }.encode(&mut buf)?;
    within(deadline, "sending a cancel request to the origin", async {
        stream.write_all(&buf).await?;
        stream.flush().await?;
        let mut sink = [0u8; 64];
        loop {
            match stream.read(&mut sink).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                // The server closes without a TLS close_notify, or resets: either way it is done.
                Err(e) if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    })
    .await
}

/// Runs `fut` until `deadline`, reporting `what` if it runs out.
async fn within<T>(deadline: Instant, what: &'static str, fut: impl Future<Output = Result<T, OriginError>>) -> Result<T, OriginError> {
    tokio::time::timeout_at(deadline, fut).await.map_err(|_| OriginError::Timeout(what))?
}

/// Opens the TCP connection and, when configured, negotiates TLS on it.
async fn open_stream(config: &OriginConfig, deadline: Instant) -> Result<Stream, OriginError> {
    let addr = format!("{}:{}", config.host, config.port);
    let tcp = within(deadline, "connecting to the origin", async {
        TcpStream::connect((config.host.as_str(), config.port)).await.map_err(|source| OriginError::Connect { addr: addr.clone(), source })
    })
    .await?;
    tcp.set_nodelay(true).map_err(|source| OriginError::Connect { addr, source })?;
    match &config.tls {
        OriginTls::Disable => Ok(Stream::Plain(tcp)),
        OriginTls::VerifyFull(tls) => within(deadline, "negotiating TLS with the origin", negotiate_tls(tcp, &config.host, tls)).await,
    }
}

async fn negotiate_tls(mut tcp: TcpStream, host: &str, tls: &Arc<rustls::ClientConfig>) -> Result<Stream, OriginError> {
    let mut request = BytesMut::with_capacity(8);
    StartupMessage::SslRequest.encode(&mut request)?;
    tcp.write_all(&request).await?;
    // Exactly one byte: anything the server sends after it must go through the TLS layer, or a
    // man in the middle could inject plaintext ahead of the handshake.
    let mut answer = [0u8; 1];
    match tcp.read_exact(&mut answer).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(OriginError::Closed),
        Err(e) => return Err(e.into()),
    }
    match answer[0] {
        b'S' => {}
        b'N' => return Err(OriginError::Tls("the origin server does not support TLS (it refused the SSLRequest)".to_owned())),
        b'E' => return Err(OriginError::Tls("the origin server rejected the SSLRequest with an error".to_owned())),
        other => return Err(OriginError::Protocol(format!("unexpected answer {} to the SSLRequest", Tag(other)))),
    }
    let name = ServerName::try_from(host.to_owned()).map_err(|e| OriginError::Tls(format!("invalid server name {host:?}: {e}")))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(tls));
    let stream = connector.connect(name, tcp).await.map_err(|e| OriginError::Tls(format!("handshake with {host} failed: {e}")))?;
    Ok(Stream::Tls(Box::new(stream)))
}

fn password(config: &OriginConfig) -> Result<&OriginPassword, OriginError> {
    config.password.as_ref().ok_or_else(|| OriginError::Auth("the origin requires a password and none is configured".to_owned()))
}

/// How far authentication has gone: what AuthenticationOk is allowed to end.
enum Exchange {
    /// Nothing of the password has been sent.
    NotStarted,
    /// SCRAM under way; the server has not yet proved that it knows the password.
    Scram(Box<ScramSha256>),
    /// SCRAM ended with the server's signature verified.
    ScramVerified,
    /// An MD5 hash or the cleartext password went out over verify-full TLS.
    PasswordOverTls,
}

/// Whether AuthenticationOk may end the exchange so far. With a password configured, the server
/// must have proved who it is: by its SCRAM signature, or by the certificate of the TLS that the
/// password went out over. A server that lets Cordon in before that may be anyone.
fn accept_ok(config: &OriginConfig, exchange: &Exchange) -> Result<(), OriginError> {
    match exchange {
        Exchange::ScramVerified | Exchange::PasswordOverTls => Ok(()),
        Exchange::Scram(_) => Err(OriginError::Auth("the origin ended SCRAM authentication without proving its identity".to_owned())),
        // Nothing of Cordon's is at stake: the operator said that the origin trusts this role.
        Exchange::NotStarted if config.password.is_none() => Ok(()),
        Exchange::NotStarted => Err(OriginError::Auth(
            "the origin let Cordon in without asking for the password, so it has not proved that it knows it and may be an impostor; refusing. \
             If the origin really trusts this role without a password, remove origin_password_env from this database"
                .to_owned(),
        )),
    }
}

/// An ErrorResponse before the first ReadyForQuery. Postgres sends these as FATAL, since there is
/// no session to go on with; one marked ERROR is upgraded so that `is_fatal` tells the truth.
fn server_error(frame: &Frame) -> Result<OriginError, OriginError> {
    let mut fields = ErrorFields::parse(&frame.body)?;
    if fields.severity == Severity::Error {
        fields.severity = Severity::Fatal;
    }
    Ok(OriginError::Server(fields))
}

fn parse_backend_key(body: &Bytes) -> Result<(i32, i32), OriginError> {
    // Protocol 3.2 allows longer keys, but only when the client asks for 3.2, which we do not.
    let bytes: [u8; 8] =
        body.as_ref().try_into().map_err(|_| OriginError::Protocol(format!("BackendKeyData is {} bytes long, expected 8", body.len())))?;
    let [a, b, c, d, e, f, g, h] = bytes;
    Ok((i32::from_be_bytes([a, b, c, d]), i32::from_be_bytes([e, f, g, h])))
}

/// Splits a body made of NUL-terminated strings.
fn cstrings(body: &[u8], message: &str) -> Result<Vec<String>, OriginError> {
    let Some(rest) = body.strip_suffix(&[0]) else {
        return Err(OriginError::Protocol(format!("{message} is not NUL-terminated")));
    };
    rest.split(|&b| b == 0)
        .map(|s| String::from_utf8(s.to_vec()).map_err(|_| OriginError::Protocol(format!("{message} is not valid UTF-8"))))
        .collect()
}

fn parse_parameter_status(body: &Bytes) -> Result<(String, String), OriginError> {
    const MESSAGE: &str = "ParameterStatus message";
    let mut strings = cstrings(body, MESSAGE)?.into_iter();
    match (strings.next(), strings.next(), strings.next()) {
        (Some(name), Some(value), None) if !name.is_empty() => Ok((name, value)),
        _ => Err(OriginError::Protocol(format!("{MESSAGE} must hold a name and a value"))),
    }
}

fn parse_mechanisms(body: &[u8]) -> Result<Vec<String>, OriginError> {
    const MESSAGE: &str = "AuthenticationSASL message";
    // The list ends with an empty string: the body ends with two NULs.
    let Some(list) = body.strip_suffix(&[0]) else {
        return Err(OriginError::Protocol(format!("{MESSAGE} is not terminated")));
    };
    if list.is_empty() {
        return Ok(Vec::new());
    }
    let names = cstrings(list, MESSAGE)?;
    if names.iter().any(String::is_empty) {
        return Err(OriginError::Protocol(format!("{MESSAGE} has an empty mechanism name")));
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::BackendMessage;

    const PASSWORD: &str = "origin-secret-7Hq";

    /// A fake origin on loopback for one connection: it reads the startup packet, sends `reply`,
    /// and then keeps everything the client sends until the client closes the connection.
    async fn fake_origin(reply: Vec<u8>) -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = BytesMut::new();
            loop {
                if let Some(startup) = protocol::decode_startup(&mut buf, &Limits::default()).unwrap() {
                    assert!(matches!(startup, StartupMessage::Startup { .. }), "{startup:?}");
                    break;
                }
                assert_ne!(tcp.read_buf(&mut buf).await.unwrap(), 0, "the client hung up before its startup packet");
            }
            tcp.write_all(&reply).await.unwrap();
            let mut after_startup = buf.to_vec();
            let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut after_startup)).await;
            // A reset is a close too; a client that never closes fails the test.
            assert!(read.is_ok(), "the client kept the connection open: {after_startup:?}");
            after_startup
        });
        (port, task)
    }

    fn config(port: u16, password: Option<&str>) -> OriginConfig {
        OriginConfig {
            host: "127.0.0.1".into(),
            port,
            user: "app".into(),
            database: "app".into(),
            password: password.map(|p| OriginPassword::new(p.into())),
            tls: OriginTls::Disable,
            auth_methods: OriginAuthMethods::default(),
            connect_timeout: Duration::from_secs(5),
            application_name: "cordon-test".into(),
            options: Vec::new(),
        }
    }

    fn auth_request(code: i32, data: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_u8(b'R');
        out.put_i32(8 + data.len() as i32);
        out.put_i32(code);
        out.put_slice(data);
        out.to_vec()
    }

    /// AuthenticationOk and the rest of a welcome, so that a client that believes it connects.
    fn welcome() -> Vec<u8> {
        let mut out = BytesMut::new();
        for message in [
            BackendMessage::AuthenticationOk,
            BackendMessage::ParameterStatus { name: "server_version".into(), value: "17.0 (impostor)".into() },
            BackendMessage::BackendKeyData { process_id: 7, secret_key: 9 },
            BackendMessage::ReadyForQuery(TransactionStatus::Idle),
        ] {
            message.encode(&mut out).unwrap();
        }
        out.to_vec()
    }

    const SALT: [u8; 4] = [0xde, 0xad, 0xbe, 0xef];

    /// Connects to a fake origin that sends `reply`; returns the error and what the origin
    /// received after the startup packet.
    async fn refused(reply: Vec<u8>, setup: impl FnOnce(&mut OriginConfig)) -> (String, Vec<u8>) {
        let (port, origin) = fake_origin(reply).await;
        let mut config = config(port, Some(PASSWORD));
        setup(&mut config);
        let result = ServerConn::connect(&config).await;
        let error = match result {
            Ok(conn) => {
                drop(conn);
                panic!("connected to the fake origin; it received {:?}", origin.await.unwrap());
            }
            Err(e) => e,
        };
        assert!(matches!(error, OriginError::Auth(_)), "{error:?}");
        assert_eq!(error.sqlstate(), "08004");
        let shown = format!("{error} {error:?}");
        assert!(!shown.contains(PASSWORD), "{shown}");
        (error.to_string(), origin.await.unwrap())
    }

    #[tokio::test]
    async fn an_origin_asking_for_md5_without_tls_gets_no_hash_even_when_md5_is_allowed() {
        let (error, received) = refused(auth_request(5, &SALT), |_| {}).await;
        assert!(error.contains("MD5") && error.contains("does not allow") && error.contains("origin_auth_methods"), "{error}");
        assert!(error.contains("refusing to send a hash of the password"), "{error}");
        assert_eq!(received, b"", "the fake origin received something after the startup packet");

        // Allowed for the database, but the connection is not verify-full TLS.
        let (error, received) = refused(auth_request(5, &SALT), |c| c.auth_methods.md5 = true).await;
        assert!(error.contains("MD5") && error.contains("without verified TLS") && error.contains("sslmode=verify-full"), "{error}");
        assert_eq!(received, b"");
    }

    #[tokio::test]
    async fn an_origin_asking_for_the_cleartext_password_without_tls_never_gets_it() {
        let (error, received) = refused(auth_request(3, b""), |_| {}).await;
        assert!(error.contains("cleartext password") && error.contains("does not allow"), "{error}");
        assert_eq!(received, b"");

        let (error, received) = refused(auth_request(3, b""), |c| c.auth_methods.password = true).await;
        assert!(error.contains("cleartext password") && error.contains("without verified TLS"), "{error}");
        assert_eq!(received, b"");
    }

    #[tokio::test]
    async fn an_origin_that_lets_cordon_in_without_asking_for_the_password_is_refused() {
        let (error, received) = refused(welcome(), |_| {}).await;
        assert!(error.contains("without asking for the password") && error.contains("impostor"), "{error}");
        assert!(error.contains("remove origin_password_env"), "{error}");
        assert_eq!(received, b"");
    }

    #[tokio::test]
    async fn an_origin_cannot_switch_to_md5_in_the_middle_of_scram() {
        let reply = [auth_request(10, b"SCRAM-SHA-256\0\0"), auth_request(5, &SALT)].concat();
        let (error, received) = refused(reply, |c| c.auth_methods.md5 = true).await;
        let hash = postgres_protocol::authentication::md5_hash(b"app", PASSWORD.as_bytes(), SALT);
        assert!(!received.windows(hash.len()).any(|w| w == hash.as_bytes()), "the MD5 hash was sent");
        // Only the SCRAM client-first message went out, which holds no secret.
        let mut received = BytesMut::from(&received[..]);
        let frame = protocol::decode_frame(&mut received, &Limits::default()).unwrap().unwrap();
        assert!(frame.tag == b'p' && frame.body.starts_with(b"SCRAM-SHA-256\0"), "{frame:?}");
        assert!(received.is_empty(), "{received:?}");
        assert!(error.contains("after another had begun"), "{error}");
    }

    #[tokio::test]
    async fn an_origin_without_tls_cannot_ask_for_a_cheap_scram_proof() {
        let server_first = |i: u32| auth_request(11, format!("r=nonce,s=c2FsdA==,i={i}").as_bytes());
        let (error, received) = refused([auth_request(10, b"SCRAM-SHA-256\0\0"), server_first(1)].concat(), |_| {}).await;
        assert!(error.contains("1 iterations") && error.contains("verify-full"), "{error}");
        // Only the client-first message went out: no proof.
        let mut received = BytesMut::from(&received[..]);
        let frame = protocol::decode_frame(&mut received, &Limits::default()).unwrap().unwrap();
        assert!(frame.tag == b'p' && frame.body.starts_with(b"SCRAM-SHA-256\0"), "{frame:?}");
        assert!(received.is_empty(), "{received:?}");
        // PostgreSQL's default count passes this check (and then fails on
        // the fake's nonce, which is not the client's).
        let (error, _) = refused([auth_request(10, b"SCRAM-SHA-256\0\0"), server_first(4096)].concat(), |_| {}).await;
        assert!(!error.contains("iterations"), "{error}");
    }

    #[tokio::test]
    async fn scram_can_be_left_out_of_the_allowed_methods() {
        let (error, received) = refused(auth_request(10, b"SCRAM-SHA-256\0\0"), |c| {
            c.auth_methods = OriginAuthMethods { scram_sha_256: false, md5: true, password: false }
        })
        .await;
        assert!(error.contains("not in this database's origin_auth_methods"), "{error}");
        assert_eq!(received, b"");
    }

    #[tokio::test]
    async fn without_a_password_an_origin_that_trusts_the_role_is_accepted_and_nothing_else_is() {
        let (port, origin) = fake_origin(welcome()).await;
        let conn = ServerConn::connect(&config(port, None)).await.unwrap();
        assert_eq!(conn.backend_key(), (7, 9));
        drop(conn);
        assert_eq!(origin.await.unwrap(), b"");

        for reply in [auth_request(5, &SALT), auth_request(3, b""), auth_request(10, b"SCRAM-SHA-256\0\0")] {
            let (port, origin) = fake_origin(reply).await;
            let error = ServerConn::connect(&config(port, None)).await.unwrap_err();
            assert!(matches!(&error, OriginError::Auth(m) if m.contains("none is configured")), "{error:?}");
            assert_eq!(origin.await.unwrap(), b"");
        }
    }

    #[test]
    fn password_is_redacted() {
        let config = OriginConfig {
            host: "db".into(),
            port: 5432,
            user: "u".into(),
            database: "d".into(),
            password: Some(OriginPassword::new("hunter2-secret".into())),
            tls: OriginTls::Disable,
            auth_methods: OriginAuthMethods::default(),
            connect_timeout: Duration::from_secs(1),
            application_name: "cordon".into(),
            options: Vec::new(),
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn parses_parameter_status_and_mechanisms() {
        assert_eq!(parse_parameter_status(&Bytes::from_static(b"a\0b\0")).unwrap(), ("a".into(), "b".into()));
        assert_eq!(parse_parameter_status(&Bytes::from_static(b"a\0\0")).unwrap(), ("a".into(), String::new()));
        for bad in [&b""[..], b"a\0", b"a\0b", b"\0b\0", b"a\0b\0c\0", b"\xff\0b\0"] {
            assert!(parse_parameter_status(&Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(parse_mechanisms(b"SCRAM-SHA-256\0SCRAM-SHA-256-PLUS\0\0").unwrap(), vec!["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]);
        assert_eq!(parse_mechanisms(b"\0").unwrap(), Vec::<String>::new());
        for bad in [&b""[..], b"SCRAM", b"SCRAM\0", b"A\0\0\0"] {
            assert!(parse_mechanisms(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn backend_key_must_be_eight_bytes() {
        assert_eq!(parse_backend_key(&Bytes::from_static(&[0, 0, 0, 7, 255, 255, 255, 255])).unwrap(), (7, -1));
        assert!(parse_backend_key(&Bytes::from_static(&[0; 7])).is_err());
        assert!(parse_backend_key(&Bytes::from_static(&[0; 12])).is_err());
    }

    #[test]
    fn sqlstates_do_not_blame_the_client_for_cordon_credentials() {
        assert_eq!(OriginError::Auth("x".into()).sqlstate(), "08004");
        assert_eq!(OriginError::Closed.sqlstate(), "08006");
        assert_eq!(OriginError::Timeout("x").sqlstate(), "08001");
        let error = OriginError::Server(ErrorFields::new(Severity::Error, "22012", "division by zero"));
        assert_eq!(error.sqlstate(), "22012");
        assert!(!error.is_fatal());
        assert!(OriginError::Server(ErrorFields::new(Severity::Fatal, "57P01", "terminating")).is_fatal());
        assert!(OriginError::Closed.is_fatal());
    }
}
