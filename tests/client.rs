//! A minimal HTTP client for the tests, and a raw-socket one for bytes no client would send.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A complete response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends a GET.
pub async fn get(url: &str) -> Reply {
    send(Request::get(url).body(Bytes::new()).expect("valid request")).await
}

/// Sends a request on a new connection and reads the whole response (30 s at most).
pub async fn send(request: Request<Bytes>) -> Reply {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = request.map(Full::new);
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .expect("response within 30 s")
        .expect("request sent");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("whole body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Starts a GET that the test upstream answers after `delay` (its `x-delay-ms` header), and
/// returns once the request has had time to reach the gateway: the caller acts while it is
/// in flight and awaits the handle for its reply.
pub async fn in_flight_get(url: &str, delay: Duration) -> tokio::task::JoinHandle<Reply> {
    let request = Request::get(url)
        .header("x-delay-ms", delay.as_millis().to_string())
        .body(Bytes::new())
        .expect("valid request");
    let handle = tokio::spawn(send(request));
    tokio::time::sleep(delay / 4).await;
    handle
}

/// Writes raw bytes to `addr` and returns everything read until the server closes the
/// connection or `wait` passes.
pub async fn send_raw(addr: std::net::SocketAddr, bytes: &[u8], wait: Duration) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut out)).await;
    out
}

/// One client connection written to and read from by hand, for keep-alive and framing tests.
pub struct RawConnection {
    stream: TcpStream,
    buffered: Vec<u8>,
}

/// A response read off a [`RawConnection`]: the head as text, and the body.
#[derive(Debug)]
pub struct RawResponse {
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn status(&self) -> u16 {
        self.head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0)
    }

    /// The value of the first header called `name`, ignoring case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

impl RawConnection {
    pub async fn open(addr: std::net::SocketAddr) -> RawConnection {
        let stream = TcpStream::connect(addr).await.expect("connect");
        RawConnection {
            stream,
            buffered: Vec::new(),
        }
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Writes `bytes` if the gateway still takes them: false once it has closed the connection.
    pub async fn try_write(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    /// Reads one response whose body is framed by `Content-Length` (none for `head_only`);
    /// `None` if the connection closed first. Gives up after 10 s.
    pub async fn response(&mut self, head_only: bool) -> Option<RawResponse> {
        let read = tokio::time::timeout(Duration::from_secs(10), self.read_response(head_only));
        read.await.expect("a response within 10 s")
    }

    async fn read_response(&mut self, head_only: bool) -> Option<RawResponse> {
        let end = loop {
            if let Some(end) = find(&self.buffered, b"\r\n\r\n") {
                break end + 4;
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buffered[..end]).into_owned();
        self.buffered.drain(..end);
        let mut response = RawResponse {
            head,
            body: Vec::new(),
        };
        let length: usize = match response.header("content-length") {
            Some(length) if !head_only => length.parse().expect("a length"),
            _ => 0,
        };
        while self.buffered.len() < length {
            self.fill().await?;
        }
        response.body = self.buffered.drain(..length).collect();
        Some(response)
    }

    /// Whether the gateway closes the connection within `wait` (reading and dropping anything
    /// it still sends).
    pub async fn is_closed_within(&mut self, wait: Duration) -> bool {
        let mut rest = Vec::new();
        matches!(
            tokio::time::timeout(wait, self.stream.read_to_end(&mut rest)).await,
            Ok(Ok(_)) | Ok(Err(_))
        )
    }

    /// Reads at least `n` bytes past any response already read.
    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        while self.buffered.len() < n {
            self.fill().await.expect("more bytes");
        }
        self.buffered.drain(..n).collect()
    }

    async fn fill(&mut self) -> Option<()> {
        let mut chunk = [0; 16 * 1024];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                self.buffered.extend_from_slice(&chunk[..n]);
                Some(())
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
