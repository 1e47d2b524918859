//! Postgres frontend/backend protocol v3 framing, as the accelerator needs it.
//!
//! The accelerator faces hostile clients, so every length on the wire is a claim to check, not a
//! size to trust: a frame's length is held against [`Limits`] before anything waits for or
//! allocates its body, element counts are checked against the bytes that actually remain, and
//! the decoders reserve buffer space only a bounded distance ahead of the data received. Bad
//! input becomes a [`ProtocolError`] that says what was wrong and in which message; it never
//! panics.
//!
//! Parsed bodies are [`Bytes`] slices of the received buffer, so a `Bind` carrying large
//! parameters is not copied on its way to the origin.
//!
//! Strings are required to be UTF-8: the accelerator classifies SQL text, so it only serves
//! clients whose `client_encoding` is UTF8.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Protocol 3.0, the only version the accelerator speaks.
pub const PROTOCOL_VERSION_3_0: i32 = 3 << 16;
/// The pseudo-version that marks a CancelRequest.
pub const CANCEL_REQUEST_CODE: i32 = (1234 << 16) | 5678;
/// The pseudo-version that marks an SSLRequest.
pub const SSL_REQUEST_CODE: i32 = (1234 << 16) | 5679;
/// The pseudo-version that marks a GSSENCRequest.
pub const GSSENC_REQUEST_CODE: i32 = (1234 << 16) | 5680;

/// A startup packet holds at least its length word and its version word.
const STARTUP_MIN_BYTES: usize = 8;
/// A regular message's length counts itself, so 4 is an empty body.
const FRAME_MIN_BYTES: usize = 4;
/// A 3.0 CancelRequest: length, code, process id, secret key.
const CANCEL_REQUEST_BYTES: usize = 16;
/// Tag byte plus length word.
const FRAME_HEADER_BYTES: usize = 5;
/// Parameter names and other client text quoted back in errors are cut to this, so an error
/// message stays readable and a hostile client cannot make the logs large.
const QUOTE_MAX_CHARS: usize = 64;

/// Bounds applied to everything a peer sends before the accelerator trusts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest startup packet, length word included. Postgres uses the same 10 000 bytes: the
    /// packet carries a few short parameters, and it arrives before any authentication.
    pub max_startup_bytes: usize,
    /// Largest regular message, length word included (the tag byte is not counted, as on the
    /// wire). 64 MiB by default: enough for large `Bind` parameters and `CopyData` chunks, far
    /// below Postgres's own 1 GiB, because the accelerator buffers a whole message per client.
    pub max_message_bytes: usize,
    /// Most key/value pairs a startup packet may carry. Real clients send fewer than ten.
    pub max_startup_params: usize,
    /// How far ahead of the bytes already received a decoder may reserve buffer capacity while
    /// waiting for the rest of a message. A client that announces a huge message and then
    /// stalls costs at most this much, not the announced size.
    pub max_read_ahead: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_startup_bytes: 10_000, max_message_bytes: 64 << 20, max_startup_params: 64, max_read_ahead: 64 << 10 }
    }
}

/// A message type byte, shown as a character when it is printable so errors read like the
/// protocol documentation (`'Q'`), and in hex otherwise.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag(pub u8);

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() { write!(f, "'{}'", self.0 as char) } else { write!(f, "0x{:02x}", self.0) }
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Which length word a framing error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// The untagged packet that opens a connection.
    Startup,
    /// A regular tagged message.
    Message(Tag),
}

impl fmt::Display for Framing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Framing::Startup => f.write_str("startup packet"),
            Framing::Message(tag) => write!(f, "message {tag}"),
        }
    }
}

/// Where the connection is, which decides what a `'p'` message means: the protocol reuses that
/// one tag for PasswordMessage, SASLInitialResponse and SASLResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// AuthenticationCleartextPassword was sent; `'p'` is a PasswordMessage.
    AwaitingPassword,
    /// AuthenticationSASL was sent; `'p'` is a SASLInitialResponse.
    AwaitingSaslInitialResponse,
    /// AuthenticationSASLContinue was sent; `'p'` is a SASLResponse.
    AwaitingSaslResponse,
    /// Authentication is over; `'p'` is a protocol violation.
    Ready,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::AwaitingPassword => "while waiting for a password message",
            Phase::AwaitingSaslInitialResponse => "while waiting for a SASLInitialResponse",
            Phase::AwaitingSaslResponse => "while waiting for a SASLResponse",
            Phase::Ready => "after authentication completed",
        })
    }
}

/// Everything that can be wrong with what a peer sent, or with what we were asked to encode.
///
/// Messages name the offending message and field and never quote message contents beyond a
/// short excerpt of a parameter name, so they are safe to send back to the client and to log.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("{framing} length {length} is below the minimum of {min} bytes")]
    LengthTooShort { framing: Framing, length: i32, min: usize },
    #[error("{framing} length {length} exceeds the limit of {max} bytes")]
    LengthTooLong { framing: Framing, length: i32, max: usize },
    #[error("unsupported frontend protocol {major}.{minor}: this server supports protocol 3.0 only")]
    UnsupportedProtocolVersion { major: u16, minor: u16 },
    #[error("{request} must be exactly {expected} bytes long, but its length is {length}")]
    BadRequestLength { request: &'static str, expected: usize, length: usize },
    #[error("startup packet has no \"user\" parameter, or it is empty")]
    MissingUser,
    #[error("startup parameter \"{0}\" appears more than once")]
    DuplicateParameter(String),
    #[error("startup packet has more than {max} parameters")]
    TooManyParameters { max: usize },
    #[error("startup parameter \"{0}\" requests a protocol extension, and this server supports none")]
    UnsupportedProtocolOption(String),
    #[error("{message}: {field} is not valid UTF-8")]
    InvalidUtf8 { message: &'static str, field: &'static str },
    #[error("{message}: {field} is missing its NUL terminator")]
    Unterminated { message: &'static str, field: &'static str },
    #[error("{message} is truncated: {field} needs {needed} bytes but only {remaining} remain")]
    Truncated { message: &'static str, field: &'static str, needed: usize, remaining: usize },
    #[error("{message} has {extra} unexpected trailing bytes")]
    TrailingBytes { message: &'static str, extra: usize },
    #[error("{message}: {field} {value} is invalid: {reason}")]
    InvalidValue { message: &'static str, field: &'static str, value: i64, reason: &'static str },
    #[error("{message} is malformed: {reason}")]
    Malformed { message: &'static str, reason: &'static str },
    #[error("unexpected message {tag} {phase}")]
    UnexpectedMessage { tag: Tag, phase: Phase },
    #[error("unknown frontend message type {tag}")]
    UnknownMessage { tag: Tag },
    #[error("{name} messages ({tag}) are not supported by this server")]
    UnsupportedMessage { tag: Tag, name: &'static str },
    #[error("cannot encode {message}: {field} {reason}")]
    Unencodable { message: &'static str, field: &'static str, reason: &'static str },
}

impl ProtocolError {
    /// The SQLSTATE to put in the ErrorResponse that reports this error to the client.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            // feature_not_supported, as Postgres answers an unknown protocol version.
            ProtocolError::UnsupportedProtocolVersion { .. }
            | ProtocolError::UnsupportedProtocolOption(_)
            | ProtocolError::UnsupportedMessage { .. } => "0A000",
            // invalid_authorization_specification, as Postgres answers a missing user name.
            ProtocolError::MissingUser => "28000",
            // character_not_in_repertoire
            ProtocolError::InvalidUtf8 { .. } => "22021",
            // internal_error: the caller built a message the protocol cannot carry.
            ProtocolError::Unencodable { .. } => "XX000",
            // protocol_violation
            _ => "08P01",
        }
    }

    /// The FATAL ErrorResponse that reports this error; after a framing error the stream cannot
    /// be resynchronised, so the connection must close.
    pub fn to_error_fields(&self) -> ErrorFields {
        ErrorFields::new(Severity::Fatal, self.sqlstate(), self.to_string())
    }
}

/// One of the untagged packets a connection may open with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupMessage {
    /// A protocol 3.0 StartupMessage. `user` is guaranteed present and non-empty, keys unique.
    Startup {
        params: Vec<(String, String)>,
    },
    SslRequest,
    GssEncRequest,
    Cancel {
        process_id: i32,
        secret_key: i32,
    },
}

impl StartupMessage {
    /// A startup parameter's value, such as `user`, `database` or `application_name`.
    pub fn param(&self, key: &str) -> Option<&str> {
        match self {
            StartupMessage::Startup { params } => params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()),
            _ => None,
        }
    }

    /// Encodes the packet, for opening connections to the origin.
    pub fn encode(&self, buf: &mut BytesMut) -> Result<(), ProtocolError> {
        const MESSAGE: &str = "startup packet";
        let start = buf.len();
        buf.put_i32(0);
        let result = (|| {
            match self {
                StartupMessage::Startup { params } => {
                    buf.put_i32(PROTOCOL_VERSION_3_0);
                    for (key, value) in params {
                        if key.is_empty() {
                            return Err(ProtocolError::Unencodable { message: MESSAGE, field: "a parameter name", reason: "is empty" });
                        }
                        put_cstr(buf, key.as_bytes(), MESSAGE, "a parameter name")?;
                        put_cstr(buf, value.as_bytes(), MESSAGE, "a parameter value")?;
                    }
                    buf.put_u8(0);
                }
                StartupMessage::SslRequest => buf.put_i32(SSL_REQUEST_CODE),
                StartupMessage::GssEncRequest => buf.put_i32(GSSENC_REQUEST_CODE),
                StartupMessage::Cancel { process_id, secret_key } => {
                    buf.put_i32(CANCEL_REQUEST_CODE);
                    buf.put_i32(*process_id);
                    buf.put_i32(*secret_key);
                }
            }
            patch_length(buf, start, MESSAGE)
        })();
        if result.is_err() {
            buf.truncate(start);
        }
        result
    }
}

/// Decodes the packet that opens a connection. `Ok(None)` means more bytes are needed; the
/// buffered bytes are left in place.
///
/// The length word is checked before the decoder waits for the body, so a client cannot hold a
/// large buffer open by announcing a large packet.
pub fn decode_startup(buf: &mut BytesMut, limits: &Limits) -> Result<Option<StartupMessage>, ProtocolError> {
    let Some(claimed) = peek_i32(buf, 0) else {
        return Ok(None);
    };
    let len = check_length(Framing::Startup, claimed, STARTUP_MIN_BYTES, limits.max_startup_bytes)?;
    if buf.len() < len {
        reserve_bounded(buf, len, limits);
        return Ok(None);
    }
    let mut packet = buf.split_to(len).freeze();
    packet.advance(4);
    let code = packet.get_i32();
    let exact = |request: &'static str, expected: usize| {
        if len == expected { Ok(()) } else { Err(ProtocolError::BadRequestLength { request, expected, length: len }) }
    };
    let message = match code {
        SSL_REQUEST_CODE => {
            exact("SSLRequest", STARTUP_MIN_BYTES)?;
            StartupMessage::SslRequest
        }
        GSSENC_REQUEST_CODE => {
            exact("GSSENCRequest", STARTUP_MIN_BYTES)?;
            StartupMessage::GssEncRequest
        }
        CANCEL_REQUEST_CODE => {
            // Protocol 3.2 allows longer secret keys, but we never hand those out.
            exact("CancelRequest", CANCEL_REQUEST_BYTES)?;
            StartupMessage::Cancel { process_id: packet.get_i32(), secret_key: packet.get_i32() }
        }
        PROTOCOL_VERSION_3_0 => StartupMessage::Startup { params: parse_startup_params(&packet, limits)? },
        other => {
            // Newer 3.x minors could be negotiated down with NegotiateProtocolVersion; refusing
            // is simpler, and every client in use defaults to 3.0.
            let [major_hi, major_lo, minor_hi, minor_lo] = other.to_be_bytes();
            return Err(ProtocolError::UnsupportedProtocolVersion {
                major: u16::from_be_bytes([major_hi, major_lo]),
                minor: u16::from_be_bytes([minor_hi, minor_lo]),
            });
        }
    };
    Ok(Some(message))
}

fn parse_startup_params(body: &Bytes, limits: &Limits) -> Result<Vec<(String, String)>, ProtocolError> {
    const MESSAGE: &str = "startup packet";
    let mut reader = Reader::new(MESSAGE, body);
    let mut params: Vec<(String, String)> = Vec::new();
    loop {
        match reader.peek_u8() {
            None => return Err(ProtocolError::Unterminated { message: MESSAGE, field: "parameter list" }),
            Some(0) => {
                reader.advance(1);
                break;
            }
            Some(_) => {}
        }
        if params.len() >= limits.max_startup_params {
            return Err(ProtocolError::TooManyParameters { max: limits.max_startup_params });
        }
        let key = reader.cstr("parameter name")?;
        let value = reader.cstr("parameter value")?;
        if key.starts_with("_pq_.") {
            return Err(ProtocolError::UnsupportedProtocolOption(quote(&key)));
        }
        if params.iter().any(|(k, _)| *k == key) {
            return Err(ProtocolError::DuplicateParameter(quote(&key)));
        }
        params.push((key, value));
    }
    reader.finish()?;
    if !params.iter().any(|(k, v)| k == "user" && !v.is_empty()) {
        return Err(ProtocolError::MissingUser);
    }
    Ok(params)
}

/// One tagged message, body still undecoded. The same framing serves both directions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

impl Frame {
    pub fn new(tag: u8, body: impl Into<Bytes>) -> Self {
        Frame { tag, body: body.into() }
    }

    /// Writes the frame back out, for forwarding it unchanged.
    pub fn encode(&self, buf: &mut BytesMut) -> Result<(), ProtocolError> {
        let len = self
            .body
            .len()
            .checked_add(FRAME_MIN_BYTES)
            .and_then(|len| i32::try_from(len).ok())
            .ok_or(ProtocolError::Unencodable { message: "frame", field: "body", reason: "is longer than the protocol allows" })?;
        buf.reserve(FRAME_HEADER_BYTES + self.body.len());
        buf.put_u8(self.tag);
        buf.put_i32(len);
        buf.put_slice(&self.body);
        Ok(())
    }
}

/// Decodes one tagged message. `Ok(None)` means more bytes are needed; the buffered bytes are
/// left in place, and at most [`Limits::max_read_ahead`] bytes of capacity are reserved for the
/// rest, however long the message claims to be.
pub fn decode_frame(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Frame>, ProtocolError> {
    let (Some(&tag), Some(claimed)) = (buf.first(), peek_i32(buf, 1)) else {
        return Ok(None);
    };
    let len = check_length(Framing::Message(Tag(tag)), claimed, FRAME_MIN_BYTES, limits.max_message_bytes)?;
    let Some(total) = len.checked_add(1) else {
        return Err(ProtocolError::LengthTooLong { framing: Framing::Message(Tag(tag)), length: claimed, max: limits.max_message_bytes });
    };
    if buf.len() < total {
        reserve_bounded(buf, total, limits);
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    frame.advance(FRAME_HEADER_BYTES);
    Ok(Some(Frame { tag, body: frame.freeze() }))
}

/// Whether `Describe` and `Close` name a prepared statement or a portal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Statement,
    Portal,
}

impl Target {
    pub fn as_byte(self) -> u8 {
        match self {
            Target::Statement => b'S',
            Target::Portal => b'P',
        }
    }
}

/// A cleartext password, kept out of `Debug` output so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(pub Bytes);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// The frontend messages the pooler has to understand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendMessage {
    Query(String),
    Parse {
        name: String,
        query: String,
        param_types: Vec<u32>,
    },
    Bind {
        portal: String,
        statement: String,
        /// Empty (all text), one code for every parameter, or one code per parameter.
        param_formats: Vec<i16>,
        /// `None` is SQL NULL.
        params: Vec<Option<Bytes>>,
        result_formats: Vec<i16>,
    },
    Describe {
        kind: Target,
        name: String,
    },
    Execute {
        portal: String,
        /// Zero means no limit.
        max_rows: i32,
    },
    Close {
        kind: Target,
        name: String,
    },
    Sync,
    Flush,
    Terminate,
    /// The NUL terminator is stripped; Postgres passwords are bytes, not necessarily UTF-8.
    Password(Password),
    SaslInitialResponse {
        mechanism: String,
        /// `None` when the client sent no initial response (length -1).
        data: Option<Bytes>,
    },
    SaslResponse(Bytes),
    CopyData(Bytes),
    CopyDone,
    CopyFail(String),
}

/// Parses a frontend message body. `phase` says what a `'p'` message is and which messages are
/// allowed at all: during authentication only `'p'` and Terminate are.
pub fn parse_frontend(frame: &Frame, phase: Phase) -> Result<FrontendMessage, ProtocolError> {
    match (frame.tag, phase) {
        (b'X', _) => parse_empty(frame, "Terminate message", FrontendMessage::Terminate),
        (b'p', Phase::AwaitingPassword) => {
            let mut r = Reader::new("PasswordMessage", &frame.body);
            let password = r.cstr_bytes("password")?;
            r.finish()?;
            Ok(FrontendMessage::Password(Password(password)))
        }
        (b'p', Phase::AwaitingSaslInitialResponse) => {
            let mut r = Reader::new("SASLInitialResponse message", &frame.body);
            let mechanism = r.cstr("mechanism name")?;
            let len = r.i32("initial response length")?;
            let data = match len {
                -1 => None,
                len => Some(r.take(r.length(len, "initial response length")?, "initial response")?),
            };
            r.finish()?;
            Ok(FrontendMessage::SaslInitialResponse { mechanism, data })
        }
        (b'p', Phase::AwaitingSaslResponse) => Ok(FrontendMessage::SaslResponse(frame.body.clone())),
        (_, Phase::Ready) => parse_ready(frame),
        (tag, phase) => Err(ProtocolError::UnexpectedMessage { tag: Tag(tag), phase }),
    }
}

fn parse_ready(frame: &Frame) -> Result<FrontendMessage, ProtocolError> {
    let body = &frame.body;
    match frame.tag {
        b'Q' => {
            let mut r = Reader::new("Query message", body);
            let sql = r.cstr("query string")?;
            r.finish()?;
            Ok(FrontendMessage::Query(sql))
        }
        b'P' => {
            let mut r = Reader::new("Parse message", body);
            let name = r.cstr("statement name")?;
            let query = r.cstr("query string")?;
            let count = r.count("parameter type count", 4)?;
            let mut param_types = Vec::with_capacity(count);
            for _ in 0..count {
                param_types.push(r.u32("parameter type")?);
            }
            r.finish()?;
            Ok(FrontendMessage::Parse { name, query, param_types })
        }
        b'B' => parse_bind(body),
        b'D' | b'C' => {
            let message = if frame.tag == b'D' { "Describe message" } else { "Close message" };
            let mut r = Reader::new(message, body);
            let kind = match r.u8("target type")? {
                b'S' => Target::Statement,
                b'P' => Target::Portal,
                other => {
                    return Err(ProtocolError::InvalidValue {
                        message,
                        field: "target type",
                        value: other.into(),
                        reason: "must be 'S' (statement) or 'P' (portal)",
                    });
                }
            };
            let name = r.cstr("name")?;
            r.finish()?;
            Ok(if frame.tag == b'D' { FrontendMessage::Describe { kind, name } } else { FrontendMessage::Close { kind, name } })
        }
        b'E' => {
            let mut r = Reader::new("Execute message", body);
            let portal = r.cstr("portal name")?;
            let max_rows = r.i32("row limit")?;
            r.finish()?;
            Ok(FrontendMessage::Execute { portal, max_rows })
        }
        b'S' => parse_empty(frame, "Sync message", FrontendMessage::Sync),
        b'H' => parse_empty(frame, "Flush message", FrontendMessage::Flush),
        b'd' => Ok(FrontendMessage::CopyData(body.clone())),
        b'c' => parse_empty(frame, "CopyDone message", FrontendMessage::CopyDone),
        b'f' => {
            let mut r = Reader::new("CopyFail message", body);
            let reason = r.cstr("error message")?;
            r.finish()?;
            Ok(FrontendMessage::CopyFail(reason))
        }
        b'F' => Err(ProtocolError::UnsupportedMessage { tag: Tag(b'F'), name: "FunctionCall" }),
        b'p' => Err(ProtocolError::UnexpectedMessage { tag: Tag(b'p'), phase: Phase::Ready }),
        tag => Err(ProtocolError::UnknownMessage { tag: Tag(tag) }),
    }
}

fn parse_bind(body: &Bytes) -> Result<FrontendMessage, ProtocolError> {
    const MESSAGE: &str = "Bind message";
    let mut r = Reader::new(MESSAGE, body);
    let portal = r.cstr("portal name")?;
    let statement = r.cstr("statement name")?;
    let param_formats = r.format_codes("parameter format")?;
    // Every value carries at least its 4-byte length, so the count is bounded by what remains.
    let count = r.count("parameter count", 4)?;
    let mut params = Vec::with_capacity(count);
    for _ in 0..count {
        let len = r.i32("parameter length")?;
        params.push(match len {
            -1 => None,
            len => Some(r.take(r.length(len, "parameter length")?, "parameter value")?),
        });
    }
    let result_formats = r.format_codes("result format")?;
    r.finish()?;
    if !(param_formats.len() <= 1 || param_formats.len() == params.len()) {
        return Err(ProtocolError::InvalidValue {
            message: MESSAGE,
            field: "parameter format count",
            value: param_formats.len() as i64,
            reason: "must be 0, 1 or the number of parameters",
        });
    }
    Ok(FrontendMessage::Bind { portal, statement, param_formats, params, result_formats })
}

fn parse_empty(frame: &Frame, message: &'static str, parsed: FrontendMessage) -> Result<FrontendMessage, ProtocolError> {
    Reader::new(message, &frame.body).finish()?;
    Ok(parsed)
}

impl FrontendMessage {
    pub fn tag(&self) -> u8 {
        match self {
            FrontendMessage::Query(_) => b'Q',
            FrontendMessage::Parse { .. } => b'P',
            FrontendMessage::Bind { .. } => b'B',
            FrontendMessage::Describe { .. } => b'D',
            FrontendMessage::Execute { .. } => b'E',
            FrontendMessage::Close { .. } => b'C',
            FrontendMessage::Sync => b'S',
            FrontendMessage::Flush => b'H',
            FrontendMessage::Terminate => b'X',
            FrontendMessage::Password(_) | FrontendMessage::SaslInitialResponse { .. } | FrontendMessage::SaslResponse(_) => b'p',
            FrontendMessage::CopyData(_) => b'd',
            FrontendMessage::CopyDone => b'c',
            FrontendMessage::CopyFail(_) => b'f',
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            FrontendMessage::Query(_) => "Query message",
            FrontendMessage::Parse { .. } => "Parse message",
            FrontendMessage::Bind { .. } => "Bind message",
            FrontendMessage::Describe { .. } => "Describe message",
            FrontendMessage::Execute { .. } => "Execute message",
            FrontendMessage::Close { .. } => "Close message",
            FrontendMessage::Sync => "Sync message",
            FrontendMessage::Flush => "Flush message",
            FrontendMessage::Terminate => "Terminate message",
            FrontendMessage::Password(_) => "PasswordMessage",
            FrontendMessage::SaslInitialResponse { .. } => "SASLInitialResponse message",
            FrontendMessage::SaslResponse(_) => "SASLResponse message",
            FrontendMessage::CopyData(_) => "CopyData message",
            FrontendMessage::CopyDone => "CopyDone message",
            FrontendMessage::CopyFail(_) => "CopyFail message",
        }
    }

    /// Encodes the message, for sending it (possibly rewritten) to the origin. On error nothing
    /// is left in `buf`: a name with a NUL byte or a count over 65 535 cannot be represented,
    /// and a half-written message would desynchronise the stream.
    pub fn encode(&self, buf: &mut BytesMut) -> Result<(), ProtocolError> {
        let start = buf.len();
        let result = self.encode_body(buf, start);
        if result.is_err() {
            buf.truncate(start);
        }
        result
    }

    fn encode_body(&self, buf: &mut BytesMut, start: usize) -> Result<(), ProtocolError> {
        let m = self.name();
        buf.put_u8(self.tag());
        buf.put_i32(0);
        match self {
            FrontendMessage::Query(sql) => put_cstr(buf, sql.as_bytes(), m, "query string")?,
            FrontendMessage::Parse { name, query, param_types } => {
                put_cstr(buf, name.as_bytes(), m, "statement name")?;
                put_cstr(buf, query.as_bytes(), m, "query string")?;
                put_count(buf, param_types.len(), m, "parameter type count")?;
                for oid in param_types {
                    buf.put_u32(*oid);
                }
            }
            FrontendMessage::Bind { portal, statement, param_formats, params, result_formats } => {
                put_cstr(buf, portal.as_bytes(), m, "portal name")?;
                put_cstr(buf, statement.as_bytes(), m, "statement name")?;
                put_count(buf, param_formats.len(), m, "parameter format count")?;
                for format in param_formats {
                    buf.put_i16(*format);
                }
                put_count(buf, params.len(), m, "parameter count")?;
                for param in params {
                    match param {
                        None => buf.put_i32(-1),
                        Some(value) => {
                            put_len(buf, value.len(), m, "parameter value")?;
                            buf.put_slice(value);
                        }
                    }
                }
                put_count(buf, result_formats.len(), m, "result format count")?;
                for format in result_formats {
                    buf.put_i16(*format);
                }
            }
            FrontendMessage::Describe { kind, name } | FrontendMessage::Close { kind, name } => {
                buf.put_u8(kind.as_byte());
                put_cstr(buf, name.as_bytes(), m, "name")?;
            }
            FrontendMessage::Execute { portal, max_rows } => {
                put_cstr(buf, portal.as_bytes(), m, "portal name")?;
                buf.put_i32(*max_rows);
            }
            FrontendMessage::Sync | FrontendMessage::Flush | FrontendMessage::Terminate | FrontendMessage::CopyDone => {}
            FrontendMessage::Password(Password(password)) => put_cstr(buf, password, m, "password")?,
            FrontendMessage::SaslInitialResponse { mechanism, data } => {
                put_cstr(buf, mechanism.as_bytes(), m, "mechanism name")?;
                match data {
                    None => buf.put_i32(-1),
                    Some(data) => {
                        put_len(buf, data.len(), m, "initial response")?;
                        buf.put_slice(data);
                    }
                }
            }
            FrontendMessage::SaslResponse(data) | FrontendMessage::CopyData(data) => buf.put_slice(data),
            FrontendMessage::CopyFail(reason) => put_cstr(buf, reason.as_bytes(), m, "error message")?,
        }
        patch_length(buf, start + 1, m)
    }
}

/// The transaction status carried by ReadyForQuery; the pooler returns an origin connection to
/// the pool only when it reads [`TransactionStatus::Idle`] from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TransactionStatus {
    pub fn as_byte(self) -> u8 {
        match self {
            TransactionStatus::Idle => b'I',
            TransactionStatus::InTransaction => b'T',
            TransactionStatus::Failed => b'E',
        }
    }

    /// Reads the status out of a ReadyForQuery frame received from the origin.
    pub fn from_ready_for_query(frame: &Frame) -> Result<Self, ProtocolError> {
        const MESSAGE: &str = "ReadyForQuery message";
        if frame.tag != b'Z' {
            return Err(ProtocolError::Malformed { message: MESSAGE, reason: "the frame is not tagged 'Z'" });
        }
        let mut r = Reader::new(MESSAGE, &frame.body);
        let status = match r.u8("transaction status")? {
            b'I' => TransactionStatus::Idle,
            b'T' => TransactionStatus::InTransaction,
            b'E' => TransactionStatus::Failed,
            other => {
                return Err(ProtocolError::InvalidValue {
                    message: MESSAGE,
                    field: "transaction status",
                    value: other.into(),
                    reason: "must be 'I', 'T' or 'E'",
                });
            }
        };
        r.finish()?;
        Ok(status)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Panic,
    Warning,
    Notice,
    Debug,
    Info,
    Log,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Panic => "PANIC",
            Severity::Warning => "WARNING",
            Severity::Notice => "NOTICE",
            Severity::Debug => "DEBUG",
            Severity::Info => "INFO",
            Severity::Log => "LOG",
        }
    }

    fn from_wire(s: &[u8]) -> Option<Self> {
        Some(match s {
            b"ERROR" => Severity::Error,
            b"FATAL" => Severity::Fatal,
            b"PANIC" => Severity::Panic,
            b"WARNING" => Severity::Warning,
            b"NOTICE" => Severity::Notice,
            b"DEBUG" => Severity::Debug,
            b"INFO" => Severity::Info,
            b"LOG" => Severity::Log,
            _ => return None,
        })
    }
}

/// The fields of an ErrorResponse or NoticeResponse that the accelerator writes itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: Severity,
    /// The SQLSTATE, five characters.
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ErrorFields {
    pub fn new(severity: Severity, code: &str, message: impl Into<String>) -> Self {
        ErrorFields { severity, code: code.to_owned(), message: message.into(), detail: None, hint: None }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Reads an ErrorResponse or NoticeResponse body, such as one from the origin. Fields other
    /// than severity, code, message, detail and hint are skipped.
    pub fn parse(body: &Bytes) -> Result<Self, ProtocolError> {
        const MESSAGE: &str = "ErrorResponse or NoticeResponse";
        let mut r = Reader::new(MESSAGE, body);
        let (mut localized, mut severity, mut code, mut message, mut detail, mut hint) = (None, None, None, None, None, None);
        loop {
            let field = r.u8("field type")?;
            if field == 0 {
                break;
            }
            let value = r.cstr_bytes("field value")?;
            match field {
                b'S' => localized = Some(value),
                b'V' => severity = Some(value),
                b'C' => code = Some(utf8(MESSAGE, "code", &value)?),
                b'M' => message = Some(utf8(MESSAGE, "message", &value)?),
                b'D' => detail = Some(utf8(MESSAGE, "detail", &value)?),
                b'H' => hint = Some(utf8(MESSAGE, "hint", &value)?),
                _ => {}
            }
        }
        r.finish()?;
        // 'V' is never localized; 'S' is the only severity before Postgres 9.6.
        let severity = severity
            .or(localized)
            .and_then(|s| Severity::from_wire(&s))
            .ok_or(ProtocolError::Malformed { message: MESSAGE, reason: "severity is missing or unknown" })?;
        let code = code.ok_or(ProtocolError::Malformed { message: MESSAGE, reason: "SQLSTATE code is missing" })?;
        let message = message.ok_or(ProtocolError::Malformed { message: MESSAGE, reason: "message text is missing" })?;
        Ok(ErrorFields { severity, code, message, detail, hint })
    }

    fn encode_into(&self, buf: &mut BytesMut) {
        for (field, value) in [
            (b'S', Some(self.severity.as_str())),
            (b'V', Some(self.severity.as_str())),
            (b'C', Some(self.code.as_str())),
            (b'M', Some(self.message.as_str())),
            (b'D', self.detail.as_deref()),
            (b'H', self.hint.as_deref()),
        ] {
            if let Some(value) = value {
                buf.put_u8(field);
                put_text_lossy(buf, value);
            }
        }
        buf.put_u8(0);
    }
}

/// The backend messages the accelerator writes itself, rather than forwarding from the origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage {
    AuthenticationOk,
    AuthenticationCleartextPassword,
    AuthenticationSasl { mechanisms: Vec<String> },
    AuthenticationSaslContinue(Bytes),
    AuthenticationSaslFinal(Bytes),
    ParameterStatus { name: String, value: String },
    BackendKeyData { process_id: i32, secret_key: i32 },
    ReadyForQuery(TransactionStatus),
    ErrorResponse(ErrorFields),
    NoticeResponse(ErrorFields),
}

impl BackendMessage {
    pub fn tag(&self) -> u8 {
        match self {
            BackendMessage::AuthenticationOk
            | BackendMessage::AuthenticationCleartextPassword
            | BackendMessage::AuthenticationSasl { .. }
            | BackendMessage::AuthenticationSaslContinue(_)
            | BackendMessage::AuthenticationSaslFinal(_) => b'R',
            BackendMessage::ParameterStatus { .. } => b'S',
            BackendMessage::BackendKeyData { .. } => b'K',
            BackendMessage::ReadyForQuery(_) => b'Z',
            BackendMessage::ErrorResponse(_) => b'E',
            BackendMessage::NoticeResponse(_) => b'N',
        }
    }

    /// Encodes the message. Error and notice text may quote client input, so NUL bytes in it are
    /// dropped rather than allowed to end a field early and smuggle in fields of their own;
    /// identifiers (parameter and mechanism names) with a NUL byte are refused instead, because
    /// silently changing them would change their meaning. On error nothing is left in `buf`.
    pub fn encode(&self, buf: &mut BytesMut) -> Result<(), ProtocolError> {
        let start = buf.len();
        let result = self.encode_body(buf, start);
        if result.is_err() {
            buf.truncate(start);
        }
        result
    }

    fn encode_body(&self, buf: &mut BytesMut, start: usize) -> Result<(), ProtocolError> {
        buf.put_u8(self.tag());
        buf.put_i32(0);
        let message = match self {
            BackendMessage::AuthenticationOk => {
                buf.put_i32(0);
                "AuthenticationOk message"
            }
            BackendMessage::AuthenticationCleartextPassword => {
                buf.put_i32(3);
                "AuthenticationCleartextPassword message"
            }
            BackendMessage::AuthenticationSasl { mechanisms } => {
                const M: &str = "AuthenticationSASL message";
                buf.put_i32(10);
                for mechanism in mechanisms {
                    if mechanism.is_empty() {
                        return Err(ProtocolError::Unencodable { message: M, field: "a mechanism name", reason: "is empty" });
                    }
                    put_cstr(buf, mechanism.as_bytes(), M, "a mechanism name")?;
                }
                buf.put_u8(0);
                M
            }
            BackendMessage::AuthenticationSaslContinue(data) => {
                buf.put_i32(11);
                buf.put_slice(data);
                "AuthenticationSASLContinue message"
            }
            BackendMessage::AuthenticationSaslFinal(data) => {
                buf.put_i32(12);
                buf.put_slice(data);
                "AuthenticationSASLFinal message"
            }
            BackendMessage::ParameterStatus { name, value } => {
                const M: &str = "ParameterStatus message";
                put_cstr(buf, name.as_bytes(), M, "parameter name")?;
                put_cstr(buf, value.as_bytes(), M, "parameter value")?;
                M
            }
            BackendMessage::BackendKeyData { process_id, secret_key } => {
                buf.put_i32(*process_id);
                buf.put_i32(*secret_key);
                "BackendKeyData message"
            }
            BackendMessage::ReadyForQuery(status) => {
                buf.put_u8(status.as_byte());
                "ReadyForQuery message"
            }
            BackendMessage::ErrorResponse(fields) => {
                fields.encode_into(buf);
                "ErrorResponse message"
            }
            BackendMessage::NoticeResponse(fields) => {
                fields.encode_into(buf);
                "NoticeResponse message"
            }
        };
        patch_length(buf, start + 1, message)
    }
}

/// A cursor over a message body whose every read is bounds-checked and names the field it
/// failed on.
struct Reader<'a> {
    message: &'static str,
    body: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(message: &'static str, body: &'a Bytes) -> Self {
        Reader { message, body, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.body.len().saturating_sub(self.pos)
    }

    fn rest(&self) -> &[u8] {
        self.body.get(self.pos..).unwrap_or_default()
    }

    fn advance(&mut self, n: usize) {
        self.pos = self.pos.saturating_add(n).min(self.body.len());
    }

    fn truncated(&self, field: &'static str, needed: usize) -> ProtocolError {
        ProtocolError::Truncated { message: self.message, field, needed, remaining: self.remaining() }
    }

    fn peek_u8(&self) -> Option<u8> {
        self.rest().first().copied()
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], ProtocolError> {
        let bytes: [u8; N] = self.rest().get(..N).and_then(|b| b.try_into().ok()).ok_or_else(|| self.truncated(field, N))?;
        self.advance(N);
        Ok(bytes)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn i16(&mut self, field: &'static str) -> Result<i16, ProtocolError> {
        self.array(field).map(i16::from_be_bytes)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, ProtocolError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, ProtocolError> {
        self.array(field).map(i32::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, ProtocolError> {
        self.array(field).map(u32::from_be_bytes)
    }

    /// A zero-copy slice of the next `n` bytes.
    fn take(&mut self, n: usize, field: &'static str) -> Result<Bytes, ProtocolError> {
        if n > self.remaining() {
            return Err(self.truncated(field, n));
        }
        let bytes = self.body.slice(self.pos..self.pos + n);
        self.advance(n);
        Ok(bytes)
    }

    /// A length word for a following value: -1 (NULL) is the caller's business, anything else
    /// negative is malformed.
    fn length(&self, len: i32, field: &'static str) -> Result<usize, ProtocolError> {
        usize::try_from(len).map_err(|_| ProtocolError::InvalidValue {
            message: self.message,
            field,
            value: len.into(),
            reason: "must be -1 (NULL) or non-negative",
        })
    }

    /// An element count, checked against the remaining body before anything is allocated for
    /// it: each element takes at least `min_element_bytes`. Postgres reads these counts as
    /// unsigned 16-bit, so we do too.
    fn count(&mut self, field: &'static str, min_element_bytes: usize) -> Result<usize, ProtocolError> {
        let count = usize::from(self.u16(field)?);
        let needed = count.saturating_mul(min_element_bytes);
        if needed > self.remaining() {
            return Err(self.truncated(field, needed));
        }
        Ok(count)
    }

    fn format_codes(&mut self, field: &'static str) -> Result<Vec<i16>, ProtocolError> {
        let count = self.count(field, 2)?;
        let mut formats = Vec::with_capacity(count);
        for _ in 0..count {
            let format = self.i16(field)?;
            if !matches!(format, 0 | 1) {
                return Err(ProtocolError::InvalidValue {
                    message: self.message,
                    field,
                    value: format.into(),
                    reason: "must be 0 (text) or 1 (binary)",
                });
            }
            formats.push(format);
        }
        Ok(formats)
    }

    /// A NUL-terminated string, without its terminator.
    fn cstr_bytes(&mut self, field: &'static str) -> Result<Bytes, ProtocolError> {
        let nul = self.rest().iter().position(|&b| b == 0).ok_or(ProtocolError::Unterminated { message: self.message, field })?;
        let bytes = self.body.slice(self.pos..self.pos + nul);
        self.advance(nul + 1);
        Ok(bytes)
    }

    fn cstr(&mut self, field: &'static str) -> Result<String, ProtocolError> {
        let bytes = self.cstr_bytes(field)?;
        utf8(self.message, field, &bytes)
    }

    fn finish(&self) -> Result<(), ProtocolError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(ProtocolError::TrailingBytes { message: self.message, extra }),
        }
    }
}

fn utf8(message: &'static str, field: &'static str, bytes: &[u8]) -> Result<String, ProtocolError> {
    std::str::from_utf8(bytes).map(str::to_owned).map_err(|_| ProtocolError::InvalidUtf8 { message, field })
}

fn peek_i32(buf: &[u8], at: usize) -> Option<i32> {
    let bytes: [u8; 4] = buf.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(i32::from_be_bytes(bytes))
}

/// Turns a claimed length into a usable one, refusing it before anything waits on it.
fn check_length(framing: Framing, claimed: i32, min: usize, max: usize) -> Result<usize, ProtocolError> {
    let len = usize::try_from(claimed).map_err(|_| ProtocolError::LengthTooShort { framing, length: claimed, min })?;
    if len < min {
        return Err(ProtocolError::LengthTooShort { framing, length: claimed, min });
    }
    if len > max {
        return Err(ProtocolError::LengthTooLong { framing, length: claimed, max });
    }
    Ok(len)
}

/// Makes room for the rest of a message, but never more than `max_read_ahead` beyond what has
/// arrived: the claimed length is only a claim until the bytes exist.
fn reserve_bounded(buf: &mut BytesMut, total: usize, limits: &Limits) {
    let missing = total.saturating_sub(buf.len());
    buf.reserve(missing.min(limits.max_read_ahead));
}

/// Fills in the length word at `at` once the body is written.
fn patch_length(buf: &mut BytesMut, at: usize, message: &'static str) -> Result<(), ProtocolError> {
    let len = buf.len().saturating_sub(at);
    let len =
        i32::try_from(len).map_err(|_| ProtocolError::Unencodable { message, field: "the message", reason: "is longer than 2 GiB" })?;
    match buf.get_mut(at..at + 4) {
        Some(word) => {
            word.copy_from_slice(&len.to_be_bytes());
            Ok(())
        }
        None => Err(ProtocolError::Unencodable { message, field: "the message", reason: "lost its length word" }),
    }
}

fn put_cstr(buf: &mut BytesMut, s: &[u8], message: &'static str, field: &'static str) -> Result<(), ProtocolError> {
    if s.contains(&0) {
        return Err(ProtocolError::Unencodable { message, field, reason: "contains a NUL byte" });
    }
    buf.put_slice(s);
    buf.put_u8(0);
    Ok(())
}

/// Writes text that may quote client input, dropping NUL bytes so the text cannot end its field
/// early.
fn put_text_lossy(buf: &mut BytesMut, s: &str) {
    for part in s.split('\0') {
        buf.put_slice(part.as_bytes());
    }
    buf.put_u8(0);
}

fn put_count(buf: &mut BytesMut, n: usize, message: &'static str, field: &'static str) -> Result<(), ProtocolError> {
    let n = u16::try_from(n).map_err(|_| ProtocolError::Unencodable { message, field, reason: "exceeds 65535" })?;
    buf.put_u16(n);
    Ok(())
}

fn put_len(buf: &mut BytesMut, n: usize, message: &'static str, field: &'static str) -> Result<(), ProtocolError> {
    let n = i32::try_from(n).map_err(|_| ProtocolError::Unencodable { message, field, reason: "is longer than 2 GiB" })?;
    buf.put_i32(n);
    Ok(())
}

/// A short, printable excerpt of client text for an error message.
fn quote(s: &str) -> String {
    let mut out: String = s.chars().take(QUOTE_MAX_CHARS).flat_map(char::escape_default).collect();
    if s.chars().nth(QUOTE_MAX_CHARS).is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::{backend as pg_backend, frontend as pg_frontend};
    use postgres_protocol::{IsNull, Oid};
    use rand::rngs::StdRng;
    use rand::{Rng, RngCore, SeedableRng};

    /// Recognises the error a malformed input must produce.
    type Check = fn(&ProtocolError) -> bool;

    const PHASES: [Phase; 4] = [Phase::AwaitingPassword, Phase::AwaitingSaslInitialResponse, Phase::AwaitingSaslResponse, Phase::Ready];

    fn limits() -> Limits {
        Limits::default()
    }

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// A startup packet built by hand, so malformed ones can be written too.
    fn raw_startup(version: i32, body: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        buf.put_i32((8 + body.len()) as i32);
        buf.put_i32(version);
        buf.put_slice(body);
        buf
    }

    fn decode_startup_all(bytes: &[u8]) -> Result<Option<StartupMessage>, ProtocolError> {
        decode_startup(&mut BytesMut::from(bytes), &limits())
    }

    fn frame_bytes(tag: u8, body: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        Frame::new(tag, Bytes::copy_from_slice(body)).encode(&mut buf).unwrap();
        buf
    }

    /// Decodes exactly one frame from `bytes` and parses it.
    fn parse_bytes(bytes: &[u8], phase: Phase) -> Result<FrontendMessage, ProtocolError> {
        let mut buf = BytesMut::from(bytes);
        let frame = decode_frame(&mut buf, &limits())?.expect("a whole frame");
        assert!(buf.is_empty(), "exactly one frame");
        parse_frontend(&frame, phase)
    }

    fn phase_for(message: &FrontendMessage) -> Phase {
        match message {
            FrontendMessage::Password(_) => Phase::AwaitingPassword,
            FrontendMessage::SaslInitialResponse { .. } => Phase::AwaitingSaslInitialResponse,
            FrontendMessage::SaslResponse(_) => Phase::AwaitingSaslResponse,
            _ => Phase::Ready,
        }
    }

    fn all_frontend_messages() -> Vec<FrontendMessage> {
        vec![
            FrontendMessage::Query("SELECT 1; SELECT 'é'".into()),
            FrontendMessage::Query(String::new()),
            FrontendMessage::Parse { name: "s1".into(), query: "SELECT $1::int, $2".into(), param_types: vec![23, 0] },
            FrontendMessage::Parse { name: String::new(), query: "BEGIN".into(), param_types: vec![] },
            FrontendMessage::Bind {
                portal: "p".into(),
                statement: "s1".into(),
                param_formats: vec![0, 1, 0],
                params: vec![Some(Bytes::from_static(b"42")), None, Some(Bytes::new())],
                result_formats: vec![1],
            },
            FrontendMessage::Bind {
                portal: String::new(),
                statement: String::new(),
                param_formats: vec![],
                params: vec![],
                result_formats: vec![],
            },
            FrontendMessage::Describe { kind: Target::Statement, name: "s1".into() },
            FrontendMessage::Describe { kind: Target::Portal, name: String::new() },
            FrontendMessage::Execute { portal: "p".into(), max_rows: 100 },
            FrontendMessage::Close { kind: Target::Portal, name: "p".into() },
            FrontendMessage::Close { kind: Target::Statement, name: "s1".into() },
            FrontendMessage::Sync,
            FrontendMessage::Flush,
            FrontendMessage::Terminate,
            FrontendMessage::Password(Password(Bytes::from_static(b"hunter2\xff"))),
            FrontendMessage::SaslInitialResponse { mechanism: "SCRAM-SHA-256".into(), data: Some(Bytes::from_static(b"n,,n=,r=abc")) },
            FrontendMessage::SaslInitialResponse { mechanism: "SCRAM-SHA-256".into(), data: None },
            FrontendMessage::SaslResponse(Bytes::from_static(b"c=biws,r=abc,p=xyz")),
            FrontendMessage::CopyData(Bytes::from_static(b"1\t2\n\0binary")),
            FrontendMessage::CopyDone,
            FrontendMessage::CopyFail("client gave up".into()),
        ]
    }

    fn all_backend_messages() -> Vec<BackendMessage> {
        vec![
            BackendMessage::AuthenticationOk,
            BackendMessage::AuthenticationCleartextPassword,
            BackendMessage::AuthenticationSasl { mechanisms: vec!["SCRAM-SHA-256".into()] },
            BackendMessage::AuthenticationSaslContinue(Bytes::from_static(b"r=abcdef,s=c2FsdA==,i=4096")),
            BackendMessage::AuthenticationSaslFinal(Bytes::from_static(b"v=c2lnbmF0dXJl")),
            BackendMessage::ParameterStatus { name: "server_version".into(), value: "16.4".into() },
            BackendMessage::BackendKeyData { process_id: 4242, secret_key: -17 },
            BackendMessage::ReadyForQuery(TransactionStatus::Idle),
            BackendMessage::ReadyForQuery(TransactionStatus::InTransaction),
            BackendMessage::ReadyForQuery(TransactionStatus::Failed),
            BackendMessage::ErrorResponse(
                ErrorFields::new(Severity::Fatal, "28P01", "password authentication failed for user \"alice\"")
                    .with_detail("some detail")
                    .with_hint("check the password"),
            ),
            BackendMessage::NoticeResponse(ErrorFields::new(Severity::Notice, "00000", "just so you know")),
        ]
    }

    // ---- startup ----

    #[test]
    fn startup_round_trips() {
        let messages = [
            StartupMessage::Startup {
                params: params(&[("user", "alice"), ("database", "app"), ("application_name", "psql ✓"), ("options", "")]),
            },
            StartupMessage::SslRequest,
            StartupMessage::GssEncRequest,
            StartupMessage::Cancel { process_id: 77, secret_key: i32::MIN },
        ];
        for message in messages {
            let mut buf = BytesMut::new();
            message.encode(&mut buf).unwrap();
            assert_eq!(decode_startup(&mut buf, &limits()).unwrap(), Some(message.clone()));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn startup_matches_postgres_protocol_encoding() {
        let mut buf = BytesMut::new();
        pg_frontend::startup_message([("user", "bob"), ("database", "db")], &mut buf).unwrap();
        let message = decode_startup(&mut buf, &limits()).unwrap().unwrap();
        assert_eq!(message.param("user"), Some("bob"));
        assert_eq!(message.param("database"), Some("db"));
        assert_eq!(message.param("nope"), None);

        let mut buf = BytesMut::new();
        pg_frontend::ssl_request(&mut buf);
        assert_eq!(decode_startup(&mut buf, &limits()).unwrap(), Some(StartupMessage::SslRequest));

        let mut buf = BytesMut::new();
        pg_frontend::cancel_request(12, 34, &mut buf);
        assert_eq!(decode_startup(&mut buf, &limits()).unwrap(), Some(StartupMessage::Cancel { process_id: 12, secret_key: 34 }));
    }

    #[test]
    fn startup_partial_returns_none_and_keeps_bytes() {
        let mut whole = BytesMut::new();
        StartupMessage::Startup { params: params(&[("user", "alice")]) }.encode(&mut whole).unwrap();
        let mut buf = BytesMut::new();
        for (i, byte) in whole.iter().enumerate() {
            buf.put_u8(*byte);
            if i + 1 < whole.len() {
                assert_eq!(decode_startup(&mut buf, &limits()).unwrap(), None, "after {} bytes", i + 1);
                assert_eq!(&buf[..], &whole[..=i]);
            }
        }
        assert_eq!(decode_startup(&mut buf, &limits()).unwrap().unwrap().param("user"), Some("alice"));
    }

    #[test]
    fn startup_length_bounds() {
        let max = limits().max_startup_bytes;
        // Exactly the limit: pad one value until the packet is max bytes long.
        let overhead = 8 + "user\0alice\0pad\0\0\0".len();
        let pad = "x".repeat(max - overhead);
        let message = StartupMessage::Startup { params: params(&[("user", "alice"), ("pad", &pad)]) };
        let mut buf = BytesMut::new();
        message.encode(&mut buf).unwrap();
        assert_eq!(buf.len(), max);
        assert_eq!(decode_startup(&mut buf, &limits()).unwrap(), Some(message));

        // One more byte is refused from the length word alone, without waiting for the body.
        for claimed in [max as i32 + 1, i32::MAX] {
            let err = decode_startup(&mut BytesMut::from(&claimed.to_be_bytes()[..]), &limits()).unwrap_err();
            assert!(matches!(err, ProtocolError::LengthTooLong { framing: Framing::Startup, .. }), "{err}");
            assert_eq!(err.sqlstate(), "08P01");
        }
        for claimed in [7, 4, 0, -1, i32::MIN] {
            let err = decode_startup(&mut BytesMut::from(&claimed.to_be_bytes()[..]), &limits()).unwrap_err();
            assert!(matches!(err, ProtocolError::LengthTooShort { framing: Framing::Startup, .. }), "{claimed}: {err}");
            assert!(err.to_string().contains(&claimed.to_string()), "{err}");
        }
    }

    #[test]
    fn startup_refuses_bad_parameter_lists() {
        let cases: Vec<(&str, &[u8], Check)> = vec![
            ("no user", b"database\0app\0\0", |e| matches!(e, ProtocolError::MissingUser)),
            ("empty user", b"user\0\0\0", |e| matches!(e, ProtocolError::MissingUser)),
            ("no params", b"\0", |e| matches!(e, ProtocolError::MissingUser)),
            ("duplicate", b"user\0a\0user\0b\0\0", |e| matches!(e, ProtocolError::DuplicateParameter(k) if k == "user")),
            ("unterminated key", b"user", |e| matches!(e, ProtocolError::Unterminated { field: "parameter name", .. })),
            ("unterminated value", b"user\0alice", |e| matches!(e, ProtocolError::Unterminated { field: "parameter value", .. })),
            ("missing list terminator", b"user\0alice\0", |e| matches!(e, ProtocolError::Unterminated { field: "parameter list", .. })),
            ("empty body", b"", |e| matches!(e, ProtocolError::Unterminated { field: "parameter list", .. })),
            ("trailing bytes", b"user\0alice\0\0junk", |e| matches!(e, ProtocolError::TrailingBytes { extra: 4, .. })),
            ("non-UTF-8 key", b"us\xffer\0alice\0\0", |e| matches!(e, ProtocolError::InvalidUtf8 { field: "parameter name", .. })),
            ("non-UTF-8 value", b"user\0al\xc3\0\0", |e| matches!(e, ProtocolError::InvalidUtf8 { field: "parameter value", .. })),
            ("protocol extension", b"user\0a\0_pq_.compression\0on\0\0", |e| matches!(e, ProtocolError::UnsupportedProtocolOption(_))),
        ];
        for (name, body, check) in cases {
            let err = decode_startup_all(&raw_startup(PROTOCOL_VERSION_3_0, body)).unwrap_err();
            assert!(check(&err), "{name}: got {err:?}");
        }
        assert_eq!(ProtocolError::MissingUser.sqlstate(), "28000");
    }

    #[test]
    fn startup_parameter_count_is_bounded() {
        let mut body = b"user\0alice\0".to_vec();
        for i in 1..64 {
            body.extend_from_slice(format!("k{i}\0v\0").as_bytes());
        }
        let mut exactly = body.clone();
        exactly.push(0);
        let message = decode_startup_all(&raw_startup(PROTOCOL_VERSION_3_0, &exactly)).unwrap().unwrap();
        assert!(matches!(message, StartupMessage::Startup { ref params } if params.len() == 64));

        body.extend_from_slice(b"k64\0v\0\0");
        let err = decode_startup_all(&raw_startup(PROTOCOL_VERSION_3_0, &body)).unwrap_err();
        assert!(matches!(err, ProtocolError::TooManyParameters { max: 64 }), "{err}");
    }

    #[test]
    fn startup_refuses_other_protocol_versions() {
        for (version, shown) in
            [((2 << 16), "2.0"), ((3 << 16) | 2, "3.2"), ((3 << 16) | 1, "3.1"), ((4 << 16), "4.0"), ((1234 << 16) | 5681, "1234.5681")]
        {
            let err = decode_startup_all(&raw_startup(version, b"user\0alice\0\0")).unwrap_err();
            assert!(matches!(err, ProtocolError::UnsupportedProtocolVersion { .. }), "{err}");
            assert!(err.to_string().contains(&format!("protocol {shown}:")), "{err}");
            assert_eq!(err.sqlstate(), "0A000");
        }
    }

    #[test]
    fn special_requests_must_have_their_exact_length() {
        for (code, body) in
            [(SSL_REQUEST_CODE, &b"x"[..]), (GSSENC_REQUEST_CODE, b"abcd"), (CANCEL_REQUEST_CODE, b"1234"), (CANCEL_REQUEST_CODE, &[0; 12])]
        {
            let err = decode_startup_all(&raw_startup(code, body)).unwrap_err();
            assert!(matches!(err, ProtocolError::BadRequestLength { .. }), "{err}");
        }
    }

    // ---- framing ----

    #[test]
    fn frame_length_bounds() {
        let limits = Limits { max_message_bytes: 100, ..Limits::default() };
        // Exactly the limit: the length word counts itself, not the tag.
        let mut buf = frame_bytes(b'd', &[7; 96]);
        assert_eq!(buf.len(), 101);
        let frame = decode_frame(&mut buf, &limits).unwrap().unwrap();
        assert_eq!(frame.body.len(), 96);

        let mut buf = frame_bytes(b'd', &[7; 97]);
        let err = decode_frame(&mut buf, &limits).unwrap_err();
        assert!(matches!(err, ProtocolError::LengthTooLong { length: 101, max: 100, .. }), "{err}");
        assert!(err.to_string().contains("message 'd'"), "{err}");

        // Refused from the header alone.
        for claimed in [101, i32::MAX] {
            let mut buf = BytesMut::from(&[b'Q'][..]);
            buf.put_i32(claimed);
            assert!(matches!(decode_frame(&mut buf, &limits), Err(ProtocolError::LengthTooLong { .. })));
        }
        for claimed in [3, 0, -1, -4, i32::MIN] {
            let mut buf = BytesMut::from(&[0u8][..]);
            buf.put_i32(claimed);
            let err = decode_frame(&mut buf, &limits).unwrap_err();
            assert!(matches!(err, ProtocolError::LengthTooShort { min: 4, .. }), "{err}");
            assert!(err.to_string().contains("message 0x00"), "{err}");
            assert_eq!(err.sqlstate(), "08P01");
        }

        // The minimum: an empty body.
        let mut buf = frame_bytes(b'S', &[]);
        assert_eq!(decode_frame(&mut buf, &limits).unwrap(), Some(Frame::new(b'S', Bytes::new())));
    }

    #[test]
    fn partial_frame_returns_none_and_keeps_bytes() {
        let whole = frame_bytes(b'Q', b"SELECT 1\0");
        let mut buf = BytesMut::new();
        for (i, byte) in whole.iter().enumerate() {
            buf.put_u8(*byte);
            if i + 1 < whole.len() {
                assert_eq!(decode_frame(&mut buf, &limits()).unwrap(), None);
                assert_eq!(&buf[..], &whole[..=i]);
            }
        }
        let frame = decode_frame(&mut buf, &limits()).unwrap().unwrap();
        assert_eq!(parse_frontend(&frame, Phase::Ready).unwrap(), FrontendMessage::Query("SELECT 1".into()));
    }

    #[test]
    fn several_frames_in_one_buffer() {
        let mut buf = BytesMut::new();
        for message in [FrontendMessage::Query("A".into()), FrontendMessage::Sync, FrontendMessage::Query("B".into())] {
            message.encode(&mut buf).unwrap();
        }
        buf.put_slice(&[b'Q', 0, 0]);
        let mut got = vec![];
        while let Some(frame) = decode_frame(&mut buf, &limits()).unwrap() {
            got.push(parse_frontend(&frame, Phase::Ready).unwrap());
        }
        assert_eq!(got, [FrontendMessage::Query("A".into()), FrontendMessage::Sync, FrontendMessage::Query("B".into())]);
        assert_eq!(&buf[..], &[b'Q', 0, 0]);
    }

    #[test]
    fn huge_claimed_length_does_not_allocate_it() {
        // A client announcing 1 GiB (allowed by these limits) and sending 10 bytes.
        let limits = Limits { max_message_bytes: 1 << 30, ..Limits::default() };
        let mut buf = BytesMut::with_capacity(16);
        buf.put_u8(b'd');
        buf.put_i32(1 << 30);
        buf.put_slice(b"hello");
        for _ in 0..3 {
            assert_eq!(decode_frame(&mut buf, &limits).unwrap(), None);
            assert!(buf.capacity() <= 2 * limits.max_read_ahead, "capacity {}", buf.capacity());
            assert_eq!(buf.len(), 10);
        }
        // The same under the default 64 MiB limit, claiming exactly the limit.
        let mut buf = BytesMut::new();
        buf.put_u8(b'B');
        buf.put_i32(64 << 20);
        buf.put_slice(b"hello");
        assert_eq!(decode_frame(&mut buf, &Limits::default()).unwrap(), None);
        assert!(buf.capacity() <= 2 * Limits::default().max_read_ahead, "capacity {}", buf.capacity());
        // And a startup packet claiming the most it may.
        let mut buf = BytesMut::new();
        buf.put_i32(10_000);
        buf.put_i32(PROTOCOL_VERSION_3_0);
        assert_eq!(decode_startup(&mut buf, &Limits::default()).unwrap(), None);
        assert!(buf.capacity() <= 2 * 10_000);
    }

    #[test]
    fn frame_reencodes_unchanged() {
        let original = frame_bytes(b'B', b"some body");
        let mut buf = original.clone();
        let frame = decode_frame(&mut buf, &limits()).unwrap().unwrap();
        let mut out = BytesMut::new();
        frame.encode(&mut out).unwrap();
        assert_eq!(out, original);
    }

    // ---- frontend messages ----

    #[test]
    fn frontend_messages_round_trip() {
        for message in all_frontend_messages() {
            let mut buf = BytesMut::new();
            message.encode(&mut buf).unwrap();
            assert_eq!(buf[0], message.tag());
            let parsed = parse_bytes(&buf, phase_for(&message)).unwrap_or_else(|e| panic!("{}: {e}", message.name()));
            assert_eq!(parsed, message);
        }
    }

    #[test]
    fn frontend_messages_match_postgres_protocol_encoding() {
        let mut ours = BytesMut::new();
        let mut theirs = BytesMut::new();
        for message in all_frontend_messages() {
            ours.clear();
            theirs.clear();
            message.encode(&mut ours).unwrap();
            match &message {
                FrontendMessage::Query(sql) => pg_frontend::query(sql, &mut theirs).unwrap(),
                FrontendMessage::Parse { name, query, param_types } => {
                    pg_frontend::parse(name, query, param_types.iter().map(|t| *t as Oid), &mut theirs).unwrap()
                }
                FrontendMessage::Bind { portal, statement, param_formats, params, result_formats } => {
                    let write = |value: &Option<Bytes>, buf: &mut BytesMut| {
                        Ok(match value {
                            None => IsNull::Yes,
                            Some(v) => {
                                buf.put_slice(v);
                                IsNull::No
                            }
                        })
                    };
                    let ok = pg_frontend::bind(
                        portal,
                        statement,
                        param_formats.iter().copied(),
                        params,
                        write,
                        result_formats.iter().copied(),
                        &mut theirs,
                    );
                    assert!(ok.is_ok());
                }
                FrontendMessage::Describe { kind, name } => pg_frontend::describe(kind.as_byte(), name, &mut theirs).unwrap(),
                FrontendMessage::Execute { portal, max_rows } => pg_frontend::execute(portal, *max_rows, &mut theirs).unwrap(),
                FrontendMessage::Close { kind, name } => pg_frontend::close(kind.as_byte(), name, &mut theirs).unwrap(),
                FrontendMessage::Sync => pg_frontend::sync(&mut theirs),
                FrontendMessage::Flush => pg_frontend::flush(&mut theirs),
                FrontendMessage::Terminate => pg_frontend::terminate(&mut theirs),
                FrontendMessage::Password(Password(p)) => pg_frontend::password_message(p, &mut theirs).unwrap(),
                FrontendMessage::SaslInitialResponse { mechanism, data: Some(data) } => {
                    pg_frontend::sasl_initial_response(mechanism, data, &mut theirs).unwrap()
                }
                // postgres-protocol cannot express "no initial response".
                FrontendMessage::SaslInitialResponse { data: None, .. } => continue,
                FrontendMessage::SaslResponse(data) => pg_frontend::sasl_response(data, &mut theirs).unwrap(),
                FrontendMessage::CopyData(data) => pg_frontend::CopyData::new(data.clone()).unwrap().write(&mut theirs),
                FrontendMessage::CopyDone => pg_frontend::copy_done(&mut theirs),
                FrontendMessage::CopyFail(reason) => pg_frontend::copy_fail(reason, &mut theirs).unwrap(),
            }
            assert_eq!(ours, theirs, "{}", message.name());
        }
    }

    #[test]
    fn malformed_frontend_messages_are_refused() {
        fn bind_body(build: impl FnOnce(&mut BytesMut)) -> BytesMut {
            let mut body = BytesMut::new();
            body.put_slice(b"portal\0stmt\0");
            build(&mut body);
            body
        }
        let cases: Vec<(&str, u8, BytesMut, Check)> = vec![
            (
                "Bind claims 65535 formats with 2 bytes of body",
                b'B',
                bind_body(|b| {
                    b.put_u16(u16::MAX);
                    b.put_i16(0);
                }),
                |e| matches!(e, ProtocolError::Truncated { needed: 131_070, remaining: 2, .. }),
            ),
            (
                "Bind claims 65535 params with 4 bytes of body",
                b'B',
                bind_body(|b| {
                    b.put_u16(0);
                    b.put_u16(u16::MAX);
                    b.put_i32(-1);
                }),
                |e| matches!(e, ProtocolError::Truncated { needed: 262_140, .. }),
            ),
            (
                "Bind parameter length -2",
                b'B',
                bind_body(|b| {
                    b.put_u16(0);
                    b.put_u16(1);
                    b.put_i32(-2);
                    b.put_u16(0);
                }),
                |e| matches!(e, ProtocolError::InvalidValue { field: "parameter length", value: -2, .. }),
            ),
            (
                "Bind parameter longer than the body",
                b'B',
                bind_body(|b| {
                    b.put_u16(0);
                    b.put_u16(1);
                    b.put_i32(i32::MAX);
                    b.put_slice(b"abc");
                }),
                |e| matches!(e, ProtocolError::Truncated { field: "parameter value", .. }),
            ),
            (
                "Bind format code 2",
                b'B',
                bind_body(|b| {
                    b.put_u16(1);
                    b.put_i16(2);
                    b.put_u16(0);
                    b.put_u16(0);
                }),
                |e| matches!(e, ProtocolError::InvalidValue { value: 2, .. }),
            ),
            (
                "Bind with 2 formats for 1 parameter",
                b'B',
                bind_body(|b| {
                    b.put_u16(2);
                    b.put_i16(0);
                    b.put_i16(1);
                    b.put_u16(1);
                    b.put_i32(-1);
                    b.put_u16(0);
                }),
                |e| matches!(e, ProtocolError::InvalidValue { field: "parameter format count", .. }),
            ),
            ("Bind missing result formats", b'B', bind_body(|b| b.put_u32(0)), |e| matches!(e, ProtocolError::Truncated { .. })),
            ("Bind unterminated portal", b'B', BytesMut::from(&b"portal"[..]), |e| {
                matches!(e, ProtocolError::Unterminated { field: "portal name", .. })
            }),
            (
                "Parse claims more types than fit",
                b'P',
                {
                    let mut b = BytesMut::from(&b"s\0SELECT 1\0"[..]);
                    b.put_u16(3);
                    b.put_u32(23);
                    b
                },
                |e| matches!(e, ProtocolError::Truncated { needed: 12, remaining: 4, .. }),
            ),
            ("Describe kind 'X'", b'D', BytesMut::from(&b"Xname\0"[..]), |e| {
                matches!(e, ProtocolError::InvalidValue { field: "target type", .. })
            }),
            ("Close empty", b'C', BytesMut::new(), |e| matches!(e, ProtocolError::Truncated { .. })),
            ("Query without NUL", b'Q', BytesMut::from(&b"SELECT 1"[..]), |e| matches!(e, ProtocolError::Unterminated { .. })),
            ("Query trailing bytes", b'Q', BytesMut::from(&b"SELECT 1\0x"[..]), |e| {
                matches!(e, ProtocolError::TrailingBytes { extra: 1, .. })
            }),
            ("Query non-UTF-8", b'Q', BytesMut::from(&b"SELECT '\xff'\0"[..]), |e| matches!(e, ProtocolError::InvalidUtf8 { .. })),
            ("Execute short", b'E', BytesMut::from(&b"p\0\0\0"[..]), |e| matches!(e, ProtocolError::Truncated { field: "row limit", .. })),
            ("Sync with a body", b'S', BytesMut::from(&b"x"[..]), |e| matches!(e, ProtocolError::TrailingBytes { .. })),
            ("Terminate with a body", b'X', BytesMut::from(&b"x"[..]), |e| matches!(e, ProtocolError::TrailingBytes { .. })),
            ("CopyFail unterminated", b'f', BytesMut::from(&b"oops"[..]), |e| matches!(e, ProtocolError::Unterminated { .. })),
            ("unknown tag", b'?', BytesMut::new(), |e| matches!(e, ProtocolError::UnknownMessage { .. })),
            ("FunctionCall", b'F', BytesMut::new(), |e| matches!(e, ProtocolError::UnsupportedMessage { .. })),
            ("password after auth", b'p', BytesMut::from(&b"pw\0"[..]), |e| {
                matches!(e, ProtocolError::UnexpectedMessage { phase: Phase::Ready, .. })
            }),
        ];
        for (name, tag, body, check) in cases {
            let err = parse_bytes(&frame_bytes(tag, &body), Phase::Ready).unwrap_err();
            assert!(check(&err), "{name}: got {err:?}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn authentication_messages_depend_on_phase() {
        let pw = frame_bytes(b'p', b"secret\0");
        assert_eq!(parse_bytes(&pw, Phase::AwaitingPassword).unwrap(), FrontendMessage::Password(Password(Bytes::from_static(b"secret"))));
        assert!(matches!(parse_bytes(&frame_bytes(b'p', b"secret"), Phase::AwaitingPassword), Err(ProtocolError::Unterminated { .. })));
        assert!(matches!(
            parse_bytes(&frame_bytes(b'p', b"secret\0\0"), Phase::AwaitingPassword),
            Err(ProtocolError::TrailingBytes { .. })
        ));
        assert!(!format!("{:?}", parse_bytes(&pw, Phase::AwaitingPassword).unwrap()).contains("secret"));

        let mut sasl = BytesMut::from(&b"SCRAM-SHA-256\0"[..]);
        sasl.put_i32(-2);
        let err = parse_bytes(&frame_bytes(b'p', &sasl), Phase::AwaitingSaslInitialResponse).unwrap_err();
        assert!(matches!(err, ProtocolError::InvalidValue { value: -2, .. }), "{err}");
        let mut sasl = BytesMut::from(&b"SCRAM-SHA-256\0"[..]);
        sasl.put_i32(100);
        sasl.put_slice(b"short");
        let err = parse_bytes(&frame_bytes(b'p', &sasl), Phase::AwaitingSaslInitialResponse).unwrap_err();
        assert!(matches!(err, ProtocolError::Truncated { needed: 100, remaining: 5, .. }), "{err}");

        // The raw SASLResponse body is the data, whatever it holds.
        assert_eq!(
            parse_bytes(&frame_bytes(b'p', b"\0\xff"), Phase::AwaitingSaslResponse).unwrap(),
            FrontendMessage::SaslResponse(Bytes::from_static(b"\0\xff"))
        );

        // During authentication, only 'p' and Terminate are allowed.
        for phase in [Phase::AwaitingPassword, Phase::AwaitingSaslInitialResponse, Phase::AwaitingSaslResponse] {
            let err = parse_bytes(&frame_bytes(b'Q', b"SELECT 1\0"), phase).unwrap_err();
            assert!(matches!(err, ProtocolError::UnexpectedMessage { .. }), "{err}");
            assert!(err.to_string().contains("'Q'"), "{err}");
            assert_eq!(parse_bytes(&frame_bytes(b'X', b""), phase).unwrap(), FrontendMessage::Terminate);
        }
    }

    #[test]
    fn encoding_refuses_what_the_protocol_cannot_carry() {
        let mut buf = BytesMut::from(&b"keep"[..]);
        let cases = [
            FrontendMessage::Query("SELECT 1\0; DROP TABLE x".into()),
            FrontendMessage::Parse { name: "a\0b".into(), query: String::new(), param_types: vec![] },
            FrontendMessage::Parse { name: String::new(), query: String::new(), param_types: vec![0; 70_000] },
            FrontendMessage::Bind {
                portal: String::new(),
                statement: String::new(),
                param_formats: vec![],
                params: vec![None; 65_536],
                result_formats: vec![],
            },
        ];
        for message in cases {
            let err = message.encode(&mut buf).unwrap_err();
            assert!(matches!(err, ProtocolError::Unencodable { .. }), "{err}");
            assert_eq!(&buf[..], b"keep", "nothing half-written");
        }
        let err = BackendMessage::ParameterStatus { name: "a\0b".into(), value: String::new() }.encode(&mut buf).unwrap_err();
        assert_eq!(err.sqlstate(), "XX000");
        assert_eq!(&buf[..], b"keep");
        let err = StartupMessage::Startup { params: params(&[("user", "a\0")]) }.encode(&mut buf).unwrap_err();
        assert!(matches!(err, ProtocolError::Unencodable { .. }), "{err}");
        assert_eq!(&buf[..], b"keep");
    }

    // ---- backend messages ----

    #[test]
    fn backend_messages_round_trip() {
        for message in all_backend_messages() {
            let mut buf = BytesMut::new();
            message.encode(&mut buf).unwrap();

            // postgres-protocol, which tokio-postgres uses, accepts every one.
            let mut theirs = buf.clone();
            let parsed = pg_backend::Message::parse(&mut theirs).unwrap().unwrap();
            assert!(theirs.is_empty());
            match (&message, parsed) {
                (BackendMessage::AuthenticationOk, pg_backend::Message::AuthenticationOk) => {}
                (BackendMessage::AuthenticationCleartextPassword, pg_backend::Message::AuthenticationCleartextPassword) => {}
                (BackendMessage::AuthenticationSasl { .. }, pg_backend::Message::AuthenticationSasl(_)) => {}
                (BackendMessage::AuthenticationSaslContinue(d), pg_backend::Message::AuthenticationSaslContinue(b)) => {
                    assert_eq!(b.data(), &d[..])
                }
                (BackendMessage::AuthenticationSaslFinal(d), pg_backend::Message::AuthenticationSaslFinal(b)) => {
                    assert_eq!(b.data(), &d[..])
                }
                (BackendMessage::ParameterStatus { name, value }, pg_backend::Message::ParameterStatus(b)) => {
                    assert_eq!(b.name().unwrap(), name);
                    assert_eq!(b.value().unwrap(), value);
                }
                (BackendMessage::BackendKeyData { process_id, secret_key }, pg_backend::Message::BackendKeyData(b)) => {
                    assert_eq!((b.process_id(), b.secret_key()), (*process_id, *secret_key));
                }
                (BackendMessage::ReadyForQuery(s), pg_backend::Message::ReadyForQuery(b)) => assert_eq!(b.status(), s.as_byte()),
                (BackendMessage::ErrorResponse(_), pg_backend::Message::ErrorResponse(_)) => {}
                (BackendMessage::NoticeResponse(_), pg_backend::Message::NoticeResponse(_)) => {}
                (ours, _) => panic!("{ours:?} decoded as something else"),
            }

            // And our own framing and parsers read back what we wrote.
            let frame = decode_frame(&mut buf, &limits()).unwrap().unwrap();
            assert!(buf.is_empty());
            assert_eq!(frame.tag, message.tag());
            match &message {
                BackendMessage::ErrorResponse(fields) | BackendMessage::NoticeResponse(fields) => {
                    assert_eq!(&ErrorFields::parse(&frame.body).unwrap(), fields)
                }
                BackendMessage::ReadyForQuery(status) => assert_eq!(TransactionStatus::from_ready_for_query(&frame).unwrap(), *status),
                BackendMessage::AuthenticationSasl { mechanisms } => {
                    let mut expected = BytesMut::new();
                    expected.put_i32(10);
                    for m in mechanisms {
                        expected.put_slice(m.as_bytes());
                        expected.put_u8(0);
                    }
                    expected.put_u8(0);
                    assert_eq!(frame.body, expected);
                }
                _ => {}
            }
        }
    }

    #[test]
    fn error_text_cannot_inject_fields() {
        let fields = ErrorFields::new(Severity::Error, "42000", "bad\0Cinjected").with_detail("x\0\0y");
        let mut buf = BytesMut::new();
        BackendMessage::ErrorResponse(fields).encode(&mut buf).unwrap();
        let frame = decode_frame(&mut buf, &limits()).unwrap().unwrap();
        let parsed = ErrorFields::parse(&frame.body).unwrap();
        assert_eq!(parsed.code, "42000");
        assert_eq!(parsed.message, "badCinjected");
        assert_eq!(parsed.detail.as_deref(), Some("xy"));
    }

    #[test]
    fn malformed_backend_bodies_are_refused() {
        assert!(ErrorFields::parse(&Bytes::from_static(b"SERROR\0")).is_err(), "no terminator");
        assert!(ErrorFields::parse(&Bytes::from_static(b"SERROR\0MNo code\0\0")).is_err(), "no code");
        assert!(ErrorFields::parse(&Bytes::from_static(b"SBOGUS\0C00000\0Mm\0\0")).is_err(), "unknown severity");
        assert!(ErrorFields::parse(&Bytes::from_static(b"SERREUR\0VERROR\0C00000\0Mm\0\0")).is_ok(), "'V' wins over localized 'S'");
        assert!(TransactionStatus::from_ready_for_query(&Frame::new(b'Z', &b"X"[..])).is_err());
        assert!(TransactionStatus::from_ready_for_query(&Frame::new(b'Z', &b"II"[..])).is_err());
        assert!(TransactionStatus::from_ready_for_query(&Frame::new(b'C', &b"I"[..])).is_err());
    }

    #[test]
    fn protocol_errors_become_fatal_error_responses() {
        let err = ProtocolError::UnsupportedProtocolVersion { major: 3, minor: 2 };
        let fields = err.to_error_fields();
        assert_eq!(fields.severity, Severity::Fatal);
        assert_eq!(fields.code, "0A000");
        assert!(fields.message.contains("3.2"));
        let err = ProtocolError::DuplicateParameter(quote(&"k".repeat(1000)));
        assert!(err.to_string().len() < 200, "client text is cut short: {err}");
    }

    // ---- fuzzing ----

    fn seeds() -> Vec<Vec<u8>> {
        let mut seeds = vec![];
        for message in all_frontend_messages() {
            let mut buf = BytesMut::new();
            message.encode(&mut buf).unwrap();
            seeds.push(buf.to_vec());
        }
        for message in all_backend_messages() {
            let mut buf = BytesMut::new();
            message.encode(&mut buf).unwrap();
            seeds.push(buf.to_vec());
        }
        for message in [
            StartupMessage::Startup { params: params(&[("user", "u"), ("database", "d"), ("application_name", "fuzz")]) },
            StartupMessage::SslRequest,
            StartupMessage::Cancel { process_id: 1, secret_key: 2 },
        ] {
            let mut buf = BytesMut::new();
            message.encode(&mut buf).unwrap();
            seeds.push(buf.to_vec());
        }
        seeds
    }

    fn mutate(rng: &mut StdRng, input: &mut Vec<u8>) {
        const INTERESTING: [i32; 10] = [0, 3, 4, 5, 8, -1, -2, i32::MAX, i32::MIN, 10_000];
        for _ in 0..rng.random_range(1..4) {
            let len = input.len();
            match rng.random_range(0..7) {
                0 if len > 0 => input[rng.random_range(0..len)] ^= 1 << rng.random_range(0..8),
                1 if len > 0 => input[rng.random_range(0..len)] = rng.random(),
                2 => {
                    let at = rng.random_range(0..=len);
                    let value = INTERESTING[rng.random_range(0..INTERESTING.len())];
                    input.splice(at..at, value.to_be_bytes());
                }
                3 if len >= 4 => {
                    let at = rng.random_range(0..=len - 4);
                    let value = INTERESTING[rng.random_range(0..INTERESTING.len())];
                    input[at..at + 4].copy_from_slice(&value.to_be_bytes());
                }
                4 if len >= 2 => {
                    // Counts are 16-bit: make one huge.
                    let at = rng.random_range(0..=len - 2);
                    input[at..at + 2].copy_from_slice(&[0xff, 0xff]);
                }
                5 if len > 0 => input.truncate(rng.random_range(0..len)),
                _ => {
                    let at = rng.random_range(0..=len);
                    let extra: Vec<u8> = (0..rng.random_range(1..8)).map(|_| rng.random()).collect();
                    input.splice(at..at, extra);
                }
            }
        }
    }

    /// Runs every decoder over `input`; returns how many frontend messages parsed.
    fn exercise(input: &[u8], limits: &Limits) -> usize {
        let mut parsed = 0;
        let bound = 2 * input.len() + 2 * limits.max_read_ahead + 64;

        let mut buf = BytesMut::from(input);
        let _ = decode_startup(&mut buf, limits);
        assert!(buf.capacity() <= bound, "startup capacity {} for {} input bytes", buf.capacity(), input.len());

        let mut buf = BytesMut::from(input);
        while let Ok(Some(frame)) = decode_frame(&mut buf, limits) {
            for phase in PHASES {
                if let Ok(message) = parse_frontend(&frame, phase) {
                    parsed += 1;
                    // Whatever parses re-encodes to the same frame.
                    let mut out = BytesMut::new();
                    message.encode(&mut out).unwrap();
                    let mut again = BytesMut::new();
                    frame.encode(&mut again).unwrap();
                    assert_eq!(out, again, "{message:?}");
                }
            }
            let _ = ErrorFields::parse(&frame.body);
            let _ = TransactionStatus::from_ready_for_query(&frame);
        }
        assert!(buf.capacity() <= bound, "frame capacity {} for {} input bytes", buf.capacity(), input.len());
        parsed
    }

    #[test]
    fn fuzz_decoders_never_panic_and_stay_bounded() {
        let mut rng = StdRng::seed_from_u64(0x00c0_4d0e);
        let seeds = seeds();
        let limits = Limits { max_message_bytes: 1 << 20, ..Limits::default() };
        let tags = b"QPBDECSHXpdcfFRSKZEN?\0";
        let mut parsed = 0;
        for i in 0..100_000 {
            let input = match i % 4 {
                // Pure noise.
                0 => {
                    let mut noise = vec![0u8; rng.random_range(0..64)];
                    rng.fill_bytes(&mut noise);
                    noise
                }
                // Well-framed noise, so every body parser sees random bodies.
                1 => {
                    let mut body = vec![0u8; rng.random_range(0..48)];
                    rng.fill_bytes(&mut body);
                    frame_bytes(tags[rng.random_range(0..tags.len())], &body).to_vec()
                }
                // Mutated valid messages.
                _ => {
                    let mut input = seeds[rng.random_range(0..seeds.len())].clone();
                    mutate(&mut rng, &mut input);
                    input
                }
            };
            parsed += exercise(&input, &limits);
        }
        // The inputs are not all rejected at the door: a good share reach and pass the parsers.
        assert!(parsed > 5_000, "only {parsed} messages parsed");
    }

    // ---- a real client ----

    mod tokio_postgres_client {
        use super::*;
        use crate::scram::{MECHANISM, MockAuth, ScramServer, ScramVerifier};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::{TcpListener, TcpStream};

        async fn read<T>(
            sock: &mut TcpStream,
            buf: &mut BytesMut,
            mut decode: impl FnMut(&mut BytesMut) -> Result<Option<T>, ProtocolError>,
        ) -> Result<T, String> {
            loop {
                if let Some(item) = decode(buf).map_err(|e| e.to_string())? {
                    return Ok(item);
                }
                if sock.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
                    return Err("client hung up".into());
                }
            }
        }

        async fn send(sock: &mut TcpStream, messages: &[BackendMessage]) {
            let mut out = BytesMut::new();
            for message in messages {
                message.encode(&mut out).unwrap();
            }
            sock.write_all(&out).await.unwrap();
        }

        /// A minimal server on our framing and SCRAM: authenticates one client, answers every
        /// query with an error, and reports the frontend messages it saw.
        async fn serve_one(listener: TcpListener, user: &str, verifier: ScramVerifier) -> Result<Vec<FrontendMessage>, String> {
            let limits = Limits::default();
            let (mut sock, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let mut buf = BytesMut::new();
            let startup = loop {
                match read(&mut sock, &mut buf, |b| decode_startup(b, &limits)).await? {
                    StartupMessage::SslRequest | StartupMessage::GssEncRequest => sock.write_all(b"N").await.map_err(|e| e.to_string())?,
                    message @ StartupMessage::Startup { .. } => break message,
                    other => return Err(format!("unexpected {other:?}")),
                }
            };
            let client_user = startup.param("user").unwrap_or_default().to_owned();
            let mut scram = if client_user == user {
                ScramServer::new(&verifier)
            } else {
                ScramServer::new_for_unknown_user(&client_user, &MockAuth::random(verifier.iterations()))
            };
            send(&mut sock, &[BackendMessage::AuthenticationSasl { mechanisms: vec![MECHANISM.into()] }]).await;

            let frame = read(&mut sock, &mut buf, |b| decode_frame(b, &limits)).await?;
            let FrontendMessage::SaslInitialResponse { mechanism, data: Some(data) } =
                parse_frontend(&frame, Phase::AwaitingSaslInitialResponse).map_err(|e| e.to_string())?
            else {
                return Err("expected SASLInitialResponse".into());
            };
            assert_eq!(mechanism, MECHANISM);
            let server_first = scram.client_first(&data).map_err(|e| e.to_string())?;
            send(&mut sock, &[BackendMessage::AuthenticationSaslContinue(server_first.into())]).await;

            let frame = read(&mut sock, &mut buf, |b| decode_frame(b, &limits)).await?;
            let FrontendMessage::SaslResponse(data) = parse_frontend(&frame, Phase::AwaitingSaslResponse).map_err(|e| e.to_string())?
            else {
                return Err("expected SASLResponse".into());
            };
            match scram.client_final(&data) {
                Ok(server_final) => {
                    send(
                        &mut sock,
                        &[
                            BackendMessage::AuthenticationSaslFinal(server_final.into()),
                            BackendMessage::AuthenticationOk,
                            BackendMessage::ParameterStatus { name: "server_version".into(), value: "16.0".into() },
                            BackendMessage::ParameterStatus { name: "client_encoding".into(), value: "UTF8".into() },
                            BackendMessage::BackendKeyData { process_id: 1, secret_key: 2 },
                            BackendMessage::ReadyForQuery(TransactionStatus::Idle),
                        ],
                    )
                    .await
                }
                Err(e) => {
                    let message = format!("password authentication failed for user \"{client_user}\"");
                    send(&mut sock, &[BackendMessage::ErrorResponse(ErrorFields::new(Severity::Fatal, e.sqlstate(), message))]).await;
                    return Ok(vec![]);
                }
            }

            let mut seen = vec![];
            loop {
                let frame = read(&mut sock, &mut buf, |b| decode_frame(b, &limits)).await?;
                let message = parse_frontend(&frame, Phase::Ready).map_err(|e| e.to_string())?;
                seen.push(message.clone());
                match message {
                    FrontendMessage::Query(sql) => {
                        let error = ErrorFields::new(Severity::Error, "0A000", format!("not implemented: {sql}"))
                            .with_hint("this is a test server");
                        send(&mut sock, &[BackendMessage::ErrorResponse(error), BackendMessage::ReadyForQuery(TransactionStatus::Idle)])
                            .await;
                    }
                    FrontendMessage::Terminate => return Ok(seen),
                    other => return Err(format!("unexpected {other:?}")),
                }
            }
        }

        async fn connect(user: &str, password: &str) -> (Result<(), tokio_postgres::Error>, Result<Vec<FrontendMessage>, String>) {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let verifier = ScramVerifier::from_password("s3cret pässword", 64);
            let server = tokio::spawn(async move { serve_one(listener, "alice", verifier).await });
            let config = format!("host=127.0.0.1 port={port} user={user} password='{password}' dbname=app");
            let client = match tokio_postgres::connect(&config, tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    let connection = tokio::spawn(connection);
                    let err = client.simple_query("SELECT 1").await.unwrap_err();
                    let db = err.as_db_error().expect("a server error");
                    assert_eq!(db.code().code(), "0A000");
                    assert_eq!(db.message(), "not implemented: SELECT 1");
                    assert_eq!(db.hint(), Some("this is a test server"));
                    drop(client);
                    connection.await.unwrap().unwrap();
                    Ok(())
                }
                Err(e) => Err(e),
            };
            (client, server.await.unwrap())
        }

        #[tokio::test]
        async fn authenticates_and_speaks_to_tokio_postgres() {
            let (client, server) = connect("alice", "s3cret pässword").await;
            client.unwrap();
            assert_eq!(server.unwrap(), [FrontendMessage::Query("SELECT 1".into()), FrontendMessage::Terminate]);
        }

        #[tokio::test]
        async fn wrong_password_and_unknown_user_look_the_same() {
            let mut errors = vec![];
            for (user, password) in [("alice", "wrong"), ("mallory", "s3cret pässword")] {
                let (client, server) = connect(user, password).await;
                assert_eq!(server.unwrap(), []);
                let err = client.unwrap_err();
                let db = err.as_db_error().expect("a server error");
                assert_eq!(db.code().code(), "28P01");
                assert_eq!(db.severity(), "FATAL");
                errors.push(db.message().replace(user, "USER"));
            }
            assert_eq!(errors[0], errors[1]);
        }
    }
}
