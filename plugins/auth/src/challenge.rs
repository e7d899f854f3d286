//! The 401 response: a `WWW-Authenticate` challenge per accepted scheme and a JSON body.

use serde_json::json;
use sluice_sdk::Reply;

use crate::header;

/// Why a request was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No credential this policy accepts was sent.
    Missing,
    /// An API key was sent but is not configured.
    UnknownApiKey,
    /// A bearer token was sent but is not valid; the text says why.
    InvalidToken(&'static str),
}

/// Builds 401 responses for the schemes the policy accepts.
#[derive(Debug)]
pub struct Challenge {
    realm: String,
    bearer: bool,
    api_key_header: Option<String>,
}

// === impl Failure ===

impl Failure {
    /// A short reason for the client and the log.
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::Missing => "missing credentials",
            Failure::UnknownApiKey => "invalid API key",
            Failure::InvalidToken(description) => description,
        }
    }
}

// === impl Challenge ===

impl Challenge {
    /// Validates the realm, which is sent inside a quoted string.
    pub fn new(
        realm: String,
        bearer: bool,
        api_key_header: Option<String>,
    ) -> Result<Self, String> {
        let quotable = !realm.contains(['"', '\\']) && header::is_safe_value(realm.as_bytes());
        if !quotable || !realm.is_ascii() {
            return Err(format!(
                "realm {realm:?} must be printable ASCII without quotes or backslashes"
            ));
        }
        Ok(Challenge {
            realm,
            bearer,
            api_key_header,
        })
    }

    /// The 401 response for `failure`.
    pub fn reply(&self, failure: &Failure) -> Reply {
        let body = json!({ "error": "unauthorized", "reason": failure.reason() });
        let mut reply = Reply::new(401).header("cache-control", "no-store");
        for challenge in self.challenges(failure) {
            reply = reply.header("www-authenticate", challenge);
        }
        reply.json(&body)
    }

    fn challenges(&self, failure: &Failure) -> Vec<String> {
        let mut challenges = Vec::new();
        if self.bearer {
            challenges.push(self.bearer_challenge(failure));
        }
        if let Some(header) = &self.api_key_header {
            // Not a registered scheme; it tells a client which header to send its key in.
            challenges.push(format!(
                "ApiKey realm=\"{}\", header=\"{header}\"",
                self.realm
            ));
        }
        challenges
    }

    /// RFC 6750 section 3: the error code only when a token was sent and refused.
    fn bearer_challenge(&self, failure: &Failure) -> String {
        match failure {
            Failure::InvalidToken(description) => format!(
                "Bearer realm=\"{}\", error=\"invalid_token\", error_description=\"{description}\"",
                self.realm
            ),
            _ => format!("Bearer realm=\"{}\"", self.realm),
        }
    }
}
