//! A check on HTTP/1.1 request framing that hyper leaves out: a request with both
//! `Content-Length` and `Transfer-Encoding` is refused, and so is one whose framing headers the
//! scanner cannot read in full.
//!
//! hyper follows RFC 9112 there: `Transfer-Encoding` wins, `Content-Length` is dropped, and the
//! connection is closed after the response. That is safe for hyper itself, but the request
//! still reaches the upstream, and it is the classic shape of request smuggling: a front proxy
//! that reads the length and a back server that reads the chunks disagree on where the request
//! ends. The gateway refuses such a request outright, as nginx and Envoy do.
//!
//! hyper drops the evidence before the request reaches a service, so the check runs on the
//! bytes as they are read. [`FramingCheck`] wraps the client connection and follows it request
//! by request (head, then the body framed as hyper frames it). When a head carries both
//! headers, the line feed of the empty line that ends it is replaced by a NUL, which no head
//! may contain, so hyper's own parser refuses the request: 400, connection closed, nothing
//! forwarded. The rest of that read is dropped (nothing after a refused head is ever parsed)
//! and an empty line put after the NUL: once a head has arrived in pieces, hyper only parses
//! it again when it sees an empty line, and would otherwise wait for one until the header
//! timeout.
//!
//! The scanner only ever refuses; it never frames a request for hyper. Where it cannot follow
//! the stream (HTTP/2, a WebSocket upgrade, a chunk size it cannot read) it stops checking,
//! and hyper's own handling (`Transfer-Encoding` wins, then close) still applies. A framing
//! header it cannot read (longer than the part of a line it keeps, or a length that does not
//! parse) is refused rather than guessed at: a wrong guess at a body's length would put the
//! scanner out of step with hyper, and a request it then took for body bytes would go
//! unchecked.
//!
//! After a WebSocket upgrade request (`Upgrade: websocket` named in `Connection`) it stops
//! too, since a tunnel may follow. The handler closes the connection after any request that
//! asked to upgrade and got no tunnel, so no request the scanner skipped is ever read.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::HeaderValue;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::upgrade::is_websocket;
use crate::metrics::Metrics;

/// The most of a line the scanner keeps: enough for any header name it looks for and for a
/// length or a chunk size.
const LINE_KEPT: usize = 64;

/// Replaces the LF of the empty line ending a refused head: no line of a head may hold a NUL.
const REFUSAL_BYTE: u8 = 0;

/// Put after the refusal byte, so that hyper takes the head as complete and parses it.
const AFTER_REFUSAL: &[u8] = b"\r\n\r\n";

/// A client connection whose request heads are checked as they are read.
pub struct FramingCheck<IO> {
    inner: IO,
    scanner: Scanner,
    client: SocketAddr,
    metrics: Metrics,
}

/// Where in the request stream the scanner is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    RequestLine,
    Headers,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    /// Not HTTP/1.1 requests any more (HTTP/2, an upgrade) or lost: bytes pass unchecked.
    Opaque,
}

/// What the head being read has said so far.
#[derive(Debug, Default)]
struct Head {
    content_length: Option<u64>,
    chunked: bool,
    /// An `Upgrade` asking for WebSocket (or one too long to read).
    websocket: bool,
    /// A `Connection` naming `upgrade` (or one too long to read).
    connection_upgrade: bool,
    /// A framing header the scanner could not read.
    unreadable: bool,
}

#[derive(Debug)]
struct Scanner {
    state: State,
    line: Vec<u8>,
    /// Whether the line being read was longer than the part of it kept.
    overflowed: bool,
    head: Head,
}

/// What scanning a byte asks of the caller.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Pass,
    Refuse,
}

// === impl FramingCheck ===

impl<IO> FramingCheck<IO> {
    pub fn new(inner: IO, client: SocketAddr, metrics: Metrics) -> Self {
        FramingCheck {
            inner,
            scanner: Scanner::new(),
            client,
            metrics,
        }
    }

    fn refused(&self) {
        tracing::info!(
            client.addr = %self.client,
            "refused a request head with ambiguous or unreadable framing \
             (both Content-Length and Transfer-Encoding, or one the check cannot read)"
        );
        self.metrics.rejected("", "ambiguous_framing");
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FramingCheck<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if !matches!(polled, Poll::Ready(Ok(()))) || self.scanner.state == State::Opaque {
            return polled;
        }

        if let Some(refused) = self.scanner.scan_all(&mut buf.filled_mut()[before..]) {
            self.refused();
            buf.set_filled(before + refused + 1);
            if buf.remaining() >= AFTER_REFUSAL.len() {
                buf.put_slice(AFTER_REFUSAL);
            }
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FramingCheck<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// === impl Scanner ===

impl Scanner {
    fn new() -> Self {
        Scanner {
            state: State::RequestLine,
            line: Vec::with_capacity(LINE_KEPT),
            overflowed: false,
            head: Head::default(),
        }
    }

    /// Follows the bytes just read, replacing a refused one; returns where it was. Nothing
    /// after it is followed: hyper closes the connection once it has refused the head.
    fn scan_all(&mut self, read: &mut [u8]) -> Option<usize> {
        let mut at = 0;
        while at < read.len() {
            // Body bytes are skipped in bulk: a large upload costs no per-byte work.
            if let State::Body(left) | State::ChunkData(left) = self.state {
                let skipped = left.min((read.len() - at) as u64);
                self.skip(skipped);
                at += skipped as usize;
                continue;
            }
            if self.state == State::Opaque {
                break;
            }
            if self.scan(read[at]) == Verdict::Refuse {
                read[at] = REFUSAL_BYTE;
                return Some(at);
            }
            at += 1;
        }
        None
    }

    /// Passes over `count` body bytes, at most the body's rest.
    fn skip(&mut self, count: u64) {
        self.state = match self.state {
            State::Body(left) => body_after(left - count, State::RequestLine),
            State::ChunkData(left) => body_after(left - count, State::ChunkEnd),
            state => state,
        };
    }

    /// Follows one byte of the client's stream.
    fn scan(&mut self, byte: u8) -> Verdict {
        match self.state {
            State::Opaque => Verdict::Pass,
            State::Body(left) => {
                self.state = body_after(left - 1, State::RequestLine);
                Verdict::Pass
            }
            State::ChunkData(left) => {
                self.state = body_after(left - 1, State::ChunkEnd);
                Verdict::Pass
            }
            _ if byte == b'\n' => self.end_of_line(),
            _ => {
                if self.line.len() < LINE_KEPT {
                    self.line.push(byte);
                } else if byte != b'\r' {
                    // A line ending just past what is kept is still known in full.
                    self.overflowed = true;
                }
                Verdict::Pass
            }
        }
    }

    /// A line is complete: its CR, if any, is the last byte kept.
    fn end_of_line(&mut self) -> Verdict {
        let mut line = std::mem::take(&mut self.line);
        let overflowed = std::mem::take(&mut self.overflowed);
        if line.last() == Some(&b'\r') && !overflowed {
            line.pop();
        }
        let verdict = match self.state {
            State::RequestLine => {
                self.request_line(&line);
                Verdict::Pass
            }
            State::Headers if line.is_empty() => self.end_of_head(),
            State::Headers => {
                self.header(&line, overflowed);
                Verdict::Pass
            }
            State::ChunkSize => {
                self.state = match chunk_size(&line) {
                    Some(0) => State::Trailers,
                    Some(size) => State::ChunkData(size),
                    None => State::Opaque,
                };
                Verdict::Pass
            }
            State::ChunkEnd => {
                self.state = State::ChunkSize;
                Verdict::Pass
            }
            State::Trailers if line.is_empty() => {
                self.state = State::RequestLine;
                Verdict::Pass
            }
            _ => Verdict::Pass,
        };
        line.clear();
        self.line = line;
        verdict
    }

    fn request_line(&mut self, line: &[u8]) {
        // Empty lines before a request line are allowed and skipped (RFC 9112, section 2.2).
        if line.is_empty() {
            return;
        }
        // A CONNECT is followed like any request: the gateway opens no tunnel for it, and the
        // handler closes the connection after it.
        self.head = Head::default();
        self.state = if line.starts_with(b"PRI * HTTP/2") {
            State::Opaque
        } else {
            State::Headers
        };
    }

    /// Notes what a header line says about framing or an upgrade; `overflowed` when only its
    /// start was kept, so its value is not known.
    fn header(&mut self, line: &[u8], overflowed: bool) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return;
        };
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.eq_ignore_ascii_case(b"content-length") {
            match content_length(value).filter(|_| !overflowed) {
                Some(length) => self.head.content_length = Some(length),
                None => self.head.unreadable = true,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Only one, saying `chunked` and nothing else, is followed (nginx and Envoy take no
            // other coding either): a list, a repeat or another coding is refused.
            self.head.unreadable |=
                overflowed || self.head.chunked || !value.eq_ignore_ascii_case(b"chunked");
            self.head.chunked = true;
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            // Only WebSocket upgrades are ever granted (see `upgrade`).
            self.head.websocket |=
                overflowed || HeaderValue::from_bytes(value).is_ok_and(|v| is_websocket(&v));
        } else if name.eq_ignore_ascii_case(b"connection") {
            self.head.connection_upgrade |= overflowed || names_upgrade(value);
        }
    }

    /// The empty line after the headers: refuse an ambiguous head, else follow its body.
    fn end_of_head(&mut self) -> Verdict {
        let head = std::mem::take(&mut self.head);
        if head.unreadable || head.chunked && head.content_length.is_some() {
            // hyper fails to parse this head and closes the connection: nothing follows.
            self.state = State::Opaque;
            return Verdict::Refuse;
        }
        self.state = match head {
            // What follows a granted upgrade is not HTTP; after a refused one the connection
            // is closed.
            Head {
                websocket: true,
                connection_upgrade: true,
                ..
            } => State::Opaque,
            Head { chunked: true, .. } => State::ChunkSize,
            Head {
                content_length: Some(length),
                ..
            } => body_after(length, State::RequestLine),
            _ => State::RequestLine,
        };
        Verdict::Pass
    }
}

/// The state once `left` body bytes have been read: still in the body, or `next`.
fn body_after(left: u64, next: State) -> State {
    match (left, next) {
        (0, next) => next,
        (left, State::ChunkEnd) => State::ChunkData(left),
        (left, _) => State::Body(left),
    }
}

/// A `Content-Length` value as hyper reads it: digits, or a list of equal ones.
fn content_length(value: &[u8]) -> Option<u64> {
    let mut lengths = value.split(|&b| b == b',').map(|item| {
        let digits = trim(item);
        let text = std::str::from_utf8(digits).ok()?;
        // `parse` alone would take a leading `+`, which hyper refuses.
        let digits_only = !digits.is_empty() && digits.iter().all(u8::is_ascii_digit);
        digits_only.then(|| text.parse::<u64>().ok()).flatten()
    });
    let first = lengths.next()??;
    lengths.all(|length| length == Some(first)).then_some(first)
}

/// Whether a `Connection` value names `upgrade`.
fn names_upgrade(value: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|token| trim(token).eq_ignore_ascii_case(b"upgrade"))
}

/// The size of a chunk from its size line (hex digits, then optional extensions).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let text = std::str::from_utf8(&line[..digits]).ok()?;
    u64::from_str_radix(text, 16).ok()
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `stream` in reads of every size from 1 to 16 bytes and returns the offsets of
    /// the bytes refused, checking that every read size agrees.
    fn refused_at(stream: &[u8]) -> Vec<usize> {
        let offsets = |read_size: usize| {
            let mut scanner = Scanner::new();
            let mut scanned = stream.to_vec();
            for read in scanned.chunks_mut(read_size) {
                scanner.scan_all(read);
            }
            let changed = stream.iter().zip(&scanned).enumerate();
            changed
                .filter(|(_, (before, after))| before != after)
                .map(|(i, _)| i)
                .collect::<Vec<_>>()
        };
        let whole = offsets(stream.len().max(1));
        for read_size in 1..=16 {
            assert_eq!(offsets(read_size), whole, "reads of {read_size} bytes");
        }
        whole
    }

    #[test]
    fn transfer_encoding_other_than_one_chunked_is_refused() {
        for head in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: identity, chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        ] {
            assert!(
                !refused_at(head).is_empty(),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        let plain = b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n";
        assert_eq!(refused_at(plain), Vec::<usize>::new());
    }

    #[test]
    fn a_head_with_length_and_chunked_is_refused_at_its_last_line() {
        let head = b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(refused_at(head), [head.len() - 1]);
        let reversed = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\n";
        assert_eq!(refused_at(reversed), [reversed.len() - 1]);
    }

    #[test]
    fn bodies_are_skipped_so_their_bytes_are_never_taken_for_heads() {
        let smuggled =
            b"GET /x HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut stream = Vec::new();
        stream.extend_from_slice(b"POST /a HTTP/1.1\r\nContent-Length: ");
        stream.extend_from_slice(format!("{}\r\n\r\n", smuggled.len()).as_bytes());
        stream.extend_from_slice(smuggled);
        stream.extend_from_slice(b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        stream.extend_from_slice(format!("{:x};ext=1\r\n", smuggled.len()).as_bytes());
        stream.extend_from_slice(smuggled);
        stream.extend_from_slice(b"\r\n0\r\nx-trailer: 1\r\n\r\n");
        assert!(refused_at(&stream).is_empty());

        stream.extend_from_slice(smuggled);
        assert_eq!(refused_at(&stream), [stream.len() - 1]);
    }

    #[test]
    fn http2_and_upgrades_are_not_followed() {
        let h2 =
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nContent-Length: 1\r\nTransfer-Encoding: x\r\n\r\n";
        assert!(refused_at(h2).is_empty());
        let upgrade = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(refused_at(upgrade).is_empty());

        let h2c = b"GET / HTTP/1.1\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(refused_at(h2c), [h2c.len() - 1], "h2c is never granted");
    }

    #[test]
    fn a_framing_header_too_long_to_read_is_refused() {
        let spaces = " ".repeat(50);
        let zeros = "0".repeat(60);
        for value in [format!("{spaces}10"), format!("{zeros}10")] {
            let head = format!("POST / HTTP/1.1\r\nContent-Length:{value}\r\n\r\n");
            assert_eq!(refused_at(head.as_bytes()), [head.len() - 1], "{value}");
        }
        let te = format!("POST / HTTP/1.1\r\nTransfer-Encoding:{spaces}chunked\r\n\r\n");
        assert_eq!(refused_at(te.as_bytes()), [te.len() - 1]);

        // A length line that just fits, CR and all, is read.
        let fits = format!("Content-Length: {}5", "0".repeat(LINE_KEPT - 17));
        assert_eq!(fits.len(), LINE_KEPT);
        let stream = format!("POST / HTTP/1.1\r\n{fits}\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n");
        assert!(refused_at(stream.as_bytes()).is_empty());
    }

    #[test]
    fn a_length_that_does_not_parse_is_refused() {
        for value in [
            "",
            "x",
            "+4",
            "4 4",
            "4, 5",
            "-1",
            "99999999999999999999999",
        ] {
            let head = format!("POST / HTTP/1.1\r\nContent-Length: {value}\r\n\r\n");
            assert_eq!(refused_at(head.as_bytes()), [head.len() - 1], "{value:?}");
        }
        assert_eq!(content_length(b"4, 4"), Some(4));
        assert_eq!(content_length(b"0010"), Some(10));
    }

    #[test]
    fn a_request_after_an_unreadable_length_is_never_skipped() {
        // Were the padded length read as 0, the smuggled head would be taken for a request
        // of its own; were it read as 10, for body bytes. Either way it would go unchecked.
        let smuggled =
            b"POST /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut stream = format!(
            "POST / HTTP/1.1\r\nContent-Length:{}10\r\n\r\n",
            " ".repeat(50)
        )
        .into_bytes();
        let first_head = stream.len();
        stream.extend_from_slice(b"0123456789");
        stream.extend_from_slice(smuggled);
        assert_eq!(refused_at(&stream), [first_head - 1]);
    }

    #[test]
    fn an_upgrade_is_only_one_when_connection_names_it() {
        let smuggled =
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        for head in [
            &b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"[..],
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: keep-alive\r\n\r\n",
            b"CONNECT example:443 HTTP/1.1\r\nHost: example:443\r\n\r\n",
        ] {
            let stream = [head, &smuggled[..]].concat();
            assert_eq!(
                refused_at(&stream),
                [stream.len() - 1],
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        let upgrade =
            b"GET /ws HTTP/1.1\r\nupgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n\r\n";
        assert!(refused_at(&[&upgrade[..], &smuggled[..]].concat()).is_empty());
    }
}
