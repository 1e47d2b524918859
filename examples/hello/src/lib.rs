//! The smallest useful Cordon worker.
//!
//! Every request gets a `200 OK` plain-text answer that greets the caller
//! and repeats the request's method and path (including the query string).

use wasi::exports::http::incoming_handler::Guest;
use wasi::http::types::{Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam};

struct Hello;

impl Guest for Hello {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let method = request.method();
        let method = method_name(&method);
        let path = request.path_with_query().unwrap_or_else(|| "/".to_string());
        let text = format!("Hello from Cordon\nmethod: {method}\npath: {path}\n");

        let headers = Fields::new();
        headers.append("content-type", b"text/plain; charset=utf-8").expect("content-type is a valid header");
        let response = OutgoingResponse::new(headers);
        response.set_status_code(200).expect("200 is a valid status");
        let body = response.body().expect("the body is taken only once");
        ResponseOutparam::set(response_out, Ok(response));

        let stream = body.write().expect("the body stream is taken only once");
        // A single blocking write may carry at most 4096 bytes.
        for piece in text.as_bytes().chunks(4096) {
            if stream.blocking_write_and_flush(piece).is_err() {
                // The client went away: nothing left to do.
                return;
            }
        }
        drop(stream);
        let _ = OutgoingBody::finish(body, None);
    }
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

wasi::http::proxy::export!(Hello);
