//! The autoscaling loop: every interval, for every function, reads its load (Prometheus
//! when configured and answering, else the gateway's own counters), decides with
//! [`super::target`], logs and counts the decision with its inputs, and scales.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::labels::{ScaleLabels, ScaleType};
use super::target::{Reason, Smoother, recommend, should_zero};
use crate::Gateway;
use crate::config::Autoscaler;
use crate::names::{FunctionName, FunctionRef, Namespace};

/// The window the gateway's own request rate is measured over.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// What the loop remembers of one function between ticks.
struct FnState {
    smoother: Smoother,
    started: u64,
    /// (time, invocations started) over the last [`RATE_WINDOW`]: the local rps is the
    /// rate across it, steadier than one interval's count (like Prometheus' rate[30s]).
    samples: std::collections::VecDeque<(Instant, u64)>,
    last_activity: Instant,
}

pub fn start(gw: &Arc<Gateway>) {
    if gw.config.autoscaler == Autoscaler::Off {
        return;
    }
    let weak = Arc::downgrade(gw);
    tokio::spawn(async move {
        let mut states: HashMap<String, FnState> = HashMap::new();
        let http = client();
        let interval = weak
            .upgrade()
            .map_or(Duration::from_secs(5), |g| g.config.autoscaler_interval);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(gw) = weak.upgrade() else { return };
            if *gw.stopping.borrow() {
                return;
            }
            once(&gw, &mut states, &http).await;
        }
    });
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<bytes::Bytes>,
>;

fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

async fn once(gw: &Arc<Gateway>, states: &mut HashMap<String, FnState>, http: &Client) {
    let now = Instant::now();
    let mut seen = Vec::new();
    for ns in gw.provider.namespaces() {
        for status in gw.provider.list(&ns).unwrap_or_default() {
            let (Ok(name), Ok(namespace)) = (
                FunctionName::new(status.name.clone()),
                Namespace::new(status.namespace.clone()),
            ) else {
                continue;
            };
            let f = FunctionRef { namespace, name };
            let label = f.metric_label();
            seen.push(label.clone());
            let Ok(labels) = ScaleLabels::parse(status.labels.as_ref()) else {
                continue;
            };
            let started = gw.metrics.started.with_label_values(&[&label]).get();
            let inflight = gw
                .metrics
                .inflight
                .with_label_values(&[&label])
                .get()
                .max(0) as u64;
            let queued = gw
                .metrics
                .queue_pending
                .with_label_values(&[&label])
                .get()
                .max(0) as u64;
            let state = states.entry(label.clone()).or_insert_with(|| FnState {
                smoother: Smoother::default(),
                started,
                samples: std::collections::VecDeque::from([(now, started)]),
                last_activity: now,
            });
            if started != state.started || inflight > 0 || queued > 0 {
                state.last_activity = now;
            }
            state.started = started;
            state.samples.push_back((now, started));
            while state.samples.len() > 2
                && state
                    .samples
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
            {
                state.samples.pop_front();
            }
            let local_rps = match state.samples.front() {
                Some((t, count)) if *t < now => {
                    started.saturating_sub(*count) as f64 / now.duration_since(*t).as_secs_f64()
                }
                _ => 0.0,
            };
            let current = status.replicas;
            if current == 0 {
                // Bringing a function back from zero is scale from zero's job.
                continue;
            }
            if should_zero(
                &labels,
                now.duration_since(state.last_activity),
                inflight,
                queued,
            ) {
                decide(
                    gw,
                    &f,
                    &label,
                    current,
                    0,
                    Reason::Idle,
                    format!("idle for {:?}", now.duration_since(state.last_activity)),
                )
                .await;
                continue;
            }
            if gw.config.autoscaler != Autoscaler::Target || labels.min == labels.max {
                continue;
            }
            gw.metrics
                .target_load
                .with_label_values(&[&label])
                .set(labels.target * labels.proportion);
            let load = match labels.kind {
                ScaleType::Rps => {
                    prometheus_or(
                        gw,
                        http,
                        &format!("tally:function_rps:rate30s{{function_name=\"{label}\"}}"),
                        local_rps,
                    )
                    .await
                }
                ScaleType::Capacity => {
                    prometheus_or(
                        gw,
                        http,
                        &format!("tally:function_inflight:max45s{{function_name=\"{label}\"}}"),
                        inflight as f64,
                    )
                    .await
                }
                ScaleType::Queue => {
                    prometheus_or(
                        gw,
                        http,
                        &format!("sum(queue_worker_pending_messages{{function_name=\"{label}\"}})"),
                        queued as f64,
                    )
                    .await
                }
                ScaleType::Cpu => gw.provider.usage(&f).await.map_or(0.0, |u| u.cpu),
            };
            let recommended = recommend(load, current, &labels);
            let next = state
                .smoother
                .next(now, current, recommended, gw.config.scale_down_window);
            if next != current {
                let inputs = format!(
                    "{:?} load {load:.2} over {current} replicas, target {} × {}, recommended {recommended}",
                    labels.kind, labels.target, labels.proportion
                );
                decide(gw, &f, &label, current, next, Reason::Load, inputs).await;
            }
        }
    }
    states.retain(|k, _| seen.contains(k));
}

/// One decision: a log line with its inputs, a counter, and (unless dry-run) the scale.
async fn decide(
    gw: &Gateway,
    f: &FunctionRef,
    label: &str,
    from: u64,
    to: u64,
    reason: Reason,
    inputs: String,
) {
    let direction = if to > from { "up" } else { "down" };
    gw.metrics
        .autoscaler_decisions
        .with_label_values(&[label, direction, reason.as_str()])
        .inc();
    let dry = gw.config.autoscaler_dry_run;
    tracing::info!(function = %label, from, to, reason = reason.as_str(), dry_run = dry, "autoscaler: {inputs}");
    if !dry && let Err(e) = gw.provider.scale(f, to).await {
        tracing::warn!(function = %label, "autoscaler could not scale: {e}");
    }
}

/// The query's value from Prometheus, or `local` (counted) when it cannot answer.
async fn prometheus_or(gw: &Gateway, http: &Client, query: &str, local: f64) -> f64 {
    let Some(base) = &gw.config.prometheus_url else {
        return local;
    };
    match query_prometheus(http, base, query).await {
        Ok(Some(v)) => {
            gw.metrics.autoscaler_prometheus_reads.inc();
            v
        }
        // No series yet (a new function, or before the first recording): the local count.
        Ok(None) => local,
        Err(e) => {
            gw.metrics.autoscaler_fallbacks.inc();
            tracing::warn!(
                "Prometheus at {base} unreachable ({e}); using the gateway's own counters"
            );
            local
        }
    }
}

async fn query_prometheus(http: &Client, base: &str, query: &str) -> Result<Option<f64>, String> {
    use http_body_util::BodyExt;
    let q: String = form_urlencoded::byte_serialize(query.as_bytes()).collect();
    let uri: http::Uri = format!("{}/api/v1/query?query={q}", base.trim_end_matches('/'))
        .parse()
        .map_err(|e| format!("{e}"))?;
    let resp = tokio::time::timeout(Duration::from_secs(2), http.get(uri))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("answered {}", resp.status()));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let value = v["data"]["result"]
        .get(0)
        .and_then(|r| r["value"][1].as_str())
        .and_then(|s| s.parse::<f64>().ok());
    Ok(value)
}
