//! Async invocations on NATS JetStream: the call envelope, the connection (to an
//! external server or the embedded one), the streams `OF_<queue>` and the status store.

pub mod callback;
pub mod embedded;
pub mod invoker;

pub mod retry;
pub mod status;
pub mod worker;

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::QueueConfig;

/// Annotation that puts a function's calls on another queue.
pub const ANN_QUEUE: &str = "com.openfaas.queue";

/// Everything needed to run a call later: the whole original request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AsyncCall {
    pub call_id: String,
    pub function: String,
    pub namespace: String,
    pub method: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
    #[serde(with = "body_base64")]
    pub body: Vec<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    pub queued_at: DateTime<Utc>,
    pub queue: String,
    /// Times this call was re-queued from the dead letters.
    #[serde(default)]
    pub requeues: u32,
}

mod body_base64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// Stream name of a queue (`OF_faas-request`).
pub fn stream_name(queue: &str) -> String {
    format!("OF_{queue}")
}

/// Subject of a function's calls on a queue: `<queue>.<namespace>.<function>`.
pub fn subject(queue: &str, namespace: &str, function: &str) -> String {
    format!("{queue}.{namespace}.{function}")
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("NATS is unreachable: {0}")]
    Unreachable(String),
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error(transparent)]
    Store(#[from] status::StoreError),
    #[error(transparent)]
    Embedded(#[from] embedded::EmbeddedError),
}

pub fn js_err(e: impl std::fmt::Display) -> QueueError {
    QueueError::JetStream(e.to_string())
}

/// The live connection to JetStream, shared by the enqueue path and the workers.
pub struct Queue {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub store: status::Store,
    pub config: QueueConfig,
    pub default_policy: retry::RetryPolicy,
    streams: Mutex<HashSet<String>>,
    pub embedded: Option<embedded::EmbeddedNats>,
}

impl Queue {
    /// Connects (starting the embedded server when no URL is configured) and opens
    /// the status buckets. Waits up to `wait` for NATS to answer.
    pub async fn start(
        config: QueueConfig,
        data_dir: &std::path::Path,
        stop: tokio::sync::watch::Receiver<bool>,
        wait: Duration,
    ) -> Result<Self, QueueError> {
        let mut embedded = None;
        let url = match (&config.nats_url, &config.faas_nats_address) {
            (Some(url), _) => url.clone(),
            (None, Some(addr)) => {
                format!("nats://{addr}:{}", config.faas_nats_port.unwrap_or(4222))
            }
            (None, None) => {
                let e =
                    embedded::start(&config.nats_server_bin, data_dir.join("nats"), stop).await?;
                let url = e.url.clone();
                embedded = Some(e);
                url
            }
        };
        let servers = url
            .split(',')
            .map(|u| u.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| QueueError::Unreachable(format!("invalid NATS URL {url:?}: {e}")))?;
        let client = async_nats::ConnectOptions::new()
            .name("tally-gateway")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .connect(servers)
            .await
            .map_err(|e| QueueError::Unreachable(e.to_string()))?;
        let js = jetstream::new(client.clone());
        let deadline = tokio::time::Instant::now().checked_add(wait);
        let store = loop {
            match status::Store::open(&js, config.nats_replicas, config.async_retention).await {
                Ok(s) => break s,
                Err(e) if deadline.is_none_or(|d| tokio::time::Instant::now() < d) => {
                    tracing::debug!("waiting for JetStream: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let codes = retry::parse_codes(&config.retry_http_codes)
            .map_err(|e| QueueError::JetStream(format!("retry_http_codes: {e}")))?;
        let default_policy = retry::RetryPolicy {
            attempts: config.max_retry_attempts.max(1),
            codes,
            min_wait: config.initial_retry_wait,
            max_wait: config.max_retry_wait.max(config.initial_retry_wait),
        };
        tracing::info!(%url, mode = ?config.queue_mode, "async invocations on NATS JetStream");
        Ok(Self {
            client,
            js,
            store,
            config,
            default_policy,
            streams: Mutex::default(),
            embedded,
        })
    }

    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Creates the queue's stream once (work-queue retention, file storage).
    pub async fn ensure_stream(
        &self,
        queue: &str,
    ) -> Result<jetstream::stream::Stream, QueueError> {
        let name = stream_name(queue);
        let known = self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&name);
        if known {
            return self.js.get_stream(&name).await.map_err(js_err);
        }
        let stream = self
            .js
            .get_or_create_stream(jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![format!("{queue}.>")],
                retention: jetstream::stream::RetentionPolicy::WorkQueue,
                storage: jetstream::stream::StorageType::File,
                num_replicas: self.config.nats_replicas,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(js_err)?;
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name);
        Ok(stream)
    }

    /// Publishes `call` and waits for JetStream to have stored it.
    pub async fn publish(&self, call: &AsyncCall) -> Result<(), QueueError> {
        self.ensure_stream(&call.queue).await?;
        let payload = serde_json::to_vec(call).map_err(js_err)?;
        let msg_id = format!("{}-{}", call.call_id, call.requeues);
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .message_id(msg_id);
        let subject = subject(&call.queue, &call.namespace, &call.function);
        let ack = self
            .js
            .send_publish(subject, publish)
            .await
            .map_err(js_err)?;
        ack.await.map_err(js_err)?;
        Ok(())
    }
}
