//! A policy that misbehaves on purpose, for the gateway's integration tests.
//!
//! Its `mode` setting picks the misbehaviour. `count` and `trap-on-header` tag the request
//! with how many calls this instance has served and when it was created, so tests can tell a
//! reused instance from a fresh one.

use std::cell::Cell;

use serde::Deserialize;
use sluice_sdk::{Config, Decision, HeaderChanges, Policy, Request, RequestChanges, Response};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    mode: Mode,
    /// Written into the `x-chaos-request-tag` request header and the `x-chaos-tag` response
    /// header when set.
    #[serde(default)]
    tag: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    /// Count calls and continue.
    Count,
    /// Panic when the request has an `x-chaos-trap` header; count otherwise.
    TrapOnHeader,
    /// Never return.
    Loop,
    /// Allocate without bound.
    Alloc,
    /// Set a header value that contains CR LF.
    Crlf,
    /// Read every header as text and report how many were UTF-8.
    Inspect,
    /// Copy what the policy sees into request headers: the client address into
    /// `x-seen-client`, the path as received into `x-seen-path`, and the path with its percent
    /// escapes decoded into `x-decoded-path` (so an encoded CR LF becomes a raw one).
    Mirror,
}

struct Chaos {
    mode: Mode,
    tag: Option<String>,
    born: u64,
    calls: Cell<u64>,
}

impl Policy for Chaos {
    fn new(config: Config) -> Result<Self, String> {
        let settings: Settings = config.parse()?;
        Ok(Chaos {
            mode: settings.mode,
            tag: settings.tag,
            born: sluice_sdk::monotonic_now(),
            calls: Cell::new(0),
        })
    }

    fn on_request(&self, request: &Request) -> Decision {
        match self.mode {
            Mode::Loop => spin(),
            Mode::Alloc => hoard(),
            Mode::Crlf => RequestChanges::new()
                .set_header("x-evil", "a\r\nx-injected: yes")
                .into(),
            Mode::TrapOnHeader if request.header("x-chaos-trap").is_some() => {
                panic!("asked to trap")
            }
            Mode::Inspect => inspect(request).into(),
            Mode::Mirror => mirror(request).into(),
            Mode::Count | Mode::TrapOnHeader => self.count().into(),
        }
    }

    fn on_response(&self, _: &Request, _: &Response) -> HeaderChanges {
        match &self.tag {
            Some(tag) => HeaderChanges::new().set("x-chaos-tag", tag.as_str()),
            None => HeaderChanges::new(),
        }
    }
}

impl Chaos {
    fn count(&self) -> RequestChanges {
        self.calls.set(self.calls.get() + 1);
        let changes = RequestChanges::new()
            .set_header("x-instance-born", self.born.to_string())
            .set_header("x-instance-calls", self.calls.get().to_string());
        match &self.tag {
            // The request phase tags the request too, so a test can check that both phases of
            // one request ran the same version of the policy.
            Some(tag) => changes.set_header("x-chaos-request-tag", tag.as_str()),
            None => changes,
        }
    }
}

fn spin() -> ! {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

fn hoard() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(vec![1; 1 << 20]);
        std::hint::black_box(&hoard);
    }
}

fn inspect(request: &Request) -> RequestChanges {
    let names: Vec<&str> = request.headers().map(|(name, _)| name).collect();
    let text = names
        .iter()
        .filter(|name| request.header_str(name).is_some())
        .count();
    RequestChanges::new()
        .set_header("x-headers-text", text.to_string())
        .set_header("x-headers-binary", (names.len() - text).to_string())
}

fn mirror(request: &Request) -> RequestChanges {
    let path = request.path_and_query();
    RequestChanges::new()
        .set_header("x-seen-client", request.client_addr())
        .set_header("x-seen-path", path)
        .set_header("x-decoded-path", percent_decode(path))
}

fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match (bytes[i], escaped) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

sluice_sdk::export_policy!(Chaos);
