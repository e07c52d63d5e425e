//! A 60 s gateway outage loses no usage event: a real gateway, the node agent with its
//! eBPF programs attached (a memory buffer of 100 events, so the outage spills to its disk
//! spool) and an http-mode Python function. The gateway is killed (`kill -9`: a SIGTERM
//! would retire its replicas with it, leaving nothing to invoke), the function is invoked
//! directly on its replica port with an `X-Call-Id` for 60 s, then the gateway is started
//! again on the same port and data directory: every call id of the outage must reach
//! `GET /system/usage` exactly once, and the agent must have dropped nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;
use tally_e2e::stack::{Agent, Gateway, can_meter, client};

const OUTAGE: Duration = Duration::from_secs(60);

#[test]
fn a_60s_gateway_outage_loses_no_usage_event() {
    if !can_meter("a_60s_gateway_outage_loses_no_usage_event") {
        return;
    }
    let started = Instant::now();
    let mut gw = Gateway::start("outage");
    let agent = Agent::start(&gw, &["--buffer-capacity", "100", "--batch-size", "100"]);
    gw.deploy(json!({"service": "outage", "image": "test/outage:1",
        "envProcess": "/usr/bin/python3 ok_server.py", "envVars": {"mode": "http"}}));
    gw.wait_ready("outage");
    // The agent meters the replica (it has polled the replica list) before the outage.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    while gw.usage("call_id=before").is_empty() {
        assert!(Instant::now() < deadline, "the replica was never metered");
        n += 1;
        let r = client()
            .get(&format!("{}/function/outage", gw.url))
            .header("X-Call-Id", "before")
            .call()
            .expect("invoke");
        assert_eq!(r.status(), 200);
        std::thread::sleep(Duration::from_millis(300 * n.min(3)));
    }
    let (_, replicas) = gw.system("GET", "/system/replicas", None);
    let port = replicas["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .find(|r| r["function"] == "outage")
        .and_then(|r| r["port"].as_u64())
        .expect("the replica's port");
    let direct = format!("http://127.0.0.1:{port}/");

    gw.crash();
    let outage_start = Instant::now();
    let c = client();
    let mut answered = Vec::new();
    let mut i = 0;
    while outage_start.elapsed() < OUTAGE {
        let id = format!("out-{i}");
        i += 1;
        let r = c
            .get(&direct)
            .header("X-Call-Id", &id)
            .call()
            .unwrap_or_else(|e| panic!("direct call {id} during the outage: {e}"));
        assert_eq!(r.status(), 200, "direct call {id}");
        answered.push(id);
        std::thread::sleep(Duration::from_millis(40));
    }
    drop(c); // no keep-alive connection left on the replica the restart retires
    let spilled = agent.metric("tally_agent_events_spilled_total");
    let spooled = agent.metric("tally_agent_events_spooled");
    eprintln!(
        "outage: {} direct calls in {:?}; agent spilled {spilled} events to disk, {spooled} on disk now",
        answered.len(),
        outage_start.elapsed()
    );
    assert!(
        spilled > 0.0,
        "the outage never went past the memory buffer"
    );

    gw.spawn();
    let back = Instant::now();
    let deadline = back + Duration::from_secs(25);
    let counts = loop {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for e in gw.usage("function=outage&limit=100000") {
            if let Some(id) = e["call_id"].as_str().filter(|id| id.starts_with("out-")) {
                assert_eq!(e["source"], "kernel", "{e}");
                *counts.entry(id.to_string()).or_default() += 1;
            }
        }
        if counts.len() >= answered.len() || Instant::now() > deadline {
            break counts;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!(
        "after the restart: {} of {} call ids arrived in {:?}",
        counts.len(),
        answered.len(),
        back.elapsed()
    );
    let missing: Vec<&String> = answered
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} call ids lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let twice: Vec<_> = counts.iter().filter(|&(_, &n)| n != 1).collect();
    assert!(twice.is_empty(), "call ids not exactly once: {twice:?}");
    assert_eq!(counts.len(), answered.len(), "events for calls never made");
    assert_eq!(agent.metric("tally_agent_events_dropped_total"), 0.0);
    assert_eq!(agent.metric("tally_agent_events_spooled"), 0.0);
    eprintln!("total test time {:?}", started.elapsed());
}
