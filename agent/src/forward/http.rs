//! Batches usage events and POSTs them as a JSON array to `{gateway}/system/usage` with
//! basic auth. While the gateway is away, events wait in a bounded memory buffer; what
//! overflows it is spilled to the on-disk [`Spool`] (oldest first) and sent before anything
//! newer, in order. Only a full spool (or none) drops events, and every drop is counted.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use http_body_util::{BodyExt as _, Full};
use hyper::{Request, body::Bytes};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};
use tracing::{info, warn};

use super::{EventSink, Retry, Spool, decide};
use crate::{auth::Credentials, config::IngestFormat, event::UsageEvent, metrics::Metrics};

/// How long a stopping agent keeps sending before it spools what is left.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Settings of the forwarder.
#[derive(Clone, Debug)]
pub struct ForwarderConfig {
    pub gateway_url: String,
    pub credentials: Option<Credentials>,
    /// Events kept in memory while the gateway is unreachable; beyond, they are spooled.
    pub capacity: usize,
    pub batch_size: usize,
    /// Longest wait before a partial batch is sent.
    pub linger: Duration,
    /// How each batch is encoded.
    pub format: IngestFormat,
}

/// Where the batch being sent came from.
enum Origin {
    /// The spool's segment with this number (removed once delivered).
    Spool(u64),
    /// The front of the memory buffer.
    Memory,
}

/// Events not yet delivered: the spool holds the oldest, memory the newest.
struct Queue {
    memory: VecDeque<UsageEvent>,
    /// Taken from memory by the sending task and not yet delivered.
    in_flight: usize,
    spool: Option<Spool>,
}

/// The sink side of the forwarder; the sending task runs until shutdown, then flushes.
#[derive(Clone)]
pub struct HttpForwarder {
    queue: Arc<Mutex<Queue>>,
    wake: Arc<Notify>,
    capacity: usize,
    batch_size: usize,
    metrics: Arc<Metrics>,
}

impl EventSink for HttpForwarder {
    fn submit(&self, event: UsageEvent) {
        self.submit_all(&mut vec![event]);
    }

    /// One lock and one wakeup for the whole drain's events.
    fn submit_all(&self, events: &mut Vec<UsageEvent>) {
        let mut q = self.lock();
        q.memory.extend(events.drain(..));
        while q.memory.len() > self.capacity {
            self.spill(&mut q);
        }
        self.gauges(&q);
        drop(q);
        self.wake.notify_one();
    }
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

impl HttpForwarder {
    /// Starts the sending task; it stops when `shutdown` turns true, after one last flush
    /// (what cannot be delivered within a few seconds is spooled). Events a previous run
    /// left in `spool` are sent first.
    pub fn spawn(
        config: ForwarderConfig,
        spool: Option<Spool>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        if let Some(s) = spool.as_ref().filter(|s| !s.is_empty()) {
            info!(
                events = s.events(),
                bytes = s.bytes(),
                "usage events spooled by an earlier run: sending them first"
            );
        }
        let sink = Self {
            queue: Arc::new(Mutex::new(Queue {
                memory: VecDeque::new(),
                in_flight: 0,
                spool,
            })),
            wake: Arc::new(Notify::new()),
            capacity: config.capacity.max(1),
            batch_size: config.batch_size.max(1),
            metrics,
        };
        sink.gauges(&sink.lock());
        let task = tokio::spawn(sink.clone().send_loop(config, shutdown));
        (sink, task)
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn gauges(&self, q: &Queue) {
        let m = &self.metrics;
        m.events_buffered.set((q.memory.len() + q.in_flight) as i64);
        let (events, bytes) = q.spool.as_ref().map_or((0, 0), |s| (s.events(), s.bytes()));
        m.events_spooled.set(events as i64);
        m.spool_bytes.set(bytes as i64);
    }

    fn dropped(&self, reason: &str, n: usize) {
        if n > 0 {
            self.metrics
                .events_dropped
                .with_label_values(&[reason])
                .inc_by(n as u64);
        }
    }

    /// Moves the oldest events of memory to the spool's tail (or drops the oldest one when
    /// there is no spool).
    fn spill(&self, q: &mut Queue) {
        let Some(spool) = q.spool.as_mut() else {
            q.memory.pop_front();
            self.dropped("buffer_full", 1);
            warn!("usage buffer full and no spool: dropped the oldest event");
            return;
        };
        let n = self.batch_size.min(q.memory.len());
        let batch: Vec<UsageEvent> = q.memory.drain(..n).collect();
        match spool.push_back(&batch) {
            Ok(evicted) => {
                self.metrics.events_spilled.inc_by(n as u64);
                if evicted.events > 0 {
                    self.dropped("spool_full", evicted.events);
                    warn!(
                        events = evicted.events,
                        "usage spool full: dropped its oldest events"
                    );
                }
            }
            Err(e) => {
                self.dropped("spool_error", n);
                warn!(error = %e, events = n, "could not spool usage events: dropped");
            }
        }
    }

    /// The next batch to send: the spool's oldest segment, else the front of memory.
    fn take(&self) -> Option<(Origin, Vec<UsageEvent>)> {
        let mut q = self.lock();
        while let Some(next) = q.spool.as_mut().and_then(Spool::oldest) {
            match next {
                Ok((seq, events)) => return Some((Origin::Spool(seq), events)),
                Err(lost) => {
                    self.dropped("spool_corrupt", lost);
                    warn!(events = lost, "unreadable spool segment: dropped");
                    self.gauges(&q);
                }
            }
        }
        let n = self.batch_size.min(q.memory.len());
        if n == 0 {
            return None;
        }
        let batch: Vec<UsageEvent> = q.memory.drain(..n).collect();
        q.in_flight = n;
        Some((Origin::Memory, batch))
    }

    /// The batch is done with (delivered or refused for good).
    fn finish(&self, origin: &Origin) {
        let mut q = self.lock();
        match origin {
            Origin::Spool(seq) => {
                if let Some(s) = q.spool.as_mut() {
                    s.remove(*seq);
                }
            }
            Origin::Memory => q.in_flight = 0,
        }
        self.gauges(&q);
    }

    /// At shutdown with the gateway away: everything still in memory goes to the spool,
    /// the batch in flight (older than anything spooled since it was taken) at its front.
    fn spool_everything(&self, in_flight: Option<(Origin, Vec<UsageEvent>)>) {
        let mut q = self.lock();
        let q = &mut *q;
        let mut lost = 0;
        if let Some((Origin::Memory, batch)) = in_flight {
            q.in_flight = 0;
            match q.spool.as_mut().map(|s| s.push_front(&batch)) {
                Some(Ok(evicted)) => {
                    self.metrics.events_spilled.inc_by(batch.len() as u64);
                    self.dropped("spool_full", evicted.events);
                }
                _ => lost += batch.len(),
            }
        }
        while !q.memory.is_empty() {
            let n = self.batch_size.min(q.memory.len());
            let batch: Vec<UsageEvent> = q.memory.drain(..n).collect();
            match q.spool.as_mut().map(|s| s.push_back(&batch)) {
                Some(Ok(evicted)) => {
                    self.metrics.events_spilled.inc_by(n as u64);
                    self.dropped("spool_full", evicted.events);
                }
                _ => lost += n,
            }
        }
        self.dropped("shutdown", lost);
        let spooled = q.spool.as_ref().map_or(0, Spool::events);
        if lost > 0 {
            warn!(
                events = lost,
                "gateway unreachable at shutdown and no spool: events dropped"
            );
        }
        if spooled > 0 {
            info!(
                events = spooled,
                "usage events left in the spool for the next run"
            );
        }
        self.gauges(q);
    }

    async fn send_loop(self, config: ForwarderConfig, mut shutdown: watch::Receiver<bool>) {
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        let url = format!("{}/system/usage", config.gateway_url.trim_end_matches('/'));
        let mut attempt = 0u32;
        let mut in_flight: Option<(Origin, Vec<UsageEvent>)> = None;
        let mut stop_by: Option<Instant> = None;
        loop {
            if *shutdown.borrow() && stop_by.is_none() {
                stop_by = Some(Instant::now() + STOP_GRACE);
            }
            if stop_by.is_some_and(|t| Instant::now() > t) {
                return self.spool_everything(in_flight);
            }
            if in_flight.is_none() {
                in_flight = self.take();
            }
            let Some((origin, batch)) = &in_flight else {
                if stop_by.is_some() {
                    return;
                }
                tokio::select! {
                    () = self.wake.notified() => {}
                    _ = shutdown.changed() => {}
                }
                tokio::time::sleep(config.linger).await;
                continue;
            };
            let status = post(
                &client,
                &url,
                config.credentials.as_ref(),
                config.format,
                batch,
            )
            .await;
            match decide(status, attempt) {
                Retry::Done => {
                    attempt = 0;
                    self.metrics.events_sent.inc_by(batch.len() as u64);
                    self.finish(origin);
                    in_flight = None;
                }
                Retry::GiveUp => {
                    attempt = 0;
                    self.dropped("rejected", batch.len());
                    warn!(
                        ?status,
                        events = batch.len(),
                        "gateway refused a usage batch: dropped"
                    );
                    self.finish(origin);
                    in_flight = None;
                }
                Retry::After(delay) => {
                    attempt += 1;
                    if stop_by.is_some() && attempt > 3 {
                        return self.spool_everything(in_flight);
                    }
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
        }
    }
}

/// A batch as a request body and its content type.
fn encode(format: IngestFormat, batch: &[UsageEvent]) -> Option<(Vec<u8>, &'static str)> {
    match format {
        IngestFormat::Postcard => {
            let body = agent_common::wire::encode_each(batch.iter().map(UsageEvent::wire)).ok()?;
            Some((body, agent_common::wire::CONTENT_TYPE))
        }
        IngestFormat::Json => Some((serde_json::to_vec(batch).ok()?, "application/json")),
    }
}

/// One POST; the response status, or `None` if none came within 10 s.
async fn post(
    client: &HttpClient,
    url: &str,
    credentials: Option<&Credentials>,
    format: IngestFormat,
    batch: &[UsageEvent],
) -> Option<u16> {
    let (body, content_type) = encode(format, batch)?;
    let mut req = Request::post(url).header(hyper::header::CONTENT_TYPE, content_type);
    if let Some(c) = credentials {
        req = req.header(hyper::header::AUTHORIZATION, c.header_value());
    }
    let req = req.body(Full::new(Bytes::from(body))).ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Some(status)
}
