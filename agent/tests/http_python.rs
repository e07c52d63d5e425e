//! http mode against ground truth, Python server: one keep-alive connection, requests that
//! sleep 1 ms … 2 s and allocate 0 … 512 MiB; the handler reports CLOCK_MONOTONIC times and
//! VmHWM, which the kernel's request → last byte and peak RSS must match.

mod common;

use std::{net::TcpStream, time::Duration};

use agent::workloads::Mode;
use common::{
    Proc, TestAgent, TestCgroup, assert_duration, assert_memory, can_run, fixture_path, http_get,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_keepalive_duration_and_memory() {
    if !can_run("python_keepalive_duration_and_memory") {
        return;
    }
    let _serial = common::serial().await;
    let cg = TestCgroup::new(Some(1 << 30));
    let mut agent = TestAgent::start(vec![cg.replica(Mode::Http)]).await;
    let server = Proc::spawn(cg.command_fifo(
        "/usr/bin/python3".as_ref(),
        &[fixture_path("http_server.py").display().to_string()],
    ));
    let port: u16 = server
        .line(Duration::from_secs(10))
        .trim()
        .parse()
        .expect("port");
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    // (ms, MiB, response bytes); allocations only grow, so VmHWM after a request is its peak.
    let cases: [(u64, u64, usize); 8] = [
        (1, 0, 2),
        (2000, 0, 2),
        (5, 1, 100),
        (50, 16, 1000),
        (200, 64, 10 << 20),
        (10, 128, 2),
        (1, 256, 64 << 10),
        (100, 512, 2),
    ];
    for (i, &(ms, mib, size)) in cases.iter().enumerate() {
        let call_id = format!("py-{i}-{ms}ms-{mib}MiB-{size}B");
        let path = format!("/?ms={ms}&mib={mib}&size={size}");
        let (status, len) = tokio::task::block_in_place(|| http_get(&mut conn, &path, &call_id));
        assert_eq!((status, len), (200, size));
        let line = server.line(Duration::from_secs(10));
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f[0], call_id, "server log line {line:?}");
        let (t0, t1, hwm): (u64, u64, u64) = (
            f[1].parse().expect("t0"),
            f[2].parse().expect("t1"),
            f[3].parse().expect("hwm"),
        );
        let ev = agent.next_event(Duration::from_secs(5)).await;
        let k_start = common::mono_ns(&ev.started);
        eprintln!(
            "py {ms:>4} ms {mib:>3} MiB {size:>8} B: kernel {} ns, handler {} ns (start edge {} ns); \
             peak {} B, VmHWM {hwm} B",
            ev.duration_ns,
            t1 - t0,
            t0 as i64 - k_start as i64,
            ev.memory_peak_bytes
        );
        assert_eq!(ev.call_id.as_deref(), Some(call_id.as_str()));
        assert_eq!(ev.status_code, 200);
        assert_eq!(ev.memory_limit_bytes, Some(1 << 30));
        assert_duration(&call_id, ev.duration_ns, t1 - t0);
        assert_memory(&call_id, ev.memory_peak_bytes, hwm);
    }
    drop(conn);
    drop(server);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_killed_mid_request_is_still_reported() {
    if !can_run("replica_killed_mid_request_is_still_reported") {
        return;
    }
    let _serial = common::serial().await;
    let cg = TestCgroup::new(None);
    let mut agent = TestAgent::start(vec![cg.replica(Mode::Http)]).await;
    let mut server = Proc::spawn(cg.command_fifo(
        "/usr/bin/python3".as_ref(),
        &[fixture_path("http_server.py").display().to_string()],
    ));
    let port: u16 = server
        .line(Duration::from_secs(10))
        .trim()
        .parse()
        .expect("port");
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    std::io::Write::write_all(
        &mut conn,
        b"GET /?ms=5000 HTTP/1.1\r\nHost: x\r\nX-Call-Id: doomed\r\n\r\n",
    )
    .expect("send");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = server.child.kill();
    let _ = server.child.wait();
    // No response and no close(2): the agent's sweep finds the dead process's open exchange.
    let ev = agent.next_event(Duration::from_secs(8)).await;
    eprintln!("killed mid-request: {ev:?}");
    assert_eq!(ev.call_id.as_deref(), Some("doomed"));
    assert_eq!(ev.status_code, 0, "no response was written");
    assert!(
        ev.duration_ns >= 250_000_000,
        "duration {} ns",
        ev.duration_ns
    );
    agent.stop().await;
}
