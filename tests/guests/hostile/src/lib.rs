//! A deliberately badly behaved `wasi:http` guest.
//!
//! The host's tests drive it through the request path; each path triggers one
//! behaviour (a trap, an endless loop, runaway memory, a huge body, ...).
//! `tests/guests/README.md` lists the paths and is the contract the tests
//! rely on.

use core::hint::black_box;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use wasi::clocks::{monotonic_clock, wall_clock};
use wasi::exports::http::incoming_handler::Guest;
use wasi::http::outgoing_handler;
use wasi::http::types::{
    ErrorCode, Fields, FutureIncomingResponse, IncomingBody, IncomingRequest, IncomingResponse, Method, OutgoingBody, OutgoingRequest,
    OutgoingResponse, ResponseOutparam, Scheme,
};
use wasi::io::streams::{OutputStream, StreamError};

/// Largest slice handed to `blocking_write_and_flush` in one call.
const BLOCKING_WRITE_MAX: usize = 4096;
/// Size of each write for `/big` and `/big-declared`.
const BIG_WRITE: usize = 64 * 1024;
const MIB: usize = 1024 * 1024;
const PAGE: usize = 4096;

static COUNTER: AtomicU64 = AtomicU64::new(0);

struct Hostile;

impl Guest for Hostile {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let target = request.path_with_query().unwrap_or_else(|| "/".to_string());
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path, query),
            None => (target.as_str(), ""),
        };

        match path {
            "/echo" => echo(&request, &target, out),
            "/consume" => consume(&request, out),
            "/late-read" => late_read(&request, out),
            "/escape" => escape(out),
            "/stream" => stream(query, out),
            "/counter" => counter(out),
            "/loop" => spin_forever(),
            "/oom" => exhaust_memory(),
            "/recurse" => {
                black_box(recurse(0));
            }
            "/trap" => core::arch::wasm32::unreachable(),
            "/panic-after-headers" => trap_after_headers(out),
            "/big" => big(query, false, out),
            "/big-declared" => big(query, true, out),
            "/sleep" => sleep(query, out),
            "/spin" => spin(query, out),
            "/clock" => clock(out),
            "/stdout" => print_stdio(out),
            "/spam" => spam(query, out),
            "/status" => status(query, out),
            "/headers" => custom_header(out),
            "/outbound" => outbound(out),
            "/fetch" => fetch(&request, query, out),
            "/fetch-n" => fetch_n(query, out),
            "/hold" => hold(query, out),
            "/bodies" => bodies(query, out),
            "/fields" => fields(query, out),
            _ => respond(out, 200, &[], b"ok from hostile"),
        }
    }
}

wasi::http::proxy::export!(Hostile);

// ---------------------------------------------------------------------------
// Behaviours
// ---------------------------------------------------------------------------

/// Mirrors the method, the path and the `x-test-*` headers, and streams the
/// request body back chunk by chunk without buffering it.
fn echo(request: &IncomingRequest, target: &str, out: ResponseOutparam) {
    let headers = Fields::new();
    let method = request.method();
    append(&headers, "x-seen-method", method_name(&method).as_bytes());
    append(&headers, "x-seen-path", target.as_bytes());
    for (name, value) in request.headers().entries() {
        let lower = name.to_ascii_lowercase();
        if lower.starts_with("x-test-") {
            append(&headers, &name, &value);
        } else if lower == "x-request-id" {
            append(&headers, "x-seen-request-id", &value);
        }
    }

    let incoming = request.consume().expect("request body is consumed once");
    let input = incoming.stream().expect("request body stream is taken once");
    let (body, output) = start(out, 200, headers);

    loop {
        let chunk = match input.blocking_read(64 * 1024) {
            Ok(chunk) => chunk,
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(_)) => return,
        };
        if write_blocking(&output, &chunk).is_err() {
            return;
        }
    }
    drop(input);
    drop(IncomingBody::finish(incoming));
    finish(body, output);
}

/// Reads the whole request body before answering with its length, so the
/// host has not sent a response head when a body limit is hit.
fn consume(request: &IncomingRequest, out: ResponseOutparam) {
    let incoming = request.consume().expect("request body is consumed once");
    let input = incoming.stream().expect("request body stream is taken once");
    let mut total: u64 = 0;
    loop {
        match input.blocking_read(64 * 1024) {
            Ok(chunk) => total += chunk.len() as u64,
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(_)) => {
                drop(input);
                return respond(out, 400, &[], b"reading the body failed");
            }
        }
    }
    drop(input);
    drop(IncomingBody::finish(incoming));
    respond(out, 200, &[], total.to_string().as_bytes());
}

/// Tries every way out of the sandbox that WASI offers and reports what
/// happened, one `name=result` per line: environment, arguments, preopened
/// directories, a TCP socket, a UDP socket and a name lookup.
fn escape(out: ResponseOutparam) {
    use wasi::sockets::network::{IpAddress, IpAddressFamily, IpSocketAddress, Ipv4SocketAddress};
    let mut report = String::new();
    report.push_str(&format!("env={}\n", wasi::cli::environment::get_environment().len()));
    report.push_str(&format!("args={}\n", wasi::cli::environment::get_arguments().len()));
    report.push_str(&format!("preopens={}\n", wasi::filesystem::preopens::get_directories().len()));
    let network = wasi::sockets::instance_network::instance_network();
    let tcp = match wasi::sockets::tcp_create_socket::create_tcp_socket(IpAddressFamily::Ipv4) {
        Err(code) => format!("denied {code:?}"),
        Ok(socket) => {
            let target = IpSocketAddress::Ipv4(Ipv4SocketAddress { port: 80, address: (127, 0, 0, 1) });
            match socket.start_connect(&network, target) {
                Err(code) => format!("denied {code:?}"),
                Ok(()) => {
                    socket.subscribe().block();
                    match socket.finish_connect() {
                        Err(code) => format!("denied {code:?}"),
                        Ok(_) => "CONNECTED".to_string(),
                    }
                }
            }
        }
    };
    report.push_str(&format!("tcp={tcp}\n"));
    let udp = match wasi::sockets::udp_create_socket::create_udp_socket(IpAddressFamily::Ipv4) {
        Err(code) => format!("denied {code:?}"),
        Ok(_) => "CREATED".to_string(),
    };
    report.push_str(&format!("udp={udp}\n"));
    let dns = match wasi::sockets::ip_name_lookup::resolve_addresses(&network, "localhost") {
        Err(code) => format!("denied {code:?}"),
        Ok(stream) => {
            stream.subscribe().block();
            match stream.resolve_next_address() {
                Err(code) => format!("denied {code:?}"),
                Ok(Some(IpAddress::Ipv4(a))) => format!("RESOLVED {a:?}"),
                Ok(Some(IpAddress::Ipv6(a))) => format!("RESOLVED {a:?}"),
                Ok(None) => "denied empty".to_string(),
            }
        }
    };
    report.push_str(&format!("dns={dns}\n"));
    respond(out, 200, &[], report.as_bytes());
}

/// Answers at once, then keeps running: after `ms` (default 300) it reads
/// whatever its request body stream still yields and prints it to stdout.
/// A host that lets a finished request's body reach the next request on the
/// same connection would print that request's bytes here.
fn late_read(request: &IncomingRequest, out: ResponseOutparam) {
    let query = request.path_with_query().unwrap_or_default();
    let ms = query.split_once('?').and_then(|(_, q)| param_u64(q, "ms")).unwrap_or(300);
    let incoming = request.consume().expect("request body is consumed once");
    let input = incoming.stream().expect("request body stream is taken once");
    respond(out, 200, &[], b"answered early");
    wasi::clocks::monotonic_clock::subscribe_duration(ms * 1_000_000).block();
    let mut seen = Vec::new();
    while let Ok(chunk) = input.blocking_read(64 * 1024) {
        seen.extend_from_slice(&chunk);
    }
    println!("late-read saw {} bytes: {}", seen.len(), String::from_utf8_lossy(&seen));
}

/// `chunks` chunks of `size` bytes of `a`, flushed one at a time.
fn stream(query: &str, out: ResponseOutparam) {
    let chunks = param_u64(query, "chunks").unwrap_or(16);
    let size = param_u64(query, "size").unwrap_or(1024) as usize;
    let chunk = vec![b'a'; size];

    let (body, output) = start(out, 200, Fields::new());
    for _ in 0..chunks {
        if write_all(&output, &chunk).is_err() || output.blocking_flush().is_err() {
            return;
        }
    }
    finish(body, output);
}

/// Counts requests seen by this instance.
fn counter(out: ResponseOutparam) {
    let value = COUNTER.fetch_add(1, Ordering::SeqCst) + 1;
    respond(out, 200, &[], value.to_string().as_bytes());
}

/// Burns CPU forever without answering.
fn spin_forever() -> ! {
    let mut n: u64 = 0;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

/// Allocates and touches 1 MiB blocks until memory runs out.
fn exhaust_memory() -> ! {
    let mut kept: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut block = vec![0u8; MIB];
        for offset in (0..MIB).step_by(PAGE) {
            block[offset] = 1;
        }
        kept.push(black_box(block));
        black_box(&mut kept);
    }
}

/// Unbounded, non-tail recursion with big frames.
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let mut frame = [0u8; 1024];
    frame[(depth as usize) % frame.len()] = depth as u8;
    black_box(&mut frame);
    black_box(recurse(black_box(depth + 1))) + u64::from(frame[0])
}

/// Sends the head and part of the body, then traps.
fn trap_after_headers(out: ResponseOutparam) -> ! {
    let (_body, output) = start(out, 200, Fields::new());
    let _ = output.blocking_write_and_flush(b"partial");
    core::arch::wasm32::unreachable()
}

/// `bytes` bytes of `x` in 64 KiB writes, optionally with a content-length.
fn big(query: &str, declare_length: bool, out: ResponseOutparam) {
    let total = param_u64(query, "bytes").unwrap_or(64 * MIB as u64);
    let headers = Fields::new();
    if declare_length {
        append(&headers, "content-length", total.to_string().as_bytes());
    }
    let piece = vec![b'x'; BIG_WRITE];

    let (body, output) = start(out, 200, headers);
    let mut left = total;
    while left > 0 {
        let n = left.min(BIG_WRITE as u64) as usize;
        if write_all(&output, &piece[..n]).is_err() {
            return;
        }
        left -= n as u64;
    }
    if output.blocking_flush().is_err() {
        return;
    }
    finish(body, output);
}

/// Waits on a timer (an I/O wait, no CPU use), then answers.
fn sleep(query: &str, out: ResponseOutparam) {
    let ms = param_u64(query, "ms").unwrap_or(1000);
    monotonic_clock::subscribe_duration(ms.saturating_mul(1_000_000)).block();
    respond(out, 200, &[], b"slept");
}

/// Busy-waits on the monotonic clock, then answers.
fn spin(query: &str, out: ResponseOutparam) {
    let ms = param_u64(query, "ms").unwrap_or(20);
    let deadline = monotonic_clock::now().saturating_add(ms.saturating_mul(1_000_000));
    while monotonic_clock::now() < deadline {
        black_box(());
    }
    respond(out, 200, &[], b"spun");
}

/// Touches `N` MiB of linear memory, keeps it, waits, then answers.
fn hold(query: &str, out: ResponseOutparam) {
    let mib = param_u64(query, "mb").unwrap_or(64) as usize;
    let mut kept = vec![0u8; mib * MIB];
    for offset in (0..kept.len()).step_by(PAGE) {
        kept[offset] = 1;
    }
    black_box(&mut kept);
    let ms = param_u64(query, "ms").unwrap_or(0);
    if ms > 0 {
        monotonic_clock::subscribe_duration(ms.saturating_mul(1_000_000)).block();
    }
    respond(out, 200, &[], format!("held {mib} MiB").as_bytes());
}

/// Creates `N` outgoing request bodies, fills each as far as the host lets
/// it without blocking, never sends them, then answers.
fn bodies(query: &str, out: ResponseOutparam) {
    let n = param_u64(query, "n").unwrap_or(40);
    let piece = vec![b'b'; MIB];
    let mut kept = Vec::new();
    let mut bytes = 0u64;
    for _ in 0..n {
        let request = OutgoingRequest::new(Fields::new());
        let Ok(body) = request.body() else { break };
        let Ok(stream) = body.write() else { break };
        while let Ok(budget) = stream.check_write() {
            if budget == 0 {
                break;
            }
            let len = (budget as usize).min(piece.len());
            if stream.write(&piece[..len]).is_err() {
                break;
            }
            bytes += len as u64;
        }
        kept.push((request, body, stream));
    }
    black_box(&mut kept);
    respond(out, 200, &[], format!("filled {} bodies with {bytes} bytes", kept.len()).as_bytes());
}

/// Makes one header field set with a `K` KiB value, then `N` clones of it,
/// keeps them all, then answers.
fn fields(query: &str, out: ResponseOutparam) {
    let n = param_u64(query, "n").unwrap_or(100);
    let kib = param_u64(query, "kb").unwrap_or(64) as usize;
    let first = Fields::new();
    append(&first, "x-big", &vec![b'f'; kib * 1024]);
    let kept: Vec<Fields> = (0..n).map(|_| first.clone()).collect();
    black_box(&kept);
    respond(out, 200, &[], format!("cloned {} fields", kept.len()).as_bytes());
}

/// Reports what the clocks say.
fn clock(out: ResponseOutparam) {
    let mono = monotonic_clock::now();
    let res = monotonic_clock::resolution();
    let wall = wall_clock::now();
    let text = format!("mono={mono} wall={}.{:09} res={res}", wall.seconds, wall.nanoseconds);
    respond(out, 200, &[], text.as_bytes());
}

/// One line on each of stdout and stderr.
fn print_stdio(out: ResponseOutparam) {
    println!("hello stdout");
    eprintln!("hello stderr");
    respond(out, 200, &[], b"printed");
}

/// `bytes` bytes of `y` on stdout, in lines of `line` bytes (default
/// 1024: 1023 `y` plus a newline; `line=1` prints only newlines).
/// A shorter last line keeps the total exact.
fn spam(query: &str, out: ResponseOutparam) {
    let total = param_u64(query, "bytes").unwrap_or(MIB as u64) as usize;
    let line_len = param_u64(query, "line").unwrap_or(1024).clamp(1, MIB as u64) as usize;
    // Built first and written at once: stdout flushes at each newline, and
    // the output should reach the host in as few calls as it can.
    let mut text = vec![b'y'; total];
    for (i, b) in text.iter_mut().enumerate() {
        if (i + 1) % line_len == 0 || i + 1 == total {
            *b = b'\n';
        }
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(&text);
    let _ = stdout.flush();
    drop(stdout);
    respond(out, 200, &[], b"spammed");
}

/// Answers with the requested status and an empty body.
fn status(query: &str, out: ResponseOutparam) {
    let code = param_u64(query, "code").and_then(|code| u16::try_from(code).ok()).unwrap_or(200);
    let response = OutgoingResponse::new(Fields::new());
    if response.set_status_code(code).is_err() {
        return respond(out, 500, &[], b"invalid status code");
    }
    let body = response.body().expect("response body is taken once");
    ResponseOutparam::set(out, Ok(response));
    let _ = OutgoingBody::finish(body, None);
}

/// A response with a header of the worker's own.
fn custom_header(out: ResponseOutparam) {
    respond(out, 200, &[("x-from-worker", b"yes")], b"ok");
}

/// Tries an outbound request to the discard port on loopback.
fn outbound(out: ResponseOutparam) {
    let text = match send_outbound() {
        Ok(()) => "outbound: ok".to_string(),
        Err(code) => format!("outbound: error: {code:?}"),
    };
    respond(out, 200, &[], text.as_bytes());
}

fn send_outbound() -> Result<(), ErrorCode> {
    let request = OutgoingRequest::new(Fields::new());
    let _ = request.set_method(&Method::Get);
    let _ = request.set_scheme(Some(&Scheme::Http));
    let _ = request.set_authority(Some("127.0.0.1:9"));
    let _ = request.set_path_with_query(Some("/"));

    outgoing_handler::handle(request, None).and_then(wait).map(drop)
}

/// Sends a request to `url` (the rest of the query after `url=`) with the
/// incoming method, streaming the incoming body out as it arrives, and
/// streams the origin's body back. See the README for the response format.
fn fetch(request: &IncomingRequest, query: &str, out: ResponseOutparam) {
    let Some(url) = query.split_once("url=").map(|(_, url)| url) else {
        return respond(out, 400, &[], b"missing url=");
    };
    let method = request.method();
    let outgoing = match outgoing_request(&method, url) {
        Ok(r) => r,
        Err(why) => return respond(out, 400, &[], why.as_bytes()),
    };
    let has_body = matches!(method, Method::Post | Method::Put | Method::Patch);
    let out_body = has_body.then(|| outgoing.body().expect("outgoing body is taken once"));
    let future = match outgoing_handler::handle(outgoing, None) {
        Ok(f) => f,
        Err(code) => return respond(out, 502, &[], format!("fetch error: {code:?}").as_bytes()),
    };
    if let Some(out_body) = out_body {
        let sink = out_body.write().expect("outgoing body stream is taken once");
        let incoming = request.consume().expect("request body is taken once");
        let source = incoming.stream().expect("request body stream is taken once");
        while let Ok(chunk) = source.blocking_read(BLOCKING_WRITE_MAX as u64) {
            if write_blocking(&sink, &chunk).is_err() {
                break;
            }
        }
        drop(sink);
        let _ = OutgoingBody::finish(out_body, None);
    }
    let response = match wait(future) {
        Ok(r) => r,
        Err(code) => return respond(out, 502, &[], format!("fetch error: {code:?}").as_bytes()),
    };
    let headers = Fields::new();
    append(&headers, "x-fetch-status", response.status().to_string().as_bytes());
    for (name, value) in response.headers().entries() {
        if name == "location" {
            append(&headers, "x-fetch-location", &value);
        }
    }
    let (body, sink) = start(out, 200, headers);
    let origin_body = response.consume().expect("response body is taken once");
    let source = origin_body.stream().expect("response body stream is taken once");
    loop {
        match source.blocking_read(BIG_WRITE as u64) {
            Ok(chunk) => {
                if write_blocking(&sink, &chunk).is_err() {
                    return;
                }
            }
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(e)) => {
                let what = match wasi::http::types::http_error_code(&e) {
                    Some(code) => format!("{code:?}"),
                    None => e.to_debug_string(),
                };
                let _ = write_blocking(&sink, format!("\n[fetch body error: {what}]").as_bytes());
                break;
            }
        }
    }
    drop(source);
    drop(origin_body);
    finish(body, sink);
}

/// Sends `GET url` up to `n` times (default 1), one after the other,
/// reading each body to its end; 200 `fetched K` or `fetched K; then error: <code>`.
fn fetch_n(query: &str, out: ResponseOutparam) {
    let n = param_u64(query, "n").unwrap_or(1);
    let Some(url) = query.split_once("url=").map(|(_, url)| url) else {
        return respond(out, 400, &[], b"missing url=");
    };
    let mut done = 0;
    let mut failure = None;
    for _ in 0..n {
        let result = outgoing_request(&Method::Get, url)
            .map_err(|why| ErrorCode::InternalError(Some(why)))
            .and_then(|r| outgoing_handler::handle(r, None))
            .and_then(wait);
        match result {
            Ok(response) => {
                let body = response.consume().expect("response body is taken once");
                let stream = body.stream().expect("response body stream is taken once");
                while stream.blocking_read(BIG_WRITE as u64).is_ok() {}
                done += 1;
            }
            Err(code) => {
                failure = Some(code);
                break;
            }
        }
    }
    let text = match failure {
        None => format!("fetched {done}"),
        Some(code) => format!("fetched {done}; then error: {code:?}"),
    };
    respond(out, 200, &[], text.as_bytes());
}

/// An outgoing request for `scheme://authority/path?query`, taken apart
/// without any normalisation, so that tests control exactly what the host sees.
fn outgoing_request(method: &Method, url: &str) -> Result<OutgoingRequest, String> {
    let (scheme, rest) = url.split_once("://").ok_or("url without scheme")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let request = OutgoingRequest::new(Fields::new());
    request.set_method(method).map_err(|()| "method refused")?;
    let scheme = match scheme {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => Scheme::Other(other.to_string()),
    };
    request.set_scheme(Some(&scheme)).map_err(|()| "scheme refused")?;
    request.set_authority(Some(authority)).map_err(|()| format!("authority `{authority}` refused"))?;
    request.set_path_with_query(Some(path)).map_err(|()| "path refused")?;
    Ok(request)
}

fn wait(future: FutureIncomingResponse) -> Result<IncomingResponse, ErrorCode> {
    let ready = future.subscribe();
    ready.block();
    drop(ready);
    match future.get() {
        Some(Ok(result)) => result,
        Some(Err(())) => Err(ErrorCode::InternalError(Some("response already taken".to_string()))),
        None => Err(ErrorCode::InternalError(Some("response not ready".to_string()))),
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Sends the response head and hands back the body and its stream.
fn start(out: ResponseOutparam, status: u16, headers: Fields) -> (OutgoingBody, OutputStream) {
    let response = OutgoingResponse::new(headers);
    response.set_status_code(status).expect("valid status code");
    let body = response.body().expect("response body is taken once");
    ResponseOutparam::set(out, Ok(response));
    let stream = body.write().expect("response body stream is taken once");
    (body, stream)
}

/// Closes the body stream, then the body.
fn finish(body: OutgoingBody, stream: OutputStream) {
    drop(stream);
    let _ = OutgoingBody::finish(body, None);
}

/// A complete response with a small in-memory body.
fn respond(out: ResponseOutparam, status: u16, headers: &[(&str, &[u8])], text: &[u8]) {
    let fields = Fields::new();
    for (name, value) in headers {
        append(&fields, name, value);
    }
    let (body, stream) = start(out, status, fields);
    if write_blocking(&stream, text).is_err() {
        return;
    }
    finish(body, stream);
}

/// Writes through `blocking_write_and_flush`, at most 4096 bytes a call.
fn write_blocking(stream: &OutputStream, data: &[u8]) -> Result<(), StreamError> {
    for piece in data.chunks(BLOCKING_WRITE_MAX) {
        stream.blocking_write_and_flush(piece)?;
    }
    Ok(())
}

/// Writes everything, never more than the stream's check-write budget at once.
fn write_all(stream: &OutputStream, mut data: &[u8]) -> Result<(), StreamError> {
    while !data.is_empty() {
        let budget = stream.check_write()?;
        if budget == 0 {
            stream.subscribe().block();
            continue;
        }
        let n = data.len().min(usize::try_from(budget).unwrap_or(usize::MAX));
        stream.write(&data[..n])?;
        data = &data[n..];
    }
    Ok(())
}

fn append(fields: &Fields, name: &str, value: &[u8]) {
    fields.append(name, value).unwrap_or_else(|err| panic!("cannot set header {name}: {err:?}"));
}

/// The value of `key` in a `k=v&k=v` query string, as a number.
fn param_u64(query: &str, key: &str) -> Option<u64> {
    query.split('&').filter_map(|pair| pair.split_once('=')).find(|(k, _)| *k == key).and_then(|(_, v)| v.parse().ok())
}

fn method_name(method: &Method) -> &str {
    match method {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Delete => "DELETE",
        Method::Connect => "CONNECT",
        Method::Options => "OPTIONS",
        Method::Trace => "TRACE",
        Method::Patch => "PATCH",
        Method::Other(other) => other,
    }
}
