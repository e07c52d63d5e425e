//! Header handling on the way to a function and back: hop-by-hop headers stripped,
//! `X-Forwarded-*` set when absent, call id and start time added.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub const X_CALL_ID: HeaderName = HeaderName::from_static("x-call-id");
pub const X_START_TIME: HeaderName = HeaderName::from_static("x-start-time");
pub const X_DURATION_SECONDS: HeaderName = HeaderName::from_static("x-duration-seconds");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// Removes hop-by-hop headers, including those named by `Connection`.
/// `Transfer-Encoding` is left to hyper, which re-frames bodies itself.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

/// The client at the other end of a connection, with its `X-Forwarded-For` value
/// rendered once per connection rather than once per request.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    forwarded_for: Option<HeaderValue>,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            forwarded_for: HeaderValue::from_str(&addr.ip().to_string()).ok(),
        }
    }
}

/// Prepares the headers of a request going to a function.
pub fn to_function(headers: &mut HeaderMap, peer: &Peer, call_id: &str, start_nanos: u128) {
    strip_hop_by_hop(headers);
    if !headers.contains_key(&X_FORWARDED_FOR)
        && let Some(v) = &peer.forwarded_for
    {
        headers.insert(X_FORWARDED_FOR, v.clone());
    }
    if !headers.contains_key(&X_FORWARDED_HOST)
        && let Some(host) = headers.get(header::HOST).cloned()
    {
        headers.insert(X_FORWARDED_HOST, host);
    }
    set_call_headers(headers, call_id, start_nanos);
}

/// Sets `X-Call-Id` and `X-Start-Time`.
pub fn set_call_headers(headers: &mut HeaderMap, call_id: &str, start_nanos: u128) {
    if let Ok(v) = HeaderValue::from_str(call_id) {
        headers.insert(X_CALL_ID, v);
    }
    headers.insert(X_START_TIME, HeaderValue::from(start_nanos as u64));
}

/// The call id the caller sent, if it is usable, else a new UUID.
pub fn call_id(headers: &HeaderMap) -> String {
    headers
        .get(&X_CALL_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), String::from)
}

/// CGI-style environment for a fork-mode process: `Http_X_Call_Id`, `Http_Method`, ...
pub fn cgi_env(
    headers: &HeaderMap,
    method: &http::Method,
    path: &str,
    query: Option<&str>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(name, value)| {
            Some((
                format!("Http_{}", canonical_env_name(name.as_str())),
                value.to_str().ok()?.to_string(),
            ))
        })
        .collect();
    env.push(("Http_Method".into(), method.to_string()));
    env.push(("Http_Path".into(), path.to_string()));
    if let Some(q) = query {
        env.push(("Http_Query".into(), q.to_string()));
    }
    env
}

/// `x-call-id` → `X_Call_Id` (Go's canonical header form, dashes as underscores).
fn canonical_env_name(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => {
                    first.to_ascii_uppercase().to_string() + &chars.as_str().to_ascii_lowercase()
                }
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_forwarded() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::HOST, HeaderValue::from_static("gw:8080"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        to_function(&mut h, &Peer::new("10.0.0.1:5".parse().unwrap()), "abc", 42);
        assert!(!h.contains_key("x-secret-hop") && !h.contains_key("keep-alive"));
        assert!(!h.contains_key(header::CONNECTION));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        assert_eq!(h["x-forwarded-host"], "gw:8080");
        assert_eq!(h["x-call-id"], "abc");
        assert_eq!(h["x-start-time"], "42");
        assert_eq!(h["x-keep"], "1");
    }

    #[test]
    fn cgi_names() {
        let mut h = HeaderMap::new();
        h.insert("x-call-id", HeaderValue::from_static("id1"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let env = cgi_env(&h, &http::Method::POST, "/a", Some("x=1"));
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("Http_X_Call_Id"), Some("id1"));
        assert_eq!(get("Http_Content_Type"), Some("text/plain"));
        assert_eq!(get("Http_Method"), Some("POST"));
        assert_eq!(get("Http_Query"), Some("x=1"));
    }

    #[test]
    fn call_ids() {
        let mut h = HeaderMap::new();
        assert_eq!(call_id(&h).len(), 36);
        h.insert("x-call-id", HeaderValue::from_static("mine"));
        assert_eq!(call_id(&h), "mine");
    }
}
