//! Usage events: what the node agent measured in the kernel for each invocation,
//! ingested over `POST /system/usage`, validated, counted and kept (bounded) for queries.
//! (The signed-webhook pipeline to billing builds on this.)

use std::borrow::Cow;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Mutex;

use agent_common::wire::{self, Usage};
use bytes::Bytes;
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
        problem(&self.wire())
    }

    /// This event as the agent's binary batch carries it, borrowing its strings.
    pub fn wire(&self) -> Usage<'_> {
        Usage {
            id: self.id.as_deref().map(Cow::Borrowed),
            call_id: self.call_id.as_deref().map(Cow::Borrowed),
            namespace: Cow::Borrowed(&self.namespace),
            function_name: Cow::Borrowed(&self.function_name),
            replica: self.replica.as_deref().map(Cow::Borrowed),
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

/// Why an event cannot be billed, if it cannot.
pub fn problem(e: &Usage<'_>) -> Option<String> {
    if let Err(err) = FunctionName::check(&e.function_name) {
        return Some(format!("function_name: {err}"));
    }
    if let Err(err) = Namespace::check(&e.namespace) {
        return Some(format!("namespace: {err}"));
    }
    if DateTime::parse_from_rfc3339(&e.started).is_err() {
        return Some(format!("started {:?} is not an RFC3339 time", e.started));
    }
    if e.duration_ns > MAX_DURATION_NS {
        return Some(format!("duration_ns {} is more than 7 days", e.duration_ns));
    }
    if e.source != "kernel" {
        return Some(format!(
            "source {:?}: only \"kernel\" events are ingested",
            e.source
        ));
    }
    if let Some(id) = &e.id
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
    if e.call_id.as_ref().is_some_and(|c| c.len() > 256) {
        return Some("call_id is longer than 256 characters".into());
    }
    None
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

/// A postcard batch (the agent's binary form, [`agent_common::wire`]), checked: its accepted
/// events as the window keeps them (the body and where each lies in it: no copy or
/// allocation per event) and the refused ones by index with why; or why the batch does not
/// read (a binary batch is refused whole: it has no readable neighbours).
pub fn check_wire(body: &[u8]) -> Result<(Stored, Vec<(usize, String)>), String> {
    let mut at = Vec::new();
    let mut refused = Vec::new();
    let mut i = 0;
    wire::decode_each(body, |usage, range| {
        match problem(&usage) {
            // Offsets fit: the API reads at most 16 MiB of body.
            None => at.push(range.start as u32..range.end as u32),
            Some(why) => refused.push((i, why)),
        }
        i += 1;
    })
    .map_err(|e| format!("invalid {} body: {e}", wire::CONTENT_TYPE))?;
    // Its own buffer of its own size: the body read may be a slice of a larger one.
    let body = if at.is_empty() {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(body)
    };
    Ok((Stored::Wire { body, at }, refused))
}

impl From<Usage<'_>> for UsageEvent {
    fn from(u: Usage<'_>) -> Self {
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

/// The accepted events of one batch, as the window keeps them.
#[derive(Debug)]
pub enum Stored {
    /// A postcard batch's body and the byte range of each accepted event in it.
    Wire { body: Bytes, at: Vec<Range<u32>> },
    /// Events read from JSON.
    Parsed(Vec<UsageEvent>),
}

impl Stored {
    pub fn len(&self) -> usize {
        match self {
            Self::Wire { at, .. } => at.len(),
            Self::Parsed(events) => events.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Event `i`, borrowed (`None` past the end; a `Wire` range always reads: it was read).
    pub fn get(&self, i: usize) -> Option<Usage<'_>> {
        match self {
            Self::Wire { body, at } => {
                let r = at.get(i)?;
                wire::decode_one(body.get(r.start as usize..r.end as usize)?).ok()
            }
            Self::Parsed(events) => events.get(i).map(UsageEvent::wire),
        }
    }

    /// The events in order, borrowed.
    pub fn iter(&self) -> impl Iterator<Item = Usage<'_>> {
        (0..self.len()).filter_map(|i| self.get(i))
    }
}

/// The latest events (by default at most [`RECENT_CAPACITY`]), oldest dropped first, kept by batch: an
/// event costs the window no allocation of its own, and its batch goes when its last
/// event has left.
pub struct Recent {
    window: Mutex<Window>,
    capacity: usize,
}

impl Default for Recent {
    fn default() -> Self {
        Self::with_capacity(RECENT_CAPACITY)
    }
}

#[derive(Default)]
struct Window {
    batches: VecDeque<Stored>,
    /// Events of the front batch already out of the window.
    gone: usize,
    /// Events in the window.
    len: usize,
}

impl Recent {
    /// A window of at most `capacity` events.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            window: Mutex::default(),
            capacity,
        }
    }

    pub fn push(&self, batch: Stored) {
        if batch.is_empty() {
            return;
        }
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        w.len += batch.len();
        w.batches.push_back(batch);
        while w.len > self.capacity {
            let excess = w.len - self.capacity;
            let front_left = w.batches.front().map_or(0, |b| b.len() - w.gone);
            if front_left <= excess {
                w.batches.pop_front();
                w.gone = 0;
                w.len -= front_left;
            } else {
                w.gone += excess;
                w.len -= excess;
            }
        }
    }

    /// Matching events, oldest first, at most `limit` (the newest ones).
    pub fn query(&self, keep: impl Fn(&Usage<'_>) -> bool, limit: usize) -> Vec<UsageEvent> {
        let w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let mut matching = Vec::new();
        // Newest first, so that only the `limit` returned are made owned.
        'batches: for (k, batch) in w.batches.iter().enumerate().rev() {
            let first = if k == 0 { w.gone } else { 0 };
            for i in (first..batch.len()).rev() {
                if matching.len() == limit {
                    break 'batches;
                }
                if let Some(usage) = batch.get(i)
                    && keep(&usage)
                {
                    matching.push(UsageEvent::from(usage));
                }
            }
        }
        matching.reverse();
        matching
    }

    /// Events in the window.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.window.lock().unwrap_or_else(|p| p.into_inner()).len
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

    fn with_call(i: usize) -> UsageEvent {
        UsageEvent {
            call_id: Some(format!("c{i}")),
            ..event()
        }
    }

    fn wire_batch(events: &[UsageEvent]) -> Stored {
        let body = wire::encode(&events.iter().map(UsageEvent::wire).collect::<Vec<_>>()).unwrap();
        let (stored, refused) = check_wire(&body).unwrap();
        assert_eq!(refused, []);
        stored
    }

    #[test]
    fn a_postcard_batch_is_checked_event_by_event() {
        let good = event();
        let mut absurd = event();
        absurd.duration_ns = u64::MAX;
        let other = with_call(7);
        let batch = [good.wire(), absurd.wire(), other.wire()];
        let body = wire::encode(&batch).unwrap();
        let (stored, refused) = check_wire(&body).unwrap();
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, 1, "the refused event is named by its index");
        assert!(refused[0].1.contains("7 days"), "{}", refused[0].1);
        assert_eq!(stored.len(), 2);
        assert_eq!(stored.get(0), Some(good.wire()));
        assert_eq!(stored.get(1), Some(other.wire()));
        assert_eq!(stored.get(2), None);
        let owned: Vec<UsageEvent> = stored.iter().map(UsageEvent::from).collect();
        assert_eq!(owned, vec![good, other]);
        assert!(matches!(owned[0].source, Cow::Borrowed(_)));
        let why = check_wire(&body[..body.len() - 3]).unwrap_err();
        assert!(why.contains(wire::CONTENT_TYPE), "{why}");
    }

    #[test]
    fn recent_is_bounded_by_event_across_batches_and_filtered() {
        let r = Recent::with_capacity(5);
        let events: Vec<UsageEvent> = (0..9).map(with_call).collect();
        r.push(wire_batch(&events[0..3]));
        r.push(Stored::Parsed(events[3..6].to_vec()));
        r.push(Stored::Parsed(Vec::new()));
        assert_eq!(r.len(), 5, "c0 left, c1..c5 kept");
        r.push(wire_batch(&events[6..9]));
        assert_eq!(r.len(), 5);
        let calls = |got: Vec<UsageEvent>| -> Vec<String> {
            got.into_iter().map(|e| e.call_id.unwrap()).collect()
        };
        assert_eq!(
            calls(r.query(|_| true, 100)),
            ["c4", "c5", "c6", "c7", "c8"]
        );
        assert_eq!(calls(r.query(|_| true, 2)), ["c7", "c8"]);
        assert_eq!(r.query(|e| e.call_id.as_deref() == Some("c5"), 10).len(), 1);
        assert_eq!(r.query(|e| e.call_id.as_deref() == Some("c3"), 10), []);
        // A batch larger than the window keeps only its newest events.
        let big: Vec<UsageEvent> = (10..19).map(with_call).collect();
        r.push(wire_batch(&big));
        assert_eq!(
            calls(r.query(|_| true, 100)),
            ["c14", "c15", "c16", "c17", "c18"]
        );
        assert_eq!(r.len(), 5);
    }
}
