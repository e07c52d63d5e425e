//! The `gateway` binary: parses the configuration, prints where things are, serves.

use anyhow::Context;
use clap::Parser;
use gateway::config::Config;
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = Config::parse();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let (gw, credentials) = gateway::build(config).await?;
    println!("tally gateway listening on http://{addr}");
    if let Some(c) = credentials {
        let how = if c.generated { "generated" } else { "read" };
        println!(
            "admin credentials ({how}): user in {}, password in {}",
            c.dir.join(gateway::auth::USER_FILE).display(),
            c.dir.join(gateway::auth::PASSWORD_FILE).display()
        );
    }
    let shutdown = async {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    gateway::run(gw, listener, shutdown).await;
    Ok(())
}
