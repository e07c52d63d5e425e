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
    pub id: String,
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
    pub started: String,
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
pub fn new_id() -> String {
    let mut buf = uuid::Uuid::encode_buffer();
    uuid::Uuid::new_v4()
        .hyphenated()
        .encode_lower(&mut buf)
        .to_owned()
}
