//! Read-only views of the request and response a policy is called with.

use crate::bindings::sluice::policy::types::{HeaderList, RequestHead, ResponseHead};

/// The request as the policy sees it: after the gateway normalised it and after the changes of
/// the policies before this one in the route's chain.
#[derive(Debug, Clone)]
pub struct Request {
    head: RequestHead,
}

/// The upstream's response status and headers.
#[derive(Debug, Clone)]
pub struct Response {
    head: ResponseHead,
}

// === impl Request ===

impl Request {
    pub(crate) fn from_head(head: RequestHead) -> Self {
        Request { head }
    }

    /// The method, upper-case.
    pub fn method(&self) -> &str {
        &self.head.method
    }

    /// The path and query, e.g. `/v1/items?page=2`.
    pub fn path_and_query(&self) -> &str {
        &self.head.path_and_query
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        let pq = self.path_and_query();
        pq.split_once('?').map_or(pq, |(path, _)| path)
    }

    /// The query string without the `?`, if there is one.
    pub fn query(&self) -> Option<&str> {
        self.path_and_query()
            .split_once('?')
            .map(|(_, query)| query)
    }

    /// The client's IP address in text form.
    pub fn client_addr(&self) -> &str {
        &self.head.client_addr
    }

    /// The name of the route that matched.
    pub fn route(&self) -> &str {
        &self.head.route
    }

    /// The raw value of the first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        find_header(&self.head.headers, name)
    }

    /// The first header called `name` as text; `None` if it is absent or not valid UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name)
            .and_then(|value| std::str::from_utf8(value).ok())
    }

    /// Every header as a name and raw value, in the order received.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        entries(&self.head.headers)
    }
}

// === impl Response ===

impl Response {
    pub(crate) fn from_head(head: ResponseHead) -> Self {
        Response { head }
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.head.status
    }

    /// The raw value of the first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        find_header(&self.head.headers, name)
    }

    /// The first header called `name` as text; `None` if it is absent or not valid UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name)
            .and_then(|value| std::str::from_utf8(value).ok())
    }

    /// Every header as a name and raw value.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        entries(&self.head.headers)
    }
}

fn find_header<'a>(headers: &'a HeaderList, name: &str) -> Option<&'a [u8]> {
    entries(headers)
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, value)| value)
}

/// The headers of a packed list, as names and values. The gateway packs them correctly; a
/// list that is not (an end out of order or past the bytes) ends where it goes wrong rather
/// than panicking, and a name that is not UTF-8 reads as empty.
fn entries(headers: &HeaderList) -> impl Iterator<Item = (&str, &[u8])> {
    let bytes = headers.bytes.as_slice();
    headers
        .ends
        .chunks_exact(2)
        .scan(0usize, move |start, ends| {
            let (name_end, value_end) = (ends[0] as usize, ends[1] as usize);
            let name = bytes.get(*start..name_end)?;
            let value = bytes.get(name_end..value_end)?;
            *start = value_end;
            Some((std::str::from_utf8(name).unwrap_or_default(), value))
        })
}

/// Packs headers as the gateway does; for the native test harness.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn pack<'a>(headers: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> HeaderList {
    let mut list = HeaderList {
        bytes: Vec::new(),
        ends: Vec::new(),
    };
    for (name, value) in headers {
        push(&mut list, name, value);
    }
    list
}

/// Appends one header to a packed list; the name is lower-cased as the gateway does.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn push(list: &mut HeaderList, name: &str, value: &[u8]) {
    list.bytes
        .extend(name.bytes().map(|b| b.to_ascii_lowercase()));
    list.ends.push(list.bytes.len() as u32);
    list.bytes.extend_from_slice(value);
    list.ends.push(list.bytes.len() as u32);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_headers_read_back_in_order() {
        let list = pack([
            ("Host", &b"a.example"[..]),
            ("x-empty", b""),
            ("x-raw", b"\xff"),
        ]);
        let read: Vec<_> = entries(&list).collect();
        assert_eq!(
            read,
            [
                ("host", &b"a.example"[..]),
                ("x-empty", b""),
                ("x-raw", b"\xff")
            ]
        );
        assert_eq!(find_header(&list, "X-RAW"), Some(&b"\xff"[..]));
        assert_eq!(find_header(&list, "x-missing"), None);
    }

    #[test]
    fn a_badly_packed_list_ends_early_without_panicking() {
        let list = HeaderList {
            bytes: b"hostaxy".to_vec(),
            ends: vec![4, 5, 3, 9, 6],
        };
        assert_eq!(entries(&list).collect::<Vec<_>>(), [("host", &b"a"[..])]);
    }
}
