//! The agent's own Prometheus metrics and the `/metrics` endpoint: kernel-measured duration
//! and memory per function, the fate of usage events, kernel drops, and eBPF run time.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus::{
    Encoder as _, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use tokio::{net::TcpListener, sync::watch};

use crate::error::Error;

/// Every metric the agent exports, registered in its own registry.
pub struct Metrics {
    pub registry: Registry,
    pub duration: HistogramVec,
    pub memory_peak: GaugeVec,
    pub events_sent: IntCounter,
    pub events_buffered: IntGauge,
    pub events_spooled: IntGauge,
    pub spool_bytes: IntGauge,
    pub events_spilled: IntCounter,
    pub events_dropped: IntCounterVec,
    pub kernel_drops: IntCounterVec,
    pub unmatched_records: IntCounter,
    pub replicas_discovered: IntCounter,
    /// 1 while the kernel programs are attached, 0 while paused (SIGUSR1).
    pub programs_attached: IntGauge,
    pub bpf_run_time: GaugeVec,
    pub bpf_run_count: GaugeVec,
}

impl Metrics {
    pub fn new() -> Result<Self, Error> {
        let registry = Registry::new();
        let fn_labels = &["namespace", "function"];
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "tally_agent_invocation_duration_seconds",
                "Kernel-measured duration of function invocations",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16)?),
            fn_labels,
        )?;
        let memory_peak = GaugeVec::new(
            Opts::new(
                "tally_agent_memory_peak_bytes",
                "Peak RSS of the last invocation",
            ),
            fn_labels,
        )?;
        let events_sent =
            IntCounter::new("tally_agent_events_sent_total", "Usage events delivered")?;
        let events_buffered = IntGauge::new(
            "tally_agent_events_buffered",
            "Usage events waiting for the gateway",
        )?;
        let events_spooled = IntGauge::new(
            "tally_agent_events_spooled",
            "Usage events waiting for the gateway in the on-disk spool",
        )?;
        let spool_bytes = IntGauge::new("tally_agent_spool_bytes", "Bytes in the on-disk spool")?;
        let events_spilled = IntCounter::new(
            "tally_agent_events_spilled_total",
            "Usage events moved from memory to the on-disk spool",
        )?;
        let events_dropped = IntCounterVec::new(
            Opts::new(
                "tally_agent_events_dropped_total",
                "Usage events lost, by reason",
            ),
            &["reason"],
        )?;
        let kernel_drops = IntCounterVec::new(
            Opts::new(
                "tally_agent_kernel_drops_total",
                "Records the eBPF programs gave up on",
            ),
            &["slot"],
        )?;
        let unmatched_records = IntCounter::new(
            "tally_agent_unmatched_records_total",
            "Kernel records from cgroups no known replica owns",
        )?;
        let replicas_discovered = IntCounter::new(
            "tally_agent_replicas_discovered_total",
            "Replica cgroups the kernel began watching at their first exec, before the workload source listed them",
        )?;
        let programs_attached = IntGauge::new(
            "tally_agent_programs_attached",
            "1 while the eBPF programs are attached; 0 while paused by SIGUSR1 (resumed by SIGUSR2)",
        )?;
        let bpf_run_time = GaugeVec::new(
            Opts::new(
                "tally_agent_bpf_run_time_seconds",
                "Cumulative run time (bpf_stats)",
            ),
            &["program"],
        )?;
        let bpf_run_count = GaugeVec::new(
            Opts::new("tally_agent_bpf_run_count", "Cumulative runs (bpf_stats)"),
            &["program"],
        )?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(memory_peak.clone()))?;
        registry.register(Box::new(events_sent.clone()))?;
        registry.register(Box::new(events_buffered.clone()))?;
        registry.register(Box::new(events_spooled.clone()))?;
        registry.register(Box::new(spool_bytes.clone()))?;
        registry.register(Box::new(events_spilled.clone()))?;
        registry.register(Box::new(events_dropped.clone()))?;
        registry.register(Box::new(kernel_drops.clone()))?;
        registry.register(Box::new(unmatched_records.clone()))?;
        registry.register(Box::new(replicas_discovered.clone()))?;
        registry.register(Box::new(programs_attached.clone()))?;
        registry.register(Box::new(bpf_run_time.clone()))?;
        registry.register(Box::new(bpf_run_count.clone()))?;
        Ok(Self {
            registry,
            duration,
            memory_peak,
            events_sent,
            events_buffered,
            events_spooled,
            spool_bytes,
            events_spilled,
            events_dropped,
            kernel_drops,
            unmatched_records,
            replicas_discovered,
            programs_attached,
            bpf_run_time,
            bpf_run_count,
        })
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    loop {
        let (stream, _): (_, SocketAddr) = tokio::select! {
            r = listener.accept() => r?,
            _ = shutdown.changed() => return Ok(()),
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(metrics.render())))
                    } else {
                        Response::builder()
                            .status(404)
                            .body(Full::new(Bytes::new()))
                    };
                    Ok::<_, Infallible>(resp.unwrap_or_default())
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
