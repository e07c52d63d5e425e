//! The webhook's event: OpenFaaS's `function_usage` fields unchanged (so existing
//! receivers parse it) plus Tally's additive fields with what was really measured.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionUsage {
    /// Always `function_usage`.
    pub event: String,
    /// Unique per event, stable across redelivery (the receiver dedupes on it).
    pub id: String,
    pub namespace: String,
    pub function_name: String,
    /// RFC3339 with nanoseconds.
    pub started: String,
    /// Nanoseconds.
    pub duration: u64,
    /// The function's memory limit, or the configured default (OpenFaaS's meaning).
    pub memory_bytes: u64,
    pub call_id: Option<String>,
    pub status_code: u16,
    /// Peak resident memory over the invocation, when measured in the kernel.
    pub memory_peak_bytes: Option<u64>,
    pub cpu_ns: Option<u64>,
    /// The invocation waited for a replica (scale from zero, or none ready).
    pub cold_start: bool,
    pub init_duration_ns: Option<u64>,
    /// `duration` rounded up to a whole millisecond.
    pub billed_duration_ms: u64,
    /// `kernel` or `gateway`.
    pub source: String,
}

impl FunctionUsage {
    pub fn billed_ms(duration_ns: u64) -> u64 {
        duration_ns.div_ceil(1_000_000)
    }
}

/// A usage event by reference, written as its JSON line without building a
/// [`FunctionUsage`] first: the invocation path's encoder, byte for byte what serde writes.
pub struct UsageLine<'a> {
    pub id: &'a str,
    pub namespace: &'a str,
    pub function_name: &'a str,
    pub started: &'a str,
    pub duration: u64,
    pub memory_bytes: u64,
    pub call_id: Option<&'a str>,
    pub status_code: u16,
    pub memory_peak_bytes: Option<u64>,
    pub cpu_ns: Option<u64>,
    pub cold_start: bool,
    pub init_duration_ns: Option<u64>,
    pub billed_duration_ms: u64,
    pub source: &'a str,
}

impl UsageLine<'_> {
    /// The owned event with these fields (the inverse of [`FunctionUsage::as_line`]).
    pub fn to_event(&self) -> FunctionUsage {
        FunctionUsage {
            event: "function_usage".into(),
            id: self.id.into(),
            namespace: self.namespace.into(),
            function_name: self.function_name.into(),
            started: self.started.into(),
            duration: self.duration,
            memory_bytes: self.memory_bytes,
            call_id: self.call_id.map(Into::into),
            status_code: self.status_code,
            memory_peak_bytes: self.memory_peak_bytes,
            cpu_ns: self.cpu_ns,
            cold_start: self.cold_start,
            init_duration_ns: self.init_duration_ns,
            billed_duration_ms: self.billed_duration_ms,
            source: self.source.into(),
        }
    }

    /// Appends the event as one JSON object (no newline).
    pub fn write(&self, out: &mut Vec<u8>) {
        out.reserve(
            320 + self.id.len()
                + self.namespace.len()
                + self.function_name.len()
                + self.call_id.map_or(0, str::len)
                + self.source.len(),
        );
        out.extend_from_slice(b"{\"event\":\"function_usage\",\"id\":");
        string(out, self.id);
        out.extend_from_slice(b",\"namespace\":");
        string(out, self.namespace);
        out.extend_from_slice(b",\"function_name\":");
        string(out, self.function_name);
        out.extend_from_slice(b",\"started\":");
        string(out, self.started);
        out.extend_from_slice(b",\"duration\":");
        number(out, self.duration);
        out.extend_from_slice(b",\"memory_bytes\":");
        number(out, self.memory_bytes);
        out.extend_from_slice(b",\"call_id\":");
        match self.call_id {
            Some(id) => string(out, id),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"status_code\":");
        number(out, u64::from(self.status_code));
        out.extend_from_slice(b",\"memory_peak_bytes\":");
        optional(out, self.memory_peak_bytes);
        out.extend_from_slice(b",\"cpu_ns\":");
        optional(out, self.cpu_ns);
        out.extend_from_slice(if self.cold_start {
            b",\"cold_start\":true,\"init_duration_ns\":"
        } else {
            b",\"cold_start\":false,\"init_duration_ns\":"
        });
        optional(out, self.init_duration_ns);
        out.extend_from_slice(b",\"billed_duration_ms\":");
        number(out, self.billed_duration_ms);
        out.extend_from_slice(b",\"source\":");
        string(out, self.source);
        out.push(b'}');
    }
}

impl FunctionUsage {
    pub fn as_line(&self) -> UsageLine<'_> {
        UsageLine {
            id: &self.id,
            namespace: &self.namespace,
            function_name: &self.function_name,
            started: &self.started,
            duration: self.duration,
            memory_bytes: self.memory_bytes,
            call_id: self.call_id.as_deref(),
            status_code: self.status_code,
            memory_peak_bytes: self.memory_peak_bytes,
            cpu_ns: self.cpu_ns,
            cold_start: self.cold_start,
            init_duration_ns: self.init_duration_ns,
            billed_duration_ms: self.billed_duration_ms,
            source: &self.source,
        }
    }
}

fn number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn optional(out: &mut Vec<u8>, n: Option<u64>) {
    match n {
        Some(n) => number(out, n),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string with serde_json's escapes: `"`, `\` and control characters only.
fn string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // Ids, names and times never need an escape: one branch-free pass finds that out.
    if !bytes.iter().fold(false, |any, &b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    }) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// `t` in RFC3339 (UTC, nanoseconds), written without `fmt` by the writer the agent uses
/// too; `None` before 1970 or after 9999, which the caller formats the slow way.
pub fn rfc3339_fast(t: std::time::SystemTime) -> Option<agent_common::rfc3339::Rfc3339> {
    let since = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    agent_common::rfc3339::Rfc3339::from_unix(since.as_secs(), since.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn billed_duration_rounds_up() {
        assert_eq!(FunctionUsage::billed_ms(0), 0);
        assert_eq!(FunctionUsage::billed_ms(1), 1);
        assert_eq!(FunctionUsage::billed_ms(1_000_000), 1);
        assert_eq!(FunctionUsage::billed_ms(1_000_001), 2);
    }

    fn sample(i: u64) -> FunctionUsage {
        let odd = |s: &str| {
            if i % 2 == 1 {
                format!("{s}\"q\\\u{1}\u{1f}\n\t\r\u{8}\u{c}é✓\u{7f}")
            } else {
                s.to_string()
            }
        };
        FunctionUsage {
            event: "function_usage".into(),
            id: odd("0b6d4a1e-3c5f-4e0a-9d2b-7f1c2e3a4b5c"),
            namespace: odd("openfaas-fn"),
            function_name: odd("tiny"),
            started: "2026-11-23T03:02:01.000000123Z".into(),
            duration: i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            memory_bytes: u64::MAX - i,
            call_id: (!i.is_multiple_of(3)).then(|| odd("call")),
            status_code: [200, 0, 599, 65535][(i % 4) as usize],
            memory_peak_bytes: i.is_multiple_of(2).then_some(i << 20),
            cpu_ns: (!i.is_multiple_of(5)).then_some(i),
            cold_start: i.is_multiple_of(2),
            init_duration_ns: (!i.is_multiple_of(7)).then_some(i * 13),
            billed_duration_ms: i / 3,
            source: odd("gateway"),
        }
    }

    #[test]
    fn the_hand_encoder_writes_what_serde_writes() {
        for i in 0..64 {
            let event = sample(i);
            let mut line = Vec::new();
            event.as_line().write(&mut line);
            let expected = serde_json::to_vec(&event).expect("serializable");
            assert_eq!(
                String::from_utf8_lossy(&line),
                String::from_utf8_lossy(&expected),
                "event {i}"
            );
            let back: FunctionUsage = serde_json::from_slice(&line).expect("parses");
            assert_eq!(back, event);
        }
    }

    #[test]
    fn times_before_1970_are_left_to_the_slow_way() {
        use std::time::{Duration, UNIX_EPOCH};
        assert!(rfc3339_fast(UNIX_EPOCH - Duration::from_secs(1)).is_none());
        let t = UNIX_EPOCH + Duration::new(951_782_400, 7);
        assert_eq!(
            rfc3339_fast(t).expect("in range").as_str(),
            "2000-02-29T00:00:00.000000007Z"
        );
    }

    #[test]
    fn a_line_turns_back_into_its_event() {
        for i in 0..64 {
            let event = sample(i);
            assert_eq!(event.as_line().to_event(), event);
        }
    }
}
