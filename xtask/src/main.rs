//! `cargo xtask`: the project's automation — install what is missing, start the stack,
//! run every test, run benchmarks, build the eBPF object.

mod ebpf;
mod setup;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Tally's project automation")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (apt packages, rust-src, bpf-linker); fast when present.
    Setup,
    /// Build the eBPF object of agent-ebpf.
    BuildEbpf,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::ensure_all(),
        Task::BuildEbpf => ebpf::build(),
    }
}
