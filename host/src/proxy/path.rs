//! Request paths as routes and policies see them: escapes of unreserved characters decoded,
//! dot segments resolved, encoded slashes handled as configured.
//!
//! A prefix route or policy is only as good as the path it is given. `/public/../admin` must
//! not pass a check for `/public/` and then reach `/admin` at an upstream that resolves dot
//! segments itself, so the gateway resolves them (including percent-encoded dots) before
//! routing, and forwards the path it routed on. Likewise `/%61dmin` is `/admin` to any
//! upstream that decodes it, so escapes of unreserved characters (letters, digits, `-._~`)
//! are decoded first, as RFC 3986 (section 6.2.2.2) allows; the hex digits of every other
//! escape are uppercased.
//!
//! An encoded `/` or `\` (`%2F`, `%5C`) would let a path mean one thing to the gateway and
//! another to an upstream that decodes it. What to do with it is the listener's
//! `encoded_slash` (as Envoy's `path_with_escaped_slashes_action`): refuse the request (the
//! default), keep the escape as ordinary characters, or decode it (and a raw `\`) to `/`
//! before dot segments are resolved.

use std::borrow::Cow;

use crate::config::EncodedSlash;

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `%2F`, `%5C` or a raw `\` in the path, with `encoded_slash = "reject"`.
    EncodedSlash,
    /// A `%` without two hex digits after it, or an escaped NUL: no upstream can be relied on
    /// to read such a path the way the gateway would.
    BadEscape,
}

/// The path with unreserved escapes decoded, encoded slashes handled by `action` and dot
/// segments resolved (RFC 3986, section 5.2.4); unchanged when none of that applies.
pub fn normalize(path: &str, action: EncodedSlash) -> Result<Cow<'_, str>, PathError> {
    if has_bad_escape(path) {
        return Err(PathError::BadEscape);
    }
    if action == EncodedSlash::Reject && has_encoded_slash(path) {
        return Err(PathError::EncodedSlash);
    }
    let decoded = decode(path, action == EncodedSlash::Decode);
    Ok(match resolve_dots(&decoded) {
        Some(resolved) => Cow::Owned(resolved),
        None => decoded,
    })
}

/// Decodes escapes of unreserved characters and uppercases the others; with `slashes`, turns
/// `%2F`, `%5C` and `\` into `/`.
fn decode(path: &str, slashes: bool) -> Cow<'_, str> {
    let bytes = path.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut at = 0;
    while at < bytes.len() {
        let (replacement, length) = match bytes[at] {
            b'\\' if slashes => (Replacement::Char('/'), 1),
            b'%' => match escape_at(bytes, at) {
                Some(byte) if slashes && matches!(byte, b'/' | b'\\') => {
                    (Replacement::Char('/'), 3)
                }
                Some(byte) if is_unreserved(byte) => (Replacement::Char(char::from(byte)), 3),
                Some(_) if bytes[at + 1..at + 3].iter().any(u8::is_ascii_lowercase) => {
                    (Replacement::Upper, 3)
                }
                _ => (Replacement::None, 1),
            },
            _ => (Replacement::None, 1),
        };
        if replacement != Replacement::None {
            let out = out.get_or_insert_with(|| String::with_capacity(path.len()));
            out.push_str(&path[copied..at]);
            match replacement {
                Replacement::Char(c) => out.push(c),
                Replacement::Upper => {
                    let digits = bytes[at..at + 3].iter().map(u8::to_ascii_uppercase);
                    out.extend(digits.map(char::from));
                }
                Replacement::None => {}
            }
            copied = at + length;
        }
        at += length;
    }
    match out {
        Some(mut out) => {
            out.push_str(&path[copied..]);
            Cow::Owned(out)
        }
        None => Cow::Borrowed(path),
    }
}

/// What [`decode`] puts in place of the bytes at one position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replacement {
    None,
    Char(char),
    /// The same escape, in uppercase hex.
    Upper,
}

/// The byte escaped by the `%` at `at`, if two hex digits follow it.
fn escape_at(bytes: &[u8], at: usize) -> Option<u8> {
    let digits = bytes.get(at + 1..at + 3)?;
    let hex = |d: u8| char::from(d).to_digit(16);
    Some((hex(digits[0])? * 16 + hex(digits[1])?) as u8)
}

fn has_bad_escape(path: &str) -> bool {
    let bytes = path.as_bytes();
    let escapes = bytes.iter().enumerate().filter(|(_, byte)| **byte == b'%');
    escapes
        .map(|(at, _)| escape_at(bytes, at))
        .any(|escaped| matches!(escaped, None | Some(0)))
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// The path with its dot segments resolved, or `None` when it has none.
fn resolve_dots(path: &str) -> Option<String> {
    let segments = path.split('/').skip(1);
    if !segments.clone().any(|s| s == "." || s == "..") {
        return None;
    }
    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in segments {
        trailing_slash = false;
        match segment {
            "." => trailing_slash = true,
            ".." => {
                out.pop();
                trailing_slash = true;
            }
            segment => out.push(segment),
        }
    }
    let mut normalized = String::with_capacity(path.len());
    for segment in &out {
        normalized.push('/');
        normalized.push_str(segment);
    }
    if trailing_slash || normalized.is_empty() {
        normalized.push('/');
    }
    Some(normalized)
}

fn has_encoded_slash(path: &str) -> bool {
    let bytes = path.as_bytes();
    bytes.contains(&b'\\')
        || bytes.windows(3).any(|w| {
            w[0] == b'%'
                && (w[1..].eq_ignore_ascii_case(b"2f") || w[1..].eq_ignore_ascii_case(b"5c"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalized(path: &str) -> Result<Cow<'_, str>, PathError> {
        normalize(path, EncodedSlash::Reject)
    }

    #[test]
    fn dot_segments_are_resolved() {
        for (path, expected) in [
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/.%2E/admin", "/admin"),
            ("/a/./b/", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/..", "/"),
        ] {
            assert_eq!(normalized(path).unwrap(), expected, "{path}");
        }
    }

    #[test]
    fn ordinary_paths_are_borrowed_unchanged() {
        for path in [
            "/",
            "/api/v1/items",
            "/a..b/c.d",
            "//double",
            "/a%20b%0D%0A",
        ] {
            assert!(
                matches!(normalized(path), Ok(Cow::Borrowed(p)) if p == path),
                "{path}"
            );
        }
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_other_escapes_uppercased() {
        for (path, expected) in [
            ("/%61dmin", "/admin"),
            ("/%41%5a%30%2D%2e%5F%7e", "/AZ0-._~"),
            ("/%2e%2ex", "/..x"),
            ("/public/%61/../%61dmin", "/public/admin"),
            ("/a%0d%0ab", "/a%0D%0Ab"),
            // One pass only: `%25` is `%`, which stays escaped, so nothing is decoded twice.
            ("/%2561dmin", "/%2561dmin"),
        ] {
            assert_eq!(normalized(path).unwrap(), expected, "{path}");
        }
    }

    #[test]
    fn broken_escapes_and_an_escaped_nul_are_refused() {
        for path in ["/100%", "/x%2", "/%zz", "/a%4/b", "/x%00y"] {
            for action in [
                EncodedSlash::Reject,
                EncodedSlash::Keep,
                EncodedSlash::Decode,
            ] {
                assert_eq!(normalize(path, action), Err(PathError::BadEscape), "{path}");
            }
        }
    }

    #[test]
    fn encoded_slashes_are_refused_by_default() {
        for path in ["/public%2F..%2Fadmin", "/a%2fb", "/a%5Cb", "/a\\b"] {
            assert_eq!(normalized(path), Err(PathError::EncodedSlash), "{path}");
        }
    }

    #[test]
    fn kept_encoded_slashes_are_ordinary_characters() {
        for (path, expected) in [
            ("/public%2F..%2Fadmin", "/public%2F..%2Fadmin"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%5Cb/../c", "/c"),
            ("/a\\b", "/a\\b"),
        ] {
            assert_eq!(
                normalize(path, EncodedSlash::Keep).unwrap(),
                expected,
                "{path}"
            );
        }
    }

    #[test]
    fn decoded_encoded_slashes_are_slashes_before_dot_segments_are_resolved() {
        for (path, expected) in [
            ("/public%2F..%2Fadmin", "/admin"),
            ("/public%5c..%5cadmin", "/admin"),
            ("/public\\..\\admin", "/admin"),
            ("/a%2fb", "/a/b"),
            ("/a%252Fb", "/a%252Fb"),
        ] {
            assert_eq!(
                normalize(path, EncodedSlash::Decode).unwrap(),
                expected,
                "{path}"
            );
        }
    }
}
