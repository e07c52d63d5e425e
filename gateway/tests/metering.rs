//! Metering end to end over real HTTP and a real nats-server: one usage event per
//! invocation, flushed to JetStream, POSTed to the webhook in signed batches (checked by
//! an independent verifier, Python's hmac), retried, parked, deduplicated with the
//! agent's kernel events, and excluded by namespace.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

struct Webhook {
    sink: CallbackSink,
    secret: tempfile::NamedTempFile,
}

impl Webhook {
    async fn start() -> Self {
        let sink = CallbackSink::start().await;
        let secret = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(secret.path(), "s3cret-for-the-webhook\n").unwrap();
        Self { sink, secret }
    }

    fn flags(&self) -> Vec<String> {
        vec![
            "--webhook-endpoint".into(),
            self.sink.url.clone(),
            "--webhook-secret-file".into(),
            self.secret.path().to_str().unwrap().into(),
        ]
    }

    /// Every event of every delivery, checking each delivery's signature independently.
    fn events(&self) -> Vec<Value> {
        self.sink
            .all()
            .iter()
            .filter(|r| r.headers.get("x-openfaas-event").is_some())
            .flat_map(|r| {
                assert!(
                    python_verifies(
                        &r.body,
                        r.headers["x-openfaas-signature-256"].to_str().unwrap()
                    ),
                    "bad signature"
                );
                serde_json::from_slice::<Vec<Value>>(&r.body).unwrap()
            })
            .collect()
    }

    async fn wait_events(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let events = self.events();
            if events.len() >= n {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} events: {events:?}",
                events.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Python's hmac, not our code path, checks the header against the raw body.
fn python_verifies(body: &[u8], header: &str) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("body");
    std::fs::write(&path, body).unwrap();
    let script = "import hmac, hashlib, sys\n\
        body = open(sys.argv[1], 'rb').read()\n\
        want = 'sha256=' + hmac.new(b's3cret-for-the-webhook', body, hashlib.sha256).hexdigest()\n\
        sys.exit(0 if hmac.compare_digest(want, sys.argv[2]) else 1)\n";
    std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&path)
        .arg(header)
        .status()
        .unwrap()
        .success()
}

/// `POST /system/metering/parked/requeue` (202); how many batches it moved.
async fn requeue_parked(gw: &TestGateway) -> u64 {
    let r = gw
        .auth(gw.http.post(gw.url("/system/metering/parked/requeue")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    r.json::<Value>().await.unwrap()["requeued"]
        .as_u64()
        .unwrap_or(0)
}

/// Waits until `gateway_metering_events_total{stage}` reaches `n` (`why` names a timeout).
async fn wait_stage(gw: &TestGateway, stage: &str, n: usize, limit: Duration, why: &str) {
    let series = format!("gateway_metering_events_total{{stage=\"{stage}\"}}");
    let deadline = Instant::now() + limit;
    while metric(&gw.metrics().await, &series) != Some(n as f64) {
        assert!(Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn every_invocation_is_one_signed_event() {
    let hook = Webhook::start().await;
    let flags = hook.flags();
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let gw = TestGateway::start(&args);
    let mut f = fork_fn("hello", "sleep 0.05; echo hi");
    f["limits"] = json!({"memory": "64Mi"});
    gw.deploy_ok(f).await;
    gw.deploy_ok(http_fn("web")).await;
    gw.wait_available("web", 1).await;
    gw.wait_async_ready().await;
    for i in 0..3 {
        let r = gw
            .http
            .post(gw.url("/function/hello"))
            .header("X-Call-Id", format!("sync-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    gw.http
        .get(gw.url("/function/web/status?code=500"))
        .header("X-Call-Id", "sync-500")
        .send()
        .await
        .unwrap();
    let r = gw
        .http
        .post(gw.url("/async-function/web/echo"))
        .header("X-Call-Id", "async-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let events = hook.wait_events(5).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let events_now = hook.events();
    assert_eq!(
        events_now.len(),
        5,
        "exactly one event per invocation: {events_now:?}"
    );
    let by_call: HashMap<&str, &Value> = events
        .iter()
        .map(|e| (e["call_id"].as_str().unwrap(), e))
        .collect();
    let e = by_call["sync-0"];
    assert_eq!(e["event"], "function_usage");
    assert_eq!(
        (e["namespace"].as_str(), e["function_name"].as_str()),
        (Some("openfaas-fn"), Some("hello"))
    );
    assert_eq!(e["memory_bytes"], 64 << 20, "the limit");
    assert_eq!(e["source"], "gateway");
    assert_eq!(e["status_code"], 200);
    let duration = e["duration"].as_u64().unwrap();
    assert!(
        duration >= 50_000_000,
        "the 50 ms sleep is in the duration: {duration}"
    );
    assert_eq!(
        e["billed_duration_ms"].as_u64().unwrap(),
        duration.div_ceil(1_000_000)
    );
    assert!(chrono::DateTime::parse_from_rfc3339(e["started"].as_str().unwrap()).is_ok());
    assert!(
        e["memory_peak_bytes"].is_null(),
        "the gateway does not measure memory"
    );
    assert_eq!(by_call["sync-500"]["status_code"], 500);
    assert_eq!(
        by_call["sync-500"]["memory_bytes"],
        128 << 20,
        "default_memory without a limit"
    );
    assert!(
        by_call.contains_key("async-1"),
        "async invocations are metered too"
    );
    let ids: std::collections::HashSet<&str> =
        events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 5, "unique ids");
    let delivery = &hook.sink.all()[0];
    assert_eq!(delivery.headers["x-openfaas-event"], "function_usage");
    assert_eq!(delivery.headers["content-type"], "application/json");
    assert_eq!(
        delivery.headers["x-openfaas-delivery"]
            .to_str()
            .unwrap()
            .len(),
        36
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "gateway_metering_events_total{stage=\"delivered\"}"),
        Some(5.0)
    );
    assert_eq!(
        metric(&m, "gateway_metering_events_total{stage=\"dropped\"}"),
        Some(0.0),
        "dropped is exported (at 0) for alerting"
    );
}

#[tokio::test]
async fn excluded_namespaces_are_not_metered() {
    let hook = Webhook::start().await;
    let mut flags = hook.flags();
    flags.extend([
        "--namespaces".into(),
        "billing".into(),
        "--metering-excluded-namespaces".into(),
        "billing".into(),
    ]);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let gw = TestGateway::start(&args);
    let mut f = fork_fn("recv", "echo r");
    f["namespace"] = json!("billing");
    gw.deploy_ok(f).await;
    gw.deploy_ok(fork_fn("paid", "echo p")).await;
    gw.wait_async_ready().await;
    gw.invoke("recv.billing").await;
    gw.invoke("paid").await;
    let events = hook.wait_events(1).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(hook.events().len(), 1);
    assert_eq!(events[0]["function_name"], "paid");
}

#[tokio::test]
async fn a_receiver_that_fails_gets_retries_and_a_refused_batch_is_parked() {
    let hook = Webhook::start().await;
    hook.sink
        .answer
        .store(500, std::sync::atomic::Ordering::SeqCst);
    let mut flags = hook.flags();
    flags.extend(["--webhook-max-backoff".into(), "400ms".into()]);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let gw = TestGateway::start(&args);
    gw.deploy_ok(fork_fn("f", "echo f")).await;
    gw.wait_async_ready().await;
    gw.invoke("f").await;
    // Refused twice with 500, then accepted: delivered once the receiver is back.
    let deadline = Instant::now() + Duration::from_secs(15);
    while hook.sink.all().len() < 2 {
        assert!(Instant::now() < deadline, "no retry");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hook.sink
        .answer
        .store(200, std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let m = gw.metrics().await;
        if metric(&m, "gateway_metering_events_total{stage=\"delivered\"}") == Some(1.0) {
            assert!(metric(&m, "gateway_metering_webhook_retries_total").unwrap() >= 2.0);
            break;
        }
        assert!(Instant::now() < deadline, "never delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A 400 is not retried forever: the batch is parked and counted.
    hook.sink
        .answer
        .store(400, std::sync::atomic::Ordering::SeqCst);
    let before = hook.sink.all().len();
    gw.invoke("f").await;
    wait_stage(&gw, "parked", 1, Duration::from_secs(15), "never parked").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        hook.sink.all().len(),
        before + 1,
        "a refused batch is sent once"
    );
    // Parked for inspection, and re-queued once the receiver is fixed.
    let parked: Vec<Value> = gw.get_json("/system/metering/parked").await;
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(
        (parked[0]["status"].as_u64(), parked[0]["events"].as_u64()),
        (Some(400), Some(1))
    );
    hook.sink
        .answer
        .store(200, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(requeue_parked(&gw).await, 1);
    let never = "the re-queued batch was never delivered";
    wait_stage(&gw, "delivered", 2, Duration::from_secs(15), never).await;
    let parked: Vec<Value> = gw.get_json("/system/metering/parked").await;
    assert!(parked.is_empty());
}

/// A refused batch bigger than a NATS message (1 MiB) is parked whole, compressed, and
/// re-queued whole: before, its park failed and its events were acked all the same (lost).
#[tokio::test]
async fn a_refused_batch_bigger_than_a_nats_message_is_parked_whole() {
    let hook = Webhook::start().await;
    hook.sink
        .answer
        .store(400, std::sync::atomic::Ordering::SeqCst);
    let mut flags = hook.flags();
    flags.extend(
        [
            "--webhook-batch-bytes",
            "4000000",
            "--webhook-batch-events",
            "100000",
            "--metering-flush-events",
            "100000",
            "--metering-flush-interval",
            "1s",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let gw = TestGateway::start(&args);
    gw.wait_async_ready().await;
    // 3,000 events of ≈ 400 bytes: ≈ 1.2 MB of JSON in one batch, posted as the agent would.
    const N: usize = 3000;
    for part in 0..6 {
        let events: Vec<Value> = (0..N / 6)
            .map(|i| {
                let n = part * N / 6 + i;
                json!({
                    "id": format!("big-{n:05}-{}", "x".repeat(40)), "call_id": format!("call-{n:05}-{}", "y".repeat(40)),
                    "namespace": "openfaas-fn", "function_name": "big", "replica": "big-xxxxx",
                    "started": "2026-11-22T10:00:00.000000001Z", "duration_ns": 1_000_000 + n, "status_code": 200,
                    "memory_peak_bytes": 3_000_000, "memory_limit_bytes": 134_217_728, "cpu_ns": 900_000, "source": "kernel"
                })
            })
            .collect();
        let r = gw.post_usage(&Value::Array(events)).await;
        assert_eq!(r.status(), 200);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = gw.metrics().await;
        if metric(&m, "gateway_metering_events_total{stage=\"parked\"}") == Some(N as f64) {
            break;
        }
        assert_eq!(
            metric(&m, "gateway_metering_events_total{stage=\"park_failed\"}"),
            None,
            "a park failed"
        );
        assert!(Instant::now() < deadline, "not all parked: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = hook.sink.all();
    assert!(
        received.iter().any(|r| r.body.len() > 1 << 20),
        "the refused batch was bigger than 1 MiB: {:?}",
        received.iter().map(|r| r.body.len()).collect::<Vec<_>>()
    );
    let parked: Vec<Value> = gw.get_json("/system/metering/parked").await;
    let events: u64 = parked.iter().filter_map(|p| p["events"].as_u64()).sum();
    assert_eq!(events, N as u64, "{parked:?}");
    // Re-queued once the receiver is fixed: every event delivered.
    hook.sink
        .answer
        .store(200, std::sync::atomic::Ordering::SeqCst);
    assert!(requeue_parked(&gw).await >= 1);
    let short = "the re-queued events were not all delivered";
    wait_stage(&gw, "delivered", N, Duration::from_secs(30), short).await;
    let delivered: Vec<Value> = hook.sink.all()[received.len()..]
        .iter()
        .flat_map(|r| serde_json::from_slice::<Vec<Value>>(&r.body).unwrap())
        .collect();
    let ids: std::collections::HashSet<&str> =
        delivered.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!((delivered.len(), ids.len()), (N, N));
}

#[tokio::test]
async fn kernel_events_replace_the_gateways_and_never_both() {
    let hook = Webhook::start().await;
    let mut flags = hook.flags();
    flags.extend(["--metering-grace".into(), "700ms".into()]);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let gw = TestGateway::start(&args);
    gw.deploy_ok(fork_fn("k", "echo k")).await;
    gw.wait_async_ready().await;
    // Act as the node agent: poll the replica map (an agent is active)...
    gw.replicas().await;
    for id in ["with-kernel", "without-kernel"] {
        gw.http
            .get(gw.url("/function/k"))
            .header("X-Call-Id", id)
            .send()
            .await
            .unwrap();
    }
    // ...and report the kernel's measurement of one call.
    let kernel = |id: &str, duration: u64| {
        json!({
            "call_id": id, "namespace": "openfaas-fn", "function_name": "k", "replica": "k-xxxxx",
            "started": "2026-11-22T10:00:00.000000001Z", "duration_ns": duration, "status_code": 200,
            "memory_peak_bytes": 3_000_000, "memory_limit_bytes": null, "cpu_ns": 900_000, "source": "kernel"
        })
    };
    let r = gw
        .post_usage(&json!([kernel("with-kernel", 1_234_567)]))
        .await;
    assert_eq!(r.status(), 200);
    let events = hook.wait_events(2).await;
    let with = events
        .iter()
        .find(|e| e["call_id"] == "with-kernel")
        .unwrap();
    assert_eq!(with["source"], "kernel", "{events:?}");
    assert_eq!(with["duration"], 1_234_567);
    assert_eq!(with["billed_duration_ms"], 2);
    assert_eq!(with["memory_peak_bytes"], 3_000_000);
    assert_eq!(with["cpu_ns"], 900_000);
    let without = events
        .iter()
        .find(|e| e["call_id"] == "without-kernel")
        .unwrap();
    assert_eq!(
        without["source"], "gateway",
        "after the grace the gateway's own event goes"
    );
    // A kernel event arriving after the gateway's was sent is dropped, not billed twice.
    gw.post_usage(&json!([kernel("without-kernel", 5_000_000)]))
        .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let all = hook.events();
    assert_eq!(all.len(), 2, "never both for one call: {all:?}");
    assert_eq!(
        metric(
            &gw.metrics().await,
            "gateway_metering_events_total{stage=\"kernel_late\"}"
        ),
        Some(1.0)
    );
    // The agent re-sends a batch it thought lost: the call is not billed twice.
    let again = json!([kernel("with-kernel", 1_234_567)]);
    let r = gw.post_usage(&again).await;
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(hook.events().len(), 2);
    assert_eq!(
        metric(
            &gw.metrics().await,
            "gateway_metering_events_total{stage=\"kernel_duplicate\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn cold_starts_are_marked() {
    let hook = Webhook::start().await;
    let flags = hook.flags();
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let gw = TestGateway::start(&args);
    gw.deploy_ok(http_fn("cold")).await;
    gw.wait_available("cold", 1).await;
    gw.scale("cold", 0).await;
    gw.wait_available("cold", 0).await;
    gw.wait_async_ready().await;
    gw.http
        .get(gw.url("/function/cold"))
        .header("X-Call-Id", "first")
        .send()
        .await
        .unwrap();
    gw.http
        .get(gw.url("/function/cold"))
        .header("X-Call-Id", "second")
        .send()
        .await
        .unwrap();
    let events = hook.wait_events(2).await;
    let first = events.iter().find(|e| e["call_id"] == "first").unwrap();
    assert_eq!(first["cold_start"], true);
    assert!(
        first["init_duration_ns"].as_u64().unwrap() > 1_000_000,
        "{first}"
    );
    let second = events.iter().find(|e| e["call_id"] == "second").unwrap();
    assert_eq!(second["cold_start"], false);
    assert!(second["init_duration_ns"].is_null());
}

#[tokio::test]
async fn two_event_workers_share_the_stream_without_double_delivery() {
    let nats = TestNats::start();
    let hook = Webhook::start().await;
    let mut flags = hook.flags();
    flags.extend([
        "--nats-url".into(),
        nats.url.clone(),
        "--webhook-batch-events".into(),
        "20".into(),
    ]);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let a = TestGateway::start(&args);
    let _b = TestGateway::start(&args);
    a.deploy_ok(http_fn("many")).await;
    a.wait_available("many", 1).await;
    a.wait_async_ready().await;
    for chunk in 0..10 {
        let calls = (0..30).map(|i| {
            a.http
                .get(a.url("/function/many"))
                .header("X-Call-Id", format!("m-{chunk}-{i}"))
                .send()
        });
        for r in futures_util::future::join_all(calls).await {
            assert_eq!(r.unwrap().status(), 200);
        }
    }
    let events = hook.wait_events(300).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let events = if hook.events().len() > events.len() {
        hook.events()
    } else {
        events
    };
    let ids: std::collections::HashSet<&str> = events
        .iter()
        .map(|e| e["call_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 300);
    assert_eq!(events.len(), 300, "no event delivered twice");
}

/// `kill -9` of the serving gateway while every event is still in its buffer (the flush
/// is an hour away): the spool brings each served call's event back at the restart, and a
/// kernel event the agent re-sends after the crash keeps its id (the receiver's dedupe key).
#[tokio::test]
async fn a_gateway_killed_with_its_buffer_full_loses_no_event() {
    let hook = Webhook::start().await;
    let mut flags = hook.flags();
    flags.extend(
        [
            "--metering-flush-interval",
            "1h",
            "--metering-flush-events",
            "1000000",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut gw = TestGateway::start(&args);
    gw.deploy_ok(http_fn("web")).await;
    gw.wait_available("web", 1).await;
    gw.wait_async_ready().await;
    let mut served = std::collections::HashSet::new();
    for i in 0..200 {
        let call = format!("crash-{i}");
        let r = gw
            .http
            .get(gw.url("/function/web/echo"))
            .header("X-Call-Id", &call)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        served.insert(call);
    }
    let kernel = json!([{
        "id": "agent-event-0001", "call_id": "not-through-this-gateway",
        "namespace": "openfaas-fn", "function_name": "web", "replica": "web-1",
        "started": "2026-11-22T10:00:00.000000001Z", "duration_ns": 1_000_000u64,
        "status_code": 200, "memory_peak_bytes": 1_048_576u64, "source": "kernel"
    }]);
    let r = gw.post_usage(&kernel).await;
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let early = hook.events();
    assert!(
        early.is_empty(),
        "nothing flushed before the crash: {} {:?}",
        early.len(),
        early.first()
    );
    gw.crash();
    gw.spawn();
    let events = hook.wait_events(201).await;
    // The agent did not get (or lost) the answer and sends the same event again.
    gw.wait_async_ready().await;
    let r = gw.post_usage(&kernel).await;
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got: std::collections::HashSet<String> = events
        .iter()
        .filter(|e| e["source"] == "gateway")
        .map(|e| e["call_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, served, "every served call, once");
    assert_eq!(
        events.iter().filter(|e| e["source"] == "gateway").count(),
        200
    );
    let kernel_ids: Vec<String> = hook
        .events()
        .iter()
        .filter(|e| e["source"] == "kernel")
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !kernel_ids.is_empty() && kernel_ids.iter().all(|id| id == "agent-event-0001"),
        "the agent's id is the billing id: {kernel_ids:?}"
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "gateway_metering_events_total{stage=\"replayed\"}"),
        Some(201.0)
    );
}
