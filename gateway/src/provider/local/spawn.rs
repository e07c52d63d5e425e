//! Starting function processes: as the unprivileged function user when the gateway is
//! root, in their own process group, and moved into the replica's cgroups before exec.
//! Per-request (fork-mode) processes go through `tally-spawn`, started with `posix_spawn`:
//! a `fork` of the gateway would copy its page tables, milliseconds on every call.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use nix::unistd::{Gid, Uid, User};

/// The identity function processes run as.
#[derive(Debug, Clone, Copy)]
pub struct RunAs {
    pub uid: Uid,
    pub gid: Gid,
}

impl RunAs {
    /// `user` when the gateway runs as root; `None` (stay as we are) otherwise.
    pub fn resolve(user: &str) -> Result<Option<Self>, String> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        let found = User::from_name(user)
            .map_err(|e| format!("looking up function user {user:?}: {e}"))?
            .ok_or_else(|| format!("function user {user:?} does not exist"))?;
        if found.uid.is_root() {
            return Err(format!(
                "function user {user:?} is root: function processes never run as root"
            ));
        }
        Ok(Some(Self {
            uid: found.uid,
            gid: found.gid,
        }))
    }
}

/// PATH given to function processes.
pub const FUNCTION_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Finds `program` the way exec will: a path relative to `cwd`, a bare name on
/// [`FUNCTION_PATH`].
pub fn resolve_program(program: &str, cwd: &Path) -> Option<PathBuf> {
    let is_executable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = cwd.join(program);
        return is_executable(&p).then_some(p);
    }
    FUNCTION_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| is_executable(p))
}

/// A replica's `cgroup.procs` files: open, for a forked child to write before exec; and
/// their paths, for `tally-spawn`.
pub struct CgroupProcs {
    pub files: Vec<OwnedFd>,
    pub paths: Vec<PathBuf>,
}

/// The `tally-spawn` binary: `$TALLY_SPAWN`, else beside the running executable (or one
/// directory up, where cargo puts a test binary's package binaries); `None` if not found
/// or `TALLY_SPAWN=off`, and processes are then forked from the gateway.
pub fn spawner() -> Option<&'static Path> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let given = std::env::var_os("TALLY_SPAWN");
            if given.as_deref() == Some(OsStr::new("off")) {
                tracing::info!("TALLY_SPAWN=off: fork-mode processes are forked from the gateway");
                return None;
            }
            let found = given
                .map(PathBuf::from)
                .into_iter()
                .chain(std::env::current_exe().ok().into_iter().flat_map(|exe| {
                    exe.ancestors()
                        .skip(1)
                        .take(2)
                        .map(|dir| dir.join("tally-spawn"))
                        .collect::<Vec<_>>()
                }))
                .find(|p| p.is_file());
            if found.is_none() {
                tracing::warn!(
                    "tally-spawn not found beside the gateway (nor $TALLY_SPAWN): fork-mode \
                     processes are forked from the gateway, which costs more per call"
                );
            }
            found
        })
        .as_deref()
}

/// A fork-mode process for `argv`: through [`spawner`] when there is one, else as
/// [`command`] builds it.
pub fn per_request_command<I, K, V>(
    argv: &[String],
    cwd: &Path,
    env: I,
    run_as: Option<RunAs>,
    procs: Arc<CgroupProcs>,
) -> tokio::process::Command
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let Some(spawner) = spawner() else {
        return command(argv, cwd, env, run_as, procs);
    };
    let mut cmd = tokio::process::Command::new(spawner);
    for path in &procs.paths {
        cmd.arg("--cgroup-procs").arg(path);
    }
    if let Some(who) = run_as {
        cmd.arg("--uid")
            .arg(who.uid.to_string())
            .arg("--gid")
            .arg(who.gid.to_string());
    }
    cmd.arg("--").args(argv);
    isolate(&mut cmd, cwd, env);
    cmd
}

/// What every function process gets: a clean environment of `env` (plus [`FUNCTION_PATH`]),
/// `cwd`, its own process group, and a kill when its handle is dropped.
fn isolate<I, K, V>(cmd: &mut tokio::process::Command, cwd: &Path, env: I)
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    cmd.env_clear()
        .env("PATH", FUNCTION_PATH)
        .envs(env)
        .current_dir(cwd)
        .process_group(0)
        .kill_on_drop(true);
}

/// Builds the command for `argv` with a clean environment of `env`.
pub fn command<I, K, V>(
    argv: &[String],
    cwd: &Path,
    env: I,
    run_as: Option<RunAs>,
    procs: Arc<CgroupProcs>,
) -> tokio::process::Command
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    isolate(&mut cmd, cwd, env);
    if let Some(who) = run_as {
        cmd.uid(who.uid.as_raw()).gid(who.gid.as_raw());
    }
    if !procs.files.is_empty() {
        let fds: Vec<i32> = procs.files.iter().map(AsRawFd::as_raw_fd).collect();
        // SAFETY: the closure runs in the child between fork and exec. It only calls
        // write(2), which is async-signal-safe, on descriptors the parent opened and keeps
        // open (`procs` is owned by the replica and outlives the spawn call), and it
        // allocates nothing: `fds` was built in the parent. Writing "0" to cgroup.procs
        // moves the calling process; the kernel checks the opener's (root's) credentials.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &fds {
                    let msg = b"0\n";
                    if libc::write(fd, msg.as_ptr().cast(), msg.len()) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    cmd
}
