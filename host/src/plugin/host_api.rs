//! What a plugin's store holds, and the host functions policies import.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use sluice_ratelimit::{Buckets, Quota};
use tokio::io::AsyncWrite;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{host, types};

/// Most bytes of guest stdout or stderr kept for one log line; the rest is dropped.
const GUEST_OUTPUT_LINE_CAP: usize = 4096;

/// The data of one plugin instance's store.
pub struct StoreState {
    plugin: Arc<str>,
    buckets: Arc<Buckets>,
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) memory: MemoryCap,
}

/// Caps the instance's linear memory and remembers whether the cap was hit, so that a trap
/// that follows a refused grow is reported as a memory failure.
pub(super) struct MemoryCap {
    limit: usize,
    pub(super) current: usize,
    pub(super) exceeded: bool,
}

impl StoreState {
    pub fn new(plugin: Arc<str>, buckets: Arc<Buckets>, memory_limit: usize) -> Self {
        let wasi = WasiCtx::builder()
            .stdout(GuestOutput {
                plugin: plugin.clone(),
                stream: "stdout",
            })
            .stderr(GuestOutput {
                plugin: plugin.clone(),
                stream: "stderr",
            })
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        StoreState {
            plugin,
            buckets,
            wasi,
            table: ResourceTable::new(),
            memory: MemoryCap {
                limit: memory_limit,
                current: 0,
                exceeded: false,
            },
        }
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.exceeded = true;
            wasmtime::bail!(
                "memory cap: growing to {desired} bytes is above the {} limit",
                self.limit
            );
        }
        self.current = self.current.max(desired).max(current);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _: usize,
        desired: usize,
        _: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl types::Host for StoreState {}

impl host::Host for StoreState {
    fn log(&mut self, level: types::LogLevel, message: String, fields: Vec<(String, String)>) {
        let plugin = &*self.plugin;
        let fields = FieldList(&fields);
        match level {
            types::LogLevel::Trace => tracing::trace!(plugin, %fields, "{message}"),
            types::LogLevel::Debug => tracing::debug!(plugin, %fields, "{message}"),
            types::LogLevel::Info => tracing::info!(plugin, %fields, "{message}"),
            types::LogLevel::Warn => tracing::warn!(plugin, %fields, "{message}"),
            types::LogLevel::Error => tracing::error!(plugin, %fields, "{message}"),
        }
    }

    fn monotonic_now(&mut self) -> u64 {
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }

    fn rate_limit(
        &mut self,
        bucket: String,
        key: String,
        quota: host::Quota,
        cost: u32,
    ) -> host::RateLimitOutcome {
        let quota = Quota {
            limit: quota.limit,
            period_ms: quota.period_ms,
            burst: quota.burst,
        };
        // Bucket names are per plugin, so two plugins never share or drain each other's buckets.
        let bucket = format!("{}/{bucket}", self.plugin);
        let outcome = self.buckets.check(&bucket, &key, quota, cost);
        host::RateLimitOutcome {
            allowed: outcome.allowed,
            remaining: outcome.remaining,
            retry_after_ms: outcome.retry_after_ms,
            reset_after_ms: outcome.reset_after_ms,
        }
    }
}

/// Guest-supplied log fields, written as `key=value` pairs.
struct FieldList<'a>(&'a [(String, String)]);

impl std::fmt::Display for FieldList<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (key, value)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{key}={value:?}")?;
        }
        Ok(())
    }
}

/// A guest's stdout or stderr: each write becomes a gateway log line, capped in length.
#[derive(Clone)]
struct GuestOutput {
    plugin: Arc<str>,
    stream: &'static str,
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let kept = &buf[..buf.len().min(GUEST_OUTPUT_LINE_CAP)];
        let text = String::from_utf8_lossy(kept);
        let text = text.trim_end();
        if !text.is_empty() {
            tracing::warn!(
                plugin = &*self.plugin,
                stream = self.stream,
                "guest output: {text}"
            );
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
