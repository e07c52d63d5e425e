//! `cargo xtask bench fork`: fork-mode calls (`echo hi`) through two gateways in the same
//! run, one starting each process through `tally-spawn` (posix_spawn), one forking itself
//! (`TALLY_SPAWN=off`), both holding a full `/system/usage` window as a long-running
//! gateway does: calls/s and the gateway's CPU per call.

use anyhow::{Result, bail};
use serde_json::json;

use crate::bench::{
    Guard, RemoveDir, agent, cpu_ticks, deploy, fresh_data_dir, median, per_request_us,
    release_build, start_gateway_env,
};
use crate::bench_billing::{JSON, POST_EVENTS, post_usage_batch, usage_batch};
use crate::wrk;

/// Concurrent connections: a few calls in flight, as fork-mode functions see.
const CONNECTIONS: u32 = 8;
/// Usage events posted to each gateway first (its whole `/system/usage` window).
const WINDOW_EVENTS: usize = 100_000;

struct Arm {
    name: &'static str,
    url: String,
    pid: u32,
    runs: Vec<wrk::Wrk>,
    cpu: Vec<f64>,
    _gateway: Guard,
    _data: RemoveDir,
}

pub fn run(seconds: u32, rounds: usize) -> Result<()> {
    let bin = release_build(&[])?;
    let http = agent();
    let mut arms = Vec::new();
    for (name, spawn) in [
        ("through tally-spawn (posix_spawn)", "auto"),
        ("forked from the gateway (TALLY_SPAWN=off)", "off"),
    ] {
        let data = fresh_data_dir(&format!("fork-{spawn}"), &bin)?;
        let env: &[(&str, &str)] = if spawn == "off" {
            &[("TALLY_SPAWN", "off")]
        } else {
            &[]
        };
        let cgroup = format!("tally-bench-fork-{spawn}-{}", std::process::id());
        let extra = ["--autoscaler".to_string(), "off".to_string()];
        let (gateway, url, auth) = start_gateway_env(&bin, &data, &cgroup, &extra, env)?;
        deploy(
            &http,
            &url,
            &auth,
            json!({"service": "echo", "image": "bench/echo", "envProcess": "echo hi"}),
        )?;
        wrk::wait_ok(&http, &format!("{url}/function/echo"))?;
        fill_window(&http, &url, &auth)?;
        arms.push(Arm {
            name,
            pid: gateway.id(),
            url,
            runs: Vec::new(),
            cpu: Vec::new(),
            _gateway: Guard(gateway),
            _data: RemoveDir(data),
        });
    }
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        for k in 0..arms.len() {
            let arm = &mut arms[(round + k) % 2];
            let before = cpu_ticks(arm.pid)?;
            let w = wrk::run(&format!("{}/function/echo", arm.url), seconds, CONNECTIONS)?;
            arm.cpu
                .push(per_request_us(cpu_ticks(arm.pid)? - before, w.requests));
            arm.runs.push(w);
        }
    }
    println!(
        "| fork mode, `echo hi` (wrk, {CONNECTIONS} connections, {seconds} s, median of {rounds}) | calls/s | p50 ms | p99 ms | gateway CPU per call |"
    );
    println!("|---|---|---|---|---|");
    for arm in &arms {
        let m = wrk::median(&arm.runs);
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.0} µs |",
            arm.name,
            m.rps,
            m.p50_ms,
            m.p99_ms,
            median(&mut arm.cpu.clone())
        );
    }
    let (spawned, forked) = (wrk::median(&arms[0].runs), wrk::median(&arms[1].runs));
    println!();
    println!(
        "tally-spawn / fork throughput: {:.2}x; rounds: spawn {:?}, fork {:?}",
        spawned.rps / forked.rps,
        arms[0]
            .runs
            .iter()
            .map(|w| w.rps.round())
            .collect::<Vec<_>>(),
        arms[1]
            .runs
            .iter()
            .map(|w| w.rps.round())
            .collect::<Vec<_>>(),
    );
    Ok(())
}

/// Posts [`WINDOW_EVENTS`] kernel-style usage events, in the billing bench's batches.
fn fill_window(http: &ureq::Agent, url: &str, auth: &str) -> Result<()> {
    for b in 0..WINDOW_EVENTS / POST_EVENTS {
        let body = usage_batch(&format!("fill-{b}"), "2026-11-23T00:00:00.000000000Z");
        let accepted = post_usage_batch(http, url, auth, body.as_bytes(), JSON)?;
        if accepted != POST_EVENTS as u64 {
            bail!("filling /system/usage: {accepted} of {POST_EVENTS} events accepted");
        }
    }
    Ok(())
}
