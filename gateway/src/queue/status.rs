//! The state of each async call (queued → running → retrying → succeeded / failed),
//! its result, and the dead letters — kept in JetStream key-value buckets, so they
//! survive restarts and are shared by every gateway and queue-worker.

use async_nats::jetstream::{self, kv};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};

use super::AsyncCall;

pub const STATUS_BUCKET: &str = "tally_async_calls";
pub const DEAD_BUCKET: &str = "tally_async_dead_letters";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Queued,
    Running,
    Retrying,
    Succeeded,
    Failed,
}

/// What happened to the callback of a finished call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallbackOutcome {
    pub url: String,
    pub attempts: u32,
    pub status_code: Option<u16>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallStatus {
    pub call_id: String,
    /// `fn.namespace`.
    pub function: String,
    pub state: State,
    pub attempt: u32,
    pub max_attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    pub queued_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The result body (UTF-8 as is, else base64 with `result_encoding: "base64"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_encoding: Option<String>,
    #[serde(default)]
    pub result_truncated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback: Option<CallbackOutcome>,
    #[serde(default)]
    pub dead_lettered: bool,
}

impl CallStatus {
    pub fn queued(call: &AsyncCall, max_attempts: u32) -> Self {
        Self {
            call_id: call.call_id.clone(),
            function: format!("{}.{}", call.function, call.namespace),
            state: State::Queued,
            attempt: 0,
            max_attempts,
            status_code: None,
            queued_at: call.queued_at,
            started_at: None,
            finished_at: None,
            next_attempt_at: None,
            result: None,
            result_encoding: None,
            result_truncated: false,
            error: None,
            callback: None,
            dead_lettered: false,
        }
    }

    /// Keeps at most `cap` bytes of `body` as the result.
    pub fn set_result(&mut self, body: &[u8], cap: usize) {
        let kept = &body[..body.len().min(cap)];
        self.result_truncated = body.len() > cap;
        match std::str::from_utf8(kept) {
            Ok(text) => {
                self.result = Some(text.to_string());
                self.result_encoding = None;
            }
            Err(_) => {
                self.result = Some(STANDARD.encode(kept));
                self.result_encoding = Some("base64".into());
            }
        }
    }
}

/// A call that exhausted its retries, could not be run, or could not be read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: String,
    pub reason: String,
    pub at: DateTime<Utc>,
    /// The call, when the message could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call: Option<AsyncCall>,
    /// The raw message (base64), when it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("JetStream key-value: {0}")]
    Kv(String),
    #[error("stored record is not valid: {0}")]
    Decode(#[from] serde_json::Error),
}

fn kv_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Kv(e.to_string())
}

#[derive(Clone)]
pub struct Store {
    calls: kv::Store,
    dead: kv::Store,
}

impl Store {
    pub async fn open(
        js: &jetstream::Context,
        replicas: usize,
        retention: std::time::Duration,
    ) -> Result<Self, StoreError> {
        let bucket = |name: &str, max_age| kv::Config {
            bucket: name.to_string(),
            history: 1,
            max_age,
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        };
        let calls = js
            .create_key_value(bucket(STATUS_BUCKET, retention))
            .await
            .map_err(kv_err)?;
        let dead = js
            .create_key_value(bucket(DEAD_BUCKET, std::time::Duration::ZERO))
            .await
            .map_err(kv_err)?;
        Ok(Self { calls, dead })
    }

    pub async fn put(&self, status: &CallStatus) -> Result<(), StoreError> {
        let bytes = Bytes::from(serde_json::to_vec(status)?);
        self.calls
            .put(key(&status.call_id), bytes)
            .await
            .map_err(kv_err)?;
        Ok(())
    }

    /// Writes `status` unless the call already has one (which is then newer).
    pub async fn create(&self, status: &CallStatus) -> Result<(), StoreError> {
        let bytes = Bytes::from(serde_json::to_vec(status)?);
        match self.calls.create(key(&status.call_id), bytes).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(kv_err(e)),
        }
    }

    pub async fn get(&self, call_id: &str) -> Result<Option<CallStatus>, StoreError> {
        match self.calls.get(key(call_id)).await.map_err(kv_err)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
        }
    }

    pub async fn forget(&self, call_id: &str) -> Result<(), StoreError> {
        self.calls.purge(key(call_id)).await.map_err(kv_err)?;
        Ok(())
    }

    pub async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        let bytes = Bytes::from(serde_json::to_vec(letter)?);
        self.dead
            .put(key(&letter.id), bytes)
            .await
            .map_err(kv_err)?;
        Ok(())
    }

    /// Every dead letter, oldest first (at most `limit`).
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let keys: Vec<String> = match self.dead.keys().await {
            Ok(k) => k.try_collect().await.map_err(kv_err)?,
            Err(e) => return Err(kv_err(e)),
        };
        let mut out = Vec::new();
        for k in keys.into_iter().take(limit) {
            if let Some(bytes) = self.dead.get(&k).await.map_err(kv_err)? {
                out.push(serde_json::from_slice::<DeadLetter>(&bytes)?);
            }
        }
        out.sort_by_key(|d| d.at);
        Ok(out)
    }

    pub async fn take_dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        let Some(bytes) = self.dead.get(key(id)).await.map_err(kv_err)? else {
            return Ok(None);
        };
        let letter: DeadLetter = serde_json::from_slice(&bytes)?;
        self.dead.purge(key(id)).await.map_err(kv_err)?;
        Ok(Some(letter))
    }
}

/// KV keys allow `[-/_=.a-zA-Z0-9]`; anything else in a caller's call id becomes `_`.
pub fn key(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_=".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}
