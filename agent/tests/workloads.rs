//! Workload sources without root: the gateway's `GET /system/replicas` (contract JSON, basic
//! auth) through a stand-in server, and the start-up check that names a missing tracepoint.

use std::{convert::Infallible, path::PathBuf};

use agent::{
    auth::Credentials,
    workloads::{GatewayWorkloads, Mode, WorkloadSource as _},
};
use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const ANSWER: &str = r#"{"cgroup":{"mode":"hybrid","unified_root":"/sys/fs/cgroup/unified"},
 "replicas":[{"namespace":"openfaas-fn","function":"env","replica":"env-0","mode":"fork",
   "cgroup_path":"/sys/fs/cgroup/unified/tally/openfaas-fn/env/env-0","cgroup_id":12345,
   "memory_cgroup_path":"/sys/fs/cgroup/memory/tally/openfaas-fn/env/env-0",
   "memory_limit_bytes":134217728,"pids":[4242],"port":null,"ready":true},
  {"namespace":"openfaas-fn","function":"web","replica":"web-1","mode":"http",
   "cgroup_path":"/sys/fs/cgroup/unified/tally/openfaas-fn/web/web-1","cgroup_id":777,
   "memory_cgroup_path":null,"memory_limit_bytes":null,"pids":[],"port":8081,"ready":false}]}"#;

#[tokio::test]
async fn gateway_replicas_with_basic_auth() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let creds = Credentials {
        user: "admin".into(),
        password: "pw".into(),
    };
    let want_auth = creds.header_value();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let want_auth = want_auth.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let ok = req
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        == Some(want_auth.as_str())
                        && req.uri().path() == "/system/replicas";
                    let (status, body) = if ok { (200, ANSWER) } else { (401, "") };
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(body)))
                                .expect("resp"),
                        )
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let url = format!("http://{addr}");
    let list = GatewayWorkloads::new(&url, Some(creds))
        .replicas()
        .await
        .expect("replicas");
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].mode, Mode::Fork);
    assert_eq!(list[0].cgroup_id, Some(12345));
    assert_eq!(list[0].memory_limit_bytes, Some(134_217_728));
    assert_eq!(list[0].pids, vec![4242]);
    assert_eq!(list[1].mode, Mode::Http);
    assert_eq!(list[1].port, Some(8081));
    assert!(!list[1].ready);
    // Wrong credentials: a clear error, not an empty list.
    let bad = Credentials {
        user: "admin".into(),
        password: "wrong".into(),
    };
    let err = GatewayWorkloads::new(&url, Some(bad))
        .replicas()
        .await
        .expect_err("401 must fail");
    assert!(err.to_string().contains("401"), "{err}");
}

#[test]
fn missing_tracepoint_is_named() {
    // Each tracepoint the agent needs, left out in turn from a fake tracefs: a plain one
    // (`kmem:rss_stat`), a raw one the socket programs attach to, and the one the start-up
    // calibration attaches to for a moment.
    for (category, missing) in [
        ("kmem", "rss_stat"),
        ("sock", "sock_recv_length"),
        ("raw_syscalls", "sys_exit"),
    ] {
        let dir = std::env::temp_dir().join(format!(
            "tally-fake-tracefs-{}-{missing}",
            std::process::id()
        ));
        for prog in agent::loader::PROGRAMS
            .iter()
            .chain([&agent::loader::CALIBRATION])
        {
            if prog.tracepoint != missing {
                let p: PathBuf = dir.join("events").join(prog.category).join(prog.tracepoint);
                std::fs::create_dir_all(&p).expect("mkdir");
                std::fs::write(p.join("id"), "1\n").expect("id");
            }
        }
        let err = agent::loader::check_tracepoints(&dir).expect_err("a tracepoint is missing");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            err.to_string().contains(&format!("{category}:{missing}")),
            "{err}"
        );
    }
}
