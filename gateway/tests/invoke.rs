//! Sync invocations over real HTTP: fork-mode watchdog semantics, http-mode proxying,
//! headers, timeouts, limits and streaming.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};

#[tokio::test]
async fn fork_mode_is_the_classic_watchdog() {
    let gw = TestGateway::start(&[]);
    gw.deploy_ok(fork_fn("echo", r#"printf "%s|%s|%s|%s|" "$Http_Method" "$Http_Path" "$Http_Query" "$Http_X_Call_Id"; cat; echo "|$(id -u)""#)).await;
    gw.deploy_ok(fork_fn("fails", "echo bad >&2; exit 3")).await;
    let mut slow = fork_fn("slow", "sleep 5; echo late");
    slow["envVars"] = json!({"exec_timeout": "300ms"});
    gw.deploy_ok(slow).await;

    let r = gw
        .http
        .post(gw.url("/function/echo/sub/path?a=1&b=2"))
        .header("X-Call-Id", "call-123")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-call-id"], "call-123");
    assert!(
        r.headers()["x-start-time"]
            .to_str()
            .unwrap()
            .parse::<u128>()
            .unwrap()
            > 1_600_000_000_000_000_000
    );
    assert!(
        r.headers()["x-duration-seconds"]
            .to_str()
            .unwrap()
            .parse::<f64>()
            .unwrap()
            > 0.0
    );
    let text = r.text().await.unwrap();
    let uid: u32 = text.rsplit('|').next().unwrap().trim().parse().unwrap();
    assert_eq!(
        text.rsplit_once('|').unwrap().0,
        "POST|/sub/path|a=1&b=2|call-123|payload"
    );
    if is_root() {
        assert_ne!(uid, 0, "function processes never run as root");
    }

    let r = gw.invoke("fails").await;
    assert_eq!(r.status(), 500);
    assert!(r.text().await.unwrap().contains("exit status: 3"));

    let t = Instant::now();
    let r = gw.invoke("slow").await;
    assert_eq!(r.status(), 408);
    assert!(r.text().await.unwrap().contains("exec_timeout"));
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "killed at the exec_timeout, not after the sleep"
    );
    // The killed process group is gone: nothing sleeps in the replica's cgroup.
    let replicas = gw.replicas().await;
    let slow_replica = replicas["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["function"] == "slow")
        .unwrap();
    assert_eq!(slow_replica["pids"], json!([]), "{slow_replica}");
    let logs = gw
        .get_sys("/system/logs?name=fails")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        logs.lines()
            .any(|l| serde_json::from_str::<Value>(l).unwrap()["text"] == "bad"),
        "{logs}"
    );
}

#[tokio::test]
async fn http_mode_proxies_with_headers() {
    let gw = TestGateway::start(&[]);
    gw.deploy_ok(http_fn("web")).await;
    gw.wait_available("web", 1).await;
    let r = gw
        .http
        .put(gw.url("/function/web/items/7?x=y"))
        .header("X-Custom", "v")
        .body("data")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let call_id = r.headers()["x-call-id"].to_str().unwrap().to_string();
    assert_eq!(call_id.len(), 36, "a UUID is generated");
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["method"], "PUT");
    assert_eq!(seen["path"], "/items/7?x=y");
    assert_eq!(seen["body"], "data");
    assert_eq!(seen["headers"]["x-custom"], "v");
    assert_eq!(seen["headers"]["x-call-id"], call_id.as_str());
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1");
    assert!(
        seen["headers"]["x-forwarded-host"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(seen["headers"].get("x-start-time").is_some());
    if is_root() {
        assert_ne!(seen["uid"], 0);
    }
    let r = gw.invoke("web/status?code=418").await;
    assert_eq!(r.status(), 418, "the function's status passes through");
    let r = gw.invoke("web/big?bytes=10485760").await;
    assert_eq!(r.bytes().await.unwrap().len(), 10 << 20);
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "gateway_function_invocation_total{code=\"418\",function_name=\"web.openfaas-fn\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn streaming_responses_are_not_buffered() {
    let gw = TestGateway::start(&[]);
    gw.deploy_ok(http_fn("sse")).await;
    gw.wait_available("sse", 1).await;
    let t = Instant::now();
    let r = gw.invoke("sse/stream?n=5&ms=300").await;
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    let first_at = t.elapsed();
    assert!(String::from_utf8_lossy(&first).starts_with("data: 0"));
    let mut rest = 0;
    while let Some(chunk) = stream.next().await {
        rest += chunk.unwrap().len();
    }
    assert!(rest > 0);
    assert!(
        first_at < Duration::from_millis(900),
        "first event after {first_at:?}: buffered"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(1200),
        "the stream took its time"
    );
}

#[tokio::test]
async fn max_inflight_answers_429() {
    let gw = TestGateway::start(&[]);
    let mut f = http_fn("busy");
    f["envVars"]["max_inflight"] = json!("2");
    gw.deploy_ok(f).await;
    gw.wait_available("busy", 1).await;
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let (http, url) = (gw.http.clone(), gw.url("/function/busy/sleep?ms=800"));
            tokio::spawn(async move { http.get(url).send().await.unwrap().status() })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = gw.invoke("busy").await;
    assert_eq!(r.status(), 429);
    assert_eq!(
        r.text().await.unwrap(),
        "Concurrent request limit exceeded. Max concurrent requests: 2\n"
    );
    for s in slow {
        assert_eq!(s.await.unwrap(), 200);
    }
    assert_eq!(gw.invoke("busy").await.status(), 200, "slots free again");
}

#[tokio::test]
async fn upstream_timeout_is_a_502_that_says_so() {
    let gw = TestGateway::start(&["--upstream-timeout", "500ms"]);
    gw.deploy_ok(http_fn("late")).await;
    gw.wait_available("late", 1).await;
    let r = gw.invoke("late/sleep?ms=3000").await;
    assert_eq!(r.status(), 502);
    assert!(r.text().await.unwrap().contains("upstream_timeout"));
    let mut f = http_fn("late2");
    f["envVars"]["exec_timeout"] = json!("200ms");
    gw.deploy_ok(f).await;
    gw.wait_available("late2", 1).await;
    let r = gw.invoke("late2/sleep?ms=3000").await;
    assert_eq!(
        r.status(),
        504,
        "http mode's exec_timeout is a 504, as in of-watchdog"
    );
    assert!(r.text().await.unwrap().contains("exec_timeout"));
}

#[tokio::test]
async fn slow_clients_hit_the_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = TestGateway::start(&["--read-timeout", "500ms"]);
    gw.deploy_ok(fork_fn("cat", "cat")).await;
    let addr = gw.url.trim_start_matches("http://").to_string();
    // Headers never finished: the connection is closed.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"POST /function/cat HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let t = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("closed");
    assert!(t.elapsed() < Duration::from_secs(3));
    // Body promised but stalled: 408.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"POST /function/cat HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("read_timeout"), "{text}");
}
