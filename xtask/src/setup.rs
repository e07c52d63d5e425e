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
];

pub fn ensure_all() -> Result<()> {
    ensure_packages(PACKAGES)?;
    crate::ebpf::ensure_toolchain()
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
