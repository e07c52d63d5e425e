//! The gateway's Prometheus metrics, named and labelled exactly as OpenFaaS's
//! (spec section 7: `function_name` is always `fn.namespace`).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub started: IntCounterVec,
    pub completed: IntCounterVec,
    pub seconds: HistogramVec,
    pub service_count: IntGaugeVec,
    pub inflight: IntGaugeVec,
    /// Tally: scale-from-zero scale calls made (one per burst of held requests).
    pub scale_from_zero: IntCounter,
    pub queue_submitted: IntCounter,
    pub queue_processed: IntCounter,
    pub queue_pending: IntGaugeVec,
    pub queue_inflight: IntGaugeVec,
    pub queue_retries: IntCounterVec,
    pub queue_dead_lettered: IntCounterVec,
    pub queue_callbacks: IntCounterVec,
    pub usage_events: IntCounterVec,
    pub usage_rejected: IntCounter,
    /// Usage events by stage: produced, flushed, delivered, parked, park_failed, dropped,
    /// kernel_late, kernel_duplicate, replayed, spool_error.
    pub metering: IntCounterVec,
    pub metering_batch_events: prometheus::Histogram,
    pub metering_delivery_seconds: prometheus::Histogram,
    pub metering_webhook_retries: IntCounter,
    /// Alerts from AlertManager by what came of them.
    pub alerts: IntCounterVec,
    pub autoscaler_decisions: IntCounterVec,
    pub target_load: prometheus::GaugeVec,
    pub autoscaler_fallbacks: IntCounter,
    pub autoscaler_prometheus_reads: IntCounter,
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric")
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let started = IntCounterVec::new(
            Opts::new(
                "gateway_function_invocation_started_total",
                "Invocations started (counted before forwarding)",
            ),
            &["function_name"],
        )
        .expect("valid metric");
        let completed = IntCounterVec::new(
            Opts::new(
                "gateway_function_invocation_total",
                "Invocations completed, by upstream status code",
            ),
            &["function_name", "code"],
        )
        .expect("valid metric");
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "gateway_functions_seconds",
                "Invocation duration in seconds",
            ),
            &["function_name", "code"],
        )
        .expect("valid metric");
        let service_count = IntGaugeVec::new(
            Opts::new("gateway_service_count", "Desired replicas of each function"),
            &["function_name"],
        )
        .expect("valid metric");
        let inflight = IntGaugeVec::new(
            Opts::new(
                "gateway_function_invocation_inflight",
                "Invocations in flight",
            ),
            &["function_name"],
        )
        .expect("valid metric");
        let scale_from_zero = IntCounter::new(
            "gateway_scale_from_zero_total",
            "Scale calls made to bring a function up from zero replicas",
        )
        .expect("valid metric");
        let queue_submitted = counter(
            "queue_worker_messages_submitted_total",
            "Async calls accepted and stored in JetStream",
        );
        let queue_processed = counter(
            "queue_worker_messages_processed_total",
            "Async calls finished (acked) by the queue-worker",
        );
        let queue_pending = gauge_vec(
            "queue_worker_pending_messages",
            "Async calls in the queue, per function",
            &["function_name"],
        );
        let queue_inflight = gauge_vec(
            "queue_worker_function_invocation_inflight",
            "Async calls running",
            &["function_name"],
        );
        let queue_retries = counter_vec(
            "queue_worker_retries_total",
            "Async calls scheduled for another attempt",
            &["function_name"],
        );
        let queue_dead_lettered = counter_vec(
            "queue_worker_dead_lettered_total",
            "Async calls moved to the dead letters",
            &["function_name"],
        );
        let queue_callbacks = counter_vec(
            "queue_worker_callbacks_total",
            "Callbacks by result (delivered, failed)",
            &["result"],
        );
        let usage_events = counter_vec(
            "gateway_usage_events_total",
            "Usage events ingested, by source",
            &["source"],
        );
        let usage_rejected = counter(
            "gateway_usage_events_rejected_total",
            "Usage events refused (invalid or absurd values)",
        );
        let metering = counter_vec(
            "gateway_metering_events_total",
            "Usage events by stage (produced, flushed, delivered, parked, park_failed, dropped, kernel_late, kernel_duplicate, replayed, spool_error)",
            &["stage"],
        );
        let metering_batch_events = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "gateway_metering_webhook_batch_events",
                "Events per delivered webhook batch",
            )
            .buckets(vec![1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0]),
        )
        .expect("valid metric");
        let metering_delivery_seconds = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "gateway_metering_delivery_seconds",
                "From the end of an invocation to its event's delivery",
            )
            .buckets(vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
        )
        .expect("valid metric");
        let metering_webhook_retries = counter(
            "gateway_metering_webhook_retries_total",
            "Webhook deliveries retried (receiver down or 5xx)",
        );
        let alerts = counter_vec(
            "gateway_alerts_total",
            "AlertManager alerts by result (scaled, unchanged, ignored, failed)",
            &["result"],
        );
        let autoscaler_decisions = counter_vec(
            "gateway_autoscaler_decisions_total",
            "Autoscaler decisions",
            &["function_name", "direction", "reason"],
        );
        let target_load = prometheus::GaugeVec::new(
            Opts::new(
                "gateway_service_target_load",
                "Target load per replica (target × proportion)",
            ),
            &["function_name"],
        )
        .expect("valid metric");
        let autoscaler_fallbacks = counter(
            "gateway_autoscaler_source_fallbacks_total",
            "Loads read from the gateway's counters because Prometheus could not answer",
        );
        let autoscaler_prometheus_reads = counter(
            "gateway_autoscaler_prometheus_reads_total",
            "Loads read from Prometheus (a value came back)",
        );
        for c in [
            Box::new(started.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(completed.clone()),
            Box::new(seconds.clone()),
            Box::new(service_count.clone()),
            Box::new(inflight.clone()),
            Box::new(scale_from_zero.clone()),
            Box::new(queue_submitted.clone()),
            Box::new(queue_processed.clone()),
            Box::new(queue_pending.clone()),
            Box::new(queue_inflight.clone()),
            Box::new(queue_retries.clone()),
            Box::new(queue_dead_lettered.clone()),
            Box::new(queue_callbacks.clone()),
            Box::new(usage_events.clone()),
            Box::new(usage_rejected.clone()),
            Box::new(metering.clone()),
            Box::new(metering_batch_events.clone()),
            Box::new(metering_delivery_seconds.clone()),
            Box::new(metering_webhook_retries.clone()),
            Box::new(alerts.clone()),
            Box::new(autoscaler_decisions.clone()),
            Box::new(target_load.clone()),
            Box::new(autoscaler_fallbacks.clone()),
            Box::new(autoscaler_prometheus_reads.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Self {
            registry,
            started,
            completed,
            seconds,
            service_count,
            inflight,
            scale_from_zero,
            queue_submitted,
            queue_processed,
            queue_pending,
            queue_inflight,
            queue_retries,
            queue_dead_lettered,
            queue_callbacks,
            usage_events,
            usage_rejected,
            metering,
            metering_batch_events,
            metering_delivery_seconds,
            metering_webhook_retries,
            alerts,
            autoscaler_decisions,
            target_load,
            autoscaler_fallbacks,
            autoscaler_prometheus_reads,
        }
    }

    /// `sum(gateway_function_invocation_total) by (function_name)` for one function.
    pub fn invocation_count(&self, function_label: &str) -> f64 {
        use prometheus::core::Collector;
        self.completed
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "function_name" && l.value() == function_label)
            })
            .map(|m| m.get_counter().get_value())
            .sum()
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invocation_count_sums_codes() {
        let m = Metrics::new();
        m.completed.with_label_values(&["a.ns", "200"]).inc_by(3);
        m.completed.with_label_values(&["a.ns", "500"]).inc();
        m.completed.with_label_values(&["b.ns", "200"]).inc();
        assert_eq!(m.invocation_count("a.ns"), 4.0);
        assert_eq!(m.invocation_count("c.ns"), 0.0);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains(
                "gateway_function_invocation_total{code=\"500\",function_name=\"a.ns\"} 1"
            )
        );
    }
}
