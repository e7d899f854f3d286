//! Retries: which failures are retried, the backoff between attempts, the budget that keeps
//! retries a small share of the traffic, and request bodies that can be sent again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming};

use super::UpstreamError;
use crate::config;
use crate::proxy::Counted;

/// A request body on its way upstream: streamed from the client (cut off past the gateway's
/// size limit), or held whole so that it can be sent again.
pub type RequestBody = Either<Limited<ClientBody>, Full<Bytes>>;

/// The client's request body, counted as it passes for the access log.
pub type ClientBody = Counted<Incoming>;

/// A request body as handed to the upstream: still streaming from the client, or read whole
/// by the gateway already.
#[derive(Debug)]
pub enum Outgoing {
    Streamed(Limited<ClientBody>),
    Whole(Bytes),
}

/// An upstream's retry settings and budget.
#[derive(Debug)]
pub struct Retries {
    settings: config::Retry,
    budget: Arc<Budget>,
}

/// Counts the requests in flight to an upstream and the retries among them.
#[derive(Debug, Default)]
struct Budget {
    requests: AtomicU32,
    retries: AtomicU32,
}

/// One request counted in the budget's in-flight requests until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Budget>);

/// A retry's place in the budget, held through its backoff and its attempt.
#[derive(Debug)]
pub struct RetryPlace(Arc<Budget>);

/// Why an attempt is worth sending again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The connection was never made, so nothing was sent.
    ConnectFailed,
    /// The connection closed or reset before any answer.
    Reset,
    /// No answer within the attempt's timeout.
    Timeout,
    /// An answer with a status configured as retryable.
    Status,
}

/// The request body as sent on each attempt.
#[derive(Debug)]
pub enum Replay {
    /// Held whole (perhaps empty); every attempt sends a copy.
    Held(Bytes),
    /// Streamed from the client, so it can be sent once; `None` once it has been.
    Streamed(Option<Limited<ClientBody>>),
}

// === impl Retries ===

impl Retries {
    pub fn new(settings: &config::Retry) -> Retries {
        Retries {
            settings: settings.clone(),
            budget: Arc::default(),
        }
    }

    pub fn max_retries(&self) -> u32 {
        self.settings.max_retries
    }

    pub fn retries_status(&self, status: http::StatusCode) -> bool {
        self.settings.on_status.contains(&status.as_u16())
    }

    /// Counts a request as in flight, the base of the retry budget.
    pub fn in_flight(&self) -> InFlight {
        self.budget.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(self.budget.clone())
    }

    /// A place for one more retry, if the budget has one: retries in flight (those in backoff
    /// included) stay under `budget_percent` of the requests in flight, or
    /// `min_retries_in_flight`, whichever is more.
    pub fn try_place(&self) -> Option<RetryPlace> {
        let requests = self.budget.requests.load(Ordering::Relaxed);
        let share = u64::from(requests) * u64::from(self.settings.budget_percent) / 100;
        let limit = share.max(u64::from(self.settings.min_retries_in_flight));
        let limit = u32::try_from(limit).unwrap_or(u32::MAX);
        self.budget
            .retries
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |retries| {
                (retries < limit).then_some(retries + 1)
            })
            .ok()?;
        Some(RetryPlace(self.budget.clone()))
    }

    /// Full jitter: a random wait up to `base * 2^(retry - 1)`, capped at the maximum.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exponent = retry.saturating_sub(1).min(16);
        let grown = self.settings.backoff_base_ms.checked_mul(1 << exponent);
        let ceiling = grown.map_or(self.settings.backoff_max_ms, |grown| {
            grown.min(self.settings.backoff_max_ms)
        });
        ceiling.mul_f64(rand::random::<f64>())
    }

    /// Whether failures after the request was sent may be retried: for idempotent methods,
    /// or any method when the route allows it. A failed connect is retried for any method,
    /// since nothing was sent.
    pub fn may_resend(&self, method: &Method, any_method: bool) -> bool {
        self.settings.max_retries > 0 && (any_method || is_idempotent(method))
    }

    /// The body to send on each attempt: held whole when it is empty, or when the upstream
    /// retries and the body is small enough to hold (any method: a failed connect is retried
    /// whatever the method); streamed otherwise.
    pub async fn replay(&self, body: Outgoing) -> Result<Replay, UpstreamError> {
        let body = match body {
            Outgoing::Whole(bytes) => return Ok(Replay::Held(bytes)),
            Outgoing::Streamed(body) => body,
        };
        if body.is_end_stream() {
            return Ok(Replay::Held(Bytes::new()));
        }
        let small = body
            .size_hint()
            .upper()
            .is_some_and(|length| length <= self.settings.max_buffered_body_bytes);
        if !(self.settings.max_retries > 0 && small) {
            return Ok(Replay::Streamed(Some(body)));
        }
        match body.collect().await {
            Ok(collected) => Ok(Replay::Held(collected.to_bytes())),
            Err(err) if err.is::<LengthLimitError>() => Err(UpstreamError::BodyTooLarge),
            Err(err) => Err(UpstreamError::ClientBody(err.to_string())),
        }
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

// === impl Reason ===

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ConnectFailed => "connect_failed",
            Reason::Reset => "reset",
            Reason::Timeout => "timeout",
            Reason::Status => "status",
        }
    }
}

// === impl Replay ===

impl Replay {
    /// The body for the next attempt; `None` if it was streamed already.
    pub fn next(&mut self) -> Option<RequestBody> {
        match self {
            Replay::Held(bytes) => Some(Either::Right(Full::new(bytes.clone()))),
            Replay::Streamed(body) => body.take().map(Either::Left),
        }
    }

    pub fn can_resend(&self) -> bool {
        matches!(self, Replay::Held(_))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for RetryPlace {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_a_share_of_requests_in_flight() {
        let retries = Retries::new(&config::Retry {
            budget_percent: 20,
            min_retries_in_flight: 1,
            ..config::Retry::default()
        });
        let requests: Vec<_> = (0..50).map(|_| retries.in_flight()).collect();
        let places: Vec<_> = (0..50).filter_map(|_| retries.try_place()).collect();
        assert_eq!(places.len(), 10, "20% of 50");
        drop(places);
        drop(requests);
        assert!(
            retries.try_place().is_some(),
            "the minimum applies when idle"
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let retries = Retries::new(&config::Retry {
            backoff_base_ms: Duration::from_millis(10),
            backoff_max_ms: Duration::from_millis(30),
            ..config::Retry::default()
        });
        for _ in 0..100 {
            assert!(retries.backoff(1) <= Duration::from_millis(10));
            assert!(retries.backoff(5) <= Duration::from_millis(30));
        }
    }
}
