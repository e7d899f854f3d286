//! The body of an LLM answer on its way to the client.
//!
//! A server-sent event stream is passed on one complete event at a time, as soon as each
//! arrives: events split across reads are put back together, and memory per stream is one
//! event (an event larger than [`MAX_EVENT_BYTES`] is passed on in pieces, unread). Usage
//! is read from the events (or from a JSON answer) to settle the consumer's reservation; the
//! usage event the gateway asked for on the client's behalf is taken out. A pause longer
//! than the idle timeout (or a first byte later than its timeout) ends the stream with an
//! error, which aborts the client's connection rather than ending it cleanly.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use serde_json::Value;
use tokio::time::Sleep;

use super::budget::Charge;
use crate::metrics::{LlmMetrics, LlmUsage};
use crate::proxy::BoxError;

/// The largest event read for usage; a bigger one is passed on without being read.
const MAX_EVENT_BYTES: usize = 1 << 20;

/// The largest JSON answer kept to read its usage.
const MAX_JSON_BYTES: usize = 4 << 20;

/// An LLM answer's body, metered.
pub struct Metered {
    inner: Incoming,
    sse: bool,
    pending: BytesMut,
    ready: VecDeque<Bytes>,
    /// A JSON answer as read so far, while it is small enough to keep.
    json: Option<BytesMut>,
    timer: Pin<Box<Sleep>>,
    idle_timeout: Duration,
    /// The end of the whole answer's time, if it is capped.
    total: Option<Pin<Box<Sleep>>>,
    ended: bool,
    strip_usage_event: bool,
    account: Option<Account>,
}

/// What the stream learns, settled when it ends or is dropped.
pub struct Account {
    pub charge: Option<Charge>,
    pub prompt_estimate: u64,
    pub model: String,
    pub provider: &'static str,
    pub metrics: LlmMetrics,
    pub sent_at: Instant,
    usage: LlmUsage,
    events: u64,
}

impl Account {
    pub fn new(
        charge: Option<Charge>,
        prompt_estimate: u64,
        model: String,
        provider: &'static str,
        metrics: LlmMetrics,
        sent_at: Instant,
    ) -> Account {
        Account {
            charge,
            prompt_estimate,
            model,
            provider,
            metrics,
            sent_at,
            usage: LlmUsage::default(),
            events: 0,
        }
    }

    /// Settles the reservation and records the metrics; `complete` when the answer ended
    /// normally. Without usage figures, the prompt estimate and one token per event streamed
    /// are charged.
    fn settle(mut self, complete: bool) {
        self.usage.duration = self.sent_at.elapsed();
        if self.usage.output.is_none() && !complete {
            self.usage.output = Some(self.events);
        }
        let input = self.usage.input.unwrap_or(self.prompt_estimate);
        let used = input + self.usage.output.unwrap_or(self.events);
        if let Some(charge) = self.charge.take() {
            charge.settle(used);
        }
        self.metrics
            .answered(&self.model, self.provider, self.usage);
    }

    /// Reads any usage figures an event or answer carries.
    fn read_usage(&mut self, value: &Value) {
        let usage = value
            .get("usage")
            .or_else(|| value.get("message")?.get("usage"))
            .or_else(|| value.get("response")?.get("usage"));
        let Some(usage) = usage.filter(|u| u.is_object()) else {
            return;
        };
        let count = |names: [&str; 2]| names.iter().find_map(|name| usage.get(*name)?.as_u64());
        if let Some(input) = count(["prompt_tokens", "input_tokens"]) {
            self.usage.input = Some(input);
        }
        if let Some(output) = count(["completion_tokens", "output_tokens"]) {
            // Anthropic repeats the running output count; the last one is the total.
            self.usage.output = Some(output.max(self.usage.output.unwrap_or(0)));
        }
    }
}

// === impl Metered ===

impl Metered {
    pub fn new(
        inner: Incoming,
        sse: bool,
        strip_usage_event: bool,
        timeouts: &crate::config::Llm,
        account: Account,
    ) -> Metered {
        let total = (timeouts.total_timeout_ms)
            .map(|total| Box::pin(tokio::time::sleep_until((account.sent_at + total).into())));
        Metered {
            inner,
            sse,
            pending: BytesMut::new(),
            ready: VecDeque::new(),
            json: (!sse).then(BytesMut::new),
            timer: Box::pin(tokio::time::sleep(timeouts.first_byte_timeout_ms)),
            idle_timeout: timeouts.idle_timeout_ms,
            total,
            ended: false,
            strip_usage_event,
            account: Some(account),
        }
    }

    fn take(&mut self, data: Bytes) {
        if let Some(account) = self.account.as_mut()
            && account.usage.first_token.is_none()
        {
            account.usage.first_token = Some(account.sent_at.elapsed());
        }
        if !self.sse {
            self.keep_json(&data);
            self.ready.push_back(data);
            return;
        }
        self.pending.extend_from_slice(&data);
        while let Some(end) = event_end(&self.pending) {
            let event = self.pending.split_to(end).freeze();
            if self.read_event(&event) {
                self.ready.push_back(event);
            }
        }
        if self.pending.len() > MAX_EVENT_BYTES {
            self.ready.push_back(self.pending.split().freeze());
        }
    }

    /// Reads one complete event; false when it is the usage event to take out.
    fn read_event(&mut self, event: &[u8]) -> bool {
        let Some(account) = self.account.as_mut() else {
            return true;
        };
        account.events += 1;
        if !contains(event, b"usage") {
            return true;
        }
        let Some(value) = event_data(event) else {
            return true;
        };
        account.read_usage(&value);
        let usage_only = value
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty);
        !(self.strip_usage_event && usage_only)
    }

    fn keep_json(&mut self, data: &Bytes) {
        if let Some(json) = &mut self.json {
            if json.len() + data.len() > MAX_JSON_BYTES {
                self.json = None;
            } else {
                json.extend_from_slice(data);
            }
        }
    }

    fn finish(&mut self, complete: bool) {
        if !self.pending.is_empty() {
            self.ready.push_back(self.pending.split().freeze());
        }
        let Some(mut account) = self.account.take() else {
            return;
        };
        if let Some(value) = (self.json.take()).and_then(|json| serde_json::from_slice(&json).ok())
        {
            account.read_usage(&value);
        }
        account.settle(complete);
    }
}

impl Body for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if let Some(event) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(event))));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let deadline = tokio::time::Instant::now() + this.idle_timeout;
                    this.timer.as_mut().reset(deadline);
                    match frame.into_data() {
                        Ok(data) => this.take(data),
                        // Trailers end the body.
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    }
                }
                Poll::Ready(Some(Err(err))) => {
                    this.finish(false);
                    this.ready.clear();
                    return Poll::Ready(Some(Err(err.into())));
                }
                Poll::Ready(None) => {
                    this.finish(true);
                    this.ended = true;
                }
                Poll::Pending => {
                    let over_total =
                        (this.total.as_mut()).is_some_and(|t| t.as_mut().poll(cx).is_ready());
                    if over_total || this.timer.as_mut().poll(cx).is_ready() {
                        this.finish(false);
                        this.ready.clear();
                        tracing::warn!("LLM answer stalled past its timeout; the stream is cut");
                        return Poll::Ready(Some(Err("the upstream stalled".into())));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.ready.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        if self.sse {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        // Either hyper stopped at the declared length of a JSON answer, or the client went
        // away first: settle on what was read.
        self.finish(false);
    }
}

/// The end of the first complete event in `buffer` (after its blank line), if there is one.
fn event_end(buffer: &[u8]) -> Option<usize> {
    let lf = find(buffer, b"\n\n").map(|at| at + 2);
    let crlf = find(buffer, b"\r\n\r\n").map(|at| at + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The JSON of an event's `data:` lines.
fn event_data(event: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(event).ok()?;
    let data: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(str::trim_start)
        .collect();
    serde_json::from_str(&data.join("\n")).ok()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_end_at_a_blank_line() {
        assert_eq!(event_end(b"data: a\n\ndata: b"), Some(9));
        assert_eq!(event_end(b"data: a\r\n\r\n"), Some(11));
        assert_eq!(event_end(b"data: a\n"), None);
    }

    #[test]
    fn event_data_joins_data_lines() {
        let value = event_data(b"event: x\ndata: {\"usage\":\ndata: 1}\n\n").expect("json");
        assert_eq!(value["usage"], 1);
    }
}
