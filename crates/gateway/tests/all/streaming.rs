use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

/// Reads from `s` until `needle` has arrived; returns all that was read.
async fn read_until(s: &mut TcpStream, needle: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(needle) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("data in time").unwrap();
        assert!(n > 0, "closed before {needle:?}: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_bodies_stream() {
    let s = start(&standard_workers()).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"POST /echo HTTP/1.1\r\nHost: hostile.localhost\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst \r\n").await.unwrap();
    // The worker echoes the first chunk before the request body is finished:
    // both directions stream.
    let head = read_until(&mut c, "first ").await;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
    c.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await.unwrap();
    let rest = read_until(&mut c, "0\r\n\r\n").await;
    assert!(rest.contains("second"), "{rest}");
    // The connection is still usable afterwards.
    c.write_all(b"GET /counter HTTP/1.1\r\nHost: hostile.localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let next = read_until_close(&mut c, Duration::from_secs(5)).await;
    assert!(next.contains("HTTP/1.1 200 OK"), "{next}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_response_arrives_whole() {
    let s = start(&standard_workers()).await;
    let r = s.get("hostile.localhost", "/stream?chunks=64&size=1000").await;
    assert_eq!(r.status, 200);
    assert!(r.body_error.is_none());
    assert_eq!(r.body.len(), 64_000);
    assert!(r.body.iter().all(|&b| b == b'a'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_round_trip() {
    let s = start(&standard_workers()).await;
    let body: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
    let r = request(s.addr, "PUT", "hostile.localhost", "/echo", &[], Some(body.clone())).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_honoured() {
    let s = start(&standard_workers()).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(
        b"POST /echo HTTP/1.1\r\nHost: hostile.localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    // The body is sent only once the server has asked for it.
    let interim = read_until(&mut c, "\r\n\r\n").await;
    assert!(interim.starts_with("HTTP/1.1 100 Continue\r\n\r\n"), "{interim}");
    c.write_all(b"hello").await.unwrap();
    let reply = interim + &read_until_close(&mut c, Duration::from_secs(5)).await;
    let reply = reply.trim_start_matches("HTTP/1.1 100 Continue\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 200 OK") && reply.ends_with("5\r\nhello\r\n0\r\n\r\n"), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_requests_get_no_body() {
    let s = start(&standard_workers()).await;
    let reply = raw(s.addr, b"HEAD /big-declared?bytes=500 HTTP/1.1\r\nHost: hostile.localhost\r\nConnection: close\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    assert!(reply.to_ascii_lowercase().contains("content-length: 500"), "{reply}");
    assert!(reply.ends_with("\r\n\r\n"), "no body after the head: {reply:?}");
}

/// Clients that ask for big responses and never read them fill their
/// connections' kernel buffers and then hold the guest at its writes: the
/// body is never buffered whole on the host, the guest is stopped at its
/// wall-clock limit, and other clients are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_a_bounded_amount_of_memory() {
    let workers = standard_workers().replace("max_response_body_bytes = 1048576", "max_response_body_bytes = 268435456");
    let s = start(&workers).await;
    assert_eq!(s.get("hello.localhost", "/").await.status, 200);
    let baseline = rss_bytes();
    let mut readers = Vec::new();
    for _ in 0..16 {
        let mut c = TcpStream::connect(s.addr).await.unwrap();
        c.write_all(b"GET /big?bytes=268435456 HTTP/1.1\r\nHost: hostile.localhost\r\n\r\n").await.unwrap();
        readers.push(c);
    }
    // Past the guests' 2 s wall-clock limit: every body is stuck or cut.
    let started = std::time::Instant::now();
    let mut peak = baseline;
    while started.elapsed() < Duration::from_millis(2500) {
        peak = peak.max(rss_bytes());
        let r = s.get("hello.localhost", "/").await;
        assert_eq!(r.status, 200, "another client is served while the readers stall");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let growth = peak.saturating_sub(baseline);
    // 16 bodies of 256 MiB would be 4 GiB; each holds its body channel
    // (192 KiB) and its guest's few MiB.
    assert!(growth < 128 << 20, "16 stalled responses grew the process by {} MiB", growth >> 20);
    let health = s.health().await;
    assert_eq!(health["tenants"]["evil"]["in_flight"], 0, "the stalled guests were stopped at their wall-clock limit: {health:#}");
    drop(readers);
}
