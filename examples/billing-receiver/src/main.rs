//! `billing-receiver` binary: parses the command line and calls the library.
//! The only place that uses `anyhow`; everything below returns typed errors.

use anyhow::{Context, Result, bail};
use billing_receiver::cli::{Cli, Command};
use billing_receiver::db::{self, Pool};
use billing_receiver::signature::Secret;
use billing_receiver::{ServerConfig, bench};
use clap::Parser;

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve(args) => {
            let secret = read_secret(&args.secret_file)?;
            let pool = Pool::new(&args.db.database_url, args.pool_size)
                .context("parsing --database-url")?;
            let applied = db::migrate::run(&pool)
                .await
                .context("applying migrations")?;
            tracing::info!(?applied, "schema up to date");
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("binding {}", args.listen))?;
            tracing::info!(addr = %listener.local_addr()?, "billing receiver listening");
            let config = ServerConfig {
                max_body_bytes: args.max_body_bytes,
                ..Default::default()
            };
            billing_receiver::run(listener, pool, secret, config, shutdown_signal()).await;
        }
        Command::Migrate(args) => {
            let pool = Pool::new(&args.database_url, 1).context("parsing --database-url")?;
            let applied = db::migrate::run(&pool)
                .await
                .context("applying migrations")?;
            println!("applied migrations: {applied:?}");
        }
        Command::Report(args) => {
            if args.from >= args.to {
                bail!("--from must be before --to");
            }
            let pool = Pool::new(&args.db.database_url, 1).context("parsing --database-url")?;
            let rows = db::report::query(&pool, args.from, args.to, args.namespace.as_deref())
                .await
                .context("running the report")?;
            println!(
                "usage from {} to {}",
                args.from.to_rfc3339(),
                args.to.to_rfc3339()
            );
            print!("{}", db::report::format_table(&rows));
        }
        Command::Bench(args) => {
            let secret = read_secret(&args.secret_file)?;
            let config = bench::BenchConfig {
                url: args.url,
                events: args.events,
                batch: args.batch,
                concurrency: args.concurrency,
            };
            let result = bench::run(&config, &secret).await?;
            println!(
                "{} events in batches of {} with {} senders: {:.2} s, {:.0} events/s committed",
                result.events,
                config.batch,
                config.concurrency,
                result.elapsed.as_secs_f64(),
                result.events_per_sec()
            );
        }
    }
    Ok(())
}

fn read_secret(path: &std::path::Path) -> Result<Secret> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading secret file {}", path.display()))?;
    let secret = Secret::from_file_bytes(&bytes);
    if secret.is_empty() {
        bail!("secret file {} is empty", path.display());
    }
    Ok(secret)
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
}
