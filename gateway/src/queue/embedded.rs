//! The embedded default's NATS: a `nats-server -js` the gateway starts on a loopback
//! port with its store in the data directory, and restarts (with backoff) if it dies.

use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("no free port for nats-server: {0}")]
    Port(std::io::Error),
    #[error(
        "starting {bin:?} (install the Debian package nats-server, or set --nats-url): {source}"
    )]
    Start { bin: String, source: std::io::Error },
}

pub struct EmbeddedNats {
    pub url: String,
    /// The running server's pid (0 while it restarts); tests kill it to test recovery.
    pub pid: watch::Receiver<u32>,
}

/// Starts the server and a task that keeps it running until `stop` turns true.
pub async fn start(
    bin: &str,
    store: PathBuf,
    mut stop: watch::Receiver<bool>,
) -> Result<EmbeddedNats, EmbeddedError> {
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map_err(EmbeddedError::Port)?
        .port();
    std::fs::create_dir_all(&store).map_err(|source| EmbeddedError::Start {
        bin: bin.to_string(),
        source,
    })?;
    let pid_file = store.join("nats-server.pid");
    stop_orphan(&pid_file).await;
    let spawn = {
        let bin = bin.to_string();
        move || {
            Command::new(&bin)
                .args([
                    "-js",
                    "-a",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-n",
                    "tally-embedded",
                    "-sd",
                ])
                .arg(&store)
                .arg("-l")
                .arg(store.join("nats-server.log"))
                .arg("-P")
                .arg(store.join("nats-server.pid"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|source| EmbeddedError::Start {
                    bin: bin.clone(),
                    source,
                })
        }
    };
    let first = spawn()?;
    let (pid_tx, pid) = watch::channel(first.id().unwrap_or(0));
    tracing::info!(port, "started the embedded nats-server");
    tokio::spawn(async move {
        let mut child = first;
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            tokio::select! {
                status = child.wait() => {
                    pid_tx.send_replace(0);
                    tracing::warn!("the embedded nats-server exited ({status:?}); restarting in {backoff:?}");
                }
                () = crate::until_true(&mut stop) => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    return;
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(100);
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = crate::until_true(&mut stop) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
            match spawn() {
                Ok(c) => {
                    pid_tx.send_replace(c.id().unwrap_or(0));
                    child = c;
                }
                Err(e) => tracing::error!("{e}"),
            }
        }
    });
    Ok(EmbeddedNats {
        url: format!("nats://127.0.0.1:{port}"),
        pid,
    })
}

/// Kills a nats-server left on this store by a gateway that was killed (`kill -9`):
/// two servers must never share a store directory.
async fn stop_orphan(pid_file: &std::path::Path) {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let store = pid_file
        .parent()
        .map(|p| p.as_os_str().as_encoded_bytes().to_vec())
        .unwrap_or_default();
    let ours = cmdline.windows(11).any(|w| w == b"nats-server")
        && !store.is_empty()
        && cmdline.windows(store.len()).any(|w| w == store.as_slice());
    if !ours {
        return;
    }
    tracing::warn!(pid, "stopping a nats-server left behind on our store");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    for _ in 0..100 {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
