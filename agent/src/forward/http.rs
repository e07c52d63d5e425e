//! Batches usage events and POSTs them as a JSON array to `{gateway}/system/usage` with
//! basic auth. Events wait in a bounded buffer while the gateway is away; what overflows it
//! is dropped and counted (nothing is spilled to disk yet).

use std::{collections::VecDeque, sync::Arc, time::Duration};

use http_body_util::{BodyExt as _, Full};
use hyper::{Request, body::Bytes};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tokio::sync::{Notify, watch};
use tracing::warn;

use super::{EventSink, Retry, decide};
use crate::{auth::Credentials, event::UsageEvent, metrics::Metrics};

/// Settings of the forwarder.
#[derive(Clone, Debug)]
pub struct ForwarderConfig {
    pub gateway_url: String,
    pub credentials: Option<Credentials>,
    /// Events kept while the gateway is unreachable.
    pub capacity: usize,
    pub batch_size: usize,
    /// Longest wait before a partial batch is sent.
    pub linger: Duration,
}

/// The sink side of the forwarder; the sending task runs until shutdown, then flushes.
#[derive(Clone)]
pub struct HttpForwarder {
    buffer: Arc<std::sync::Mutex<VecDeque<UsageEvent>>>,
    wake: Arc<Notify>,
    capacity: usize,
    metrics: Arc<Metrics>,
}

impl EventSink for HttpForwarder {
    fn submit(&self, event: UsageEvent) {
        let mut buf = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
        if buf.len() >= self.capacity {
            buf.pop_front();
            self.metrics
                .events_dropped
                .with_label_values(&["buffer_full"])
                .inc();
            warn!("usage buffer full: dropped the oldest event");
        }
        buf.push_back(event);
        self.metrics.events_buffered.set(buf.len() as i64);
        self.wake.notify_one();
    }
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

impl HttpForwarder {
    /// Starts the sending task; it stops when `shutdown` turns true, after one last flush.
    pub fn spawn(
        config: ForwarderConfig,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let sink = Self {
            buffer: Arc::default(),
            wake: Arc::new(Notify::new()),
            capacity: config.capacity,
            metrics,
        };
        let task = tokio::spawn(sink.clone().send_loop(config, shutdown));
        (sink, task)
    }

    async fn send_loop(self, config: ForwarderConfig, mut shutdown: watch::Receiver<bool>) {
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        let url = format!("{}/system/usage", config.gateway_url.trim_end_matches('/'));
        let mut attempt = 0u32;
        loop {
            let stopping = *shutdown.borrow();
            let batch: Vec<UsageEvent> = {
                let buf = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
                buf.iter().take(config.batch_size).cloned().collect()
            };
            if batch.is_empty() {
                if stopping {
                    return;
                }
                tokio::select! {
                    () = self.wake.notified() => {}
                    _ = shutdown.changed() => {}
                }
                tokio::time::sleep(config.linger).await;
                continue;
            }
            let status = post(&client, &url, config.credentials.as_ref(), &batch).await;
            match decide(status, attempt) {
                Retry::Done => {
                    attempt = 0;
                    self.remove_front(batch.len());
                    self.metrics.events_sent.inc_by(batch.len() as u64);
                }
                Retry::GiveUp => {
                    attempt = 0;
                    self.remove_front(batch.len());
                    self.metrics
                        .events_dropped
                        .with_label_values(&["rejected"])
                        .inc_by(batch.len() as u64);
                    warn!(
                        ?status,
                        events = batch.len(),
                        "gateway refused a usage batch: dropped"
                    );
                }
                Retry::After(delay) => {
                    attempt += 1;
                    if stopping && attempt > 3 {
                        let n = self.buffer.lock().unwrap_or_else(|p| p.into_inner()).len();
                        self.metrics
                            .events_dropped
                            .with_label_values(&["shutdown"])
                            .inc_by(n as u64);
                        warn!(
                            events = n,
                            "gateway unreachable at shutdown: events dropped"
                        );
                        return;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
        }
    }

    fn remove_front(&self, n: usize) {
        let mut buf = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
        let n = n.min(buf.len());
        buf.drain(..n);
        self.metrics.events_buffered.set(buf.len() as i64);
    }
}

/// One POST; the response status, or `None` if none came within 10 s.
async fn post(
    client: &HttpClient,
    url: &str,
    credentials: Option<&Credentials>,
    batch: &[UsageEvent],
) -> Option<u16> {
    let body = serde_json::to_vec(batch).ok()?;
    let mut req = Request::post(url).header(hyper::header::CONTENT_TYPE, "application/json");
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
