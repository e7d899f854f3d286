//! A Sluice policy that authenticates requests by API key or JWT bearer token.
//!
//! A request that presents a configured API key, or else a valid bearer token, continues
//! upstream with the caller's identity in the identity header (`x-sluice-identity` unless
//! configured otherwise); any other request is answered with 401. The identity header is
//! always replaced, so a client cannot send its own.
//!
//! ```toml
//! identity_header = "x-sluice-identity"
//! realm = "sluice"
//!
//! [api_keys]
//! header = "x-api-key"
//! keys = { "demo-key" = "demo-user" }
//!
//! [jwt]
//! algorithm = "HS256"           # or "RS256" with `public_key_pem`
//! secret = "at least 32 bytes of shared secret"
//! audience = "my-api"           # optional; then `aud` is required and must match
//! issuer = "https://issuer"     # optional; then `iss` is required and must match
//! leeway_seconds = 0
//! identity_claim = "sub"
//! ```
//!
//! At least one of `[api_keys]` and `[jwt]` must be configured. Tokens must carry `exp`; a
//! token with an `aud` claim is refused unless `audience` is configured and listed in it, as
//! RFC 7519 section 4.1.3 requires.

mod api_key;
mod challenge;
mod header;
mod jwt;
#[cfg(test)]
mod tests;

use serde::Deserialize;
use sluice_sdk::{Config, Decision, LogLevel, Phases, Policy, Request, RequestChanges};

use crate::api_key::{ApiKeySettings, ApiKeys, KeyCheck};
use crate::challenge::{Challenge, Failure};
use crate::jwt::{JwtSettings, JwtVerifier};

/// The policy's configuration table.
///
/// Not `Debug`, so that secrets cannot end up in a log.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "default_identity_header")]
    identity_header: String,
    #[serde(default = "default_realm")]
    realm: String,
    api_keys: Option<ApiKeySettings>,
    jwt: Option<JwtSettings>,
}

/// The authentication policy.
pub struct Auth {
    identity_header: String,
    api_keys: Option<ApiKeys>,
    jwt: Option<JwtVerifier>,
    challenge: Challenge,
}

fn default_identity_header() -> String {
    "x-sluice-identity".to_string()
}

fn default_realm() -> String {
    "sluice".to_string()
}

// === impl Auth ===

impl Policy for Auth {
    /// Responses pass through untouched: skip that call.
    const PHASES: Phases = Phases::REQUEST;

    fn new(config: Config) -> Result<Self, String> {
        let settings: Settings = config.parse()?;
        if settings.api_keys.is_none() && settings.jwt.is_none() {
            return Err("configure [api_keys], [jwt] or both".to_string());
        }

        let identity_header = header::header_name(&settings.identity_header, "identity_header")?;
        let api_keys = settings.api_keys.map(ApiKeys::new).transpose()?;
        let jwt = settings.jwt.map(JwtVerifier::new).transpose()?;
        let api_key_header = api_keys.as_ref().map(|keys| keys.header().to_string());
        let challenge = Challenge::new(settings.realm, jwt.is_some(), api_key_header)?;
        Ok(Auth {
            identity_header,
            api_keys,
            jwt,
            challenge,
        })
    }

    fn on_request(&self, request: &Request) -> Decision {
        match self.authenticate(request) {
            Ok(identity) => self.admit(identity),
            Err(failure) => {
                let fields = [
                    ("reason", failure.reason()),
                    ("client.addr", request.client_addr()),
                ];
                sluice_sdk::log(LogLevel::Debug, "request not authenticated", &fields);
                self.challenge.reply(&failure).into()
            }
        }
    }
}

impl Auth {
    /// An API key wins over a bearer token, so a client holding both is identified by the key.
    fn authenticate(&self, request: &Request) -> Result<String, Failure> {
        let key = self
            .api_keys
            .as_ref()
            .map_or(KeyCheck::Absent, |keys| keys.check(request));
        if let KeyCheck::Identity(identity) = key {
            return Ok(identity.to_string());
        }
        match (&self.jwt, bearer_token(request)) {
            (Some(jwt), Some(token)) => jwt.verify(token).map_err(Failure::InvalidToken),
            _ if key == KeyCheck::Unknown => Err(Failure::UnknownApiKey),
            _ => Err(Failure::Missing),
        }
    }

    /// Removes whatever identity the client sent before setting the verified one.
    fn admit(&self, identity: String) -> Decision {
        RequestChanges::new()
            .remove_header(&self.identity_header)
            .set_header(&self.identity_header, identity)
            .into()
    }
}

/// The token of an `Authorization: Bearer <token>` header; the scheme is case-insensitive.
fn bearer_token(request: &Request) -> Option<&str> {
    let value = request.header_str("authorization")?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim_start();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

sluice_sdk::export_policy!(Auth);
