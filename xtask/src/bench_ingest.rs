//! `cargo xtask bench ingest`: the gateway's cost of taking in the node agent's usage
//! events (`POST /system/usage`, batches as the billing bench builds them): gateway CPU per
//! event and events/s from one sender, with its `/system/usage` window full as in steady state.
//! `TALLY_BENCH_BASELINE_GATEWAY=PATH` adds another gateway binary (say, the last commit's
//! release build), measured in the same rounds, order rotated each round.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::bench::{
    Guard, RemoveDir, agent, cpu_ticks, fresh_data_dir, median, per_request_us, release_build,
    start_gateway,
};
use crate::bench_billing::{POST_EVENTS, post_usage_batch, usage_batch};

/// Events posted before the rounds: the `/system/usage` window (100,000) and then some, so
/// every measured event also pushes the oldest one out, as in a long-running gateway.
const WARM_EVENTS: usize = 120_000;

struct Arm {
    name: String,
    url: String,
    auth: String,
    pid: u32,
    cpu_us: Vec<f64>,
    rate: Vec<f64>,
    _gateway: Guard,
    _data: RemoveDir,
}

/// Events posted per arm and round.
const EVENTS: usize = 200_000;

pub fn run(rounds: usize) -> Result<()> {
    let events = EVENTS;
    let bin = release_build(&[])?;
    let http = agent();
    let mut bins = vec![("gateway (this tree)".to_string(), bin.clone())];
    if let Some(path) = std::env::var_os("TALLY_BENCH_BASELINE_GATEWAY").map(PathBuf::from) {
        let dir = path
            .parent()
            .context("TALLY_BENCH_BASELINE_GATEWAY: no directory")?;
        if path.file_name() != Some("gateway".as_ref()) || !path.is_file() {
            bail!("TALLY_BENCH_BASELINE_GATEWAY must name a `gateway` binary");
        }
        bins.push((format!("baseline ({})", path.display()), dir.to_path_buf()));
    }
    let mut arms = Vec::new();
    for (i, (name, dir)) in bins.into_iter().enumerate() {
        // The data dir holds the function binary the gateway could start: this tree's.
        let data = fresh_data_dir(&format!("ingest-{i}"), &bin)?;
        let cgroup = format!("tally-bench-ingest-{i}-{}", std::process::id());
        let extra = ["--autoscaler".to_string(), "off".to_string()];
        let (gateway, url, auth) = start_gateway(&dir, &data, &cgroup, &extra)?;
        let arm = Arm {
            name,
            pid: gateway.id(),
            url,
            auth,
            cpu_us: Vec::new(),
            rate: Vec::new(),
            _gateway: Guard(gateway),
            _data: RemoveDir(data),
        };
        post(&http, &arm, &batches("warm", WARM_EVENTS))?;
        arms.push(arm);
    }
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        let n = arms.len();
        for k in 0..n {
            let arm = &mut arms[(round + k) % n];
            // Built before the clock starts: the sender must not be what limits the rate.
            let bodies = batches(&format!("r{round}"), events);
            let before = cpu_ticks(arm.pid)?;
            let start = Instant::now();
            let posted = post(&http, arm, &bodies)?;
            let secs = start.elapsed().as_secs_f64();
            arm.cpu_us
                .push(per_request_us(cpu_ticks(arm.pid)? - before, posted));
            arm.rate.push(posted as f64 / secs);
        }
    }
    println!(
        "| `POST /system/usage`, {POST_EVENTS} events a batch, one sender, {events} events a round (median of {rounds}) | gateway CPU per event | events/s |"
    );
    println!("|---|---|---|");
    for arm in &arms {
        println!(
            "| {} | {:.2} µs | {:.0} |",
            arm.name,
            median(&mut arm.cpu_us.clone()),
            median(&mut arm.rate.clone())
        );
    }
    if let [new, base] = &arms[..] {
        println!();
        println!(
            "CPU per event, this tree / baseline: {:.0}%; rounds (µs): this tree {:?}, baseline {:?}",
            100.0 * median(&mut new.cpu_us.clone()) / median(&mut base.cpu_us.clone()),
            new.cpu_us,
            base.cpu_us
        );
    }
    Ok(())
}

/// `events` usage events (rounded up to whole batches), ids `TAG-BATCH-N`.
fn batches(tag: &str, events: usize) -> Vec<String> {
    (0..events.div_ceil(POST_EVENTS))
        .map(|b| usage_batch(&format!("{tag}-{b}"), "2026-11-23T00:00:00.000000000Z"))
        .collect()
}

/// Posts the batches to the arm's gateway; how many events it took.
fn post(http: &ureq::Agent, arm: &Arm, bodies: &[String]) -> Result<u64> {
    let mut accepted = 0;
    for body in bodies {
        let n = post_usage_batch(http, &arm.url, &arm.auth, body.clone())?;
        if n != POST_EVENTS as u64 {
            bail!("{}: {n} of {POST_EVENTS} events accepted", arm.name);
        }
        accepted += n;
    }
    Ok(accepted)
}
