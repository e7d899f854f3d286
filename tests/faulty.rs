//! Upstream servers that misbehave on purpose, each in one well-defined way, and one whose
//! answers the test can change while it runs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A loopback address where nothing listens: connections are refused.
pub async fn refusing() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("address")
}

/// A listener that never accepts, with its backlog already full: new connections are never
/// completed, so connecting to it times out. The address stays like this while the returned
/// listener and connections are kept.
pub async fn unanswered_syn() -> (SocketAddr, (tokio::net::TcpListener, Vec<TcpStream>)) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind");
    let listener = socket.listen(1).expect("listen");
    let addr = listener.local_addr().expect("address");
    let mut filling = Vec::new();
    loop {
        let connect = TcpStream::connect(addr);
        match tokio::time::timeout(Duration::from_millis(200), connect).await {
            Ok(Ok(stream)) => filling.push(stream),
            Ok(Err(err)) => panic!("connecting to fill the backlog: {err}"),
            Err(_) => return (addr, (listener, filling)),
        }
        assert!(filling.len() < 64, "the backlog never filled");
    }
}

/// A server that accepts connections and reads forever, never answering.
pub async fn silent() -> SocketAddr {
    raw_server(|mut stream, _| async move {
        let mut sink = [0u8; 1024];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await
    .0
}

/// A server that reads a request's head and then resets the connection.
pub async fn resetting() -> SocketAddr {
    raw_server(|mut stream, _| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream.set_zero_linger();
    })
    .await
    .0
}

/// A server that answers the first request on each connection, keeps the connection open,
/// then reads the next request and closes without answering; the counter holds how many
/// requests it read.
pub async fn closing_after_first() -> (SocketAddr, Arc<AtomicUsize>) {
    raw_server(|mut stream, seen: Arc<AtomicUsize>| async move {
        if read_head(&mut stream).await.is_none() {
            return;
        }
        seen.fetch_add(1, Ordering::SeqCst);
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst";
        if stream.write_all(answer).await.is_err() {
            return;
        }
        if read_head(&mut stream).await.is_some() {
            seen.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await
}

/// A server that sends response headers and part of the body, then closes: `chunked`
/// chooses between chunked framing and a `content-length` of 100.
pub async fn truncating(chunked: bool) -> SocketAddr {
    raw_server(move |mut stream, _| async move {
        let _ = read_head(&mut stream).await;
        let answer: &[u8] = if chunked {
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\na\r\n0123456789\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789"
        };
        let _ = stream.write_all(answer).await;
        let _ = stream.flush().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    })
    .await
    .0
}

/// A server that speaks HTTP/1.0: it answers each connection's one request and closes it.
pub async fn http10() -> SocketAddr {
    raw_server(move |mut stream, _| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await;
        let _ = stream.flush().await;
    })
    .await
    .0
}

/// A server that works on one request at a time, each for `service_time`, and queues the
/// others: its answers slow down with every request waiting. The counter holds the requests
/// it has now, answered or waiting.
pub async fn queueing(service_time: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let worker = Arc::new(tokio::sync::Mutex::new(()));
    raw_server(move |mut stream, present: Arc<AtomicUsize>| {
        let worker = worker.clone();
        async move {
            while read_head(&mut stream).await.is_some() {
                present.fetch_add(1, Ordering::SeqCst);
                {
                    let _turn = worker.lock().await;
                    tokio::time::sleep(service_time).await;
                }
                present.fetch_sub(1, Ordering::SeqCst);
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if stream.write_all(answer).await.is_err() {
                    return;
                }
            }
        }
    })
    .await
}

async fn raw_server<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(TcpStream, Arc<AtomicUsize>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let counter = Arc::new(AtomicUsize::new(0));
    let shared = counter.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream, shared.clone()));
        }
    });
    (addr, counter)
}

/// Reads up to the end of a request's head; `None` when the connection ends first.
async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(head)
}

/// An upstream whose status, health-check status and delay the test sets while it runs.
///
/// Requests for `/healthz` are answered with the health status and not counted; every other
/// request is counted and answered with the status, its body naming the server.
#[derive(Debug, Clone)]
pub struct ControlledUpstream {
    pub addr: SocketAddr,
    state: Arc<Control>,
}

#[derive(Debug)]
struct Control {
    status: AtomicU16,
    health: AtomicU16,
    delay_ms: AtomicU64,
    served: AtomicUsize,
    checked: AtomicUsize,
}

impl ControlledUpstream {
    pub async fn start() -> ControlledUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let state = Arc::new(Control {
            status: AtomicU16::new(200),
            health: AtomicU16::new(200),
            delay_ms: AtomicU64::new(0),
            served: AtomicUsize::new(0),
            checked: AtomicUsize::new(0),
        });
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                let service = service_fn(move |request| answer(request, addr, state.clone()));
                tokio::spawn(async move {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        ControlledUpstream { addr, state }
    }

    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    pub fn set_health(&self, status: u16) {
        self.state.health.store(status, Ordering::SeqCst);
    }

    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.state.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Requests served, health checks excluded.
    pub fn served(&self) -> usize {
        self.state.served.load(Ordering::SeqCst)
    }

    /// Health checks answered.
    pub fn checked(&self) -> usize {
        self.state.checked.load(Ordering::SeqCst)
    }
}

async fn answer(
    request: Request<Incoming>,
    addr: SocketAddr,
    state: Arc<Control>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let status = if request.uri().path() == "/healthz" {
        state.checked.fetch_add(1, Ordering::SeqCst);
        state.health.load(Ordering::SeqCst)
    } else {
        state.served.fetch_add(1, Ordering::SeqCst);
        let delay = state.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        state.status.load(Ordering::SeqCst)
    };
    let mut response = Response::new(Full::new(Bytes::from(addr.to_string())));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    Ok(response)
}
