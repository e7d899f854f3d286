//! Read-only views of the request and response a policy is called with.

use crate::bindings::sluice::policy::types::{Header, RequestHead, ResponseHead};

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
        self.head
            .headers
            .iter()
            .map(|h| (h.name.as_str(), h.value.as_slice()))
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
        self.head
            .headers
            .iter()
            .map(|h| (h.name.as_str(), h.value.as_slice()))
    }
}

fn find_header<'a>(headers: &'a [Header], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value.as_slice())
}
