//! The provider trait: what the gateway needs from whatever runs the functions
//! (the embedded local provider now, Kubernetes next).

pub mod lease;
pub mod local;

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::watch;

use crate::logs::LogHub;
use crate::names::{FunctionRef, Namespace};
use crate::types::{FunctionDeployment, FunctionStatus, FunctionUsage};

pub use lease::{Lease, LoadGuard, ReplicaLoad};

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("function {0} not found")]
    NotFound(FunctionRef),
    #[error("namespace {0:?} is not served by this gateway")]
    UnknownNamespace(String),
    #[error("function {0} already exists")]
    Exists(FunctionRef),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("state: {0}")]
    State(String),
}

/// Why no replica could be leased for a request.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error("function {0} not found")]
    NotFound(FunctionRef),
    /// No ready replica now; `desired` is the replica count the function is scaled to.
    #[error("no ready replica (desired {desired})")]
    NotReady { desired: u64 },
    /// Every ready replica is at `max_inflight`.
    #[error("Concurrent request limit exceeded. Max concurrent requests: {0}")]
    AtCapacity(usize),
}

/// Where a leased request goes.
pub enum Upstream {
    /// A long-running server listening at this authority (`127.0.0.1:PORT`).
    Http(http::uri::Authority),
    /// Classic watchdog: one process per request.
    Fork(Arc<dyn ForkLauncher>),
}

/// Starts one process for one request, inside the replica's cgroup, as the function user.
pub trait ForkLauncher: Send + Sync {
    /// A command ready to spawn, with the deployment's env plus `cgi_env`.
    fn command(&self, cgi_env: &[(String, String)]) -> tokio::process::Command;
    /// Records a line of the process's stderr in the function's logs.
    fn log_stderr(&self, text: &str);
    /// The deployment's `content_type`, if it sets one.
    fn content_type(&self) -> Option<&str>;
}

/// One replica as the node agent sees it: where it runs and in which cgroup.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaInfo {
    pub namespace: String,
    pub function: String,
    pub replica: String,
    pub mode: &'static str,
    pub cgroup_path: Option<String>,
    pub cgroup_id: Option<u64>,
    pub memory_cgroup_path: Option<String>,
    pub memory_limit_bytes: Option<u64>,
    pub pids: Vec<u32>,
    pub port: Option<u16>,
    pub ready: bool,
    /// Times the replica's process was restarted after it ended.
    pub restarts: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplicaMap {
    pub cgroup: serde_json::Value,
    pub replicas: Vec<ReplicaInfo>,
}

#[async_trait]
pub trait Provider: Send + Sync {
    /// Name and orchestration shown by `/system/info`.
    fn name(&self) -> (&'static str, &'static str);
    fn namespaces(&self) -> Vec<Namespace>;
    async fn deploy(&self, deployment: FunctionDeployment) -> Result<(), ProviderError>;
    async fn update(&self, deployment: FunctionDeployment) -> Result<(), ProviderError>;
    async fn delete(&self, function: &FunctionRef) -> Result<(), ProviderError>;
    /// Statuses without `invocationCount` (the gateway fills it from its metrics).
    fn list(&self, namespace: &Namespace) -> Result<Vec<FunctionStatus>, ProviderError>;
    fn get(&self, function: &FunctionRef) -> Result<FunctionStatus, ProviderError>;
    async fn usage(&self, function: &FunctionRef) -> Result<FunctionUsage, ProviderError>;
    async fn scale(&self, function: &FunctionRef, replicas: u64) -> Result<(), ProviderError>;
    /// Scales a function at zero desired replicas to its minimum (at least 1).
    /// Returns whether this call started it (concurrent callers get `false`).
    async fn scale_from_zero(&self, function: &FunctionRef) -> Result<bool, ProviderError>;
    /// Picks the ready replica with the fewest requests in flight.
    fn acquire(&self, function: &FunctionRef) -> Result<Lease, AcquireError>;
    /// Ticks whenever any replica becomes ready or goes away.
    fn readiness(&self) -> watch::Receiver<u64>;
    fn logs(&self) -> &LogHub;
    fn replicas(&self) -> ReplicaMap;
    /// Stops every replica (draining in-flight requests first), keeping deployed state.
    async fn shutdown(&self);
}
