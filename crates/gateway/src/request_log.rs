//! Logging of finished requests, off the threads that serve them. A request
//! only takes what its log events need (its summary and at most
//! [`LOGGED_OUTPUT_BYTES`] of each output stream), charges that output to
//! its tenant's log byte rate, and hands it to a bounded queue without
//! waiting; one thread formats and emits the events. When the queue is
//! full the record is dropped and counted, and the count is logged once
//! the thread catches up: a flood of requests costs log lines, never the
//! latency of other requests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The most text logged of one output stream of one request, after
/// escaping. The rest is dropped and counted in the event's
/// `truncated_bytes`.
pub const LOGGED_OUTPUT_BYTES: usize = 8 * 1024;

/// The least a tenant's bucket holds: enough for the whole logged output of
/// one request, so that a low rate slows a tenant's output rather than
/// refusing every request that prints much.
const MIN_BURST: u64 = 2 * LOGGED_OUTPUT_BYTES as u64;

/// Requests whose log events may wait for the log thread at once. With at
/// most two streams of [`LOGGED_OUTPUT_BYTES`] each, the queue holds at most
/// about 16 MiB.
pub(crate) const QUEUE_RECORDS: usize = 1024;

/// The summary line of one finished request.
pub(crate) struct RequestLine {
    pub request_id: String,
    pub tenant: String,
    pub worker: String,
    pub method: String,
    pub host: String,
    pub path: String,
    pub status: u16,
    pub outcome: String,
    pub cpu_us: u64,
    /// How long its guest waited for a guest thread before it first ran.
    pub thread_wait_us: u64,
    pub duration_us: u64,
    pub bytes_out: u64,
    pub subrequests: u64,
    pub egress_bytes: u64,
    /// Why the response was not completed, if it was not.
    pub write_error: Option<String>,
}

/// What a request wrote to one output stream, as far as it is logged.
pub(crate) struct Output {
    pub stream: &'static str,
    /// The first [`LOGGED_OUTPUT_BYTES`] bytes of the captured output.
    pub head: Vec<u8>,
    /// Bytes captured beyond `head`.
    pub cut: u64,
    /// Bytes the guest wrote beyond the capture limit (`max_log_bytes`).
    pub capture_dropped: u64,
}

/// The output a tenant's rate refused since it last got through.
#[derive(Debug)]
struct RateNotice {
    dropped_bytes: u64,
    /// True for the first refusal of a run, false when output gets
    /// through again after refusals.
    started: bool,
}

struct Record {
    line: RequestLine,
    outputs: Vec<Output>,
    notice: Option<RateNotice>,
}

/// A tenant's token bucket for logged worker output: it holds up to one
/// second's worth of bytes, and at least [`MIN_BURST`], and refills at the
/// configured rate.
struct Bucket {
    /// The tenant's rate, in bytes per second, and what the bucket holds.
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
    /// Bytes refused since output last got through; nonzero means the
    /// tenant is over its rate and its notice has been logged.
    refused: u64,
}

/// The log byte rate of each tenant: `[[tenant]] worker_log_bytes_per_second`
/// where set, `server.worker_log_bytes_per_second` for the others.
#[derive(Debug, Clone, Default)]
pub(crate) struct LogRates {
    pub default: u64,
    pub tenants: HashMap<String, u64>,
}

impl LogRates {
    /// The same rate for every tenant.
    #[cfg(test)]
    fn uniform(bytes_per_second: u64) -> LogRates {
        LogRates { default: bytes_per_second, tenants: HashMap::new() }
    }

    fn of(&self, tenant: &str) -> u64 {
        self.tenants.get(tenant).copied().unwrap_or(self.default)
    }
}

pub(crate) struct RequestLog {
    queue: Option<SyncSender<Record>>,
    dropped: Arc<AtomicU64>,
    buckets: Mutex<HashMap<String, Bucket>>,
    rates: LogRates,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RequestLog {
    pub fn new(rates: LogRates) -> Self {
        Self::with_capacity(rates, QUEUE_RECORDS)
    }

    fn with_capacity(rates: LogRates, records: usize) -> Self {
        Self::with_emitter(rates, records, Box::new(emit))
    }

    fn with_emitter(rates: LogRates, records: usize, emit: Box<dyn Fn(Record) + Send>) -> Self {
        let (queue, rx) = sync_channel(records);
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = dropped.clone();
        let thread = std::thread::Builder::new()
            .name("cordon-request-log".into())
            .spawn(move || run(rx, &counter, emit))
            .map_err(|e| tracing::error!(error = %e, "cannot start the request log thread; request lines will not be logged"))
            .ok();
        Self { queue: Some(queue), dropped, buckets: Mutex::default(), rates, thread }
    }

    /// Takes what is logged of the request's output, charges it to the
    /// tenant's rate, and queues the record without waiting.
    pub fn submit(&self, line: RequestLine, outputs: [(&'static str, &cordon_runtime::CapturedText); 2]) {
        let mut outputs: Vec<Output> = outputs
            .into_iter()
            .filter(|(_, t)| !t.bytes.is_empty() || t.dropped > 0)
            .map(|(stream, t)| {
                let kept = t.bytes.len().min(LOGGED_OUTPUT_BYTES);
                Output { stream, head: t.bytes[..kept].to_vec(), cut: (t.bytes.len() - kept) as u64, capture_dropped: t.dropped }
            })
            .collect();
        let cost: u64 = outputs.iter().map(|o| o.head.len() as u64).sum();
        let notice = match outputs.is_empty() {
            true => None,
            false => self.charge(&line.tenant, cost).unwrap_or_else(|notice| {
                outputs.clear();
                notice
            }),
        };
        self.enqueue(Record { line, outputs, notice });
    }

    /// Charges `cost` bytes to the tenant's bucket: `Ok` when the output
    /// may be logged, `Err` when it is over the rate and must be dropped.
    /// Either carries a notice when the tenant's output starts being
    /// refused, or gets through again after being refused.
    fn charge(&self, tenant: &str, cost: u64) -> Result<Option<RateNotice>, Option<RateNotice>> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = match buckets.get_mut(tenant) {
            Some(b) => b,
            None => {
                let rate = self.rates.of(tenant);
                let burst = rate.max(MIN_BURST) as f64;
                buckets.entry(tenant.to_string()).or_insert(Bucket { rate: rate as f64, burst, tokens: burst, at: now, refused: 0 })
            }
        };
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * bucket.rate).min(bucket.burst);
        bucket.at = now;
        if bucket.tokens >= cost as f64 {
            bucket.tokens -= cost as f64;
            let refused = std::mem::take(&mut bucket.refused);
            return Ok((refused > 0).then_some(RateNotice { dropped_bytes: refused, started: false }));
        }
        let first = bucket.refused == 0;
        bucket.refused += cost.max(1);
        Err(first.then_some(RateNotice { dropped_bytes: cost, started: true }))
    }

    fn enqueue(&self, record: Record) {
        let Some(queue) = &self.queue else { return };
        match queue.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Records dropped because the queue was full.
    #[cfg(test)]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for RequestLog {
    /// Lets the thread log what is queued, then waits for it.
    fn drop(&mut self) {
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(rx: Receiver<Record>, dropped: &AtomicU64, emit: Box<dyn Fn(Record) + Send>) {
    let mut reported = 0;
    loop {
        let next = rx.recv_timeout(Duration::from_secs(1));
        let now = dropped.load(Ordering::Relaxed);
        if now > reported {
            tracing::warn!(
                target: "cordon::request",
                dropped_records = now - reported,
                dropped_total = now,
                "the request log fell behind; the log events of this many requests were dropped"
            );
            reported = now;
        }
        match next {
            Ok(record) => {
                emit(record);
                // Take what else is queued, then let records gather for a
                // moment: a sender wakes this thread only when it waits in
                // `recv`, so under load the serving threads make one wake-up
                // per batch instead of a futex call and a context switch
                // per request.
                while let Ok(record) = rx.try_recv() {
                    emit(record);
                }
                std::thread::sleep(BATCH_INTERVAL);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// How long the log thread lets records gather after a batch: at most this
/// much delay to a log line, and at most one wake-up of the thread per
/// interval however many requests are served.
const BATCH_INTERVAL: Duration = Duration::from_millis(2);

fn emit(record: Record) {
    let Record { line: l, outputs, notice } = record;
    tracing::info!(
        target: "cordon::request",
        request_id = %l.request_id,
        tenant = %l.tenant,
        worker = %l.worker,
        method = %l.method,
        host = %l.host,
        path = %l.path,
        status = l.status,
        outcome = %l.outcome,
        cpu_us = l.cpu_us,
        thread_wait_us = l.thread_wait_us,
        duration_us = l.duration_us,
        bytes_out = l.bytes_out,
        subrequests = l.subrequests,
        egress_bytes = l.egress_bytes,
        "request"
    );
    if let Some(e) = &l.write_error {
        tracing::debug!(request_id = %l.request_id, error = %e, "response not completed");
    }
    match notice {
        Some(RateNotice { dropped_bytes, started: true }) => tracing::warn!(
            target: "cordon::worker",
            request_id = %l.request_id,
            tenant = %l.tenant,
            worker = %l.worker,
            dropped_bytes,
            "the tenant's worker output is over its log rate (worker_log_bytes_per_second, of its [[tenant]] or [server]); its output is dropped until the rate allows it again"
        ),
        Some(RateNotice { dropped_bytes, started: false }) => tracing::warn!(
            target: "cordon::worker",
            request_id = %l.request_id,
            tenant = %l.tenant,
            worker = %l.worker,
            dropped_bytes,
            "the tenant's worker output is logged again; output over its log rate was dropped"
        ),
        None => {}
    }
    for o in outputs {
        let (text, unlogged) = escape_capped(&o.head, LOGGED_OUTPUT_BYTES);
        let truncated_bytes = unlogged as u64 + o.cut;
        let (request_id, tenant, worker, stream) = (l.request_id.as_str(), l.tenant.as_str(), l.worker.as_str(), o.stream);
        match (truncated_bytes, o.capture_dropped) {
            (0, 0) => tracing::info!(target: "cordon::worker", request_id, tenant, worker, stream, "{text}"),
            (t, 0) => tracing::info!(target: "cordon::worker", request_id, tenant, worker, stream, truncated_bytes = t, "{text}"),
            (t, d) => {
                tracing::warn!(target: "cordon::worker", request_id, tenant, worker, stream, truncated_bytes = t, dropped_bytes = d, "{text}")
            }
        }
    }
}

/// A worker's output as one line of text: newlines and every other control
/// character (but tab) written as escapes, invalid UTF-8 as `\x..`, so that
/// a worker cannot forge or hide log lines or steer the operator's
/// terminal. Stops before `cap` bytes of text; returns the text and the
/// number of input bytes left out.
pub(crate) fn escape_capped(bytes: &[u8], cap: usize) -> (String, usize) {
    let mut out = String::with_capacity(bytes.len().min(cap));
    let mut consumed = 0;
    let mut piece = String::new();
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            piece.clear();
            if c == '\n' {
                piece.push_str("\\n");
            } else if c.is_control() && c != '\t' {
                piece.extend(c.escape_default());
            } else {
                piece.push(c);
            }
            if out.len() + piece.len() > cap {
                return (out, bytes.len() - consumed);
            }
            out.push_str(&piece);
            consumed += c.len_utf8();
        }
        for b in chunk.invalid() {
            if out.len() + 4 > cap {
                return (out, bytes.len() - consumed);
            }
            out.push_str(&format!("\\x{b:02x}"));
            consumed += 1;
        }
    }
    (out, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(tenant: &str) -> RequestLine {
        RequestLine {
            request_id: "r".into(),
            tenant: tenant.into(),
            worker: "w".into(),
            method: "GET".into(),
            host: "h".into(),
            path: "/".into(),
            status: 200,
            outcome: "ok".into(),
            cpu_us: 0,
            thread_wait_us: 0,
            duration_us: 0,
            bytes_out: 0,
            subrequests: 0,
            egress_bytes: 0,
            write_error: None,
        }
    }

    #[test]
    fn worker_output_cannot_carry_control_characters_into_the_logs() {
        assert_eq!(escape_capped(b"plain\ttext", 100), ("plain\ttext".to_string(), 0));
        let forged = "ok\n2026-01-01 INFO cordon: admin login\r \u{1b}[2Jcleared\u{7}\u{85}";
        let (safe, left) = escape_capped(forged.as_bytes(), 1000);
        assert_eq!(left, 0);
        assert!(!safe.chars().any(|c| c.is_control() && c != '\t'), "{safe:?}");
        assert!(safe.contains("\\n2026") && safe.contains("\\r") && safe.contains("\\u{1b}"), "{safe}");
        assert_eq!(escape_capped(b"a\xffb", 100).0, "a\\xffb");
    }

    #[test]
    fn logged_text_stays_under_the_cap_however_it_escapes() {
        let newlines = vec![b'\n'; 131_072];
        let (text, left) = escape_capped(&newlines, LOGGED_OUTPUT_BYTES);
        assert!(text.len() <= LOGGED_OUTPUT_BYTES);
        assert_eq!(text.len() / 2 + left, 131_072, "every byte is either logged or counted");
        let escapes = vec![0x1b; 10_000];
        let (text, left) = escape_capped(&escapes, 100);
        assert!(text.len() <= 100 && left > 9_900, "{} {left}", text.len());
    }

    #[test]
    fn a_tenant_over_its_rate_is_dropped_counted_and_noticed_once() {
        let log = RequestLog::with_capacity(LogRates::uniform(10_000), 16);
        assert!(matches!(log.charge("a", 8_000), Ok(None)));
        assert!(matches!(log.charge("a", 8_000), Ok(None)));
        // Over the rate: the first refusal carries the notice, the next do not.
        assert!(matches!(log.charge("a", 8_000), Err(Some(RateNotice { started: true, dropped_bytes: 8_000 }))));
        assert!(matches!(log.charge("a", 8_000), Err(None)));
        // Another tenant has its own bucket.
        assert!(matches!(log.charge("b", 8_000), Ok(None)));
        // Once the bucket refills, output gets through with the count of what was dropped.
        std::thread::sleep(Duration::from_millis(1000));
        match log.charge("a", 8_000) {
            Ok(Some(RateNotice { started: false, dropped_bytes })) => assert_eq!(dropped_bytes, 16_000),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_tenants_own_rate_applies_to_that_tenant_only() {
        let rates = LogRates { default: 10_000, tenants: HashMap::from([("loud".to_string(), 100_000)]) };
        let log = RequestLog::with_capacity(rates, 16);
        // The default: 10,000 bytes a second, with the 16 KiB least burst.
        assert!(matches!(log.charge("quiet", 8_000), Ok(None)));
        assert!(matches!(log.charge("quiet", 8_000), Ok(None)));
        assert!(matches!(log.charge("quiet", 8_000), Err(Some(_))));
        // Its own: a burst of 100,000 bytes, twelve times the same output.
        for i in 0..12 {
            assert!(matches!(log.charge("loud", 8_000), Ok(None)), "charge {i} of the tenant with its own rate");
        }
        assert!(matches!(log.charge("loud", 8_000), Err(Some(_))));
        // A third tenant gets the default, not the override.
        assert!(matches!(log.charge("other", 8_000), Ok(None)));
        assert!(matches!(log.charge("other", 8_000), Ok(None)));
        assert!(matches!(log.charge("other", 8_000), Err(Some(_))));
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        // A log thread that cannot keep up: each record blocks it until released.
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let wait = Mutex::new(wait);
        let log = RequestLog::with_emitter(
            LogRates::uniform(1 << 30),
            4,
            Box::new(move |_| {
                let _ = wait.lock().unwrap().recv();
            }),
        );
        let started = Instant::now();
        for _ in 0..100 {
            log.submit(
                line("a"),
                [("stdout", &cordon_runtime::CapturedText::default()), ("stderr", &cordon_runtime::CapturedText::default())],
            );
        }
        let took = started.elapsed();
        assert!(took < Duration::from_millis(200), "submitting took {took:?}");
        // One record is with the thread, four wait in the queue.
        assert!(log.dropped() >= 95, "dropped {}", log.dropped());
        for _ in 0..100 {
            let _ = release.send(());
        }
    }
}
