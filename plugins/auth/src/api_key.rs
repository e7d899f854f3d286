//! Authentication by a static API key sent in a request header.

use std::collections::BTreeMap;

use serde::Deserialize;
use sluice_sdk::Request;
use subtle::ConstantTimeEq;

use crate::header;

/// The `[api_keys]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySettings {
    #[serde(default = "default_header")]
    header: String,
    /// Key to identity.
    keys: BTreeMap<String, String>,
}

/// The configured keys and the header they are read from.
#[derive(Debug)]
pub struct ApiKeys {
    header: String,
    keys: Vec<(Vec<u8>, String)>,
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
        let keys = settings.keys.into_iter().map(check_key).collect::<Result<_, _>>()?;
        Ok(ApiKeys { header, keys })
    }

    /// The header the key is read from.
    pub fn header(&self) -> &str {
        &self.header
    }

    /// Whether the request carries the key header at all.
    pub fn is_presented(&self, request: &Request) -> bool {
        request.header(&self.header).is_some()
    }

    /// The identity of the key the request presents, if it is a configured key.
    pub fn identify(&self, request: &Request) -> Option<&str> {
        let presented = request.header(&self.header)?;

        // Every key is compared, each in constant time, so the response time does not tell a
        // client how much of a guessed key was right.
        let mut identity = None;
        for (key, id) in &self.keys {
            if bool::from(key.as_slice().ct_eq(presented)) {
                identity = Some(id.as_str());
            }
        }
        identity
    }
}

fn check_key((key, identity): (String, String)) -> Result<(Vec<u8>, String), String> {
    if !header::is_safe_value(key.as_bytes()) {
        return Err("an api_keys.keys key is empty or has control characters".to_string());
    }
    if !header::is_safe_value(identity.as_bytes()) {
        return Err(format!("the identity {identity:?} in api_keys.keys is empty or has control characters"));
    }
    Ok((key.into_bytes(), identity))
}
