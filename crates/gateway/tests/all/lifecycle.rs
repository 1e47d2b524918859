//! Limits in time, panics, and shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cordon_gateway::{FilterRejection, RequestFilter, RequestSummary};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wall_clock_limit_gives_504() {
    let s = start(&standard_workers()).await;
    let started = Instant::now();
    let r = s.get("hostile.localhost", "/sleep?ms=10000").await;
    assert_eq!(r.status, 504);
    assert_eq!(r.error_code(), "wall_time_exceeded");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(5), "wall limit is 2 s, took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_is_not_charged_as_cpu_time() {
    let s = start(&standard_workers()).await;
    // 300 ms asleep against a 50 ms CPU limit: fine.
    let r = s.get("hostile.localhost", "/sleep?ms=300").await;
    assert_eq!((r.status, r.text().as_str()), (200, "slept"));
    // 300 ms of spinning is not.
    let r = s.get("hostile.localhost", "/spin?ms=300").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.error_code(), "cpu_limit_exceeded");
}

struct PanicOnBoom;

impl RequestFilter for PanicOnBoom {
    fn check(&self, request: &RequestSummary<'_>) -> Result<(), FilterRejection> {
        if request.path == "/boom" {
            panic!("a bug in a request filter");
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_fails_only_its_own_request() {
    let options = Options { filter: Some(Arc::new(PanicOnBoom)), ..Options::default() };
    let s = start_with(&standard_workers(), options).await;
    let (boom, fine) = tokio::join!(s.get("hello.localhost", "/boom"), s.get("hello.localhost", "/fine"));
    assert_eq!(boom.status, 500);
    assert_eq!(boom.error_code(), "internal_error");
    assert!(!boom.text().contains("filter"), "the panic message stays in the logs: {}", boom.text());
    assert_eq!(fine.status, 200);
    for _ in 0..3 {
        assert_eq!(s.get("hello.localhost", "/after").await.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_requests_in_flight_finish() {
    let mut s = start(&standard_workers()).await;
    let addr = s.addr;
    let in_flight = tokio::spawn(async move { request(addr, "GET", "hostile.localhost", "/sleep?ms=800", &[], None).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // No new connections once shutdown has begun.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "the listener is closed");
    let r = in_flight.await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "slept"));
    assert_eq!(r.header("connection"), Some("close"));
    s.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_instance_pool_gives_503_not_a_hang() {
    // Two slots and a quota of one per tenant: two other tenants fill the
    // pool between them.
    let third = format!(
        "[[worker]]\nname = \"third\"\ntenant = \"third\"\ncomponent = \"{}\"\nroutes = [\"third.localhost/\"]\n",
        guest("hostile").display()
    );
    let s = start_with(&(third + &standard_workers()), Options { max_instances: Some(2), ..Options::default() }).await;
    let addr = s.addr;
    let holders: Vec<_> = ["hostile.localhost", "third.localhost"]
        .map(|host| tokio::spawn(async move { request(addr, "GET", host, "/sleep?ms=1000", &[], None).await }))
        .into();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = s.get("hello.localhost", "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.error_code(), "over_capacity");
    assert_eq!(r.header("retry-after"), Some("1"));
    for holder in holders {
        assert_eq!(holder.await.unwrap().text(), "slept");
    }
    // The slot is free again.
    assert_eq!(s.get("hello.localhost", "/").await.status, 200);
}
