//! Async invocations under faults, against real nats-server processes: a run longer
//! than `ack_wait` is not delivered twice; 10,000 calls survive a NATS restart and a
//! `kill -9` of the gateway; a 3-node JetStream cluster loses a node and nothing else.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn a_90s_run_with_ack_wait_30s_runs_once() {
    let gw = TestGateway::start(&[
        "--ack-wait",
        "30s",
        "--upstream-timeout",
        "150s",
        "--write-timeout",
        "160s",
        "--read-timeout",
        "160s",
    ]);
    let sink = CallbackSink::start().await;
    let runs = gw.functions_dir().join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&runs, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut f = fork_fn("long", "echo run >> runs/count; sleep 90; echo done");
    f["envVars"] = json!({"exec_timeout": "120s"});
    gw.deploy_ok(f).await;
    gw.wait_async_ready().await;
    let r = gw.enqueue("long", Some(&sink.url), "").await;
    assert_eq!(r.status(), 202);
    let id = r.headers()["x-call-id"].to_str().unwrap().to_string();
    let cb = sink.wait_call(&id, Duration::from_secs(140)).await;
    assert_eq!(cb.status, "200");
    assert_eq!(&cb.body[..], b"done\n");
    // Longer than one more ack_wait, to catch a late redelivery.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let count = std::fs::read_to_string(runs.join("count")).unwrap();
    assert_eq!(
        count.lines().count(),
        1,
        "the function ran {} times",
        count.lines().count()
    );
    assert_eq!(sink.all().len(), 1, "one callback");
    assert_eq!(gw.call_status(&id).await["attempt"], 1);
}

/// Submits `ids` until each is accepted (a 202), retrying refused or failed submissions
/// the way a careful client does; `on_progress` sees the count of accepted calls.
async fn submit_all(
    gw_url: Arc<std::sync::Mutex<String>>,
    ids: Vec<String>,
    callback: String,
    concurrency: usize,
) -> usize {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(ids);
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, next, ids, url, cb, retries) = (
                http.clone(),
                next.clone(),
                ids.clone(),
                gw_url.clone(),
                callback.clone(),
                retries.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(id) = ids.get(i) else { return };
                    let deadline = Instant::now() + Duration::from_secs(120);
                    loop {
                        let base = url.lock().unwrap().clone();
                        let r = http
                            .post(format!("{base}/async-function/web/echo"))
                            .header("X-Call-Id", id)
                            .header("X-Callback-Url", &cb)
                            .body(id.clone())
                            .send()
                            .await;
                        if r.as_ref().is_ok_and(|r| r.status() == 202) {
                            break;
                        }
                        assert!(Instant::now() < deadline, "call {id} never accepted: {r:?}");
                        retries.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    retries.load(Ordering::SeqCst)
}

#[tokio::test]
async fn ten_thousand_calls_survive_a_nats_restart_and_a_gateway_kill() {
    let mut nats = TestNats::start();
    let url = nats.url.clone();
    let mut gw = TestGateway::start(&[
        "--nats-url",
        &url,
        "--ack-wait",
        "5s",
        "--queue-max-inflight",
        "32",
    ]);
    let sink = CallbackSink::start().await;
    gw.deploy_ok(http_fn("web")).await;
    gw.scale("web", 2).await;
    gw.wait_available("web", 2).await;
    gw.wait_async_ready().await;
    const N: usize = 10_000;
    let ids: Vec<String> = (0..N).map(|i| format!("nl-{i:05}")).collect();
    let gw_url = Arc::new(std::sync::Mutex::new(gw.url.clone()));
    let submit = tokio::spawn(submit_all(
        gw_url.clone(),
        ids.clone(),
        sink.url.clone(),
        32,
    ));

    // Faults while the calls come in: NATS restarted once, the gateway killed once.
    let accepted = || async {
        metric(
            &gw_metrics(&gw_url).await,
            "queue_worker_messages_submitted_total",
        )
        .unwrap_or(0.0)
    };
    wait_until(
        || async { accepted().await >= 2500.0 },
        Duration::from_secs(60),
        "2,500 accepted",
    )
    .await;
    nats.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.spawn();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_kill = sink.all().len();
    wait_until(
        || async { sink.all().len() >= before_kill + 2000 },
        Duration::from_secs(60),
        "progress after the NATS restart",
    )
    .await;
    gw.crash();
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.spawn();
    *gw_url.lock().unwrap() = gw.url.clone();
    let retries = submit.await.unwrap();

    let got = sink.wait_for(N, Duration::from_secs(180)).await;
    let seen: HashSet<&str> = got.iter().map(|r| r.call_id.as_str()).collect();
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !seen.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} calls without a callback, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        got.iter().all(|r| r.status == "200"),
        "every callback reports success"
    );
    assert!(got.iter().all(|r| {
        seen.contains(
            std::str::from_utf8(&r.body)
                .unwrap_or("?")
                .split('"')
                .find(|s| s.starts_with("nl-"))
                .unwrap_or("?"),
        )
    }));
    // The status API accounts for every call too.
    let mut not_done = Vec::new();
    for chunk in ids.chunks(500) {
        let statuses = futures_util::future::join_all(
            chunk
                .iter()
                .map(|id| gw.get_sys(&format!("/system/async/{id}")).send()),
        )
        .await;
        for (id, r) in chunk.iter().zip(statuses) {
            let v: Value = r.unwrap().json().await.unwrap();
            if v["state"] != "succeeded" {
                not_done.push((id.clone(), v["state"].clone()));
            }
        }
    }
    assert!(
        not_done.is_empty(),
        "{} calls not succeeded in the status API: {:?}",
        not_done.len(),
        &not_done[..not_done.len().min(5)]
    );
    let duplicates = got.len() - N;
    eprintln!(
        "10,000 calls: {retries} submissions retried by the client, {duplicates} duplicate callbacks (at-least-once)"
    );
}

#[tokio::test]
async fn a_three_node_cluster_loses_a_node_and_no_call() {
    let (mut nodes, urls) = TestNats::cluster();
    let gw = TestGateway::start(&[
        "--nats-url",
        &urls,
        "--nats-replicas",
        "3",
        "--ack-wait",
        "5s",
    ]);
    let sink = CallbackSink::start().await;
    gw.deploy_ok(http_fn("web")).await;
    gw.wait_available("web", 1).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if gw
            .get_sys("/system/async-dead-letters")
            .send()
            .await
            .unwrap()
            .status()
            == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cluster never became ready for JetStream"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    const N: usize = 1000;
    let ids: Vec<String> = (0..N).map(|i| format!("cl-{i:04}")).collect();
    let gw_url = Arc::new(std::sync::Mutex::new(gw.url.clone()));
    let submit = tokio::spawn(submit_all(gw_url, ids.clone(), sink.url.clone(), 16));
    wait_until(
        || async { sink.all().len() >= 200 },
        Duration::from_secs(60),
        "200 callbacks",
    )
    .await;
    nodes[1].kill();
    submit.await.unwrap();
    let got = sink.wait_for(N, Duration::from_secs(120)).await;
    let seen: HashSet<&str> = got.iter().map(|r| r.call_id.as_str()).collect();
    assert_eq!(
        ids.iter().filter(|id| seen.contains(id.as_str())).count(),
        N
    );
}

async fn gw_metrics(url: &Arc<std::sync::Mutex<String>>) -> String {
    let base = url.lock().unwrap().clone();
    match reqwest::get(format!("{base}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn wait_until<F, Fut>(mut f: F, limit: Duration, what: &str)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
