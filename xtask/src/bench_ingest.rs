//! `cargo xtask bench ingest`: the gateway's cost of taking in the node agent's usage
//! events (`POST /system/usage`, batches as the billing bench builds them), as JSON arrays
//! and as the agent's postcard batches: gateway CPU per event and events/s from one sender,
//! with its `/system/usage` window full as in steady state.
//! `TALLY_BENCH_BASELINE_GATEWAY=PATH` adds another gateway binary (say, the last commit's
//! release build; postcard only if it reads it), measured in the same rounds. The arms'
//! order rotates each round.

use std::time::Instant;

use anyhow::{Result, bail};

use crate::bench::{
    Guard, RemoveCgroups, RemoveDir, agent, cpu_ticks, fresh_data_dir, gateway_dir_from_env,
    median, per_request_us, release_build, start_gateway,
};
use crate::bench_billing::{JSON, POST_EVENTS, as_postcard, post_usage_batch, usage_batch};

/// Events posted before the rounds: the `/system/usage` window (100,000) and then some, so
/// every measured event also pushes the oldest one out, as in a long-running gateway.
const WARM_EVENTS: usize = 120_000;

/// A gateway under test.
struct Gateway {
    name: String,
    url: String,
    auth: String,
    pid: u32,
    _gateway: Guard,
    _data: RemoveDir,
    _cgroups: RemoveCgroups,
}

/// One gateway fed one body format.
struct Arm {
    gateway: usize,
    content_type: &'static str,
    cpu_us: Vec<f64>,
    rate: Vec<f64>,
}

impl Arm {
    fn format(&self) -> &'static str {
        if self.content_type == JSON {
            "JSON"
        } else {
            "postcard"
        }
    }
}

/// Events posted per arm and round.
const EVENTS: usize = 200_000;

pub fn run(rounds: usize) -> Result<()> {
    let events = EVENTS;
    let bin = release_build(&[])?;
    let http = agent();
    let mut bins = vec![("gateway (this tree)".to_string(), bin.clone())];
    if let Some(dir) = gateway_dir_from_env("TALLY_BENCH_BASELINE_GATEWAY")? {
        bins.push((format!("baseline ({})", dir.join("gateway").display()), dir));
    }
    let mut gateways = Vec::new();
    let mut arms = Vec::new();
    for (i, (name, dir)) in bins.into_iter().enumerate() {
        // The data dir holds the function binary the gateway could start: this tree's.
        let data = fresh_data_dir(&format!("ingest-{i}"), &bin)?;
        let cgroup = format!("tally-bench-ingest-{i}-{}", std::process::id());
        let extra = ["--autoscaler".to_string(), "off".to_string()];
        let (gateway, url, auth) = start_gateway(&dir, &data, &cgroup, &extra)?;
        let gw = Gateway {
            name,
            pid: gateway.id(),
            url,
            auth,
            _gateway: Guard(gateway),
            _data: RemoveDir(data),
            _cgroups: RemoveCgroups(cgroup),
        };
        post(&http, &gw, JSON, &batches("warm", WARM_EVENTS, JSON)?)?;
        // Postcard too where the gateway reads it (a baseline may be older than it).
        let postcard = agent_common::wire::CONTENT_TYPE;
        let reads_postcard = post(&http, &gw, postcard, &batches("probe", 1, postcard)?).is_ok();
        let formats: &[&'static str] = if reads_postcard {
            &[JSON, postcard]
        } else {
            &[JSON]
        };
        for &content_type in formats {
            arms.push(Arm {
                gateway: i,
                content_type,
                cpu_us: Vec::new(),
                rate: Vec::new(),
            });
        }
        gateways.push(gw);
    }
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        let n = arms.len();
        for k in 0..n {
            let arm = &mut arms[(round + k) % n];
            let gw = &gateways[arm.gateway];
            // Built before the clock starts: the sender must not be what limits the rate.
            let bodies = batches(&format!("r{round}"), events, arm.content_type)?;
            let before = cpu_ticks(gw.pid)?;
            let start = Instant::now();
            let posted = post(&http, gw, arm.content_type, &bodies)?;
            let secs = start.elapsed().as_secs_f64();
            arm.cpu_us
                .push(per_request_us(cpu_ticks(gw.pid)? - before, posted));
            arm.rate.push(posted as f64 / secs);
        }
    }
    println!(
        "| `POST /system/usage`, {POST_EVENTS} events a batch, one sender, {events} events a round (median of {rounds}) | gateway CPU per event | events/s |"
    );
    println!("|---|---|---|");
    for arm in &arms {
        println!(
            "| {}, {} | {:.2} µs | {:.0} |",
            gateways[arm.gateway].name,
            arm.format(),
            median(&mut arm.cpu_us.clone()),
            median(&mut arm.rate.clone())
        );
    }
    println!();
    let mid = |a: &Arm| median(&mut a.cpu_us.clone());
    // Each arm against this tree's arm of the same format, and this tree's postcard against
    // its JSON.
    for (k, arm) in arms.iter().enumerate().skip(1) {
        let base = arms
            .iter()
            .position(|a| a.gateway == 0 && a.content_type == arm.content_type)
            .filter(|b| *b != k)
            .unwrap_or(0);
        println!(
            "CPU per event, {}, {} / {}, {}: {:.0}%; rounds (µs): {:?} vs {:?}",
            gateways[arm.gateway].name,
            arm.format(),
            gateways[arms[base].gateway].name,
            arms[base].format(),
            100.0 * mid(arm) / mid(&arms[base]),
            arm.cpu_us,
            arms[base].cpu_us
        );
    }
    Ok(())
}

/// `events` usage events (rounded up to whole batches), ids `TAG-BATCH-N`, as bodies of
/// `content_type`.
fn batches(tag: &str, events: usize, content_type: &str) -> Result<Vec<Vec<u8>>> {
    (0..events.div_ceil(POST_EVENTS))
        .map(|b| {
            let json = usage_batch(&format!("{tag}-{b}"), "2026-11-23T00:00:00.000000000Z");
            if content_type == JSON {
                Ok(json.into_bytes())
            } else {
                as_postcard(&json)
            }
        })
        .collect()
}

/// Posts the batches to the gateway; how many events it took.
fn post(http: &ureq::Agent, gw: &Gateway, content_type: &str, bodies: &[Vec<u8>]) -> Result<u64> {
    let mut accepted = 0;
    for body in bodies {
        let n = post_usage_batch(http, &gw.url, &gw.auth, body, content_type)?;
        if n != POST_EVENTS as u64 {
            bail!("{}: {n} of {POST_EVENTS} events accepted", gw.name);
        }
        accepted += n;
    }
    Ok(accepted)
}
