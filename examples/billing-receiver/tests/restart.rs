//! PostgreSQL restarted mid-run: the receiver answers 503 while it is down (so the sender
//! retries), reconnects by itself afterwards, and nothing is lost or billed twice.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{TestPg, TestReceiver, batch, body, count_rows};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_gives_503_then_recovers_without_loss_or_doubles() {
    let Some(pg) = TestPg::start() else { return };
    let rx = Arc::new(TestReceiver::start(&pg).await);
    assert_eq!(rx.post(body(&batch("before", 100))).await.0, 200);

    // Down: an explicit delivery is refused with 503 quickly, and nothing is half-written.
    pg.stop_server();
    let t = Instant::now();
    let (status, reply) = rx.post(body(&batch("during", 100))).await;
    assert_eq!(status, 503, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("retry later")
    );
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "503 took {:?}",
        t.elapsed()
    );
    pg.start_server();
    // Back up: the same delivery (the sender retries it) succeeds on a fresh connection.
    let (status, reply) = rx.post(body(&batch("during", 100))).await;
    assert_eq!(
        (status, reply),
        (200, json!({"inserted": 100, "duplicates": 0}))
    );

    // Mid-run: a sender posting 40 batches, each retried until 200 like the event-worker,
    // while PostgreSQL is restarted under it.
    let unavailable = Arc::new(AtomicUsize::new(0));
    let sender = {
        let rx = Arc::clone(&rx);
        let unavailable = Arc::clone(&unavailable);
        tokio::spawn(async move {
            for b in 0..40 {
                let payload = body(&batch(&format!("run-{b}"), 50));
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    let (status, reply) = rx.post(payload.clone()).await;
                    match status {
                        200 => break,
                        503 => {
                            unavailable.fetch_add(1, Ordering::Relaxed);
                            assert!(Instant::now() < deadline, "batch {b} never accepted");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        other => panic!("batch {b}: unexpected {other}: {reply}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    pg.stop_server();
    tokio::time::sleep(Duration::from_millis(700)).await;
    pg.start_server();
    tokio::time::timeout(Duration::from_secs(40), sender)
        .await
        .expect("sender finishes")
        .expect("sender did not panic");
    assert!(
        unavailable.load(Ordering::Relaxed) > 0,
        "the restart was seen as 503s"
    );

    // Everything exactly once, including a late redelivery of the first batch.
    assert_eq!(
        rx.post(body(&batch("before", 100))).await.1["duplicates"],
        100
    );
    assert_eq!(count_rows(&pg.pool()).await, 100 + 100 + 40 * 50);
    match Arc::try_unwrap(rx) {
        Ok(rx) => rx.shutdown().await,
        Err(_) => panic!("receiver still shared"),
    }
}
