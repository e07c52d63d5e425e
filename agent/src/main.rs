//! The `agent` binary: parses the configuration, loads the eBPF programs, and runs the
//! agent beside the gateway until SIGINT/SIGTERM.

use std::sync::Arc;

use agent::{
    auth::Credentials,
    config::Config,
    forward::{ForwarderConfig, HttpForwarder, Spool},
    metrics::Metrics,
    run::{RunOptions, run},
    workloads::GatewayWorkloads,
};
use anyhow::Context as _;
use clap::Parser as _;
use tokio::{net::TcpListener, signal::unix, sync::watch};
use tracing::info;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let layout = agent::cgroup::detect();
    info!(?layout, "cgroup layout");
    let spool = Spool::open(&config.spool_dir, config.spool_max_bytes)
        .context("opening the usage spool (--spool-dir)")?;
    info!(dir = %config.spool_dir.display(), events = spool.events(), "usage spool");
    let kernel = agent::loader::load_with(config.cpu_time).context("starting the kernel side")?;
    let credentials = Credentials::from_dir(&config.secret_mount_path);
    if credentials.is_none() {
        info!(dir = %config.secret_mount_path.display(), "no basic-auth files: calling the gateway without auth");
    }
    let metrics = Arc::new(Metrics::new()?);
    let (stop_tx, stop_rx) = watch::channel(false);
    // The forwarder stops after the main loop, so the events of its last drain are sent
    // (or spooled) too.
    let (forwarder_stop_tx, forwarder_stop_rx) = watch::channel(false);
    let (sink, forwarder) = HttpForwarder::spawn(
        ForwarderConfig {
            gateway_url: config.gateway_url.clone(),
            credentials: credentials.clone(),
            capacity: config.buffer_capacity,
            batch_size: config.batch_size,
            linger: std::time::Duration::from_millis(200),
            format: config.ingest_format,
        },
        Some(spool),
        metrics.clone(),
        forwarder_stop_rx,
    );
    let listener = TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| format!("binding {}", config.metrics_listen))?;
    info!(addr = %listener.local_addr()?, "serving /metrics");
    tokio::spawn(agent::metrics::serve(
        listener,
        metrics.clone(),
        stop_rx.clone(),
    ));
    let workloads = GatewayWorkloads::new(&config.gateway_url, credentials);
    let options = RunOptions {
        poll_interval: config.poll_interval(),
        synced: None,
        stats_interval: std::time::Duration::from_secs(5),
        bpf_stats: config.bpf_stats,
    };
    let agent = tokio::spawn(run(
        kernel,
        workloads,
        Arc::new(sink),
        metrics,
        options,
        stop_rx,
    ));
    let mut term = unix::signal(unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("shutting down: draining kernel records, flushing usage events");
    let _ = stop_tx.send(true);
    let stopped = agent.await;
    let _ = forwarder_stop_tx.send(true);
    // The forwarder spools what it cannot deliver within its own grace (5 s + one POST).
    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), forwarder).await;
    stopped??;
    Ok(())
}
