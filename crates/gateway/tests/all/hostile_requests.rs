//! Malformed and abusive requests: each gets its status, and the server is
//! unharmed.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::harness::*;

async fn assert_unharmed(s: &TestServer) {
    assert_eq!(s.get("hello.localhost", "/").await.status, 200);
}

/// A rejection: one response, JSON, `connection: close`, and the socket closed.
fn assert_rejected(reply: &str, status: u16) {
    assert_eq!(raw_status(reply), status, "{reply}");
    assert_eq!(reply.matches("HTTP/1.1 ").count(), 1, "exactly one response, nothing smuggled: {reply}");
    let lower = reply.to_ascii_lowercase();
    assert!(lower.contains("connection: close"), "{reply}");
    assert!(lower.contains("x-request-id: "), "{reply}");
    assert!(reply.contains("{\"error\":{\"code\":"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_refused() {
    let s = start(&standard_workers()).await;
    let smuggle = "POST /echo HTTP/1.1\r\nHost: hostile.localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /counter HTTP/1.1\r\nHost: hostile.localhost\r\n\r\n";
    assert_rejected(&raw(s.addr, smuggle.as_bytes()).await, 400);
    assert_unharmed(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differing_content_lengths_are_refused() {
    let s = start(&standard_workers()).await;
    let req = "POST /echo HTTP/1.1\r\nHost: hostile.localhost\r\nContent-Length: 3\r\nContent-Length: 10\r\n\r\nabcdefghij";
    assert_rejected(&raw(s.addr, req.as_bytes()).await, 400);
    assert_unharmed(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_chunk_size_is_refused() {
    let s = start(&standard_workers()).await;
    for body in ["zz\r\nhello\r\n0\r\n\r\n", "5\r\nhelloXX0\r\n\r\n", "-5\r\nhello\r\n0\r\n\r\n", "5\nhello\r\n0\r\n\r\n"] {
        // `/consume` reads the whole body before it answers, so the bad chunk
        // is always seen before the response head is written. (`/echo` sends
        // its head first: whether the gateway had decoded the bad chunk by
        // then would be a race.)
        let req = format!("POST /consume HTTP/1.1\r\nHost: hostile.localhost\r\nTransfer-Encoding: chunked\r\n\r\n{body}");
        let reply = raw(s.addr, req.as_bytes()).await;
        assert_rejected(&reply, 400);
        assert!(reply.contains("chunk"), "{reply}");
    }
    assert_unharmed(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431() {
    let s = start(&standard_workers()).await;
    let req = format!("GET / HTTP/1.1\r\nHost: hello.localhost\r\nX-Pad: {}\r\n\r\n", "a".repeat(20_000));
    assert_rejected(&raw(s.addr, req.as_bytes()).await, 431);
    let many: String = (0..150).map(|i| format!("X-{i}: v\r\n")).collect();
    let req = format!("GET / HTTP/1.1\r\nHost: hello.localhost\r\n{many}\r\n");
    assert_rejected(&raw(s.addr, req.as_bytes()).await, 431);
    assert_unharmed(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413() {
    let s = start(&standard_workers()).await;
    // Declared: refused before the worker runs or the body is read.
    let r = request(s.addr, "POST", "hostile.localhost", "/echo", &[], Some(vec![b'x'; 100_000])).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.error_code(), "body_too_large");
    // Chunked: counted while streaming, and refused as soon as the worker
    // reads past the limit.
    let mut req = b"POST /consume HTTP/1.1\r\nHost: hostile.localhost\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..20 {
        req.extend_from_slice(format!("{:x}\r\n{}\r\n", 8192, "y".repeat(8192)).as_bytes());
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let reply = raw(s.addr, &req).await;
    assert_eq!(raw_status(&reply), 413, "{reply}");
    assert!(reply.contains("body_too_large"));
    // Under the limit, the same worker reads it all.
    let r = request(s.addr, "POST", "hostile.localhost", "/consume", &[], Some(vec![b'x'; 60_000])).await;
    assert_eq!((r.status, r.text().as_str()), (200, "60000"));
    assert_unharmed(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_cut_off() {
    let options = Options { server: "header_read_timeout_ms = 600", ..Options::default() };
    let s = start_with(&standard_workers(), options).await;
    let mut slow = TcpStream::connect(s.addr).await.unwrap();
    let started = Instant::now();
    let head = b"GET / HTTP/1.1\r\nHost: hello.localhost\r\nX-Slow: ";
    let dripping = async {
        for b in head.iter().chain(b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter()) {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    // Others are served while the slow client drips.
    let others = async {
        for _ in 0..5 {
            assert_unharmed(&s).await;
        }
    };
    tokio::join!(dripping, others);
    let reply = read_until_close(&mut slow, Duration::from_secs(5)).await;
    assert_eq!(raw_status(&reply), 408, "{reply}");
    assert!(started.elapsed() < Duration::from_secs(4), "cut off at the header timeout, took {:?}", started.elapsed());

    // A connection that sends nothing at all is closed too.
    let mut idle = TcpStream::connect(s.addr).await.unwrap();
    let reply = read_until_close(&mut idle, Duration::from_secs(5)).await;
    assert!(reply.is_empty() || raw_status(&reply) == 408, "{reply}");
    assert_unharmed(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_400() {
    let s = start(&standard_workers()).await;
    for req in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
        b"GET / HTTP/1.1\r\nHost: hello.localhost\r\nBad Header: x\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: hello.localhost\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: hello.localhost\r\nHost: hostile.localhost\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: ../../etc\r\n\r\n",
    ] {
        let reply = raw(s.addr, req).await;
        assert_rejected(&reply, 400);
    }
    assert_unharmed(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let s = start(&standard_workers()).await;
    let req = "GET /a HTTP/1.1\r\nHost: hello.localhost\r\n\r\nGET /b HTTP/1.1\r\nHost: hello.localhost\r\n\r\nGET /c HTTP/1.1\r\nHost: hello.localhost\r\nConnection: close\r\n\r\n";
    let reply = raw(s.addr, req.as_bytes()).await;
    assert_eq!(reply.matches("HTTP/1.1 200 OK").count(), 3, "{reply}");
    let (a, b, c) = (reply.find("path: /a").unwrap(), reply.find("path: /b").unwrap(), reply.find("path: /c").unwrap());
    assert!(a < b && b < c, "{reply}");
}
