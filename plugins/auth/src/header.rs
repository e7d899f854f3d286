//! Checks on header names and values, so that a bad setting fails at load time and a bad
//! identity never reaches the gateway, which would treat it as a policy failure.

/// The lower-cased header name, or an error naming the setting if it is not an RFC 9110 token.
pub fn header_name(name: &str, setting: &str) -> Result<String, String> {
    if name.is_empty() || !name.bytes().all(is_token_byte) {
        return Err(format!("{setting} {name:?} is not a valid header name"));
    }
    Ok(name.to_ascii_lowercase())
}

/// Whether `value` can be sent as a header value: not empty and free of control characters
/// other than tab (so no CR, LF or NUL that could split or truncate the header).
pub fn is_safe_value(value: &[u8]) -> bool {
    !value.is_empty()
        && value
            .iter()
            .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// `tchar` of RFC 9110 section 5.6.2.
fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}
