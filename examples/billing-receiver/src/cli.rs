//! Command line: `serve`, `report`, `bench`, `migrate`, with env fallbacks for the service.
//! Plain data only; `main` turns it into live handles.

use std::net::SocketAddr;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "billing-receiver",
    version,
    about = "Bills Tally's metering webhooks in PostgreSQL"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Receive signed `function_usage` webhooks and insert them (applies migrations first).
    Serve(ServeArgs),
    /// Print invocations, durations and GB-seconds per function over a period.
    Report(ReportArgs),
    /// Apply pending migrations and exit.
    Migrate(DbArgs),
    /// Post generated signed batches to a running receiver and print events/s.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct DbArgs {
    /// postgres://user@host:port/db (or key=value form).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[arg(long, env = "BILLING_LISTEN", default_value = "127.0.0.1:8099")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub db: DbArgs,
    /// File holding the shared HMAC secret (trailing newline trimmed).
    #[arg(long, env = "webhook_secret_file")]
    pub secret_file: PathBuf,
    /// Largest accepted body; bigger ones get 413.
    #[arg(long, env = "BILLING_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// PostgreSQL connections kept at most.
    #[arg(long, env = "BILLING_POOL_SIZE", default_value_t = 4)]
    pub pool_size: usize,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Period start (inclusive), RFC3339, compared with each event's `started`.
    #[arg(long)]
    pub from: DateTime<Utc>,
    /// Period end (exclusive), RFC3339.
    #[arg(long)]
    pub to: DateTime<Utc>,
    #[arg(long)]
    pub namespace: Option<String>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Receiver URL, e.g. http://127.0.0.1:8099/
    #[arg(long)]
    pub url: String,
    #[arg(long, env = "webhook_secret_file")]
    pub secret_file: PathBuf,
    #[arg(long, default_value_t = 100_000)]
    pub events: usize,
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_report() {
        let cli = Cli::try_parse_from([
            "billing-receiver",
            "report",
            "--database-url",
            "postgres://x@h/db",
            "--from",
            "2026-11-01T00:00:00Z",
            "--to",
            "2026-12-01T00:00:00Z",
        ])
        .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Report(ReportArgs {
                namespace: None,
                ..
            })
        ));
        assert!(
            Cli::try_parse_from([
                "billing-receiver",
                "report",
                "--database-url",
                "x",
                "--from",
                "nope",
                "--to",
                "2026-12-01T00:00:00Z"
            ])
            .is_err()
        );
    }
}
