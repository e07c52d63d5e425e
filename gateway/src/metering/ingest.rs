//! Usage events: what the node agent measured in the kernel for each invocation,
//! ingested over `POST /system/usage`, validated, counted and kept (bounded) for queries.
//! (The signed-webhook pipeline to billing builds on this.)

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Mutex;

use chrono::DateTime;
use serde::{Deserialize, Serialize};

use crate::names::{FunctionName, Namespace};

/// Longest invocation accepted: anything beyond is a measuring error, not a bill.
const MAX_DURATION_NS: u64 = 7 * 24 * 3600 * 1_000_000_000;
/// Events kept for `GET /system/usage`.
pub const RECENT_CAPACITY: usize = 100_000;

/// One invocation as measured in the kernel (the agent's `UsageEvent`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// The agent's id for this event, identical on every resend: billed under it, so a
    /// batch re-sent after a gateway crash is never billed twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub call_id: Option<String>,
    pub namespace: String,
    pub function_name: String,
    #[serde(default)]
    pub replica: Option<String>,
    pub started: String,
    pub duration_ns: u64,
    pub status_code: u16,
    pub memory_peak_bytes: u64,
    #[serde(default)]
    pub memory_limit_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// `"kernel"` (anything else is refused): shared, not allocated per event.
    #[serde(deserialize_with = "source")]
    pub source: Cow<'static, str>,
}

/// Reads `source`, borrowing the one value ingested events carry.
fn source<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Cow<'static, str>, D::Error> {
    struct Source;
    impl serde::de::Visitor<'_> for Source {
        type Value = Cow<'static, str>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(match v {
                "kernel" => Cow::Borrowed("kernel"),
                other => Cow::Owned(other.to_owned()),
            })
        }
    }
    d.deserialize_str(Source)
}

impl UsageEvent {
    /// Why this event cannot be billed, if it cannot.
    pub fn problem(&self) -> Option<String> {
        if let Err(e) = FunctionName::check(&self.function_name) {
            return Some(format!("function_name: {e}"));
        }
        if let Err(e) = Namespace::check(&self.namespace) {
            return Some(format!("namespace: {e}"));
        }
        if DateTime::parse_from_rfc3339(&self.started).is_err() {
            return Some(format!("started {:?} is not an RFC3339 time", self.started));
        }
        if self.duration_ns > MAX_DURATION_NS {
            return Some(format!(
                "duration_ns {} is more than 7 days",
                self.duration_ns
            ));
        }
        if self.source != "kernel" {
            return Some(format!(
                "source {:?}: only \"kernel\" events are ingested",
                self.source
            ));
        }
        if let Some(id) = &self.id
            && (id.is_empty()
                || id.len() > 64
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            return Some(format!(
                "id {id:?}: 1 to 64 letters, digits, '-' or '_' expected"
            ));
        }
        if self.call_id.as_ref().is_some_and(|c| c.len() > 256) {
            return Some("call_id is longer than 256 characters".into());
        }
        None
    }
}

/// A batch of events in one pass, or `None` if the body is not UTF-8 or any event does not
/// read. The vector is sized from the body's length up front (an agent's event is ≈ 350
/// bytes of JSON; at most 10,000 reserved), so a batch is not moved through a series of
/// ever larger vectors.
pub fn parse_batch(body: &[u8]) -> Option<Vec<UsageEvent>> {
    struct Batch(usize);
    impl<'de> serde::de::DeserializeSeed<'de> for Batch {
        type Value = Vec<UsageEvent>;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(self)
        }
    }
    impl<'de> serde::de::Visitor<'de> for Batch {
        type Value = Vec<UsageEvent>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an array of usage events")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut events = Vec::with_capacity(self.0);
            while let Some(e) = seq.next_element()? {
                events.push(e);
            }
            Ok(events)
        }
    }
    let text = std::str::from_utf8(body).ok()?;
    let mut de = serde_json::Deserializer::from_str(text);
    let capacity = (text.len() / 350 + 1).min(10_000);
    let events = serde::de::DeserializeSeed::deserialize(Batch(capacity), &mut de).ok()?;
    de.end().ok()?;
    Some(events)
}

/// A postcard batch (the agent's binary form, [`agent_common::wire`]) as events, or why it
/// does not read. `source` is shared when it is `"kernel"`, as with JSON.
pub fn decode_batch(body: &[u8]) -> Result<Vec<UsageEvent>, String> {
    let batch = agent_common::wire::decode(body)
        .map_err(|e| format!("invalid {} body: {e}", agent_common::wire::CONTENT_TYPE))?;
    Ok(batch.into_iter().map(UsageEvent::from).collect())
}

impl From<agent_common::wire::Usage<'_>> for UsageEvent {
    fn from(u: agent_common::wire::Usage<'_>) -> Self {
        Self {
            id: u.id.map(Cow::into_owned),
            call_id: u.call_id.map(Cow::into_owned),
            namespace: u.namespace.into_owned(),
            function_name: u.function_name.into_owned(),
            replica: u.replica.map(Cow::into_owned),
            started: u.started.into_owned(),
            duration_ns: u.duration_ns,
            status_code: u.status_code,
            memory_peak_bytes: u.memory_peak_bytes,
            memory_limit_bytes: u.memory_limit_bytes,
            cpu_ns: u.cpu_ns,
            exit_code: u.exit_code,
            source: match u.source {
                Cow::Borrowed("kernel") => Cow::Borrowed("kernel"),
                other => Cow::Owned(other.into_owned()),
            },
        }
    }
}

/// The latest events, oldest dropped first.
#[derive(Default)]
pub struct Recent {
    events: Mutex<VecDeque<UsageEvent>>,
}

impl Recent {
    pub fn push(&self, batch: impl IntoIterator<Item = UsageEvent>) {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        for e in batch {
            if events.len() == RECENT_CAPACITY {
                events.pop_front();
            }
            events.push_back(e);
        }
    }

    /// Matching events, oldest first, at most `limit` (the newest ones).
    pub fn query(&self, keep: impl Fn(&UsageEvent) -> bool, limit: usize) -> Vec<UsageEvent> {
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let matching: Vec<&UsageEvent> = events.iter().filter(|e| keep(e)).collect();
        let skip = matching.len().saturating_sub(limit);
        matching.into_iter().skip(skip).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> UsageEvent {
        serde_json::from_str(
            r#"{"call_id":"c1","namespace":"openfaas-fn","function_name":"env","replica":"env-abcde",
                "started":"2026-11-22T10:00:00.123456789Z","duration_ns":1500000,"status_code":200,
                "memory_peak_bytes":1048576,"memory_limit_bytes":null,"source":"kernel"}"#,
        )
        .unwrap()
    }

    #[test]
    fn absurd_values_are_refused() {
        assert_eq!(event().problem(), None);
        let mut e = event();
        e.duration_ns = u64::MAX;
        assert!(e.problem().unwrap().contains("7 days"));
        let mut e = event();
        e.started = "yesterday".into();
        assert!(e.problem().unwrap().contains("RFC3339"));
        let mut e = event();
        e.function_name = "Bad_Name".into();
        assert!(e.problem().unwrap().contains("function_name"));
        let mut e = event();
        e.id = Some("../etc".into());
        assert!(e.problem().unwrap().contains("id"));
        e.id = Some("0d6f6a4e-2d0c-4b0e-9a55-3f0f8b7f2b11".into());
        assert_eq!(e.problem(), None);
        let mut e = event();
        e.source = "gateway".into();
        assert!(e.problem().is_some());
        // Read from JSON too: any other source is kept as sent, to be named in the refusal.
        let json = serde_json::to_string(&event())
            .unwrap()
            .replace("\"kernel\"", "\"gateway\"");
        let e: UsageEvent = serde_json::from_str(&json).unwrap();
        assert!(e.problem().unwrap().contains("\"gateway\""));
    }

    #[test]
    fn a_batch_reads_in_one_pass_or_not_at_all() {
        let one = serde_json::to_string(&event()).unwrap();
        let batch = parse_batch(format!("[{one},{one},{one}]").as_bytes()).unwrap();
        assert_eq!(batch, vec![event(), event(), event()]);
        assert_eq!(batch[0].source, "kernel");
        assert!(
            matches!(batch[0].source, Cow::Borrowed(_)),
            "no allocation for it"
        );
        assert_eq!(parse_batch(b"[]"), Some(vec![]));
        assert_eq!(parse_batch(format!("[{one},{{\"x\":1}}]").as_bytes()), None);
        assert_eq!(parse_batch(format!("[{one}] trailing").as_bytes()), None);
        assert_eq!(parse_batch(b"{\"not\":\"a list\"}"), None);
        assert_eq!(parse_batch(&[b'[', 0xff, b']']), None);
    }

    #[test]
    fn a_postcard_batch_reads_as_the_same_events() {
        use agent_common::wire;
        fn as_wire(e: &UsageEvent) -> wire::Usage<'_> {
            wire::Usage {
                id: e.id.as_deref().map(Cow::Borrowed),
                call_id: e.call_id.as_deref().map(Cow::Borrowed),
                namespace: Cow::Borrowed(&e.namespace),
                function_name: Cow::Borrowed(&e.function_name),
                replica: e.replica.as_deref().map(Cow::Borrowed),
                started: Cow::Borrowed(&e.started),
                duration_ns: e.duration_ns,
                status_code: e.status_code,
                memory_peak_bytes: e.memory_peak_bytes,
                memory_limit_bytes: e.memory_limit_bytes,
                cpu_ns: e.cpu_ns,
                exit_code: e.exit_code,
                source: Cow::Borrowed(&e.source),
            }
        }
        let e = event();
        let body = wire::encode(&[as_wire(&e), as_wire(&e)]).unwrap();
        let read = decode_batch(&body).unwrap();
        assert_eq!(read, vec![e.clone(), e]);
        assert!(matches!(read[0].source, Cow::Borrowed(_)));
        let why = decode_batch(&body[..body.len() - 3]).unwrap_err();
        assert!(why.contains(wire::CONTENT_TYPE), "{why}");
    }

    #[test]
    fn recent_is_bounded_and_filtered() {
        let r = Recent::default();
        r.push((0..5).map(|i| UsageEvent {
            call_id: Some(format!("c{i}")),
            ..event()
        }));
        let last2 = r.query(|_| true, 2);
        assert_eq!(
            last2
                .iter()
                .map(|e| e.call_id.clone().unwrap())
                .collect::<Vec<_>>(),
            ["c3", "c4"]
        );
        assert_eq!(r.query(|e| e.call_id.as_deref() == Some("c1"), 10).len(), 1);
    }
}
