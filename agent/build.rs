//! Builds `agent-ebpf` for the BPF target with aya-build and leaves the object in OUT_DIR
//! for the agent to embed. Without the eBPF toolchain (bpf-linker, nightly rust-src) it
//! writes an empty stub so host `cargo check`/`clippy` still work; the agent refuses to
//! start with a stub (see `ebpf_object.rs`), so no test can measure with it.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

fn main() -> Result<()> {
    println!("cargo:rerun-if-env-changed=TALLY_EBPF_STUB");
    println!("cargo:rerun-if-env-changed=PATH");
    let out = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?);
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../agent-ebpf");
    let forced_stub = env::var("TALLY_EBPF_STUB").is_ok_and(|v| v == "1");
    match toolchain_missing() {
        Some(why) if !forced_stub => stub(&out, &why),
        _ if forced_stub => stub(&out, "TALLY_EBPF_STUB=1"),
        _ => {
            let root = ebpf_dir.to_str().context("non-UTF-8 path")?;
            aya_build::build_ebpf(
                [aya_build::Package {
                    name: "agent-ebpf",
                    root_dir: root,
                    ..Default::default()
                }],
                aya_build::Toolchain::default(),
            )
        }
    }
}

/// Why the eBPF object cannot be built here, if it cannot.
fn toolchain_missing() -> Option<String> {
    let on_path = env::var_os("PATH")
        .map(|p| env::split_paths(&p).any(|d| d.join("bpf-linker").is_file()))
        .unwrap_or(false);
    if !on_path {
        return Some("bpf-linker is not on PATH".into());
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match sysroot {
        None => Some("the nightly toolchain is not installed".into()),
        Some(s)
            if !Path::new(&s)
                .join("lib/rustlib/src/rust/library/core")
                .is_dir() =>
        {
            Some("nightly rust-src is not installed".into())
        }
        Some(_) => None,
    }
}

fn stub(out: &Path, why: &str) -> Result<()> {
    println!(
        "cargo:warning=agent: building WITHOUT the eBPF object ({why}); the agent will refuse \
         to start. Run `cargo xtask setup` (or `cargo xtask build-ebpf`) to install the toolchain."
    );
    fs::write(out.join("agent-ebpf"), b"").context("write stub eBPF object")?;
    Ok(())
}
