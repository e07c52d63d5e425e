//! Alert-driven scaling end to end with a real Prometheus scraping the gateway, the
//! shipped alert rule, and a real AlertManager posting to `/system/alert`.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real Prometheus on `port` with `config`, its data under `dir`; killed on drop.
fn prometheus(config: &std::path::Path, dir: &std::path::Path, port: u16) -> Killed {
    Killed(
        Command::new("/usr/bin/prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("prom").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Waits (30 s at most) until Prometheus at `url` says it is ready to serve queries.
async fn wait_ready(url: &str) {
    let started = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(format!("{url}/-/ready")).await
            && r.status().is_success()
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "Prometheus at {url} not ready after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn have(bin: &str) -> bool {
    std::path::Path::new(bin).exists()
}

#[tokio::test]
async fn a_burst_scales_up_through_prometheus_and_alertmanager_and_back_down() {
    if !have("/usr/bin/prometheus") || !have("/usr/bin/prometheus-alertmanager") {
        eprintln!(
            "SKIPPED: prometheus / prometheus-alertmanager not installed (cargo xtask setup installs them)"
        );
        return;
    }
    let gw = TestGateway::start(&["--autoscaler", "alerts", "--autoscaler-interval", "500ms"]);
    let mut f = http_fn("burst");
    f["labels"] = json!({"com.openfaas.scale.min": "1", "com.openfaas.scale.max": "5", "com.openfaas.scale.factor": "40",
                         "com.openfaas.scale.zero": "true", "com.openfaas.scale.zero-duration": "15s"});
    gw.deploy_ok(f).await;
    gw.wait_available("burst", 1).await;

    let dir = tempfile::tempdir().unwrap();
    let (prom_port, am_port) = (free_port(), free_port());
    let gw_addr = gw.url.trim_start_matches("http://").to_string();
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/prometheus/alert.rules.yml");
    let prom_cfg = dir.path().join("prometheus.yml");
    std::fs::write(&prom_cfg, format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{rules:?}]\n\
         alerting: {{alertmanagers: [{{static_configs: [{{targets: ['127.0.0.1:{am_port}']}}]}}]}}\n\
         scrape_configs: [{{job_name: tally, static_configs: [{{targets: ['{gw_addr}']}}]}}]\n",
        rules = rules.to_str().unwrap()
    )).unwrap();
    let am_cfg = dir.path().join("alertmanager.yml");
    let password = gw.data.path().join("secrets/basic-auth-password");
    std::fs::write(&am_cfg, format!(
        "route: {{group_by: [alertname, function_name], group_wait: 1s, group_interval: 1s, repeat_interval: 1h, receiver: gw}}\n\
         receivers: [{{name: gw, webhook_configs: [{{url: 'http://{gw_addr}/system/alert', send_resolved: true, \
         http_config: {{basic_auth: {{username: admin, password_file: {password:?}}}}}}}]}}]\n",
        password = password.to_str().unwrap()
    )).unwrap();
    let _am = Killed(
        Command::new("/usr/bin/prometheus-alertmanager")
            .arg(format!("--config.file={}", am_cfg.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("am").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{am_port}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _prom = prometheus(&prom_cfg, dir.path(), prom_port);

    // A burst of ~30 requests/s (bounded: at most 60 s) until the function has scaled up.
    let started = Instant::now();
    let mut scaled_to = 1;
    while started.elapsed() < Duration::from_secs(60) {
        for _ in 0..3 {
            assert_eq!(gw.invoke("burst").await.status(), 200);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let replicas = gw.describe("burst").await["replicas"].as_u64().unwrap();
        if replicas > 1 {
            scaled_to = replicas;
            break;
        }
    }
    assert!(
        scaled_to >= 3,
        "the burst scaled it up by ceil(5 × 40 / 100) = 2 at least: {scaled_to}"
    );
    eprintln!("scaled up to {scaled_to} after {:?}", started.elapsed());
    // The burst ends: the alert resolves and the function goes back to min.
    let ended = Instant::now();
    while gw.describe("burst").await["replicas"] != 1 {
        assert!(
            ended.elapsed() < Duration::from_secs(60),
            "never scaled back to min"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("back to min {:?} after the burst", ended.elapsed());
    // Labelled for it, the idle function then goes to zero, and a request brings it back.
    while gw.describe("burst").await["replicas"] != 0 {
        assert!(
            ended.elapsed() < Duration::from_secs(90),
            "never scaled to zero"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("zero {:?} after the burst", ended.elapsed());
    assert_eq!(
        gw.invoke("burst").await.status(),
        200,
        "the next request brings it back"
    );
    assert_eq!(gw.describe("burst").await["replicas"], 1);
    let m = gw.metrics().await;
    assert!(metric(&m, "gateway_alerts_total{result=\"scaled\"}").unwrap() >= 2.0);
}

#[tokio::test]
async fn the_target_autoscaler_reads_load_from_prometheus_recording_rules() {
    if !have("/usr/bin/prometheus") {
        eprintln!("SKIPPED: prometheus not installed (cargo xtask setup installs it)");
        return;
    }
    let prom_port = free_port();
    let prom_url = format!("http://127.0.0.1:{prom_port}");
    let gw = TestGateway::start(&[
        "--autoscaler",
        "target",
        "--autoscaler-interval",
        "1s",
        "--prometheus-url",
        &prom_url,
    ]);
    let mut f = http_fn("promload");
    f["labels"] = json!({"com.openfaas.scale.max": "6", "com.openfaas.scale.target": "5", "com.openfaas.scale.target-proportion": "1"});
    gw.deploy_ok(f).await;
    gw.wait_available("promload", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/prometheus/recording.rules.yml");
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{:?}]\n\
         scrape_configs: [{{job_name: tally, static_configs: [{{targets: ['{}']}}]}}]\n",
            rules.to_str().unwrap(),
            gw.url.trim_start_matches("http://")
        ),
    )
    .unwrap();
    let _prom = prometheus(&cfg, dir.path(), prom_port);
    // The autoscaler ran (and fell back) while Prometheus was starting: count from ready.
    wait_ready(&prom_url).await;
    let fallbacks_before = metric(
        &gw.metrics().await,
        "gateway_autoscaler_source_fallbacks_total",
    )
    .unwrap_or(0.0);
    eprintln!("{fallbacks_before} fallback(s) while Prometheus started");
    // ~20 requests/s (bounded: 60 s at most) until the load has been read from
    // Prometheus' recorded rate and the function has scaled to 3 or more.
    let started = Instant::now();
    loop {
        for _ in 0..2 {
            assert_eq!(gw.invoke("promload").await.status(), 200);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let m = gw.metrics().await;
        let reads = metric(&m, "gateway_autoscaler_prometheus_reads_total").unwrap_or(0.0);
        if reads >= 3.0 && gw.describe("promload").await["replicas"].as_u64().unwrap() >= 3 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never scaled up with Prometheus' rate"
        );
    }
    eprintln!(
        "scaled to 3+ with Prometheus' recorded rate after {:?}",
        started.elapsed()
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "gateway_autoscaler_source_fallbacks_total"),
        Some(fallbacks_before),
        "Prometheus answered every query once it was ready"
    );
}
