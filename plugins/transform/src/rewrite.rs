//! Rewriting a leading path prefix, e.g. `/api/users?x=1` to `/v1/users?x=1`.

use serde::Deserialize;

/// The `[rewrite]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteSettings {
    prefix: String,
    replacement: String,
}

/// Replaces a path prefix that ends at a segment boundary.
///
/// Both are kept without a trailing `/`, so `/api` and `/api/` configure the same rewrite and
/// the root prefix `/` is the empty string, which every path starts with.
#[derive(Debug)]
pub struct PrefixRewrite {
    prefix: String,
    replacement: String,
}

// === impl PrefixRewrite ===

impl PrefixRewrite {
    /// Checks that both paths are plain absolute paths.
    pub fn new(settings: RewriteSettings) -> Result<Self, String> {
        Ok(PrefixRewrite {
            prefix: plain_path(settings.prefix, "rewrite.prefix")?,
            replacement: plain_path(settings.replacement, "rewrite.replacement")?,
        })
    }

    /// The rewritten path and query, or `None` if the path does not start with the prefix.
    ///
    /// The prefix matches whole segments of the raw path: `/api` matches `/api` and
    /// `/api/users` but not `/apis`. The query is kept as it was.
    pub fn apply(&self, path_and_query: &str) -> Option<String> {
        let query_start = path_and_query.find('?').unwrap_or(path_and_query.len());
        let (path, query) = path_and_query.split_at(query_start);
        let rest = path.strip_prefix(self.prefix.as_str())?;
        if !rest.is_empty() && !rest.starts_with('/') {
            return None;
        }

        let mut rewritten = format!("{}{rest}", self.replacement);
        if rewritten.is_empty() {
            rewritten.push('/');
        }
        rewritten.push_str(query);
        Some(rewritten)
    }
}

/// The path without its trailing `/`, if it starts with `/` and holds only the characters
/// RFC 3986 allows in a path (percent-escapes included), so the result is always a valid
/// request target; `?` and `#` are not among them, as a rewrite never touches the query.
fn plain_path(path: String, setting: &str) -> Result<String, String> {
    if !path.starts_with('/') {
        return Err(format!("{setting} {path:?} must start with '/'"));
    }
    if !path.bytes().all(is_path_byte) {
        return Err(format!(
            "{setting} {path:?} may only hold path characters: letters, digits, \
             \"-._~!$&'()*+,;=:@%/\", and no '?' or '#'"
        ));
    }
    Ok(path.trim_end_matches('/').to_string())
}

/// `pchar` of RFC 3986 section 3.3, with `/` between segments.
fn is_path_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@%/".contains(&byte)
}
