//! `cargo xtask bench syscalls`: what the node agent's kernel hooks cost a process the
//! agent does not watch, per syscall, without the gateway (more repeatable than wrk).
//!
//! The agent's socket programs (raw tracepoints `sock_recv_length`/`sock_send_length`) run
//! at every socket read and write of the node and return early for unwatched processes; an
//! agent that hooks syscalls (a `TALLY_BENCH_AGENT_BASELINE` build from before 02fbee9) also
//! switches on the kernel's syscall-tracing slow path for every syscall. This measures both
//! from the outside. This process (in no watched cgroup) times a loop of
//! `LOOPS` × (write 100 B + read 100 B on a UNIX socketpair) — syscalls the programs look
//! at — and `LOOPS` × `getppid` — one they do not —, best of `REPS` runs, with the agent
//! detached and attached (told of no replica: its replica list comes from an address nothing
//! listens on). With `TALLY_BENCH_AGENT_BASELINE=PATH` a third arm runs that agent binary
//! (e.g. the last commit's build). Arms rotate every round; medians of the rounds' bests
//! are printed, each with its difference to the detached arm.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::bench::RemoveDir;
use crate::bench_agent::Agent;

/// Iterations of each loop.
const LOOPS: u32 = 300_000;
/// Runs of each loop per arm and round; the fastest counts (noise only ever adds time).
const REPS: usize = 5;
/// Bytes written and read back per iteration.
const MSG: usize = 100;
/// An address nothing listens on: the agent learns no replica.
const NOWHERE: &str = "http://127.0.0.1:9";
/// After the agent serves /metrics its programs are attached; let it settle.
const SETTLE: Duration = Duration::from_millis(1_000);

/// ns per syscall of one arm in one round: (read or write, getppid).
type Sample = (f64, f64);

pub fn run(rounds: usize) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("bench syscalls: needs root (the agent loads eBPF programs); run it as root");
    }
    crate::run_cmd(Command::new("cargo").args(["build", "--release", "--quiet", "-p", "agent"]))?;
    let bin = crate::root().join("target/release");
    let data = std::env::temp_dir().join(format!("tally-bench-syscalls-{}", std::process::id()));
    std::fs::create_dir_all(&data)?;
    let _cleanup = RemoveDir(data.clone());

    let mut arms: Vec<(String, Option<PathBuf>)> = vec![
        ("agent detached".into(), None),
        (
            "agent attached, no replica watched".into(),
            Some(bin.join("agent")),
        ),
    ];
    if let Some(base) = std::env::var_os("TALLY_BENCH_AGENT_BASELINE") {
        arms.push((
            "baseline agent attached, no replica watched".into(),
            Some(PathBuf::from(base)),
        ));
    }
    let n = arms.len();
    let mut samples: Vec<Vec<Sample>> = (0..n).map(|_| Vec::new()).collect();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        for k in 0..n {
            let arm = (round + k) % n;
            let _agent = match &arms[arm].1 {
                Some(program) => {
                    let a = Agent::start(program, NOWHERE, &data, &[])?;
                    std::thread::sleep(SETTLE);
                    Some(a)
                }
                None => None,
            };
            let s = measure()?;
            eprintln!(
                "  {}: read/write {:.0} ns, getppid {:.0} ns",
                arms[arm].0, s.0, s.1
            );
            samples[arm].push(s);
        }
    }

    let med = |v: Vec<f64>| {
        let mut v = v;
        v.sort_by(f64::total_cmp);
        crate::wrk::percentile(&v, 0.5)
    };
    let rw: Vec<f64> = samples
        .iter()
        .map(|s| med(s.iter().map(|x| x.0).collect()))
        .collect();
    let pp: Vec<f64> = samples
        .iter()
        .map(|s| med(s.iter().map(|x| x.1).collect()))
        .collect();
    println!(
        "| ns per syscall, unwatched process (median of {rounds} rounds, best of {REPS} × {LOOPS}) | read or write (UNIX socketpair, {MSG} B) | getppid |"
    );
    println!("|---|---|---|");
    for (arm, (name, _)) in arms.iter().enumerate() {
        let delta = |v: &[f64]| {
            if arm == 0 {
                String::new()
            } else {
                format!(" ({:+.0})", v[arm] - v[0])
            }
        };
        println!(
            "| {name} | {:.0}{} | {:.0}{} |",
            rw[arm],
            delta(&rw),
            pp[arm],
            delta(&pp)
        );
    }
    for (arm, (name, _)) in arms.iter().enumerate() {
        println!(
            "{name}, by round (read or write / getppid): {:?}",
            samples[arm]
                .iter()
                .map(|(a, b)| (a.round(), b.round()))
                .collect::<Vec<_>>()
        );
    }
    Ok(())
}

/// Best of `REPS` runs of each loop, in ns per syscall.
fn measure() -> Result<Sample> {
    let (mut a, mut b) = UnixStream::pair()?;
    let out = [7u8; MSG];
    let mut back = [0u8; MSG];
    let mut best = (f64::MAX, f64::MAX);
    for _ in 0..REPS {
        let t = Instant::now();
        for _ in 0..LOOPS {
            a.write_all(&out)?;
            b.read_exact(&mut back)?;
        }
        best.0 = best
            .0
            .min(t.elapsed().as_nanos() as f64 / (2 * LOOPS) as f64);
        let t = Instant::now();
        let mut sum = 0u32;
        for _ in 0..LOOPS {
            sum = sum.wrapping_add(std::os::unix::process::parent_id());
        }
        std::hint::black_box(sum);
        best.1 = best.1.min(t.elapsed().as_nanos() as f64 / LOOPS as f64);
    }
    Ok(best)
}
