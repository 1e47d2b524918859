//! A strict HTTP/1.1 server connection. One request at a time per
//! connection (pipelined requests wait their turn), each passing through the
//! same phases: read and validate the head, route, run, write, finish.

pub(crate) mod body;
pub(crate) mod parse;
pub(crate) mod write;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::watch;

use crate::error::error_response;
use crate::panic::CatchUnwind;
use body::{ConnReader, RequestBody, SharedReader, lock};
use parse::{Framing, Rejection, RequestHead, parse_head};
use write::{ResponseContext, Written, write_response};

/// Bytes of an unread request body that are drained after the response so
/// the connection can be reused; a larger remainder closes the connection.
const DRAIN_LIMIT: usize = 64 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// A connection that closes with the client perhaps still sending (a body
/// refused or left unread, a rejected head) reads and throws away what
/// arrives, for at most this long and this many bytes, before its socket
/// closes: a lingering close. Closed with unread bytes, a socket answers
/// with a reset, and a client that writes its whole request before it reads
/// (Python's `http.client`, most scripts) then fails its write or loses the
/// response waiting in its buffer. Two seconds and 4 MiB let such a client
/// finish a body a few times over a common limit on any reasonable link. A
/// client that trickles or floods is cut off at the bound. Lingering holds
/// only the connection's own slot and its address's count, like any slow
/// client; no instance, no kept-alive count, nothing of a tenant's.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 4 << 20;

/// Above this share of a listener's connection slots in use (in percent),
/// idle keep-alive connections get [`PRESSURE_KEEP_ALIVE_TIMEOUT`] instead of
/// `server.keep_alive_timeout_ms`.
pub(crate) const PRESSURE_PERCENT: usize = 75;
pub(crate) const PRESSURE_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// With fewer free slots than a listener's connections divided by this, idle
/// keep-alive connections are closed, oldest first, to make room.
pub(crate) const LOW_WATER_DIVISOR: usize = 8;

/// The limits one connection runs under.
#[derive(Debug, Clone)]
pub(crate) struct ConnLimits {
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub slots: Arc<ConnSlots>,
}

/// A listener's connection slots, and its idle keep-alive connections, which
/// are the first to go when the slots run low.
#[derive(Debug)]
pub(crate) struct ConnSlots {
    pub max: usize,
    pub semaphore: Arc<tokio::sync::Semaphore>,
    idle: Mutex<std::collections::BTreeMap<u64, Arc<tokio::sync::Notify>>>,
    next_idle: std::sync::atomic::AtomicU64,
}

impl ConnSlots {
    pub fn new(max: usize) -> ConnSlots {
        ConnSlots {
            max,
            semaphore: Arc::new(tokio::sync::Semaphore::new(max)),
            idle: Mutex::default(),
            next_idle: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn in_use(&self) -> usize {
        self.max.saturating_sub(self.semaphore.available_permits())
    }

    /// Zero below [`LOW_WATER_DIVISOR`] slots: a listener that small would
    /// otherwise close every connection that goes idle (its own slot being
    /// the last); it relies on the shorter idle timeout alone.
    fn low_water(&self) -> usize {
        self.max / LOW_WATER_DIVISOR
    }

    /// More than [`PRESSURE_PERCENT`] of the slots are in use.
    pub fn under_pressure(&self) -> bool {
        self.in_use() * 100 > self.max * PRESSURE_PERCENT
    }

    /// Fewer free slots than the low-water mark.
    pub fn running_low(&self) -> bool {
        self.semaphore.available_permits() < self.low_water()
    }

    /// The time an idle keep-alive connection may stay open now.
    pub fn keep_alive_timeout(&self, configured: Duration) -> Duration {
        if self.under_pressure() { configured.min(PRESSURE_KEEP_ALIVE_TIMEOUT) } else { configured }
    }

    /// While the slots run low, closes the idle keep-alive connections that
    /// have waited longest, until the low-water mark of free slots would be
    /// restored. They close as soon as their tasks run.
    pub fn close_idle(&self) -> usize {
        let wanted = self.low_water().saturating_sub(self.semaphore.available_permits());
        if wanted == 0 {
            return 0;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut closed = 0;
        while closed < wanted {
            let Some((_, notify)) = idle.pop_first() else { break };
            notify.notify_one();
            closed += 1;
        }
        closed
    }

    /// Registers an idle keep-alive connection; it stays closable until the
    /// returned guard is dropped.
    fn idle(self: &Arc<Self>) -> IdleGuard {
        let key = self.next_idle.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let notify = Arc::new(tokio::sync::Notify::new());
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(key, notify.clone());
        IdleGuard { slots: self.clone(), key, notify }
    }
}

struct IdleGuard {
    slots: Arc<ConnSlots>,
    key: u64,
    notify: Arc<tokio::sync::Notify>,
}

impl Drop for IdleGuard {
    fn drop(&mut self) {
        self.slots.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&self.key);
    }
}

/// The keep-alive connections one tenant's responses hold open. A
/// connection counts against the tenant whose worker's response it carried
/// last, from that response until its next request head has arrived or it
/// closes; a response that would take the count past `max` closes its
/// connection instead (`connection: close`). So one tenant's clients cannot
/// keep the connection slots that other tenants' clients need, whoever
/// opens them. Only atomics: the count is taken and given back on every
/// kept-alive response.
#[derive(Debug)]
pub(crate) struct KeptAlive {
    max: usize,
    held: AtomicUsize,
}

impl KeptAlive {
    pub fn new(max: usize) -> KeptAlive {
        KeptAlive { max, held: AtomicUsize::new(0) }
    }

    /// Counts one more connection, or `None` at the cap.
    fn hold(self: &Arc<Self>) -> Option<KeptAliveGuard> {
        // Over the cap only for the instant before the undo, and never granted.
        if self.held.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.held.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(KeptAliveGuard(self.clone()))
    }

    /// Connections counted now.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

/// One connection counted in a [`KeptAlive`] until dropped.
struct KeptAliveGuard(Arc<KeptAlive>);

impl Drop for KeptAliveGuard {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request as handed to a service.
pub(crate) struct Incoming {
    pub head: RequestHead,
    pub body: RequestBody,
    pub request_id: String,
    pub received: Instant,
}

/// A service's answer: the response, whether to close the connection after
/// it, state that the service wants back in [`Service::finish`], and the
/// tenant (if any) whose count a kept-alive connection joins after it.
pub(crate) struct Outgoing<P> {
    pub response: http::Response<OutBody>,
    pub close: bool,
    pub pending: P,
    pub kept_alive: Option<Arc<KeptAlive>>,
}

/// What the gateway and the admin listener plug into the connection loop.
pub(crate) trait Service: Send + Sync + 'static {
    /// What `admit` found for `call`, for example the routed worker.
    type Target: Send;
    type Pending: Send + 'static;

    /// Before the body is read: decide whether the request may proceed. An
    /// `Err` is answered at once, without reading the body.
    fn admit(&self, head: &RequestHead, request_id: &str, received: Instant) -> Result<Self::Target, Box<Outgoing<Self::Pending>>>;

    /// Runs the request.
    fn call(&self, target: Self::Target, request: Incoming) -> impl Future<Output = Outgoing<Self::Pending>> + Send;

    /// After the response was written (or failed): logging and accounting.
    fn finish(self: Arc<Self>, pending: Self::Pending, written: Written) -> impl Future<Output = ()> + Send;

    /// A request that panicked in `admit` or `call`.
    fn panicked(&self, head_summary: &str, request_id: &str, message: &str);

    /// A request rejected before it could be parsed.
    fn rejected(&self, rejection: &Rejection, request_id: &str, peer: std::net::SocketAddr);
}

/// A response body: fixed bytes (errors, admin) or a worker's stream.
pub(crate) enum OutBody {
    Full(Option<Bytes>),
    Worker(cordon_runtime::ResponseBody),
}

impl http_body::Body for OutBody {
    type Data = Bytes;
    type Error = String;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, String>>> {
        match self.get_mut() {
            OutBody::Full(b) => std::task::Poll::Ready(b.take().map(|b| Ok(http_body::Frame::data(b)))),
            OutBody::Worker(body) => std::pin::Pin::new(body).poll_frame(cx).map_err(|e| e.to_string()),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OutBody::Full(b) => b.is_none(),
            OutBody::Worker(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            OutBody::Full(b) => http_body::SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            OutBody::Worker(body) => body.size_hint(),
        }
    }
}

/// Counts tasks spawned outside a connection so shutdown can wait for them.
#[derive(Clone, Default)]
pub(crate) struct TaskTracker {
    inner: Arc<(std::sync::atomic::AtomicUsize, tokio::sync::Notify)>,
}

impl TaskTracker {
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        use std::sync::atomic::Ordering;
        self.inner.0.fetch_add(1, Ordering::AcqRel);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            task.await;
            if inner.0.fetch_sub(1, Ordering::AcqRel) == 1 {
                inner.1.notify_waiters();
            }
        });
    }

    /// Resolves once no tracked task is running.
    pub async fn idle(&self) {
        loop {
            let notified = self.inner.1.notified();
            if self.inner.0.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

pub(crate) fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

enum HeadOutcome {
    Head(RequestHead),
    /// Closed by the client, idle too long, or shutting down while idle.
    Closed,
    Reject(Rejection),
}

/// Serves one connection until it closes, fails, or shutdown is signalled.
pub(crate) async fn serve_connection<S: Service>(
    stream: TcpStream,
    service: Arc<S>,
    limits: ConnLimits,
    mut shutdown: watch::Receiver<bool>,
    finishing: TaskTracker,
) {
    let peer = stream.peer_addr().unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    let reader: SharedReader = Arc::new(Mutex::new(ConnReader::new(read, limits.max_header_bytes)));
    let mut writer = BufWriter::with_capacity(16 * 1024, write);
    let mut first = true;
    // The count of the tenant whose response this connection carried last.
    let mut kept_alive_for: Option<KeptAliveGuard> = None;

    loop {
        let head = read_head(&reader, &limits, first, &mut shutdown).await;
        // In use again (or closing): no longer held open by that response.
        drop(kept_alive_for.take());
        let head = match head {
            HeadOutcome::Head(head) => head,
            HeadOutcome::Closed => return,
            HeadOutcome::Reject(rejection) => {
                let request_id = new_request_id();
                service.rejected(&rejection, &request_id, peer);
                let response = error_response(rejection.status, rejection.code, &rejection.message, &request_id);
                let cx = ResponseContext {
                    method: &http::Method::GET,
                    http10: false,
                    keep_alive: false,
                    request_id: &request_id,
                    write_timeout: limits.keep_alive_timeout,
                };
                let written = write_response(&mut writer, response, &cx).await;
                close_connection(&mut writer, &reader, written.complete, &limits).await;
                return;
            }
        };
        first = false;
        let received = Instant::now();
        let request_id = new_request_id();
        let summary = format!("{} {}{}", head.method, head.host, head.path());
        let method = head.method.clone();
        let http10 = head.http10;
        let keep_alive = head.keep_alive;
        let framing = head.framing;
        let expect_continue = head.expect_continue;
        let body_generation = lock(&reader).start_body(framing);

        let admitted = CatchUnwind::new(async { service.admit(&head, &request_id, received) }).await;
        let outgoing = match admitted {
            Err(panic) => {
                service.panicked(&summary, &request_id, &panic);
                write_panic(&mut writer, &reader, &method, &request_id, &limits).await;
                return;
            }
            Ok(Err(rejection)) => *rejection,
            Ok(Ok(target)) => {
                if expect_continue && framing != Framing::None && writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
                    return;
                }
                let incoming =
                    Incoming { head, body: RequestBody::new(reader.clone(), body_generation), request_id: request_id.clone(), received };
                match CatchUnwind::new(service.call(target, incoming)).await {
                    Ok(outgoing) => outgoing,
                    Err(panic) => {
                        service.panicked(&summary, &request_id, &panic);
                        write_panic(&mut writer, &reader, &method, &request_id, &limits).await;
                        return;
                    }
                }
            }
        };

        // A malformed body seen while the worker ran turns the answer into a
        // 400, whatever the worker said.
        let body_error = lock(&reader).body_error();
        let (response, close) = match &body_error {
            Some(e) => (error_response(StatusCode::BAD_REQUEST, "bad_request", &e.to_string(), &request_id), true),
            None => (outgoing.response, outgoing.close),
        };
        // Decided now rather than at the head: shutdown may have begun meanwhile.
        let mut keep_alive = keep_alive && !close && !*shutdown.borrow();
        if keep_alive && let Some(count) = &outgoing.kept_alive {
            // Over its tenant's cap, the connection closes after this response.
            kept_alive_for = count.hold();
            keep_alive = kept_alive_for.is_some();
        }
        let cx = ResponseContext { method: &method, http10, keep_alive, request_id: &request_id, write_timeout: limits.keep_alive_timeout };
        let written = write_response(&mut writer, response, &cx).await;
        let (reusable, complete) = (written.reusable, written.complete);
        // Logging and accounting wait for the guest to end; the connection
        // does not. Shutdown waits for these too, so no log line is lost.
        finishing.spawn(service.clone().finish(outgoing.pending, written));

        if !reusable || !drain_body(&reader).await {
            // Closing: no longer one of the tenant's kept-alive connections,
            // whatever the lingering takes.
            drop(kept_alive_for.take());
            close_connection(&mut writer, &reader, complete, &limits).await;
            return;
        }
    }
}

async fn write_panic(
    writer: &mut BufWriter<OwnedWriteHalf>,
    reader: &SharedReader,
    method: &http::Method,
    request_id: &str,
    limits: &ConnLimits,
) {
    let response = error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "internal error", request_id);
    let cx = ResponseContext { method, http10: false, keep_alive: false, request_id, write_timeout: limits.keep_alive_timeout };
    let written = write_response(writer, response, &cx).await;
    close_connection(writer, reader, written.complete, limits).await;
}

/// Ends the connection after its last response: stops writing, so the
/// client reads the end of the response, then, if that response reached
/// the socket and the client may still be sending, lingers (see
/// [`LINGER_TIME`]). Runs in the connection's task, inside its slot.
async fn close_connection(writer: &mut BufWriter<OwnedWriteHalf>, reader: &SharedReader, answered: bool, limits: &ConnLimits) {
    // Bounded like every write: what is left to flush waits on the client.
    let stopped = tokio::time::timeout(limits.keep_alive_timeout, writer.shutdown()).await;
    if answered && matches!(stopped, Ok(Ok(()))) && unread_input(reader) {
        linger(reader).await;
    }
}

/// Whether the client may still be sending: its request body was not read
/// to the end, or bytes wait in the buffer or the socket.
fn unread_input(reader: &SharedReader) -> bool {
    let pending = {
        let r = lock(reader);
        !r.body_done() || !r.buf.is_empty()
    };
    pending || fill_now(reader)
}

/// Reads and discards the client's input until it closes its side, or
/// [`LINGER_BYTES`] or [`LINGER_TIME`] are reached.
async fn linger(reader: &SharedReader) {
    lock(reader).abandon_body();
    let discard = async {
        let mut discarded = 0usize;
        while discarded < LINGER_BYTES {
            match std::future::poll_fn(|cx| lock(reader).poll_discard(cx)).await {
                Ok(0) | Err(_) => return,
                Ok(n) => discarded += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, discard).await;
}

async fn read_head(reader: &SharedReader, limits: &ConnLimits, first: bool, shutdown: &mut watch::Receiver<bool>) -> HeadOutcome {
    let accepted = tokio::time::Instant::now();
    // The first request's clock starts at accept; later ones at their first byte.
    let mut deadline = first.then(|| accepted + limits.header_read_timeout);
    loop {
        {
            let mut r = lock(reader);
            // Tolerate the blank lines some clients send between requests.
            while r.buf.starts_with(b"\r\n") {
                let _ = r.buf.split_to(2);
            }
            if !r.buf.is_empty() {
                match parse_head(&r.buf, limits.max_header_bytes) {
                    Ok(Some((head, len))) => {
                        let _ = r.buf.split_to(len);
                        return HeadOutcome::Head(head);
                    }
                    Ok(None) => {}
                    Err(rejection) => return HeadOutcome::Reject(rejection),
                }
                if deadline.is_none() {
                    deadline = Some(tokio::time::Instant::now() + limits.header_read_timeout);
                }
            }
        }
        let has_bytes = !lock(reader).buf.is_empty();
        if !has_bytes && *shutdown.borrow() {
            // Shutting down: serve a request that has already arrived, close
            // a connection that is idle.
            if !fill_now(reader) {
                return HeadOutcome::Closed;
            }
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + limits.header_read_timeout);
            continue;
        }
        // Between requests, the connection is idle: under pressure its
        // timeout is shorter, and when slots run low it is closed at once or
        // as soon as the accept loop needs its slot.
        let idle = (!has_bytes && !first).then(|| limits.slots.idle());
        if idle.is_some() && limits.slots.running_low() {
            return HeadOutcome::Closed;
        }
        let wait_until =
            deadline.unwrap_or_else(|| tokio::time::Instant::now() + limits.slots.keep_alive_timeout(limits.keep_alive_timeout));
        let fill = std::future::poll_fn(|cx| lock(reader).poll_fill(cx));
        let evicted = async {
            match &idle {
                Some(guard) => guard.notify.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = evicted => return HeadOutcome::Closed,
            read = fill => match read {
                Ok(0) | Err(_) => return HeadOutcome::Closed,
                Ok(_) => {}
            },
            _ = tokio::time::sleep_until(wait_until) => {
                if has_bytes || (first && deadline.is_some()) {
                    return HeadOutcome::Reject(Rejection::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "request_timeout",
                        format!("the request head did not arrive within {} ms", limits.header_read_timeout.as_millis()),
                    ));
                }
                return HeadOutcome::Closed;
            }
            // Checked again at the top of the loop.
            _ = shutdown.changed(), if !has_bytes => {}
        }
    }
}

/// Reads what the socket already holds, without waiting; `true` if that was
/// at least one byte.
fn fill_now(reader: &SharedReader) -> bool {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    matches!(lock(reader).poll_fill(&mut cx), Poll::Ready(Ok(n)) if n > 0)
}

/// Reads and discards what the worker left of the request body, so that the
/// next request on the connection starts at the right byte. `false` when the
/// connection should close instead.
async fn drain_body(reader: &SharedReader) -> bool {
    let drain = async {
        let mut drained = 0usize;
        loop {
            match std::future::poll_fn(|cx| lock(reader).poll_body(cx)).await {
                None => return true,
                Some(Ok(data)) => {
                    drained += data.len();
                    if drained > DRAIN_LIMIT {
                        return false;
                    }
                }
                Some(Err(_)) => return false,
            }
        }
    };
    tokio::time::timeout(DRAIN_TIME, drain).await.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_holds_at_most_its_cap_of_kept_alive_connections_across_threads() {
        let count = Arc::new(KeptAlive::new(8));
        // Places granted and not yet given back, and the most seen at once.
        let live = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..5_000 {
                        // Each thread tries for three at once: twelve wanted, eight places.
                        let guards: Vec<_> = (0..3).filter_map(|_| count.hold()).collect();
                        let now = live.fetch_add(guards.len(), Ordering::SeqCst) + guards.len();
                        peak.fetch_max(now, Ordering::SeqCst);
                        live.fetch_sub(guards.len(), Ordering::SeqCst);
                        drop(guards);
                    }
                });
            }
        });
        assert!(peak.load(Ordering::SeqCst) <= 8, "{} places held at once", peak.load(Ordering::SeqCst));
        assert_eq!(count.held(), 0, "every guard gave its place back");
        let held: Vec<_> = (0..8).map(|_| count.hold().expect("under the cap")).collect();
        assert!(count.hold().is_none(), "the ninth is refused");
        drop(held);
        assert!(count.hold().is_some(), "a place given back is taken again");
    }
}
