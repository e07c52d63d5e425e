//! The `gateway` binary: parses the configuration, prints where things are, serves.

use anyhow::Context;
use clap::Parser;
use gateway::config::Config;
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    keep_freed_memory();
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

/// Keeps the buffers of a few hundred KiB that every metering flush, webhook batch and
/// ingested agent batch allocates and frees in the process, instead of glibc's default of
/// handing each back to the kernel (`munmap` or a heap trim: IPIs to the other worker
/// threads, then page faults to get the memory again). Retains at most the trim threshold
/// of free memory per arena.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc's allocator parameters; called before any other
    // thread of ours runs an allocation-heavy path, and valid at any time anyway.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}
