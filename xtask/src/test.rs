//! `cargo xtask test`: every check CI runs — formatting, lints, the eBPF build, and
//! every test of the workspace against real processes, cgroups and the kernel.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, ensure};

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
    // The alert rules fire when (and only when) they should: Prometheus's rule unit tests.
    run_cmd(Command::new("promtool").args([
        "test",
        "rules",
        "deploy/prometheus/alert.rules.test.yml",
    ]))?;
    crate::ebpf::build()?;
    tests_with_failures_repeated()
}

/// `cargo test --workspace --no-fail-fast`, its output passed through as it comes; when it
/// fails, every failing binary's `failures:` section (the panics and the tests' captured
/// output) is printed again at the end, where a log's tail shows it.
fn tests_with_failures_repeated() -> Result<()> {
    let mut child = Command::new("cargo")
        .args(["test", "--workspace", "--no-fail-fast"])
        .current_dir(crate::root())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let stdout = child.stdout.take().context("cargo test's stdout")?;
    let mut failures = String::new();
    let mut in_failures = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        if line == "failures:" {
            in_failures = true;
        }
        if in_failures {
            failures.push_str(&line);
            failures.push('\n');
        }
        if line.starts_with("test result: ") {
            in_failures = false;
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    if !status.success() && !failures.is_empty() {
        println!("\n==== the failures above, repeated ====\n{failures}");
    }
    ensure!(status.success(), "cargo test failed with {status}");
    Ok(())
}
