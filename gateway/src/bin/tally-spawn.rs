//! `tally-spawn`: what the gateway starts a fork-mode function process through. Started
//! with `posix_spawn` (no copy of the gateway's page tables), it moves itself into the
//! replica's cgroups, drops to the function user, and execs the function.
//!
//! `tally-spawn [--cgroup-procs PATH]... [--uid UID --gid GID] -- PROGRAM [ARG]...`
//! Exits 126 (with a message on stderr) when a step before the exec fails, 127 when the
//! program cannot be executed.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

struct Plan {
    cgroup_procs: Vec<OsString>,
    uid: Option<libc::uid_t>,
    gid: Option<libc::gid_t>,
    program: OsString,
    args: Vec<OsString>,
}

fn parse(mut argv: impl Iterator<Item = OsString>) -> Result<Plan, String> {
    let mut plan = Plan {
        cgroup_procs: Vec::new(),
        uid: None,
        gid: None,
        program: OsString::new(),
        args: Vec::new(),
    };
    let number = |flag: &str, v: Option<OsString>| -> Result<u32, String> {
        v.and_then(|v| v.into_string().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{flag} needs a number"))
    };
    loop {
        let arg = argv.next().ok_or("no `--` before the program")?;
        match arg.to_str() {
            Some("--cgroup-procs") => plan
                .cgroup_procs
                .push(argv.next().ok_or("--cgroup-procs needs a path")?),
            Some("--uid") => plan.uid = Some(number("--uid", argv.next())?),
            Some("--gid") => plan.gid = Some(number("--gid", argv.next())?),
            Some("--") => break,
            _ => return Err(format!("unexpected argument {arg:?}")),
        }
    }
    if plan.uid.is_some() != plan.gid.is_some() {
        return Err("--uid and --gid go together".into());
    }
    plan.program = argv.next().ok_or("no program after `--`")?;
    plan.args = argv.collect();
    Ok(plan)
}

/// Everything before the exec; an error names the step.
fn prepare(plan: &Plan) -> Result<(), String> {
    for path in &plan.cgroup_procs {
        // "0" moves the writing process.
        std::fs::write(path, "0\n")
            .map_err(|e| format!("moving into {}: {e}", path.to_string_lossy()))?;
    }
    if let (Some(uid), Some(gid)) = (plan.uid, plan.gid) {
        // SAFETY: plain syscalls on values; supplementary groups dropped first, then the
        // group, then the user (after which the first two would no longer be allowed).
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0 {
                return Err(format!("setgroups: {}", std::io::Error::last_os_error()));
            }
            if libc::setgid(gid) != 0 {
                return Err(format!("setgid {gid}: {}", std::io::Error::last_os_error()));
            }
            if libc::setuid(uid) != 0 {
                return Err(format!("setuid {uid}: {}", std::io::Error::last_os_error()));
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let plan = match parse(std::env::args_os().skip(1)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tally-spawn: {e}");
            return ExitCode::from(126);
        }
    };
    if let Err(e) = prepare(&plan) {
        eprintln!("tally-spawn: {e}");
        return ExitCode::from(126);
    }
    // Only returns on failure; PATH is the one the gateway gave the function.
    let e = Command::new(&plan.program).args(&plan.args).exec();
    eprintln!("tally-spawn: executing {:?}: {e}", plan.program);
    ExitCode::from(127)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> impl Iterator<Item = OsString> {
        s.iter().map(OsString::from).collect::<Vec<_>>().into_iter()
    }

    #[test]
    fn a_command_line_is_read_or_refused_with_the_reason() {
        let p = parse(args(&[
            "--cgroup-procs",
            "/a/cgroup.procs",
            "--uid",
            "65534",
            "--gid",
            "65534",
            "--",
            "echo",
            "--uid",
        ]))
        .expect("valid");
        assert_eq!(p.cgroup_procs, vec![OsString::from("/a/cgroup.procs")]);
        assert_eq!((p.uid, p.gid), (Some(65534), Some(65534)));
        assert_eq!(p.program, "echo");
        assert_eq!(p.args, vec![OsString::from("--uid")]);
        let err = |a: &[&str]| parse(args(a)).err().unwrap_or_default();
        assert!(err(&["echo"]).contains("unexpected argument"));
        assert!(err(&["--uid", "x", "--"]).contains("needs a number"));
        assert!(err(&["--uid", "1", "--", "echo"]).contains("go together"));
        assert!(err(&["--"]).contains("no program"));
        assert!(err(&[]).contains("no `--`"));
    }
}
