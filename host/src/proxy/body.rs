//! Body wrappers: one keeps something alive until the last byte is sent, one counts bytes,
//! one writes the access log line when the response ends, one hides the length.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};

use crate::access_log::Pending;

/// Wraps a body and holds `guard` (slots, a configuration snapshot) until the body is
/// finished or dropped, whichever comes first.
#[derive(Debug)]
pub struct Guarded<B, G> {
    inner: B,
    guard: Option<G>,
}

impl<B, G> Guarded<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        Guarded {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: Body + Unpin, G: Unpin> Body for Guarded<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            // The last byte is out: free the slots now rather than when hyper drops the body.
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How far a body has come: the data bytes passed so far, and whether it has ended.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes: AtomicU64,
    pub ended: AtomicBool,
}

/// Counts the data bytes of a body as they pass, and notes its end, where others can read.
#[derive(Debug)]
pub struct Counted<B> {
    inner: B,
    progress: Arc<Progress>,
}

impl<B: Body> Counted<B> {
    pub fn new(inner: B, progress: Arc<Progress>) -> Self {
        if inner.is_end_stream() {
            progress.ended.store(true, Ordering::Relaxed);
        }
        Counted { inner, progress }
    }
}

impl<B: Body + Unpin> Body for Counted<B>
where
    B::Data: Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let length = data.remaining() as u64;
                    self.progress.bytes.fetch_add(length, Ordering::Relaxed);
                }
                if self.inner.is_end_stream() {
                    self.progress.ended.store(true, Ordering::Relaxed);
                }
            }
            Poll::Ready(None) => self.progress.ended.store(true, Ordering::Relaxed),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body whose access log line is written when it ends or is dropped, with the
/// bytes that were sent.
#[derive(Debug)]
pub struct Logged<B> {
    inner: B,
    bytes: u64,
    line: Option<Pending>,
}

impl<B> Logged<B> {
    pub fn new(inner: B, line: Pending) -> Self {
        Logged {
            inner,
            bytes: 0,
            line: Some(line),
        }
    }

    fn finish(&mut self) {
        if let Some(line) = self.line.take() {
            line.finish(self.bytes);
        }
    }
}

impl<B: Body + Unpin> Body for Logged<B>
where
    B::Data: Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let sent = frame.data_ref().map_or(0, |data| data.remaining());
                self.bytes += sent as u64;
            }
            Poll::Ready(Some(Err(_))) => {
                // Response bodies come from upstreams: one that fails broke off there.
                if let Some(line) = &mut self.line {
                    line.failed("upstream_reset");
                }
                self.finish();
            }
            Poll::Ready(None) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Logged<B> {
    fn drop(&mut self) {
        // A body cut short (the client went away, an upstream error) still gets its line.
        self.finish();
    }
}

/// A body that does not tell its length, so that HTTP/1.1 sends it chunked: the only framing
/// that carries trailers.
#[derive(Debug)]
pub struct Unsized<B>(pub B);

impl<B: Body + Unpin> Body for Unsized<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}
