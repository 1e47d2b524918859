//! The writer behind every log event: a formatted event is handed to a
//! bounded queue without waiting, and one thread writes the queue to
//! stderr. A slow or blocked stderr (a full pipe, a stalled journal) then
//! costs log lines, counted, never the latency of the thread that logged.
//! The count is written as its own line as soon as the writer catches up,
//! and at least every second while lines are being dropped.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

/// Lines that may wait for the writer at once.
pub const QUEUE_LINES: usize = 8192;
/// Bytes that may wait for the writer at once (the memory the queue can
/// hold, whatever the lines' sizes).
pub const QUEUE_BYTES: usize = 16 * 1024 * 1024;

/// How the drop notice is written, to match the other lines.
#[derive(Clone, Copy)]
pub enum NoticeFormat {
    Text,
    Json,
}

/// The producing end; cheap to clone, one per event.
#[derive(Clone)]
pub struct NonBlocking {
    queue: SyncSender<Vec<u8>>,
    queued_bytes: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
    max_bytes: usize,
}

impl NonBlocking {
    /// Starts the writer thread over `sink`.
    pub fn start<W: Write + Send + 'static>(sink: W, format: NoticeFormat) -> std::io::Result<Self> {
        Self::with_bounds(sink, format, QUEUE_LINES, QUEUE_BYTES)
    }

    fn with_bounds<W: Write + Send + 'static>(sink: W, format: NoticeFormat, lines: usize, max_bytes: usize) -> std::io::Result<Self> {
        let (queue, rx) = sync_channel(lines);
        let this = Self { queue, queued_bytes: Arc::default(), dropped: Arc::default(), max_bytes };
        let (queued_bytes, dropped) = (this.queued_bytes.clone(), this.dropped.clone());
        std::thread::Builder::new()
            .name("cordon-log-writer".into())
            .spawn(move || write_lines(rx, sink, format, &queued_bytes, &dropped))?;
        Ok(this)
    }

    /// Waits up to `timeout` for the queued lines to be written, so that
    /// the last lines before the process exits are not lost.
    pub fn drain(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while self.queued_bytes.load(Ordering::Relaxed) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Lines dropped so far because the queue was full.
    #[cfg(test)]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Write for NonBlocking {
    /// Takes one formatted event; never waits.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let before = self.queued_bytes.fetch_add(buf.len(), Ordering::Relaxed);
        if before + buf.len() > self.max_bytes {
            self.queued_bytes.fetch_sub(buf.len(), Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(buf.len());
        }
        if let Err(TrySendError::Full(line) | TrySendError::Disconnected(line)) = self.queue.try_send(buf.to_vec()) {
            self.queued_bytes.fetch_sub(line.len(), Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn write_lines<W: Write>(rx: Receiver<Vec<u8>>, mut sink: W, format: NoticeFormat, queued_bytes: &AtomicUsize, dropped: &AtomicU64) {
    let mut reported = 0;
    loop {
        let next = rx.recv_timeout(Duration::from_secs(1));
        let now = dropped.load(Ordering::Relaxed);
        if now > reported {
            let _ = sink.write_all(notice(format, now - reported, now).as_bytes());
            reported = now;
        }
        match next {
            Ok(line) => {
                let mut write = |line: Vec<u8>| {
                    let _ = sink.write_all(&line);
                    // Only now: `drain` waits for the bytes to be written, not just taken.
                    queued_bytes.fetch_sub(line.len(), Ordering::Relaxed);
                };
                write(line);
                // Take what else is queued, then let lines gather for a
                // moment, so that logging threads wake this one once per
                // batch rather than once per line.
                while let Ok(line) = rx.try_recv() {
                    write(line);
                }
                std::thread::sleep(BATCH_INTERVAL);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// How long the writer lets lines gather after a batch: the most a line is
/// delayed, and the most often the writer is woken.
const BATCH_INTERVAL: Duration = Duration::from_millis(2);

fn notice(format: NoticeFormat, dropped: u64, total: u64) -> String {
    let message = "the log writer fell behind; log lines were dropped";
    match format {
        NoticeFormat::Text => format!("WARN cordon::log: {message} dropped_lines={dropped} dropped_total={total}\n"),
        NoticeFormat::Json => {
            format!(
                "{{\"level\":\"WARN\",\"target\":\"cordon::log\",\"message\":\"{message}\",\"dropped_lines\":{dropped},\"dropped_total\":{total}}}\n"
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Instant;

    use super::*;

    /// A sink that blocks every write until released, then records it.
    struct Stuck {
        release: Receiver<()>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Stuck {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _ = self.release.recv();
            self.written.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_sink_costs_counted_lines_not_waiting() {
        let (release, rx) = std::sync::mpsc::channel();
        let written = Arc::new(Mutex::new(Vec::new()));
        let mut w = NonBlocking::with_bounds(Stuck { release: rx, written: written.clone() }, NoticeFormat::Json, 8, 1 << 20).unwrap();
        let started = Instant::now();
        for i in 0..1000 {
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        let took = started.elapsed();
        assert!(took < Duration::from_millis(200), "logging 1000 lines took {took:?}");
        // At most one line is with the writer and eight wait in the queue.
        assert!(w.dropped() >= 1000 - 9, "dropped {}", w.dropped());
        for _ in 0..100 {
            release.send(()).unwrap();
        }
        // A notice reports what was dropped by the time it is written; the
        // writer thread may write one before the loop above has finished
        // (if it first ran late), and the rest in a later one. The notices'
        // counts must add up to every line dropped, and the last one must
        // give the total.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = String::from_utf8_lossy(&written.lock().unwrap()).to_string();
            let notices: Vec<serde_json::Value> =
                text.lines().filter(|l| l.contains("dropped_lines")).map(|l| serde_json::from_str(l).unwrap()).collect();
            if notices.last().is_some_and(|v| v["dropped_total"].as_u64() == Some(w.dropped())) {
                let reported: u64 = notices.iter().map(|v| v["dropped_lines"].as_u64().unwrap()).sum();
                assert_eq!(reported, w.dropped(), "{text}");
                assert!(text.contains("line 0\n"), "{text}");
                break;
            }
            assert!(Instant::now() < deadline, "no drop notice with the total {} in {text}", w.dropped());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_too() {
        let (_release, rx) = std::sync::mpsc::channel();
        let mut w = NonBlocking::with_bounds(Stuck { release: rx, written: Arc::default() }, NoticeFormat::Text, 1000, 10_000).unwrap();
        let line = vec![b'x'; 1000];
        for _ in 0..100 {
            w.write_all(&line).unwrap();
        }
        assert!(w.queued_bytes.load(Ordering::Relaxed) <= 10_000);
        assert!(w.dropped() >= 89, "dropped {}", w.dropped());
    }
}
