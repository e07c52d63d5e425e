//! The gateway's configuration: plain data parsed once from flags with env fallbacks
//! (`TALLY_*`, and OpenFaaS's names where OpenFaaS has the setting).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::names::Namespace;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProviderKind {
    /// Each replica is a supervised process in its own cgroup on this machine.
    Local,
}

/// Tally gateway: OpenFaaS-compatible functions with in-kernel metering.
#[derive(Debug, Clone, Parser)]
#[command(name = "gateway", version, about)]
pub struct Config {
    /// Address of the public API (invocations, /system, /metrics, /healthz).
    #[arg(long, env = "TALLY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Directory for state, generated credentials and the provider's records
    /// [default: /var/lib/tally as root, else ~/.local/share/tally].
    #[arg(long, env = "TALLY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Which provider runs the functions.
    #[arg(long, env = "TALLY_PROVIDER", value_enum, default_value = "local")]
    pub provider: ProviderKind,

    /// Time allowed to read a request's headers and body (seconds or e.g. `1m5s`).
    #[arg(long, env = "read_timeout", default_value = "60s", value_parser = parse_duration)]
    pub read_timeout: Duration,

    /// Time allowed to produce a response's head.
    #[arg(long, env = "write_timeout", default_value = "60s", value_parser = parse_duration)]
    pub write_timeout: Duration,

    /// Time a function may take to answer before the gateway gives up with a 502.
    #[arg(long, env = "upstream_timeout", default_value = "60s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,

    /// Require HTTP basic auth on /system routes.
    #[arg(long, env = "basic_auth", default_value_t = true, action = clap::ArgAction::Set)]
    pub basic_auth: bool,

    /// Directory holding `basic-auth-user` and `basic-auth-password`
    /// [default: DATA_DIR/secrets, generated on first start].
    #[arg(long, env = "secret_mount_path")]
    pub secret_mount_path: Option<PathBuf>,

    /// Extra CA certificates (PEM) trusted for https webhooks and callbacks, besides the
    /// system's roots.
    #[arg(long, env = "TALLY_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,

    /// Default namespace of functions.
    #[arg(long, env = "function_namespace", default_value = "openfaas-fn")]
    pub function_namespace: Namespace,

    /// Further namespaces served besides the default one (comma-separated).
    #[arg(long, env = "TALLY_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<Namespace>,

    /// Hold requests for a function at zero replicas and scale it up.
    #[arg(long, env = "scale_from_zero", default_value_t = true, action = clap::ArgAction::Set)]
    pub scale_from_zero: bool,

    /// How long a request waits for a replica to become ready before a 503.
    #[arg(long, env = "TALLY_READY_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub ready_wait: Duration,

    /// Largest request body accepted on invocation routes, in bytes.
    #[arg(long, env = "TALLY_MAX_BODY_BYTES", default_value_t = 32 << 20)]
    pub max_body_bytes: u64,

    /// Largest JSON body accepted on /system routes, in bytes.
    #[arg(long, env = "TALLY_MAX_API_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_api_body_bytes: u64,

    /// Unprivileged user that function processes run as when the gateway runs as root.
    #[arg(long, env = "TALLY_FUNCTION_USER", default_value = "nobody")]
    pub function_user: String,

    /// Name of the cgroup directory (under each hierarchy) holding the replicas.
    #[arg(long, env = "TALLY_CGROUP_PARENT", default_value = "tally")]
    pub cgroup_parent: String,

    /// Time an http-mode replica has to start listening on its PORT.
    #[arg(long, env = "TALLY_STARTUP_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub startup_timeout: Duration,

    /// Which loop scales functions: `target` (built in, from each function's load),
    /// `alerts` (AlertManager posts to /system/alert) or `off`. Scale to zero works with
    /// `target` and `alerts`.
    #[arg(long, env = "TALLY_AUTOSCALER", value_enum, default_value = "target")]
    pub autoscaler: Autoscaler,

    /// How often the autoscaler looks at every function.
    #[arg(long, env = "TALLY_AUTOSCALER_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub autoscaler_interval: Duration,

    /// A function scales down only after a whole window of lower recommendations (and no
    /// change of its count); it scales up at once.
    #[arg(long, env = "TALLY_SCALE_DOWN_WINDOW", default_value = "60s", value_parser = parse_duration)]
    pub scale_down_window: Duration,

    /// Log and count the autoscaler's decisions without scaling.
    #[arg(long, env = "TALLY_AUTOSCALER_DRY_RUN", default_value_t = false, action = clap::ArgAction::Set)]
    pub autoscaler_dry_run: bool,

    /// Prometheus to read load from (its HTTP query API); unset or unreachable: the
    /// gateway's own counters.
    #[arg(long, env = "prometheus_url")]
    pub prometheus_url: Option<String>,

    #[command(flatten)]
    pub queue: QueueConfig,

    #[command(flatten)]
    pub metering: MeteringConfig,
}

/// Metering: usage events to JetStream, and the event-worker's signed webhook batches.
#[derive(Debug, Clone, clap::Args)]
pub struct MeteringConfig {
    /// Where usage events are POSTed in batches; metering is on whenever this is set.
    #[arg(long, env = "webhook_endpoint")]
    pub webhook_endpoint: Option<String>,

    /// The HMAC-SHA256 key for `X-Openfaas-Signature-256` (a file; trailing newline trimmed).
    #[arg(long, env = "webhook_secret_file")]
    pub webhook_secret_file: Option<std::path::PathBuf>,

    /// Namespaces whose invocations are not metered (comma-separated).
    #[arg(long, env = "metering_excluded_namespaces", value_delimiter = ',')]
    pub metering_excluded_namespaces: Vec<String>,

    /// OpenFaaS's spelling of --metering-excluded-namespaces.
    #[arg(long, env = "excludeNamespaces", value_delimiter = ',', hide = true)]
    pub exclude_namespaces: Vec<String>,

    /// `memory_bytes` of functions without a memory limit (OpenFaaS's default_memory).
    #[arg(long, env = "default_memory", default_value = "128Mi")]
    pub default_memory: String,

    /// Events the gateway buffers before flushing to JetStream; a full buffer drops (counted).
    #[arg(long, env = "TALLY_METERING_BUFFER", default_value_t = 100_000)]
    pub metering_buffer: usize,

    /// Flush when this many events are buffered (also the most events per JetStream
    /// message, which holds at most 1 MiB of JSON, 768 KiB once compressed)...
    #[arg(long, env = "TALLY_METERING_FLUSH_EVENTS", default_value_t = 2000)]
    pub metering_flush_events: usize,

    /// ...or when this long passed since the first buffered event.
    #[arg(long, env = "TALLY_METERING_FLUSH_INTERVAL", default_value = "200ms", value_parser = parse_duration)]
    pub metering_flush_interval: Duration,

    /// Spool each event to `DATA_DIR/metering-spool` before it is buffered, so a crash of
    /// the gateway loses none (replayed at start).
    #[arg(long, env = "TALLY_METERING_SPOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub metering_spool: bool,

    /// Where the spool lives [default: /dev/shm/tally/<data dir> — memory: survives a
    /// crash of the gateway, not of the machine, and costs a third of what a spool on
    /// disk does (BENCHMARKS.md); point it at a disk directory to survive reboots too].
    #[arg(long, env = "TALLY_METERING_SPOOL_DIR")]
    pub metering_spool_dir: Option<std::path::PathBuf>,

    /// How long the gateway's own event waits for the node agent's kernel event of the
    /// same call (used only while an agent is active).
    #[arg(long, env = "TALLY_METERING_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub metering_grace: Duration,

    /// Run the event-worker (JetStream → webhook) in this process.
    #[arg(long, env = "TALLY_EVENT_WORKER", default_value_t = true, action = clap::ArgAction::Set)]
    pub event_worker: bool,

    /// Most events in one webhook POST (a batch is whole JetStream messages: at least one).
    #[arg(long, env = "TALLY_WEBHOOK_BATCH_EVENTS", default_value_t = 2000)]
    pub webhook_batch_events: usize,

    /// Most bytes in one webhook POST.
    #[arg(long, env = "TALLY_WEBHOOK_BATCH_BYTES", default_value_t = 1 << 20)]
    pub webhook_batch_bytes: usize,

    /// Longest a partial batch waits for more events.
    #[arg(long, env = "TALLY_WEBHOOK_BATCH_WAIT", default_value = "500ms", value_parser = parse_duration)]
    pub webhook_batch_wait: Duration,

    /// Webhook POSTs in flight at once per event-worker.
    #[arg(long, env = "TALLY_WEBHOOK_CONCURRENCY", default_value_t = 4)]
    pub webhook_concurrency: usize,

    /// Time one webhook POST may take.
    #[arg(long, env = "TALLY_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub webhook_timeout: Duration,

    /// How long a fetched batch stays leased to an event-worker without news before
    /// JetStream redelivers it (to another worker, after a crash); at least twice
    /// --webhook-timeout. Set when the consumer is first created.
    #[arg(long, env = "TALLY_WEBHOOK_ACK_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub webhook_ack_wait: Duration,

    /// Longest wait between retries while the receiver is down or answers 5xx.
    #[arg(long, env = "TALLY_WEBHOOK_MAX_BACKOFF", default_value = "30s", value_parser = parse_duration)]
    pub webhook_max_backoff: Duration,
}

impl MeteringConfig {
    pub fn excluded(&self, namespace: &str) -> bool {
        self.metering_excluded_namespaces
            .iter()
            .chain(&self.exclude_namespaces)
            .any(|n| n.trim() == namespace)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Autoscaler {
    /// The built-in target autoscaler: load per replica against the function's target.
    Target,
    /// AlertManager's webhook scales functions (OpenFaaS's classic loop).
    Alerts,
    /// Nothing scales automatically (scale from zero still works).
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueueMode {
    /// One shared consumer for every function (OpenFaaS's classic queue-worker).
    Static,
    /// One consumer per function, so a flooded function cannot starve the others.
    Function,
}

/// Async invocations: NATS JetStream, the queue-worker, retries and callbacks.
#[derive(Debug, Clone, clap::Args)]
pub struct QueueConfig {
    /// NATS server(s), comma-separated. Unset: the gateway runs its own `nats-server -js`.
    #[arg(long, env = "TALLY_NATS_URL")]
    pub nats_url: Option<String>,

    /// OpenFaaS's NATS address (used with `faas_nats_port` when --nats-url is unset).
    #[arg(long, env = "faas_nats_address", hide = true)]
    pub faas_nats_address: Option<String>,

    #[arg(long, env = "faas_nats_port", hide = true)]
    pub faas_nats_port: Option<u16>,

    /// The nats-server binary for the embedded server.
    #[arg(long, env = "TALLY_NATS_SERVER_BIN", default_value = "nats-server")]
    pub nats_server_bin: String,

    /// Replicas of the streams and buckets (3 on a 3-node cluster).
    #[arg(long, env = "TALLY_NATS_REPLICAS", default_value_t = 1)]
    pub nats_replicas: usize,

    /// Default queue (stream `OF_<queue>`); a function may pick another with `com.openfaas.queue`.
    #[arg(long, env = "faas_queue", default_value = "faas-request")]
    pub queue_name: String,

    /// `function`: a consumer per function; `static`: one shared consumer.
    #[arg(long, env = "TALLY_QUEUE_MODE", value_enum, default_value = "function")]
    pub queue_mode: QueueMode,

    /// Run the queue-worker in this process.
    #[arg(long, env = "TALLY_QUEUE_WORKER", default_value_t = true, action = clap::ArgAction::Set)]
    pub queue_worker: bool,

    /// Invoke functions through the gateway at this URL instead of in process (to run
    /// a queue-worker on its own; use the same credentials as that gateway).
    #[arg(long, env = "TALLY_INVOKE_URL")]
    pub invoke_url: Option<String>,

    /// Async invocations in flight per consumer.
    #[arg(long, env = "TALLY_QUEUE_MAX_INFLIGHT", default_value_t = 32)]
    pub queue_max_inflight: usize,

    /// JetStream's redelivery lease; extended while a function runs.
    #[arg(long, env = "ack_wait", default_value = "30s", value_parser = parse_duration)]
    pub ack_wait: Duration,

    /// An idle per-function consumer is removed after this long.
    #[arg(long, env = "inactive_threshold", default_value = "30s", value_parser = parse_duration)]
    pub inactive_threshold: Duration,

    /// Attempts in all for a call answered with a retryable code.
    #[arg(long, env = "max_retry_attempts", default_value_t = 10)]
    pub max_retry_attempts: u32,

    #[arg(long, env = "initial_retry_wait", default_value = "10s", value_parser = parse_duration)]
    pub initial_retry_wait: Duration,

    #[arg(long, env = "max_retry_wait", default_value = "120s", value_parser = parse_duration)]
    pub max_retry_wait: Duration,

    /// Status codes that are retried.
    #[arg(
        long,
        env = "retry_http_codes",
        default_value = "408,429,500,502,503,504"
    )]
    pub retry_http_codes: String,

    /// Largest body accepted on /async-function (413 above).
    #[arg(long, env = "TALLY_ASYNC_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub async_max_body_bytes: u64,

    /// Hosts callbacks may go to (comma-separated); empty allows any.
    #[arg(long, env = "TALLY_CALLBACK_ALLOWED_HOSTS", value_delimiter = ',')]
    pub callback_allowed_hosts: Vec<String>,

    /// How long call status and results are kept.
    #[arg(long, env = "TALLY_ASYNC_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub async_retention: Duration,

    /// Largest result body kept in the call status.
    #[arg(long, env = "TALLY_ASYNC_RESULT_MAX_BYTES", default_value_t = 64 << 10)]
    pub async_result_max_bytes: usize,

    /// Attempts of a callback POST.
    #[arg(long, env = "TALLY_CALLBACK_ATTEMPTS", default_value_t = 5)]
    pub callback_attempts: u32,

    /// Time one callback POST may take.
    #[arg(long, env = "TALLY_CALLBACK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub callback_timeout: Duration,
}

impl Config {
    pub fn data_dir(&self) -> PathBuf {
        if let Some(dir) = &self.data_dir {
            return dir.clone();
        }
        if nix::unistd::geteuid().is_root() {
            return PathBuf::from("/var/lib/tally");
        }
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
        home.join(".local/share/tally")
    }

    /// Every namespace served, the default first.
    pub fn all_namespaces(&self) -> Vec<Namespace> {
        let mut all = vec![self.function_namespace.clone()];
        for ns in &self.namespaces {
            if !all.contains(ns) {
                all.push(ns.clone());
            }
        }
        all
    }
}

/// Parses a bare integer (seconds) or a Go-style duration such as `1m5s`, `500ms`, `1.5s`.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let bad = || format!("invalid duration {value:?}: use seconds (30) or units like 1m5s, 500ms");
    let mut total = 0f64;
    let mut rest = v;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let num: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad()),
        };
        total += num * scale;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_openfaas_forms() {
        assert_eq!(parse_duration("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1m5s"), Ok(Duration::from_secs(65)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn defaults_parse() {
        let c = Config::try_parse_from(["gateway"]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.upstream_timeout, Duration::from_secs(60));
        assert_eq!(c.function_namespace.as_str(), "openfaas-fn");
    }
}
