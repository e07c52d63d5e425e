//! Replica and gateway lifecycles: crash-restart with backoff, state surviving a
//! gateway restart, orphans of a killed gateway cleaned up, cgroups, logs follow.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};

async fn replica_of(gw: &TestGateway, function: &str) -> Value {
    let map = gw.replicas().await;
    map["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["function"] == function)
        .cloned()
        .unwrap_or_else(|| panic!("no replica of {function}: {map}"))
}

#[tokio::test]
async fn crashed_replicas_are_restarted() {
    let gw = TestGateway::start(&[]);
    gw.deploy_ok(http_fn("crashy")).await;
    gw.wait_available("crashy", 1).await;
    let before = replica_of(&gw, "crashy").await;
    let r = gw.invoke("crashy/crash").await;
    assert_eq!(r.status(), 502, "the request the process died in");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = replica_of(&gw, "crashy").await;
        if now["ready"] == true && now["restarts"].as_u64() >= Some(1) {
            assert_ne!(now["pids"], before["pids"], "a new process");
            break;
        }
        assert!(Instant::now() < deadline, "not restarted: {now}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gw.invoke("crashy").await.status(), 200);
    let logs = gw
        .get_sys("/system/logs?name=crashy")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(logs.contains("crashing on request"), "{logs}");
    assert!(
        logs.contains("exited (exit status: 3); restarting in"),
        "{logs}"
    );
}

#[tokio::test]
async fn functions_survive_a_gateway_restart() {
    let mut gw = TestGateway::start(&[]);
    gw.deploy_ok(http_fn("keep")).await;
    gw.deploy_ok(fork_fn("idle", "echo idle")).await;
    gw.scale("keep", 2).await;
    gw.scale("idle", 0).await;
    gw.wait_available("keep", 2).await;
    let old_pids: Vec<u64> = replica_of(&gw, "keep").await["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    gw.stop();
    for pid in &old_pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "replica {pid} outlived a clean stop"
        );
    }
    gw.spawn();
    let keep = gw.wait_available("keep", 2).await;
    assert_eq!(keep["replicas"], 2);
    assert_eq!(gw.describe("idle").await["replicas"], 0);
    assert_eq!(gw.invoke("keep").await.status(), 200);
    assert_eq!(
        gw.invoke("idle").await.text().await.unwrap(),
        "idle\n",
        "scales from zero after a restart too"
    );
}

#[tokio::test]
async fn orphans_of_a_killed_gateway_are_cleaned_up() {
    let mut gw = TestGateway::start(&[]);
    gw.deploy_ok(http_fn("orphan")).await;
    gw.wait_available("orphan", 1).await;
    let pid = replica_of(&gw, "orphan").await["pids"][0].as_u64().unwrap();
    gw.crash();
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "kill -9 leaves the replica behind"
    );
    gw.spawn();
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "orphan {pid} still alive after restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.wait_available("orphan", 1).await;
    assert_eq!(gw.invoke("orphan").await.status(), 200);
}

#[tokio::test]
async fn replicas_run_unprivileged_in_their_own_cgroups() {
    if !is_root() {
        eprintln!(
            "SKIPPED replicas_run_unprivileged_in_their_own_cgroups: needs root to create cgroups"
        );
        return;
    }
    let gw = TestGateway::start(&[]);
    let mut f = http_fn("boxed");
    f["limits"] = json!({"memory": "96Mi", "cpu": "250m"});
    gw.deploy_ok(f).await;
    gw.wait_available("boxed", 1).await;
    let r = replica_of(&gw, "boxed").await;
    let name = r["replica"].as_str().unwrap();
    let expected = format!("/{}/openfaas-fn/boxed/{name}", gw.cgroup_parent);
    assert!(
        r["cgroup_path"].as_str().unwrap().ends_with(&expected),
        "{r}"
    );
    assert_eq!(r["memory_limit_bytes"], 96 << 20);
    let cgroup_id = r["cgroup_id"].as_u64().unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(r["cgroup_path"].as_str().unwrap())
            .unwrap()
            .ino(),
        cgroup_id
    );
    let pid = r["pids"][0].as_u64().unwrap();
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroups
            .lines()
            .any(|l| l.starts_with("0::") && l.ends_with(&expected)),
        "{cgroups}"
    );
    assert!(
        cgroups
            .lines()
            .any(|l| l.contains(":memory:") && l.ends_with(&expected)),
        "{cgroups}"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        !uid_line.split_whitespace().skip(1).any(|u| u == "0"),
        "{uid_line}"
    );
    let cpu = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/cpu/{}/openfaas-fn/boxed/{name}/cpu.cfs_quota_us",
        gw.cgroup_parent
    ));
    if let Ok(quota) = cpu {
        assert_eq!(quota.trim(), "25000");
    }
}

#[tokio::test]
async fn logs_follow_streams_new_lines() {
    let gw = TestGateway::start(&[]);
    gw.deploy_ok(fork_fn("talk", "echo said-$(cat) >&2; echo ok"))
        .await;
    gw.http
        .post(gw.url("/function/talk"))
        .body("first")
        .send()
        .await
        .unwrap();
    let follow = gw
        .get_sys("/system/logs?name=talk&follow=true")
        .send()
        .await
        .unwrap();
    assert_eq!(follow.headers()["content-type"], "application/x-ndjson");
    let mut stream = follow.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    let line: Value = serde_json::from_slice(first.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(line["text"], "said-first");
    assert_eq!(line["name"], "talk");
    assert_eq!(line["namespace"], "openfaas-fn");
    assert!(line["instance"].as_str().unwrap().starts_with("talk-"));
    assert!(line["timestamp"].as_str().unwrap().contains('T'));
    gw.http
        .post(gw.url("/function/talk"))
        .body("second")
        .send()
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("followed line")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&next).contains("said-second"));
    let tail = gw
        .get_sys("/system/logs?name=talk&tail=1")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(tail.lines().count(), 1);
    assert!(tail.contains("said-second"));
}
