//! Checks on configured header names and values, so that an edit the gateway would refuse
//! fails when the config loads instead of on every request.

use std::collections::BTreeMap;

/// Headers that describe one connection or the message framing; the gateway manages them and
/// treats a policy's change to one as a failure.
const RESERVED: &[&str] = &[
    "connection",
    "content-length",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The lower-cased name, or an error naming the setting if it is not an RFC 9110 token or is
/// a header the gateway reserves.
pub fn name(name: &str, setting: &str) -> Result<String, String> {
    if name.is_empty() || !name.bytes().all(is_token_byte) {
        return Err(format!("{setting}: {name:?} is not a valid header name"));
    }
    let name = name.to_ascii_lowercase();
    if RESERVED.contains(&name.as_str()) {
        return Err(format!(
            "{setting}: {name:?} is managed by the gateway and cannot be changed"
        ));
    }
    Ok(name)
}

/// The value as bytes, or an error if it holds a control character other than tab. CR, LF
/// and NUL could end the header early or smuggle another one in; the gateway refuses the
/// other controls too, so they are caught here rather than on every request.
pub fn value(name: &str, value: String, setting: &str) -> Result<Vec<u8>, String> {
    if value.chars().any(|c| c.is_ascii_control() && c != '\t') {
        return Err(format!(
            "{setting}: the value of {name:?} contains CR, LF, NUL or another control character"
        ));
    }
    Ok(value.into_bytes())
}

/// Checked headers from a `name = "value"` table. Names that differ only in case would edit
/// the same header twice, so they are refused.
pub fn table(
    table: BTreeMap<String, String>,
    setting: &str,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut headers: Vec<(String, Vec<u8>)> = Vec::with_capacity(table.len());
    for (raw_name, raw_value) in table {
        let name = name(&raw_name, setting)?;
        if headers.iter().any(|(seen, _)| *seen == name) {
            return Err(format!("{setting}: {name:?} is listed twice"));
        }
        let value = value(&name, raw_value, setting)?;
        headers.push((name, value));
    }
    Ok(headers)
}

/// `tchar` of RFC 9110 section 5.6.2.
fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}
