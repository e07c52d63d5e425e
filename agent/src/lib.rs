//! Tally's node agent: meters every function invocation in the kernel (eBPF tracepoints),
//! joins the kernel's records into usage events, and forwards them to the gateway.
//!
//! Data flow: `workloads` (which replicas, which cgroups) → `replicas` (the kernel's cgroup
//! maps) and `loader` (programs attached) → kernel records → `join` → `event::UsageEvent` → `forward` (gateway) and
//! `metrics`.

pub mod auth;
pub mod cgroup;
pub mod config;
pub mod ebpf_object;
pub mod error;
pub mod event;
pub mod forward;
pub mod join;
pub mod loader;
pub mod metrics;
pub mod records;
pub mod regs;
pub mod replicas;
pub mod run;
pub mod sys;
pub mod tgids;
pub mod workloads;

pub use error::Error;
