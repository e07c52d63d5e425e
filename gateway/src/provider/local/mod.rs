//! The local provider, Tally's embedded default: each replica is a supervised process
//! (or, in fork mode, a cgroup that requests fork into) on this machine.

mod cgroup;
mod function;
mod pidfiles;
mod replica;
mod spawn;
mod spec;
mod state;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::watch;

use self::cgroup::Layout;
use self::function::FunctionSlot;
use self::pidfiles::PidFiles;
use self::spawn::RunAs;
use self::state::{SavedFunction, StateFile, StateWriter};
use super::{AcquireError, Lease, Provider, ProviderError, ReplicaMap};
use crate::logs::LogHub;
use crate::names::{FunctionRef, Namespace};
use crate::types::{FunctionDeployment, FunctionStatus, FunctionUsage};

pub use self::spawn::FUNCTION_PATH;

/// What the local provider needs from the gateway's configuration.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    pub data_dir: PathBuf,
    pub cgroup_parent: String,
    pub function_user: String,
    pub namespaces: Vec<Namespace>,
    pub startup_timeout: Duration,
    /// How long a retiring replica may finish its in-flight requests.
    pub drain_timeout: Duration,
}

/// State every replica shares.
pub struct Shared {
    layout: Layout,
    run_as: Option<RunAs>,
    /// Working directory of function processes; relative commands resolve against it.
    cwd: PathBuf,
    logs: LogHub,
    startup_timeout: Duration,
    pidfiles: PidFiles,
    readiness: watch::Sender<u64>,
}

impl Shared {
    fn tick(&self) {
        self.readiness.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn readiness(&self) -> watch::Receiver<u64> {
        self.readiness.subscribe()
    }
}

pub struct LocalProvider {
    shared: Arc<Shared>,
    functions: RwLock<HashMap<FunctionRef, Arc<FunctionSlot>>>,
    state: Arc<StateWriter>,
    /// Numbers state snapshots in the order they are taken.
    snapshots: std::sync::Mutex<u64>,
    namespaces: Vec<Namespace>,
    drain_timeout: Duration,
}

impl LocalProvider {
    /// Cleans up orphans of an earlier run, then brings back the saved functions.
    pub async fn start(opts: LocalOptions) -> Result<Self, ProviderError> {
        let run_as = RunAs::resolve(&opts.function_user).map_err(ProviderError::Invalid)?;
        let cwd = opts.data_dir.join("functions");
        std::fs::create_dir_all(&cwd)?;
        set_mode(&opts.data_dir, 0o755)?;
        set_mode(&cwd, 0o755)?;
        let pidfiles = PidFiles::new(opts.data_dir.join("run"))?;
        let layout = Layout::detect(&opts.cgroup_parent);
        let orphans = layout.clean_up_all() + pidfiles.clean_up_all();
        tracing::info!(
            cgroups = layout.mode().as_str(),
            unified = ?layout.unified_root(),
            function_user = ?run_as.map(|r| r.uid.as_raw()),
            orphans_killed = orphans,
            "local provider starting"
        );
        if layout.mode() == cgroup::Mode::None {
            tracing::warn!(
                "cgroups are not writable (not root?): replicas run without their own cgroup, limits are not applied"
            );
        }
        let provider = Self {
            shared: Arc::new(Shared {
                layout,
                run_as,
                cwd,
                logs: LogHub::default(),
                startup_timeout: opts.startup_timeout,
                pidfiles,
                readiness: watch::channel(0).0,
            }),
            functions: RwLock::default(),
            state: Arc::new(StateWriter::new(StateFile::new(&opts.data_dir))),
            snapshots: std::sync::Mutex::new(0),
            namespaces: opts.namespaces,
            drain_timeout: opts.drain_timeout,
        };
        let saved = StateFile::new(&opts.data_dir)
            .load()
            .map_err(ProviderError::State)?;
        for s in saved {
            if let Err(e) = provider.restore(s.clone()) {
                tracing::error!(function = %s.deployment.service, "could not restore: {e}");
            }
        }
        Ok(provider)
    }

    fn restore(&self, s: SavedFunction) -> Result<(), ProviderError> {
        let (fref, spec) = self.validate(&s.deployment)?;
        let slot = Arc::new(FunctionSlot::new(
            fref.clone(),
            s.deployment,
            spec,
            s.created_at,
        ));
        slot.scale_to(&self.shared, s.replicas, self.drain_timeout)?;
        self.map_write().insert(fref, slot);
        Ok(())
    }

    fn validate(
        &self,
        d: &FunctionDeployment,
    ) -> Result<(FunctionRef, Arc<spec::RunSpec>), ProviderError> {
        let namespace = d
            .namespace
            .clone()
            .unwrap_or_else(|| self.namespaces[0].clone());
        if !self.namespaces.contains(&namespace) {
            return Err(ProviderError::UnknownNamespace(namespace.to_string()));
        }
        let spec = spec::run_spec(d, &self.shared.cwd).map_err(ProviderError::Invalid)?;
        let fref = FunctionRef {
            namespace,
            name: d.service.clone(),
        };
        Ok((fref, Arc::new(spec)))
    }

    fn check_namespace(&self, ns: &Namespace) -> Result<(), ProviderError> {
        if self.namespaces.contains(ns) {
            Ok(())
        } else {
            Err(ProviderError::UnknownNamespace(ns.to_string()))
        }
    }

    fn slot(&self, f: &FunctionRef) -> Result<Arc<FunctionSlot>, ProviderError> {
        self.check_namespace(&f.namespace)?;
        self.map_read()
            .get(f)
            .cloned()
            .ok_or_else(|| ProviderError::NotFound(f.clone()))
    }

    fn map_read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<FunctionRef, Arc<FunctionSlot>>> {
        self.functions.read().unwrap_or_else(|p| p.into_inner())
    }

    fn map_write(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, HashMap<FunctionRef, Arc<FunctionSlot>>> {
        self.functions.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the deployed functions to the data directory (off the async threads).
    async fn persist(&self) -> Result<(), ProviderError> {
        let (seq, saved) = self.snapshot();
        let writer = self.state.clone();
        tokio::task::spawn_blocking(move || writer.write(seq, saved))
            .await
            .map_err(|e| ProviderError::State(e.to_string()))?
            .map_err(ProviderError::Io)
    }

    /// Like [`Self::persist`], for the request path: does not wait for the disk.
    fn persist_in_background(&self) {
        let (seq, saved) = self.snapshot();
        let writer = self.state.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = writer.write(seq, saved) {
                tracing::error!("saving the function state: {e}");
            }
        });
    }

    fn snapshot(&self) -> (u64, Vec<SavedFunction>) {
        let mut seq = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        *seq += 1;
        let mut saved: Vec<SavedFunction> = self
            .map_read()
            .values()
            .map(|s| SavedFunction {
                deployment: s.deployment(),
                replicas: s.desired(),
                created_at: s.created_at,
            })
            .collect();
        saved.sort_by(|a, b| a.deployment.service.cmp(&b.deployment.service));
        (*seq, saved)
    }
}

#[async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> (&'static str, &'static str) {
        ("tally-local", "local")
    }

    fn namespaces(&self) -> Vec<Namespace> {
        self.namespaces.clone()
    }

    async fn deploy(&self, mut d: FunctionDeployment) -> Result<(), ProviderError> {
        let (fref, spec) = self.validate(&d)?;
        d.namespace = Some(fref.namespace.clone());
        let replicas = spec.min_replicas.max(1);
        let slot = {
            let mut map = self.map_write();
            if map.contains_key(&fref) {
                return Err(ProviderError::Exists(fref));
            }
            let slot = Arc::new(FunctionSlot::new(fref.clone(), d, spec, Utc::now()));
            map.insert(fref.clone(), slot.clone());
            slot
        };
        let _control = slot.control.lock().await;
        if let Err(e) = slot.scale_to(&self.shared, replicas, self.drain_timeout) {
            self.map_write().remove(&fref);
            slot.retire_all(Duration::ZERO).await;
            return Err(e.into());
        }
        self.persist().await
    }

    async fn update(&self, mut d: FunctionDeployment) -> Result<(), ProviderError> {
        let (fref, spec) = self.validate(&d)?;
        d.namespace = Some(fref.namespace.clone());
        let slot = self.slot(&fref)?;
        let _control = slot.control.lock().await;
        let (startup, grace) = (self.shared.startup_timeout, self.drain_timeout);
        slot.replace(&self.shared, d, spec, startup, grace)?;
        self.persist().await
    }

    async fn delete(&self, f: &FunctionRef) -> Result<(), ProviderError> {
        let slot = self.slot(f)?;
        let _control = slot.control.lock().await;
        if self.map_write().remove(f).is_none() {
            return Err(ProviderError::NotFound(f.clone()));
        }
        self.persist().await?;
        let grace = self.drain_timeout;
        let slot2 = slot.clone();
        tokio::spawn(async move { slot2.retire_all(grace).await });
        self.shared.logs.forget(f);
        Ok(())
    }

    fn list(&self, ns: &Namespace) -> Result<Vec<FunctionStatus>, ProviderError> {
        self.check_namespace(ns)?;
        let mut all: Vec<FunctionStatus> = self
            .map_read()
            .values()
            .filter(|s| &s.fref.namespace == ns)
            .map(|s| s.status())
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    fn get(&self, f: &FunctionRef) -> Result<FunctionStatus, ProviderError> {
        Ok(self.slot(f)?.status())
    }

    async fn usage(&self, f: &FunctionRef) -> Result<FunctionUsage, ProviderError> {
        Ok(self.slot(f)?.usage().await)
    }

    async fn scale(&self, f: &FunctionRef, replicas: u64) -> Result<(), ProviderError> {
        let slot = self.slot(f)?;
        let max = slot.spec().max_replicas;
        if replicas > max {
            return Err(ProviderError::Invalid(format!(
                "replicas {replicas} is more than the function's maximum {max} (label com.openfaas.scale.max)"
            )));
        }
        let _control = slot.control.lock().await;
        slot.scale_to(&self.shared, replicas, self.drain_timeout)?;
        self.persist().await
    }

    async fn scale_from_zero(&self, f: &FunctionRef) -> Result<bool, ProviderError> {
        let slot = self.slot(f)?;
        let _control = slot.control.lock().await;
        if slot.desired() > 0 {
            return Ok(false);
        }
        let n = slot.spec().min_replicas.max(1);
        slot.scale_to(&self.shared, n, self.drain_timeout)?;
        // The held requests should not wait for the disk.
        self.persist_in_background();
        Ok(true)
    }

    fn acquire(&self, f: &FunctionRef) -> Result<Lease, AcquireError> {
        let slot = self
            .map_read()
            .get(f)
            .cloned()
            .ok_or_else(|| AcquireError::NotFound(f.clone()))?;
        slot.acquire()
    }

    fn readiness(&self) -> watch::Receiver<u64> {
        self.shared.readiness()
    }

    fn logs(&self) -> &LogHub {
        &self.shared.logs
    }

    fn replicas(&self) -> ReplicaMap {
        let mut replicas: Vec<_> = self
            .map_read()
            .values()
            .flat_map(|s| s.replica_infos())
            .collect();
        replicas.sort_by(|a, b| a.replica.cmp(&b.replica));
        ReplicaMap {
            cgroup: serde_json::json!({
                "mode": self.shared.layout.mode().as_str(),
                "unified_root": self.shared.layout.unified_root(),
            }),
            replicas,
        }
    }

    async fn shutdown(&self) {
        let slots: Vec<_> = self.map_read().values().cloned().collect();
        let grace = self.drain_timeout;
        let tasks: Vec<_> = slots
            .into_iter()
            .map(|s| tokio::spawn(async move { s.retire_all(grace).await }))
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }
}

fn set_mode(path: &std::path::Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}
