//! The read side of a connection: a buffer shared by the head parser and the
//! request body, and a strict decoder for `Content-Length` and `chunked`
//! bodies. The body streams to the worker as it arrives; nothing is buffered
//! beyond one read.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::tcp::OwnedReadHalf;

use super::parse::Framing;

const READ_CHUNK: usize = 16 * 1024;
/// Longest chunk-size line (size plus extensions).
const MAX_CHUNK_LINE: usize = 1024;

/// Why a request body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("malformed chunked encoding: {0}")]
    Malformed(&'static str),
    #[error("the connection closed before the request body was complete")]
    Incomplete,
    #[error("reading the request body failed")]
    Io,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoder {
    Done,
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers { seen: usize },
    Failed,
}

pub(crate) struct ConnReader {
    io: OwnedReadHalf,
    pub buf: BytesMut,
    decoder: Decoder,
    /// Which request's body `decoder` belongs to. A [`RequestBody`] of an
    /// earlier request (a worker still running after its response) sees its
    /// body as ended and can never read a later request's bytes.
    generation: u64,
    error: Option<BodyError>,
    max_trailer_bytes: usize,
}

pub(crate) type SharedReader = Arc<Mutex<ConnReader>>;

pub(crate) fn lock(reader: &SharedReader) -> MutexGuard<'_, ConnReader> {
    reader.lock().unwrap_or_else(|p| p.into_inner())
}

impl ConnReader {
    pub fn new(io: OwnedReadHalf, max_trailer_bytes: usize) -> Self {
        Self { io, buf: BytesMut::with_capacity(READ_CHUNK), decoder: Decoder::Done, generation: 0, error: None, max_trailer_bytes }
    }

    /// Reads more bytes into the buffer. `Ok(0)` at end of stream.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let mut tmp = [0u8; READ_CHUNK];
        let mut rb = ReadBuf::new(&mut tmp);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        self.buf.extend_from_slice(rb.filled());
        Poll::Ready(Ok(rb.filled().len()))
    }

    /// Starts decoding a body with `framing`; returns the body's generation.
    pub fn start_body(&mut self, framing: Framing) -> u64 {
        self.generation += 1;
        self.error = None;
        self.decoder = match framing {
            Framing::None | Framing::Length(0) => Decoder::Done,
            Framing::Length(n) => Decoder::Length(n),
            Framing::Chunked => Decoder::ChunkSize,
        };
        self.generation
    }

    pub fn body_done(&self) -> bool {
        self.decoder == Decoder::Done
    }

    /// Gives up on the current body: the connection is closing, and what the
    /// client still sends is read only to be discarded. A worker still
    /// reading the body gets an error, never a clean end of a body cut short,
    /// and never polls the socket the discarding reads.
    pub fn abandon_body(&mut self) {
        if self.decoder != Decoder::Done {
            self.decoder = Decoder::Failed;
            self.error.get_or_insert(BodyError::Incomplete);
        }
    }

    /// Reads what the socket holds and throws it away, with what the buffer
    /// held. `Ok(0)` at end of stream.
    pub fn poll_discard(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        self.buf.clear();
        let read = ready!(self.poll_fill(cx));
        self.buf.clear();
        Poll::Ready(read)
    }

    /// The error that stopped the body, if any.
    pub fn body_error(&self) -> Option<BodyError> {
        self.error.clone()
    }

    fn fail(&mut self, e: BodyError) -> Poll<Option<Result<Bytes, BodyError>>> {
        self.decoder = Decoder::Failed;
        self.error = Some(e.clone());
        Poll::Ready(Some(Err(e)))
    }

    /// Fills the buffer or fails the body at end of stream.
    fn fill_or_fail(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BodyError>> {
        match ready!(self.poll_fill(cx)) {
            Ok(0) => Poll::Ready(Err(BodyError::Incomplete)),
            Ok(_) => Poll::Ready(Ok(())),
            Err(_) => Poll::Ready(Err(BodyError::Io)),
        }
    }

    /// The next piece of the body: data, `None` at its end, or an error.
    pub fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyError>>> {
        loop {
            match self.decoder {
                Decoder::Done => return Poll::Ready(None),
                Decoder::Failed => return Poll::Ready(Some(Err(self.error.clone().unwrap_or(BodyError::Io)))),
                Decoder::Length(remaining) | Decoder::ChunkData(remaining) => {
                    if self.buf.is_empty() {
                        if let Err(e) = ready!(self.fill_or_fail(cx)) {
                            return self.fail(e);
                        }
                        continue;
                    }
                    let n = remaining.min(self.buf.len() as u64) as usize;
                    let data = self.buf.split_to(n).freeze();
                    let left = remaining - n as u64;
                    self.decoder = match (self.decoder, left) {
                        (Decoder::Length(_), 0) => Decoder::Done,
                        (Decoder::Length(_), l) => Decoder::Length(l),
                        (_, 0) => Decoder::ChunkDataEnd,
                        (_, l) => Decoder::ChunkData(l),
                    };
                    return Poll::Ready(Some(Ok(data)));
                }
                Decoder::ChunkSize => match find_crlf(&self.buf) {
                    Some(end) => {
                        let line = self.buf.split_to(end + 2);
                        match parse_chunk_size(&line[..end]) {
                            Ok(0) => self.decoder = Decoder::Trailers { seen: 0 },
                            Ok(n) => self.decoder = Decoder::ChunkData(n),
                            Err(why) => return self.fail(BodyError::Malformed(why)),
                        }
                    }
                    None if self.buf.len() > MAX_CHUNK_LINE => return self.fail(BodyError::Malformed("chunk-size line too long")),
                    None if self.buf.contains(&b'\n') => return self.fail(BodyError::Malformed("chunk-size line must end with CRLF")),
                    None => {
                        if let Err(e) = ready!(self.fill_or_fail(cx)) {
                            return self.fail(e);
                        }
                    }
                },
                Decoder::ChunkDataEnd => {
                    if self.buf.len() < 2 {
                        if let Err(e) = ready!(self.fill_or_fail(cx)) {
                            return self.fail(e);
                        }
                        continue;
                    }
                    if &self.buf[..2] != b"\r\n" {
                        return self.fail(BodyError::Malformed("chunk data is not followed by CRLF"));
                    }
                    let _ = self.buf.split_to(2);
                    self.decoder = Decoder::ChunkSize;
                }
                Decoder::Trailers { seen } => match find_crlf(&self.buf) {
                    Some(0) => {
                        let _ = self.buf.split_to(2);
                        self.decoder = Decoder::Done;
                    }
                    Some(end) => {
                        let line = self.buf.split_to(end + 2);
                        let seen = seen + line.len();
                        if seen > self.max_trailer_bytes {
                            return self.fail(BodyError::Malformed("trailers too large"));
                        }
                        if !is_field_line(&line[..end]) {
                            return self.fail(BodyError::Malformed("invalid trailer field"));
                        }
                        // Trailers are read and dropped: no worker relies on them.
                        self.decoder = Decoder::Trailers { seen };
                    }
                    None if seen + self.buf.len() > self.max_trailer_bytes => return self.fail(BodyError::Malformed("trailers too large")),
                    None => {
                        if let Err(e) = ready!(self.fill_or_fail(cx)) {
                            return self.fail(e);
                        }
                    }
                },
            }
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// `1*HEXDIG [ chunk-ext ]`, without the CRLF.
fn parse_chunk_size(line: &[u8]) -> Result<u64, &'static str> {
    let (size, ext) = match line.iter().position(|&b| b == b';') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    };
    let size = size.trim_ascii_end();
    if size.is_empty() {
        return Err("missing chunk size");
    }
    if size.len() > 15 {
        return Err("chunk size too large");
    }
    if !size.iter().all(u8::is_ascii_hexdigit) {
        return Err("chunk size is not hexadecimal");
    }
    if let Some(ext) = ext
        && ext.iter().any(|&b| b.is_ascii_control() && b != b'\t')
    {
        return Err("control character in chunk extension");
    }
    let text = std::str::from_utf8(size).map_err(|_| "chunk size is not hexadecimal")?;
    u64::from_str_radix(text, 16).map_err(|_| "chunk size is not hexadecimal")
}

fn is_field_line(line: &[u8]) -> bool {
    match line.iter().position(|&b| b == b':') {
        Some(colon) if colon > 0 => {
            line[..colon].iter().all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
                && line[colon + 1..].iter().all(|&b| b == b'\t' || !b.is_ascii_control())
        }
        _ => false,
    }
}

/// The request body handed to the worker. Reads straight from the
/// connection; the connection gets the reader back when the request ends.
pub(crate) struct RequestBody {
    reader: SharedReader,
    generation: u64,
}

impl RequestBody {
    pub fn new(reader: SharedReader, generation: u64) -> Self {
        Self { reader, generation }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut reader = lock(&self.reader);
        if reader.generation != self.generation {
            return Poll::Ready(None);
        }
        reader.poll_body(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        let reader = lock(&self.reader);
        reader.generation != self.generation || reader.body_done()
    }

    fn size_hint(&self) -> SizeHint {
        let reader = lock(&self.reader);
        if reader.generation != self.generation {
            return SizeHint::with_exact(0);
        }
        match reader.decoder {
            Decoder::Done => SizeHint::with_exact(0),
            Decoder::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size(b"1a"), Ok(26));
        assert_eq!(parse_chunk_size(b"0;name=value"), Ok(0));
        assert!(parse_chunk_size(b"").is_err());
        assert!(parse_chunk_size(b"zz").is_err());
        assert!(parse_chunk_size(b"-1").is_err());
        assert!(parse_chunk_size(b"0x10").is_err());
        assert!(parse_chunk_size(b"ffffffffffffffffff").is_err());
        assert!(parse_chunk_size(b" 5").is_err());
    }

    #[test]
    fn field_lines() {
        assert!(is_field_line(b"X-Sum: 5"));
        assert!(!is_field_line(b": 5"));
        assert!(!is_field_line(b"no colon"));
    }

    /// Feeds well-formed and mutated chunked bodies through a real socket and
    /// checks that decoding never panics or hangs, that a clean body decodes
    /// to exactly its data, and that a damaged one either fails or yields no
    /// more bytes than were sent.
    #[tokio::test]
    async fn chunked_bodies_decode_exactly_or_fail() {
        use super::super::parse::tests::XorShift;
        use tokio::io::AsyncWriteExt;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        for round in 0..300 {
            let data: Vec<u8> = (0..rng.below(3000)).map(|_| rng.below(256) as u8).collect();
            let mut wire = Vec::new();
            let mut rest = &data[..];
            while !rest.is_empty() {
                let n = 1 + rng.below(rest.len().min(700));
                wire.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                wire.extend_from_slice(&rest[..n]);
                wire.extend_from_slice(b"\r\n");
                rest = &rest[n..];
            }
            wire.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
            let damaged = round % 2 == 1;
            if damaged {
                for _ in 0..1 + rng.below(3) {
                    let at = rng.below(wire.len());
                    wire[at] = b"\r\n;0zZ \x00"[rng.below(8)];
                }
            }

            let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let (read, _write) = server.into_split();
            let reader: SharedReader = Arc::new(Mutex::new(ConnReader::new(read, 4096)));
            let generation = lock(&reader).start_body(Framing::Chunked);
            let mut body = RequestBody::new(reader.clone(), generation);
            client.write_all(&wire).await.unwrap();
            drop(client); // end of stream after the body

            let mut got = Vec::new();
            let mut failed = false;
            loop {
                let frame =
                    tokio::time::timeout(std::time::Duration::from_secs(5), std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)))
                        .await
                        .expect("the decoder never hangs on a closed stream");
                match frame {
                    None => break,
                    Some(Ok(f)) => got.extend_from_slice(f.data_ref().unwrap()),
                    Some(Err(_)) => {
                        failed = true;
                        break;
                    }
                }
            }
            if damaged {
                assert!(failed || got.len() <= wire.len(), "round {round}");
            } else {
                assert!(!failed, "round {round}: a well-formed body failed");
                assert_eq!(got, data, "round {round}");
                assert!(lock(&reader).body_done());
            }
        }
    }
}
