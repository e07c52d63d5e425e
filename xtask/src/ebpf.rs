//! The agent's eBPF side: installing its toolchain (nightly rust-src, LLVM 22, bpf-linker)
//! idempotently, and building `agent-ebpf` for `bpfel-unknown-none` before the agent that
//! embeds it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// LLVM 22 is rustc's LLVM; bpf-linker must link against the same major version.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages bpf-linker builds against, each with a file that proves it is installed.
const LLVM_PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "/usr/lib/llvm-22/lib/libLLVM.so"),
    ("libpolly-22-dev", "/usr/lib/llvm-22/lib/libPolly.a"),
    ("libzstd-dev", "/usr/include/zstd.h"),
    ("zlib1g-dev", "/usr/include/zlib.h"),
];

/// Installs what is missing; with everything present it only looks at a few files (< 1 s,
/// no network).
pub fn ensure_toolchain() -> Result<()> {
    let sysroot = match nightly_sysroot() {
        Some(s) => s,
        None => {
            eprintln!("xtask: installing the nightly toolchain");
            crate::run_cmd(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]))?;
            nightly_sysroot().context("nightly installed but `rustc --print sysroot` fails")?
        }
    };
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        eprintln!("xtask: adding rust-src to nightly");
        crate::run_cmd(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if bpf_linker().is_none() {
        crate::setup::ensure_packages(LLVM_PACKAGES)?;
        eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (~1.5 min)");
        crate::run_cmd(
            Command::new("cargo")
                .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
                .env("LLVM_PREFIX", LLVM_PREFIX),
        )?;
        if bpf_linker().is_none() {
            bail!("bpf-linker installed but not on PATH (add ~/.cargo/bin to PATH)");
        }
    }
    Ok(())
}

/// Builds the eBPF object (`target/bpfel-unknown-none/release/agent-ebpf`), then the agent,
/// whose build script embeds the same programs.
pub fn build() -> Result<()> {
    ensure_toolchain()?;
    let root = crate::root();
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--release",
        "-Z",
        "build-std=core",
    ])
    .args([
        "--target",
        "bpfel-unknown-none",
        "--package",
        "agent-ebpf",
        "--bins",
    ])
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
    );
    for key in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
    ] {
        cmd.env_remove(key);
    }
    crate::run_cmd(&mut cmd)?;
    let object = target_dir(&root).join("bpfel-unknown-none/release/agent-ebpf");
    check_object(&object)?;
    eprintln!("xtask: eBPF object {}", object.display());
    let mut agent = Command::new("cargo");
    agent
        .args(["build", "--package", "agent"])
        .env_remove("TALLY_EBPF_STUB");
    crate::run_cmd(&mut agent)
}

fn nightly_sysroot() -> Option<PathBuf> {
    let out = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn bpf_linker() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

/// The object must be a little-endian eBPF ELF (machine 247) that is not empty.
fn check_object(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let ok = bytes.len() > 64 && bytes[..4] == *b"\x7fELF" && bytes[5] == 1 && bytes[18] == 247;
    if !ok {
        bail!("{} is not a little-endian eBPF ELF object", path.display());
    }
    Ok(())
}
