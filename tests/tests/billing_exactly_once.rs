//! Exactly-once billing through every fault of the metering pipeline (issue #5).
//!
//! A serving gateway (`--event-worker false`) meters 100,000 sync invocations of a tiny
//! http-mode function into an external `nats-server -js`; a second gateway process runs
//! only the event-worker and POSTs signed batches through a fault proxy to the real
//! `billing-receiver`, which bills them in a real PostgreSQL. While the load runs, each
//! fault is injected once: the event-worker killed with `kill -9`, the receiver down for
//! 60 s, NATS restarted (same store), the serving gateway killed with `kill -9` and
//! restarted, PostgreSQL crashed and restarted while batches are being inserted, the
//! receiver answering 500, answering 400 (parked, re-queued through the API once fixed),
//! hanging until the webhook timeout, and a wrong secret (401, parked, re-queued after the
//! fix); absurd usage events are posted to `POST /system/usage` as well.
//!
//! What exactly-once means here, per attempt the clients made (each with a fresh call id):
//! a 200 with the whole body read is a served invocation and has exactly one row; an
//! attempt whose connection was refused never reached the gateway and has none; an attempt
//! that broke mid-flight (the gateway was killed under it) or got another status may or may
//! not have run, and has at most one. So `function_usage` holds exactly 100,000 rows for
//! the served calls plus the (counted, printed) rows of mid-flight attempts the gateway did
//! complete, no call id twice, no row for anything else — and the GB-s of
//! `billing-receiver report` equals the sum recomputed in integers from the raw events the
//! receiver was sent.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tally_e2e::billing::{self, Nats, Postgres, Receiver, UsageRow};
use tally_e2e::faults::{Exchange, FaultProxy, Mode};
use tally_e2e::load::{Attempt, Load, Outcome};
use tally_e2e::stack::{Gateway, can_meter, client, sum_metric};

const TEST: &str = "billing_exactly_once";
const INVOCATIONS: usize = 100_000;
/// Paced so that the load outlasts the fault schedule (about 2 minutes).
const PER_SECOND: f64 = 850.0;
const CLIENTS: usize = 8;
const RECEIVER_OUTAGE: Duration = Duration::from_secs(60);
const WEBHOOK_TIMEOUT_S: u64 = 5;
const FUNCTION: &str = "bill-fn";

#[test]
fn every_invocation_is_billed_exactly_once_through_every_fault() {
    if !can_meter(TEST) || !billing::can_bill(TEST) {
        return;
    }
    let built = Instant::now();
    let bin = billing::build();
    tally_e2e::stack::binaries();
    eprintln!(
        "[build] binaries ready in {:.1}s",
        built.elapsed().as_secs_f64()
    );
    let t0 = Instant::now();
    let work = tempfile::Builder::new()
        .prefix("tally-e2e-billing-")
        .tempdir()
        .expect("temp dir");
    let good_secret = work.path().join("webhook-secret");
    let wrong_secret = work.path().join("wrong-secret");
    std::fs::write(&good_secret, "e2e-billing-secret-0123456789\n").expect("secret");
    std::fs::write(&wrong_secret, "not-the-secret\n").expect("wrong secret");

    let pg = Postgres::start();
    let mut receiver = Receiver::start(&pg.url(), &good_secret, &work.path().join("receiver.log"));
    let proxy = FaultProxy::start(&receiver.addr()).expect("start the fault proxy");
    let mut nats = Nats::start();
    let args = |more: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "--nats-url",
            &nats.url(),
            "--webhook-endpoint",
            &proxy.url,
            "--autoscaler",
            "off",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(more.iter().map(|s| s.to_string()));
        a
    };
    let mut serving = Gateway::start_with("bill", &args(&["--event-worker", "false"]));
    let functions = serving.data.path().join("functions");
    std::fs::copy(bin.join("hello-rust"), functions.join("hello-rust")).expect("copy function");
    serving.deploy(json!({"service": FUNCTION, "image": "tally/hello-rust:e2e",
        "envProcess": "./hello-rust", "envVars": {"mode": "http"}}));
    wait_available(&serving, FUNCTION);
    let secret_arg = good_secret.display().to_string();
    let timeout_arg = format!("{WEBHOOK_TIMEOUT_S}s");
    let mut worker = Gateway::start_with(
        "bill-ew",
        &args(&[
            "--event-worker",
            "true",
            "--queue-worker",
            "false",
            "--webhook-secret-file",
            &secret_arg,
            "--webhook-timeout",
            &timeout_arg,
            "--webhook-max-backoff",
            "3s",
        ]),
    );
    eprintln!(
        "[setup {:.1}s] postgres :{}, receiver {}, proxy {}, nats {}, serving gateway {}, event-worker {}",
        t0.elapsed().as_secs_f64(),
        pg.port,
        receiver.addr(),
        proxy.url,
        nats.url(),
        serving.url,
        worker.url
    );

    // ---- the load, and every fault once while it runs ----
    let load_clock = Instant::now();
    let load = Load::start(
        &format!("{}/function/{FUNCTION}", serving.url),
        INVOCATIONS,
        PER_SECOND,
        CLIENTS,
    );
    let step = |what: &str| {
        eprintln!(
            "[{:6.1}s] {what} | {}",
            load.elapsed().as_secs_f64(),
            load.progress()
        )
    };

    wait_until(&load, Duration::from_secs(2));
    step("absurd usage events → POST /system/usage");
    let absurd_ids = post_absurd_events(&serving);

    wait_until(&load, Duration::from_secs(4));
    assert!(
        proxy.wait_for(1, Duration::ZERO, Duration::from_secs(30), |e| is_2xx(
            e.status
        )),
        "no batch reached the receiver before the faults"
    );
    step("event-worker: kill -9, restarted at once");
    worker.crash();
    worker.spawn();

    wait_until(&load, Duration::from_secs(8));
    step("receiver: down for 60 s");
    receiver.stop();
    let receiver_down = Instant::now();

    wait_until(&load, Duration::from_secs(16));
    step("NATS: restarted with the same store (down 2 s)");
    nats.restart(Duration::from_secs(2));
    step("NATS: back");

    wait_until(&load, Duration::from_secs(28));
    step("serving gateway: kill -9, restarted");
    let gateway_killed = load.elapsed();
    serving.crash();
    serving.spawn();
    let gateway_back = load.elapsed();
    step("serving gateway: back");

    while receiver_down.elapsed() < RECEIVER_OUTAGE {
        assert!(!load.done(), "the load ended before the receiver came back");
        progress_sleep(&load, RECEIVER_OUTAGE - receiver_down.elapsed());
    }
    let since = proxy.now();
    receiver.spawn(&good_secret);
    step("receiver: back");
    assert!(
        proxy.wait_for(1, since, Duration::from_secs(30), |e| is_2xx(e.status)),
        "no batch delivered within 30 s of the receiver coming back"
    );

    step("PostgreSQL: crashed (immediate stop) while the backlog is being inserted");
    let since = proxy.now();
    pg.crash_server();
    std::thread::sleep(Duration::from_secs(2));
    pg.start_server();
    step("PostgreSQL: back");
    assert!(
        proxy.wait_for(1, since, Duration::from_secs(15), |e| e.mode == Mode::Pass
            && !is_2xx(e.status)),
        "no batch failed while PostgreSQL was down: the restart was not mid-batch"
    );

    step("receiver answers 500");
    let since = proxy.now();
    proxy.set_mode(Mode::Status(500));
    let got = proxy.wait_for(3, since, Duration::from_secs(30), |e| e.status == 500);
    proxy.set_mode(Mode::Pass);
    assert!(
        got,
        "the event-worker did not retry through three 500s within 30 s"
    );

    step("receiver answers 400 (batch parked)");
    let since = proxy.now();
    proxy.set_mode(Mode::Status(400));
    let got = proxy.wait_for(1, since, Duration::from_secs(30), |e| e.status == 400);
    proxy.set_mode(Mode::Pass);
    assert!(got, "no batch answered 400 within 30 s");
    requeue_parked(&serving, 400);

    step("receiver hangs (no answer until the webhook timeout)");
    let since = proxy.now();
    proxy.set_mode(Mode::Hang);
    let got = proxy.wait_for(1, since, Duration::from_secs(30), |e| e.hung_for.is_some());
    proxy.set_mode(Mode::Pass);
    assert!(got, "no hung delivery was given up within 30 s");
    let hung = proxy
        .exchanges()
        .iter()
        .filter(|e| e.at >= since)
        .find_map(|e| e.hung_for)
        .unwrap_or_default();
    eprintln!("  the event-worker gave up a hung delivery after {hung:?}");
    assert!(
        hung >= Duration::from_secs(WEBHOOK_TIMEOUT_S) - Duration::from_millis(500),
        "the hung delivery was given up after {hung:?}, before the webhook timeout"
    );

    step("wrong secret: receiver restarted with another key (401, parked)");
    receiver.stop();
    let since = proxy.now();
    receiver.spawn(&wrong_secret);
    let got = proxy.wait_for(1, since, Duration::from_secs(30), |e| e.status == 401);
    receiver.stop();
    receiver.spawn(&good_secret);
    assert!(got, "no batch answered 401 within 30 s");
    requeue_parked(&serving, 401);
    step("every fault injected; waiting for the load to finish");
    assert!(
        !load.done(),
        "the load finished before the last fault: it must run under every fault"
    );

    let ledger = load.finish(Duration::from_secs(120));
    eprintln!(
        "[{:6.1}s] load finished ({:.1}s since the setup began)",
        load_clock.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );

    // ---- everything delivered: nothing buffered, queued, unacked or parked ----
    wait_drained(&serving, &nats, &pg);
    eprintln!(
        "pipeline drained ({:.1}s since the setup began)",
        t0.elapsed().as_secs_f64()
    );

    // ---- the verdict ----
    assert_eq!(
        metering_stage(&serving, "dropped"),
        0.0,
        "the serving gateway dropped usage events (buffer full)"
    );
    let rows = billing::usage_rows(&pg);
    let exchanges = proxy.exchanges();
    print_delivery_summary(&exchanges, &worker);
    check_rows_against_calls(&ledger, &rows, &absurd_ids, gateway_killed, gateway_back);
    let raw = raw_events(&exchanges);
    check_rows_against_raw_events(&rows, &raw);
    check_report(&pg, &rows, &raw);
    eprintln!(
        "PASS: {} rows for {INVOCATIONS} served invocations; {:.1}s from setup to verdict",
        rows.len(),
        t0.elapsed().as_secs_f64()
    );
}

fn is_2xx(status: u16) -> bool {
    (200..300).contains(&status)
}

/// Sleeps until the load has run for `at`, printing progress every 10 s.
fn wait_until(load: &Load, at: Duration) {
    while load.elapsed() < at {
        progress_sleep(load, at - load.elapsed());
    }
}

fn progress_sleep(load: &Load, left: Duration) {
    let nap = left.min(Duration::from_secs(10));
    std::thread::sleep(nap);
    if nap == Duration::from_secs(10) {
        eprintln!("  {}", load.progress());
    }
}

/// Waits until the function has a ready replica (without invoking it: every invocation
/// of this test is in the ledger).
fn wait_available(gw: &Gateway, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = gw.system("GET", &format!("/system/function/{name}"), None);
        if status == 200 && body["availableReplicas"].as_u64().unwrap_or(0) >= 1 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} has no ready replica after 60 s: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn metric(gw: &Gateway, name: &str) -> f64 {
    let mut r = client()
        .get(&format!("{}/metrics", gw.url))
        .call()
        .expect("GET /metrics");
    sum_metric(&r.body_mut().read_to_string().unwrap_or_default(), name)
}

fn metering_stage(gw: &Gateway, stage: &str) -> f64 {
    let mut r = client()
        .get(&format!("{}/metrics", gw.url))
        .call()
        .expect("GET /metrics");
    let text = r.body_mut().read_to_string().unwrap_or_default();
    let needle = format!("stage=\"{stage}\"");
    text.lines()
        .filter(|l| l.starts_with("gateway_metering_events_total{") && l.contains(&needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Posts absurd usage events to `POST /system/usage`, each in its own batch: a negative,
/// overflowing, non-integer or missing duration, one past 7 days, and a garbage start
/// time. Each must be refused — the whole batch with a 4xx, or (the gateway checks event
/// by event) a 200 with nothing accepted and the event in `rejected`, counted in
/// `gateway_usage_events_rejected_total`. Bodies that are not a JSON array get a 4xx.
/// Returns the call ids used (none may ever be billed).
fn post_absurd_events(gw: &Gateway) -> HashSet<String> {
    let event = |call: &str, duration: &str, started: &str| {
        format!(
            r#"{{"call_id":"{call}","namespace":"openfaas-fn","function_name":"{FUNCTION}","started":"{started}","duration_ns":{duration},"status_code":200,"memory_peak_bytes":1048576,"source":"kernel"}}"#
        )
    };
    let ok_time = "2026-11-22T10:00:00.000000001Z";
    let post = |body: String| -> (u16, Value) {
        let mut r = client()
            .post(&format!("{}/system/usage", gw.url))
            .header("Authorization", &gw.auth)
            .header("Content-Type", "application/json")
            .send(body)
            .expect("POST /system/usage");
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    };
    let max_plus_one = (7 * 24 * 3600 * 1_000_000_000u64 + 1).to_string();
    let absurd = [
        ("-1", ok_time),
        ("-9223372036854775808", ok_time),
        ("18446744073709551616", ok_time),
        ("1e30", ok_time),
        ("1.5", ok_time),
        ("\"garbage\"", ok_time),
        ("null", ok_time),
        ("18446744073709551615", ok_time),
        (max_plus_one.as_str(), ok_time),
        ("1000", "yesterday"),
    ];
    let rejected_before = metric(gw, "gateway_usage_events_rejected_total");
    let (mut refused_4xx, mut rejected) = (0, 0);
    let mut ids = HashSet::new();
    for (i, (duration, started)) in absurd.iter().enumerate() {
        let call = format!("absurd-{i}");
        let (status, body) = post(format!("[{}]", event(&call, duration, started)));
        ids.insert(call);
        let what = format!("duration_ns {duration}, started {started:?}");
        match status {
            400..=499 => refused_4xx += 1,
            200 => {
                assert_eq!(body["accepted"], 0, "{what} was accepted: {body}");
                assert_eq!(
                    body["rejected"].as_array().map_or(0, Vec::len),
                    1,
                    "{what} is not in `rejected`: {body}"
                );
                rejected += 1;
            }
            _ => {
                panic!("{what}: expected a 4xx or a 200 with a rejected entry, got {status} {body}")
            }
        }
    }
    for garbage in ["not json", "{\"duration_ns\": 1}", "[1, 2"] {
        let (status, body) = post(garbage.to_string());
        assert!(
            (400..500).contains(&status),
            "body {garbage:?}: expected a 4xx, got {status} {body}"
        );
    }
    let counted = metric(gw, "gateway_usage_events_rejected_total") - rejected_before;
    assert_eq!(
        counted, rejected as f64,
        "gateway_usage_events_rejected_total counts each rejected event"
    );
    eprintln!(
        "  absurd events: {} posted, {rejected} rejected entry by entry and counted, {refused_4xx} \
         refused with a 4xx (batch as a whole); 3 bodies that are not an array of events: 4xx",
        absurd.len()
    );
    ids
}

/// Waits until batches refused with `status` are parked, then re-queues them through the
/// gateway's API (the fault is cleared by now).
fn requeue_parked(gw: &Gateway, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, parked) = gw.system("GET", "/system/metering/parked", None);
        let mine = parked
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["status"] == status)
            .count();
        if code == 200 && mine > 0 {
            eprintln!("  {mine} batch(es) parked with status {status}: {parked}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no batch parked with status {status} after 20 s: {code} {parked}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, body) = gw.system("POST", "/system/metering/parked/requeue", None);
    assert_eq!(code, 202, "requeue: {body}");
    let n = body["requeued"].as_u64().unwrap_or(0);
    assert!(n >= 1, "requeue moved nothing: {body}");
    eprintln!("  re-queued {n} parked batch(es)");
}

/// Waits until the serving gateway has flushed what it produced (`flushed` also counts
/// events replayed from its spool after the crash, so it may exceed `produced`), the usage
/// stream is empty and fully acked, nothing is parked, and the row count is stable.
fn wait_drained(serving: &Gateway, nats: &Nats, pg: &Postgres) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut stable = 0;
    let mut last_rows = None;
    let mut last_print = Instant::now();
    loop {
        let produced = metering_stage(serving, "produced");
        let flushed = metering_stage(serving, "flushed");
        let usage = nats.stream_state("TALLY_USAGE");
        let parked = nats.stream_state("TALLY_USAGE_PARKED");
        let rows = billing::row_count(pg);
        let quiet = flushed >= produced
            && usage == Some((0, 0))
            && parked.is_none_or(|(m, _)| m == 0)
            && rows.is_some();
        stable = if quiet && rows == last_rows {
            stable + 1
        } else {
            0
        };
        if stable >= 3 {
            eprintln!(
                "  drained: serving gateway produced {produced}, flushed {flushed} since its restart \
                 ({} replayed from its spool); rows {rows:?}",
                flushed - produced
            );
            return;
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "  draining: serving gateway produced {produced} flushed {flushed} (since its restart); \
                 TALLY_USAGE (stored, unacked) {usage:?}; parked {parked:?}; rows {rows:?}"
            );
            last_print = Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "the pipeline did not drain within 120 s: produced {produced} flushed {flushed}, \
             TALLY_USAGE {usage:?}, parked {parked:?}, rows {rows:?}"
        );
        last_rows = rows;
        std::thread::sleep(Duration::from_millis(700));
    }
}

fn print_delivery_summary(exchanges: &[Exchange], worker: &Gateway) {
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for e in exchanges {
        *by_status.entry(e.status).or_default() += 1;
    }
    let mut statuses: Vec<_> = by_status.into_iter().collect();
    statuses.sort_unstable();
    eprintln!("webhook POSTs by answer (0 = none: receiver down or hung): {statuses:?}");
    eprintln!(
        "event-worker since its restart: delivered {} parked {} retries {}",
        metering_stage(worker, "delivered"),
        metering_stage(worker, "parked"),
        metric(worker, "gateway_metering_webhook_retries_total")
    );
}

/// The ledger against the table: exactly once for served calls, never for refused ones,
/// at most once for the ones that broke mid-flight, nothing else.
fn check_rows_against_calls(
    ledger: &[Attempt],
    rows: &[UsageRow],
    absurd: &HashSet<String>,
    gateway_killed: Duration,
    gateway_back: Duration,
) {
    let attempts: HashMap<&str, &Attempt> =
        ledger.iter().map(|a| (a.call_id.as_str(), a)).collect();
    assert_eq!(
        attempts.len(),
        ledger.len(),
        "call ids are unique per attempt"
    );
    let served: Vec<&Attempt> = ledger.iter().filter(|a| a.outcome == Outcome::Ok).collect();
    assert_eq!(served.len(), INVOCATIONS, "served invocations");
    let mut failures: HashMap<String, usize> = HashMap::new();
    for a in ledger.iter().filter(|a| a.outcome != Outcome::Ok) {
        let kind = match &a.outcome {
            Outcome::Status(c) => format!("status {c}"),
            Outcome::Refused => "refused".into(),
            Outcome::Broken(why) => format!("broken: {why}"),
            Outcome::Ok => unreachable!(),
        };
        *failures.entry(kind).or_default() += 1;
    }
    eprintln!(
        "attempts: {} ({} served, {} failed: {failures:?})",
        ledger.len(),
        served.len(),
        ledger.len() - served.len()
    );

    let mut per_call: HashMap<&str, usize> = HashMap::new();
    for r in rows {
        *per_call.entry(r.call_id.as_str()).or_default() += 1;
    }
    let doubled: Vec<(&&str, &usize)> = per_call.iter().filter(|(_, n)| **n > 1).collect();
    let billed_absurd: Vec<&&str> = per_call.keys().filter(|c| absurd.contains(**c)).collect();
    let unknown: Vec<&&str> = per_call
        .keys()
        .filter(|c| !attempts.contains_key(**c) && !absurd.contains(**c))
        .collect();
    let refused_billed: Vec<&str> = ledger
        .iter()
        .filter(|a| a.outcome == Outcome::Refused && per_call.contains_key(a.call_id.as_str()))
        .map(|a| a.call_id.as_str())
        .collect();
    let unsure = ledger
        .iter()
        .filter(|a| matches!(a.outcome, Outcome::Status(_) | Outcome::Broken(_)))
        .count();
    let unsure_billed = ledger
        .iter()
        .filter(|a| {
            matches!(a.outcome, Outcome::Status(_) | Outcome::Broken(_))
                && per_call.contains_key(a.call_id.as_str())
        })
        .count();
    let missing: Vec<&Attempt> = served
        .iter()
        .copied()
        .filter(|a| !per_call.contains_key(a.call_id.as_str()))
        .collect();
    eprintln!(
        "rows: {} = {} served with a row + {unsure_billed} of {unsure} unsure attempts the gateway completed; \
         {} served calls missing, {} call ids billed twice, {} unknown, {} refused-but-billed, {} absurd billed",
        rows.len(),
        served.len() - missing.len(),
        missing.len(),
        doubled.len(),
        unknown.len(),
        refused_billed.len(),
        billed_absurd.len()
    );
    if !missing.is_empty() {
        let ends: Vec<f64> = missing.iter().map(|a| a.ended.as_secs_f64()).collect();
        let first = ends.iter().copied().fold(f64::INFINITY, f64::min);
        let last = ends.iter().copied().fold(0.0, f64::max);
        let around_kill = missing
            .iter()
            .filter(|a| {
                a.ended <= gateway_back && a.ended + Duration::from_secs(5) >= gateway_killed
            })
            .count();
        eprintln!(
            "MISSING: {} served calls have no row; they were answered between {first:.3}s and {last:.3}s \
             of the load; {around_kill} of them in the 5 s before the serving gateway's kill -9 at \
             {:.3}s (restarted at {:.3}s){}; e.g. {:?}",
            missing.len(),
            gateway_killed.as_secs_f64(),
            gateway_back.as_secs_f64(),
            if around_kill == missing.len() {
                " — events the gateway had buffered but not yet flushed to JetStream, lost with the process"
            } else {
                ""
            },
            missing
                .iter()
                .take(5)
                .map(|a| &a.call_id)
                .collect::<Vec<_>>()
        );
    }
    assert!(
        doubled.is_empty(),
        "call ids billed more than once: {doubled:?}"
    );
    assert!(
        billed_absurd.is_empty(),
        "absurd events were billed: {billed_absurd:?}"
    );
    assert!(
        unknown.is_empty(),
        "rows for calls nobody made: {unknown:?}"
    );
    assert!(
        refused_billed.is_empty(),
        "refused attempts were billed: {refused_billed:?}"
    );
    assert!(
        missing.is_empty(),
        "{} served invocations were never billed",
        missing.len()
    );
    assert_eq!(
        rows.len(),
        INVOCATIONS + unsure_billed,
        "rows in function_usage"
    );
}

/// A usage event as the receiver was sent it.
#[derive(Debug, Clone, PartialEq)]
struct RawEvent {
    call_id: String,
    function_name: String,
    duration: u64,
    billed_duration_ms: u64,
    memory_bytes: u64,
    source: String,
}

/// Every distinct event in the batches the receiver answered with a 2xx, by id; the same
/// id must carry the same event in every delivery.
fn raw_events(exchanges: &[Exchange]) -> HashMap<String, RawEvent> {
    let mut out: HashMap<String, RawEvent> = HashMap::new();
    let (mut deliveries, mut batches) = (0usize, 0usize);
    for e in exchanges.iter().filter(|e| is_2xx(e.status)) {
        let events: Vec<Value> = serde_json::from_slice(&e.body).expect("a batch is a JSON array");
        batches += 1;
        for v in events {
            deliveries += 1;
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            let n = |k: &str| {
                v[k].as_u64()
                    .unwrap_or_else(|| panic!("event field {k} is not an unsigned integer: {v}"))
            };
            let ev = RawEvent {
                call_id: s("call_id"),
                function_name: s("function_name"),
                duration: n("duration"),
                billed_duration_ms: n("billed_duration_ms"),
                memory_bytes: n("memory_bytes"),
                source: s("source"),
            };
            assert_eq!(v["event"], "function_usage", "{v}");
            let id = s("id");
            assert!(!id.is_empty(), "an event without an id: {v}");
            if let Some(before) = out.get(&id) {
                assert_eq!(before, &ev, "event {id} changed between deliveries");
            } else {
                out.insert(id, ev);
            }
        }
    }
    eprintln!(
        "raw events: {} distinct in {deliveries} deliveries over {batches} accepted batches \
         ({} delivered again and deduplicated by the receiver)",
        out.len(),
        deliveries - out.len()
    );
    out
}

fn check_rows_against_raw_events(rows: &[UsageRow], raw: &HashMap<String, RawEvent>) {
    assert_eq!(
        rows.len(),
        raw.len(),
        "every event the receiver accepted is one row, and nothing else is"
    );
    for r in rows {
        let e = raw
            .get(&r.id)
            .unwrap_or_else(|| panic!("row {} was never sent in an accepted batch", r.id));
        assert_eq!(
            (
                &e.call_id,
                &e.function_name,
                e.duration,
                e.billed_duration_ms,
                e.memory_bytes,
                &e.source
            ),
            (
                &r.call_id,
                &r.function_name,
                r.duration_ns,
                r.billed_duration_ms,
                r.memory_bytes,
                &r.source
            ),
            "row {} differs from the event sent",
            r.id
        );
        assert_eq!(r.function_name, FUNCTION);
    }
}

/// `billing-receiver report` (the CLI) and `usage_report()` (the SQL) against the GB-s
/// recomputed from the raw events: billed ms = duration rounded up to 1 ms, times the
/// memory limit, summed in integers.
fn check_report(pg: &Postgres, rows: &[UsageRow], raw: &HashMap<String, RawEvent>) {
    let mut ms_bytes: u128 = 0;
    let mut billed_ms: u128 = 0;
    for (id, e) in raw {
        let ms = e.duration.div_ceil(1_000_000);
        assert_eq!(
            e.billed_duration_ms, ms,
            "event {id}: billed_duration_ms is not the duration rounded up"
        );
        billed_ms += u128::from(ms);
        ms_bytes += u128::from(ms) * u128::from(e.memory_bytes);
    }
    let expected_gb_s = billing::gb_s_decimal(ms_bytes, 6);
    let expected_billed_s = format!("{}.{:03}", billed_ms / 1000, billed_ms % 1000);
    let (from, to) = ("2000-01-01T00:00:00Z", "2100-01-01T00:00:00Z");
    let (total, table) = billing::report_total(&pg.url(), from, to);
    eprintln!("billing-receiver report:\n{table}");
    eprintln!("independent: billed {expected_billed_s} s, GB-s on the limit {expected_gb_s}");
    assert_eq!(total[0], rows.len().to_string(), "report invocations");
    assert_eq!(total[2], expected_billed_s, "report billed seconds");
    assert_eq!(total[3], expected_gb_s, "report GB-s on the limit");
    assert_eq!(
        total[4], "0.000000",
        "GB-s on peak: no peak measured without an agent"
    );
    let sql = pg.query(&format!(
        "SELECT sum(gb_s_limit)::text FROM usage_report('{from}', '{to}')"
    ));
    let sql: f64 = sql.trim().parse().expect("usage_report GB-s");
    let exact: f64 = billing::gb_s_decimal(ms_bytes, 12)
        .parse()
        .expect("a decimal");
    assert!(
        (sql - exact).abs() < 1e-9,
        "usage_report GB-s {sql} != independent {exact}"
    );
}
