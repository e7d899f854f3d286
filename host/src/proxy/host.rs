//! The host a request is addressed to.
//!
//! Routes match on it, policies see it, the upstream gets it in `Host` and TLS names it; all of
//! them must agree, and none may be handed something that is not a host. So, as RFC 9112 and
//! RFC 9113 ask, the gateway refuses an HTTP/1.1 request without `Host`, any request with two
//! `Host` lines or one that is not a host name or IP address with an optional port, and an
//! HTTP/2 request whose `host` differs from its `:authority`. The authority of an
//! absolute-form target (`GET http://a.example/ HTTP/1.1`) wins over `Host` and replaces it.

use http::header::{self, HeaderValue};
use http::{Request, Version};

/// Checks the request's host and leaves it in `Host`, where everything after reads it: the
/// authority of the target, when it has one, replaces or fills in `Host`. The reason to answer
/// 400 when the host cannot be told.
pub fn check<B>(request: &mut Request<B>) -> Result<(), &'static str> {
    let mut lines = request.headers().get_all(header::HOST).iter();
    let host = lines.next();
    if lines.next().is_some() || host.is_some_and(|host| !is_host(host.as_bytes())) {
        return Err("invalid_host");
    }
    let http2 = request.version() == Version::HTTP_2;
    match (request.uri().authority(), host) {
        // HTTP/2 may say the host twice: both must agree.
        (Some(authority), Some(host)) if http2 => {
            let agree = (authority.as_str().as_bytes()).eq_ignore_ascii_case(host.as_bytes());
            return agree.then_some(()).ok_or("invalid_host");
        }
        // An absolute-form target in HTTP/1, or `:authority` alone in HTTP/2.
        (Some(authority), _) => {
            if !is_host(authority.as_str().as_bytes()) {
                return Err("invalid_host");
            }
            let host = HeaderValue::from_str(authority.as_str()).map_err(|_| "invalid_host")?;
            request.headers_mut().insert(header::HOST, host);
        }
        (None, None) if request.version() == Version::HTTP_11 => return Err("missing_host"),
        _ => {}
    }
    Ok(())
}

/// A host name (letters, digits, `-`, `.`, `_`, no empty label) or an IP address, IPv6 in
/// brackets, with an optional port.
fn is_host(text: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(text) else {
        return false;
    };
    let (name, port) = match text.rsplit_once(':') {
        Some((name, port)) if !port.contains(']') => (name, Some(port)),
        _ => (text, None),
    };
    if port.is_some_and(|port| port.parse::<u16>().is_err()) {
        return false;
    }
    if let Some(literal) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return literal.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !name.is_empty()
        && !name.contains("..")
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_addresses_and_ports_are_hosts() {
        for host in [
            "example.com",
            "Api.Example.com:8080",
            "a_b-c.example.",
            "127.0.0.1",
            "[::1]",
            "[2001:db8::1]:443",
        ] {
            assert!(is_host(host.as_bytes()), "{host}");
        }
    }

    #[test]
    fn anything_else_is_not() {
        for host in [
            "", "a b", "a/b", "a,b", "user@a", "a..b", ".a", "a:99999", "a:", "::1", "[::1",
            "[not-ip]", "évil",
        ] {
            assert!(!is_host(host.as_bytes()), "{host}");
        }
    }

    #[test]
    fn an_absolute_target_replaces_host() {
        let mut request = Request::get("http://good.example/x")
            .header(header::HOST, "bad.example")
            .body(())
            .unwrap();
        assert_eq!(check(&mut request), Ok(()));
        assert_eq!(request.headers()[header::HOST], "good.example");
    }

    #[test]
    fn http2_host_must_match_the_authority() {
        let request = |host: &str| {
            Request::get("http://good.example/x")
                .version(Version::HTTP_2)
                .header(header::HOST, host)
                .body(())
                .unwrap()
        };
        assert_eq!(check(&mut request("GOOD.example")), Ok(()));
        assert_eq!(check(&mut request("bad.example")), Err("invalid_host"));

        let mut alone = Request::get("http://good.example/x")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        assert_eq!(check(&mut alone), Ok(()));
        assert_eq!(alone.headers()[header::HOST], "good.example");
    }
}
