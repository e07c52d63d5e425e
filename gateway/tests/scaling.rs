//! Scaling over real HTTP: to any count and back to zero, scale from zero with held
//! requests, draining on scale-down, least-in-flight balancing, rolling update.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn pids_of(replicas: &serde_json::Value, function: &str) -> Vec<u64> {
    replicas["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["function"] == function)
        .flat_map(|r| {
            r["pids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_u64().unwrap())
        })
        .collect()
}

fn alive(pid: u64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn scale_zero_to_n_to_zero() {
    let gw = TestGateway::start(&[]);
    gw.deploy_ok(http_fn("web")).await;
    gw.wait_available("web", 1).await;
    assert_eq!(gw.scale("web", 3).await.status(), 202);
    let status = gw.wait_available("web", 3).await;
    assert_eq!(status["replicas"], 3);
    let map = gw.replicas().await;
    let pids = pids_of(&map, "web");
    assert_eq!(pids.len(), 3, "{map}");
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "gateway_service_count{function_name=\"web.openfaas-fn\"}"
        ),
        Some(3.0)
    );

    assert_eq!(gw.scale("web", 0).await.status(), 202);
    let status = gw.wait_available("web", 0).await;
    assert_eq!(status["replicas"], 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "replica processes still alive");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if is_root() {
        let dir = format!(
            "/sys/fs/cgroup/unified/{}/openfaas-fn/web",
            gw.cgroup_parent
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::path::Path::new(&dir).exists() {
            assert!(Instant::now() < deadline, "{dir} not removed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn scale_from_zero_holds_50_concurrent_requests_with_one_scale_call() {
    let gw = TestGateway::start(&[]);
    gw.deploy_ok(http_fn("cold")).await;
    gw.wait_available("cold", 1).await;
    gw.scale("cold", 0).await;
    gw.wait_available("cold", 0).await;
    let before = metric(&gw.metrics().await, "gateway_scale_from_zero_total").unwrap_or(0.0);
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let (http, url) = (gw.http.clone(), gw.url(&format!("/function/cold/?i={i}")));
            tokio::spawn(async move { http.get(url).send().await.unwrap().status().as_u16() })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap(), 200);
    }
    let after = metric(&gw.metrics().await, "gateway_scale_from_zero_total").unwrap();
    assert_eq!(after - before, 1.0, "one scale call for 50 held requests");
    assert_eq!(gw.describe("cold").await["replicas"], 1);

    // Fork mode comes back from zero too.
    gw.deploy_ok(fork_fn("forky", "echo up")).await;
    gw.scale("forky", 0).await;
    gw.wait_available("forky", 0).await;
    assert_eq!(gw.invoke("forky").await.text().await.unwrap(), "up\n");
}

#[tokio::test]
async fn held_requests_get_503_after_the_bounded_wait() {
    let gw = TestGateway::start(&["--ready-wait", "700ms"]);
    // An http-mode function that never listens on its PORT.
    let f = json!({"service": "deaf", "image": "x", "envProcess": "sleep 60", "envVars": {"mode": "http"}});
    gw.deploy_ok(f).await;
    let t = Instant::now();
    let r = gw.invoke("deaf").await;
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("became ready within"));
    assert!(t.elapsed() < Duration::from_secs(3));

    let gw = TestGateway::start(&["--scale-from-zero", "false"]);
    gw.deploy_ok(fork_fn("off", "echo x")).await;
    gw.scale("off", 0).await;
    let r = gw.invoke("off").await;
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("scale_from_zero is off"));
}

#[tokio::test]
async fn scale_down_drains_in_flight_requests() {
    let gw = TestGateway::start(&[]);
    gw.deploy_ok(http_fn("drain")).await;
    gw.wait_available("drain", 1).await;
    let (http, url) = (gw.http.clone(), gw.url("/function/drain/sleep?ms=1500"));
    let slow = tokio::spawn(async move {
        let r = http.get(url).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.scale("drain", 0).await;
    gw.wait_available("drain", 0).await;
    let (status, text) = slow.await.unwrap();
    assert_eq!(status, 200, "the in-flight request finished: {text}");
    assert!(text.starts_with("slept"));
}

#[tokio::test]
async fn requests_go_to_the_least_busy_replica() {
    let gw = TestGateway::start(&[]);
    gw.deploy_ok(http_fn("lb")).await;
    gw.scale("lb", 3).await;
    gw.wait_available("lb", 3).await;
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let (http, url) = (gw.http.clone(), gw.url("/function/lb/sleep?ms=700"));
            tokio::spawn(async move { http.get(url).send().await.unwrap().text().await.unwrap() })
        })
        .collect();
    let mut per_pid: HashMap<String, usize> = HashMap::new();
    for c in calls {
        let text = c.await.unwrap();
        *per_pid.entry(text.trim().to_string()).or_default() += 1;
    }
    assert_eq!(per_pid.len(), 3, "{per_pid:?}");
    assert!(per_pid.values().all(|n| *n == 2), "{per_pid:?}");
}

#[tokio::test]
async fn calls_that_never_overlap_are_spread_over_the_replicas() {
    let gw = TestGateway::start(&[]);
    gw.deploy_ok(http_fn("rr")).await;
    gw.scale("rr", 3).await;
    gw.wait_available("rr", 3).await;
    let mut per_pid: HashMap<String, usize> = HashMap::new();
    for _ in 0..9 {
        let r = gw
            .http
            .get(gw.url("/function/rr/sleep?ms=0"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        *per_pid
            .entry(r.text().await.unwrap().trim().to_string())
            .or_default() += 1;
    }
    assert_eq!(per_pid.len(), 3, "every replica served: {per_pid:?}");
    assert!(per_pid.values().all(|n| *n == 3), "in turn: {per_pid:?}");
}

#[tokio::test]
async fn update_replaces_replicas_without_a_gap() {
    let gw = TestGateway::start(&[]);
    let mut f = http_fn("ver");
    f["envVars"]["VERSION"] = json!("v1");
    gw.deploy_ok(f.clone()).await;
    gw.wait_available("ver", 1).await;
    assert_eq!(
        gw.invoke("ver/env?name=VERSION")
            .await
            .text()
            .await
            .unwrap(),
        "v1"
    );
    f["envVars"]["VERSION"] = json!("v2");
    let put = gw
        .auth(gw.http.put(gw.url("/system/functions")))
        .json(&f)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 202);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = gw.invoke("ver/env?name=VERSION").await;
        assert_eq!(r.status(), 200, "no failed request during the update");
        if r.text().await.unwrap() == "v2" {
            break;
        }
        assert!(Instant::now() < deadline, "update never took effect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gw.describe("ver").await["envVars"]["VERSION"], "v2");
}

fn alert(status: &str, function: &str) -> serde_json::Value {
    json!({
        "receiver": "scale-up", "status": status, "version": "4", "groupLabels": {},
        "alerts": [{"status": status, "labels": {"alertname": "APIHighInvocationRate", "function_name": function},
                    "annotations": {}, "startsAt": "2026-11-22T10:00:00Z"}]
    })
}

#[tokio::test]
async fn alertmanager_alerts_scale_up_and_back_to_min() {
    let gw = TestGateway::start(&["--autoscaler", "alerts"]);
    let mut f = fork_fn("hot", "echo hot");
    f["labels"] = json!({"com.openfaas.scale.min": "1", "com.openfaas.scale.max": "10", "com.openfaas.scale.factor": "20"});
    gw.deploy_ok(f).await;
    let post = async |body: serde_json::Value| {
        gw.auth(gw.http.post(gw.url("/system/alert")))
            .json(&body)
            .send()
            .await
            .unwrap()
    };
    for expected in [3, 5, 7, 9, 10, 10] {
        assert_eq!(post(alert("firing", "hot.openfaas-fn")).await.status(), 200);
        assert_eq!(gw.describe("hot").await["replicas"], expected);
    }
    assert_eq!(post(alert("resolved", "hot")).await.status(), 200);
    assert_eq!(gw.describe("hot").await["replicas"], 1);
    assert_eq!(
        post(alert("firing", "nobody-home")).await.status(),
        200,
        "unknown functions are ignored"
    );
    let bad = gw
        .auth(gw.http.post(gw.url("/system/alert")))
        .body("{\"alerts\": 7}")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(
        bad.text().await.unwrap(),
        "Unable to parse alert, bad format.\n"
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "gateway_alerts_total{result=\"scaled\"}"),
        Some(6.0)
    );
    assert_eq!(
        metric(&m, "gateway_alerts_total{result=\"unchanged\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "gateway_alerts_total{result=\"ignored\"}"),
        Some(1.0)
    );
    // Bad scaling labels refuse the deploy with the label named.
    let mut bad = fork_fn("bad", "echo");
    bad["labels"] = json!({"com.openfaas.scale.factor": "150"});
    let r = gw.deploy(bad).await;
    assert_eq!(r.status(), 400);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("com.openfaas.scale.factor")
    );

    let off = TestGateway::start(&["--autoscaler", "off"]);
    off.deploy_ok(fork_fn("cold", "echo")).await;
    let r = off
        .auth(off.http.post(off.url("/system/alert")))
        .json(&alert("firing", "cold"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        off.describe("cold").await["replicas"],
        1,
        "with --autoscaler off alerts do not scale"
    );
}
