//! http mode edge cases with the Python server: a response without Content-Length (ended by
//! closing the connection), a keep-alive connection opened before the agent started, and
//! the programs paused (SIGUSR1) and resumed (SIGUSR2).

mod common;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use agent::workloads::Mode;
use common::{Proc, TestAgent, TestCgroup, assert_duration, can_run, fixture_path, http_get};

fn python(cg: &TestCgroup) -> (Proc, u16) {
    let server = Proc::spawn(cg.command_fifo(
        "/usr/bin/python3".as_ref(),
        &[fixture_path("http_server.py").display().to_string()],
    ));
    let port = server
        .line(Duration::from_secs(10))
        .trim()
        .parse()
        .expect("port");
    (server, port)
}

/// (call id, t0, t1) from the server's log line.
fn logged(server: &Proc) -> (String, u64, u64) {
    let line = server.line(Duration::from_secs(10));
    let f: Vec<&str> = line.split_whitespace().collect();
    (
        f[0].to_owned(),
        f[1].parse().expect("t0"),
        f[2].parse().expect("t1"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_without_length_ends_at_close() {
    if !can_run("response_without_length_ends_at_close") {
        return;
    }
    let _serial = common::serial().await;
    let cg = TestCgroup::new(None);
    let mut agent = TestAgent::start(vec![cg.replica(Mode::Http)]).await;
    let (server, port) = python(&cg);
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    conn.write_all(
        b"GET /?ms=30&size=200000&nolen=1 HTTP/1.1\r\nHost: x\r\nX-Call-Id: no-length\r\n\r\n",
    )
    .expect("send");
    let mut all = Vec::new();
    tokio::task::block_in_place(|| conn.read_to_end(&mut all)).expect("read to close");
    assert!(all.len() > 200_000);
    let (id, t0, t1) = logged(&server);
    assert_eq!(id, "no-length");
    let ev = agent.next_event(Duration::from_secs(5)).await;
    eprintln!(
        "no length: kernel {} ns, handler {} ns",
        ev.duration_ns,
        t1 - t0
    );
    assert_eq!(ev.call_id.as_deref(), Some("no-length"));
    assert_eq!(ev.status_code, 200);
    // The exchange ends at the last write, not at the close that revealed it.
    assert_duration("no-length", ev.duration_ns, t1 - t0);
    // Only http-mode replicas: sched_switch (fork-mode cpu_ns) is loaded but not attached,
    // so the node's context switches do not run it.
    tokio::time::sleep(Duration::from_millis(700)).await; // one bpf_stats refresh
    let text = agent.metrics.render();
    assert!(
        text.contains("tally_agent_bpf_run_count{program=\"tally_switch\"} 0\n"),
        "{text}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_older_than_the_agent_is_metered() {
    if !can_run("connection_older_than_the_agent_is_metered") {
        return;
    }
    let _serial = common::serial().await;
    let cg = TestCgroup::new(None);
    let (server, port) = python(&cg);
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    // Served while no agent runs (as during an agent restart).
    let (status, _) = tokio::task::block_in_place(|| http_get(&mut conn, "/?ms=1", "before"));
    assert_eq!(status, 200);
    logged(&server);
    let mut agent = TestAgent::start(vec![cg.replica(Mode::Http)]).await;
    // The server thread was already blocked in recvfrom when the programs attached: that
    // read is seen when it returns (its arguments are still in the saved registers), so the
    // first request after the agent started is metered like the next one.
    let (status, _) = tokio::task::block_in_place(|| http_get(&mut conn, "/?ms=5", "after-1"));
    assert_eq!(status, 200);
    let (_, a0, a1) = logged(&server);
    let (status, _) = tokio::task::block_in_place(|| http_get(&mut conn, "/?ms=20", "after-2"));
    assert_eq!(status, 200);
    let (_, b0, b1) = logged(&server);
    let evs = agent.collect(3, Duration::from_secs(2)).await;
    let ids: Vec<_> = evs
        .iter()
        .map(|e| e.call_id.clone().unwrap_or_default())
        .collect();
    eprintln!("events after the agent started: {ids:?}");
    assert!(!ids.contains(&"before".to_owned()));
    for (id, t0, t1) in [("after-1", a0, a1), ("after-2", b0, b1)] {
        assert_eq!(ids.iter().filter(|i| *i == id).count(), 1, "{id}: {ids:?}");
        let ev = evs
            .iter()
            .find(|e| e.call_id.as_deref() == Some(id))
            .expect("metered");
        assert_duration(id, ev.duration_ns, t1 - t0);
    }
    agent.stop().await;
}

/// Waits until the agent's `tally_agent_programs_attached` gauge reads `want`.
async fn programs_attached(agent: &TestAgent, want: i64) {
    for _ in 0..200 {
        if agent.metrics.programs_attached.get() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("tally_agent_programs_attached never became {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_programs_meter_nothing_until_resumed() {
    use nix::sys::signal::{Signal, raise};
    if !can_run("paused_programs_meter_nothing_until_resumed") {
        return;
    }
    let _serial = common::serial().await;
    let cg = TestCgroup::new(None);
    let mut agent = TestAgent::start(vec![cg.replica(Mode::Http)]).await;
    let (server, port) = python(&cg);
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut get = |id: &str| {
        let (status, _) = tokio::task::block_in_place(|| http_get(&mut conn, "/?ms=2", id));
        assert_eq!(status, 200);
        logged(&server)
    };
    get("attached");
    assert_eq!(
        agent
            .next_event(Duration::from_secs(5))
            .await
            .call_id
            .as_deref(),
        Some("attached")
    );
    // The agent's run loop handles the signals (this process is the agent here).
    raise(Signal::SIGUSR1).expect("SIGUSR1");
    programs_attached(&agent, 0).await;
    get("paused-1");
    get("paused-2");
    let none = agent.collect(1, Duration::from_millis(500)).await;
    assert!(none.is_empty(), "metered while detached: {none:?}");
    raise(Signal::SIGUSR2).expect("SIGUSR2");
    programs_attached(&agent, 1).await;
    let (_, t0, t1) = get("resumed");
    let ev = agent.next_event(Duration::from_secs(5)).await;
    assert_eq!(ev.call_id.as_deref(), Some("resumed"));
    assert_duration("resumed", ev.duration_ns, t1 - t0);
    agent.stop().await;
}
