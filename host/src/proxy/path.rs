//! Request paths as routes and policies see them: dot segments resolved, encoded slashes
//! refused.
//!
//! A prefix route or policy is only as good as the path it is given. `/public/../admin` must
//! not pass a check for `/public/` and then reach `/admin` at an upstream that resolves dot
//! segments itself, so the gateway resolves them (including percent-encoded dots) before
//! routing, and forwards the path it routed on. An encoded `/` or `\` (`%2F`, `%5C`) would let
//! a path mean one thing to the gateway and another to the upstream, so it is refused.

use std::borrow::Cow;

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `%2F`, `%5C` or a raw `\` in the path.
    EncodedSlash,
}

/// The path with dot segments resolved (RFC 3986, section 5.2.4), or unchanged when it has
/// none.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if has_encoded_slash(path) {
        return Err(PathError::EncodedSlash);
    }
    let segments = path.split('/').skip(1);
    if !segments.clone().any(|s| is_dot(s) || is_dot_dot(s)) {
        return Ok(Cow::Borrowed(path));
    }

    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in path.split('/').skip(1) {
        trailing_slash = false;
        if is_dot(segment) {
            trailing_slash = true;
        } else if is_dot_dot(segment) {
            out.pop();
            trailing_slash = true;
        } else {
            out.push(segment);
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
    Ok(Cow::Owned(normalized))
}

fn has_encoded_slash(path: &str) -> bool {
    let bytes = path.as_bytes();
    bytes.contains(&b'\\')
        || bytes.windows(3).any(|w| {
            w[0] == b'%'
                && (w[1..].eq_ignore_ascii_case(b"2f") || w[1..].eq_ignore_ascii_case(b"5c"))
        })
}

fn is_dot(segment: &str) -> bool {
    segment == "." || segment.eq_ignore_ascii_case("%2e")
}

fn is_dot_dot(segment: &str) -> bool {
    let segment = segment.to_ascii_lowercase();
    matches!(segment.as_str(), ".." | ".%2e" | "%2e." | "%2e%2e")
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert_eq!(normalize(path).unwrap(), expected, "{path}");
        }
    }

    #[test]
    fn ordinary_paths_are_borrowed_unchanged() {
        for path in ["/", "/api/v1/items", "/a..b/c.d", "//double", "/%2e%2ex"] {
            assert!(
                matches!(normalize(path), Ok(Cow::Borrowed(p)) if p == path),
                "{path}"
            );
        }
    }

    #[test]
    fn encoded_slashes_are_refused() {
        for path in ["/public%2F..%2Fadmin", "/a%2fb", "/a%5Cb", "/a\\b"] {
            assert_eq!(normalize(path), Err(PathError::EncodedSlash), "{path}");
        }
    }
}
