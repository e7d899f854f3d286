//! The public listener: accepts connections and serves HTTP/1.1 and HTTP/2 on them, over TLS
//! or in clear text (h2c).
//!
//! Two limits protect the listener itself. At most `max_connections` client connections are
//! open: past it the gateway stops accepting until one closes, so new clients wait in the
//! kernel's backlog instead of being refused or served by a process out of descriptors. And a
//! client has `header_read_timeout_ms` from accept to send its request headers: a connection
//! that sends nothing, or trickles bytes, is closed.
//!
//! With TLS configured, the handshake (ALPN `h2` or `http/1.1`) also has to finish within the
//! header deadline.
//!
//! A request head larger than `max_header_bytes` is answered 431 by hyper, which then closes
//! the connection; HTTP/1.1 heads are also checked for ambiguous framing (see [`framing`]).
//!
//! [`framing`]: super::framing

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use super::forwarded::Peer;
use super::framing::FramingCheck;
use crate::access_log::AccessLog;
use crate::gateway::Gateway;
use crate::metrics::Metrics;

/// Limits that apply to every client connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: u32,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
}

/// Serves connections from `listener` until `shutdown` resolves, then waits up to `grace` for
/// in-flight requests to finish.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    front: Front,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections as usize));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            accepted = accept(&listener, &connections) => match accepted {
                Ok((stream, client, permit)) => {
                    let (gateway, front) = (gateway.clone(), front.clone());
                    let connection = Connection {
                        stream, client, limits, gateway, front, _permit: permit,
                    };
                    connection.spawn(&graceful);
                }
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

/// Waits for a free connection slot, then for a connection.
async fn accept(
    listener: &TcpListener,
    connections: &Arc<Semaphore>,
) -> std::io::Result<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    // NB: the semaphore is never closed.
    let permit = connections
        .clone()
        .acquire_owned()
        .await
        .map_err(std::io::Error::other)?;
    let (stream, client) = listener.accept().await?;
    Ok((stream, client, permit))
}

/// What every connection on the listener shares, besides the gateway.
#[derive(Clone)]
pub struct Front {
    pub access_log: AccessLog,
    /// TLS for the listener, when configured.
    pub tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front")
            .field("access_log", &self.access_log)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// An accepted client connection and the slot it holds.
struct Connection {
    stream: TcpStream,
    client: SocketAddr,
    limits: ConnectionLimits,
    gateway: Arc<Gateway>,
    front: Front,
    _permit: OwnedSemaphorePermit,
}

/// A connection ready for HTTP: after the TLS handshake, if there is one.
struct Session {
    client: SocketAddr,
    limits: ConnectionLimits,
    gateway: Arc<Gateway>,
    access_log: AccessLog,
    secure: bool,
}

impl Connection {
    fn spawn(self, graceful: &GracefulShutdown) {
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let accepted = Instant::now();
            let metrics = self.gateway.metrics().clone();
            metrics.connections_active.inc();
            // hyper's header timer starts only once it knows the protocol, which needs the
            // first bytes: wait for them here, within the same deadline.
            let first_bytes = tokio::time::timeout(
                self.limits.header_read_timeout,
                self.stream.peek(&mut [0; 1]),
            )
            .await;
            match first_bytes {
                Ok(Ok(n)) if n > 0 => self.serve(accepted, watcher).await,
                Ok(_) => {}
                Err(_) => metrics
                    .connections_rejected
                    .with_label_values(&["header_timeout"])
                    .inc(),
            }
            metrics.connections_active.dec();
        });
    }

    /// Completes the TLS handshake if the listener has TLS, then serves HTTP; the handshake
    /// counts against the header deadline.
    async fn serve(self, accepted: Instant, watcher: Watcher) {
        let _ = self.stream.set_nodelay(true);
        let Connection {
            stream,
            client,
            limits,
            gateway,
            front,
            _permit,
        } = self;
        let session = Session {
            client,
            limits,
            gateway,
            access_log: front.access_log,
            secure: front.tls.is_some(),
        };
        let Some(tls) = front.tls else {
            let deadline = remaining(accepted, limits.header_read_timeout);
            return session.serve_http(stream, deadline, watcher).await;
        };

        let deadline = remaining(accepted, limits.header_read_timeout);
        match tokio::time::timeout(deadline, tls.accept(stream)).await {
            Ok(Ok(stream)) => {
                let deadline = remaining(accepted, limits.header_read_timeout);
                session.serve_http(stream, deadline, watcher).await;
            }
            failed => {
                let metrics = session.gateway.metrics();
                let reason = match failed {
                    Ok(Err(err)) => err.to_string(),
                    _ => "timed out".to_string(),
                };
                metrics
                    .connections_rejected
                    .with_label_values(&["tls_handshake"])
                    .inc();
                tracing::debug!(client.addr = %client, "TLS handshake failed: {reason}");
            }
        }
    }
}

impl Session {
    async fn serve_http<IO>(self, io: IO, header_read_timeout: Duration, watcher: Watcher)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Session {
            client,
            limits,
            gateway,
            access_log,
            secure,
        } = self;
        let metrics = gateway.metrics().clone();
        let peer = Arc::new(Peer::new(client));
        let service = service_fn(move |request| {
            let gateway = gateway.clone();
            let access_log = access_log.clone();
            let peer = peer.clone();
            async move {
                // Each request keeps the snapshot it arrived under until its response ends.
                let snapshot = gateway.snapshot();
                let metrics = gateway.metrics();
                let response =
                    super::handle(snapshot, metrics, &access_log, request, &peer, secure).await;
                Ok::<_, Infallible>(response)
            }
        });

        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .max_buf_size(limits.max_header_bytes);
        builder
            .http2()
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
        let io = FramingCheck::new(io, client, metrics.clone());
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        if let Err(err) = watcher.watch(connection.into_owned()).await {
            connection_failed(&metrics, client, &*err);
        }
    }
}

/// What is left of the header deadline since `accepted`; at least a millisecond, since hyper
/// takes zero as no deadline.
fn remaining(accepted: Instant, limit: Duration) -> Duration {
    limit
        .saturating_sub(accepted.elapsed())
        .max(Duration::from_millis(1))
}

/// Counts and logs why a connection ended in error: a request head hyper refused (answered
/// 400 or 431 by hyper) or one that never came are the client's doing.
fn connection_failed(
    metrics: &Metrics,
    client: SocketAddr,
    err: &(dyn std::error::Error + 'static),
) {
    let hyper = err.downcast_ref::<hyper::Error>();
    let reason = match hyper {
        Some(err) if err.is_timeout() => "header_timeout",
        Some(err) if err.is_parse_too_large() => "header_too_large",
        Some(err) if err.is_parse() => "malformed_request",
        _ => {
            tracing::debug!(client.addr = %client, "connection ended with an error: {err}");
            return;
        }
    };
    metrics
        .connections_rejected
        .with_label_values(&[reason])
        .inc();
    if reason != "header_timeout" {
        tracing::info!(client.addr = %client, reason, "refused a request head: {err}");
    }
}
