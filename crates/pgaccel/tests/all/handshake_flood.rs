//! Unauthenticated clients cannot lock others out: connections that never finish their handshake
//! are limited per source address and closed after the pre-authentication timeout, so a flood
//! from one address leaves every other address able to connect.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cordon_pgaccel::proxy::ProxySettings;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_postgres::NoTls;

use crate::attack::{p99, rss_mib};
use crate::harness::{ACME_APP_PASSWORD, Proxy};

/// Idle connections the flood opens from 127.0.0.1: more than the global handshake limit.
const FLOOD: usize = 1100;
const PER_ADDRESS: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Connect, authenticate (SCRAM) and run one query from another address during the flood.
const VICTIM_P99: Duration = Duration::from_millis(500);
const RSS_GROWTH_MIB: u64 = 64;

async fn connect_from(local: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{local}:0").parse().unwrap())?;
    socket.connect(to).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_from_one_address_leaves_other_addresses_served() {
    let settings =
        ProxySettings { handshake_timeout: HANDSHAKE_TIMEOUT, max_handshakes_per_address: PER_ADDRESS, ..ProxySettings::new(None, false) };
    assert!(settings.max_handshakes < FLOOD, "the flood is larger than the global limit");
    let proxy = Proxy::start_with("", "enabled = false", settings).await;
    proxy.client().await.simple_query("SELECT 1").await.expect("a first query opens the pool");
    let rss_before = rss_mib();

    // The flood: idle connections from 127.0.0.1 that never send a byte.
    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        flood.push(connect_from("127.0.0.1", proxy.addr).await.expect("the flood connects"));
    }

    // Meanwhile a client from 127.0.0.2 connects, authenticates and queries, again and again.
    let config: tokio_postgres::Config = proxy.url("acme_app", ACME_APP_PASSWORD, "acme.main").parse().unwrap();
    let mut samples = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let stream = connect_from("127.0.0.2", proxy.addr).await.expect("the victim connects");
        let (client, connection) = config.connect_raw(stream, NoTls).await.expect("the victim is let in during the flood");
        let connection = tokio::spawn(connection);
        client.simple_query("SELECT 1").await.expect("the victim's query");
        samples.push(started.elapsed());
        drop(client);
        let _ = connection.await;
    }
    let p99 = p99(&mut samples);
    assert!(p99 < VICTIM_P99, "the victim's connect-and-query p99 was {p99:?} during the flood");

    // The flood's connections beyond its address's limit were refused at once (53300 and
    // closed); those within it are closed when the pre-authentication timeout passes.
    let refused_by = Instant::now() + Duration::from_secs(5);
    let mut held = Vec::new();
    for socket in flood.iter_mut() {
        let mut buf = [0u8; 256];
        match tokio::time::timeout_at(refused_by.into(), socket.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 && buf[0] == b'E' && buf[..n].windows(5).any(|w| w == b"53300") => {}
            _ => held.push(socket),
        }
    }
    let refused = FLOOD - held.len();
    assert!(refused >= FLOOD - PER_ADDRESS, "{refused} of {FLOOD} flood connections were refused at once");
    let closed_by = Instant::now() + HANDSHAKE_TIMEOUT + Duration::from_secs(3);
    let mut timed_out = 0;
    for socket in held {
        let mut buf = [0u8; 256];
        if let Ok(Ok(0)) = tokio::time::timeout_at(closed_by.into(), socket.read(&mut buf)).await {
            timed_out += 1;
        }
    }
    assert_eq!(timed_out, FLOOD - refused, "every held handshake was closed after the pre-authentication timeout");
    drop(flood);
    // The flooding address itself may connect again once its handshakes are gone.
    let stream = connect_from("127.0.0.1", proxy.addr).await.unwrap();
    let (client, connection) = config.connect_raw(stream, NoTls).await.expect("127.0.0.1 connects again after the flood");
    tokio::spawn(connection);
    client.simple_query("SELECT 1").await.unwrap();

    let growth = rss_mib().saturating_sub(rss_before);
    assert!(growth < RSS_GROWTH_MIB, "resident memory grew by {growth} MiB");
    eprintln!("handshake flood: victim p99 {p99:?}, {refused} refused at once, {timed_out} timed out, RSS +{growth} MiB");
}
