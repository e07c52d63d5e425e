//! Completeness of kernel metering under load: a real gateway, the node agent with its
//! eBPF programs attached, and 4 functions (2 http-mode Python servers, 2 fork-mode `cat`);
//! invocations through the gateway, each with a unique `X-Call-Id`, on a schedule of
//! 2,080/s for 60 s (1,930/s to the http functions, 150/s to the fork-mode ones). Every
//! invocation the gateway answered must have exactly one kernel event at `GET
//! /system/usage` (matched by call id), none dropped, and at least 2,000 invocations/s
//! must be answered over the load's wall time (printed per 10 s too). The gateway keeps
//! only its newest 100,000 events, so they are collected while the load runs; duplicates
//! are found by comparing the distinct events seen with the gateway's count of ingested
//! ones.
//! Optimized gateway and agent binaries (a debug gateway's CPU per call would be what
//! limits the rate), a load generator of raw keep-alive connections and single-threaded
//! Python servers: the whole stack shares the 2 cores, and a fork-mode call (4-6 ms of
//! CPU, mostly the kernel copying and tearing down the gateway's page tables, growing with
//! the gateway's memory) costs as much as ~20 http ones. A second test scales functions up
//! under load: the new replicas are metered from their first call.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tally_e2e::http1::Conn;
use tally_e2e::stack::{Agent, Gateway, can_meter, client, sum_metric, use_release_binaries};

/// The rate the claim is about: invocations answered per second over the whole load.
const TARGET_RPS: f64 = 2000.0;
/// The schedule runs 4% ahead of the target: the rate reached is answered calls over the
/// load's wall time, last answers included, so a schedule of exactly 2,000/s ends a little
/// under it.
const PACE_RPS: f64 = 2080.0;
const LOAD: Duration = Duration::from_secs(60);
const MAX_CALLS: usize = 130_000;
const WORKERS: usize = 32;
/// Of the schedule, what the two fork-mode functions get (a process per call costs ~20×
/// an http call, most of it the kernel copying and tearing down the gateway's page tables
/// at fork/exec: at an even split this 2-core VM would spend all its CPU on fork/exec long
/// before 2,000/s), and the workers that send it.
const FORK_RPS: f64 = 150.0;
const FORK_WORKERS: usize = 6;
/// The collector's period and page: `limit` covers several periods at the pace, so no
/// event leaves the gateway's window of 100,000 unseen; a small page is cloned and
/// serialized by the gateway in a few ms, a short stall of the load it serves.
const COLLECT_EVERY: Duration = Duration::from_secs(2);
const COLLECT_LIMIT: usize = 12_000;
const FUNCTIONS: [&str; 4] = ["py-a", "py-b", "fork-a", "fork-b"];

/// The tests of this file load the same 2 cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Distinct events seen (by the agent's event id, which a resent event repeats) and, per
/// call id, the distinct events for it.
#[derive(Default)]
struct Seen {
    events: HashSet<String>,
    by_call: HashMap<String, usize>,
}

impl Seen {
    fn add(&mut self, events: Vec<Value>) {
        for e in events {
            // Events from an agent without ids: their whole text tells them apart.
            let key = e["id"]
                .as_str()
                .map_or_else(|| e.to_string(), str::to_string);
            if self.events.insert(key)
                && let Some(id) = e["call_id"].as_str()
            {
                *self.by_call.entry(id.to_string()).or_default() += 1;
            }
        }
    }
}

#[test]
fn every_answered_invocation_has_exactly_one_kernel_event() {
    if !can_meter("every_answered_invocation_has_exactly_one_kernel_event") {
        return;
    }
    let _serial = serial();
    // Optimized gateway and agent: the debug gateway's CPU per call would be the limit.
    use_release_binaries();
    let started = Instant::now();
    let gw = Gateway::start("complete");
    let agent = Agent::start(&gw, &[]);
    // One replica each, pinned, so that the load is the same from run to run (scaling up
    // under load is the other test's).
    let pinned = json!({"com.openfaas.scale.min": "1", "com.openfaas.scale.max": "1"});
    for f in FUNCTIONS {
        let body = if f.starts_with("py") {
            json!({"service": f, "image": "test/py:1", "envProcess": "/usr/bin/python3 ok_server.py",
                   "envVars": {"mode": "http"}, "labels": pinned})
        } else {
            json!({"service": f, "image": "test/fork:1", "envProcess": "cat", "labels": pinned})
        };
        gw.deploy(body);
    }
    for f in FUNCTIONS {
        gw.wait_ready(f);
    }
    // Every replica is metered before the load starts.
    wait_metered(&gw, &FUNCTIONS, "warmup");
    eprintln!("set up in {:?}", started.elapsed());

    let seen = Arc::new(Mutex::new(Seen::default()));
    let done = Arc::new(AtomicBool::new(false));
    // Collect while the load runs: the gateway keeps only its newest 100,000 events.
    let collector = {
        let (seen, done, url, auth) = (seen.clone(), done.clone(), gw.url.clone(), gw.auth.clone());
        std::thread::spawn(move || {
            let c = client();
            let query = format!("limit={COLLECT_LIMIT}");
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(COLLECT_EVERY);
                let events = usage_json(&c, &url, &auth, &query);
                seen.lock().expect("lock").add(events);
            }
        })
    };

    let load_start = Instant::now();
    // Two schedules, the http functions' and the fork-mode functions': ticket k of one is
    // due at k / its rate. Each worker serves one function and takes the next ticket of its
    // schedule when it is free (slow fork-mode calls do not hold up the http ones).
    let tickets = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let fork = w < FORK_WORKERS;
            let (url, tickets) = (gw.url.clone(), tickets[usize::from(fork)].clone());
            let rate = if fork { FORK_RPS } else { PACE_RPS - FORK_RPS };
            std::thread::spawn(move || {
                // A raw keep-alive connection: ureq's CPU per call (debug test binary) was a
                // fifth of what the whole stack could spend on one.
                let mut c = Conn::new(&url, Duration::from_secs(20)).expect("gateway address");
                let mut answered = Vec::new();
                let mut failed = 0usize;
                // Answers per second of the load, for the rate over time.
                let mut per_second = vec![0usize; LOAD.as_secs() as usize + 30];
                let f = FUNCTIONS[usize::from(fork) * 2 + w % 2];
                let path = format!("/function/{f}");
                loop {
                    let k = tickets.fetch_add(1, Ordering::SeqCst);
                    let due = load_start + Duration::from_secs_f64(k as f64 / rate);
                    // Done at the end of the schedule, or of the time (when behind it).
                    if k >= MAX_CALLS
                        || due.duration_since(load_start) >= LOAD
                        || load_start.elapsed() >= LOAD
                    {
                        break;
                    }
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    let id = format!("c-{w}-{k}-{}", usize::from(fork));
                    match c.send("POST", &path, &[("X-Call-Id", &id)], b"x") {
                        Ok(r) if r.status == 200 => {
                            answered.push(id);
                            let last = per_second.len() - 1;
                            per_second[(load_start.elapsed().as_secs() as usize).min(last)] += 1;
                        }
                        _ => failed += 1,
                    }
                }
                (f, answered, failed, per_second)
            })
        })
        .collect();
    let mut answered: Vec<String> = Vec::new();
    let mut failed = 0;
    let mut per_function: HashMap<&str, usize> = HashMap::new();
    let mut per_second = vec![0usize; LOAD.as_secs() as usize + 30];
    for w in workers {
        let (f, a, n, seconds) = w.join().expect("load worker");
        *per_function.entry(f).or_default() += a.len();
        answered.extend(a);
        failed += n;
        for (total, n) in per_second.iter_mut().zip(seconds) {
            *total += n;
        }
    }
    let load_time = load_start.elapsed();
    let rate = answered.len() as f64 / load_time.as_secs_f64();
    // The rate over each 10 s of the load: sustained, or reached only on average?
    let windows: Vec<usize> = per_second[..LOAD.as_secs() as usize]
        .chunks(10)
        .map(|w| w.iter().sum::<usize>() / w.len())
        .collect();
    eprintln!(
        "load: {} answered, {failed} not, in {load_time:?}: {rate:.0} invocations/s (target {TARGET_RPS}, paced at {PACE_RPS}); per 10 s {windows:?}; per function {per_function:?}",
        answered.len()
    );
    done.store(true, Ordering::SeqCst);
    collector.join().expect("collector");

    // Wait until the agent has delivered everything, then collect what is left.
    let answered_set: HashSet<&String> = answered.iter().collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        seen.lock()
            .expect("lock")
            .add(usage_json(&client(), &gw.url, &gw.auth, "limit=100000"));
        let s = seen.lock().expect("lock");
        let found = answered
            .iter()
            .filter(|id| s.by_call.contains_key(*id))
            .count();
        if found == answered.len() || Instant::now() > deadline {
            break;
        }
        drop(s);
        std::thread::sleep(Duration::from_secs(1));
    }
    let s = seen.lock().expect("lock");
    let missing: Vec<&&String> = answered_set
        .iter()
        .filter(|id| !s.by_call.contains_key(**id))
        .collect();
    let multiple: Vec<(&String, &usize)> = s
        .by_call
        .iter()
        .filter(|&(id, &n)| n != 1 && answered_set.contains(id))
        .collect();
    let gm = gateway_metrics(&gw);
    let ingested = sum_metric(&gm, "gateway_usage_events_total{source=\"kernel\"}");
    let agent_dropped = agent.metric("tally_agent_events_dropped_total");
    let kernel_drops = agent.metric("tally_agent_kernel_drops_total");
    let sent = agent.metric("tally_agent_events_sent_total");
    eprintln!(
        "events: {} distinct seen, {ingested} ingested by the gateway, {sent} sent by the agent; \
         {} answered calls without an event, {} with more than one; agent dropped {agent_dropped}, \
         kernel drops {kernel_drops}",
        s.events.len(),
        missing.len(),
        multiple.len()
    );
    let (_, replicas) = gw.system("GET", "/system/replicas", None);
    let n_replicas = replicas["replicas"].as_array().map_or(0, Vec::len);
    assert_eq!(
        n_replicas,
        FUNCTIONS.len(),
        "one replica per function: {replicas}"
    );
    assert!(!answered.is_empty(), "no invocation was answered");
    assert!(
        missing.is_empty(),
        "{} answered invocations have no kernel event, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        multiple.is_empty(),
        "call ids with several events: {multiple:?}"
    );
    assert_eq!(
        ingested as usize,
        s.events.len(),
        "the gateway ingested more kernel events than distinct ones were seen (duplicates)"
    );
    assert_eq!(agent_dropped, 0.0, "the agent dropped usage events");
    assert_eq!(kernel_drops, 0.0, "the eBPF programs dropped records");
    assert!(
        rate >= TARGET_RPS,
        "{rate:.0} invocations/s answered over the load, under the {TARGET_RPS}/s target \
         (per 10 s: {windows:?})"
    );
    eprintln!(
        "completeness at {rate:.0} invocations/s: {} of {} answered invocations, each with exactly one kernel event; total test time {:?}",
        answered.len(),
        answered.len(),
        started.elapsed()
    );
}

/// Calls each function (call id `{prefix}-{f}`) until the gateway has its kernel event;
/// at most 20 s in all.
fn wait_metered(gw: &Gateway, functions: &[&str], prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for f in functions {
        let id = format!("{prefix}-{f}");
        while gw.usage(&format!("call_id={id}")).is_empty() {
            assert!(Instant::now() < deadline, "{f} was never metered");
            let _ = client()
                .get(&format!("{}/function/{f}", gw.url))
                .header("X-Call-Id", &id)
                .call();
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// `GET /system/usage?{query}`, read whole: tens of MB for 100,000 events, past ureq's
/// default 10 MB body limit (which would silently read as no events at all).
fn usage_json(c: &ureq::Agent, url: &str, auth: &str, query: &str) -> Vec<Value> {
    let mut r = c
        .get(&format!("{url}/system/usage?{query}"))
        .header("Authorization", auth)
        .call()
        .unwrap_or_else(|e| panic!("GET /system/usage?{query}: {e}"));
    assert_eq!(r.status(), 200, "GET /system/usage?{query}");
    r.body_mut()
        .with_config()
        .limit(512 << 20)
        .read_json()
        .unwrap_or_else(|e| panic!("GET /system/usage?{query}: unreadable answer: {e}"))
}

fn gateway_metrics(gw: &Gateway) -> String {
    client()
        .get(&format!("{}/metrics", gw.url))
        .call()
        .expect("gateway /metrics")
        .body_mut()
        .read_to_string()
        .expect("metrics text")
}

/// Replicas added while load runs are metered from their first call: the agent polls the
/// replica list only once a minute here, so only the kernel's own discovery (a new child of
/// a known function's cgroup, watched at its first exec) can meter them in time.
#[test]
fn replicas_added_under_load_are_metered_from_their_first_call() {
    if !can_meter("replicas_added_under_load_are_metered_from_their_first_call") {
        return;
    }
    let _serial = serial();
    // Optimized gateway and agent: the debug gateway's CPU per call would be the limit.
    use_release_binaries();
    const SCALED: [&str; 2] = ["py-s", "fork-s"];
    const RPS: f64 = 200.0;
    const RUN: Duration = Duration::from_secs(12);
    let gw = Gateway::start_with("scaleup", &["--autoscaler".into(), "off".into()]);
    let agent = Agent::start_polling(&gw, 60_000, &[]);
    let labels = json!({"com.openfaas.scale.min": "1", "com.openfaas.scale.max": "3"});
    gw.deploy(json!({"service": SCALED[0], "image": "test/py:1",
        "envProcess": "/usr/bin/python3 ok_server.py", "envVars": {"mode": "http"}, "labels": labels}));
    gw.deploy(json!({"service": SCALED[1], "image": "test/fork:1", "envProcess": "cat", "labels": labels}));
    for f in SCALED {
        gw.wait_ready(f);
    }
    // The first replicas are listed at the agent's first poll, i.e. at its start; the
    // functions were deployed after it, so wait for the next poll... which is a minute
    // away: restart the agent instead, now that they exist.
    drop(agent);
    let agent = Agent::start_polling(&gw, 60_000, &[]);
    wait_metered(&gw, &SCALED, "warmup2");
    let replicas_now = |gw: &Gateway| -> HashSet<String> {
        let (_, r) = gw.system("GET", "/system/replicas", None);
        r["replicas"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["replica"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let initial = replicas_now(&gw);
    assert_eq!(initial.len(), 2, "{initial:?}");

    let load_start = Instant::now();
    let workers = 8;
    let per_worker = Duration::from_secs_f64(workers as f64 / RPS);
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let url = gw.url.clone();
            std::thread::spawn(move || {
                let c = client();
                let mut answered = Vec::new();
                let mut next = load_start + per_worker.mul_f64(w as f64 / workers as f64);
                let mut i = 0;
                while load_start.elapsed() < RUN {
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    next = next.max(now - per_worker) + per_worker;
                    let f = SCALED[w % SCALED.len()];
                    let id = format!("s-{w}-{i}");
                    i += 1;
                    if let Ok(mut r) = c
                        .post(&format!("{url}/function/{f}"))
                        .header("X-Call-Id", &id)
                        .send("x")
                        && r.status() == 200
                    {
                        let _ = r.body_mut().read_to_string();
                        answered.push(id);
                    }
                }
                answered
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    for f in SCALED {
        let (status, _) = gw.system(
            "POST",
            &format!("/system/scale-function/{f}"),
            Some(json!({"serviceName": f, "replicas": 3})),
        );
        assert!(status < 300, "scale {f}: {status}");
    }
    let answered: Vec<String> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("load worker"))
        .collect();
    let after = replicas_now(&gw);
    assert_eq!(after.len(), 6, "scaled to 3 replicas each: {after:?}");

    let deadline = Instant::now() + Duration::from_secs(20);
    let by_call = loop {
        let mut by_call: HashMap<String, Vec<String>> = HashMap::new();
        for e in usage_json(&client(), &gw.url, &gw.auth, "limit=100000") {
            if let (Some(id), Some(r)) = (e["call_id"].as_str(), e["replica"].as_str()) {
                by_call.entry(id.into()).or_default().push(r.into());
            }
        }
        if answered.iter().all(|id| by_call.contains_key(id)) || Instant::now() > deadline {
            break by_call;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let missing: Vec<&String> = answered
        .iter()
        .filter(|id| !by_call.contains_key(*id))
        .collect();
    let multiple: Vec<&String> = answered
        .iter()
        .filter(|id| by_call.get(*id).is_some_and(|v| v.len() > 1))
        .collect();
    let mut on_new: HashMap<&str, usize> = HashMap::new();
    for id in &answered {
        for r in by_call.get(id).into_iter().flatten() {
            if !initial.contains(r) {
                *on_new.entry(r.as_str()).or_default() += 1;
            }
        }
    }
    let discovered = agent.metric("tally_agent_replicas_discovered_total");
    eprintln!(
        "scale-up: {} answered at ~{RPS}/s; {} served by the 4 new replicas {on_new:?}; \
         {} without an event, {} with several; replicas discovered in the kernel: {discovered}",
        answered.len(),
        on_new.values().sum::<usize>(),
        missing.len(),
        multiple.len()
    );
    assert!(
        missing.is_empty(),
        "answered calls without a kernel event, e.g. {:?}",
        &missing[..missing.len().min(5)]
    );
    assert!(
        multiple.is_empty(),
        "calls with several events: {multiple:?}"
    );
    // Equally idle replicas take calls in turn, so each new one serves a share.
    assert_eq!(
        on_new.len(),
        4,
        "every new replica served calls, each with its event: {on_new:?}"
    );
    assert!(
        discovered >= 4.0,
        "new replicas found by the kernel: {discovered}"
    );
    assert_eq!(agent.metric("tally_agent_unmatched_records_total"), 0.0);
    assert_eq!(agent.metric("tally_agent_events_dropped_total"), 0.0);
}
