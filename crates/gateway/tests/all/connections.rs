//! Connection slots and file descriptors under attack: one client address
//! holding thousands of idle keep-alive connections, and one tenant leaving
//! subrequests hanging on a slow origin under a low descriptor limit. The
//! victim, another address or another tenant, must be served within a
//! bound meanwhile.
//!
//! These tests change the process's `RLIMIT_NOFILE`; nextest runs each test
//! in a process of its own (scripts/test.sh uses it), so no other test sees
//! the change. Under plain `cargo test` they share one process with the
//! rest: run them alone there (`cargo test -p cordon-gateway connections::`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::harness::{Options, guest, rss_bytes, start_with};

/// The victim's bound: every request answered, the slowest within this.
/// An idle-connection attack on the old code made the victim wait for the
/// 60 s keep-alive timeout; a descriptor attack made it fail.
const VICTIM_BOUND: Duration = Duration::from_millis(1000);

/// Growth of the process's resident memory allowed during an attack.
const RSS_BOUND_KIB: u64 = 256 * 1024;

fn rss_kib() -> u64 {
    rss_bytes() / 1024
}

fn open_descriptors() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

/// Sets the soft `RLIMIT_NOFILE` of this test's process.
fn set_descriptor_limit(soft: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid, writable rlimit for the call to fill.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
    limit.rlim_cur = soft.min(limit.rlim_max);
    // SAFETY: `limit` is a valid rlimit no higher than the hard limit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
}

fn hard_descriptor_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid, writable rlimit for the call to fill.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
    limit.rlim_max
}

/// A connection from `source` (a loopback address of its own).
async fn connect_from(source: &str, server: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    socket.connect(server).await
}

/// Sends one request on `stream` and reads its response; the status, or
/// `None` if the connection closed or nothing came within `limit`.
async fn exchange(stream: &mut TcpStream, host: &str, path: &str, limit: Duration) -> Option<u16> {
    Some(exchange_text(stream, host, path, limit).await?.0)
}

/// [`exchange`], with the response's body.
async fn exchange_text(stream: &mut TcpStream, host: &str, path: &str, limit: Duration) -> Option<(u16, String)> {
    let (status, _, body) = exchange_whole(stream, host, path, limit).await?;
    Some((status, body))
}

/// [`exchange`], with the response's head (lowercased) and body (dechunked).
async fn exchange_whole(stream: &mut TcpStream, host: &str, path: &str, limit: Duration) -> Option<(u16, String, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some(end) = text.find("\r\n\r\n") {
                let head = &text[..end];
                let length: usize = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                    .unwrap_or(0);
                let status = head.split(' ').nth(1)?.parse().ok()?;
                let body = &text[end + 4..];
                let head = head.to_ascii_lowercase();
                if head.contains("transfer-encoding: chunked") {
                    if body.ends_with("0\r\n\r\n") {
                        return Some((status, head, dechunk(body)));
                    }
                } else if body.len() >= length {
                    return Some((status, head, body.to_string()));
                }
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok().flatten()
}

/// The data of a complete chunked body.
fn dechunk(mut body: &str) -> String {
    let mut data = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size, 16).unwrap();
        if size == 0 {
            break;
        }
        data.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    data
}

/// `true` once the server has closed `stream` (a read returns end of file
/// or an error without waiting).
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(tokio::time::timeout(Duration::from_millis(10), stream.read(&mut byte)).await, Ok(Ok(0) | Err(_)))
}

fn hello_worker() -> String {
    format!(
        "\n[[worker]]\nname = \"hello\"\ntenant = \"good\"\ncomponent = \"{}\"\nroutes = [\"hello.localhost/\"]\n",
        guest("hello").display()
    )
}

/// The victim, from 127.0.0.2: `n` requests on fresh connections; returns
/// the slowest.
async fn victim_latencies(server: SocketAddr, n: usize) -> Vec<Duration> {
    let mut latencies = Vec::new();
    for _ in 0..n {
        let started = Instant::now();
        let mut stream = tokio::time::timeout(Duration::from_secs(10), connect_from("127.0.0.2", server))
            .await
            .expect("the victim connects")
            .expect("the victim connects");
        let status = exchange(&mut stream, "hello.localhost", "/", Duration::from_secs(10)).await;
        assert_eq!(status, Some(200), "the victim is served");
        latencies.push(started.elapsed());
    }
    latencies.sort();
    latencies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holding_idle_connections_does_not_make_another_wait() {
    set_descriptor_limit(hard_descriptor_limit());
    let s = start_with(
        &hello_worker(),
        Options {
            server: "max_connections = 4000\nmax_connections_per_address = 1000\nkeep_alive_timeout_ms = 60000",
            ..Default::default()
        },
    )
    .await;
    let rss_before = rss_kib();
    // 3,000 connections from one address, each after one request (a 404)
    // kept alive.
    let mut attacker = Vec::new();
    let (mut served, mut refused) = (0, 0);
    for _ in 0..3000 {
        let mut stream = connect_from("127.0.0.1", s.addr).await.unwrap();
        match exchange(&mut stream, "nowhere.localhost", "/", Duration::from_secs(2)).await {
            Some(404) => served += 1,
            Some(503) | None => refused += 1,
            other => panic!("unexpected answer {other:?}"),
        }
        attacker.push(stream);
    }
    assert_eq!((served, refused), (1000, 2000), "the address gets its 1,000 connections, and no more");
    let latencies = victim_latencies(s.addr, 50).await;
    let slowest = *latencies.last().unwrap();
    let grown = rss_kib().saturating_sub(rss_before);
    eprintln!("victim p50 {:?}, max {slowest:?}; RSS grew {grown} KiB", latencies[latencies.len() / 2]);
    assert!(slowest < VICTIM_BOUND, "the victim waited {slowest:?}");
    assert!(grown < RSS_BOUND_KIB, "RSS grew {grown} KiB");
    // The address gets a slot again as soon as one of its connections closes.
    attacker.truncate(999);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = connect_from("127.0.0.1", s.addr).await.unwrap();
    assert_eq!(exchange(&mut again, "nowhere.localhost", "/", Duration::from_secs(2)).await, Some(404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_first_when_slots_run_low() {
    set_descriptor_limit(hard_descriptor_limit());
    let s = start_with(
        &hello_worker(),
        Options {
            server: "max_connections = 400\nmax_connections_per_address = 100000\nkeep_alive_timeout_ms = 60000",
            ..Default::default()
        },
    )
    .await;
    let rss_before = rss_kib();
    // More idle keep-alive connections than there are slots, all from one
    // address: each is served, because the idle ones make room.
    let mut attacker = Vec::new();
    for i in 0..1000 {
        let mut stream = connect_from("127.0.0.1", s.addr).await.unwrap();
        let status = exchange(&mut stream, "nowhere.localhost", "/", Duration::from_secs(5)).await;
        assert_eq!(status, Some(404), "attacker connection {i} was served");
        attacker.push(stream);
    }
    let latencies = victim_latencies(s.addr, 50).await;
    let slowest = *latencies.last().unwrap();
    let grown = rss_kib().saturating_sub(rss_before);
    eprintln!("victim p50 {:?}, max {slowest:?}; RSS grew {grown} KiB", latencies[latencies.len() / 2]);
    assert!(slowest < VICTIM_BOUND, "the victim waited {slowest:?}");
    assert!(grown < RSS_BOUND_KIB, "RSS grew {grown} KiB");
    // Idle connections were closed to make room, the oldest first (those
    // that went idle with the slots already low closed at once, and the
    // rest within the 1 s idle timeout under pressure).
    let mut closed = Vec::new();
    for stream in &mut attacker {
        closed.push(closed_by_server(stream).await);
    }
    let closed_count = closed.iter().filter(|c| **c).count();
    assert!(closed_count >= 600, "only {closed_count} of 1,000 idle connections were closed for 400 slots");
    assert!(closed[0], "the oldest idle connection was closed");
}

/// An origin on loopback that reads a request and never answers.
async fn hanging_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_subrequests_of_one_tenant_cannot_exhaust_descriptors() {
    let origin = hanging_origin().await;
    let network = Arc::new(cordon_runtime::Network::builder().outbound_connections_per_tenant(8).build().unwrap());
    let workers = format!(
        "{}\n[[worker]]\nname = \"attacker\"\ntenant = \"evil\"\ncomponent = \"{}\"\nroutes = [\"attacker.localhost/\"]\nallowed_outbound = [\"http://{origin}\"]\n[worker.limits]\nwall_ms = 20000\nsubrequest_timeout_ms = 20000\n",
        hello_worker(),
        guest("hostile").display()
    );
    let s = start_with(
        &workers,
        Options {
            server: "max_outbound_connections_per_tenant = 8",
            max_instances: Some(200),
            network: Some(network),
            ..Default::default()
        },
    )
    .await;
    // Warm up, then leave room for the attacking connections (two
    // descriptors each here: the client's and the gateway's), 8 hanging
    // subrequests (two more each: the outbound one and the origin's) and the
    // victim, but not for 150 hanging subrequests (600 descriptors).
    assert_eq!(victim_latencies(s.addr, 3).await.len(), 3);
    set_descriptor_limit(open_descriptors() + 300);
    let rss_before = rss_kib();

    // 150 requests in waves of 15: without the cap their hanging
    // subrequests would pile up past the limit.
    let mut attacks = Vec::new();
    for _ in 0..10 {
        for _ in 0..15 {
            let addr = s.addr;
            attacks.push(tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.ok()?;
                let path = format!("/fetch?url=http://{origin}/slow");
                exchange_text(&mut stream, "attacker.localhost", &path, Duration::from_secs(30)).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The requests over the cap are answered at once with the cap's error.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let finished = attacks.iter().filter(|a| a.is_finished()).count();
    let latencies = victim_latencies(s.addr, 50).await;
    let slowest = *latencies.last().unwrap();
    let grown = rss_kib().saturating_sub(rss_before);
    eprintln!("victim p50 {:?}, max {slowest:?}; RSS grew {grown} KiB; {finished} attacks answered", latencies[latencies.len() / 2]);
    assert!(slowest < VICTIM_BOUND, "the victim waited {slowest:?}");
    assert!(grown < RSS_BOUND_KIB, "RSS grew {grown} KiB");
    let mut refused = 0;
    for attack in attacks {
        if attack.is_finished() {
            let reply = attack.await.unwrap();
            assert_eq!(reply, Some((502, "fetch error: ErrorCode::ConnectionLimitReached".to_string())));
            refused += 1;
        }
    }
    let event = crate::harness::wait_for_log("egress_limit", |e| e["tenant"] == "evil").await;
    assert!(event.to_string().contains("server.max_outbound_connections_per_tenant"), "{event}");
    assert_eq!(refused, 142, "every attack request beyond the 8 hanging ones got the cap's error");
}

/// Sends one request on `stream` and reads the response; the status and
/// whether the server said it closes the connection after it.
async fn exchange_closing(stream: &mut TcpStream, host: &str) -> Option<(u16, bool)> {
    let (status, head, _) = exchange_whole(stream, host, "/", Duration::from_secs(5)).await?;
    Some((status, head.lines().any(|l| l == "connection: close")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_responses_cannot_hold_more_than_its_cap_of_keep_alive_connections() {
    set_descriptor_limit(hard_descriptor_limit());
    let workers = format!(
        "{}\n[[worker]]\nname = \"attacker\"\ntenant = \"evil\"\ncomponent = \"{}\"\nroutes = [\"attacker.localhost/\"]\n\n\
         [[tenant]]\nname = \"evil\"\nmax_idle_connections = 50\n",
        hello_worker(),
        guest("hello").display()
    );
    let s = start_with(
        &workers,
        Options {
            server: "max_connections = 400\nmax_connections_per_address = 100000\nkeep_alive_timeout_ms = 60000",
            ..Default::default()
        },
    )
    .await;
    let rss_before = rss_kib();
    // Tenant `evil`'s clients: 300 connections, each kept after one of its
    // worker's responses. Only its cap of 50 is kept alive; the responses
    // past it close their connections.
    let mut attacker = Vec::new();
    let mut closing = 0;
    for i in 0..300 {
        let mut stream = connect_from("127.0.0.1", s.addr).await.unwrap();
        let (status, closes) = exchange_closing(&mut stream, "attacker.localhost").await.unwrap_or_else(|| panic!("attacker request {i}"));
        assert_eq!(status, 200, "attacker request {i} was served");
        closing += usize::from(closes);
        attacker.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut held = 0;
    for stream in &mut attacker {
        held += usize::from(!closed_by_server(stream).await);
    }
    eprintln!("the attacker's responses: {closing} closed their connection, {held} connections kept");
    assert_eq!((held, closing), (50, 250), "tenant evil holds at most its 50 kept-alive connections");

    // Tenant `good`'s clients, meanwhile: 80 kept-alive connections, each
    // served at once and all still open afterwards (with 300 of the
    // attacker's held, the slots would run low and these would be closed).
    let mut victim = Vec::new();
    let mut slowest = Duration::ZERO;
    for i in 0..80 {
        let started = Instant::now();
        let mut stream = connect_from("127.0.0.2", s.addr).await.unwrap();
        let answer = exchange_closing(&mut stream, "hello.localhost").await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(answer, Some((200, false)), "victim request {i} was served and kept alive");
        victim.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut kept = 0;
    for stream in &mut victim {
        kept += usize::from(!closed_by_server(stream).await);
    }
    let grown = rss_kib().saturating_sub(rss_before);
    eprintln!("victim: slowest {slowest:?}, {kept} of 80 connections kept; RSS grew {grown} KiB");
    assert!(slowest < VICTIM_BOUND, "the victim waited {slowest:?}");
    assert_eq!(kept, 80, "the victim's kept-alive connections stay open");
    assert!(grown < RSS_BOUND_KIB, "RSS grew {grown} KiB");

    // A connection counts until it is used again: a second request on one
    // of the attacker's kept connections is served and kept again; and one
    // closed makes room for another.
    // (The first 50 connections are the kept ones.)
    assert_eq!(exchange_closing(&mut attacker[0], "attacker.localhost").await, Some((200, false)));
    drop(attacker.remove(0));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut again = connect_from("127.0.0.1", s.addr).await.unwrap();
    assert_eq!(exchange_closing(&mut again, "attacker.localhost").await, Some((200, false)), "a freed place is taken again");
}
