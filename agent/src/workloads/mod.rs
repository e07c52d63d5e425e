//! Where the agent learns which function replicas run on this node and in which cgroup:
//! the `WorkloadSource` trait, with the gateway's local provider and a fixed list behind it.

mod fixed;
mod gateway;

use std::{future::Future, path::PathBuf};

use serde::Deserialize;

pub use fixed::FixedWorkloads;
pub use gateway::GatewayWorkloads;

use crate::error::Error;

/// How a replica serves invocations, which decides what the kernel measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A process per request (exec → exit).
    Fork,
    /// A long-running HTTP/1.x server (request → response on its sockets).
    Http,
}

/// One function replica as the provider describes it (`GET /system/replicas`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Replica {
    pub namespace: String,
    pub function: String,
    pub replica: String,
    pub mode: Mode,
    /// The replica's cgroup v2 directory.
    pub cgroup_path: PathBuf,
    /// Its inode, as the kernel reports it; read from `cgroup_path` when absent.
    #[serde(default)]
    pub cgroup_id: Option<u64>,
    #[serde(default)]
    pub memory_cgroup_path: Option<PathBuf>,
    #[serde(default)]
    pub memory_limit_bytes: Option<u64>,
    #[serde(default)]
    pub pids: Vec<u32>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "yes")]
    pub ready: bool,
}

fn yes() -> bool {
    true
}

/// Discovers the replicas to meter; polled by the agent, which keeps the kernel's cgroup map
/// in step with the answer.
pub trait WorkloadSource: Send + Sync + 'static {
    fn replicas(&self) -> impl Future<Output = Result<Vec<Replica>, Error>> + Send;
}
