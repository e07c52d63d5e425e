//! New replicas are metered from their first request: the kernel watches a new child of a
//! known function's cgroup at its first exec, before the workload source lists it.

mod common;

use std::{fs, net::TcpStream, path::Path, time::Duration};

use agent::workloads::{Mode, Replica};
use common::{
    MEM_ROOT, Proc, TestAgent, TestCgroup, V2_ROOT, can_run, fixture_binary, fixture_c, http_get,
};

/// `tally-agent-test-<pid>-discovery/ns/<function>` in v2 and v1 memory, removed on drop
/// (after the replicas in it).
struct FunctionDirs(Vec<String>);

impl FunctionDirs {
    fn new(functions: &[&str]) -> Self {
        let top = format!("tally-agent-test-{}-discovery", std::process::id());
        let mut dirs = vec![top.clone(), format!("{top}/ns")];
        dirs.extend(functions.iter().map(|f| format!("{top}/ns/{f}")));
        for d in &dirs {
            for root in [V2_ROOT, MEM_ROOT] {
                if Path::new(root).is_dir() {
                    fs::create_dir_all(Path::new(root).join(d)).expect("create function cgroup");
                }
            }
        }
        Self(dirs)
    }

    fn path(&self, function: &str, replica: &str) -> String {
        format!("{}/ns/{function}/{replica}", self.0[0])
    }
}

impl Drop for FunctionDirs {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            for root in [V2_ROOT, MEM_ROOT] {
                let _ = fs::remove_dir(Path::new(root).join(d));
            }
        }
    }
}

fn listed(cg: &TestCgroup, function: &str, mode: Mode) -> Replica {
    Replica {
        namespace: "ns".into(),
        function: function.into(),
        replica: cg.name.clone(),
        ..cg.replica(mode)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_replica_is_metered_from_its_first_request() {
    if !can_run("a_new_replica_is_metered_from_its_first_request") {
        return;
    }
    let _serial = common::serial().await;
    let dirs = FunctionDirs::new(&["web", "cmd"]);
    let web0 = TestCgroup::at(&dirs.path("web", "web-0"));
    let cmd0 = TestCgroup::at(&dirs.path("cmd", "cmd-0"));
    // The source lists one replica of each function, and never the new ones below.
    let mut agent = TestAgent::start(vec![
        listed(&web0, "web", Mode::Http),
        listed(&cmd0, "cmd", Mode::Fork),
    ])
    .await;

    // http: a replica that starts and serves at once (no poll in between could name it).
    let web1 = TestCgroup::at(&dirs.path("web", "web-1"));
    let server = Proc::spawn(web1.command(&fixture_binary("http_server"), &[]));
    let port: u16 = server
        .line(Duration::from_secs(10))
        .trim()
        .parse()
        .expect("port");
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (status, _) = tokio::task::block_in_place(|| http_get(&mut conn, "/?ms=1", "first-web"));
    assert_eq!(status, 200);
    let ev = agent.next_event(Duration::from_secs(5)).await;
    assert_eq!(ev.call_id.as_deref(), Some("first-web"), "{ev:?}");
    assert_eq!(
        (&*ev.namespace, &*ev.function_name, &*ev.replica),
        ("ns", "web", "web-1")
    );
    assert_eq!(ev.status_code, 200);

    // fork: the first process of a new replica carries its call id.
    let cmd1 = TestCgroup::at(&dirs.path("cmd", "cmd-1"));
    let out = cmd1
        .command(
            &fixture_c("fork_probe"),
            &["0".into(), "5".into(), "0".into()],
        )
        .env("Http_X_Call_Id", "first-cmd")
        .output()
        .expect("run probe");
    assert!(out.status.success());
    let ev = agent.next_event(Duration::from_secs(5)).await;
    assert_eq!(ev.call_id.as_deref(), Some("first-cmd"), "{ev:?}");
    assert_eq!((&*ev.function_name, &*ev.replica), ("cmd", "cmd-1"));
    assert!(ev.duration_ns >= 5_000_000, "{ev:?}");

    // Several polls later the unlisted replicas are still watched (within the grace).
    agent.wait_synced().await;
    let (status, _) = tokio::task::block_in_place(|| http_get(&mut conn, "/?ms=1", "second-web"));
    assert_eq!(status, 200);
    let ev = agent.next_event(Duration::from_secs(5)).await;
    assert_eq!(
        (ev.call_id.as_deref(), &*ev.replica),
        (Some("second-web"), "web-1")
    );
    let text = agent.metrics.render();
    assert!(
        text.contains("tally_agent_replicas_discovered_total 2"),
        "{text}"
    );
    assert!(
        text.contains("tally_agent_unmatched_records_total 0"),
        "{text}"
    );
    drop(conn);
    drop(server);
    agent.stop().await;
    drop((web1, cmd1, web0, cmd0));
}
