//! The queue-worker: pulls calls from JetStream (a consumer per function, or one shared
//! consumer), runs each through the gateway's own routing, keeps the ack lease alive
//! while it runs, retries with backoff, dead-letters, calls back, then acks.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer::pull};
use bytes::Bytes;
use chrono::Utc;
use futures_util::StreamExt;
use http::HeaderMap;
use rand::Rng;
use tokio::sync::Semaphore;

use super::callback::{self, Callback, CallbackClient};
use super::invoker::{Invoker, Lookup};
use super::retry::{Decision, decide};
use super::status::{CallStatus, DeadLetter, State};
use super::{AsyncCall, Queue, QueueError, js_err, stream_name};
use crate::Gateway;
use crate::config::QueueMode;
use crate::names::{FunctionName, FunctionRef, Namespace};

const STATIC_CONSUMER: &str = "tally_queue_worker";
const RECONCILE_EVERY: Duration = Duration::from_secs(2);

/// One consumer the worker runs: which queue and (function mode) which function.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ConsumerKey {
    queue: String,
    name: String,
    filter: String,
}

pub struct QueueWorker {
    queue: Arc<Queue>,
    running: Mutex<HashSet<ConsumerKey>>,
    callbacks: CallbackClient,
    gateway: std::sync::Weak<Gateway>,
    invoker: Invoker,
}

impl QueueWorker {
    /// Starts the worker: consumers for every function with queued calls now, and a
    /// loop that keeps them (and the pending-message gauges) in step.
    pub fn start(gw: &Arc<Gateway>, queue: Arc<Queue>) -> Arc<Self> {
        let worker = Arc::new(Self {
            queue,
            running: Mutex::default(),
            callbacks: gw.outbound.clone(),
            gateway: Arc::downgrade(gw),
            invoker: Invoker::for_gateway(gw),
        });
        tokio::spawn(worker.clone().reconcile());
        worker
    }

    fn key(&self, queue: &str, namespace: &str, function: &str) -> ConsumerKey {
        match self.queue.config.queue_mode {
            QueueMode::Static => ConsumerKey {
                queue: queue.to_string(),
                name: STATIC_CONSUMER.to_string(),
                filter: format!("{queue}.>"),
            },
            QueueMode::Function => ConsumerKey {
                queue: queue.to_string(),
                name: format!("fn_{namespace}_{function}"),
                filter: super::subject(queue, namespace, function),
            },
        }
    }

    /// Makes sure a consumer runs for this function's calls (created on demand).
    pub fn ensure_consumer(self: &Arc<Self>, queue: &str, namespace: &str, function: &str) {
        let key = self.key(queue, namespace, function);
        let fresh = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone());
        if fresh {
            tokio::spawn(self.clone().run_consumer(key));
        }
    }

    async fn reconcile(self: Arc<Self>) {
        let Some(mut stopping) = self.gateway.upgrade().map(|g| g.stopping.subscribe()) else {
            return;
        };
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = crate::until_true(&mut stopping) => return,
            }
            if let Err(e) = self.reconcile_once().await {
                tracing::debug!("queue reconcile: {e}");
            }
        }
    }

    /// Finds functions with queued calls, starts their consumers, updates the gauges.
    async fn reconcile_once(self: &Arc<Self>) -> Result<(), QueueError> {
        let Some(gw) = self.gateway.upgrade() else {
            return Ok(());
        };
        let names: Vec<String> = self
            .queue
            .js
            .stream_names()
            .filter_map(|n| async { n.ok() })
            .collect()
            .await;
        let mut pending: Vec<(String, i64)> = Vec::new();
        for name in names.iter().filter(|n| n.starts_with("OF_")) {
            let queue = &name[3..];
            let stream = self.queue.js.get_stream(name).await.map_err(js_err)?;
            let mut subjects = stream
                .info_with_subjects(format!("{queue}.>"))
                .await
                .map_err(js_err)?;
            while let Some(entry) = subjects.next().await {
                let (subject, count) = entry.map_err(js_err)?;
                let mut parts = subject.splitn(3, '.').skip(1);
                let (Some(ns), Some(function)) = (parts.next(), parts.next()) else {
                    continue;
                };
                pending.push((format!("{function}.{ns}"), count as i64));
                if count > 0 {
                    self.ensure_consumer(queue, ns, function);
                }
            }
        }
        gw.metrics.queue_pending.reset();
        for (label, count) in pending {
            gw.metrics
                .queue_pending
                .with_label_values(&[&label])
                .add(count);
        }
        Ok(())
    }

    async fn run_consumer(self: Arc<Self>, key: ConsumerKey) {
        if let Err(e) = self.consume(&key).await {
            tracing::warn!(consumer = %key.name, "queue consumer stopped: {e}");
        }
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    }

    async fn consume(self: &Arc<Self>, key: &ConsumerKey) -> Result<(), QueueError> {
        let Some(gw) = self.gateway.upgrade() else {
            return Ok(());
        };
        let cfg = &self.queue.config;
        let max = cfg.queue_max_inflight.max(1);
        let stream = self.queue.ensure_stream(&key.queue).await?;
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(
                &key.name,
                pull::Config {
                    durable_name: Some(key.name.clone()),
                    filter_subject: key.filter.clone(),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: cfg.ack_wait,
                    max_deliver: -1,
                    max_ack_pending: (max * 4) as i64,
                    ..Default::default()
                },
            )
            .await
            .map_err(js_err)?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(max)
            .messages()
            .await
            .map_err(js_err)?;
        drop(gw);
        let permits = Arc::new(Semaphore::new(max));
        let idle_limit = cfg.inactive_threshold;
        loop {
            let Some(gw) = self.gateway.upgrade() else {
                return Ok(());
            };
            let mut stopping = gw.stopping.subscribe();
            drop(gw);
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p.map_err(js_err)?,
                () = crate::until_true(&mut stopping) => return Ok(()),
            };
            let next = tokio::select! {
                m = tokio::time::timeout(idle_limit, messages.next()) => m,
                () = crate::until_true(&mut stopping) => return Ok(()),
            };
            match next {
                Err(_) => {
                    let idle = permits.available_permits() + 1 == max;
                    if idle && cfg.queue_mode == QueueMode::Function {
                        drop(permit);
                        tracing::debug!(consumer = %key.name, "idle: removing the consumer");
                        let _ = stream.delete_consumer(&key.name).await;
                        return Ok(());
                    }
                }
                Ok(None) => return Ok(()),
                Ok(Some(Err(e))) => {
                    tracing::debug!(consumer = %key.name, "pull: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(Some(Ok(msg))) => {
                    let worker = self.clone();
                    tokio::spawn(async move {
                        worker.handle(msg).await;
                        drop(permit);
                    });
                }
            }
        }
    }

    async fn handle(&self, msg: jetstream::Message) {
        let Some(gw) = self.gateway.upgrade() else {
            return;
        };
        let delivered = msg.info().map_or(1, |i| i.delivered).max(1) as u32;
        let call: AsyncCall = match serde_json::from_slice(&msg.payload) {
            Ok(c) => c,
            Err(e) => {
                self.dead_letter_raw(&gw, &msg, format!("malformed message: {e}"))
                    .await;
                return;
            }
        };
        let label = format!("{}.{}", call.function, call.namespace);
        let function = match (
            Namespace::new(&call.namespace),
            FunctionName::new(&call.function),
        ) {
            (Ok(namespace), Ok(name)) => FunctionRef { namespace, name },
            _ => {
                self.dead_letter_raw(
                    &gw,
                    &msg,
                    "malformed message: invalid function or namespace".into(),
                )
                .await;
                return;
            }
        };
        let annotations = match self.invoker.lookup(&gw, &function).await {
            Lookup::Found(a) => a,
            Lookup::Unavailable(why) => {
                tracing::warn!(call_id = %call.call_id, "cannot look up {label}: {why}; trying again in 2 s");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(2))))
                    .await;
                return;
            }
            Lookup::Gone(e) => {
                let mut st = CallStatus::queued(&call, delivered);
                st.attempt = delivered;
                let why = format!("{e} (deleted while the call was queued)");
                self.finish(
                    &gw,
                    &msg,
                    &call,
                    &mut st,
                    404,
                    HeaderMap::new(),
                    Bytes::from(why.clone()),
                    Duration::ZERO,
                    Some(why),
                )
                .await;
                return;
            }
        };
        let (policy, problems) = self
            .queue
            .default_policy
            .with_annotations(annotations.as_ref());
        for p in problems {
            tracing::warn!(function = %label, "{p}; using the default");
        }
        // Everything the status holds so far is in the call itself: no read needed.
        let mut st = CallStatus::queued(&call, policy.attempts);
        st.state = State::Running;
        st.attempt = delivered;
        st.max_attempts = policy.attempts;
        st.started_at = Some(Utc::now());
        st.next_attempt_at = None;
        let _ = self.queue.store.put(&st).await;

        let inflight = gw.metrics.queue_inflight.with_label_values(&[&label]);
        inflight.inc();
        let msg = Arc::new(msg);
        let lease = tokio::spawn(keep_lease(msg.clone(), self.queue.config.ack_wait));
        let started = Instant::now();
        let (code, headers, body) = self.invoker.invoke(&gw, &call).await;
        let took = started.elapsed();
        lease.abort();
        inflight.dec();

        let retry_after = headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let jitter: f64 = rand::rng().random();
        match decide(code, delivered, &policy, retry_after, jitter) {
            Decision::Retry(wait) => {
                st.state = State::Retrying;
                st.status_code = Some(code);
                st.next_attempt_at = chrono::Duration::from_std(wait)
                    .ok()
                    .map(|w| Utc::now() + w);
                st.error = Some(format!(
                    "attempt {delivered} of {} answered {code}",
                    policy.attempts
                ));
                let _ = self.queue.store.put(&st).await;
                gw.metrics.queue_retries.with_label_values(&[&label]).inc();
                tracing::info!(call_id = %call.call_id, function = %label, code, attempt = delivered, ?wait, "retrying async call");
                if let Err(e) = msg.ack_with(AckKind::Nak(Some(wait))).await {
                    tracing::warn!(call_id = %call.call_id, "nak failed (JetStream will redeliver after ack_wait): {e}");
                }
            }
            Decision::Done => {
                self.finish(&gw, &msg, &call, &mut st, code, headers, body, took, None)
                    .await
            }
            Decision::Exhausted => {
                let why = format!("{} attempts, the last answered {code}", policy.attempts);
                self.finish(
                    &gw,
                    &msg,
                    &call,
                    &mut st,
                    code,
                    headers,
                    body,
                    took,
                    Some(why),
                )
                .await;
            }
        }
    }

    /// Records the final outcome, dead-letters when `dead` says why, calls back, acks.
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        gw: &Gateway,
        msg: &jetstream::Message,
        call: &AsyncCall,
        st: &mut CallStatus,
        code: u16,
        headers: HeaderMap,
        body: Bytes,
        took: Duration,
        dead: Option<String>,
    ) {
        let cfg = &self.queue.config;
        st.state = if (200..400).contains(&code) && dead.is_none() {
            State::Succeeded
        } else {
            State::Failed
        };
        st.status_code = Some(code);
        st.finished_at = Some(Utc::now());
        st.next_attempt_at = None;
        st.set_result(&body, cfg.async_result_max_bytes);
        let label = format!("{}.{}", call.function, call.namespace);
        if let Some(reason) = &dead {
            st.error = Some(reason.clone());
            st.dead_lettered = true;
            let letter = DeadLetter {
                id: call.call_id.clone(),
                reason: reason.clone(),
                at: Utc::now(),
                call: Some(call.clone()),
                raw: None,
            };
            if let Err(e) = self.queue.store.dead_letter(&letter).await {
                tracing::error!(call_id = %call.call_id, "could not dead-letter (will be redelivered): {e}");
                return;
            }
            gw.metrics
                .queue_dead_lettered
                .with_label_values(&[&label])
                .inc();
            tracing::warn!(call_id = %call.call_id, function = %label, "dead-lettered: {reason}");
        } else {
            st.error = None;
        }
        if let Some(url) = &call.callback_url {
            // The outcome first, so a caller that is called back finds the call finished;
            // the callback's own outcome is added after it.
            if let Err(e) = self.queue.store.put(st).await {
                tracing::warn!(call_id = %call.call_id, "could not store the final status: {e}");
            }
            let cb = Callback {
                url,
                call_id: &call.call_id,
                function: &label,
                status: code,
                duration: took,
                attempt: st.attempt,
                max_attempts: st.max_attempts,
                headers: &headers,
                body,
            };
            let outcome = callback::deliver(
                &self.callbacks,
                &cb,
                cfg.callback_attempts,
                cfg.callback_timeout,
            )
            .await;
            let result = if outcome.error.is_none() {
                "delivered"
            } else {
                "failed"
            };
            gw.metrics
                .queue_callbacks
                .with_label_values(&[result])
                .inc();
            st.callback = Some(outcome);
        }
        if let Err(e) = self.queue.store.put(st).await {
            tracing::warn!(call_id = %call.call_id, "could not store the final status: {e}");
        }
        match msg.double_ack().await {
            Ok(()) => gw.metrics.queue_processed.inc(),
            Err(e) => {
                tracing::warn!(call_id = %call.call_id, "ack failed (the call may run again): {e}")
            }
        }
    }

    async fn dead_letter_raw(&self, gw: &Gateway, msg: &jetstream::Message, reason: String) {
        use base64::Engine;
        let id = msg.info().map_or_else(
            |_| uuid::Uuid::new_v4().to_string(),
            |i| format!("seq-{}", i.stream_sequence),
        );
        let letter = DeadLetter {
            id,
            reason: reason.clone(),
            at: Utc::now(),
            call: None,
            raw: Some(base64::engine::general_purpose::STANDARD.encode(&msg.payload)),
        };
        tracing::warn!(subject = %msg.subject, "dead-lettering a message: {reason}");
        if self.queue.store.dead_letter(&letter).await.is_ok() {
            gw.metrics
                .queue_dead_lettered
                .with_label_values(&["unknown"])
                .inc();
            let _ = msg.double_ack().await;
        }
    }
}

/// Tells JetStream the call is still being worked on, every third of `ack_wait`.
async fn keep_lease(msg: Arc<jetstream::Message>, ack_wait: Duration) {
    let every = (ack_wait / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = msg.ack_with(AckKind::Progress).await {
            tracing::debug!("in-progress ack: {e}");
        }
    }
}

/// Removes every queued call of a queue; returns how many there were.
pub async fn purge(queue: &Queue, name: &str) -> Result<u64, QueueError> {
    let mut stream = queue
        .js
        .get_stream(stream_name(name))
        .await
        .map_err(js_err)?;
    let before = stream.info().await.map_err(js_err)?.state.messages;
    stream.purge().await.map_err(js_err)?;
    Ok(before)
}
