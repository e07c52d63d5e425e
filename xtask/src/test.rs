//! `cargo xtask test`: every check CI runs — formatting, lints, the eBPF build, and
//! every test of the workspace against real processes, cgroups and the kernel.

use std::process::Command;

use anyhow::Result;

use crate::run_cmd;

pub fn run() -> Result<()> {
    // A full run rebuilds every crate once: incremental caches (~3 GB on a clean clone) only
    // cost disk and time there. An explicit CARGO_INCREMENTAL wins.
    if std::env::var_os("CARGO_INCREMENTAL").is_none() {
        // SAFETY: set before any thread is started; every child below inherits it.
        unsafe { std::env::set_var("CARGO_INCREMENTAL", "0") };
    }
    crate::setup::ensure_all()?;
    run_cmd(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
    run_cmd(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--quiet",
        "--",
        "-D",
        "warnings",
    ]))?;
    // Everything in deploy/ passes the tools' own checks.
    run_cmd(Command::new("promtool").args([
        "check",
        "config",
        "deploy/prometheus/prometheus.yml",
    ]))?;
    run_cmd(Command::new("amtool").args(["check-config", "deploy/alertmanager/alertmanager.yml"]))?;
    crate::ebpf::build()?;
    run_cmd(Command::new("cargo").args(["test", "--workspace", "--no-fail-fast"]))
}
