//! Test fixtures: a throwaway PostgreSQL 15 cluster (run as the `postgres` user, loopback only)
//! and the receiver itself on port 0; both are stopped and cleaned up on drop.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::time::Duration;

use billing_receiver::db::{self, Pool};
use billing_receiver::signature::Secret;
use billing_receiver::{ServerConfig, run};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A PostgreSQL cluster (the shared fixture of `tally-e2e`), plus a pool onto it.
pub struct TestPg(tally_e2e::postgres::Postgres);

impl TestPg {
    /// Returns `None` (and says why) when PostgreSQL 15 is not installed.
    pub fn start() -> Option<Self> {
        if let Some(why) = tally_e2e::postgres::missing() {
            eprintln!("SKIP: {why}");
            return None;
        }
        Some(Self(tally_e2e::postgres::Postgres::start()))
    }

    /// A fresh pool for direct queries from the test.
    pub fn pool(&self) -> Pool {
        Pool::new(&self.url(), 2).expect("valid url")
    }
}

impl std::ops::Deref for TestPg {
    type Target = tally_e2e::postgres::Postgres;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// The receiver running in this process on 127.0.0.1:0.
pub struct TestReceiver {
    pub addr: SocketAddr,
    pub secret: Secret,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

pub const SECRET: &[u8] = b"test-secret-0123456789\n";

impl TestReceiver {
    pub async fn start(pg: &TestPg) -> Self {
        Self::start_with(pg, ServerConfig::default()).await
    }

    pub async fn start_with(pg: &TestPg, config: ServerConfig) -> Self {
        let pool = Pool::new(&pg.url(), 4).expect("valid url");
        db::migrate::run(&pool).await.expect("migrations apply");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let addr = listener.local_addr().expect("local addr");
        let secret = Secret::from_file_bytes(SECRET);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(listener, pool, secret.clone(), config, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            secret,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Posts a correctly signed body on a fresh connection.
    pub async fn post(&self, body: impl Into<Bytes>) -> (u16, Value) {
        self.post_signed(body.into(), None).await
    }

    /// Posts with an explicit signature header (`None` = omit it).
    pub async fn post_signed(
        &self,
        body: Bytes,
        signature: Option<Option<String>>,
    ) -> (u16, Value) {
        let mut client = billing_receiver::client::WebhookClient::connect(&self.url())
            .await
            .expect("connect to receiver");
        let reply = client
            .post(body, &self.secret, signature)
            .await
            .expect("receiver answers");
        let body = serde_json::from_slice(&reply.body)
            .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&reply.body)}));
        (reply.status.as_u16(), body)
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("receiver stops within its grace")
                .expect("receiver task did not panic");
        }
    }
}

impl Drop for TestReceiver {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A plausible event; `i` varies duration, memory and peak so sums are non-trivial.
pub fn event(id: &str, namespace: &str, function: &str, started: &str, i: i64) -> Value {
    let duration = 1_000_000 + i * 7_654_321;
    let memory = [134_217_728_i64, 268_435_456, 1_073_741_824][(i % 3) as usize];
    json!({
        "event": "function_usage", "id": id, "namespace": namespace, "function_name": function,
        "started": started, "duration": duration,
        "memory_bytes": memory,
        "call_id": format!("call-{id}"), "status_code": 200,
        "memory_peak_bytes": if i % 4 == 0 { Value::Null } else { json!(10_000_000 + (i % 97) * 1_234_567) },
        "cpu_ns": null, "cold_start": i % 5 == 0,
        "init_duration_ns": if i % 5 == 0 { json!(250_000_000) } else { Value::Null },
        "billed_duration_ms": (duration + 999_999) / 1_000_000,
        "source": if i % 4 == 0 { "gateway" } else { "kernel" },
        "future_field": "ignored"
    })
}

/// `n` events with ids `{prefix}-{i}` in `openfaas-fn`/`env`.
pub fn batch(prefix: &str, n: i64) -> Vec<Value> {
    (0..n)
        .map(|i| {
            event(
                &format!("{prefix}-{i}"),
                "openfaas-fn",
                "env",
                "2026-11-22T10:00:00.123456789Z",
                i,
            )
        })
        .collect()
}

pub fn body(events: &[Value]) -> Bytes {
    Bytes::from(serde_json::to_vec(events).expect("serialize events"))
}

/// Rows in `function_usage`.
pub async fn count_rows(pool: &Pool) -> i64 {
    let mut conn = pool.get().await.expect("db connection");
    conn.client()
        .query_one("SELECT count(*) FROM function_usage", &[])
        .await
        .expect("count")
        .get(0)
}
