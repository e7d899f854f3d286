//! Checks and applies the changes a policy asks for.
//!
//! Nothing a policy returns reaches the wire unchecked: header names must be tokens, values
//! must not contain CR, LF or NUL, framing and hop-by-hop headers are the gateway's alone,
//! and a rewritten path must be a valid origin-form target. A change that fails these checks
//! is a plugin failure, and the whole change is refused, never partly applied.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::bindings::types::{DirectResponse, Header, HeaderChanges};
use crate::proxy::Body;

/// Headers that only the gateway may set: they frame the message or concern one connection.
const PROTECTED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// A change a policy may not make.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMutation {
    #[error("`{0}` is not a valid header name")]
    HeaderName(String),
    #[error("the value of `{0}` contains a forbidden byte (CR, LF, NUL or another control)")]
    HeaderValue(String),
    #[error("`{0}` is managed by the gateway and cannot be changed by a policy")]
    Protected(String),
    #[error("`{0}` is not a valid path and query (it must start with `/`)")]
    Path(String),
    #[error("{0} is not a valid response status")]
    Status(u16),
}

/// Applies header changes (removals, then sets, then adds) after checking every one of them.
pub fn apply_header_changes(
    headers: &mut HeaderMap,
    changes: HeaderChanges,
) -> Result<(), InvalidMutation> {
    let remove = changes
        .remove
        .iter()
        .map(|name| checked_name(name))
        .collect::<Result<Vec<_>, _>>()?;
    let set = checked_headers(changes.set)?;
    let add = checked_headers(changes.add)?;

    for name in remove {
        headers.remove(name);
    }
    for (name, value) in set {
        headers.insert(name, value);
    }
    for (name, value) in add {
        headers.append(name, value);
    }
    Ok(())
}

/// Checks a rewritten path and query.
pub fn rewrite_path(path_and_query: &str) -> Result<PathAndQuery, InvalidMutation> {
    let invalid = || InvalidMutation::Path(path_and_query.escape_debug().to_string());
    if !path_and_query.starts_with('/') {
        return Err(invalid());
    }
    path_and_query.parse().map_err(|_| invalid())
}

/// Builds the response a policy answers with.
pub fn direct_response(reply: DirectResponse) -> Result<Response<Body>, InvalidMutation> {
    let status = StatusCode::from_u16(reply.status)
        .ok()
        .filter(|status| !status.is_informational())
        .ok_or(InvalidMutation::Status(reply.status))?;
    let headers = checked_headers(reply.headers)?;

    let mut response = Response::new(
        Full::new(Bytes::from(reply.body))
            .map_err(|e| match e {})
            .boxed(),
    );
    *response.status_mut() = status;
    for (name, value) in headers {
        response.headers_mut().append(name, value);
    }
    Ok(response)
}

fn checked_headers(
    headers: Vec<Header>,
) -> Result<Vec<(HeaderName, HeaderValue)>, InvalidMutation> {
    headers
        .into_iter()
        .map(|header| {
            let name = checked_name(&header.name)?;
            let value = HeaderValue::from_bytes(&header.value)
                .map_err(|_| InvalidMutation::HeaderValue(header.name.clone()))?;
            Ok((name, value))
        })
        .collect()
}

fn checked_name(name: &str) -> Result<HeaderName, InvalidMutation> {
    let parsed = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| InvalidMutation::HeaderName(name.escape_debug().to_string()))?;
    if PROTECTED.contains(&parsed.as_str()) {
        return Err(InvalidMutation::Protected(parsed.as_str().to_string()));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, value: &[u8]) -> Header {
        Header {
            name: name.to_string(),
            value: value.to_vec(),
        }
    }

    fn changes(set: Vec<Header>) -> HeaderChanges {
        HeaderChanges {
            remove: vec![],
            set,
            add: vec![],
        }
    }

    #[test]
    fn changes_apply_in_order() {
        let mut headers = HeaderMap::new();
        headers.insert("x-old", HeaderValue::from_static("1"));
        let all = HeaderChanges {
            remove: vec!["x-old".into()],
            set: vec![header("x-new", b"a")],
            add: vec![header("x-new", b"b")],
        };
        apply_header_changes(&mut headers, all).unwrap();
        assert!(headers.get("x-old").is_none());
        let values: Vec<_> = headers.get_all("x-new").iter().collect();
        assert_eq!(values, ["a", "b"]);
    }

    #[test]
    fn crlf_nul_and_bad_names_are_refused_and_nothing_is_applied() {
        for bad in [
            changes(vec![
                header("x-ok", b"1"),
                header("x-evil", b"a\r\nx-injected: yes"),
            ]),
            changes(vec![header("x-nul", b"a\0b")]),
            changes(vec![header("bad name", b"1")]),
            changes(vec![header(":authority", b"example.com")]),
            changes(vec![header("Transfer-Encoding", b"chunked")]),
        ] {
            let mut headers = HeaderMap::new();
            assert!(apply_header_changes(&mut headers, bad).is_err());
            assert!(headers.is_empty());
        }
    }

    #[test]
    fn paths_must_be_origin_form() {
        assert!(rewrite_path("/v1/items?page=2").is_ok());
        assert!(rewrite_path("v1").is_err());
        assert!(rewrite_path("/a\r\nx: y").is_err());
    }

    #[test]
    fn informational_statuses_cannot_answer_a_request() {
        let reply = DirectResponse {
            status: 101,
            headers: vec![],
            body: vec![],
        };
        assert_eq!(
            direct_response(reply).unwrap_err(),
            InvalidMutation::Status(101)
        );
    }
}
