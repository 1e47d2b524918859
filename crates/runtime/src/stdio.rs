//! Capture of a guest's stdout and stderr: kept in memory up to a cap, then
//! logged once per request, tagged with the request id. Output past the cap
//! is dropped and counted; the guest is never blocked or trapped by it.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// What a guest wrote to one stream.
#[derive(Debug, Default, Clone)]
pub struct CapturedText {
    pub bytes: Vec<u8>,
    /// Bytes written beyond the cap and dropped.
    pub dropped: u64,
}

/// A capped in-memory sink, shared by every handle the guest opens on it.
#[derive(Clone)]
pub(crate) struct CapturedOutput {
    inner: Arc<Mutex<CapturedText>>,
    cap: usize,
}

impl CapturedOutput {
    pub(crate) fn new(cap: u64) -> Self {
        Self { inner: Arc::default(), cap: usize::try_from(cap).unwrap_or(usize::MAX) }
    }

    pub(crate) fn take(&self) -> CapturedText {
        std::mem::take(&mut *self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn append(&self, buf: &[u8]) {
        let mut text = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let room = self.cap.saturating_sub(text.bytes.len());
        let kept = room.min(buf.len());
        text.bytes.extend_from_slice(&buf[..kept]);
        text.dropped += (buf.len() - kept) as u64;
    }
}

impl IsTerminal for CapturedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for CapturedOutput {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_past_the_cap_is_counted_not_kept() {
        let out = CapturedOutput::new(4);
        out.append(b"abc");
        out.append(b"defg");
        let text = out.take();
        assert_eq!(text.bytes, b"abcd");
        assert_eq!(text.dropped, 3);
    }
}
