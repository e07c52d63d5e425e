//! The billing report against sums computed here from the raw events, through the library and
//! through the `report` subcommand; and migrations that are no-ops when re-run.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use billing_receiver::db::{migrate, report};
use chrono::{DateTime, Utc};
use common::{TestPg, TestReceiver, body, event};
use serde_json::Value;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Expected totals per (namespace, function): invocations, billed-ms x bytes (limit, peak).
fn expected(events: &[Value], ns: Option<&str>) -> BTreeMap<(String, String), (i64, u128, u128)> {
    let mut out = BTreeMap::new();
    for e in events {
        let started = e["started"].as_str().expect("started");
        if !started.starts_with("2026-11-22") {
            continue; // outside the reported period
        }
        let namespace = e["namespace"].as_str().expect("ns").to_owned();
        if ns.is_some_and(|n| n != namespace) {
            continue;
        }
        let key = (
            namespace,
            e["function_name"].as_str().expect("fn").to_owned(),
        );
        let ms = e["billed_duration_ms"].as_u64().expect("ms") as u128;
        let limit = e["memory_bytes"].as_u64().expect("mem") as u128;
        let peak = e["memory_peak_bytes"].as_u64().unwrap_or(0) as u128;
        let entry = out.entry(key).or_insert((0, 0, 0));
        entry.0 += 1;
        entry.1 += ms * limit;
        entry.2 += ms * peak;
    }
    out
}

fn gb_s(ms_bytes: u128) -> f64 {
    ms_bytes as f64 / 1000.0 / GIB
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

fn raw_events() -> Vec<Value> {
    let mut events = Vec::new();
    let functions = [
        ("openfaas-fn", "env"),
        ("openfaas-fn", "figlet"),
        ("team-b", "resize"),
    ];
    for i in 0..300_i64 {
        let (ns, f) = functions[(i % 3) as usize];
        // Ten events outside the period (the day before); the rest spread over the day.
        let started = if i < 10 {
            format!("2026-11-21T23:59:59.{:09}Z", i)
        } else {
            format!("2026-11-22T{:02}:{:02}:00.000000001Z", i % 24, i % 60)
        };
        events.push(event(&format!("r-{i}"), ns, f, &started, i * 13));
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_gb_seconds_match_independent_sums() {
    let Some(pg) = TestPg::start() else { return };
    let rx = TestReceiver::start(&pg).await;
    let events = raw_events();
    for chunk in events.chunks(100) {
        assert_eq!(rx.post(body(chunk)).await.0, 200);
    }
    let from: DateTime<Utc> = "2026-11-22T00:00:00Z".parse().expect("from");
    let to: DateTime<Utc> = "2026-11-23T00:00:00Z".parse().expect("to");
    let pool = pg.pool();

    for ns in [None, Some("team-b")] {
        let want = expected(&events, ns);
        let rows = report::query(&pool, from, to, ns).await.expect("report");
        assert_eq!(rows.len(), want.len(), "namespace {ns:?}");
        for row in &rows {
            let key = (row.namespace.clone(), row.function_name.clone());
            let (n, limit, peak) = want[&key];
            assert_eq!(row.invocations, n, "{key:?}");
            assert!(
                close(row.gb_s_limit, gb_s(limit)),
                "{key:?}: {} vs {}",
                row.gb_s_limit,
                gb_s(limit)
            );
            assert!(
                close(row.gb_s_peak, gb_s(peak)),
                "{key:?}: {} vs {}",
                row.gb_s_peak,
                gb_s(peak)
            );
            assert!(row.peak_measured < row.invocations, "some peaks are null");
        }
    }

    // The CLI prints the same totals as an aligned table.
    let out = Command::new(env!("CARGO_BIN_EXE_billing-receiver"))
        .args([
            "report",
            "--database-url",
            &pg.url(),
            "--from",
            "2026-11-22T00:00:00Z",
        ])
        .args(["--to", "2026-11-23T00:00:00Z"])
        .output()
        .expect("run billing-receiver report");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "report failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    let want = expected(&events, None);
    let total_limit: u128 = want.values().map(|v| v.1).sum();
    let total_peak: u128 = want.values().map(|v| v.2).sum();
    let total_line = stdout
        .lines()
        .find(|l| l.starts_with("TOTAL"))
        .expect("TOTAL line");
    let cols: Vec<&str> = total_line.split_whitespace().collect();
    // TOTAL INVOCATIONS DURATION_S BILLED_S GB_S_LIMIT GB_S_PEAK PEAK_MEASURED
    assert_eq!(cols[1], "290");
    assert_eq!(cols[4], format!("{:.6}", gb_s(total_limit)));
    assert_eq!(cols[5], format!("{:.6}", gb_s(total_peak)));
    let header = stdout
        .lines()
        .find(|l| l.starts_with("NAMESPACE"))
        .expect("header");
    assert_eq!(header.len(), total_line.len(), "columns aligned");
    rx.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_rerun_are_noops() {
    let Some(pg) = TestPg::start() else { return };
    let pool = pg.pool();
    let first = migrate::run(&pool).await.expect("first run");
    assert_eq!(first, vec![1, 2]);
    assert!(migrate::run(&pool).await.expect("second run").is_empty());
    // Two receivers starting at once serialise on the advisory lock.
    let (a, b) = tokio::join!(migrate::run(&pool), migrate::run(&pool));
    assert!(a.expect("concurrent a").is_empty() && b.expect("concurrent b").is_empty());
    let out = Command::new(env!("CARGO_BIN_EXE_billing-receiver"))
        .args(["migrate", "--database-url", &pg.url()])
        .output()
        .expect("run billing-receiver migrate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "applied migrations: []"
    );
    let mut conn = pool.get().await.expect("db");
    let n: i64 = conn
        .client()
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 2);
}
