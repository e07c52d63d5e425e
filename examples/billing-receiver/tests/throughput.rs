//! Throughput check: signed batches of 500 from 4 concurrent senders into the receiver and a
//! real PostgreSQL; prints committed events/s (debug build here; see README for release).

mod common;

use billing_receiver::bench::{self, BenchConfig};
use common::{TestPg, TestReceiver, count_rows};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_batches_of_500() {
    let Some(pg) = TestPg::start() else { return };
    let rx = TestReceiver::start(&pg).await;
    let config = BenchConfig {
        url: rx.url(),
        events: 20_000,
        batch: 500,
        concurrency: 4,
    };
    let result = bench::run(&config, &rx.secret)
        .await
        .expect("all batches accepted");
    println!(
        "throughput: {} events in batches of {} ({} senders): {:.2} s, {:.0} events/s committed",
        result.events,
        config.batch,
        config.concurrency,
        result.elapsed.as_secs_f64(),
        result.events_per_sec()
    );
    assert_eq!(count_rows(&pg.pool()).await, 20_000);
    rx.shutdown().await;
}
