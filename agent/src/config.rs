//! The agent's configuration: command-line flags with `TALLY_*` environment fallbacks,
//! parsed in one place into plain data.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;

/// Tally's node agent: meters function invocations in the kernel with eBPF.
#[derive(Clone, Debug, Parser)]
#[command(name = "agent", version)]
pub struct Config {
    /// The gateway: replicas come from `/system/replicas`, usage goes to `/system/usage`.
    #[arg(
        long,
        env = "TALLY_GATEWAY_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub gateway_url: String,
    /// Where `/metrics` is served.
    #[arg(long, env = "TALLY_METRICS_LISTEN", default_value = "127.0.0.1:9102")]
    pub metrics_listen: SocketAddr,
    /// Directory with `basic-auth-user` and `basic-auth-password` (as the gateway's).
    #[arg(
        long,
        env = "secret_mount_path",
        default_value = "/var/openfaas/secrets"
    )]
    pub secret_mount_path: PathBuf,
    /// How often replicas are polled, in milliseconds.
    #[arg(long, env = "TALLY_POLL_INTERVAL_MS", default_value_t = 1000)]
    pub poll_interval_ms: u64,
    /// Usage events kept in memory while the gateway is unreachable; more are spooled.
    #[arg(long, env = "TALLY_BUFFER_CAPACITY", default_value_t = 100_000)]
    pub buffer_capacity: usize,
    /// Directory of the on-disk spool: events beyond the memory buffer while the gateway is
    /// unreachable, and whatever a stopping agent could not deliver (sent at the next start).
    #[arg(
        long,
        env = "TALLY_SPOOL_DIR",
        default_value = "/var/lib/tally-agent/spool"
    )]
    pub spool_dir: PathBuf,
    /// Largest size of the spool; when full, its oldest events are dropped (and counted).
    #[arg(long, env = "TALLY_SPOOL_MAX_BYTES", default_value_t = 1 << 30)]
    pub spool_max_bytes: u64,
    /// Measure each fork-mode invocation's CPU time (`cpu_ns`) with a `sched_switch`
    /// program, which runs at every context switch of the node (`--cpu-time false`: off).
    #[arg(long, env = "TALLY_CPU_TIME", default_value_t = true, action = clap::ArgAction::Set)]
    pub cpu_time: bool,
    /// Turn on the kernel's `bpf_stats` while the agent runs, for the
    /// `tally_agent_bpf_run_{time_seconds,count}` metrics. Off by default: it costs every
    /// program run two clock reads (≈ 100 ns on our VMs), and the syscall programs run on
    /// every syscall of the node.
    #[arg(long, env = "TALLY_BPF_STATS", default_value_t = false, action = clap::ArgAction::Set)]
    pub bpf_stats: bool,
    /// Usage events per POST.
    #[arg(long, env = "TALLY_BATCH_SIZE", default_value_t = 500)]
    pub batch_size: usize,
    /// How batches are encoded: `postcard` (binary, a fraction of JSON's cost on both
    /// sides) or `json` (for a gateway older than the binary batch).
    #[arg(long, env = "TALLY_INGEST_FORMAT", value_enum, default_value_t = IngestFormat::Postcard)]
    pub ingest_format: IngestFormat,
}

/// The body of `POST /system/usage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IngestFormat {
    /// [`agent_common::wire`]'s postcard batch.
    Postcard,
    /// A JSON array of events.
    Json,
}

impl Config {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms.max(50))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_flags() {
        let c =
            Config::try_parse_from(["agent", "--metrics-listen", "127.0.0.1:0"]).expect("parse");
        assert_eq!(c.gateway_url, "http://127.0.0.1:8080");
        assert_eq!(c.metrics_listen.port(), 0);
        assert_eq!(c.spool_dir, PathBuf::from("/var/lib/tally-agent/spool"));
        assert!(c.cpu_time);
        assert!(!c.bpf_stats);
        assert_eq!(c.ingest_format, IngestFormat::Postcard);
        let c = Config::try_parse_from(["agent", "--ingest-format", "json"]).expect("parse");
        assert_eq!(c.ingest_format, IngestFormat::Json);
        assert!(Config::try_parse_from(["agent", "--ingest-format", "xml"]).is_err());
        let c = Config::try_parse_from(["agent", "--cpu-time", "false", "--bpf-stats", "true"])
            .expect("parse");
        assert!(!c.cpu_time);
        assert!(c.bpf_stats);
        let c = Config::try_parse_from([
            "agent",
            "--spool-dir",
            "/tmp/s",
            "--spool-max-bytes",
            "4096",
        ])
        .expect("parse");
        assert_eq!((c.spool_dir, c.spool_max_bytes), ("/tmp/s".into(), 4096));
        assert!(Config::try_parse_from(["agent", "--metrics-listen", "nope"]).is_err());
    }
}
