//! A policy's configuration, as the gateway hands it over.

use serde::de::DeserializeOwned;

/// The `config` table of a plugin's entry in the gateway config, as JSON text.
///
/// Most policies call [`Config::parse`] with a `serde::Deserialize` type; marking that type
/// `#[serde(deny_unknown_fields)]` makes a misspelt setting a load-time error.
#[derive(Debug, Clone)]
pub struct Config {
    json: String,
}

impl Config {
    /// Wraps configuration JSON text. The gateway does this; tests may too.
    pub fn from_json(json: impl Into<String>) -> Self {
        Config { json: json.into() }
    }

    /// The configuration as JSON text; `{}` when the plugin has no `config` table.
    pub fn as_json(&self) -> &str {
        &self.json
    }

    /// Deserialises the configuration, with an error message that says what is wrong.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_str(&self.json).map_err(|err| format!("invalid plugin config: {err}"))
    }
}
