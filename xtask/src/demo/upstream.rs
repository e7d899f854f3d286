//! The demo's upstream: an HTTP server that answers every request with a JSON echo of it, so
//! what the policies changed on the way is plain to see.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::Result;

/// Starts serving on `addr`; abort the handle to stop accepting.
pub async fn start(addr: SocketAddr) -> Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|err| super::busy(addr.port(), "the demo upstream", &err))?;
    println!("xtask: demo upstream listening on http://{addr}");
    Ok(tokio::spawn(accept_loop(listener)))
}

async fn accept_loop(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(stream));
            }
            Err(err) => {
                // Out of file descriptors, usually; pausing lets connections close meanwhile.
                eprintln!("xtask: demo upstream cannot accept: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_connection(stream: TcpStream) {
    let connection = auto::Builder::new(TokioExecutor::new());
    // A failed connection is a client that went away; the demo has nothing to do about it.
    let _ = connection
        .serve_connection(TokioIo::new(stream), service_fn(echo))
        .await;
}

async fn echo(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    // A body that breaks off is reported as `null` rather than as a misleading count.
    let body_bytes = body.collect().await.ok().map(|body| body.to_bytes().len());

    let echo = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map_or("/", |path| path.as_str()),
        "headers": headers_json(&parts.headers),
        "body_bytes": body_bytes,
    });
    let mut text = serde_json::to_string_pretty(&echo).unwrap_or_default();
    text.push('\n');

    let mut response = Response::new(Full::new(Bytes::from(text)));
    let content_type = HeaderValue::from_static("application/json");
    response.headers_mut().insert(CONTENT_TYPE, content_type);
    Ok(response)
}

/// Each header as a string, or as an array of strings when it was sent more than once.
/// Values that are not UTF-8 are decoded lossily: the echo is for reading, not for parsing.
fn headers_json(headers: &HeaderMap) -> Value {
    let mut object = Map::new();
    for name in headers.keys() {
        let mut values: Vec<Value> = headers
            .get_all(name)
            .iter()
            .map(|value| {
                String::from_utf8_lossy(value.as_bytes())
                    .into_owned()
                    .into()
            })
            .collect();
        let value = match values.len() {
            1 => values.remove(0),
            _ => Value::Array(values),
        };
        object.insert(name.as_str().to_string(), value);
    }
    Value::Object(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_headers_become_arrays() {
        let mut headers = HeaderMap::new();
        headers.append("x-one", HeaderValue::from_static("a"));
        headers.append("x-two", HeaderValue::from_static("b"));
        headers.append("x-two", HeaderValue::from_static("c"));
        let json = headers_json(&headers);
        assert_eq!(json, json!({"x-one": "a", "x-two": ["b", "c"]}));
    }

    #[test]
    fn non_utf8_values_are_decoded_lossily() {
        let mut headers = HeaderMap::new();
        let value = HeaderValue::from_bytes(b"caf\xe9").expect("valid header bytes");
        headers.insert("x-name", value);
        assert_eq!(headers_json(&headers), json!({"x-name": "caf\u{fffd}"}));
    }
}
