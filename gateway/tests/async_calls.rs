//! Async invocations against a real nats-server: the 202 contract and bad input, the
//! status API through every state, retries (timing, Retry-After, per-function
//! overrides), dead letters and re-queue, callbacks, fairness, NATS outages, purge.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn flaky_fn(name: &str, annotations: Value) -> Value {
    let mut f = http_fn(name);
    f["annotations"] = annotations;
    f
}

#[tokio::test]
async fn accepted_calls_run_and_call_back() {
    let gw = TestGateway::start(&[]);
    let sink = CallbackSink::start().await;
    gw.deploy_ok(http_fn("web")).await;
    gw.wait_available("web", 1).await;
    gw.wait_async_ready().await;
    let r = gw
        .http
        .post(gw.url("/async-function/web/echo?x=1"))
        .header("X-Callback-Url", &sink.url)
        .header("X-Call-Id", "my-call-1")
        .header("X-Custom", "kept")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        r.headers()["x-call-id"],
        "my-call-1",
        "the caller's id is kept"
    );
    assert!(r.text().await.unwrap().is_empty());
    let cb = sink.wait_call("my-call-1", Duration::from_secs(10)).await;
    assert_eq!(cb.status, "200");
    assert_eq!(cb.headers["x-function-name"], "web.openfaas-fn");
    assert!(
        cb.headers["x-duration-seconds"]
            .to_str()
            .unwrap()
            .parse::<f64>()
            .unwrap()
            > 0.0
    );
    let seen: Value = serde_json::from_slice(&cb.body).unwrap();
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path"], "/echo?x=1", "original path and query");
    assert_eq!(seen["body"], "payload");
    assert_eq!(seen["headers"]["x-custom"], "kept", "original headers");
    assert_eq!(seen["headers"]["x-call-id"], "my-call-1");
    assert!(seen["headers"].get("x-callback-url").is_none());

    // The status records the callback's outcome too, so it is written just after it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        let s = gw.call_status("my-call-1").await;
        if s["callback"].is_object() {
            break s;
        }
        assert!(Instant::now() < deadline, "{s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status["state"], "succeeded");
    assert_eq!(status["status_code"], 200);
    assert_eq!(status["attempt"], 1);
    assert!(status["result"].as_str().unwrap().contains("payload"));
    assert_eq!(status["callback"]["status_code"], 200);
    for k in ["queued_at", "started_at", "finished_at"] {
        assert!(status[k].is_string(), "{k} in {status}");
    }
    // The message is acked (and counted as processed) just after the status is stored.
    let deadline = Instant::now() + Duration::from_secs(5);
    let m = loop {
        let m = gw.metrics().await;
        if metric(&m, "queue_worker_messages_processed_total") == Some(1.0) {
            break m;
        }
        assert!(Instant::now() < deadline, "not counted as processed:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        metric(&m, "queue_worker_messages_submitted_total"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "queue_worker_callbacks_total{result=\"delivered\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "gateway_function_invocation_total{code=\"200\",function_name=\"web.openfaas-fn\"}"
        ),
        Some(1.0)
    );
    let status = gw
        .get_sys("/system/async/no-such-call")
        .send()
        .await
        .unwrap();
    assert_eq!(status.status(), 404);
}

#[tokio::test]
async fn bad_async_requests() {
    let gw = TestGateway::start(&[
        "--async-max-body-bytes",
        "1000",
        "--callback-allowed-hosts",
        "127.0.0.1",
    ]);
    gw.deploy_ok(fork_fn("cat", "cat")).await;
    gw.wait_async_ready().await;
    let r = gw.enqueue("missing", None, "").await;
    assert_eq!(
        r.status(),
        404,
        "unknown function: 404, not OpenFaaS CE's 202"
    );
    let r = gw
        .http
        .post(gw.url("/async-function/cat"))
        .body(vec![b'x'; 2000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    for bad in ["/relative", "ftp://127.0.0.1/x", "not a url"] {
        let r = gw.enqueue("cat", Some(bad), "").await;
        assert_eq!(r.status(), 400, "{bad}");
        assert!(r.text().await.unwrap().contains("X-Callback-Url"));
    }
    let r = gw
        .enqueue("cat", Some("http://169.254.169.254/latest"), "")
        .await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("allow-list"));
    let r = gw
        .http
        .get(gw.url("/async-function/cat"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let r = gw.enqueue("Bad_Name", None, "").await;
    assert_eq!(r.status(), 400);
    let dead: Value = gw.get_json("/system/async-dead-letters").await;
    assert_eq!(dead, json!([]), "nothing was queued");
}

#[tokio::test]
async fn retries_back_off_and_then_dead_letter_and_requeue() {
    let gw = TestGateway::start(&[]);
    let sink = CallbackSink::start().await;
    // 4 attempts, waits of 300, 600, 1200 ms (±25% jitter).
    let ann = json!({"com.openfaas.retry.attempts": "4", "com.openfaas.retry.min_wait": "300ms", "com.openfaas.retry.max_wait": "5s"});
    gw.deploy_ok(flaky_fn("flaky", ann)).await;
    gw.wait_available("flaky", 1).await;
    gw.wait_async_ready().await;
    let r = gw
        .http
        .post(gw.url("/async-function/flaky/flaky?key=a&fail=100&code=503"))
        .header("X-Callback-Url", &sink.url)
        .header("X-Call-Id", "always-fails")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // While it retries, the status says so.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = gw.call_status("always-fails").await;
        if s["state"] == "retrying" {
            assert!(s["next_attempt_at"].is_string(), "{s}");
            assert_eq!(s["status_code"], 503);
            assert!(s["error"].as_str().unwrap().contains("of 4"), "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "never seen retrying: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cb = sink
        .wait_call("always-fails", Duration::from_secs(15))
        .await;
    assert_eq!(cb.status, "503");
    assert_eq!(cb.headers["x-retry"], "3");
    assert_eq!(cb.headers["x-retry-max"], "3");
    let times: Vec<f64> = gw.invoke("flaky/calls?key=a").await.json().await.unwrap();
    assert_eq!(times.len(), 4, "exactly the configured attempts");
    let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, base) in gaps.iter().zip([0.3, 0.6, 1.2]) {
        assert!(
            *gap >= base * 0.75 - 0.02 && *gap <= base * 1.25 + 0.35,
            "gap {gap:.3}s for a {base}s backoff: {gaps:?}"
        );
    }
    let status = gw.call_status("always-fails").await;
    assert_eq!(status["state"], "failed");
    assert_eq!(status["attempt"], 4);
    assert_eq!(status["dead_lettered"], true);

    let dead: Vec<Value> = gw.get_json("/system/async-dead-letters").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["id"], "always-fails");
    assert!(dead[0]["reason"].as_str().unwrap().contains("503"));
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "queue_worker_retries_total{function_name=\"flaky.openfaas-fn\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &m,
            "queue_worker_dead_lettered_total{function_name=\"flaky.openfaas-fn\"}"
        ),
        Some(1.0)
    );

    // Re-queued, it runs again: the fixture now fails 100 - 4 more times, so fix it first
    // by pointing the call at a key that succeeds is not possible; re-queue and watch it
    // go through all attempts again instead.
    let r = gw
        .auth(
            gw.http
                .post(gw.url("/system/async-dead-letters/always-fails/requeue")),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let dead: Vec<Value> = gw.get_json("/system/async-dead-letters").await;
    assert!(dead.is_empty(), "taken off the dead letters");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let times: Vec<f64> = gw.invoke("flaky/calls?key=a").await.json().await.unwrap();
        if times.len() == 8 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "re-queued call ran {} times",
            times.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = gw
        .auth(
            gw.http
                .post(gw.url("/system/async-dead-letters/nope/requeue")),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn retry_after_and_per_function_codes() {
    let gw = TestGateway::start(&["--initial-retry-wait", "100ms", "--max-retry-wait", "5s"]);
    let sink = CallbackSink::start().await;
    gw.deploy_ok(http_fn("web")).await;
    // Per function: 418 is retried (it is not by default), at most 2 attempts.
    let ann = json!({"com.openfaas.retry.attempts": "2", "com.openfaas.retry.codes": "418", "com.openfaas.retry.min_wait": "100ms"});
    gw.deploy_ok(flaky_fn("teapot", ann)).await;
    gw.wait_available("web", 1).await;
    gw.wait_available("teapot", 1).await;
    gw.wait_async_ready().await;
    // 429 with Retry-After: 2 replaces the 100 ms backoff.
    gw.enqueue(
        "web/flaky?key=ra&fail=1&code=429&retry_after=2",
        Some(&sink.url),
        "",
    )
    .await;
    let cb = sink
        .wait_call_where(
            |r| r.body.starts_with(b"ok after 2"),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(cb.status, "200");
    let times: Vec<f64> = gw.invoke("web/calls?key=ra").await.json().await.unwrap();
    let gap = times[1] - times[0];
    assert!(
        (1.95..3.0).contains(&gap),
        "Retry-After 2 s honoured: {gap:.3}s"
    );
    // 500 is not in the function's codes: done after one attempt.
    gw.enqueue("teapot/flaky?key=t5&fail=5&code=500", Some(&sink.url), "")
        .await;
    gw.enqueue("teapot/flaky?key=t4&fail=5&code=418", Some(&sink.url), "")
        .await;
    sink.wait_for(3, Duration::from_secs(10)).await;
    let n = async |key: &str| {
        let t: Vec<f64> = gw
            .invoke(&format!("teapot/calls?key={key}"))
            .await
            .json()
            .await
            .unwrap();
        t.len()
    };
    assert_eq!(n("t5").await, 1, "500 not retried for this function");
    assert_eq!(n("t4").await, 2, "418 retried, 2 attempts in all");
}

#[tokio::test]
async fn a_flooded_function_does_not_delay_another() {
    let gw = TestGateway::start(&["--queue-max-inflight", "4"]);
    let sink = CallbackSink::start().await;
    gw.deploy_ok(http_fn("flood")).await;
    gw.deploy_ok(http_fn("other")).await;
    gw.wait_available("flood", 1).await;
    gw.wait_available("other", 1).await;
    gw.wait_async_ready().await;
    // 200 calls of 100 ms at 4 at a time: a 5 s backlog for "flood".
    for _ in 0..200 {
        assert_eq!(
            gw.enqueue("flood/sleep?ms=100", Some(&sink.url), "")
                .await
                .status(),
            202
        );
    }
    let t = Instant::now();
    let r = gw.enqueue("other/echo", Some(&sink.url), "").await;
    let id = r.headers()["x-call-id"].to_str().unwrap().to_string();
    let cb = sink.wait_call(&id, Duration::from_secs(10)).await;
    let waited = cb.at.duration_since(t);
    // The bound we state: another function's call is not held behind the flood; it
    // completes within 1.5 s however deep the other queue is.
    assert!(
        waited < Duration::from_millis(1500),
        "other function waited {waited:?} behind the flood"
    );
    let done_flood = sink.all().iter().filter(|r| r.call_id != id).count();
    assert!(
        done_flood < 200,
        "the flood was still running when the other call finished"
    );
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let pending = metric(
        &gw.metrics().await,
        "queue_worker_pending_messages{function_name=\"flood.openfaas-fn\"}",
    );
    assert!(
        pending.is_some_and(|p| p > 0.0),
        "the backlog shows in the pending gauge: {pending:?}"
    );
}

#[tokio::test]
async fn nats_outage_fails_async_clearly_while_sync_works() {
    let mut nats = TestNats::start();
    let gw = TestGateway::start(&["--nats-url", &nats.url.clone()]);
    let sink = CallbackSink::start().await;
    gw.deploy_ok(fork_fn("echo", "echo hi")).await;
    gw.wait_async_ready().await;
    nats.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = gw.enqueue("echo", Some(&sink.url), "").await;
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("NATS"));
    assert_eq!(
        gw.invoke("echo").await.text().await.unwrap(),
        "hi\n",
        "sync calls keep working"
    );
    nats.spawn();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = gw.enqueue("echo", Some(&sink.url), "").await;
        if r.status() == 202 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "async never came back: {}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sink.wait_for(1, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn deleted_functions_and_malformed_messages_are_dead_lettered() {
    let nats = TestNats::start();
    let url = nats.url.clone();
    let mut gw = TestGateway::start(&["--nats-url", &url, "--queue-worker", "false"]);
    let sink = CallbackSink::start().await;
    gw.deploy_ok(fork_fn("gone", "echo x")).await;
    gw.wait_async_ready().await;
    for _ in 0..3 {
        assert_eq!(gw.enqueue("gone", Some(&sink.url), "").await.status(), 202);
    }
    let del = gw
        .auth(gw.http.delete(gw.url("/system/functions")))
        .json(&json!({"functionName": "gone"}))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 202);
    // A message nobody can read, straight onto the stream.
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.publish("faas-request.openfaas-fn.gone", "{not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    // Now a gateway with the queue-worker.
    gw.stop();
    gw.args = vec!["--nats-url".into(), url.clone()];
    gw.spawn();
    gw.wait_async_ready().await;
    let got = sink.wait_for(3, Duration::from_secs(15)).await;
    assert!(
        got.iter().all(|r| r.status == "404"),
        "callbacks say the function is gone"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dead: Vec<Value> = gw.get_json("/system/async-dead-letters").await;
        if dead.len() == 4 {
            assert_eq!(
                dead.iter()
                    .filter(|d| d["reason"].as_str().unwrap().contains("not found"))
                    .count(),
                3,
                "{dead:?}"
            );
            assert_eq!(
                dead.iter()
                    .filter(|d| d["reason"].as_str().unwrap().contains("malformed"))
                    .count(),
                1
            );
            let malformed = dead.iter().find(|d| d["call"].is_null()).unwrap();
            assert!(malformed["raw"].is_string());
            let r = gw
                .auth(gw.http.post(gw.url(&format!(
                    "/system/async-dead-letters/{}/requeue",
                    malformed["id"].as_str().unwrap()
                ))))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "an unreadable message cannot be re-queued");
            break;
        }
        assert!(Instant::now() < deadline, "dead letters: {dead:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gw.get_sys("/healthz")
            .send()
            .await
            .unwrap()
            .status()
            .is_success(),
        "no crash loop"
    );
}

#[tokio::test]
async fn static_mode_and_purge() {
    let gw = TestGateway::start(&["--queue-mode", "static", "--queue-worker", "false"]);
    gw.deploy_ok(fork_fn("a", "echo a")).await;
    gw.wait_async_ready().await;
    for _ in 0..5 {
        gw.enqueue("a", None, "").await;
    }
    let r = gw
        .auth(gw.http.delete(gw.url("/system/async-queues/faas-request")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["purged"], 5);
    let r = gw
        .auth(gw.http.delete(gw.url("/system/async-queues/nope")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let gw = TestGateway::start(&["--queue-mode", "static"]);
    let sink = CallbackSink::start().await;
    gw.deploy_ok(fork_fn("a", "echo a")).await;
    gw.deploy_ok(fork_fn("b", "echo b")).await;
    gw.wait_async_ready().await;
    for f in ["a", "b", "a", "b"] {
        gw.enqueue(f, Some(&sink.url), "").await;
    }
    let got = sink.wait_for(4, Duration::from_secs(10)).await;
    assert_eq!(got.iter().filter(|r| &r.body[..] == b"a\n").count(), 2);
}

#[tokio::test]
async fn a_queue_worker_on_its_own_invokes_through_the_gateway() {
    let nats = TestNats::start();
    let main = TestGateway::start(&["--nats-url", &nats.url.clone(), "--queue-worker", "false"]);
    let secrets = main.data.path().join("secrets");
    let worker = TestGateway::start(&[
        "--nats-url",
        &nats.url.clone(),
        "--invoke-url",
        &main.url.clone(),
        "--secret-mount-path",
        secrets.to_str().unwrap(),
    ]);
    let sink = CallbackSink::start().await;
    let mut f = http_fn("web");
    f["annotations"] =
        json!({"com.openfaas.retry.attempts": "2", "com.openfaas.retry.min_wait": "100ms"});
    main.deploy_ok(f).await;
    main.wait_available("web", 1).await;
    main.wait_async_ready().await;
    let r = main
        .http
        .post(main.url("/async-function/web/echo?q=1"))
        .header("X-Callback-Url", &sink.url)
        .body("via worker")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let cb = sink.wait_for(1, Duration::from_secs(15)).await.remove(0);
    assert_eq!(cb.status, "200");
    let seen: Value = serde_json::from_slice(&cb.body).unwrap();
    assert_eq!(
        (seen["path"].as_str(), seen["body"].as_str()),
        (Some("/echo?q=1"), Some("via worker"))
    );
    // It went through the main gateway's routing, and the worker's own counters.
    let m = main.metrics().await;
    assert_eq!(
        metric(
            &m,
            "gateway_function_invocation_total{code=\"200\",function_name=\"web.openfaas-fn\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &worker.metrics().await,
            "queue_worker_messages_processed_total"
        ),
        Some(1.0)
    );
    // The per-function retry annotations are read from the main gateway.
    main.enqueue("web/status?code=500", Some(&sink.url), "")
        .await;
    let failed = sink
        .wait_call_where(|r| r.status == "500", Duration::from_secs(15))
        .await;
    assert_eq!(failed.headers["x-retry-max"], "1");
}

#[tokio::test]
async fn callbacks_that_refuse_or_hang_are_retried_a_bounded_number_of_times() {
    let gw = TestGateway::start(&["--callback-attempts", "3", "--callback-timeout", "300ms"]);
    gw.deploy_ok(fork_fn("ok", "echo ok")).await;
    gw.wait_async_ready().await;
    // Nothing listens on this port; and a listener that never answers.
    let refused = format!("http://127.0.0.1:{}/cb", free_port());
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging = format!("http://{}/cb", hang.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    let sink = CallbackSink::start().await;
    sink.answer.store(500, std::sync::atomic::Ordering::SeqCst);
    for (url, expect) in [
        (refused.as_str(), "callback failed"),
        (hanging.as_str(), "did not answer"),
        (sink.url.as_str(), "answered 500"),
    ] {
        let r = gw.enqueue("ok", Some(url), "").await;
        let id = r.headers()["x-call-id"].to_str().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let s = gw.call_status(&id).await;
            if s["callback"].is_object() {
                assert_eq!(s["state"], "succeeded", "the call itself worked: {s}");
                assert_eq!(s["callback"]["attempts"], 3, "{s}");
                assert!(
                    s["callback"]["error"].as_str().unwrap().contains(expect),
                    "{s}"
                );
                break;
            }
            assert!(Instant::now() < deadline, "no callback outcome: {s}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(
        sink.all().len(),
        3,
        "the 500-answering receiver saw every attempt"
    );
    assert_eq!(
        metric(
            &gw.metrics().await,
            "queue_worker_callbacks_total{result=\"failed\"}"
        ),
        Some(3.0)
    );
}

#[tokio::test]
async fn a_nats_restart_with_1000_calls_queued_loses_none() {
    let mut nats = TestNats::start();
    let url = nats.url.clone();
    let mut gw = TestGateway::start(&["--nats-url", &url, "--queue-worker", "false"]);
    let sink = CallbackSink::start().await;
    gw.deploy_ok(fork_fn("q", "echo queued")).await;
    gw.wait_async_ready().await;
    let ids: Vec<String> = (0..1000).map(|i| format!("q-{i:04}")).collect();
    for chunk in ids.chunks(50) {
        let sends = chunk.iter().map(|id| {
            gw.http
                .post(gw.url("/async-function/q"))
                .header("X-Call-Id", id)
                .header("X-Callback-Url", &sink.url)
                .send()
        });
        for r in futures_util::future::join_all(sends).await {
            assert_eq!(r.unwrap().status(), 202);
        }
    }
    nats.kill();
    nats.spawn();
    gw.stop();
    gw.args = vec!["--nats-url".into(), url];
    gw.spawn();
    let got = sink.wait_for(1000, Duration::from_secs(60)).await;
    let seen: std::collections::HashSet<&str> = got.iter().map(|r| r.call_id.as_str()).collect();
    assert!(ids.iter().all(|id| seen.contains(id.as_str())));
}

#[tokio::test]
async fn status_shows_queued_then_running() {
    let nats = TestNats::start();
    let url = nats.url.clone();
    let mut gw = TestGateway::start(&["--nats-url", &url, "--queue-worker", "false"]);
    gw.deploy_ok(http_fn("slow")).await;
    gw.wait_available("slow", 1).await;
    gw.wait_async_ready().await;
    let r = gw.enqueue("slow/sleep?ms=1500", None, "").await;
    let id = r.headers()["x-call-id"].to_str().unwrap().to_string();
    let s = gw.call_status(&id).await;
    assert_eq!(s["state"], "queued");
    assert_eq!(s["attempt"], 0);
    assert!(s["started_at"].is_null());
    gw.stop();
    gw.args = vec!["--nats-url".into(), url];
    gw.spawn();
    gw.wait_async_ready().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = gw.call_status(&id).await;
        if s["state"] == "running" {
            assert_eq!(s["attempt"], 1);
            assert!(s["started_at"].is_string());
            break;
        }
        assert_eq!(s["state"], "queued", "{s}");
        assert!(Instant::now() < deadline, "never running: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.call_status(&id).await["state"] != "succeeded" {
        assert!(Instant::now() < deadline, "never succeeded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn idle_function_consumers_are_removed() {
    let nats = TestNats::start();
    let gw = TestGateway::start(&[
        "--nats-url",
        &nats.url.clone(),
        "--inactive-threshold",
        "1s",
    ]);
    let sink = CallbackSink::start().await;
    gw.deploy_ok(fork_fn("brief", "echo hi")).await;
    gw.wait_async_ready().await;
    gw.enqueue("brief", Some(&sink.url), "").await;
    sink.wait_for(1, Duration::from_secs(10)).await;
    let client = async_nats::connect(nats.url.as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let consumers = async || {
        use futures_util::StreamExt;
        let stream = js.get_stream("OF_faas-request").await.unwrap();
        stream
            .consumer_names()
            .filter_map(|n| async { n.ok() })
            .collect::<Vec<String>>()
            .await
    };
    assert_eq!(
        consumers().await,
        ["fn_openfaas-fn_brief"],
        "created on demand"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !consumers().await.is_empty() {
        assert!(Instant::now() < deadline, "idle consumer not removed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And created again for the next call.
    gw.enqueue("brief", Some(&sink.url), "").await;
    sink.wait_for(2, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn the_embedded_nats_server_is_restarted_when_it_dies() {
    let gw = TestGateway::start(&[]);
    let sink = CallbackSink::start().await;
    gw.deploy_ok(fork_fn("e", "echo e")).await;
    gw.wait_async_ready().await;
    gw.enqueue("e", Some(&sink.url), "").await;
    sink.wait_for(1, Duration::from_secs(10)).await;
    let pid_file = gw.data.path().join("nats/nats-server.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = gw.enqueue("e", Some(&sink.url), "").await;
        if r.status() == 202 {
            break;
        }
        assert_eq!(r.status(), 503, "while it restarts: a clear 503");
        assert!(
            Instant::now() < deadline,
            "the embedded server never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sink.wait_for(2, Duration::from_secs(15)).await;
    let new_pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_ne!(new_pid, pid);
}

#[tokio::test]
async fn a_function_can_use_its_own_queue_and_results_are_capped() {
    let nats = TestNats::start();
    let gw = TestGateway::start(&[
        "--nats-url",
        &nats.url.clone(),
        "--async-result-max-bytes",
        "1000",
    ]);
    let sink = CallbackSink::start().await;
    let mut f = http_fn("vip");
    f["annotations"] = json!({"com.openfaas.queue": "priority"});
    gw.deploy_ok(f).await;
    gw.wait_available("vip", 1).await;
    gw.wait_async_ready().await;
    let r = gw.enqueue("vip/big?bytes=5000", Some(&sink.url), "").await;
    let id = r.headers()["x-call-id"].to_str().unwrap().to_string();
    let cb = sink.wait_call(&id, Duration::from_secs(10)).await;
    assert_eq!(
        cb.body.len(),
        5000,
        "the callback carries the whole response"
    );
    let s = gw.call_status(&id).await;
    assert_eq!(s["result"].as_str().unwrap().len(), 1000);
    assert_eq!(s["result_truncated"], true);
    let client = async_nats::connect(nats.url.as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream("OF_priority")
        .await
        .expect("the function's own stream");
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.subjects, ["priority.>"]);
    assert!(
        js.get_stream("OF_faas-request").await.is_err(),
        "nothing went to the default queue"
    );
}
