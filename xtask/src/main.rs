//! `cargo xtask`: the project's automation — install what is missing, start the stack,
//! run every test, run benchmarks, build the eBPF object.

mod bench;
mod bench_agent;
mod bench_billing;
mod bench_fork;
mod bench_ingest;
mod bench_syscalls;
mod bench_toggle;
mod ebpf;
mod setup;
mod stack;
mod test;
mod up;
mod wrk;

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
    /// Start the whole stack on the embedded default, with the example functions.
    Up(up::Args),
    /// Run every check and test (what CI runs).
    Test,
    /// Run the benchmarks and print their figures (for BENCHMARKS.md).
    Bench(bench::Args),
    /// Build the eBPF object of agent-ebpf.
    BuildEbpf,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::ensure_all(),
        Task::Up(args) => up::run(args),
        Task::Test => test::run(),
        Task::Bench(args) => bench::run(args),
        Task::BuildEbpf => ebpf::build(),
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Runs a command in the workspace root, failing with its command line if it fails.
pub fn run_cmd(cmd: &mut std::process::Command) -> Result<()> {
    cmd.current_dir(root());
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("starting {cmd:?}: {e}"))?;
    anyhow::ensure!(status.success(), "{cmd:?} failed with {status}");
    Ok(())
}

/// An `Authorization: Basic` header value.
pub fn basic_auth(user: &str, password: &str) -> String {
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {token}")
}
