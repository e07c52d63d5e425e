//! Reading what the kernel sent: the call id in a copied request head, and the choice of
//! a status code for a fork-mode exit.

/// The value of the first `X-Call-Id` header in a request head (case-insensitive name).
/// `None` if the header is absent or cut off by the copy's length limit. One pass over the
/// header lines (found with `memchr`), stopping at the blank line that ends them.
pub fn call_id_from_head(head: &[u8]) -> Option<String> {
    const NAME: &[u8] = b"x-call-id:";
    // A line without its '\n' was cut by the copy: its value may be truncated, so only
    // complete lines are looked at. The first is the request line.
    let mut ends = memchr::memchr_iter(b'\n', head);
    let mut start = ends.next()? + 1;
    for nl in ends {
        let line = &head[start..nl];
        start = nl + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return None; // end of the headers
        }
        if line.len() >= NAME.len() && line[..NAME.len()].eq_ignore_ascii_case(NAME) {
            let raw = &line[NAME.len()..];
            let text = match std::str::from_utf8(raw) {
                Ok(s) => std::borrow::Cow::Borrowed(s),
                Err(_) => String::from_utf8_lossy(raw),
            };
            let value = text.trim();
            return (!value.is_empty()).then(|| value.to_owned());
        }
    }
    None
}

/// The call id a fork-mode process carried in its environment.
pub fn call_id_from_env(bytes: &[u8], len: u32) -> Option<String> {
    let n = (len as usize).min(bytes.len());
    let s = String::from_utf8_lossy(&bytes[..n]).trim().to_owned();
    (!s.is_empty()).then_some(s)
}

/// Fork mode has no HTTP response of its own: exit 0 is a 200, anything else a 500 (as the
/// classic watchdog answers).
pub fn fork_status(exit_code: i32) -> u16 {
    if exit_code == 0 { 200 } else { 500 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_id_found_case_insensitively() {
        let head = b"GET /x HTTP/1.1\r\nHost: a\r\nx-CALL-id:  abc-123 \r\n\r\nbody";
        assert_eq!(call_id_from_head(head).as_deref(), Some("abc-123"));
    }

    #[test]
    fn call_id_absent_or_truncated() {
        assert_eq!(
            call_id_from_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            None
        );
        // Cut inside the header block: the last line may be partial.
        assert_eq!(call_id_from_head(b"GET / HTTP/1.1\r\nX-Call-Id: ab"), None);
        // Cut after the line ended: the value is complete.
        let head = b"GET / HTTP/1.1\r\nX-Call-Id: abc\r\nHost: x";
        assert_eq!(call_id_from_head(head).as_deref(), Some("abc"));
        // Only the header block counts, not a body that looks like a header.
        let head = b"POST / HTTP/1.1\r\nHost: a\r\n\r\nX-Call-Id: body\r\n";
        assert_eq!(call_id_from_head(head), None);
        // No line end at all, an empty value, and a value that is not UTF-8.
        assert_eq!(call_id_from_head(b"GET / HTTP/1.1"), None);
        assert_eq!(call_id_from_head(b"GET / HTTP/1.1\nX-Call-Id:  \n\n"), None);
        let head = b"GET / HTTP/1.1\r\nX-Call-Id: a\xffb\r\n\r\n";
        assert_eq!(call_id_from_head(head).as_deref(), Some("a\u{fffd}b"));
    }

    #[test]
    fn env_call_id() {
        let mut b = [0u8; 64];
        b[..3].copy_from_slice(b"xyz");
        assert_eq!(call_id_from_env(&b, 3).as_deref(), Some("xyz"));
        assert_eq!(call_id_from_env(&b, 0), None);
        assert_eq!(fork_status(0), 200);
        assert_eq!(fork_status(-1), 500);
    }
}
