//! Writing a response: framing chosen by the server (never by the worker),
//! hop-by-hop headers dropped, `x-request-id` and `date` always present.

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, StatusCode, header};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};

/// Headers that describe one connection hop, which a worker may not set.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::HeaderName::from_static("keep-alive"),
];

/// What the request said about the response it can take.
pub(crate) struct ResponseContext<'a> {
    pub method: &'a Method,
    pub http10: bool,
    pub keep_alive: bool,
    pub request_id: &'a str,
    /// Longest a single write may stall on a client that does not read.
    pub write_timeout: Duration,
}

/// How writing went.
#[derive(Debug, Clone)]
pub(crate) struct Written {
    pub status: StatusCode,
    pub body_bytes: u64,
    /// The whole response reached the socket.
    pub complete: bool,
    /// The connection may serve another request.
    pub reusable: bool,
    pub error: Option<String>,
}

enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

pub(crate) async fn write_response<W, B>(w: &mut BufWriter<W>, response: http::Response<B>, cx: &ResponseContext<'_>) -> Written
where
    W: AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let (parts, mut body) = response.into_parts();
    let status = parts.status;
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    let no_body_status = status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body_status || cx.method == Method::HEAD {
        Framing::Empty
    } else if let Some(n) = declared.or_else(|| body.size_hint().exact()) {
        Framing::Length(n)
    } else if cx.http10 {
        Framing::UntilClose
    } else {
        Framing::Chunked
    };
    let mut keep_alive = cx.keep_alive && !matches!(framing, Framing::UntilClose);

    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    write_headers(&mut head, &parts.headers);
    push_header(&mut head, "x-request-id", cx.request_id.as_bytes());
    push_header(&mut head, "date", httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    match framing {
        Framing::Length(n) => push_header(&mut head, "content-length", n.to_string().as_bytes()),
        Framing::Empty if cx.method == Method::HEAD => {
            if let Some(n) = declared {
                push_header(&mut head, "content-length", n.to_string().as_bytes());
            }
        }
        Framing::Chunked => push_header(&mut head, "transfer-encoding", b"chunked"),
        _ => {}
    }
    if !keep_alive {
        push_header(&mut head, "connection", b"close");
    }
    head.extend_from_slice(b"\r\n");

    let mut written = Written { status, body_bytes: 0, complete: false, reusable: false, error: None };
    if let Err(e) = timed(cx.write_timeout, w.write_all(&head)).await {
        written.error = Some(e);
        return written;
    }

    let result = match framing {
        Framing::Empty => {
            // A HEAD response carries no body, whatever the worker produced;
            // it is dropped (and the worker stopped) with `body`.
            Ok(())
        }
        _ => copy_body(w, &mut body, &framing, &mut written.body_bytes, cx.write_timeout).await,
    };
    if let Err(e) = result {
        written.error = Some(e);
        keep_alive = false;
    }
    if written.error.is_none() {
        match timed(cx.write_timeout, w.flush()).await {
            Ok(()) => written.complete = true,
            Err(e) => written.error = Some(e),
        }
    }
    written.reusable = keep_alive && written.complete;
    written
}

async fn copy_body<W, B>(
    w: &mut BufWriter<W>,
    body: &mut B,
    framing: &Framing,
    sent: &mut u64,
    write_timeout: Duration,
) -> Result<(), String>
where
    W: AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    loop {
        let frame = {
            let mut next = pin!(body.frame());
            // Flush what is buffered only when the worker has nothing more
            // ready, so a small response leaves in one write.
            match std::future::poll_fn(|cx| Poll::Ready(next.as_mut().poll(cx))).await {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    timed(write_timeout, w.flush()).await?;
                    next.await
                }
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // trailers are not forwarded
            },
        };
        if data.is_empty() {
            continue;
        }
        *sent += data.len() as u64;
        match framing {
            Framing::Length(n) if *sent > *n => return Err(format!("the body is longer than its Content-Length of {n}")),
            Framing::Chunked => {
                timed(write_timeout, w.write_all(format!("{:x}\r\n", data.len()).as_bytes())).await?;
                timed(write_timeout, w.write_all(&data)).await?;
                timed(write_timeout, w.write_all(b"\r\n")).await?;
                continue;
            }
            _ => {}
        }
        timed(write_timeout, w.write_all(&data)).await?;
    }
    match framing {
        Framing::Length(n) if *sent != *n => Err(format!("the body ended after {sent} of its {n} bytes")),
        Framing::Chunked => timed(write_timeout, w.write_all(b"0\r\n\r\n")).await,
        _ => Ok(()),
    }
}

async fn timed<F: Future<Output = std::io::Result<()>>>(limit: Duration, f: F) -> Result<(), String> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write failed: {e}")),
        Err(_) => Err("write timed out: the client is not reading".to_string()),
    }
}

fn write_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        if HOP_BY_HOP.contains(name) || name == header::CONTENT_LENGTH || name == "x-request-id" || name == header::DATE {
            continue;
        }
        push_header(out, name.as_str(), value.as_bytes());
    }
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}
