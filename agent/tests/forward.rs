//! The forwarder against a tiny receiver standing in for the gateway's `/system/usage`:
//! basic auth, postcard batches (JSON arrays with `--ingest-format json`), an outage (refused, then 503s) that loses nothing, a
//! full buffer that drops and counts without a spool, spilling to the spool and sending it
//! in order (also after a restart), and a full spool that drops its oldest and counts them.
//! Needs no root.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use agent::{
    auth::Credentials,
    config::IngestFormat,
    event::{Text, UsageEvent},
    forward::{EventSink as _, ForwarderConfig, HttpForwarder, Spool},
    metrics::Metrics,
};
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};

#[derive(Default)]
struct Received {
    events: Mutex<Vec<UsageEvent>>,
    /// The content type of each accepted batch.
    content_types: Mutex<Vec<String>>,
    unauthorized: AtomicUsize,
    /// Answer 503 to this many requests before accepting.
    fail_first: AtomicUsize,
}

async fn receiver(listener: TcpListener, got: Arc<Received>, auth: String) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let got = got.clone();
        let auth = auth.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let got = got.clone();
                let auth = auth.clone();
                async move {
                    let ok_auth = req
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        == Some(&auth);
                    let path_ok =
                        req.uri().path() == "/system/usage" && req.method() == hyper::Method::POST;
                    let content_type = req
                        .headers()
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let status = if !ok_auth {
                        got.unauthorized.fetch_add(1, Ordering::SeqCst);
                        401
                    } else if !path_ok {
                        404
                    } else if got.fail_first.load(Ordering::SeqCst) > 0 {
                        got.fail_first.fetch_sub(1, Ordering::SeqCst);
                        503
                    } else {
                        let batch = read_batch(&content_type, &body);
                        got.events.lock().expect("lock").extend(batch);
                        got.content_types.lock().expect("lock").push(content_type);
                        204
                    };
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::new()))
                            .expect("response"),
                    )
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A batch as the gateway reads it: postcard by its content type, else a JSON array.
fn read_batch(content_type: &str, body: &[u8]) -> Vec<UsageEvent> {
    if content_type != agent_common::wire::CONTENT_TYPE {
        return serde_json::from_slice(body).expect("JSON array of events");
    }
    let batch = agent_common::wire::decode(body).expect("postcard batch");
    batch
        .into_iter()
        .map(|u| UsageEvent {
            id: Text::new(&u.id.expect("an id")).expect("an id's length"),
            call_id: u.call_id.map(|c| c.into_owned()),
            namespace: u.namespace.as_ref().into(),
            function_name: u.function_name.as_ref().into(),
            replica: u.replica.expect("a replica").as_ref().into(),
            started: Text::new(&u.started).expect("started's length"),
            duration_ns: u.duration_ns,
            status_code: u.status_code,
            memory_peak_bytes: u.memory_peak_bytes,
            memory_limit_bytes: u.memory_limit_bytes,
            cpu_ns: u.cpu_ns,
            exit_code: u.exit_code,
            source: u.source.into_owned().into(),
        })
        .collect()
}

fn event(i: usize) -> UsageEvent {
    UsageEvent {
        id: Text::new(&format!("00000000-0000-4000-8000-{i:012}")).unwrap(),
        call_id: Some(format!("call-{i}")),
        namespace: "openfaas-fn".into(),
        function_name: "env".into(),
        replica: "env-0".into(),
        started: Text::new("2026-01-01T00:00:00.000000001Z").unwrap(),
        duration_ns: 1_000 + i as u64,
        status_code: 200,
        memory_peak_bytes: 1 << 20,
        memory_limit_bytes: Some(128 << 20),
        cpu_ns: None,
        exit_code: None,
        source: "kernel".into(),
    }
}

fn creds() -> Credentials {
    Credentials {
        user: "admin".into(),
        password: "s3cret".into(),
    }
}

/// A free loopback port, not yet listened on (the outage).
async fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

fn start(
    addr: SocketAddr,
    capacity: usize,
    metrics: Arc<Metrics>,
) -> (
    HttpForwarder,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    start_spooled(addr, capacity, None, metrics)
}

fn start_spooled(
    addr: SocketAddr,
    capacity: usize,
    spool: Option<Spool>,
    metrics: Arc<Metrics>,
) -> (
    HttpForwarder,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    start_formatted(addr, capacity, spool, metrics, IngestFormat::Postcard)
}

fn start_formatted(
    addr: SocketAddr,
    capacity: usize,
    spool: Option<Spool>,
    metrics: Arc<Metrics>,
    format: IngestFormat,
) -> (
    HttpForwarder,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let (stop, stop_rx) = watch::channel(false);
    let config = ForwarderConfig {
        gateway_url: format!("http://{addr}"),
        credentials: Some(creds()),
        capacity,
        batch_size: 50,
        linger: Duration::from_millis(20),
        format,
    };
    let (sink, task) = HttpForwarder::spawn(config, spool, metrics, stop_rx);
    (sink, stop, task)
}

#[tokio::test]
async fn outage_loses_nothing() {
    let addr = free_port().await;
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let (sink, stop, task) = start(addr, 1000, metrics.clone());
    for i in 0..120 {
        sink.submit(event(i));
    }
    // The gateway is down (connection refused) for a while, then answers 503 twice.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(metrics.events_buffered.get(), 120);
    let got = Arc::new(Received::default());
    got.fail_first.store(2, Ordering::SeqCst);
    let listener = TcpListener::bind(addr).await.expect("rebind the port");
    tokio::spawn(receiver(listener, got.clone(), creds().header_value()));
    for _ in 0..200 {
        if got.events.lock().expect("lock").len() >= 120 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids: std::collections::BTreeSet<_> = got
        .events
        .lock()
        .expect("lock")
        .iter()
        .map(|e| e.call_id.clone())
        .collect();
    assert_eq!(
        got.events.lock().expect("lock").len(),
        120,
        "each event exactly once"
    );
    assert_eq!(ids.len(), 120);
    assert_eq!(got.unauthorized.load(Ordering::SeqCst), 0);
    assert_eq!(metrics.events_sent.get(), 120);
    assert_eq!(
        metrics
            .events_dropped
            .with_label_values(&["buffer_full"])
            .get(),
        0
    );
    assert_eq!(metrics.events_buffered.get(), 0);
    let _ = stop.send(true);
    task.await.expect("forwarder task");
}

#[tokio::test]
async fn full_buffer_drops_and_counts() {
    let addr = free_port().await;
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let (sink, stop, task) = start(addr, 10, metrics.clone());
    for i in 0..15 {
        sink.submit(event(i));
    }
    assert_eq!(
        metrics
            .events_dropped
            .with_label_values(&["buffer_full"])
            .get(),
        5
    );
    let got = Arc::new(Received::default());
    tokio::spawn(receiver(
        TcpListener::bind(addr).await.expect("bind"),
        got.clone(),
        creds().header_value(),
    ));
    for _ in 0..200 {
        if got.events.lock().expect("lock").len() >= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids: Vec<_> = got
        .events
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|e| e.call_id.clone())
        .collect();
    assert_eq!(
        ids,
        (5..15).map(|i| format!("call-{i}")).collect::<Vec<_>>(),
        "the newest 10 survive"
    );
    let _ = stop.send(true);
    task.await.expect("forwarder task");
}

#[tokio::test]
async fn batches_are_postcard_or_json_as_configured() {
    for (format, content_type) in [
        (IngestFormat::Postcard, agent_common::wire::CONTENT_TYPE),
        (IngestFormat::Json, "application/json"),
    ] {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let got = Arc::new(Received::default());
        tokio::spawn(receiver(listener, got.clone(), creds().header_value()));
        let (sink, stop, task) = start_formatted(addr, 1000, None, metrics, format);
        for i in 0..120 {
            sink.submit(event(i));
        }
        wait_for(&got, 120).await;
        let received = got.events.lock().expect("lock").clone();
        assert_eq!(
            received,
            (0..120).map(event).collect::<Vec<_>>(),
            "{format:?}"
        );
        let types = got.content_types.lock().expect("lock").clone();
        assert!(types.len() >= 3, "batches of 50: {types:?}");
        assert!(
            types.iter().all(|t| t == content_type),
            "{format:?}: {types:?}"
        );
        let _ = stop.send(true);
        task.await.expect("forwarder task");
    }
}

#[tokio::test]
async fn refused_credentials_drop_the_batch() {
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let got = Arc::new(Received::default());
    tokio::spawn(receiver(listener, got.clone(), "Basic bm90OnRoaXM=".into()));
    let (sink, stop, task) = start(addr, 100, metrics.clone());
    sink.submit(event(1));
    for _ in 0..100 {
        if metrics
            .events_dropped
            .with_label_values(&["rejected"])
            .get()
            == 1
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got.unauthorized.load(Ordering::SeqCst), 1);
    assert_eq!(
        metrics
            .events_dropped
            .with_label_values(&["rejected"])
            .get(),
        1
    );
    let _ = stop.send(true);
    task.await.expect("forwarder task");
}

/// A spool directory under the system temp dir, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("tally-fwd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        Self(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dropped(metrics: &Metrics) -> u64 {
    [
        "buffer_full",
        "spool_full",
        "spool_error",
        "spool_corrupt",
        "shutdown",
        "rejected",
    ]
    .iter()
    .map(|r| metrics.events_dropped.with_label_values(&[r]).get())
    .sum()
}

async fn wait_for(got: &Received, n: usize) {
    for _ in 0..400 {
        if got.events.lock().expect("lock").len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Anything beyond n (a duplicate) would arrive right behind.
    tokio::time::sleep(Duration::from_millis(200)).await;
}

fn received_ids(got: &Received) -> Vec<String> {
    got.events
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|e| e.call_id.clone())
        .collect()
}

fn call_ids(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("call-{i}")).collect()
}

#[tokio::test]
async fn outage_spills_to_disk_and_a_restart_sends_everything_in_order() {
    let addr = free_port().await;
    let dir = TempDir::new("restart");
    // First run: the gateway is down; 60 events fit in memory, the oldest beyond that are
    // spilled a batch (50) at a time.
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let spool = Spool::open(&dir.0, 1 << 20).expect("open spool");
    let (sink, stop, task) = start_spooled(addr, 60, Some(spool), metrics.clone());
    for i in 0..300 {
        sink.submit(event(i));
    }
    assert_eq!(metrics.events_buffered.get(), 50, "memory stays bounded");
    assert_eq!(metrics.events_spooled.get(), 250);
    assert_eq!(metrics.events_spilled.get(), 250);
    assert!(metrics.spool_bytes.get() > 250 * 100);
    assert!(
        Spool::open(&dir.0, 1 << 20).is_err(),
        "a second agent may not share the spool"
    );
    // Stopping with the gateway still away: memory (and the batch in flight) go to disk.
    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the forwarder stops within its grace")
        .expect("forwarder task");
    assert_eq!(metrics.events_spooled.get(), 300);
    assert_eq!(metrics.events_buffered.get(), 0);
    assert_eq!(metrics.events_sent.get(), 0);
    assert_eq!(dropped(&metrics), 0);
    drop(sink); // the last handle on the spool: its lock goes with it, as at process exit

    // Second run, the gateway back: the spool goes first, then what arrives meanwhile.
    let got = Arc::new(Received::default());
    got.fail_first.store(1, Ordering::SeqCst);
    tokio::spawn(receiver(
        TcpListener::bind(addr).await.expect("rebind"),
        got.clone(),
        creds().header_value(),
    ));
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let spool = Spool::open(&dir.0, 1 << 20).expect("reopen spool");
    assert_eq!(spool.events(), 300);
    let (sink, stop, task) = start_spooled(addr, 60, Some(spool), metrics.clone());
    for i in 300..320 {
        sink.submit(event(i));
    }
    wait_for(&got, 320).await;
    assert_eq!(
        received_ids(&got),
        call_ids(0..320),
        "each exactly once, in order"
    );
    let sent_ids: Vec<Text<36>> = got
        .events
        .lock()
        .expect("lock")
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(
        sent_ids,
        (0..320).map(|i| event(i).id).collect::<Vec<_>>(),
        "spooled events keep the id they were made with"
    );
    assert_eq!(metrics.events_sent.get(), 320);
    assert_eq!(metrics.events_spooled.get(), 0);
    let _ = stop.send(true);
    task.await.expect("forwarder task");
    assert_eq!(metrics.events_buffered.get(), 0);
    assert_eq!(metrics.events_spooled.get(), 0);
    assert_eq!(metrics.spool_bytes.get(), 0);
    assert_eq!(dropped(&metrics), 0);
    let left: Vec<_> = std::fs::read_dir(&dir.0)
        .expect("spool dir")
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != ".lock")
        .collect();
    assert!(left.is_empty(), "delivered segments are removed: {left:?}");
}

#[tokio::test]
async fn full_spool_drops_its_oldest_and_counts_them() {
    let addr = free_port().await;
    let dir = TempDir::new("full");
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let one = serde_json::to_vec(&event(100)).expect("json").len() as u64 + 1;
    // Room for 4 segments of 50 events (the batch size) on disk, 60 events in memory.
    let spool = Spool::open(&dir.0, one * 200 + 100).expect("open spool");
    let (sink, stop, task) = start_spooled(addr, 60, Some(spool), metrics.clone());
    for i in 100..460 {
        sink.submit(event(i));
    }
    // 300 spilled in 6 segments: the 2 oldest were dropped for room.
    assert_eq!(metrics.events_spilled.get(), 300);
    assert_eq!(
        metrics
            .events_dropped
            .with_label_values(&["spool_full"])
            .get(),
        100
    );
    assert_eq!(metrics.events_spooled.get(), 200);
    let got = Arc::new(Received::default());
    tokio::spawn(receiver(
        TcpListener::bind(addr).await.expect("bind"),
        got.clone(),
        creds().header_value(),
    ));
    wait_for(&got, 260).await;
    assert_eq!(
        received_ids(&got),
        call_ids(200..460),
        "the newest survive, in order"
    );
    assert_eq!(metrics.events_sent.get(), 260);
    let _ = stop.send(true);
    task.await.expect("forwarder task");
}
