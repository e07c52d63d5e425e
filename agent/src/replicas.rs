//! The kernel's view of the replicas, kept in step with the workload source: `WATCHED`
//! (replica cgroups), `FUNCTIONS` (their parents, so the kernel watches a new replica from
//! its first exec) and `CGROUP_MEM`; and naming the replicas the kernel found by itself.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use agent_common::{CgroupMem, NewCgroup, mode};
use aya::maps::{HashMap as BpfHashMap, MapData};
use tracing::{info, warn};

use crate::{
    cgroup,
    join::{Joiner, ReplicaInfo},
    metrics::Metrics,
    tgids::Tgids,
    workloads::{Mode, Replica},
};

/// How long a replica the kernel found stays watched without the workload source listing
/// it (the source's answer may predate the replica).
const DISCOVERED_GRACE: Duration = Duration::from_secs(30);
/// The cgroup v2 root's id: never registered as a function's cgroup (its children are not
/// replicas).
const ROOT_CGROUP_ID: u64 = 1;

/// A function's cgroup, the parent of its replicas' cgroups.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FunctionDir {
    path: PathBuf,
    /// The v1 memory controller's directory of the function, if the node has one.
    memory_path: Option<PathBuf>,
    namespace: Arc<str>,
    function: Arc<str>,
    mode: Mode,
}

/// The maps and what user space knows about their entries.
pub struct ReplicaMaps {
    watched: BpfHashMap<MapData, u64, u32>,
    functions: BpfHashMap<MapData, u64, u32>,
    cgroup_mem: BpfHashMap<MapData, u64, CgroupMem>,
    /// The kernel's process filter: the processes of every watched cgroup are marked in it.
    tgids: Tgids,
    /// Replica cgroups in WATCHED, with their mode.
    current: HashMap<u64, Mode>,
    /// Their directories, where known.
    paths: HashMap<u64, PathBuf>,
    /// Function cgroups in FUNCTIONS.
    function_dirs: HashMap<u64, FunctionDir>,
    /// Replicas the kernel found that the source has not listed yet, and when.
    discovered: HashMap<u64, Instant>,
}

fn kernel_mode(m: Mode) -> u32 {
    match m {
        Mode::Fork => mode::FORK,
        Mode::Http => mode::HTTP,
    }
}

impl ReplicaMaps {
    pub fn new(
        watched: BpfHashMap<MapData, u64, u32>,
        functions: BpfHashMap<MapData, u64, u32>,
        cgroup_mem: BpfHashMap<MapData, u64, CgroupMem>,
        tgids: Tgids,
    ) -> Self {
        Self {
            watched,
            functions,
            cgroup_mem,
            tgids,
            current: HashMap::new(),
            paths: HashMap::new(),
            function_dirs: HashMap::new(),
            discovered: HashMap::new(),
        }
    }

    /// The CGROUP_MEM map, for the sweep of dead connections.
    pub fn cgroup_mem(&mut self) -> &mut BpfHashMap<MapData, u64, CgroupMem> {
        &mut self.cgroup_mem
    }

    /// Makes the maps and the joiner match `list` (keeping, for a grace period, replicas the
    /// kernel found that `list` does not have yet).
    pub fn sync(&mut self, list: Vec<Replica>, joiner: &mut Joiner) {
        let mut want: HashMap<u64, Mode> = HashMap::new();
        let mut want_functions: HashMap<u64, FunctionDir> = HashMap::new();
        for r in list {
            let id = match r.cgroup_id {
                Some(id) => id,
                None => match cgroup::cgroup_id(&r.cgroup_path) {
                    Ok(id) => id,
                    Err(e) => {
                        warn!(replica = %r.replica, error = %e, "replica cgroup unreadable; not metered");
                        continue;
                    }
                },
            };
            // One copy of the names per replica, shared by its function's entry, the joiner's
            // and every event.
            let namespace: Arc<str> = r.namespace.into();
            let function: Arc<str> = r.function.into();
            if let Some(dir) = r.cgroup_path.parent()
                && let Ok(fid) = cgroup::cgroup_id(dir)
                && fid != ROOT_CGROUP_ID
            {
                want_functions.insert(
                    fid,
                    FunctionDir {
                        path: dir.into(),
                        memory_path: r
                            .memory_cgroup_path
                            .as_deref()
                            .and_then(Path::parent)
                            .map(Into::into),
                        namespace: namespace.clone(),
                        function: function.clone(),
                        mode: r.mode,
                    },
                );
            }
            let limit = r
                .memory_limit_bytes
                .or_else(|| cgroup::memory_limit(&r.cgroup_path, r.memory_cgroup_path.as_deref()));
            joiner.watch(
                id,
                ReplicaInfo {
                    namespace,
                    function,
                    replica: r.replica.into(),
                    memory_limit_bytes: limit,
                },
            );
            want.insert(id, r.mode);
            self.paths.insert(id, r.cgroup_path);
        }
        self.sync_functions(want_functions);
        for (&id, &m) in &want {
            self.discovered.remove(&id);
            if self.current.get(&id) == Some(&m) {
                continue;
            }
            // BPF_NOEXIST (1): a replica that changed mode keeps its memory counters.
            let _ = self.cgroup_mem.insert(id, CgroupMem::default(), 1);
            match self.watched.insert(id, kernel_mode(m), 0) {
                Ok(()) => {
                    info!(cgroup_id = id, mode = ?m, "watching replica cgroup");
                    self.current.insert(id, m);
                }
                Err(e) => warn!(cgroup_id = id, error = %e, "cgroup map full? replica not metered"),
            }
        }
        let now = Instant::now();
        let discovered = &mut self.discovered;
        let (watched, cgroup_mem, paths) =
            (&mut self.watched, &mut self.cgroup_mem, &mut self.paths);
        self.current.retain(|id, _| {
            if want.contains_key(id) {
                return true;
            }
            if discovered
                .get(id)
                .is_some_and(|t| now.duration_since(*t) < DISCOVERED_GRACE)
            {
                return true; // found by the kernel; the source has not caught up yet
            }
            discovered.remove(id);
            let _ = watched.remove(id);
            let _ = cgroup_mem.remove(id);
            paths.remove(id);
            joiner.unwatch(*id);
            info!(cgroup_id = id, "replica gone; cgroup unwatched");
            false
        });
        self.paths.retain(|id, _| self.current.contains_key(id));
        self.mark_processes();
    }

    /// Marks the processes of every watched cgroup in the kernel's process filter. The
    /// cgroups are in WATCHED first, so a process that starts or moves in after this read
    /// of `cgroup.procs` is marked by the kernel (fork, exec, cgroup attach); this pass
    /// covers those already there — all of them when the agent (re)starts — and, once a
    /// poll, anything that entered some other way (`clone3` into a cgroup, say).
    fn mark_processes(&mut self) {
        for path in self.paths.values() {
            self.tgids.mark_cgroup(path);
        }
    }

    /// FUNCTIONS gets every function cgroup of `want`; a function missing from `want` (scaled
    /// to zero) stays while its directory exists, so its next replica is found at once.
    fn sync_functions(&mut self, want: HashMap<u64, FunctionDir>) {
        for (id, dir) in &want {
            if self.function_dirs.get(id) == Some(dir) {
                continue;
            }
            match self.functions.insert(*id, kernel_mode(dir.mode), 0) {
                Ok(()) => {
                    self.function_dirs.insert(*id, dir.clone());
                }
                Err(e) => warn!(path = %dir.path.display(), error = %e,
                    "function map full? its new replicas are metered from the next poll"),
            }
        }
        let functions = &mut self.functions;
        self.function_dirs.retain(|id, dir| {
            if want.contains_key(id) || dir.path.is_dir() {
                return true;
            }
            let _ = functions.remove(id);
            false
        });
    }

    /// The kernel began watching a new replica's cgroup at its first exec: name it after its
    /// directory under the function's cgroup, so its records become events.
    pub fn discovered(&mut self, new: &NewCgroup, joiner: &mut Joiner, metrics: &Metrics) {
        let id = new.cgroup_id;
        let Some(dir) = self.function_dirs.get(&new.function_cgroup_id) else {
            // The function went away meanwhile: nothing can name it.
            let _ = self.watched.remove(&id);
            let _ = self.cgroup_mem.remove(&id);
            return;
        };
        let Some(name) = child_with_id(&dir.path, id) else {
            warn!(cgroup_id = id, function = %dir.function, "new replica cgroup already gone");
            let _ = self.watched.remove(&id);
            let _ = self.cgroup_mem.remove(&id);
            return;
        };
        let path = dir.path.join(&name);
        let memory_path = dir.memory_path.as_ref().map(|m| m.join(&name));
        joiner.watch(
            id,
            ReplicaInfo {
                namespace: dir.namespace.clone(),
                function: dir.function.clone(),
                replica: name.as_str().into(),
                memory_limit_bytes: cgroup::memory_limit(&path, memory_path.as_deref()),
            },
        );
        self.current.insert(id, dir.mode);
        self.tgids.mark_cgroup(&path);
        self.paths.insert(id, path);
        self.discovered.insert(id, Instant::now());
        metrics.replicas_discovered.inc();
        info!(cgroup_id = id, function = %dir.function, replica = %name, mode = ?dir.mode,
            "new replica watched from its first exec");
    }

    /// Whether a fork-mode replica is watched, or a fork-mode function may start one.
    pub fn has_fork(&self) -> bool {
        self.current.values().any(|m| *m == Mode::Fork)
            || self.function_dirs.values().any(|f| f.mode == Mode::Fork)
    }
}

/// The name of the subdirectory of `dir` whose inode (cgroup id) is `id`.
fn child_with_id(dir: &Path, id: u64) -> Option<String> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .find(|e| e.metadata().is_ok_and(|m| m.is_dir() && m.ino() == id))
        .and_then(|e| e.file_name().into_string().ok())
}
