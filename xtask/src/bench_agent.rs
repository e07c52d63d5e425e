//! `cargo xtask bench agent`: gateway throughput with the node agent attached vs
//! detached in the same run, and the programs' kernel time per invocation.

use anyhow::{Result, bail};

pub fn run(_seconds: u32, _rounds: usize, _connections: u32) -> Result<()> {
    bail!("bench agent: not written yet")
}
