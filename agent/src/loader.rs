//! Loads the embedded eBPF object, checks that every tracepoint it needs exists (mounting
//! tracefs first if needed), attaches each program, and hands out the maps.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        RawTracePoint, TracePoint, raw_trace_point::RawTracePointLinkId,
        trace_point::TracePointLinkId,
    },
};
use aya_log::EbpfLogger;
use tracing::info;

use crate::{ebpf_object, error::Error, sys};
use agent_common::{CgroupMem, HttpRecord, ProcessRecord};

/// One program of `agent-ebpf` and the tracepoint it attaches to.
#[derive(Clone, Copy, Debug)]
pub struct Program {
    /// The program's name in the object.
    pub name: &'static str,
    /// The tracepoint's category (its directory under tracefs `events/`).
    pub category: &'static str,
    /// The tracepoint's name.
    pub tracepoint: &'static str,
    /// A raw tracepoint (attached by name, arguments as the kernel passes them) rather than
    /// a tracepoint (through perf, with the formatted record).
    pub raw: bool,
}

const fn tp(name: &'static str, category: &'static str, tracepoint: &'static str) -> Program {
    Program {
        name,
        category,
        tracepoint,
        raw: false,
    }
}

const fn raw(name: &'static str, category: &'static str, tracepoint: &'static str) -> Program {
    Program {
        name,
        category,
        tracepoint,
        raw: true,
    }
}

/// Every program of `agent-ebpf` that stays attached (the calibration one, [`CALIBRATION`],
/// runs only at start-up). Socket reads, writes and closes are seen through the raw
/// tracepoints `sock:sock_recv_length`, `sock:sock_send_length` and
/// `sock:inet_sock_set_state`, and a fork-mode process's call id and exit code through
/// `sched:*` (both from its saved registers): no program hooks syscalls, so no syscall of any
/// process takes the kernel's syscall-tracing slow path.
pub const PROGRAMS: &[Program] = &[
    tp("tally_exec", "sched", "sched_process_exec"),
    tp("tally_switch", "sched", "sched_switch"),
    tp("tally_exit", "sched", "sched_process_exit"),
    tp("tally_fork", "sched", "sched_process_fork"),
    tp("tally_rss", "kmem", "rss_stat"),
    tp("tally_attach", "cgroup", "cgroup_attach_task"),
    raw("tally_sock_recv", "sock", "sock_recv_length"),
    raw("tally_sock_send", "sock", "sock_send_length"),
    raw("tally_sock_state", "sock", "inet_sock_set_state"),
];

/// The program that locates the saved user registers at start-up (`crate::regs`): attached
/// to `raw_syscalls:sys_exit` for a moment, then detached.
pub const CALIBRATION: Program = raw("tally_calibrate", "raw_syscalls", "sys_exit");

pub const TRACEFS: &str = "/sys/kernel/tracing";

/// The loaded, attached programs and the maps user space works with. Dropping it detaches
/// every program (aya owns the links).
pub struct Kernel {
    /// Whether on-CPU time is measured (`sched_switch` loaded, attached on demand).
    pub cpu_time: bool,
    pub cpu_timer: CpuTimer,
    pub ebpf: Ebpf,
    pub logger: Option<EbpfLogger<&'static dyn log::Log>>,
    pub watched: HashMap<MapData, u64, u32>,
    /// Function cgroups (parents of replica cgroups) → mode, for discovery at exec.
    pub functions: HashMap<MapData, u64, u32>,
    /// Replica cgroups the kernel began watching by itself.
    pub new_cgroups: RingBuf<MapData>,
    pub cgroup_mem: HashMap<MapData, u64, CgroupMem>,
    pub process_events: RingBuf<MapData>,
    pub http_events: RingBuf<MapData>,
    pub stats: PerCpuArray<MapData, u64>,
    /// Open connections of http-mode replicas, swept for dead processes.
    pub conns: HashMap<MapData, u64, HttpRecord>,
    /// Metered fork-mode processes, swept for processes that left the cgroup.
    pub procs: HashMap<MapData, u32, ProcessRecord>,
    /// Exit times of http-mode processes, by tgid.
    pub exited: aya::maps::HashMap<MapData, u32, u64>,
    pub tgids: crate::tgids::Tgids,
    /// Every attached program's link but `sched_switch`'s, for pause and resume.
    pub attachments: Attachments,
}

/// A program's link, kept so that it can be detached.
enum Link {
    Raw(RawTracePointLinkId),
    Perf(TracePointLinkId),
}

/// The links of the programs in [`PROGRAMS`] (but `sched_switch`, see [`CpuTimer`]):
/// [`Attachments::pause`] detaches them all (the node then pays nothing, and nothing is
/// metered in the kernel), [`Attachments::resume`] attaches them again. The agent does so on
/// SIGUSR1 / SIGUSR2; `cargo xtask bench agent` alternates the two every second to measure
/// the agent's cost against its absence in the same seconds.
#[derive(Default)]
pub struct Attachments {
    links: Vec<(&'static str, Link)>,
}

impl Attachments {
    /// Attaches every program not attached yet.
    pub fn resume(&mut self, ebpf: &mut Ebpf) -> Result<(), Error> {
        for p in PROGRAMS {
            if p.name == CPU_TIME_PROGRAM || self.links.iter().any(|(n, _)| *n == p.name) {
                continue;
            }
            let name = p.name;
            let link = if p.raw {
                let prog: &mut RawTracePoint = typed(ebpf, name)?;
                Link::Raw(
                    prog.attach(p.tracepoint)
                        .map_err(|source| Error::Program { name, source })?,
                )
            } else {
                let prog: &mut TracePoint = typed(ebpf, name)?;
                Link::Perf(
                    prog.attach(p.category, p.tracepoint)
                        .map_err(|source| Error::Program { name, source })?,
                )
            };
            self.links.push((name, link));
        }
        Ok(())
    }

    /// Detaches every program this attached.
    pub fn pause(&mut self, ebpf: &mut Ebpf) -> Result<(), Error> {
        while let Some((name, link)) = self.links.pop() {
            match link {
                Link::Raw(id) => typed::<RawTracePoint>(ebpf, name)?.detach(id),
                Link::Perf(id) => typed::<TracePoint>(ebpf, name)?.detach(id),
            }
            .map_err(|source| Error::Program { name, source })?;
        }
        Ok(())
    }
}

/// Mounts tracefs at [`TRACEFS`] unless it is already there.
pub fn ensure_tracefs() -> Result<(), Error> {
    let path = Path::new(TRACEFS);
    if path.join("events").is_dir() {
        return Ok(());
    }
    info!(path = TRACEFS, "mounting tracefs");
    sys::mount_tracefs(path).map_err(|source| Error::Tracefs {
        path: path.into(),
        source,
    })
}

/// The first tracepoint the kernel does not offer, as an error naming it.
pub fn check_tracepoints(tracefs: &Path) -> Result<(), Error> {
    for p in PROGRAMS.iter().chain([&CALIBRATION]) {
        let path: PathBuf = tracefs.join("events").join(p.category).join(p.tracepoint);
        if !path.join("id").is_file() {
            return Err(Error::MissingTracepoint {
                category: p.category,
                name: p.tracepoint,
                path,
            });
        }
    }
    Ok(())
}

/// The program that times on-CPU slices (`cpu_ns`); it runs at every context switch of
/// the node, so it can be left out (`--cpu-time false`).
pub const CPU_TIME_PROGRAM: &str = "tally_switch";

/// The `sched_switch` program, attached only while fork-mode replicas are watched: it runs
/// at every context switch of the node, and only fork-mode events carry `cpu_ns`, so a node
/// serving only http-mode replicas does not pay for it.
pub struct CpuTimer {
    loaded: bool,
    link: Option<TracePointLinkId>,
}

impl CpuTimer {
    /// Attaches (`on`) or detaches the program; a no-op when it is already so, or when CPU
    /// time is off (`--cpu-time false`: the program was never loaded).
    pub fn set(&mut self, ebpf: &mut Ebpf, on: bool) -> Result<(), Error> {
        if !self.loaded || on == self.link.is_some() {
            return Ok(());
        }
        let name = CPU_TIME_PROGRAM;
        let prog: &mut TracePoint = typed(ebpf, name)?;
        match self.link.take() {
            Some(link) => {
                prog.detach(link)
                    .map_err(|source| Error::Program { name, source })?;
                info!("no fork-mode replica: sched_switch detached");
            }
            None => {
                self.link = Some(
                    prog.attach("sched", "sched_switch")
                        .map_err(|source| Error::Program { name, source })?,
                );
                info!("fork-mode replicas watched: sched_switch attached (cpu_ns)");
            }
        }
        Ok(())
    }

    /// Whether `sched_switch` is attached right now.
    pub fn attached(&self) -> bool {
        self.link.is_some()
    }
}

/// [`load_with`] with CPU-time tracking on.
pub fn load() -> Result<Kernel, Error> {
    load_with(true)
}

/// Root check, tracefs, tracepoints, load, attach; the whole start-up of the kernel side.
/// Without `cpu_time`, `sched_switch` is not attached and events carry no `cpu_ns`.
pub fn load_with(cpu_time: bool) -> Result<Kernel, Error> {
    let uid = sys::euid();
    if uid != 0 {
        return Err(Error::NotRoot(uid));
    }
    let object = ebpf_object::object()?;
    ensure_tracefs()?;
    check_tracepoints(Path::new(TRACEFS))?;
    let mut ebpf = aya::EbpfLoader::new()
        .map_max_entries(crate::tgids::MAP, crate::tgids::slots())
        .load(object)?;
    // The logger must outlive the programs and be polled (see `run`): dropping it closes the
    // log map the programs refer to.
    let logger = match EbpfLogger::init(&mut ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "aya-log unavailable; kernel diagnostics will not be shown");
            None
        }
    };
    crate::regs::calibrate(&mut ebpf)?;
    for p in PROGRAMS {
        let name = p.name;
        if name == CPU_TIME_PROGRAM && !cpu_time {
            continue;
        }
        let loaded = if p.raw {
            typed::<RawTracePoint>(&mut ebpf, name)?.load()
        } else {
            typed::<TracePoint>(&mut ebpf, name)?.load()
        };
        loaded.map_err(|source| Error::Program { name, source })?;
    }
    // `sched_switch` waits for the first fork-mode replica (`CpuTimer`).
    let mut attachments = Attachments::default();
    attachments.resume(&mut ebpf)?;
    info!(
        programs = PROGRAMS.len() - 1,
        cpu_time, "eBPF programs attached (sched_switch: while fork-mode replicas are watched)"
    );
    let watched = HashMap::try_from(take(&mut ebpf, "WATCHED")?)?;
    let functions = HashMap::try_from(take(&mut ebpf, "FUNCTIONS")?)?;
    let new_cgroups = RingBuf::try_from(take(&mut ebpf, "NEW_CGROUPS")?)?;
    let cgroup_mem = HashMap::try_from(take(&mut ebpf, "CGROUP_MEM")?)?;
    let process_events = RingBuf::try_from(take(&mut ebpf, "PROCESS_EVENTS")?)?;
    let http_events = RingBuf::try_from(take(&mut ebpf, "HTTP_EVENTS")?)?;
    let stats = PerCpuArray::try_from(take(&mut ebpf, "STATS")?)?;
    let conns = HashMap::try_from(take(&mut ebpf, "CONNS")?)?;
    let procs = HashMap::try_from(take(&mut ebpf, "PROCS")?)?;
    let exited = HashMap::try_from(take(&mut ebpf, "EXITED")?)?;
    let tgids = crate::tgids::Tgids::new(take(&mut ebpf, crate::tgids::MAP)?)?;
    Ok(Kernel {
        cpu_time,
        cpu_timer: CpuTimer {
            loaded: cpu_time,
            link: None,
        },
        ebpf,
        logger,
        watched,
        functions,
        new_cgroups,
        cgroup_mem,
        process_events,
        http_events,
        stats,
        conns,
        procs,
        exited,
        tgids,
        attachments,
    })
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, Error> {
    ebpf.take_map(name).ok_or(Error::MissingMap(name))
}

/// The program `name` of the object as its type (a tracepoint, a raw tracepoint).
fn typed<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    program(ebpf, name)?
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::Program, Error> {
    ebpf.program_mut(name).ok_or(Error::Program {
        name,
        source: aya::programs::ProgramError::NotLoaded,
    })
}
