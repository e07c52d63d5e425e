//! Completeness of kernel metering under load: a real gateway, the node agent with its
//! eBPF programs attached, and 4 functions (2 http-mode Python servers, 2 fork-mode `cat`);
//! invocations through the gateway, each with a unique `X-Call-Id`, paced at up to 2,000/s
//! for 60 s. Every invocation the gateway answered must have exactly one kernel event at
//! `GET /system/usage` (matched by call id), none dropped. The gateway keeps only its
//! newest 100,000 events, so they are collected while the load runs; duplicates are found
//! by comparing the distinct events seen with the gateway's count of ingested ones.
//! On this 2-core VM the whole stack may not reach 2,000/s: the rate reached is printed and
//! completeness is asserted at that rate.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tally_e2e::stack::{Agent, Gateway, can_meter, client, sum_metric};

const TARGET_RPS: f64 = 2000.0;
const LOAD: Duration = Duration::from_secs(60);
const MAX_CALLS: usize = 130_000;
const WORKERS: usize = 32;
const FUNCTIONS: [&str; 4] = ["py-a", "py-b", "fork-a", "fork-b"];

/// Distinct events seen (as their JSON text) and, per call id, the distinct events for it.
#[derive(Default)]
struct Seen {
    events: HashSet<String>,
    by_call: HashMap<String, usize>,
}

impl Seen {
    fn add(&mut self, events: Vec<Value>) {
        for e in events {
            let text = e.to_string();
            if self.events.insert(text)
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
    let started = Instant::now();
    let gw = Gateway::start("complete");
    let agent = Agent::start(&gw, &[]);
    // One replica each, pinned: a replica the autoscaler adds serves before the agent's next
    // poll of the replica list sees its cgroup, and those first calls are not metered (a
    // known gap, see the agent's README).
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
    let deadline = Instant::now() + Duration::from_secs(20);
    for f in FUNCTIONS {
        let id = format!("warmup-{f}");
        while gw.usage(&format!("call_id={id}")).is_empty() {
            assert!(Instant::now() < deadline, "{f} was never metered");
            let _ = client()
                .get(&format!("{}/function/{f}", gw.url))
                .header("X-Call-Id", &id)
                .call();
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    eprintln!("set up in {:?}", started.elapsed());

    let seen = Arc::new(Mutex::new(Seen::default()));
    let done = Arc::new(AtomicBool::new(false));
    // Collect while the load runs: the gateway keeps only its newest 100,000 events.
    let collector = {
        let (seen, done, url, auth) = (seen.clone(), done.clone(), gw.url.clone(), gw.auth.clone());
        std::thread::spawn(move || {
            let c = client();
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_secs(8));
                let events: Vec<Value> = c
                    .get(&format!("{url}/system/usage?limit=30000"))
                    .header("Authorization", &auth)
                    .call()
                    .ok()
                    .and_then(|mut r| r.body_mut().read_json().ok())
                    .unwrap_or_default();
                seen.lock().expect("lock").add(events);
            }
        })
    };

    let load_start = Instant::now();
    let per_worker = Duration::from_secs_f64(WORKERS as f64 / TARGET_RPS);
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let url = gw.url.clone();
            std::thread::spawn(move || {
                let c = client();
                let mut answered = Vec::new();
                let mut failed = 0usize;
                let mut next = load_start + per_worker.mul_f64(w as f64 / WORKERS as f64);
                let mut i = 0;
                while load_start.elapsed() < LOAD && i < MAX_CALLS / WORKERS {
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    next = next.max(now - per_worker) + per_worker;
                    // A function per worker: slow fork-mode calls do not hold up the http ones.
                    let f = FUNCTIONS[w % FUNCTIONS.len()];
                    let id = format!("c-{w}-{i}");
                    i += 1;
                    match c
                        .post(&format!("{url}/function/{f}"))
                        .header("X-Call-Id", &id)
                        .send("x")
                    {
                        Ok(mut r) if r.status() == 200 => {
                            let _ = r.body_mut().read_to_string();
                            answered.push(id);
                        }
                        _ => failed += 1,
                    }
                }
                (answered, failed)
            })
        })
        .collect();
    let mut answered: Vec<String> = Vec::new();
    let mut failed = 0;
    for w in workers {
        let (a, f) = w.join().expect("load worker");
        answered.extend(a);
        failed += f;
    }
    let load_time = load_start.elapsed();
    let rate = answered.len() as f64 / load_time.as_secs_f64();
    eprintln!(
        "load: {} answered, {failed} not, in {load_time:?}: {rate:.0} invocations/s (target {TARGET_RPS})",
        answered.len()
    );
    done.store(true, Ordering::SeqCst);
    collector.join().expect("collector");

    // Wait until the agent has delivered everything, then collect what is left.
    let answered_set: HashSet<&String> = answered.iter().collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        seen.lock().expect("lock").add(gw.usage("limit=100000"));
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
    eprintln!(
        "completeness at {rate:.0} invocations/s: {} of {} answered invocations, each with exactly one kernel event; total test time {:?}",
        answered.len(),
        answered.len(),
        started.elapsed()
    );
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
