//! noisy-rate: an open-loop HTTP/1 load generator that holds a fixed rate.
//!
//! Usage: `noisy-rate --url http://127.0.0.1:PORT/ --host hello.localhost
//!         --rate 200 --duration 10s --connections 8 [--warmup 1s] [--timeout 10s]`
//!
//! wrk is closed-loop: each connection sends its next request only when the
//! previous one is answered, so when the server stalls, the client stalls
//! with it and the requests it would have sent meanwhile are never measured
//! ("coordinated omission"). That hides exactly the latency a noisy
//! neighbour causes. Here request `i` is due at `start + i / rate` whatever
//! happened before, and its latency is measured from that due time, so time
//! spent waiting for a free connection counts against the server too.
//!
//! Prints one JSON line: rate, sent, ok, errors, p50/p90/p99/p99.9/max
//! latency of the 200 responses in microseconds, and `lag_p99_us` /
//! `lag_max_us`: how late requests got a connection (large values mean the
//! pool was exhausted; the latencies still include that wait).

use std::error::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};

type BoxError = Box<dyn Error + Send + Sync>;

/// How early the dispatcher wakes before a request is due (see below).
const EARLY: Duration = Duration::from_micros(100);

struct Args {
    url: Uri,
    host: String,
    rate: f64,
    duration: Duration,
    warmup: Duration,
    connections: usize,
    timeout: Duration,
}

/// `10s`, `500ms`, `1m`, `2.5s`; a bare number is seconds (as for wrk).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let n: f64 = num.parse().map_err(|_| format!("bad duration '{s}'"))?;
    let secs = match unit {
        "ms" => n / 1e3,
        "" | "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in '{s}' (ms, s, m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("bad duration '{s}'"))
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut url, mut host, mut rate) = (None, None, None);
    let (mut duration, mut warmup, mut timeout) = (Duration::from_secs(10), Duration::ZERO, Duration::from_secs(10));
    let mut connections = 8usize;
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => url = Some(value.parse::<Uri>().map_err(|e| format!("--url: {e}"))?),
            "--host" => host = Some(value),
            "--rate" => rate = Some(value.parse::<f64>().ok().filter(|r| *r > 0.0 && r.is_finite()).ok_or("--rate must be > 0")?),
            "--duration" => duration = parse_duration(&value)?,
            "--warmup" => warmup = parse_duration(&value)?,
            "--timeout" => timeout = parse_duration(&value)?,
            "--connections" => connections = value.parse().ok().filter(|c| *c > 0).ok_or("--connections must be > 0")?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    let url = url.ok_or("--url is required")?;
    if url.scheme_str() != Some("http") || url.host().is_none() {
        return Err("--url must be http://HOST:PORT/PATH".into());
    }
    let host = host.unwrap_or_else(|| url.authority().unwrap().to_string());
    Ok(Args { url, host, rate: rate.ok_or("--rate is required")?, duration, warmup, connections, timeout })
}

/// Keep-alive connections. A request holds a permit while it uses one, so
/// at most `--connections` are open; the semaphore is FIFO, so requests
/// that wait get connections in the order they were due.
struct Pool {
    permits: Semaphore,
    idle: Mutex<Vec<SendRequest<Empty<Bytes>>>>,
    addr: String,
}

async fn connect(addr: &str) -> Result<SendRequest<Empty<Bytes>>, BoxError> {
    let stream = TcpStream::connect(addr).await?;
    // One small request per write: Nagle would only add delay.
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// One request: wait for a connection, send, read the whole body. Returns
/// the latency from the due time; `lag` gets how late the connection came.
async fn one(pool: &Pool, req: Request<Empty<Bytes>>, due: Instant, lag: &mut Option<Duration>) -> Result<Duration, BoxError> {
    let _permit = pool.permits.acquire().await?;
    *lag = Some(due.elapsed());
    // A permit with no idle connection means fewer than the limit are open.
    let pooled = pool.idle.lock().unwrap().pop();
    let mut conn = match pooled {
        Some(c) => c,
        None => connect(&pool.addr).await?,
    };
    if conn.ready().await.is_err() {
        // The server closed it while idle; that is not the request's fault.
        conn = connect(&pool.addr).await?;
        conn.ready().await?;
    }
    let result = async {
        let resp = conn.send_request(req).await?;
        let status = resp.status();
        resp.into_body().collect().await?;
        Ok::<_, BoxError>(status)
    }
    .await;
    let latency = due.elapsed();
    if !conn.is_closed() {
        pool.idle.lock().unwrap().push(conn);
    }
    match result? {
        StatusCode::OK => Ok(latency),
        status => Err(format!("HTTP {status}").into()),
    }
}

struct Sample {
    measured: bool,
    lag: Option<Duration>,
    latency: Option<Duration>,
}

/// Nearest-rank percentile of sorted microseconds; null if there are none.
fn pct(sorted: &[u64], q: f64) -> serde_json::Value {
    if sorted.is_empty() {
        return serde_json::Value::Null;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].into()
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("noisy-rate: {e}");
        std::process::exit(2);
    });
    // One thread runs all the I/O: this shares a small machine with the
    // server under test, and a few hundred requests a second need no more.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let pool = Arc::new(Pool {
        permits: Semaphore::new(args.connections),
        idle: Mutex::new(Vec::new()),
        addr: format!("{}:{}", args.url.host().unwrap(), args.url.port_u16().unwrap_or(80)),
    });
    let path = args.url.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let (tx, mut rx) = mpsc::unbounded_channel::<Sample>();
    let first_error = Arc::new(AtomicBool::new(false));

    // The schedule is kept by a plain thread: tokio's timer has a 1 ms
    // granularity, which would add up to 1 ms to every latency. The thread
    // hands each request to the runtime when it is due (~30 us).
    let handle = rt.handle().clone();
    let (rate, warmup, timeout, host) = (args.rate, args.warmup, args.timeout, args.host.clone());
    let total = args.warmup + args.duration;
    let dispatcher = std::thread::spawn(move || {
        let start = Instant::now() + Duration::from_millis(10);
        let mut sent = 0u64;
        for i in 0u64.. {
            let offset = Duration::from_secs_f64(i as f64 / rate);
            if offset >= total {
                break;
            }
            let due = start + offset;
            let now = Instant::now();
            // nanosleep overshoots by 50-100 us (the kernel's timer slack),
            // so wake a little early and spin the rest: ~20 us of CPU per
            // request, for a schedule kept to a few microseconds.
            if due > now + EARLY {
                std::thread::sleep(due - now - EARLY);
            }
            while Instant::now() < due {
                std::hint::spin_loop();
            }
            let measured = offset >= warmup;
            sent += measured as u64;
            let req = Request::get(path.as_str()).header(hyper::header::HOST, host.as_str()).body(Empty::new()).expect("request");
            let (pool, tx, first_error) = (pool.clone(), tx.clone(), first_error.clone());
            handle.spawn(async move {
                let mut lag = None;
                // The deadline runs from the due time, so a request stuck
                // behind a dead connection ends too.
                let deadline = tokio::time::Instant::from_std(due + timeout);
                let result = match tokio::time::timeout_at(deadline, one(&pool, req, due, &mut lag)).await {
                    Ok(r) => r,
                    Err(_) => Err("timed out".into()),
                };
                if let Err(e) = &result
                    && !first_error.swap(true, Ordering::Relaxed)
                {
                    eprintln!("noisy-rate: first error: {e}");
                }
                let _ = tx.send(Sample { measured, lag, latency: result.ok() });
            });
        }
        sent
    });

    // Every task sends exactly one sample and ends by its deadline, so the
    // channel closes once the dispatcher and the last task are done.
    let samples: Vec<Sample> = rt.block_on(async {
        let mut all = Vec::new();
        while let Some(s) = rx.recv().await {
            all.push(s);
        }
        all
    });
    let sent = dispatcher.join().expect("dispatcher thread");

    let us = |d: Duration| d.as_micros() as u64;
    let measured: Vec<&Sample> = samples.iter().filter(|s| s.measured).collect();
    let mut lat: Vec<u64> = measured.iter().filter_map(|s| s.latency.map(us)).collect();
    let mut lag: Vec<u64> = measured.iter().filter_map(|s| s.lag.map(us)).collect();
    lat.sort_unstable();
    lag.sort_unstable();
    let out = serde_json::json!({
        "rate": args.rate,
        "sent": sent,
        "ok": lat.len(),
        "errors": measured.len() - lat.len(),
        "p50_us": pct(&lat, 0.50),
        "p90_us": pct(&lat, 0.90),
        "p99_us": pct(&lat, 0.99),
        "p999_us": pct(&lat, 0.999),
        "max_us": lat.last(),
        "lag_p99_us": pct(&lag, 0.99),
        "lag_max_us": lag.last(),
    });
    println!("{out}");
}
