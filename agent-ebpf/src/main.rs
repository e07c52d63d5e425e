//! Tally's kernel programs (one per file), built for `bpfel-unknown-none`.
//! On the host this crate is an empty binary so workspace builds need no eBPF toolchain.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
