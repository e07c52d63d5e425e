//! The usage event: one per invocation, measured in the kernel, as the gateway ingests it
//! (`POST /system/usage`, a JSON array of these).

use std::{borrow::Cow, sync::Arc};

use serde::{Deserialize, Serialize};

/// One invocation of one function replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// This event's own id (UUID v4), made once when the agent builds the event and kept with
    /// it in the spool: every resend carries the same id, so the gateway bills it once.
    /// (Segments spooled by an agent older than ids get one when read back.)
    #[serde(default = "new_id")]
    pub id: Text<36>,
    /// `X-Call-Id` of the request (http) or `Http_X_Call_Id` of the process (fork); `None`
    /// when the invocation carried none.
    pub call_id: Option<String>,
    /// The names are shared with the replica's entry in the joiner: an event costs no copy
    /// of them.
    pub namespace: Arc<str>,
    pub function_name: Arc<str>,
    pub replica: Arc<str>,
    /// When the request's first bytes reached the function (http) or the process exec'd
    /// (fork): RFC 3339 with nanoseconds.
    pub started: Text<32>,
    /// Request read → last response byte written (http); exec → exit (fork).
    pub duration_ns: u64,
    /// The response status (http; 0 if none was written), or 200/500 from the exit code (fork).
    pub status_code: u16,
    /// Peak resident memory (file + anon + shmem) over the invocation.
    pub memory_peak_bytes: u64,
    pub memory_limit_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_ns: Option<u64>,
    /// fork mode: the process's exit code (-1: killed by a signal).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Always `"kernel"`; the gateway's own events say `"gateway"`.
    pub source: Cow<'static, str>,
}

impl UsageEvent {
    /// This event as the ingest API's binary batch carries it, borrowing its strings.
    pub fn wire(&self) -> agent_common::wire::Usage<'_> {
        agent_common::wire::Usage {
            id: Some(Cow::Borrowed(&self.id)),
            call_id: self.call_id.as_deref().map(Cow::Borrowed),
            namespace: Cow::Borrowed(&self.namespace),
            function_name: Cow::Borrowed(&self.function_name),
            replica: Some(Cow::Borrowed(&self.replica)),
            started: Cow::Borrowed(&self.started),
            duration_ns: self.duration_ns,
            status_code: self.status_code,
            memory_peak_bytes: self.memory_peak_bytes,
            memory_limit_bytes: self.memory_limit_bytes,
            cpu_ns: self.cpu_ns,
            exit_code: self.exit_code,
            source: Cow::Borrowed(&self.source),
        }
    }
}

/// [`UsageEvent::source`] of every event the agent makes.
pub const SOURCE: Cow<'static, str> = Cow::Borrowed("kernel");

/// A fresh event id: a random (v4) UUID.
pub fn new_id() -> Text<36> {
    let mut buf = uuid::Uuid::encode_buffer();
    Text::new(uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf)).unwrap_or_default()
}

/// A string of at most `N` bytes kept inline: an event's id and `started` are made for every
/// invocation and freed with it on the forwarder's thread, so they cost no allocation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Text<const N: usize> {
    len: u8,
    buf: [u8; N],
}

impl<const N: usize> Default for Text<N> {
    fn default() -> Self {
        Self {
            len: 0,
            buf: [0; N],
        }
    }
}

impl<const N: usize> Text<N> {
    /// `s`, or `None` if it is longer than `N` bytes.
    pub fn new(s: &str) -> Option<Self> {
        const { assert!(N <= u8::MAX as usize, "the length is kept in a byte") };
        let len = u8::try_from(s.len())
            .ok()
            .filter(|n| usize::from(*n) <= N)?;
        let mut t = Self { len, buf: [0; N] };
        t.buf[..s.len()].copy_from_slice(s.as_bytes());
        Some(t)
    }

    pub fn as_str(&self) -> &str {
        let bytes = &self.buf[..usize::from(self.len)];
        // SAFETY: only `new` writes the buffer, with the bytes of a whole `&str`.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }
}

impl<const N: usize> std::ops::Deref for Text<N> {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl<const N: usize> std::fmt::Debug for Text<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl<const N: usize> std::fmt::Display for Text<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> PartialEq<&str> for Text<N> {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl<const N: usize> Serialize for Text<N> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de, const N: usize> Deserialize<'de> for Text<N> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <Cow<'de, str>>::deserialize(d)?;
        Self::new(&s).ok_or_else(|| {
            serde::de::Error::invalid_length(s.len(), &format!("at most {N} bytes").as_str())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_holds_what_fits_and_reads_back_as_json() {
        let id = new_id();
        assert_eq!(id.len(), 36);
        assert_ne!(id, new_id());
        assert!(Text::<4>::new("abcde").is_none(), "too long");
        let t = Text::<8>::new("ab\"é").expect("fits");
        assert_eq!(t, "ab\"é");
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, r#""ab\"é""#);
        assert_eq!(serde_json::from_str::<Text<8>>(&json).unwrap(), t);
        let long = serde_json::from_str::<Text<8>>(r#""123456789""#).unwrap_err();
        assert!(long.to_string().contains("at most 8 bytes"), "{long}");
        assert_eq!(Text::<8>::default(), "");
    }
}
