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

/// The path without its trailing `/`, if it starts with `/` and has only visible ASCII and no
/// `?` or `#` (a rewrite changes the path, never the query).
fn plain_path(path: String, setting: &str) -> Result<String, String> {
    if !path.starts_with('/') {
        return Err(format!("{setting} {path:?} must start with '/'"));
    }
    if !path
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#')
    {
        return Err(format!(
            "{setting} {path:?} may only hold visible ASCII without '?' or '#'"
        ));
    }
    Ok(path.trim_end_matches('/').to_string())
}
