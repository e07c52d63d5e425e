//! The agent's user-space work per invocation, alone: a kernel record joined into a usage
//! event, the event encoded into a batch body, the batch dropped on another thread (as the
//! forwarder does). `cargo run --release -p agent --example event_path`: ns per event, the
//! minimum and median of 15 rounds of 200,000 events (BENCHMARKS.md, the agent section).
use std::{sync::Arc, time::Instant};

use agent::join::{Joiner, ReplicaInfo};
use agent_common::HttpRecord;

fn main() {
    let mut j = Joiner::new(1_700_000_000_000_000_000);
    j.watch(
        42,
        ReplicaInfo {
            namespace: Arc::from("openfaas-fn"),
            function: Arc::from("tiny"),
            replica: Arc::from("tiny-7f9c2"),
            memory_limit_bytes: Some(128 << 20),
        },
    );
    // SAFETY: plain old data.
    let mut r: Box<HttpRecord> = Box::new(unsafe { std::mem::zeroed() });
    let head = b"GET / HTTP/1.1\r\nhost: 127.0.0.1:40123\r\nuser-agent: wrk\r\naccept-encoding: gzip\r\nx-forwarded-for: 127.0.0.1:53412\r\nx-forwarded-host: 127.0.0.1:8080\r\nx-call-id: 5b0c7d2e-1f3a-4c5d-9e8f-0a1b2c3d4e5f\r\nx-start-time: 1700000000123456789\r\n\r\n";
    r.head[..head.len()].copy_from_slice(head);
    r.head_len = head.len() as u32;
    r.cgroup_id = 42;
    r.status = 200;
    r.peak_rss_bytes = 3 << 20;
    let reps = 15;
    let batches = 400;
    let mut per = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        for b in 0..batches {
            let mut v = Vec::with_capacity(500);
            for i in 0..500u64 {
                r.request_ns = 1_000_000 * b + i * 1000;
                r.end_ns = r.request_ns + 50_000;
                v.push(j.http(&r).unwrap());
            }
            let body = agent_common::wire::encode_each(v.iter().map(|e| e.wire())).unwrap();
            std::hint::black_box(&body);
            // Dropped on another thread, as the forwarder does.
            std::thread::spawn(move || drop(v)).join().unwrap();
        }
        per.push(t.elapsed().as_nanos() as f64 / (batches * 500) as f64);
    }
    per.sort_by(f64::total_cmp);
    println!("ns/event: min {:.1} median {:.1}", per[0], per[reps / 2]);
}
