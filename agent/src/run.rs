//! The agent's main loop: keeps the kernel's cgroup map in step with the workload source,
//! drains both ring buffers into the joiner, hands events to the sink, polls aya-log, and
//! refreshes the kernel-side metrics — until shutdown, after a last drain.

use std::{sync::Arc, time::Duration};

use agent_common::{CgroupMem, HttpRecord, NewCgroup, ProcessRecord};
use aya::maps::{MapData, RingBuf};
use prometheus::{Gauge, Histogram};
use tokio::{signal::unix, sync::watch};
use tracing::{info, warn};

use crate::{
    error::Error,
    event::UsageEvent,
    forward::EventSink,
    join::{Joiner, Skip},
    loader::Kernel,
    metrics::Metrics,
    replicas::ReplicaMaps,
    sys,
    workloads::WorkloadSource,
};

/// How often the ring buffers are drained without a wakeup: the kernel wakes the agent only
/// once 1 MiB of http records (64 KiB of process records) wait (`HTTP_WAKE_AT`,
/// `PROCESS_WAKE_AT` in agent-ebpf), so a busy node costs a timer tick per 10 ms, not a
/// wakeup per invocation, and a quiet one delivers within this interval.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(10);

/// An http record carries its fixed fields and then only the request head bytes it holds.
const HTTP_RECORD_MIN: usize = std::mem::offset_of!(HttpRecord, head);

/// Tunables of the main loop.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// How often the workload source is asked for replicas.
    pub poll_interval: Duration,
    /// Bumped after every successful sync of the cgroup map (tests wait on it).
    pub synced: Option<watch::Sender<u64>>,
    /// How often bpf_stats and drop counters are copied into metrics, and dead processes'
    /// kernel state is swept.
    pub stats_interval: Duration,
    /// Turn on the kernel's `bpf_stats` (run time and count of each program) while the agent
    /// runs, for `tally_agent_bpf_run_{time_seconds,count}`.
    pub bpf_stats: bool,
}
const STAT_NAMES: [&str; 8] = [
    "process_ringbuf_full",
    "http_ringbuf_full",
    "conn_map_full",
    "process_map_full",
    "mm_map_full",
    "cgroup_mem_map_full",
    "watched_map_full",
    "cgroup_ringbuf_full",
];

/// Runs the agent on a loaded [`Kernel`] until `shutdown` turns true.
pub async fn run<W: WorkloadSource, S: EventSink>(
    kernel: Kernel,
    workloads: W,
    sink: Arc<S>,
    metrics: Arc<Metrics>,
    options: RunOptions,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let Kernel {
        cpu_time,
        mut cpu_timer,
        mut ebpf,
        logger,
        watched,
        functions,
        new_cgroups,
        cgroup_mem,
        process_events,
        http_events,
        stats,
        mut conns,
        mut procs,
        exited,
        tgids,
        mut attachments,
    } = kernel;
    metrics.programs_attached.set(1);
    let mut pause = unix::signal(unix::SignalKind::user_defined1())?;
    let mut resume = unix::signal(unix::SignalKind::user_defined2())?;
    // Keep the fd: bpf_stats stay enabled while it is open.
    // Off by default: with the kernel's stats on, every program run (here: every syscall of
    // the node, twice) also reads the clock twice, ≈ 100 ns a run on our VMs.
    let _stats_fd = if options.bpf_stats {
        aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .inspect_err(
                |e| warn!(error = %e, "could not enable bpf_stats: no eBPF run-time metrics"),
            )
            .ok()
    } else {
        None
    };
    let mut replicas = ReplicaMaps::new(watched, functions, cgroup_mem, tgids);
    let mut new_cgroups = sys::readable(new_cgroups)?;
    let mut process_events = sys::readable(process_events)?;
    let mut http_events = sys::readable(http_events)?;
    let mut logger = match logger {
        Some(l) => Some(sys::readable(l)?),
        None => None,
    };
    let mut joiner = Joiner::new(sys::realtime_offset_ns()).with_cpu_time(cpu_time);
    let mut poll = tokio::time::interval(options.poll_interval);
    let mut stats_tick = tokio::time::interval(options.stats_interval);
    let mut drain_tick = tokio::time::interval(DRAIN_INTERVAL);
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut syncs = 0u64;
    let mut outbox = Outbox {
        sink: &*sink,
        metrics: &metrics,
        per_function: FunctionMetrics::default(),
        pending: Vec::new(),
    };
    loop {
        tokio::select! {
            _ = poll.tick() => {
                match workloads.replicas().await {
                    Ok(list) => {
                        replicas.sync(list, &mut joiner);
                        // While any fork-mode function may run (scaled to zero included).
                        if let Err(e) = cpu_timer.set(&mut ebpf, replicas.has_fork()) {
                            warn!(error = %e, "sched_switch could not be (de)tached; cpu_ns may be missing");
                        }
                        syncs += 1;
                        if let Some(tx) = &options.synced {
                            let _ = tx.send(syncs);
                        }
                    }
                    Err(e) => warn!(error = %e, "workload source failed; keeping the current replicas"),
                }
                joiner.expire();
            }
            _ = drain_tick.tick() => {
                drain_new(new_cgroups.get_mut(), &mut replicas, &mut joiner, &metrics);
                drain_processes(process_events.get_mut(), &mut joiner, &mut outbox);
                drain_http(http_events.get_mut(), &mut joiner, &mut outbox);
            }
            guard = new_cgroups.readable_mut() => {
                let mut guard = guard?;
                drain_new(guard.get_inner_mut(), &mut replicas, &mut joiner, &metrics);
                guard.clear_ready();
            }
            guard = process_events.readable_mut() => {
                let mut guard = guard?;
                // A record may come from a replica found after the last look at NEW_CGROUPS.
                drain_new(new_cgroups.get_mut(), &mut replicas, &mut joiner, &metrics);
                drain_processes(guard.get_inner_mut(), &mut joiner, &mut outbox);
                guard.clear_ready();
            }
            guard = http_events.readable_mut() => {
                let mut guard = guard?;
                drain_new(new_cgroups.get_mut(), &mut replicas, &mut joiner, &metrics);
                drain_http(guard.get_inner_mut(), &mut joiner, &mut outbox);
                guard.clear_ready();
            }
            guard = async { logger.as_mut().expect("guarded").readable_mut().await }, if logger.is_some() => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = stats_tick.tick() => {
                kernel_stats(&ebpf, &stats, &metrics);
                sweep(&mut conns, &mut procs, &exited, replicas.cgroup_mem(), &mut joiner, &mut outbox);
            }
            _ = pause.recv() => {
                match attachments.pause(&mut ebpf) {
                    Ok(()) => {
                        metrics.programs_attached.set(0);
                        info!("SIGUSR1: eBPF programs detached (nothing is metered in the kernel until SIGUSR2)");
                    }
                    Err(e) => warn!(error = %e, "SIGUSR1: could not detach every program"),
                }
            }
            _ = resume.recv() => {
                match attachments.resume(&mut ebpf) {
                    Ok(()) => {
                        metrics.programs_attached.set(1);
                        info!("SIGUSR2: eBPF programs attached again");
                    }
                    Err(e) => warn!(error = %e, "SIGUSR2: could not attach every program"),
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    drain_new(new_cgroups.get_mut(), &mut replicas, &mut joiner, &metrics);
    drain_processes(process_events.get_mut(), &mut joiner, &mut outbox);
    drain_http(http_events.get_mut(), &mut joiner, &mut outbox);
    info!("agent stopped; eBPF programs detach now");
    Ok(())
}

/// Events an [`Outbox`] holds at most before it hands them over (a drain of a full ring
/// would otherwise hold all of them, beside the forwarder's own bounded buffer).
const OUTBOX_MAX: usize = 1024;

/// The events of one drain on their way to the sink: counted in the per-function metrics
/// as they come, handed over together ([`EventSink::submit_all`]: one lock and one wakeup
/// of the forwarder per drain, not per event).
struct Outbox<'a> {
    sink: &'a dyn EventSink,
    metrics: &'a Metrics,
    per_function: FunctionMetrics,
    pending: Vec<UsageEvent>,
}

impl Outbox<'_> {
    fn push(&mut self, ev: UsageEvent) {
        self.per_function.observe(self.metrics, &ev);
        self.pending.push(ev);
        if self.pending.len() >= OUTBOX_MAX {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if !self.pending.is_empty() {
            self.sink.submit_all(&mut self.pending);
        }
    }
}

/// The per-function handles of the two metrics every event updates, so that an event costs
/// no label hashing and no lock (`with_label_values` does both, twice per event).
#[derive(Default)]
struct FunctionMetrics {
    known: Vec<(Arc<str>, Arc<str>, Histogram, Gauge)>,
}

/// Functions whose handles are kept; past it the list starts over (deleted functions'
/// handles go with it).
const FUNCTION_METRICS_MAX: usize = 256;

impl FunctionMetrics {
    fn observe(&mut self, metrics: &Metrics, ev: &UsageEvent) {
        let found = self
            .known
            .iter()
            .position(|(ns, f, ..)| *f == ev.function_name && *ns == ev.namespace);
        let i = match found {
            Some(i) => i,
            None => {
                if self.known.len() >= FUNCTION_METRICS_MAX {
                    self.known.clear();
                }
                let labels = [&*ev.namespace, &*ev.function_name];
                self.known.push((
                    ev.namespace.clone(),
                    ev.function_name.clone(),
                    metrics.duration.with_label_values(&labels),
                    metrics.memory_peak.with_label_values(&labels),
                ));
                self.known.len() - 1
            }
        };
        let (.., duration, memory_peak) = &self.known[i];
        duration.observe(ev.duration_ns as f64 / 1e9);
        memory_peak.set(ev.memory_peak_bytes as f64);
    }
}

/// Names the replicas the kernel began watching by itself (before their records).
fn drain_new(
    ring: &mut RingBuf<MapData>,
    replicas: &mut ReplicaMaps,
    joiner: &mut Joiner,
    metrics: &Metrics,
) {
    while let Some(item) = ring.next() {
        if let Some(r) = sys::decode::<NewCgroup>(&item) {
            replicas.discovered(&r, joiner, metrics);
        }
    }
}

fn drain_processes(ring: &mut RingBuf<MapData>, joiner: &mut Joiner, outbox: &mut Outbox<'_>) {
    while let Some(item) = ring.next() {
        let Some(r) = sys::decode::<ProcessRecord>(&item) else {
            continue;
        };
        match joiner.process(&r) {
            Ok(ev) => outbox.push(ev),
            Err(Skip::UnknownCgroup(_)) => outbox.metrics.unmatched_records.inc(),
            Err(Skip::Child) => {}
        }
    }
    outbox.flush();
}

fn drain_http(ring: &mut RingBuf<MapData>, joiner: &mut Joiner, outbox: &mut Outbox<'_>) {
    // One record for the whole drain, each item copied over it: only the bytes it carries.
    let mut r: Box<HttpRecord> = Box::new(sys::zeroed());
    while let Some(item) = ring.next() {
        let n = sys::decode_prefix_into(&item, HTTP_RECORD_MIN, &mut *r);
        if n == 0 {
            continue;
        }
        // Head bytes past the item's end are an earlier record's: never read as this one's.
        r.head_len = r.head_len.min((n - HTTP_RECORD_MIN) as u32);
        match joiner.http(&r) {
            Ok(ev) => outbox.push(ev),
            Err(_) => outbox.metrics.unmatched_records.inc(),
        }
    }
    outbox.flush();
}

/// Removes kernel state of processes that are gone. The kernel ends a connection when its
/// TCP socket closes, at the process's exit too; one that outlives its reader (the socket
/// shared with a process outside the replica) stays in CONNS: an exchange still open there
/// (the replica died mid-request) is reported with what was seen (status 0 if no response).
fn sweep(
    conns: &mut aya::maps::HashMap<MapData, u64, HttpRecord>,
    procs: &mut aya::maps::HashMap<MapData, u32, ProcessRecord>,
    exited: &aya::maps::HashMap<MapData, u32, u64>,
    cgroup_mem: &mut aya::maps::HashMap<MapData, u64, CgroupMem>,
    joiner: &mut Joiner,
    outbox: &mut Outbox<'_>,
) {
    let metrics = outbox.metrics;
    let alive = |tgid: u32| std::path::Path::new(&format!("/proc/{tgid}")).exists();
    let dead: Vec<u64> = conns
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, r)| !alive(r.tgid))
        .map(|(k, _)| k)
        .collect();
    for key in dead {
        if let Ok(mut r) = conns.get(&key, 0)
            && r.state != agent_common::conn::IDLE
        {
            if r.state == agent_common::conn::REQUEST || r.end_ns == 0 {
                // No response (or none finished): it ended when the process died.
                r.end_ns = exited
                    .get(&r.tgid, 0)
                    .unwrap_or_else(|_| sys::monotonic_ns());
            }
            r.end_reason = agent_common::end::CLOSE;
            // Close the exchange's memory window as the kernel would have (racy but rare).
            if let Ok(mut m) = cgroup_mem.get(&r.cgroup_id, 0) {
                r.peak_rss_bytes = m.peak;
                m.active = m.active.saturating_sub(1);
                let _ = cgroup_mem.insert(r.cgroup_id, m, 2); // BPF_EXIST
            }
            match joiner.http(&r) {
                Ok(ev) => outbox.push(ev),
                Err(_) => metrics.unmatched_records.inc(),
            }
        }
        let _ = conns.remove(&key);
    }
    outbox.flush();
    let dead: Vec<u32> = procs
        .keys()
        .filter_map(Result::ok)
        .filter(|&t| !alive(t))
        .collect();
    for tgid in dead {
        // Exited outside a watched cgroup (moved away): no exit time was taken.
        let _ = procs.remove(&tgid);
        metrics
            .kernel_drops
            .with_label_values(&["process_left_cgroup"])
            .inc();
    }
}

/// Copies bpf_stats run time/count per program and the kernel's drop counters into metrics.
fn kernel_stats(ebpf: &aya::Ebpf, stats: &aya::maps::PerCpuArray<MapData, u64>, metrics: &Metrics) {
    for (name, prog) in ebpf.programs() {
        if let Ok(info) = prog.info() {
            metrics
                .bpf_run_time
                .with_label_values(&[name])
                .set(info.run_time().as_secs_f64());
            metrics
                .bpf_run_count
                .with_label_values(&[name])
                .set(info.run_count() as f64);
        }
    }
    for (slot, name) in STAT_NAMES.iter().enumerate() {
        if let Ok(values) = stats.get(&(slot as u32), 0) {
            let total: u64 = values.iter().sum();
            let c = metrics.kernel_drops.with_label_values(&[name]);
            let seen = c.get();
            if total > seen {
                c.inc_by(total - seen);
            }
        }
    }
}
