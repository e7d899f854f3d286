//! Authentication by a static API key sent in a request header.

use std::collections::BTreeMap;

use serde::Deserialize;
use sluice_sdk::Request;
use subtle::ConstantTimeEq;

use crate::header;

/// The `[api_keys]` table.
///
/// Not `Debug`, so that secrets cannot end up in a log.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySettings {
    #[serde(default = "default_header")]
    header: String,
    /// Key to identity.
    keys: BTreeMap<String, String>,
}

/// The configured keys and the header they are read from.
///
/// Not `Debug`, so that secrets cannot end up in a log.
pub struct ApiKeys {
    header: String,
    keys: Vec<(Vec<u8>, String)>,
}

/// What the API key of a request says about its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCheck<'a> {
    /// The request has no key header.
    Absent,
    /// The key is not configured.
    Unknown,
    /// The key belongs to this identity.
    Identity(&'a str),
}

fn default_header() -> String {
    "x-api-key".to_string()
}

// === impl ApiKeys ===

impl ApiKeys {
    /// Validates the `[api_keys]` table.
    pub fn new(settings: ApiKeySettings) -> Result<Self, String> {
        let header = header::header_name(&settings.header, "api_keys.header")?;
        if settings.keys.is_empty() {
            return Err("api_keys.keys is empty: configure at least one key".to_string());
        }
        let keys = settings
            .keys
            .into_iter()
            .map(check_key)
            .collect::<Result<_, _>>()?;
        Ok(ApiKeys { header, keys })
    }

    /// The header the key is read from.
    pub fn header(&self) -> &str {
        &self.header
    }

    /// Checks the key the request presents, if any.
    pub fn check(&self, request: &Request) -> KeyCheck<'_> {
        let Some(presented) = request.header(&self.header) else {
            return KeyCheck::Absent;
        };

        // Every key is compared, each in constant time, so the response time does not tell a
        // client how much of a guessed key was right.
        let mut outcome = KeyCheck::Unknown;
        for (key, identity) in &self.keys {
            if bool::from(key.as_slice().ct_eq(presented)) {
                outcome = KeyCheck::Identity(identity);
            }
        }
        outcome
    }
}

fn check_key((key, identity): (String, String)) -> Result<(Vec<u8>, String), String> {
    if !header::is_safe_value(key.as_bytes()) {
        return Err("an api_keys.keys key is empty or has control characters".to_string());
    }
    if !header::is_safe_value(identity.as_bytes()) {
        return Err(format!(
            "the identity {identity:?} in api_keys.keys is empty or has control characters"
        ));
    }
    Ok((key.into_bytes(), identity))
}
