//! Upper bound for the `http-hello` benchmark: hyper answering every request
//! with a fixed body, no routing, no WebAssembly.
//!
//! Usage: `raw-hyper-hello 127.0.0.1:PORT`

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const BODY: &[u8] = b"Hello from Cordon\n";

async fn hello(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut resp = Response::new(Full::new(Bytes::from_static(BODY)));
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    Ok(resp)
}

fn main() {
    let addr: SocketAddr = match std::env::args().nth(1).map(|a| a.parse()) {
        Some(Ok(addr)) => addr,
        Some(Err(e)) => {
            eprintln!("raw-hyper-hello: invalid address: {e}");
            std::process::exit(2);
        }
        None => {
            eprintln!("usage: raw-hyper-hello <ip:port>");
            std::process::exit(2);
        }
    };

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("failed to build tokio runtime");

    if let Err(e) = runtime.block_on(serve(addr)) {
        eprintln!("raw-hyper-hello: {e}");
        std::process::exit(1);
    }
}

async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    eprintln!("raw-hyper-hello listening on http://{}", listener.local_addr()?);

    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Transient errors such as EMFILE must not kill the server.
                eprintln!("raw-hyper-hello: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(hello));
            // Clients closing mid-request is normal under load; ignore it.
            let _ = conn.await;
        });
    }
}
