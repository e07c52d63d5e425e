//! The gateway's side of metering: a bounded buffer the invocation path never waits on
//! (beyond a copy into the spool), flushed to JetStream `TALLY_USAGE` every N events or T.

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use prometheus::IntCounter;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::event::{FunctionUsage, UsageLine};
use super::message;
use super::spool::{self, Sealed, Spool, SpoolError};
use crate::Gateway;

pub const STREAM: &str = "TALLY_USAGE";
pub const SUBJECT: &str = "tally.usage.events";
pub const PARKED_STREAM: &str = "TALLY_USAGE_PARKED";
pub const PARKED_SUBJECT: &str = "tally.usage.parked";

/// An event's line as buffered, spooled and published: its JSON and a newline.
pub fn line(event: &UsageLine<'_>) -> Bytes {
    let mut out = Vec::with_capacity(LINE_CAPACITY);
    write_line(event, &mut out);
    Bytes::from(out)
}

/// Appends `event`'s line (see [`line`]) to `out`.
#[inline]
pub fn write_line(event: &UsageLine<'_>, out: &mut Vec<u8>) {
    event.write(out);
    out.push(b'\n');
}

/// Enough for a typical event's line without growing.
const LINE_CAPACITY: usize = 512;

/// Where metered events go; cheap to clone.
#[derive(Clone)]
pub struct Flusher {
    shared: Arc<Shared>,
}

struct Shared {
    buffer: Mutex<Buffer>,
    wake: Notify,
    capacity: usize,
    every: usize,
    max_text: usize,
    /// The metering counters the invocation path bumps, looked up once.
    counters: OnceLock<Counters>,
}

struct Counters {
    produced: IntCounter,
    dropped: IntCounter,
}

#[derive(Default)]
struct Buffer {
    /// Serialized events back to back, each ending with `\n` (as in the spool): one
    /// allocation per batch, not two per event freed on another thread.
    text: Vec<u8>,
    /// Where each event's line ends in `text`.
    ends: Vec<usize>,
    /// When the oldest buffered event arrived.
    since: Option<Instant>,
    spool: Option<Spool>,
    /// A flush was asked for: publish without waiting for N or T.
    now: bool,
    /// A batch taken from `text` is being published.
    publishing: bool,
}

/// How much the flusher buffers and when and in what pieces it publishes.
pub struct Limits {
    /// Most events buffered; beyond, events are dropped (counted).
    pub capacity: usize,
    /// Flush at this many events; also the most events in one message.
    pub every: usize,
    /// ...or this long after the first buffered event.
    pub interval: Duration,
    /// Most JSON text in one message before compression: the webhook's batch size, since a
    /// message is a batch's unit and must not make one larger than that.
    pub max_text: usize,
}

impl Flusher {
    /// Starts the flushing task; with a spool directory, events are spooled there first and
    /// whatever a crashed predecessor left is published before anything new.
    pub fn start(
        gw: Weak<Gateway>,
        limits: Limits,
        spool_dir: Option<&Path>,
    ) -> Result<Self, SpoolError> {
        let (spool, replay) = match spool_dir {
            Some(dir) => {
                let (spool, replay) = Spool::open(dir)?;
                (Some(spool), replay)
            }
            None => (None, Vec::new()),
        };
        let shared = Arc::new(Shared {
            buffer: Mutex::new(Buffer {
                spool,
                ..Buffer::default()
            }),
            wake: Notify::new(),
            capacity: limits.capacity.max(1),
            every: limits.every.max(1),
            max_text: limits.max_text.clamp(1, message::MAX_TEXT),
            counters: OnceLock::new(),
        });
        tokio::spawn(flush_loop(gw, shared.clone(), limits.interval, replay));
        Ok(Self { shared })
    }

    /// Buffers an event (spooled first) without waiting on NATS; a full buffer drops it
    /// and says so.
    pub fn send(&self, gw: &Gateway, event: FunctionUsage) {
        self.send_line(gw, &line(&event.as_line()));
    }

    /// Buffers one event already written as its line (see [`line`]); the line is copied.
    pub fn send_line(&self, gw: &Gateway, line: &[u8]) {
        self.buffer(gw, std::slice::from_ref(&line));
    }

    /// Buffers events (an ingested batch: one spool reservation for all of them).
    pub fn send_all(&self, gw: &Gateway, events: impl IntoIterator<Item = FunctionUsage>) {
        let lines: Vec<Bytes> = events.into_iter().map(|e| line(&e.as_line())).collect();
        self.buffer(gw, &lines);
    }

    fn buffer<L: AsRef<[u8]>>(&self, gw: &Gateway, lines: &[L]) {
        let mut b = self.shared.lock();
        let room = self.shared.capacity.saturating_sub(b.ends.len());
        let dropped = lines.len().saturating_sub(room);
        let lines = &lines[..lines.len() - dropped];
        let writer = match b.spool.as_mut().filter(|_| !lines.is_empty()) {
            Some(spool) => match spool.reserve(lines) {
                Ok(w) => Some(w),
                Err(e) => {
                    spool_failed(Some(gw), "writing to", &e);
                    None
                }
            },
            None => None,
        };
        let was_empty = b.ends.is_empty();
        let added = lines.len();
        for line in lines {
            b.text.extend_from_slice(line.as_ref());
            let end = b.text.len();
            b.ends.push(end);
        }
        let n = b.ends.len();
        if was_empty && n > 0 {
            b.since = Some(Instant::now());
        }
        drop(b);
        // Copied right after buffering, outside the lock, into the region reserved under
        // it: if a flush seals the segment in between, these events are in the batch being
        // published and in that segment.
        if let Some(w) = writer {
            w.write(lines);
        }
        let counters = self.shared.counters.get_or_init(|| Counters {
            produced: gw.metrics.metering.with_label_values(&["produced"]),
            dropped: gw.metrics.metering.with_label_values(&["dropped"]),
        });
        if dropped > 0 {
            counters.dropped.inc_by(dropped as u64);
            tracing::error!(dropped, "metering buffer full: usage events dropped");
        }
        counters.produced.inc_by(added as u64);
        if (was_empty && n > 0) || n >= self.shared.every {
            self.shared.wake.notify_one();
        }
    }

    /// After a complete flush at shutdown: no more events; the spool directory goes if empty.
    pub fn close_spool(&self) {
        let mut b = self.shared.lock();
        if b.ends.is_empty()
            && !b.publishing
            && let Some(spool) = b.spool.take()
        {
            spool.remove_if_empty();
        }
    }

    /// Publishes everything handed over so far; waits at most `limit`.
    pub async fn flush(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            {
                let mut b = self.shared.lock();
                if b.ends.is_empty() && !b.publishing {
                    return true;
                }
                b.now = true;
            }
            self.shared.wake.notify_one();
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Buffer> {
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the spool's next segment ready outside the lock, so a seal under it only
    /// swaps two segments.
    fn prepare_spare(&self) {
        let Some((dir, seq)) = self.lock().spool.as_mut().and_then(Spool::needs_spare) else {
            return;
        };
        match spool::prepare(&dir, seq) {
            Ok(segment) => match self.lock().spool.as_mut() {
                Some(spool) => spool.set_spare(segment),
                None => segment.discard(),
            },
            // A seal makes its own segment then; if that fails too, it is counted there.
            Err(e) => tracing::warn!("preparing the next metering spool segment: {e}"),
        }
    }

    /// Waits until a batch is due (N events, T since the first, or a flush asked for),
    /// then takes it, sealing the spool file that holds it.
    async fn next_batch(
        &self,
        gw: &Weak<Gateway>,
        interval: Duration,
    ) -> (Vec<Bytes>, Option<Sealed>) {
        loop {
            let due = {
                let b = self.lock();
                match b.since {
                    _ if b.ends.is_empty() => None,
                    _ if b.now || b.ends.len() >= self.every => Some(Instant::now()),
                    Some(since) => Some(since + interval),
                    None => Some(Instant::now()),
                }
            };
            match due {
                None => {
                    self.wake.notified().await;
                    continue;
                }
                Some(at) if at > Instant::now() => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.wake.notified() => continue,
                    }
                }
                Some(_) => {}
            }
            let mut b = self.lock();
            if b.ends.is_empty() {
                continue;
            }
            // The next batch starts with room for as much as this one held, up to a flush's
            // worth (a burst while NATS was down does not keep its size for good).
            let room = (
                b.text.capacity().min(self.every * LINE_CAPACITY),
                b.ends.capacity().min(self.every),
            );
            let text = std::mem::replace(&mut b.text, Vec::with_capacity(room.0));
            let ends = std::mem::replace(&mut b.ends, Vec::with_capacity(room.1));
            b.since = None;
            b.now = false;
            b.publishing = true;
            let sealed = match b.spool.as_mut().map(Spool::seal) {
                Some(Ok(s)) => Some(s),
                Some(Err(e)) => {
                    spool_failed(gw.upgrade().as_deref(), "sealing", &e);
                    None
                }
                None => None,
            };
            drop(b);
            return (split(text, &ends), sealed);
        }
    }
}

/// `text`'s lines (ending at `ends`) as slices of one shared buffer.
fn split(text: Vec<u8>, ends: &[usize]) -> Vec<Bytes> {
    let text = Bytes::from(text);
    let mut start = 0;
    ends.iter()
        .map(|&end| {
            let line = text.slice(start..end);
            start = end;
            line
        })
        .collect()
}

/// A spool failure: counted and logged; the events concerned are in memory only.
fn spool_failed(gw: Option<&Gateway>, doing: &str, e: &SpoolError) {
    if let Some(gw) = gw {
        gw.metrics
            .metering
            .with_label_values(&["spool_error"])
            .inc();
    }
    tracing::error!("{doing} the metering spool: {e}; the events are kept in memory only");
}

async fn flush_loop(
    gw: Weak<Gateway>,
    shared: Arc<Shared>,
    interval: Duration,
    replay: Vec<Sealed>,
) {
    let mut streams_ready = false;
    for sealed in replay {
        let lines = match sealed.lines() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("replaying the metering spool: {e}");
                continue;
            }
        };
        let valid: Vec<Bytes> = lines
            .into_iter()
            .filter(|l| serde_json::from_slice::<FunctionUsage>(l).is_ok())
            .map(Bytes::from)
            .collect();
        if !valid.is_empty() {
            tracing::info!(
                events = valid.len(),
                files = %sealed.describe(),
                "replaying usage events spooled before a restart"
            );
        }
        let n = valid.len() as u64;
        if !publish_all(&gw, &shared, &valid, &mut streams_ready).await {
            return;
        }
        if let Some(gw) = gw.upgrade() {
            gw.metrics
                .metering
                .with_label_values(&["replayed"])
                .inc_by(n);
        }
        let _ = sealed.clear();
    }
    loop {
        shared.prepare_spare();
        let (lines, sealed) = shared.next_batch(&gw, interval).await;
        if !publish_all(&gw, &shared, &lines, &mut streams_ready).await {
            return;
        }
        let reusable = sealed.and_then(Sealed::clear);
        let mut b = shared.lock();
        b.publishing = false;
        match (reusable, b.spool.as_mut()) {
            (Some(segment), Some(spool)) => spool.set_spare(segment),
            (Some(segment), None) => segment.discard(),
            (None, _) => {}
        }
    }
}

/// Publishes `lines` in messages of at most N events, retrying each with a capped backoff;
/// false once the gateway is gone.
async fn publish_all(
    gw: &Weak<Gateway>,
    shared: &Shared,
    lines: &[Bytes],
    streams_ready: &mut bool,
) -> bool {
    for chunk in Chunks::new(lines, shared.every, shared.max_text) {
        for (part, payload, headers) in message::encode_within(chunk, MAX_MESSAGE_BYTES) {
            let mut backoff = Duration::from_millis(100);
            loop {
                let Some(gw) = gw.upgrade() else { return false };
                match publish(&gw, part, &payload, &headers, streams_ready).await {
                    Ok(()) => {
                        gw.metrics
                            .metering
                            .with_label_values(&["flushed"])
                            .inc_by(part.len() as u64);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(
                            events = part.len(),
                            "flushing usage events: {e}; retrying in {backoff:?}"
                        );
                        drop(gw);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }
    true
}

/// Largest JetStream message the flusher builds: under nats-server's default
/// `max_payload` (1 MiB), whatever the events' sizes (a compressed chunk above it is halved).
const MAX_MESSAGE_BYTES: usize = 768 << 10;

/// Consecutive runs of at most `every` lines and `max_text` bytes (a line longer than that
/// goes alone).
struct Chunks<'a> {
    rest: &'a [Bytes],
    every: usize,
    max_text: usize,
}

impl<'a> Chunks<'a> {
    fn new(lines: &'a [Bytes], every: usize, max_text: usize) -> Self {
        Self {
            rest: lines,
            every: every.max(1),
            max_text,
        }
    }
}

impl<'a> Iterator for Chunks<'a> {
    type Item = &'a [Bytes];

    fn next(&mut self) -> Option<&'a [Bytes]> {
        if self.rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut n = 0;
        while n < self.rest.len().min(self.every) {
            bytes += self.rest[n].len() + 1;
            if n > 0 && bytes > self.max_text {
                break;
            }
            n += 1;
        }
        let (chunk, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(chunk)
    }
}

/// One JetStream message: `part`'s events as [`message::encode_within`] made them,
/// deduplicated by its first event's id and length (a replayed part is the same message).
async fn publish(
    gw: &Gateway,
    part: &[Bytes],
    payload: &Bytes,
    headers: &async_nats::HeaderMap,
    streams_ready: &mut bool,
) -> Result<(), String> {
    let queue = gw
        .queue
        .get()
        .filter(|q| q.connected())
        .ok_or("NATS is not connected")?;
    if !*streams_ready {
        ensure_streams(&queue.js, queue.config.nats_replicas).await?;
        *streams_ready = true;
    }
    let first: FunctionUsage =
        serde_json::from_slice(&part[0]).map_err(|e| format!("spooled event: {e}"))?;
    let msg_id = format!("{}+{}", first.id, part.len());
    let publish = jetstream::message::PublishMessage::build()
        .payload(payload.clone())
        .headers(headers.clone())
        .message_id(msg_id);
    let sent = async {
        let ack = queue
            .js
            .send_publish(SUBJECT, publish)
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map_err(|e| e.to_string())
    };
    if let Err(e) = sent.await {
        *streams_ready = false;
        return Err(e);
    }
    Ok(())
}

/// The events stream (work queue: gone once delivered) and the parked batches' stream.
pub async fn ensure_streams(js: &jetstream::Context, replicas: usize) -> Result<(), String> {
    for (name, subject, retention) in [
        (
            STREAM,
            SUBJECT,
            jetstream::stream::RetentionPolicy::WorkQueue,
        ),
        (
            PARKED_STREAM,
            PARKED_SUBJECT,
            jetstream::stream::RetentionPolicy::Limits,
        ),
    ] {
        js.get_or_create_stream(jetstream::stream::Config {
            name: name.to_string(),
            subjects: vec![subject.to_string()],
            retention,
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_splits_back_into_its_lines() {
        let lines = ["{\"a\":1}\n", "{}\n", "{\"b\":\"x\"}\n"];
        let text: Vec<u8> = lines.concat().into_bytes();
        let ends: Vec<usize> = lines
            .iter()
            .scan(0, |end, l| {
                *end += l.len();
                Some(*end)
            })
            .collect();
        let parts = split(text, &ends);
        assert_eq!(parts, lines.map(|l| Bytes::from(l.as_bytes())));
        assert!(split(Vec::new(), &[]).is_empty());
    }

    #[test]
    fn chunks_hold_at_most_n_events_and_a_webhook_batch_of_text() {
        let small: Vec<Bytes> = (0..2500).map(|_| Bytes::from(vec![b'x'; 99])).collect();
        let sizes: Vec<usize> = Chunks::new(&small, 1000, 1 << 20)
            .map(<[Bytes]>::len)
            .collect();
        assert_eq!(sizes, [1000, 1000, 500]);
        let big: Vec<Bytes> = (0..10)
            .map(|_| Bytes::from(vec![b'x'; 300 << 10]))
            .collect();
        let sizes: Vec<usize> = Chunks::new(&big, 1000, 1 << 20)
            .map(<[Bytes]>::len)
            .collect();
        assert_eq!(
            sizes,
            [3, 3, 3, 1],
            "three of 300 KiB fit 1 MiB of text, four do not"
        );
        let huge = vec![Bytes::from(vec![b'x'; 2 << 20])];
        assert_eq!(
            Chunks::new(&huge, 1000, 1 << 20).count(),
            1,
            "an oversized event goes alone"
        );
        assert_eq!(Chunks::new(&[], 1000, 1 << 20).count(), 0);
    }
}
