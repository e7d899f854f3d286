//! The access log: one JSON line per request, written off the request path.
//!
//! A request hands its finished line to a bounded channel and moves on; one writer task drains
//! the channel to standard output or a file. When the writer falls behind (a slow disk, a
//! blocked pipe) and the channel is full, lines are dropped and counted in
//! `sluice_access_log_dropped_total` rather than making requests wait.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use prometheus::IntCounter;
use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::config;
use crate::metrics::Metrics;
use crate::proxy::Progress;

/// Where finished lines go; cheap to clone. A disabled log accepts lines and drops them
/// without counting.
#[derive(Debug, Clone)]
pub struct AccessLog {
    lines: Option<mpsc::Sender<String>>,
    dropped: IntCounter,
}

/// One request's line, filled in as the request goes; written when its response ends.
#[derive(Debug, Default, Serialize)]
pub struct Entry {
    /// When the request head was read.
    pub timestamp: Timestamp,
    pub request_id: String,
    pub trace_id: String,
    /// The client as the gateway resolved it (see `trusted_proxies`).
    pub client: String,
    /// The address the connection came from.
    pub peer: String,
    pub method: String,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// The upstream server that answered (the last one tried, when a try was retried).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_authority"
    )]
    pub target: Option<http::uri::Authority>,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// From the request head to the last byte of the response, in milliseconds.
    pub duration_ms: f64,
    /// Waiting for a slot on the route.
    pub queue_ms: f64,
    /// In the route's policies, both phases.
    pub policies_ms: f64,
    /// From sending the request upstream to the upstream's response head.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ms: Option<f64>,
    /// Why the gateway answered itself or cut the request short.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// How much of the request body has been read, counted as it streams upstream.
    #[serde(skip)]
    pub body_in: Arc<Progress>,
}

fn serialize_authority<S: serde::Serializer>(
    target: &Option<http::uri::Authority>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match target {
        Some(target) => serializer.serialize_str(target.as_str()),
        None => serializer.serialize_none(),
    }
}

/// A wall-clock time, written as RFC 3339 in UTC.
#[derive(Debug, Clone, Copy)]
pub struct Timestamp(SystemTime);

/// A line waiting for its response to end.
#[derive(Debug)]
pub struct Pending {
    log: AccessLog,
    entry: Entry,
    started: Instant,
}

// === impl AccessLog ===

impl AccessLog {
    /// Opens the configured destination and starts the writer task.
    pub async fn start(settings: &config::AccessLog, metrics: &Metrics) -> anyhow::Result<Self> {
        let dropped = metrics.access_log_dropped.clone();
        if !settings.enabled {
            return Ok(AccessLog {
                lines: None,
                dropped,
            });
        }
        let (sender, receiver) = mpsc::channel(settings.buffer_lines);
        match &settings.path {
            Some(path) => {
                let file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await
                    .map_err(|err| {
                        anyhow::anyhow!("cannot open the access log {}: {err}", path.display())
                    })?;
                tokio::spawn(write_lines(receiver, file, dropped.clone()));
            }
            None => {
                tokio::spawn(write_lines(receiver, tokio::io::stdout(), dropped.clone()));
            }
        }
        Ok(AccessLog {
            lines: Some(sender),
            dropped,
        })
    }

    /// A log that writes nothing.
    pub fn disabled(metrics: &Metrics) -> Self {
        AccessLog {
            lines: None,
            dropped: metrics.access_log_dropped.clone(),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.lines.is_some()
    }

    fn write(&self, entry: &Entry) {
        let Some(lines) = &self.lines else {
            return;
        };
        let mut line = serde_json::to_string(entry).unwrap_or_default();
        line.push('\n');
        if lines.try_send(line).is_err() {
            self.dropped.inc();
        }
    }
}

/// Writes lines as they come, flushing whenever the channel is empty.
async fn write_lines(
    mut lines: mpsc::Receiver<String>,
    out: impl AsyncWrite + Unpin,
    dropped: IntCounter,
) {
    let mut out = tokio::io::BufWriter::new(out);
    while let Some(line) = lines.recv().await {
        let mut written = out.write_all(line.as_bytes()).await;
        while let Ok(line) = lines.try_recv() {
            written = written.and(out.write_all(line.as_bytes()).await);
        }
        if let Err(err) = written.and(out.flush().await) {
            dropped.inc();
            tracing::warn!("cannot write the access log: {err}");
        }
    }
}

// === impl Entry ===

impl Entry {
    /// The start of a line for a request just read.
    pub fn new<B>(request: &http::Request<B>, client: IpAddr, peer: SocketAddr) -> Self {
        Entry {
            timestamp: Timestamp(SystemTime::now()),
            client: client.to_string(),
            peer: peer.to_string(),
            method: request.method().to_string(),
            path: request
                .uri()
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_string(),
            ..Entry::default()
        }
    }
}

/// Milliseconds with microsecond precision.
pub fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1e3
}

// === impl Unanswered ===

/// The line of a request still being served. If the request is dropped before it is answered
/// (the client went away), the line is written with nginx's status 499 and reason
/// `client_closed`.
#[derive(Debug)]
pub struct Unanswered {
    log: AccessLog,
    entry: Entry,
    started: Instant,
    answered: bool,
}

impl Unanswered {
    pub fn new(log: &AccessLog, entry: Entry, started: Instant) -> Self {
        Unanswered {
            log: log.clone(),
            entry,
            started,
            answered: false,
        }
    }

    pub fn entry(&mut self) -> &mut Entry {
        &mut self.entry
    }

    /// The request has its response: the line now waits for the response to be sent.
    pub fn answered(mut self, status: http::StatusCode) -> Pending {
        self.answered = true;
        let mut entry = std::mem::take(&mut self.entry);
        entry.status = status.as_u16();
        Pending::new(self.log.clone(), entry, self.started)
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let mut entry = std::mem::take(&mut self.entry);
        entry.status = 499;
        entry.reason = Some("client_closed");
        Pending::new(self.log.clone(), entry, self.started).finish(0);
    }
}

// === impl Timestamp ===

impl Default for Timestamp {
    fn default() -> Self {
        Timestamp(SystemTime::UNIX_EPOCH)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = time::OffsetDateTime::from(self.0)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        serializer.serialize_str(&text)
    }
}

// === impl Pending ===

impl Pending {
    pub fn new(log: AccessLog, entry: Entry, started: Instant) -> Self {
        Pending {
            log,
            entry,
            started,
        }
    }

    /// Notes why the response body broke off, unless a reason was already given.
    pub fn failed(&mut self, reason: &'static str) {
        self.entry.reason.get_or_insert(reason);
    }

    /// Writes the line, once the response has ended or been dropped.
    pub fn finish(mut self, bytes_out: u64) {
        self.entry.bytes_out = bytes_out;
        self.entry.bytes_in = self.entry.body_in.bytes.load(Ordering::Relaxed);
        self.entry.duration_ms = millis(self.started.elapsed());
        self.log.write(&self.entry);
    }
}
