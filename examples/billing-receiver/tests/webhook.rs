//! The webhook contract over real HTTP into a real PostgreSQL: good batches land once,
//! bad signatures, malformed or absurd bodies and oversized bodies are refused with nothing written.

mod common;

use billing_receiver::ServerConfig;
use bytes::Bytes;
use common::{TestPg, TestReceiver, batch, body, count_rows};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_batch_lands_with_every_field() {
    let Some(pg) = TestPg::start() else { return };
    let rx = TestReceiver::start(&pg).await;
    let events = batch("good", 5);
    let (status, reply) = rx.post(body(&events)).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, json!({"inserted": 5, "duplicates": 0}));

    let pool = pg.pool();
    assert_eq!(count_rows(&pool).await, 5);
    let mut conn = pool.get().await.expect("db");
    let row = conn
        .client()
        .query_one(
            "SELECT namespace, function_name, duration_ns, billed_duration_ms, memory_bytes,
                    memory_peak_bytes, cpu_ns, status_code, call_id, source, cold_start,
                    init_duration_ns, delivery_id, to_char(started AT TIME ZONE 'UTC',
                    'YYYY-MM-DD\"T\"HH24:MI:SS.US')
             FROM function_usage WHERE id = 'good-1'",
            &[],
        )
        .await
        .expect("row good-1");
    let e = &events[1];
    assert_eq!(row.get::<_, String>(0), "openfaas-fn");
    assert_eq!(row.get::<_, String>(1), "env");
    assert_eq!(row.get::<_, i64>(2), e["duration"].as_i64().expect("int"));
    assert_eq!(
        row.get::<_, i64>(3),
        e["billed_duration_ms"].as_i64().expect("int")
    );
    assert_eq!(
        row.get::<_, i64>(4),
        e["memory_bytes"].as_i64().expect("int")
    );
    assert_eq!(
        row.get::<_, Option<i64>>(5),
        e["memory_peak_bytes"].as_i64()
    );
    assert_eq!(row.get::<_, Option<i64>>(6), None);
    assert_eq!(row.get::<_, Option<i32>>(7), Some(200));
    assert_eq!(
        row.get::<_, Option<String>>(8).as_deref(),
        Some("call-good-1")
    );
    assert_eq!(row.get::<_, String>(9), "kernel");
    assert!(!row.get::<_, bool>(10));
    assert_eq!(row.get::<_, Option<i64>>(11), None);
    assert!(
        row.get::<_, Option<String>>(12)
            .is_some_and(|d| d.len() == 36),
        "delivery id stored"
    );
    // PostgreSQL keeps microseconds; the nanoseconds beyond are truncated.
    assert_eq!(row.get::<_, String>(13), "2026-11-22T10:00:00.123456");
    // Empty batches are fine and write nothing.
    assert_eq!(rx.post(Bytes::from_static(b"[]")).await.0, 200);
    assert_eq!(count_rows(&pool).await, 5);
    rx.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_signature_is_401_and_writes_nothing() {
    let Some(pg) = TestPg::start() else { return };
    let rx = TestReceiver::start(&pg).await;
    let b = body(&batch("sig", 3));
    let wrong = billing_receiver::signature::Secret::from_file_bytes(b"not-the-secret").sign(&b);
    let cases: [(&str, Option<Option<String>>); 5] = [
        ("missing", Some(None)),
        ("wrong secret", Some(Some(wrong))),
        ("not sha256=", Some(Some("md5=abcd".into()))),
        ("not hex", Some(Some("sha256=xyz".into()))),
        (
            "signature of another body",
            Some(Some(rx.secret.sign(b"[]"))),
        ),
    ];
    for (what, sig) in cases {
        let (status, reply) = rx.post_signed(b.clone(), sig).await;
        assert_eq!(status, 401, "{what}: {reply}");
        let msg = reply["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains("X-Openfaas-Signature-256"),
            "{what}: clear message, got {msg:?}"
        );
    }
    assert_eq!(count_rows(&pg.pool()).await, 0);
    rx.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_absurd_batches_are_400_and_write_nothing() {
    let Some(pg) = TestPg::start() else { return };
    let rx = TestReceiver::start(&pg).await;
    let with = |field: &str, value: serde_json::Value| {
        let mut events = batch("bad", 3);
        events[2][field] = value;
        body(&events)
    };
    let without = |field: &str| {
        let mut events = batch("bad", 3);
        events[2].as_object_mut().expect("object").remove(field);
        body(&events)
    };
    let cases: Vec<(&str, Bytes, &str)> = vec![
        (
            "not json",
            Bytes::from_static(b"[{\"event\":"),
            "not valid JSON",
        ),
        (
            "object, not array",
            Bytes::from_static(b"{\"event\":\"function_usage\"}"),
            "JSON array",
        ),
        (
            "array of numbers",
            Bytes::from_static(b"[1,2]"),
            "event[0] must be a JSON object",
        ),
        ("missing id", without("id"), "event[2].id: missing"),
        (
            "missing started",
            without("started"),
            "event[2].started: missing",
        ),
        (
            "duration as string",
            with("duration", json!("1ms")),
            "event[2].duration: expected an integer",
        ),
        (
            "memory as float",
            with("memory_bytes", json!(1.5)),
            "event[2].memory_bytes: expected an integer",
        ),
        (
            "negative duration",
            with("duration", json!(-1)),
            "event[2].duration",
        ),
        (
            "duration over 7 days",
            with("duration", json!(604_800_000_000_001_i64)),
            "event[2].duration",
        ),
        (
            "overflowing duration",
            with("duration", json!(u64::MAX)),
            "event[2].duration",
        ),
        (
            "negative memory",
            with("memory_bytes", json!(-134_217_728)),
            "event[2].memory_bytes",
        ),
        (
            "negative peak",
            with("memory_peak_bytes", json!(-1)),
            "event[2].memory_peak_bytes",
        ),
        (
            "unparsable started",
            with("started", json!("22/11/2026 10:00")),
            "event[2].started: not RFC3339",
        ),
    ];
    for (what, b, expect) in cases {
        let (status, reply) = rx.post(b).await;
        assert_eq!(status, 400, "{what}: {reply}");
        let msg = reply["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(expect),
            "{what}: expected {expect:?} in {msg:?}"
        );
    }
    // Whole-batch policy: the two valid events of each refused batch were not written either.
    assert_eq!(count_rows(&pg.pool()).await, 0);
    rx.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_batch_is_billed_once() {
    let Some(pg) = TestPg::start() else { return };
    let rx = TestReceiver::start(&pg).await;
    let events = batch("dup", 50);
    assert_eq!(
        rx.post(body(&events)).await.1,
        json!({"inserted": 50, "duplicates": 0})
    );
    assert_eq!(
        rx.post(body(&events)).await.1,
        json!({"inserted": 0, "duplicates": 50})
    );
    // An overlapping batch (half old, half new) plus an id repeated inside the same batch.
    let mut overlap: Vec<_> = events[25..].to_vec();
    overlap.extend(batch("dup2", 25));
    overlap.push(overlap[0].clone());
    assert_eq!(
        rx.post(body(&overlap)).await.1,
        json!({"inserted": 25, "duplicates": 26})
    );
    assert_eq!(count_rows(&pg.pool()).await, 75);
    rx.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_413_and_writes_nothing() {
    let Some(pg) = TestPg::start() else { return };
    let config = ServerConfig {
        max_body_bytes: 64 * 1024,
        ..Default::default()
    };
    let rx = TestReceiver::start_with(&pg, config).await;
    let big = body(&batch("big", 400));
    assert!(big.len() > 64 * 1024, "test batch is {} bytes", big.len());
    let (status, reply) = rx.post(big).await;
    assert_eq!(status, 413, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("65536-byte limit")
    );
    // Chunked (no Content-Length): the limit applies to the bytes actually read.
    let raw = chunked_post(rx.addr, &body(&batch("chunked", 400))).await;
    assert!(
        raw.starts_with("HTTP/1.1 413"),
        "chunked oversized body: {raw}"
    );
    // Just under the limit is fine.
    let small = body(&batch("small", 100));
    assert!(small.len() < 64 * 1024);
    assert_eq!(rx.post(small).await.0, 200);
    assert_eq!(count_rows(&pg.pool()).await, 100);
    rx.shutdown().await;
}

/// Sends `body` with `Transfer-Encoding: chunked` over a raw socket; returns the raw response.
async fn chunked_post(addr: std::net::SocketAddr, body: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = "POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                transfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    s.write_all(head.as_bytes()).await.expect("write head");
    for chunk in body.chunks(8 * 1024) {
        let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
        frame.extend_from_slice(chunk);
        frame.extend_from_slice(b"\r\n");
        if s.write_all(&frame).await.is_err() {
            break; // the server may answer and close before reading everything
        }
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}
