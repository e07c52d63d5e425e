//! The event-worker: pulls usage events from JetStream, POSTs them to the webhook in
//! signed batches, acks only after a 2xx, retries 5xx and outages with capped backoff,
//! and parks a batch the receiver refuses (4xx) for inspection.

use std::ops::Range;
use std::sync::{Arc, LazyLock, Weak};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer::pull};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use memchr::memmem;

use super::flush::{PARKED_STREAM, PARKED_SUBJECT, STREAM, ensure_streams};
use super::{message, sign};
use crate::Gateway;

const CONSUMER: &str = "tally_event_worker";

type Client = crate::http::outbound::OutboundClient;

enum Outcome {
    Delivered,
    /// The receiver refused the batch (4xx): retrying would not help.
    Refused(u16, String),
    /// Down, timed out or 5xx: retry.
    Failed(String),
}

/// Starts the event-worker (returns at once; runs until the gateway stops).
pub fn start(gw: &Arc<Gateway>) {
    let weak = Arc::downgrade(gw);
    tokio::spawn(async move {
        loop {
            if let Err(e) = run(&weak).await {
                tracing::warn!("event-worker: {e}; restarting in 1 s");
            }
            let Some(gw) = weak.upgrade() else { return };
            if *gw.stopping.borrow() {
                return;
            }
            drop(gw);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

async fn run(weak: &Weak<Gateway>) -> Result<(), String> {
    let (cfg, js, replicas, mut stopping) = {
        let gw = weak.upgrade().ok_or("gateway gone")?;
        let cfg = gw.config.metering.clone();
        cfg.webhook_endpoint.as_ref().ok_or("no webhook_endpoint")?;
        let queue = gw
            .queue
            .get()
            .filter(|q| q.connected())
            .ok_or("NATS is not connected yet")?;
        (
            cfg,
            queue.js.clone(),
            queue.config.nats_replicas,
            gw.stopping.subscribe(),
        )
    };
    let secret: Option<Arc<[u8]>> = match &cfg.webhook_secret_file {
        Some(path) => Some(
            sign::read_secret(path)
                .map_err(|e| format!("webhook_secret_file {}: {e}", path.display()))?
                .into(),
        ),
        None => None,
    };
    let cfg = Arc::new(cfg);
    // Batches in flight at once; each is acked on its own 2xx.
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.webhook_concurrency.max(1)));
    let mut inflight = tokio::task::JoinSet::new();
    ensure_streams(&js, replicas).await?;
    let stream = js.get_stream(STREAM).await.map_err(|e| e.to_string())?;
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            CONSUMER,
            pull::Config {
                durable_name: Some(CONSUMER.into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: cfg.webhook_ack_wait.max(cfg.webhook_timeout * 2),
                max_deliver: -1,
                max_ack_pending: 10_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    let client: Client = weak.upgrade().ok_or("gateway gone")?.outbound.clone();
    // A message that would have taken the last batch over a limit: it starts the next one.
    let mut held: Option<Fetched> = None;
    loop {
        while inflight.try_join_next().is_some() {}
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.map_err(|e| e.to_string())?,
            () = crate::until_true(&mut stopping) => return Ok(()),
        };
        // A batch: whole messages, within the event and byte limits (a message over them
        // goes alone), until the wait runs out.
        let first = match held.take() {
            Some(f) => f,
            None => {
                let m = tokio::select! {
                    m = messages.next() => m,
                    () = crate::until_true(&mut stopping) => return Ok(()),
                };
                let m = m.ok_or("the message stream ended")?;
                let Some(f) = Fetched::open(&js, m.map_err(|e| e.to_string())?).await else {
                    continue;
                };
                f
            }
        };
        let (mut batch, mut events) = (Vec::new(), Events::default());
        events.add(first, &mut batch);
        let deadline = tokio::time::Instant::now() + cfg.webhook_batch_wait;
        while events.bytes() < cfg.webhook_batch_bytes && events.len() < cfg.webhook_batch_events {
            match tokio::time::timeout_at(deadline, messages.next()).await {
                Ok(Some(Ok(m))) => {
                    let Some(f) = Fetched::open(&js, m).await else {
                        continue;
                    };
                    if events.bytes() + f.text.len() > cfg.webhook_batch_bytes
                        || events.len() + f.events.len() > cfg.webhook_batch_events
                    {
                        held = Some(f);
                        break;
                    }
                    events.add(f, &mut batch);
                }
                Ok(Some(Err(e))) => return Err(e.to_string()),
                Ok(None) | Err(_) => break,
            }
        }
        let Some(gw) = weak.upgrade() else {
            return Ok(());
        };
        if events.is_empty() {
            // Messages without events: nothing to deliver.
            for m in &batch {
                let _ = m.double_ack().await;
            }
            continue;
        }
        let (client, secret, js, cfg) = (client.clone(), secret.clone(), js.clone(), cfg.clone());
        inflight.spawn(async move {
            deliver(&gw, &client, secret.as_deref(), &js, batch, events, &cfg).await;
            drop(slot);
        });
    }
}

/// A batch's events, kept as the JSON text they arrived in (never re-encoded), plus each
/// one's end time for the delivery-lag histogram.
#[derive(Default)]
struct Events {
    /// While the batch is one message written by the flusher: that message's text, already
    /// the JSON array to send (the common case: a message holds a batch's worth of events).
    whole: Option<Bytes>,
    /// Otherwise the body's JSON array so far, one event per line (`[` but no `]` yet).
    body: Vec<u8>,
    /// Unix nanoseconds at which each event's invocation ended (None: unreadable time).
    ended: Vec<Option<i128>>,
}

impl Events {
    fn len(&self) -> usize {
        self.ended.len()
    }

    fn is_empty(&self) -> bool {
        self.ended.is_empty()
    }

    /// The body's size so far.
    fn bytes(&self) -> usize {
        self.whole.as_ref().map_or(self.body.len(), Bytes::len)
    }

    /// Adds a fetched message's events to the batch, and the message to those acked with it.
    fn add(&mut self, f: Fetched, batch: &mut Vec<jetstream::Message>) {
        self.push_message(&f.text, &f.events);
        batch.push(f.m);
    }

    /// Adds a message's events (`events` locates them in `text`): the message's own text
    /// when it starts the batch, or copied after the events already there.
    fn push_message(&mut self, text: &Bytes, events: &[Range<usize>]) {
        if events.is_empty() {
            return;
        }
        if self.is_empty() && self.body.is_empty() {
            self.whole = Some(text.clone());
            self.ended
                .extend(events.iter().map(|r| Timing::ended_of(&text[r.clone()])));
        } else {
            for r in events {
                self.push(&text[r.clone()]);
            }
        }
    }

    /// Adds one event's JSON text (one per line in the body).
    fn push(&mut self, event: &[u8]) {
        if let Some(whole) = self.whole.take() {
            // Reopen the array the message closed.
            self.body = whole.strip_suffix(b"]").unwrap_or(&whole).to_vec();
        }
        if self.body.is_empty() {
            self.body.push(b'[');
        } else {
            self.body.extend_from_slice(b",\n");
        }
        self.body.extend_from_slice(event);
        self.ended.push(Timing::ended_of(event));
    }

    fn into_body(mut self) -> Bytes {
        if let Some(whole) = self.whole {
            return whole;
        }
        if self.body.is_empty() {
            self.body.push(b'[');
        }
        self.body.push(b']');
        Bytes::from(self.body)
    }
}

/// The two fields the lag needs, read without building the whole event.
#[derive(serde::Deserialize)]
struct Timing<'a> {
    started: &'a str,
    duration: u64,
}

impl<'a> Timing<'a> {
    /// Finds the fields in an event's text: a scan for the keys the gateway's own
    /// serializer writes (every event in the stream went through it), else a parse.
    fn of(event: &'a [u8]) -> Option<Self> {
        static STARTED: LazyLock<memmem::Finder<'static>> =
            LazyLock::new(|| memmem::Finder::new(b"\"started\":\""));
        static DURATION: LazyLock<memmem::Finder<'static>> =
            LazyLock::new(|| memmem::Finder::new(b"\"duration\":"));
        let scanned = || {
            let after = |key: &memmem::Finder<'_>| {
                let at = key.find(event)? + key.needle().len();
                event.get(at..)
            };
            let started = after(&STARTED)?;
            let started = &started[..memchr::memchr(b'"', started)?];
            let duration = after(&DURATION)?;
            let end = duration
                .iter()
                .position(|c| !c.is_ascii_digit())
                .unwrap_or(duration.len());
            Some(Self {
                started: std::str::from_utf8(started).ok()?,
                duration: std::str::from_utf8(&duration[..end]).ok()?.parse().ok()?,
            })
        };
        scanned().or_else(|| serde_json::from_slice(event).ok())
    }

    /// Unix nanoseconds at which the invocation of `event` ended, if its text says.
    fn ended_of(event: &[u8]) -> Option<i128> {
        Timing::of(event).and_then(|t| t.ended_ns())
    }

    /// Unix nanoseconds at which the invocation ended.
    fn ended_ns(&self) -> Option<i128> {
        let start = chrono::DateTime::parse_from_rfc3339(self.started).ok()?;
        Some(i128::from(start.timestamp_nanos_opt()?) + i128::from(self.duration))
    }
}

/// A message from the stream, read once: its JSON text and where each event is in it.
struct Fetched {
    m: jetstream::Message,
    text: Bytes,
    events: Vec<Range<usize>>,
}

impl Fetched {
    /// Reads a message; an unreadable one is parked (and acked once parked) and `None`.
    async fn open(js: &jetstream::Context, m: jetstream::Message) -> Option<Self> {
        let read = message::text(m.headers.as_ref(), &m.payload).and_then(|text| {
            let events = locate(m.headers.as_ref(), &text)?;
            Ok((text, events))
        });
        match read {
            Ok((text, events)) => Some(Self { m, text, events }),
            Err(e) => {
                tracing::error!("unreadable usage message: {e}");
                // Parked as it came (with its encoding, for whoever inspects it).
                let headers = message::encoding_of(m.headers.as_ref());
                let why = format!("unreadable: {e}");
                park(
                    js,
                    std::slice::from_ref(&m),
                    m.payload.clone(),
                    headers,
                    0,
                    &why,
                )
                .await;
                None
            }
        }
    }
}

/// Where each event is in a message's text: found by line in the flusher's messages, else
/// by parsing the JSON array.
fn locate(
    headers: Option<&async_nats::HeaderMap>,
    text: &Bytes,
) -> Result<Vec<Range<usize>>, String> {
    let at = |e: &str| {
        let start = e.as_ptr() as usize - text.as_ptr() as usize;
        start..start + e.len()
    };
    if let Some(found) = message::events(headers, text) {
        return Ok(found.into_iter().map(at).collect());
    }
    serde_json::from_slice::<Vec<&serde_json::value::RawValue>>(text)
        .map(|raw| raw.into_iter().map(|e| at(e.get())).collect())
        .map_err(|e| e.to_string())
}

async fn deliver(
    gw: &Gateway,
    client: &Client,
    secret: Option<&[u8]>,
    js: &jetstream::Context,
    batch: Vec<jetstream::Message>,
    mut events: Events,
    cfg: &crate::config::MeteringConfig,
) {
    // run() does not start without an endpoint.
    let Some(endpoint) = cfg.webhook_endpoint.as_deref() else {
        return;
    };
    let count = events.len();
    let ended = std::mem::take(&mut events.ended);
    let body = events.into_body();
    let delivery = uuid::Uuid::new_v4().to_string();
    let signature = secret.map(|s| sign::signature(s, &body));
    let mut backoff = Duration::from_millis(200);
    let started = Instant::now();
    loop {
        match post(
            client,
            endpoint,
            &body,
            &delivery,
            signature.as_deref(),
            cfg.webhook_timeout,
        )
        .await
        {
            Outcome::Delivered => {
                for m in &batch {
                    if let Err(e) = m.double_ack().await {
                        tracing::warn!(
                            "ack after delivery failed (the batch may be sent again): {e}"
                        );
                    }
                }
                gw.metrics
                    .metering
                    .with_label_values(&["delivered"])
                    .inc_by(count as u64);
                gw.metrics.metering_batch_events.observe(count as f64);
                let now = chrono::Utc::now()
                    .timestamp_nanos_opt()
                    .map_or(0, i128::from);
                for end in ended.iter().flatten() {
                    let lag = (now - end).max(0) as f64 / 1e9;
                    gw.metrics.metering_delivery_seconds.observe(lag);
                }
                return;
            }
            Outcome::Refused(status, why) => {
                tracing::error!(
                    status,
                    events = count,
                    "webhook refused a batch; parking it in {}: {why}",
                    super::flush::PARKED_STREAM
                );
                let (payload, headers) = message::compress(&body);
                let parked = park(js, &batch, payload, headers, status, &why).await;
                gw.metrics
                    .metering
                    .with_label_values(&[if parked { "parked" } else { "park_failed" }])
                    .inc_by(count as u64);
                return;
            }
            Outcome::Failed(why) => {
                gw.metrics.metering_webhook_retries.inc();
                tracing::warn!(events = count, waited = ?started.elapsed(), "webhook delivery failed: {why}; retrying in {backoff:?}");
                for m in &batch {
                    let _ = m.ack_with(AckKind::Progress).await;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(cfg.webhook_max_backoff);
            }
        }
    }
}

async fn post(
    client: &Client,
    endpoint: &str,
    body: &Bytes,
    delivery: &str,
    signature: Option<&str>,
    timeout: Duration,
) -> Outcome {
    let mut req = Request::post(endpoint)
        .header(header::CONTENT_TYPE, "application/json")
        .header("X-Openfaas-Event", "function_usage")
        .header("X-Openfaas-Delivery", delivery);
    if let Some(sig) = signature {
        req = req.header("X-Openfaas-Signature-256", sig);
    }
    let req = match req.body(Full::new(body.clone())) {
        Ok(r) => r,
        Err(e) => return Outcome::Refused(0, format!("invalid webhook request: {e}")),
    };
    match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => Outcome::Failed(format!("no answer within {timeout:?}")),
        Ok(Err(e)) => Outcome::Failed(e.to_string()),
        Ok(Ok(resp)) => {
            let status = resp.status();
            let text = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&text[..text.len().min(500)]).to_string();
            if status.is_success() {
                Outcome::Delivered
            } else if status.is_client_error()
                && status != http::StatusCode::TOO_MANY_REQUESTS
                && status != http::StatusCode::REQUEST_TIMEOUT
            {
                Outcome::Refused(status.as_u16(), text)
            } else {
                Outcome::Failed(format!("{status}: {text}"))
            }
        }
    }
}

/// How long messages that could not be parked wait before they are delivered again.
const PARK_RETRY: Duration = Duration::from_secs(30);

/// Keeps a refused batch (compressed as the flusher's messages are, so a batch of a
/// webhook's size fits a NATS message) or an unreadable message in `TALLY_USAGE_PARKED`,
/// with the answer in its headers, then acks `messages`. When it cannot be parked they
/// are not acked but come back after PARK_RETRY (nothing dropped), and this is false.
async fn park(
    js: &jetstream::Context,
    messages: &[jetstream::Message],
    payload: Bytes,
    mut headers: async_nats::HeaderMap,
    status: u16,
    why: &str,
) -> bool {
    headers.insert("Tally-Webhook-Status", status.to_string().as_str());
    headers.insert(
        "Tally-Webhook-Answer",
        why.replace(['\r', '\n'], " ").as_str(),
    );
    let parked = async {
        let ack = js
            .publish_with_headers(PARKED_SUBJECT, headers, payload)
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map_err(|e| e.to_string())
    };
    let ok = match parked.await {
        Ok(_) => true,
        Err(e) => {
            tracing::error!(
                "parking in {PARKED_STREAM} failed: {e}; the batch is delivered again in {PARK_RETRY:?}"
            );
            false
        }
    };
    for m in messages {
        let _ = if ok {
            m.double_ack().await
        } else {
            m.ack_with(AckKind::Nak(Some(PARK_RETRY))).await
        };
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timing_of_an_event_is_found_by_scan_or_parse() {
        let ours = r#"{"event":"function_usage","started":"2026-11-23T00:00:01.5Z","duration":250000000,"status_code":200}"#;
        let t = Timing::of(ours.as_bytes()).unwrap();
        assert_eq!(
            (t.started, t.duration),
            ("2026-11-23T00:00:01.5Z", 250_000_000)
        );
        assert_eq!(t.ended_ns(), Some(1_795_392_001_750_000_000));
        // Spaced out (not our serializer's text): parsed.
        let spaced = r#"{ "duration" : 7, "started" : "2026-11-23T00:00:00Z" }"#;
        assert_eq!(Timing::of(spaced.as_bytes()).map(|t| t.duration), Some(7));
        assert!(Timing::of(br#"{"duration":"x"}"#).is_none());
    }

    #[test]
    fn a_batch_of_one_message_sends_its_text_and_more_are_joined() {
        let event =
            |i: u32| format!(r#"{{"id":"e{i}","started":"2026-11-23T00:00:01Z","duration":{i}}}"#);
        let message = |ids: std::ops::Range<u32>| {
            let lines: Vec<Bytes> = ids.map(|i| Bytes::from(event(i) + "\n")).collect();
            let (payload, headers) = message::encode(&lines);
            (message::text(Some(&headers), &payload).unwrap(), headers)
        };
        let ids = |body: &Bytes| -> Vec<String> {
            let v: Vec<serde_json::Value> = serde_json::from_slice(body).expect("a JSON array");
            v.iter()
                .map(|e| e["id"].as_str().unwrap().to_owned())
                .collect()
        };
        let (one, headers) = message(0..3);
        let found = locate(Some(&headers), &one).unwrap();
        let mut events = Events::default();
        events.push_message(&one, &found);
        assert_eq!((events.len(), events.bytes()), (3, one.len()));
        let body = events.into_body();
        assert_eq!(body.as_ptr(), one.as_ptr(), "sent as it came, not copied");
        assert_eq!(ids(&body), ["e0", "e1", "e2"]);

        let (two, headers2) = message(3..5);
        let found2 = locate(Some(&headers2), &two).unwrap();
        // Without the flusher's header (a re-queued parked batch): found by parsing, the same.
        assert_eq!(locate(None, &two).unwrap(), found2);
        assert!(locate(None, &Bytes::from_static(b"[1,")).is_err());
        let mut events = Events::default();
        events.push_message(&one, &found);
        events.push_message(&two, &found2);
        events.push(event(5).as_bytes());
        assert_eq!(events.len(), 6);
        assert_eq!(events.ended[5], Some(1_795_392_001_000_000_005));
        assert_eq!(
            ids(&events.into_body()),
            ["e0", "e1", "e2", "e3", "e4", "e5"]
        );

        // A message without events adds nothing, and does not stand in for the body.
        let (empty, _) = message(0..0);
        let mut events = Events::default();
        events.push_message(&empty, &[]);
        events.push(event(7).as_bytes());
        assert_eq!(ids(&events.into_body()), ["e7"]);
    }
}
