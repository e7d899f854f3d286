//! Streaming: server-sent events reach the client as they are sent, and large bodies pass
//! both ways through a gateway process whose memory stays flat.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sluice_tests::process::GatewayProcess;
use sluice_tests::{TestGateway, TestUpstream};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::PLAIN_ROUTE;

const EVENTS: usize = 8;
const EVENT_INTERVAL: Duration = Duration::from_millis(100);
const MIB: u64 = 1 << 20;

/// Bytes sent each way in the bulk test: 256 MiB, or `SLUICE_TEST_BULK_MIB` MiB (1024 for a
/// full gibibyte each way).
fn bulk() -> u64 {
    let mib = std::env::var("SLUICE_TEST_BULK_MIB")
        .ok()
        .and_then(|v| v.parse().ok());
    mib.unwrap_or(256) * MIB
}

type StreamedBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Serves `answer` on a free loopback port.
async fn serve<F, Fut>(answer: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<StreamedBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let answer = answer.clone();
            let service = service_fn(move |request| {
                let answer = answer.clone();
                async move { Ok::<_, Infallible>(answer(request).await) }
            });
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A body whose chunks are sent through a channel, each at the moment its sender writes it.
fn channel_body() -> (mpsc::Sender<Bytes>, StreamedBody) {
    let (sender, receiver) = mpsc::channel::<Bytes>(4);
    (sender, ChannelBody(receiver).boxed())
}

struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}

/// An SSE upstream: one event every [`EVENT_INTERVAL`], each stamped with when it was sent.
async fn sse_upstream(origin: Instant) -> SocketAddr {
    serve(move |_request| async move {
        let (sender, body) = channel_body();
        tokio::spawn(async move {
            for n in 0..EVENTS {
                tokio::time::sleep(EVENT_INTERVAL).await;
                let sent = origin.elapsed().as_micros();
                let event = format!("id: {n}\ndata: {sent}\n\n");
                if sender.send(Bytes::from(event)).await.is_err() {
                    return;
                }
            }
        });
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(body)
            .unwrap()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_reach_the_client_as_they_are_sent() {
    let origin = Instant::now();
    let upstream = TestUpstream::external(sse_upstream(origin).await);
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = Request::get(gateway.url("/events"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let mut body = client.request(request).await.unwrap().into_body();
    let mut delays = Vec::new();
    let mut pending = String::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.unwrap().into_data() else {
            continue;
        };
        let arrived = origin.elapsed().as_micros();
        pending.push_str(std::str::from_utf8(&data).unwrap());
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let sent: u128 = event
                .split("data: ")
                .nth(1)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            delays.push(Duration::from_micros((arrived - sent) as u64));
        }
    }

    assert_eq!(delays.len(), EVENTS);
    let worst = delays.iter().max().unwrap();
    println!("SSE delay per event through the gateway: {delays:?}");
    // An event held until the response ended would wait up to 700 ms.
    assert!(
        *worst < EVENT_INTERVAL,
        "an event waited {worst:?} in the gateway: {delays:?}"
    );
}

/// An upstream that counts uploaded bytes and streams [`bulk`] bytes on `GET /download`.
async fn bulk_upstream() -> SocketAddr {
    serve(|request: Request<Incoming>| async move {
        if request.method() == http::Method::GET {
            let (sender, body) = channel_body();
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![7u8; MIB as usize]);
                for _ in 0..bulk() / MIB {
                    if sender.send(chunk.clone()).await.is_err() {
                        return;
                    }
                }
            });
            return Response::builder()
                .header("content-length", bulk().to_string())
                .body(body)
                .unwrap();
        }
        let mut body = request.into_body();
        let mut received = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            received += frame.data_ref().map_or(0, |d| d.len() as u64);
        }
        let text = Bytes::from(received.to_string());
        Response::new(Full::new(text).boxed())
    })
    .await
}

/// Runs `transfer` while sampling the gateway's memory; returns the highest sample.
async fn peak_rss_during<F: Future<Output = ()>>(gateway: &GatewayProcess, transfer: F) -> u64 {
    let mut peak = gateway.rss_bytes();
    tokio::pin!(transfer);
    let mut every = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            () = &mut transfer => return peak.max(gateway.rss_bytes()),
            _ = every.tick() => peak = peak.max(gateway.rss_bytes()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_uploads_and_downloads_stream_through_in_flat_memory() {
    let upstream = TestUpstream::external(bulk_upstream().await);
    let config = sluice_tests::gateway::config_text_with(
        &upstream,
        &format!("max_body_bytes = {}", 2 * bulk()),
        PLAIN_ROUTE,
    );
    let gateway =
        GatewayProcess::start(Path::new(env!("CARGO_BIN_EXE_sluice-gateway")), &config).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<StreamedBody>();
    let url = format!("http://{}/bulk", gateway.addr);
    let warm = Request::post(&url).body(Full::new(Bytes::from_static(b"warm")).boxed());
    client.request(warm.unwrap()).await.unwrap();
    let baseline = gateway.rss_bytes();

    let upload = async {
        let (sender, body) = channel_body();
        tokio::spawn(async move {
            let chunk = Bytes::from(vec![1u8; MIB as usize]);
            for _ in 0..bulk() / MIB {
                sender.send(chunk.clone()).await.unwrap();
            }
        });
        let response = client
            .request(Request::post(&url).body(body).unwrap())
            .await
            .unwrap();
        let received = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(received, bulk().to_string().as_bytes());
    };
    let upload_peak = peak_rss_during(&gateway, upload).await;

    let download = async {
        let request = Request::get(&url).body(Full::new(Bytes::new()).boxed());
        let mut body = client.request(request.unwrap()).await.unwrap().into_body();
        let mut received = 0u64;
        while let Some(frame) = body.frame().await {
            received += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
        }
        assert_eq!(received, bulk());
    };
    let download_peak = peak_rss_during(&gateway, download).await;

    println!(
        "gateway RSS: {} MiB at rest, peak {} MiB uploading and {} MiB downloading {} MiB",
        baseline / MIB,
        upload_peak / MIB,
        download_peak / MIB,
        bulk() / MIB
    );
    for peak in [upload_peak, download_peak] {
        assert!(
            peak < baseline + 64 * MIB,
            "the gateway grew from {} MiB to {} MiB",
            baseline / MIB,
            peak / MIB
        );
    }
}

/// An upstream answering like a gRPC server: a message, then `grpc-status` as a trailer,
/// announced in a `Trailer` header when `declared` (real HTTP/2 gRPC servers do not).
async fn trailer_upstream(declared: bool) -> SocketAddr {
    serve(move |request: Request<Incoming>| async move {
        let te = request.headers().get("te").cloned();
        let version = format!("{:?}", request.version());
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let body = Full::new(Bytes::from_static(b"\0\0\0\0\x02hi"))
            .with_trailers(async move { Some(Ok(trailers)) })
            .boxed();
        let mut response = Response::builder()
            .header("x-version-seen", version)
            .header("content-type", "application/grpc");
        if declared {
            // Chunked, as trailers need in HTTP/1.1, though the length is known.
            response = response
                .header("transfer-encoding", "chunked")
                .header("trailer", "grpc-status");
        }
        if let Some(te) = te {
            response = response.header("x-te-seen", te);
        }
        response.body(body).unwrap()
    })
    .await
}

#[tokio::test]
async fn trailers_pass_through_to_http2_and_http1_clients() {
    let upstream = TestUpstream::external(trailer_upstream(true).await);
    for (protocol, seen) in [("http1", "HTTP/1.1"), ("http2", "HTTP/2.0")] {
        let fragment = format!("protocol = \"{protocol}\"\n{PLAIN_ROUTE}");
        let gateway = TestGateway::start(&upstream, &fragment).await;
        for http2 in [true, false] {
            grpc_call(&gateway, http2, seen).await;
        }
    }
}

#[tokio::test]
async fn undeclared_grpc_trailers_from_an_http2_upstream_reach_http1_clients() {
    let upstream = TestUpstream::external(trailer_upstream(false).await);
    let fragment = format!("protocol = \"http2\"\n{PLAIN_ROUTE}");
    let gateway = TestGateway::start(&upstream, &fragment).await;
    for http2 in [false, true] {
        grpc_call(&gateway, http2, "HTTP/2.0").await;
    }
}

/// A gRPC-like call through `gateway`, over HTTP/2 or HTTP/1.1, to an upstream reached with
/// the HTTP version `seen`.
async fn grpc_call(gateway: &TestGateway, http2: bool, seen: &str) {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build_http::<Full<Bytes>>();
    let request = Request::post(gateway.url("/grpc.Echo/Say"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.headers()["x-version-seen"], seen);
    assert_eq!(
        response.headers()["x-te-seen"],
        "trailers",
        "TE: trailers reached the upstream"
    );
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    assert_eq!(
        trailers.as_ref().and_then(|t| t.get("grpc-status")),
        Some(&http::HeaderValue::from_static("0")),
        "http2: {http2}, upstream {seen}, trailers: {trailers:?}"
    );
    assert_eq!(collected.to_bytes(), &b"\0\0\0\0\x02hi"[..]);
}
