//! A Cordon worker that calls another origin: the `fetch` of a worker, which
//! in a `wasi:http` component is `wasi:http/outgoing-handler`.
//!
//! `GET /?url=URL` sends `GET URL` and answers with what came back. Without
//! `url`, it calls the demo's `hello` worker at `http://127.0.0.1:8080/hello`.
//! Cordon lets the request out only if `allowed_outbound` in the worker's
//! config names the URL's origin; otherwise the answer shows the refusal
//! (for example `HttpRequestDenied`, or `DestinationIpProhibited` for a name
//! that resolves to a private address).

use wasi::exports::http::incoming_handler::Guest;
use wasi::http::outgoing_handler;
use wasi::http::types::{
    ErrorCode, Fields, IncomingRequest, IncomingResponse, OutgoingBody, OutgoingRequest, OutgoingResponse, ResponseOutparam, Scheme,
};

const DEFAULT_URL: &str = "http://127.0.0.1:8080/hello";
/// Most bytes of the origin's answer that are passed on.
const MAX_BODY: usize = 64 * 1024;

struct Fetch;

impl Guest for Fetch {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let target = request.path_with_query().unwrap_or_default();
        let url = target.split_once("url=").map_or(DEFAULT_URL, |(_, url)| url).to_string();
        let (status, text) = match get(&url) {
            Ok((status, body)) => (200, format!("GET {url} -> {status}\n\n{body}")),
            Err(code) => (502, format!("GET {url} refused or failed: {code:?}\n")),
        };
        respond(response_out, status, &text);
    }
}

/// `GET url`, returning the status and up to [`MAX_BODY`] bytes of body.
fn get(url: &str) -> Result<(u16, String), ErrorCode> {
    let bad = |why: &str| ErrorCode::InternalError(Some(format!("{why}: {url}")));
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("not an absolute URL"))?;
    let scheme = match scheme {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        _ => return Err(bad("only http and https URLs")),
    };
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));

    let request = OutgoingRequest::new(Fields::new());
    request.set_scheme(Some(&scheme)).map_err(|()| bad("invalid scheme"))?;
    request.set_authority(Some(authority)).map_err(|()| bad("invalid host"))?;
    request.set_path_with_query(Some(path)).map_err(|()| bad("invalid path"))?;

    let pending = outgoing_handler::handle(request, None)?;
    pending.subscribe().block();
    let response: IncomingResponse = match pending.get() {
        Some(Ok(result)) => result?,
        _ => return Err(bad("no response")),
    };
    let status = response.status();
    let body = response.consume().map_err(|()| bad("no body"))?;
    let stream = body.stream().map_err(|()| bad("no body stream"))?;
    let mut bytes = Vec::new();
    while bytes.len() < MAX_BODY {
        match stream.blocking_read((MAX_BODY - bytes.len()) as u64) {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(_) => break,
        }
    }
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

fn respond(response_out: ResponseOutparam, status: u16, text: &str) {
    let headers = Fields::new();
    headers.append("content-type", b"text/plain; charset=utf-8").expect("content-type is a valid header");
    let response = OutgoingResponse::new(headers);
    response.set_status_code(status).expect("a valid status");
    let body = response.body().expect("the body is taken only once");
    ResponseOutparam::set(response_out, Ok(response));
    let stream = body.write().expect("the body stream is taken only once");
    // A single blocking write may carry at most 4096 bytes.
    for piece in text.as_bytes().chunks(4096) {
        if stream.blocking_write_and_flush(piece).is_err() {
            return;
        }
    }
    drop(stream);
    let _ = OutgoingBody::finish(body, None);
}

wasi::http::proxy::export!(Fetch);
