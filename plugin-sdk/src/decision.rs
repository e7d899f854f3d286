//! What a policy returns: builders for request decisions and header changes.

use crate::bindings::sluice::policy::types as wit;

/// The outcome of a policy's request phase.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Forward the request upstream with these changes.
    Continue(RequestChanges),
    /// Answer the client with this response; nothing is forwarded.
    Respond(Reply),
}

/// Changes to a request that continues upstream.
#[derive(Debug, Clone, Default)]
pub struct RequestChanges {
    /// Header edits.
    pub headers: HeaderChanges,
    /// A new path and query, starting with `/`.
    pub path_and_query: Option<String>,
}

/// Header edits, applied as: every removal, then every set, then every add.
#[derive(Debug, Clone, Default)]
pub struct HeaderChanges {
    /// Header names to remove.
    pub remove: Vec<String>,
    /// Headers to set, replacing any value already present.
    pub set: Vec<(String, Vec<u8>)>,
    /// Headers to append.
    pub add: Vec<(String, Vec<u8>)>,
}

/// A response written by the policy.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// Response headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The whole response body.
    pub body: Vec<u8>,
}

// === impl Decision ===

impl Decision {
    /// Forward the request unchanged.
    pub fn proceed() -> Self {
        Decision::Continue(RequestChanges::new())
    }

    pub(crate) fn into_wit(self) -> wit::RequestDecision {
        match self {
            Decision::Continue(changes) => wit::RequestDecision::Continue(wit::RequestChanges {
                headers: changes.headers.into_wit(),
                path_and_query: changes.path_and_query,
            }),
            Decision::Respond(reply) => wit::RequestDecision::Respond(wit::DirectResponse {
                status: reply.status,
                headers: into_wit_headers(reply.headers),
                body: reply.body,
            }),
        }
    }
}

impl From<RequestChanges> for Decision {
    fn from(changes: RequestChanges) -> Self {
        Decision::Continue(changes)
    }
}

impl From<Reply> for Decision {
    fn from(reply: Reply) -> Self {
        Decision::Respond(reply)
    }
}

// === impl RequestChanges ===

impl RequestChanges {
    /// No changes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a header, replacing any value the request had.
    pub fn set_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers = self.headers.set(name, value);
        self
    }

    /// Appends a header value.
    pub fn add_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers = self.headers.add(name, value);
        self
    }

    /// Removes every value of a header.
    pub fn remove_header(mut self, name: impl Into<String>) -> Self {
        self.headers = self.headers.remove(name);
        self
    }

    /// Replaces the path and query sent upstream. It must start with `/`.
    pub fn path_and_query(mut self, path_and_query: impl Into<String>) -> Self {
        self.path_and_query = Some(path_and_query.into());
        self
    }
}

// === impl HeaderChanges ===

impl HeaderChanges {
    /// No changes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a header, replacing any value present.
    pub fn set(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.set.push((name.into(), value.into()));
        self
    }

    /// Appends a header value.
    pub fn add(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.add.push((name.into(), value.into()));
        self
    }

    /// Removes every value of a header.
    pub fn remove(mut self, name: impl Into<String>) -> Self {
        self.remove.push(name.into());
        self
    }

    /// Whether there is nothing to change.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    pub(crate) fn into_wit(self) -> wit::HeaderChanges {
        wit::HeaderChanges {
            remove: self.remove,
            set: into_wit_headers(self.set),
            add: into_wit_headers(self.add),
        }
    }
}

// === impl Reply ===

impl Reply {
    /// An empty response with this status.
    pub fn new(status: u16) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Adds a response header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// A plain-text body, with its `content-type`.
    pub fn text(self, body: impl Into<String>) -> Self {
        self.header("content-type", "text/plain; charset=utf-8")
            .body(body.into())
    }

    /// A JSON body, with its `content-type`.
    pub fn json(self, body: &serde_json::Value) -> Self {
        self.header("content-type", "application/json")
            .body(body.to_string())
    }

    /// A body of raw bytes.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// The first value of a header of this reply, for tests.
    pub fn header_value(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

fn into_wit_headers(headers: Vec<(String, Vec<u8>)>) -> Vec<wit::Header> {
    headers
        .into_iter()
        .map(|(name, value)| wit::Header { name, value })
        .collect()
}
