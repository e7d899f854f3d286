//! Which requests share a bucket: the client address, the caller's identity or a header.

use sluice_sdk::Request;

/// Where the rate-limit key of a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The client's IP address.
    Client,
    /// The value of a header, `kind` naming what it holds so the bucket keys of different
    /// sources never collide.
    Header { name: String, kind: &'static str },
}

// === impl KeySource ===

impl KeySource {
    /// Parses the `key` setting; `identity_header` is the header the auth policy sets.
    pub fn parse(key: &str, identity_header: &str) -> Result<Self, String> {
        match key {
            "client" => Ok(KeySource::Client),
            "identity" => Ok(KeySource::Header {
                name: identity_header.to_string(),
                kind: "identity",
            }),
            _ => match key.strip_prefix("header:") {
                Some(name) => Ok(KeySource::Header {
                    name: header_name(name)?,
                    kind: "header",
                }),
                None => Err(format!(
                    "key {key:?} must be \"client\", \"identity\" or \"header:<name>\""
                )),
            },
        }
    }

    /// The bucket key of `request`. A missing, empty or non-UTF-8 header falls back to the
    /// client address, so such requests are still limited.
    pub fn key_of(&self, request: &Request) -> String {
        if let KeySource::Header { name, kind } = self
            && let Some(value) = request.header_str(name).filter(|value| !value.is_empty())
        {
            return format!("{kind}:{value}");
        }
        format!("client:{}", request.client_addr())
    }
}

/// The lower-cased name, if it is a valid header name.
pub fn header_name(name: &str) -> Result<String, String> {
    if !is_token(name) {
        return Err(format!("{name:?} is not a valid header name"));
    }
    Ok(name.to_ascii_lowercase())
}

/// Whether `text` is a `token` of RFC 9110 section 5.6.2.
pub fn is_token(text: &str) -> bool {
    let is_token_byte = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    !text.is_empty() && text.bytes().all(is_token_byte)
}
