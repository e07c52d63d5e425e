//! Throughput check: signed batches of generated events posted by N concurrent senders,
//! reporting committed events per second (every batch must get a 200).

use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{SecondsFormat, Utc};

use crate::client::{ClientError, WebhookClient};
use crate::signature::Secret;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("batch refused with {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("sender task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub url: String,
    pub events: usize,
    pub batch: usize,
    pub concurrency: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct BenchResult {
    pub events: usize,
    pub elapsed: Duration,
}

impl BenchResult {
    pub fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
}

/// A JSON array of `n` plausible events with ids `{prefix}-{i}`.
pub fn make_batch(prefix: &str, n: usize) -> Bytes {
    let started = Utc::now().to_rfc3339_opts(SecondsFormat::Nanos, true);
    let events: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            serde_json::json!({
                "event": "function_usage", "id": format!("{prefix}-{i}"),
                "namespace": "openfaas-fn", "function_name": format!("fn-{}", i % 8),
                "started": started, "duration": 1_500_000 + i as i64, "memory_bytes": 134_217_728,
                "call_id": format!("call-{prefix}-{i}"), "status_code": 200,
                "memory_peak_bytes": 12_345_678, "cpu_ns": 900_000, "cold_start": false,
                "init_duration_ns": null, "billed_duration_ms": 2, "source": "kernel"
            })
        })
        .collect();
    Bytes::from(serde_json::to_vec(&events).expect("events serialize"))
}

/// Sends `events` events in batches; each sender owns one keep-alive connection.
pub async fn run(config: &BenchConfig, secret: &Secret) -> Result<BenchResult, BenchError> {
    let batch = config.batch.max(1);
    let batches = config.events.div_ceil(batch);
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    // Bodies are built up front so the measurement is the receiver, not the generator.
    let bodies: Vec<Bytes> = (0..batches)
        .map(|b| make_batch(&format!("bench-{run_id}-{b}"), batch))
        .collect();
    let concurrency = config.concurrency.max(1);
    let mut queues: Vec<Vec<Bytes>> = vec![Vec::new(); concurrency];
    for (i, body) in bodies.into_iter().enumerate() {
        queues[i % concurrency].push(body);
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for queue in queues {
        let url = config.url.clone();
        let secret = secret.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = WebhookClient::connect(&url).await?;
            for body in queue {
                let reply = client.post(body, &secret, None).await?;
                if !reply.status.is_success() {
                    return Err(BenchError::Refused {
                        status: reply.status.as_u16(),
                        body: String::from_utf8_lossy(&reply.body).into_owned(),
                    });
                }
            }
            Ok::<(), BenchError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(BenchResult {
        events: batches * batch,
        elapsed: start.elapsed(),
    })
}
