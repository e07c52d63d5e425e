//! The built-in target autoscaler against real replicas: a step of load scales a
//! function up at once and steadily (no oscillation), the end of it scales it down after
//! the window, idle functions labelled for it go to zero and come back, dry-run only
//! counts, and an unreachable Prometheus falls back to the gateway's own counters.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn scaled_fn(name: &str, labels: serde_json::Value) -> serde_json::Value {
    let mut f = http_fn(name);
    f["labels"] = labels;
    f
}

/// Sends about `rps` requests per second for `length` (bounded loop), sampling the
/// replica count every 250 ms.
async fn step_load(
    gw: &TestGateway,
    function: &str,
    rps: u32,
    length: Duration,
) -> Vec<(Duration, u64)> {
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut next_sample = Duration::ZERO;
    let per_tick = (rps / 10).max(1);
    while start.elapsed() < length {
        let calls =
            (0..per_tick).map(|_| gw.http.get(gw.url(&format!("/function/{function}"))).send());
        for r in futures_util::future::join_all(calls).await {
            assert_eq!(r.unwrap().status(), 200);
        }
        if start.elapsed() >= next_sample {
            samples.push((
                start.elapsed(),
                gw.describe(function).await["replicas"].as_u64().unwrap(),
            ));
            next_sample += Duration::from_millis(250);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    samples
}

#[tokio::test]
async fn a_step_of_load_scales_up_steadily_then_down_after_the_window() {
    let gw = TestGateway::start(&[
        "--autoscaler",
        "target",
        "--autoscaler-interval",
        "500ms",
        "--scale-down-window",
        "4s",
    ]);
    let labels = json!({"com.openfaas.scale.min": "1", "com.openfaas.scale.max": "6",
                        "com.openfaas.scale.target": "5", "com.openfaas.scale.target-proportion": "1"});
    gw.deploy_ok(scaled_fn("step", labels)).await;
    gw.wait_available("step", 1).await;
    // 20 requests/s against a target of 5 per replica: 4 replicas.
    let samples = step_load(&gw, "step", 20, Duration::from_secs(8)).await;
    let reached = samples
        .iter()
        .find(|(_, r)| *r >= 4)
        .map(|(t, _)| *t)
        .expect("never reached 4 replicas");
    eprintln!("step to 4 replicas in {reached:?}; samples {samples:?}");
    assert!(
        reached < Duration::from_secs(4),
        "scale-up is immediate: {reached:?}"
    );
    let after: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t > reached)
        .map(|(_, r)| *r)
        .collect();
    // Steady: at most one correction (of the first, ramping estimate), within 4..=5.
    let changes = after.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(changes <= 1, "no oscillation under steady load: {after:?}");
    assert!(
        after.iter().all(|r| (4..=5).contains(r)),
        "no overshoot: {after:?}"
    );
    // The load stops: back to min once a whole window has passed.
    let ended = Instant::now();
    while gw.describe("step").await["replicas"] != 1 {
        assert!(
            ended.elapsed() < Duration::from_secs(15),
            "never scaled back down"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        ended.elapsed() >= Duration::from_secs(3),
        "not before the window: {:?}",
        ended.elapsed()
    );
    let m = gw.metrics().await;
    assert!(metric(&m, "gateway_autoscaler_decisions_total{direction=\"up\",function_name=\"step.openfaas-fn\",reason=\"load\"}").unwrap() >= 1.0);
    assert!(metric(&m, "gateway_autoscaler_decisions_total{direction=\"down\",function_name=\"step.openfaas-fn\",reason=\"load\"}").unwrap() >= 1.0);
    assert_eq!(
        metric(
            &m,
            "gateway_service_target_load{function_name=\"step.openfaas-fn\"}"
        ),
        Some(5.0)
    );
}

#[tokio::test]
async fn idle_functions_go_to_zero_and_come_back() {
    let gw = TestGateway::start(&["--autoscaler", "target", "--autoscaler-interval", "300ms"]);
    let labels =
        json!({"com.openfaas.scale.zero": "true", "com.openfaas.scale.zero-duration": "1s"});
    gw.deploy_ok(scaled_fn("sleepy", labels)).await;
    gw.deploy_ok(http_fn("awake")).await;
    gw.wait_available("sleepy", 1).await;
    assert_eq!(gw.invoke("sleepy").await.status(), 200);
    let t = Instant::now();
    while gw.describe("sleepy").await["replicas"] != 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "never went to zero");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "not before zero-duration"
    );
    assert_eq!(
        gw.describe("awake").await["replicas"],
        1,
        "functions without the label stay"
    );
    assert_eq!(
        gw.invoke("sleepy").await.status(),
        200,
        "the next request brings it back"
    );
    assert_eq!(gw.describe("sleepy").await["replicas"], 1);
    let m = gw.metrics().await;
    // At least the one above; a loaded machine may let the next idle second pass too.
    let downs = metric(
        &m,
        "gateway_autoscaler_decisions_total{direction=\"down\",function_name=\"sleepy.openfaas-fn\",reason=\"idle\"}",
    );
    assert!(downs.is_some_and(|d| d >= 1.0), "{downs:?}");
}

#[tokio::test]
async fn never_to_zero_with_a_call_in_flight() {
    let gw = TestGateway::start(&["--autoscaler", "target", "--autoscaler-interval", "200ms"]);
    let labels =
        json!({"com.openfaas.scale.zero": "true", "com.openfaas.scale.zero-duration": "500ms"});
    gw.deploy_ok(scaled_fn("busy", labels)).await;
    gw.wait_available("busy", 1).await;
    let slow = gw.http.get(gw.url("/function/busy/sleep?ms=2500")).send();
    let check = async {
        tokio::time::sleep(Duration::from_millis(2000)).await;
        gw.describe("busy").await["replicas"].as_u64()
    };
    let (r, replicas) = tokio::join!(slow, check);
    assert_eq!(r.unwrap().status(), 200);
    assert_eq!(replicas, Some(1), "an invocation in flight keeps it up");
}

#[tokio::test]
async fn dry_run_counts_without_scaling_and_prometheus_falls_back() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    let gw = TestGateway::start(&[
        "--autoscaler",
        "target",
        "--autoscaler-interval",
        "300ms",
        "--autoscaler-dry-run",
        "true",
        "--prometheus-url",
        &closed,
    ]);
    let labels = json!({"com.openfaas.scale.max": "6", "com.openfaas.scale.target": "2", "com.openfaas.scale.target-proportion": "1"});
    gw.deploy_ok(scaled_fn("dry", labels)).await;
    gw.wait_available("dry", 1).await;
    step_load(&gw, "dry", 20, Duration::from_secs(3)).await;
    let m = gw.metrics().await;
    assert!(metric(&m, "gateway_autoscaler_decisions_total{direction=\"up\",function_name=\"dry.openfaas-fn\",reason=\"load\"}").unwrap() >= 1.0);
    assert!(
        metric(&m, "gateway_autoscaler_source_fallbacks_total").unwrap() >= 1.0,
        "Prometheus unreachable: local counters used"
    );
    assert_eq!(
        gw.describe("dry").await["replicas"],
        1,
        "dry-run does not scale"
    );
}
