//! The gateway's side of metering: a bounded buffer the invocation path never waits on,
//! flushed to the JetStream stream `TALLY_USAGE` when it holds N events or T has passed.

use std::sync::Weak;
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::mpsc;

use super::event::FunctionUsage;
use crate::Gateway;

pub const STREAM: &str = "TALLY_USAGE";
pub const SUBJECT: &str = "tally.usage.events";
pub const PARKED_STREAM: &str = "TALLY_USAGE_PARKED";
pub const PARKED_SUBJECT: &str = "tally.usage.parked";

/// Where metered events go; cheap to clone.
#[derive(Clone)]
pub struct Flusher {
    tx: mpsc::Sender<Msg>,
}

// Events are nearly every message: boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Event(FunctionUsage),
    /// Publish what is buffered now, then answer (used at shutdown).
    Flush(tokio::sync::oneshot::Sender<()>),
}

impl Flusher {
    /// Starts the flushing task.
    pub fn start(gw: Weak<Gateway>, capacity: usize, every: usize, interval: Duration) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        tokio::spawn(flush_loop(gw, rx, every.max(1), interval));
        Self { tx }
    }

    /// Hands an event over without waiting; a full buffer drops it and says so.
    pub fn send(&self, gw: &Gateway, event: FunctionUsage) {
        match self.tx.try_send(Msg::Event(event)) {
            Ok(()) => gw.metrics.metering.with_label_values(&["produced"]).inc(),
            Err(_) => {
                gw.metrics.metering.with_label_values(&["dropped"]).inc();
                tracing::error!("metering buffer full: usage event dropped");
            }
        }
    }

    /// Publishes everything handed over so far; waits at most `limit`.
    pub async fn flush(&self, limit: Duration) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).await.is_err() {
            return false;
        }
        tokio::time::timeout(limit, rx)
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

async fn flush_loop(
    gw: Weak<Gateway>,
    mut rx: mpsc::Receiver<Msg>,
    every: usize,
    interval: Duration,
) {
    let mut batch: Vec<FunctionUsage> = Vec::with_capacity(every);
    let mut streams_ready = false;
    loop {
        // Wait for a first event, then for more until the batch is full or T passed.
        let mut flushed = None;
        match rx.recv().await {
            Some(Msg::Event(e)) => batch.push(e),
            Some(Msg::Flush(done)) => flushed = Some(done),
            None => return,
        }
        let deadline = tokio::time::Instant::now() + interval;
        while flushed.is_none() && batch.len() < every {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Msg::Event(e))) => batch.push(e),
                Ok(Some(Msg::Flush(done))) => flushed = Some(done),
                Ok(None) | Err(_) => break,
            }
        }
        if batch.is_empty() {
            if let Some(done) = flushed {
                let _ = done.send(());
            }
            continue;
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            let Some(gw) = gw.upgrade() else { return };
            match publish(&gw, &batch, &mut streams_ready).await {
                Ok(()) => {
                    gw.metrics
                        .metering
                        .with_label_values(&["flushed"])
                        .inc_by(batch.len() as u64);
                    batch.clear();
                    if let Some(done) = flushed.take() {
                        let _ = done.send(());
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(
                        events = batch.len(),
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

/// One JetStream message per flush: a JSON array, deduplicated by its first event's id.
async fn publish(
    gw: &Gateway,
    batch: &[FunctionUsage],
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
    let payload = serde_json::to_vec(batch).map_err(|e| e.to_string())?;
    let msg_id = format!("{}+{}", batch[0].id, batch.len());
    let publish = jetstream::message::PublishMessage::build()
        .payload(payload.into())
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
