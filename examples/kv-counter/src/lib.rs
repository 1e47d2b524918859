//! Counts visits per path in a key-value store, atomically.
//!
//! - `GET /any/path` adds one to the counter of `/any/path` and answers
//!   `<greeting>: /any/path has been visited N times`;
//! - `GET /_counts` lists every counter, one `path count` line each.
//!
//! Config: `[[worker.kv]] binding = "COUNTS"`, and optionally
//! `[worker.vars] GREETING = "..."`.

use cordon_sdk::{config, kv};
use wasi::exports::http::incoming_handler::Guest;
use wasi::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

const PREFIX: &str = "count:";

struct Counter;

impl Guest for Counter {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_else(|| "/".into());
        let path = path.split('?').next().unwrap_or("/").to_string();
        let (status, text) = match answer(&path) {
            Ok(text) => (200, text),
            Err(e) => (500, format!("error: {e}\n")),
        };
        respond(out, status, &text);
    }
}

fn answer(path: &str) -> Result<String, cordon_sdk::Error> {
    let counts = kv::Store::open("COUNTS")?;
    if path == "/_counts" {
        let mut text = String::new();
        for key in counts.keys_with_prefix(PREFIX) {
            let key = key?;
            let n = counts.get_string(&key)?.unwrap_or_default();
            text.push_str(&format!("{} {n}\n", &key[PREFIX.len()..]));
        }
        return Ok(text);
    }
    let n = counts.increment(&format!("{PREFIX}{path}"), 1)?;
    let greeting = config::get("GREETING")?.unwrap_or_else(|| "Hello".into());
    Ok(format!("{greeting}: {path} has been visited {n} times\n"))
}

fn respond(out: ResponseOutparam, status: u16, text: &str) {
    let headers = Fields::new();
    headers.append("content-type", b"text/plain; charset=utf-8").expect("a valid header");
    let response = OutgoingResponse::new(headers);
    response.set_status_code(status).expect("a valid status");
    let body = response.body().expect("the body is taken once");
    ResponseOutparam::set(out, Ok(response));
    let stream = body.write().expect("the body stream is taken once");
    for piece in text.as_bytes().chunks(4096) {
        if stream.blocking_write_and_flush(piece).is_err() {
            return;
        }
    }
    drop(stream);
    let _ = OutgoingBody::finish(body, None);
}

wasi::http::proxy::export!(Counter);
