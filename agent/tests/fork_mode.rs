//! Fork mode against ground truth: processes that allocate and sleep known amounts report
//! their own run time and VmHWM; the kernel's exec → exit and peak RSS must match.

mod common;

use std::time::Duration;

use agent::workloads::Mode;
use common::{TestAgent, TestCgroup, assert_duration, assert_memory, can_run, fixture_c};

const LIMIT: u64 = 768 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_duration_memory_exit_code_and_call_id() {
    if !can_run("fork_duration_memory_exit_code_and_call_id") {
        return;
    }
    let _serial = common::serial().await;
    let probe = fixture_c("fork_probe");
    let cg = TestCgroup::new(Some(LIMIT));
    let mut agent = TestAgent::start(vec![cg.replica(Mode::Fork)]).await;
    // (MiB, ms, exit code)
    let cases: [(u64, u64, i32); 7] = [
        (0, 1, 0),
        (1, 10, 0),
        (16, 100, 0),
        (64, 5, 3),
        (256, 50, 0),
        (512, 500, 0),
        (0, 2000, 0),
    ];
    for (i, &(mib, ms, code)) in cases.iter().enumerate() {
        let call_id = format!("fork-{i}-{mib}MiB-{ms}ms");
        let steal0 = common::steal_ticks();
        let out = cg
            .command_fifo(&probe, &[mib.to_string(), ms.to_string(), code.to_string()])
            .env("Http_X_Call_Id", &call_id)
            .output()
            .expect("run probe");
        let steal = common::stolen_since(steal0);
        assert_eq!(
            out.status.code(),
            Some(code),
            "probe exit status; its stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        let field = |k: &str| -> u64 {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(k))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("probe output {line:?} lacks {k}"))
        };
        let cpu = field("cpu_ns=");
        let (elapsed, hwm, t0, t1) = (
            field("elapsed_ns="),
            field("vmhwm_bytes="),
            field("t0="),
            field("t1="),
        );
        let ev = agent.next_event(Duration::from_secs(5)).await;
        // The kernel's window in CLOCK_MONOTONIC (the probe's clock too).
        let k_start = common::mono_ns(&ev.started);
        let k_end = k_start + ev.duration_ns;
        let startup = t0 as i64 - k_start as i64;
        eprintln!(
            "fork {mib:>3} MiB {ms:>4} ms: kernel {} ns, handler {elapsed} ns; exec->main {startup} ns, \
             exit edge {} ns; peak {} B, VmHWM {hwm} B, Rss {} B; cpu {:?} ns, own {cpu} ns; steal {steal} ns",
            ev.duration_ns,
            k_end as i64 - t1 as i64,
            ev.memory_peak_bytes,
            field("rss_bytes="),
            ev.cpu_ns
        );
        assert_eq!(ev.call_id.as_deref(), Some(call_id.as_str()));
        assert_eq!(&*ev.function_name, cg.name);
        assert_eq!(ev.source, "kernel");
        assert_eq!(ev.exit_code, Some(code));
        assert_eq!(ev.status_code, if code == 0 { 200 } else { 500 });
        assert_eq!(ev.memory_limit_bytes, Some(LIMIT));
        // The kernel meters exec -> exit; the probe can only time main -> exit. Its start-up
        // (exec -> main, ~0.25 ms for a static C binary here) is real process time the handler
        // cannot see: check it lies inside the kernel's window and is small, and hold the rest
        // (main -> exit) to max(200 us, 1 %) of the handler's own time.
        assert!(
            (0..1_000_000).contains(&startup),
            "{call_id}: exec -> main took {startup} ns"
        );
        assert_duration(&call_id, ev.duration_ns - startup as u64, elapsed);
        assert_memory(&call_id, ev.memory_peak_bytes, hwm);
        // On-CPU time, against what the process counted itself in main
        // (CLOCK_PROCESS_CPUTIME_ID): the kernel adds the start-up and exit edges. Slices are
        // timed at sched_switch; at normal priority on a busy machine they were seen to run up
        // to 6 % short (cause not found), so 5 % is allowed either way. The process's own
        // clock leaves out time the hypervisor stole, which a slice's wall time holds: the
        // machine's steal over the run (every CPU's, an upper bound) is allowed on top.
        let k_cpu = ev.cpu_ns.expect("cpu_ns for a fork-mode process");
        let edges = startup as u64 + (k_end.saturating_sub(t1));
        let slack = (cpu / 20).max(1_000_000);
        assert!(
            k_cpu + slack >= cpu && k_cpu <= cpu + edges + slack + steal,
            "{call_id}: kernel cpu {k_cpu} ns vs own {cpu} ns (edges {edges} ns, steal {steal} ns)"
        );
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cpu_time_no_switch_program_and_no_cpu_ns() {
    if !can_run("without_cpu_time_no_switch_program_and_no_cpu_ns") {
        return;
    }
    let _serial = common::serial().await;
    let probe = fixture_c("fork_probe");
    let cg = TestCgroup::new(None);
    let mut agent = TestAgent::start_with(vec![cg.replica(Mode::Fork)], false).await;
    let out = cg
        .command(&probe, &["1".into(), "20".into(), "0".into()])
        .env("Http_X_Call_Id", "no-cpu")
        .output()
        .expect("run probe");
    assert!(out.status.success());
    let ev = agent.next_event(Duration::from_secs(5)).await;
    assert_eq!(ev.call_id.as_deref(), Some("no-cpu"));
    assert!(ev.duration_ns >= 20_000_000, "still metered: {ev:?}");
    assert_eq!(ev.cpu_ns, None, "no sched_switch, no cpu_ns");
    tokio::time::sleep(Duration::from_millis(700)).await; // one bpf_stats refresh
    let text = agent.metrics.render();
    assert!(
        text.contains("tally_agent_bpf_run_time_seconds{program=\"tally_exec\"}"),
        "{text}"
    );
    assert!(
        !text.contains("program=\"tally_switch\""),
        "sched_switch is not attached, so it has no stats: {text}"
    );
    agent.stop().await;
}
