//! One deployed function in the local provider: its deployment, its replica set and
//! how requests pick a replica (the ready one with the fewest requests in flight, ties
//! taken in turn so that idle replicas share a light load).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use rand::Rng;

use super::Shared;
use super::replica::Replica;
use super::spec::RunSpec;
use crate::names::FunctionRef;
use crate::provider::{AcquireError, Lease, ReplicaInfo, Upstream};
use crate::types::{FunctionDeployment, FunctionStatus, FunctionUsage};

use super::spec::RunMode;

pub struct FunctionSlot {
    pub fref: FunctionRef,
    /// Serialises changes (update, scale, delete) to this function.
    pub control: tokio::sync::Mutex<()>,
    pub deployment: RwLock<(FunctionDeployment, Arc<RunSpec>)>,
    pub created_at: DateTime<Utc>,
    desired: AtomicU64,
    /// Where the next pick starts among equally loaded replicas.
    turn: AtomicUsize,
    replicas: RwLock<Vec<Arc<Replica>>>,
    cpu_sample: Mutex<Option<(Instant, u64)>>,
}

impl FunctionSlot {
    pub fn new(
        fref: FunctionRef,
        deployment: FunctionDeployment,
        spec: Arc<RunSpec>,
        created_at: DateTime<Utc>,
    ) -> Self {
        Self {
            fref,
            control: tokio::sync::Mutex::new(()),
            deployment: RwLock::new((deployment, spec)),
            created_at,
            desired: AtomicU64::new(0),
            turn: AtomicUsize::new(0),
            replicas: RwLock::default(),
            cpu_sample: Mutex::default(),
        }
    }

    pub fn desired(&self) -> u64 {
        self.desired.load(Ordering::Acquire)
    }

    pub fn spec(&self) -> Arc<RunSpec> {
        read(&self.deployment).1.clone()
    }

    pub fn deployment(&self) -> FunctionDeployment {
        read(&self.deployment).0.clone()
    }

    fn replicas(&self) -> Vec<Arc<Replica>> {
        read(&self.replicas).clone()
    }

    /// Leases the routable replica with the fewest requests in flight; among equals, the
    /// next in turn. (Ties are the rule under light load, where calls rarely overlap: the
    /// first replica would otherwise serve them all, and a new one would stay idle.)
    pub fn acquire(&self) -> Result<Lease, AcquireError> {
        let replicas = read(&self.replicas);
        let mut routable: Vec<&Arc<Replica>> = replicas.iter().filter(|r| r.routable()).collect();
        if routable.is_empty() {
            return Err(AcquireError::NotReady {
                desired: self.desired(),
            });
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed) % routable.len();
        routable.rotate_left(turn);
        // Stable: equally loaded replicas keep their turn order.
        routable.sort_by_key(|r| r.load.inflight());
        let max = routable[0].spec.max_inflight;
        for r in routable {
            if let Some(guard) = r.load.try_acquire(r.spec.max_inflight) {
                let upstream = match r.spec.mode {
                    RunMode::Http => Upstream::Http(r.authority()),
                    RunMode::Fork => Upstream::Fork(r.clone()),
                };
                return Ok(Lease {
                    upstream,
                    replica: r.name.clone(),
                    exec_timeout: r.spec.exec_timeout,
                    memory_limit: r.spec.limits.memory_bytes,
                    guard,
                });
            }
        }
        Err(AcquireError::AtCapacity(max))
    }

    /// Starts or retires replicas until `n` are active. Call with `control` held.
    pub fn scale_to(&self, shared: &Arc<Shared>, n: u64, grace: Duration) -> std::io::Result<()> {
        self.desired.store(n, Ordering::Release);
        let spec = self.spec();
        let mut replicas = write(&self.replicas);
        while (replicas.len() as u64) < n {
            let name = replica_name(&self.fref);
            let r = Replica::new(shared.clone(), self.fref.clone(), name, spec.clone());
            match r {
                Ok(r) => replicas.push(r),
                Err(e) => {
                    self.desired.store(replicas.len() as u64, Ordering::Release);
                    return Err(e);
                }
            }
        }
        while (replicas.len() as u64) > n {
            if let Some(r) = replicas.pop() {
                tokio::spawn(r.retire(grace));
            }
        }
        Ok(())
    }

    /// Swaps in a new deployment: new replicas start, the old ones are retired once a
    /// new one is ready (or after `startup` passed). Call with `control` held.
    pub fn replace(
        &self,
        shared: &Arc<Shared>,
        deployment: FunctionDeployment,
        spec: Arc<RunSpec>,
        startup: Duration,
        grace: Duration,
    ) -> std::io::Result<()> {
        *write(&self.deployment) = (deployment, spec);
        let old: Vec<Arc<Replica>> = std::mem::take(&mut *write(&self.replicas));
        let n = self.desired();
        let started = self.scale_to(shared, n, grace);
        let mut new_ready = shared.readiness();
        let fresh = self.replicas();
        tokio::spawn(async move {
            let any_ready = async {
                while !fresh.iter().any(|r| r.routable()) {
                    if new_ready.changed().await.is_err() {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(startup, any_ready).await;
            for r in old {
                tokio::spawn(r.retire(grace));
            }
        });
        started
    }

    /// Retires every replica (for delete and shutdown); resolves when all are stopped.
    pub async fn retire_all(&self, grace: Duration) {
        let all: Vec<Arc<Replica>> = std::mem::take(&mut *write(&self.replicas));
        let tasks: Vec<_> = all
            .into_iter()
            .map(|r| tokio::spawn(r.retire(grace)))
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }

    pub fn status(&self) -> FunctionStatus {
        let (d, spec) = read(&self.deployment).clone();
        let replicas = self.replicas();
        let available = replicas.iter().filter(|r| r.routable()).count() as u64;
        let desired = self.desired();
        let message = if available < desired {
            replicas.iter().find_map(|r| r.message())
        } else {
            None
        };
        FunctionStatus {
            name: d.service.to_string(),
            image: d.image,
            namespace: self.fref.namespace.to_string(),
            env_process: d.env_process,
            env_vars: d.env_vars,
            constraints: d.constraints,
            secrets: d.secrets,
            labels: d.labels,
            annotations: d.annotations,
            limits: d.limits,
            requests: d.requests,
            read_only_root_filesystem: d.read_only_root_filesystem,
            invocation_count: 0.0,
            replicas: desired,
            available_replicas: available,
            created_at: self.created_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            usage: None,
            mode: Some(spec.mode.as_str().to_string()),
            message,
        }
    }

    /// Memory now and CPU (milli-cores) since the previous call; the first call of a
    /// while measures CPU over 200 ms.
    pub async fn usage(&self) -> FunctionUsage {
        let cpu_now = || -> u64 {
            self.replicas()
                .iter()
                .map(|r| r.cgroup.cpu_usage_ns().unwrap_or_else(|| proc_cpu_ns(r)))
                .sum()
        };
        let previous = *self.cpu_sample.lock().unwrap_or_else(|p| p.into_inner());
        let (t0, c0) = match previous {
            Some((t, c)) if t.elapsed() < Duration::from_secs(60) => (t, c),
            _ => {
                let first = (Instant::now(), cpu_now());
                tokio::time::sleep(Duration::from_millis(200)).await;
                first
            }
        };
        let (t1, c1) = (Instant::now(), cpu_now());
        *self.cpu_sample.lock().unwrap_or_else(|p| p.into_inner()) = Some((t1, c1));
        let elapsed_ns = t1.duration_since(t0).as_nanos().max(1) as f64;
        let cpu = c1.saturating_sub(c0) as f64 / elapsed_ns * 1000.0;
        let memory: u64 = self
            .replicas()
            .iter()
            .map(|r| r.cgroup.memory_usage().unwrap_or_else(|| proc_rss(r)))
            .sum();
        FunctionUsage {
            cpu,
            total_memory_bytes: memory as f64,
        }
    }

    pub fn replica_infos(&self) -> Vec<ReplicaInfo> {
        self.replicas()
            .iter()
            .map(|r| {
                let mut pids = r.cgroup.pids();
                if pids.is_empty() {
                    pids.extend(r.pid());
                }
                ReplicaInfo {
                    namespace: self.fref.namespace.to_string(),
                    function: self.fref.name.to_string(),
                    replica: r.name.clone(),
                    mode: r.spec.mode.as_str(),
                    cgroup_path: r.cgroup.unified_path().map(|p| p.display().to_string()),
                    cgroup_id: r.cgroup.id(),
                    memory_cgroup_path: r.cgroup.memory_path().map(|p| p.display().to_string()),
                    memory_limit_bytes: r.cgroup.memory_limit(),
                    pids,
                    port: r.port(),
                    ready: r.routable(),
                    restarts: r.restarts(),
                }
            })
            .collect()
    }
}

/// `name-xxxxx`, like a Kubernetes pod: unique even across delete and re-deploy.
fn replica_name(f: &FunctionRef) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    let suffix: String = (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{}-{suffix}", f.name)
}

fn proc_stat(r: &Replica) -> Option<procfs::process::Stat> {
    let pid = i32::try_from(r.pid()?).ok()?;
    procfs::process::Process::new(pid).ok()?.stat().ok()
}

fn proc_cpu_ns(r: &Replica) -> u64 {
    let ticks = procfs::ticks_per_second();
    proc_stat(r).map_or(0, |s| (s.utime + s.stime) * 1_000_000_000 / ticks.max(1))
}

fn proc_rss(r: &Replica) -> u64 {
    proc_stat(r).map_or(0, |s| s.rss * procfs::page_size())
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}
