//! The public listener: accepts connections and serves HTTP/1.1 and HTTP/2 (h2c) on them.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};

use crate::gateway::Gateway;

/// Serves connections from `listener` until `shutdown` resolves, then waits up to `grace` for
/// in-flight requests to finish.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(gateway.header_read_timeout());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, client)) => serve_connection(&builder, &graceful, stream, client, gateway.clone()),
                Err(err) => {
                    // Running out of file descriptors is transient: back off instead of spinning.
                    tracing::warn!("accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }

    drop(listener);
    tracing::info!("draining in-flight requests");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "requests still running after the grace period were cut"
        );
    }
}

fn serve_connection(
    builder: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    stream: TcpStream,
    client: SocketAddr,
    gateway: Arc<Gateway>,
) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |request| {
        let gateway = gateway.clone();
        async move {
            // Each request keeps the snapshot it arrived under until its response is built.
            let snapshot = gateway.snapshot();
            Ok::<_, Infallible>(super::handle(&snapshot, gateway.metrics(), request, client).await)
        }
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    let connection = graceful.watch(connection.into_owned());
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(client.addr = %client, "connection ended with an error: {err}");
        }
    });
}
