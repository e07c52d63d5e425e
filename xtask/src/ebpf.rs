//! Building the agent's eBPF object (placeholder until the agent lands).

use anyhow::{Result, bail};

pub fn build() -> Result<()> {
    bail!("build-ebpf: agent-ebpf is not in the tree yet")
}
