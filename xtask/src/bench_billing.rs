//! `cargo xtask bench billing`: usage events from their source to committed PostgreSQL rows
//! (gateway → JetStream → event-worker → signed webhook → billing-receiver), events/s and lag.
//!
//! Two sources in the same run: kernel-style events POSTed to `/system/usage` at a paced
//! rate (as node agents do), then real sync invocations driven by wrk. Lag is each row's
//! `received_at` (its transaction's time) minus the end of its invocation.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use tally_e2e::postgres::{Durability, Postgres};

use crate::bench::{
    Guard, RemoveCgroups, RemoveDir, agent, deploy_tiny, fresh_data_dir, release_build,
    start_gateway,
};
use crate::{run_cmd, wrk};

/// Events per `/system/usage` POST (what an agent sends at most per batch, roughly).
pub(crate) const POST_EVENTS: usize = 500;
/// The content type of a JSON batch.
pub(crate) const JSON: &str = "application/json";
const SENDERS: usize = 4;

pub fn run(seconds: u32, rate: u32, connections: u32) -> Result<()> {
    let bin = release_build(&["billing-receiver"])?;
    let work = fresh_data_dir("billing", &bin)?;
    let _cleanup = RemoveDir(work.clone());
    let pg = Postgres::start_with(Durability::Default);
    let db = pg.url();
    let secret = work.join("webhook-secret");
    std::fs::write(&secret, "bench-billing-secret\n")?;
    run_cmd(Command::new(bin.join("billing-receiver")).args(["migrate", "--database-url", &db]))?;
    let receiver_port = wrk::free_port()?;
    let _receiver = Guard(
        Command::new(bin.join("billing-receiver"))
            .args(["serve", "--listen", &format!("127.0.0.1:{receiver_port}")])
            .args(["--database-url", &db, "--secret-file"])
            .arg(&secret)
            .env("RUST_LOG", "warn")
            .spawn()?,
    );
    let data = work.clone();
    // Declared before the gateway, so dropped after it: the gateway stops first.
    let _cgroups = RemoveCgroups("tally-bench-billing".into());
    let (gateway, url, auth) = start_gateway(
        &bin,
        &data,
        "tally-bench-billing",
        &[
            "--autoscaler".into(),
            "off".into(),
            "--webhook-endpoint".into(),
            format!("http://127.0.0.1:{receiver_port}/"),
            "--webhook-secret-file".into(),
            secret.display().to_string(),
        ],
    )?;
    let _gateway = Guard(gateway);
    let http = agent();
    let tiny = deploy_tiny(&http, &url, &auth)?;
    wait_for_receiver(&http, receiver_port)?;

    eprintln!("phase 1: {rate} events/s to /system/usage for {seconds} s");
    let since = rfc3339_now();
    let sent = post_usage(&url, &auth, rate, seconds)?;
    let kernel = wait_rows(&pg, "kernel", &since, sent)?;

    eprintln!("phase 2: wrk -c{connections} on /function/tiny for {seconds} s");
    let since = rfc3339_now();
    let before = produced(&http, &url)?;
    let w = wrk::run(&tiny, seconds, connections)?;
    std::thread::sleep(Duration::from_secs(1));
    let invoked = produced(&http, &url)? - before;
    let gateway = wait_rows(&pg, "gateway", &since, invoked)?;

    println!(
        "| source → committed rows | events | events/s (first produced → last committed) | lag p50 s | lag p99 s | max s |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, s) in [
        (format!("/system/usage, paced {rate}/s"), &kernel),
        (
            format!("sync invocations (wrk, {:.0} req/s)", w.rps),
            &gateway,
        ),
    ] {
        println!(
            "| {name} | {} | {:.0} | {:.3} | {:.3} | {:.3} |",
            s.rows, s.rate, s.p50, s.p99, s.max
        );
    }
    println!(
        "dropped: {}",
        metric(
            &http,
            &url,
            "gateway_metering_events_total{stage=\"dropped\"}"
        )?
    );
    Ok(())
}

/// Paced batches from `SENDERS` threads; returns the events accepted.
fn post_usage(url: &str, auth: &str, rate: u32, seconds: u32) -> Result<u64> {
    let period = Duration::from_secs_f64((POST_EVENTS * SENDERS) as f64 / rate.max(1) as f64);
    let deadline = Instant::now() + Duration::from_secs(seconds.into());
    let senders: Vec<_> = (0..SENDERS)
        .map(|t| {
            let (url, auth) = (url.to_string(), auth.to_string());
            std::thread::spawn(move || -> Result<u64> {
                let http = agent();
                let mut next = Instant::now();
                let (mut seq, mut accepted) = (0u64, 0u64);
                while Instant::now() < deadline {
                    let body = usage_batch(&format!("bench-{t}-{seq}"), &rfc3339_now());
                    accepted += post_usage_batch(&http, &url, &auth, body.as_bytes(), JSON)?;
                    seq += 1;
                    next += period;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                Ok(accepted)
            })
        })
        .collect();
    let mut total = 0;
    for s in senders {
        total += s.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
    }
    Ok(total)
}

/// [`POST_EVENTS`] kernel-style events of `tiny` started at `started`, ids `PREFIX-N`;
/// built as text: a sender must not be what limits the rate.
pub(crate) fn usage_batch(prefix: &str, started: &str) -> String {
    let mut body = String::with_capacity(POST_EVENTS * 300);
    body.push('[');
    for i in 0..POST_EVENTS {
        if i > 0 {
            body.push(',');
        }
        let id = format!("{prefix}-{i}");
        body.push_str(&format!(
            r#"{{"id":"{id}","call_id":"{id}","namespace":"openfaas-fn","function_name":"tiny","replica":"tiny-bench","started":"{started}","duration_ns":1000000,"status_code":200,"memory_peak_bytes":10485760,"memory_limit_bytes":134217728,"source":"kernel"}}"#
        ));
    }
    body.push(']');
    body
}

/// A JSON batch (as [`usage_batch`] writes it) as the agent's postcard batch.
pub(crate) fn as_postcard(json: &str) -> Result<Vec<u8>> {
    let batch: Vec<agent_common::wire::Usage<'_>> = serde_json::from_str(json)?;
    Ok(agent_common::wire::encode(&batch)?)
}

/// POSTs one batch (`content_type`: JSON or [`agent_common::wire::CONTENT_TYPE`]) to
/// `/system/usage`; how many events the gateway accepted.
pub(crate) fn post_usage_batch(
    http: &ureq::Agent,
    url: &str,
    auth: &str,
    body: &[u8],
    content_type: &str,
) -> Result<u64> {
    let mut r = http
        .post(&format!("{url}/system/usage"))
        .header("Authorization", auth)
        .header("Content-Type", content_type)
        .send(body)?;
    if r.status() != 200 {
        bail!("POST /system/usage: {}", r.status());
    }
    let body: serde_json::Value = r.body_mut().read_json()?;
    body["accepted"].as_u64().context("accepted")
}

fn rfc3339_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

struct Stats {
    rows: u64,
    rate: f64,
    p50: f64,
    p99: f64,
    max: f64,
}

/// Waits (at most 3 minutes) until `want` rows of `source` that started `since` or later
/// are committed, then measures them.
fn wait_rows(pg: &Postgres, source: &str, since: &str, want: u64) -> Result<Stats> {
    let rows = format!("function_usage where source = '{source}' and started >= '{since}'");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let n: u64 = pg
            .query(&format!("select count(*) from {rows}"))
            .trim()
            .parse()?;
        if n >= want {
            break;
        }
        if Instant::now() > deadline {
            bail!("{n} of {want} {source} events committed after 3 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let lag = "extract(epoch from received_at - (started + duration_ns / 1000 * interval '1 microsecond'))";
    let row = pg.query(&format!(
        "select count(*), \
           count(*) / extract(epoch from max(received_at) - min(started)), \
           percentile_cont(0.5) within group (order by {lag}), \
           percentile_cont(0.99) within group (order by {lag}), max({lag}) \
         from {rows}"
    ));
    let f: Vec<&str> = row.trim().split('\t').collect();
    let num = |i: usize| -> Result<f64> {
        f.get(i)
            .context("short row")?
            .parse::<f64>()
            .context("number")
    };
    Ok(Stats {
        rows: num(0)? as u64,
        rate: num(1)?,
        p50: num(2)?,
        p99: num(3)?,
        max: num(4)?,
    })
}

fn produced(http: &ureq::Agent, url: &str) -> Result<u64> {
    Ok(metric(
        http,
        url,
        "gateway_metering_events_total{stage=\"produced\"}",
    )? as u64)
}

fn metric(http: &ureq::Agent, url: &str, series: &str) -> Result<f64> {
    let text = http
        .get(&format!("{url}/metrics"))
        .call()?
        .body_mut()
        .read_to_string()?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0))
}

fn wait_for_receiver(http: &ureq::Agent, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if http
            .get(&format!("http://127.0.0.1:{port}/"))
            .call()
            .is_ok()
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("billing-receiver did not answer on port {port}")
}
