//! The agent's error type: one variant per thing that can stop it, each with a message that
//! says what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the agent must run as root (effective uid {0}): it loads eBPF programs")]
    NotRoot(u32),
    #[error(
        "this agent was built without its eBPF object (no bpf-linker / nightly rust-src at \
         build time); run `cargo xtask setup` and rebuild"
    )]
    NoEbpfObject,
    #[error("could not mount tracefs at {path}: {source}")]
    Tracefs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the kernel lacks the tracepoint {category}:{name} (no {path})")]
    MissingTracepoint {
        category: &'static str,
        name: &'static str,
        path: PathBuf,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("locating the saved user registers on the kernel stack: {0}")]
    Calibration(&'static str),
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("aya-log: {0}")]
    Log(#[from] aya_log::Error),
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("workload source: {0}")]
    Workloads(String),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("usage spool: {0}")]
    Spool(#[from] crate::forward::SpoolError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
