//! Who a request is: its `X-Request-Id` and its W3C trace context (`traceparent`,
//! `tracestate`).
//!
//! A request id the client sent is kept when it is plausible (1 to 128 visible ASCII
//! characters), so a caller can follow its own id through the logs; otherwise the gateway
//! makes one (a UUID v4). A valid `traceparent` keeps its trace id and flags and gets a new
//! parent id, the gateway's own span; a missing or invalid one starts a new trace and drops
//! any `tracestate`, which belongs to the trace it came with.

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The longest client request id kept.
const MAX_REQUEST_ID: usize = 128;

/// A request's id and trace, as sent upstream.
#[derive(Debug, Clone)]
pub struct Identity {
    pub request_id: HeaderValue,
    /// 32 lowercase hex digits.
    pub trace_id: String,
}

/// A parsed `traceparent` (version 00).
#[derive(Debug, Clone, PartialEq, Eq)]
struct TraceParent {
    trace_id: String,
    flags: String,
}

/// Assigns the request its id and trace, and writes both into `headers` for the upstream.
pub fn assign(headers: &mut HeaderMap) -> Identity {
    let request_id = headers
        .get(&X_REQUEST_ID)
        .filter(|value| is_valid_request_id(value.as_bytes()))
        .cloned()
        .unwrap_or_else(new_request_id);
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());

    let incoming = headers
        .get(&TRACEPARENT)
        .and_then(|value| TraceParent::parse(value.as_bytes()));
    let parent = incoming.unwrap_or_else(|| {
        headers.remove(&TRACESTATE);
        TraceParent::new()
    });
    let value = parent.with_span(new_span_id());
    // NB: only hex digits and dashes.
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(TRACEPARENT.clone(), value);
    }
    Identity {
        request_id,
        trace_id: parent.trace_id,
    }
}

fn is_valid_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID).contains(&id.len()) && id.iter().all(|b| b.is_ascii_graphic())
}

/// A random (version 4) UUID. The bytes come from the thread's random generator, seeded once
/// by the operating system, not from a system call per request.
fn new_request_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut text = uuid::Uuid::encode_buffer();
    // NB: a hyphenated UUID is always a valid header value.
    HeaderValue::from_str(id.hyphenated().encode_lower(&mut text))
        .unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// A random span id, never zero (an invalid id in W3C trace context).
fn new_span_id() -> u64 {
    rand::random::<u64>().max(1)
}

// === impl TraceParent ===

impl TraceParent {
    fn new() -> Self {
        TraceParent {
            trace_id: format!("{:032x}", rand::random::<u128>().max(1)),
            flags: "00".to_string(),
        }
    }

    /// Parses `00-<trace id>-<parent id>-<flags>`; a higher version may carry more fields
    /// after these, which are ignored (W3C Trace Context, section 3.2.4).
    fn parse(value: &[u8]) -> Option<TraceParent> {
        let text = std::str::from_utf8(value).ok()?.trim();
        let mut fields = text.split('-');
        let version = fields.next()?;
        let trace_id = fields.next()?;
        let parent_id = fields.next()?;
        let flags = fields.next()?;
        let valid = is_hex(version, 2)
            && version != "ff"
            && (version != "00" || fields.next().is_none())
            && is_hex(trace_id, 32)
            && is_hex(parent_id, 16)
            && is_hex(flags, 2)
            && !is_zero(trace_id)
            && !is_zero(parent_id);
        valid.then(|| TraceParent {
            trace_id: trace_id.to_string(),
            flags: flags.to_string(),
        })
    }

    fn with_span(&self, span_id: u64) -> String {
        format!("00-{}-{span_id:016x}-{}", self.trace_id, self.flags)
    }
}

fn is_hex(field: &str, len: usize) -> bool {
    field.len() == len
        && field
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn is_zero(field: &str) -> bool {
    field.bytes().all(|b| b == b'0')
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_request_id_is_kept_and_a_bad_one_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert("x-request-id", HeaderValue::from_static("abc-123"));
        assert_eq!(assign(&mut headers).request_id, "abc-123");

        for bad in ["", "has space", &"x".repeat(129)] {
            let mut headers = HeaderMap::new();
            headers.insert("x-request-id", HeaderValue::from_str(bad).unwrap());
            let id = assign(&mut headers).request_id;
            assert_eq!(id.len(), 36, "{bad:?} gave {id:?}");
            assert_eq!(headers["x-request-id"], id);
        }
    }

    #[test]
    fn a_valid_traceparent_keeps_its_trace_with_a_new_span() {
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", HeaderValue::from_static(PARENT));
        headers.insert("tracestate", HeaderValue::from_static("vendor=1"));
        let identity = assign(&mut headers);

        assert_eq!(identity.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        let sent = headers["traceparent"].to_str().unwrap();
        assert!(
            sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{sent}"
        );
        assert!(sent.ends_with("-01"), "{sent}");
        assert_ne!(sent, PARENT);
        assert_eq!(headers["tracestate"], "vendor=1");
    }

    #[test]
    fn an_invalid_traceparent_starts_a_new_trace() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("traceparent", HeaderValue::from_static(bad));
            headers.insert("tracestate", HeaderValue::from_static("vendor=1"));
            let identity = assign(&mut headers);
            assert_ne!(
                identity.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736",
                "{bad}"
            );
            assert!(TraceParent::parse(headers["traceparent"].as_bytes()).is_some());
            assert!(!headers.contains_key("tracestate"), "{bad}");
        }
    }

    #[test]
    fn a_later_version_is_read_for_its_known_fields() {
        let parsed =
            TraceParent::parse(b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what");
        assert_eq!(parsed.unwrap().trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    }
}
