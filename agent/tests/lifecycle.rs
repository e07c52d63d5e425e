//! The agent following replicas as they come and go, with a fork-mode invocation whose
//! process forks a child, and its `/metrics` (kernel duration, memory, bpf_stats run time).

mod common;

use std::time::Duration;

use agent::workloads::Mode;
use common::{TestAgent, TestCgroup, can_run, fixture_c};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_come_and_go_children_fold_in_metrics_show_kernel_time() {
    if !can_run("replicas_come_and_go_children_fold_in_metrics_show_kernel_time") {
        return;
    }
    let _serial = common::serial().await;
    let probe = fixture_c("fork_probe");
    let cg = TestCgroup::new(None);
    let mut agent = TestAgent::start(vec![]).await;

    // Not a replica yet: nothing is metered.
    let out = cg
        .command(&probe, &["0".into(), "1".into(), "0".into()])
        .output()
        .expect("run");
    assert!(out.status.success());
    assert!(
        agent
            .collect(1, Duration::from_millis(500))
            .await
            .is_empty(),
        "unwatched cgroup metered"
    );

    // Now it is: a shell (the invocation's root) runs the probe as a child with 32 MiB.
    agent.workloads.set(vec![cg.replica(Mode::Fork)]);
    agent.wait_synced().await;
    let script = format!("{} 32 20 0 && exit 7", probe.display());
    let out = cg
        .command("/bin/sh".as_ref(), &["-c".into(), script])
        .env("Http_X_Call_Id", "with-child")
        .output()
        .expect("run shell");
    assert_eq!(out.status.code(), Some(7));
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let hwm: u64 = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("vmhwm_bytes="))
        .and_then(|v| v.parse().ok())
        .expect("child's VmHWM");
    let evs = agent.collect(2, Duration::from_secs(2)).await;
    assert_eq!(
        evs.len(),
        1,
        "one event per invocation, children folded in: {evs:?}"
    );
    let ev = &evs[0];
    assert_eq!(ev.call_id.as_deref(), Some("with-child"));
    assert_eq!(ev.exit_code, Some(7));
    assert_eq!(ev.status_code, 500);
    assert!(
        ev.memory_peak_bytes >= hwm,
        "peak {} < child's VmHWM {hwm}",
        ev.memory_peak_bytes
    );
    assert!(ev.duration_ns >= 20_000_000);

    // Gone again: nothing more is metered.
    agent.workloads.set(vec![]);
    agent.wait_synced().await;
    let out = cg
        .command(&probe, &["0".into(), "1".into(), "0".into()])
        .output()
        .expect("run");
    assert!(out.status.success());
    assert!(
        agent
            .collect(1, Duration::from_millis(500))
            .await
            .is_empty(),
        "removed replica metered"
    );

    // /metrics carries the kernel-measured histogram and the programs' own run time.
    tokio::time::sleep(Duration::from_millis(700)).await; // one bpf_stats refresh
    let text = agent.metrics.render();
    let count_line = format!(
        "tally_agent_invocation_duration_seconds_count{{function=\"{}\",namespace=\"tally-test\"}} 1",
        cg.name
    );
    assert!(
        text.contains(&count_line),
        "no histogram sample in:\n{text}"
    );
    let run_time: f64 = text
        .lines()
        .find(|l| l.starts_with("tally_agent_bpf_run_time_seconds{program=\"tally_rss\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .expect("bpf run time of tally_rss");
    assert!(run_time > 0.0, "bpf_stats run time is 0");
    eprintln!("tally_rss run time so far: {run_time} s");
    agent.stop().await;
}
