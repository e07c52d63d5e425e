//! `cargo xtask up`: builds the gateway and the examples, starts the gateway on the
//! embedded default, deploys `examples/stack.yml`, prints how to try it, and runs until Ctrl-C.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{root, run_cmd, stack};

#[derive(clap::Args)]
pub struct Args {
    /// Address of the gateway.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Data directory [default: the gateway's, /var/lib/tally as root].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Use debug builds (faster to build, slower to run).
    #[arg(long)]
    dev: bool,
    /// Further flags for the gateway (after `--`), e.g. `-- --cgroup-parent tally-dev`.
    #[arg(last = true)]
    gateway_args: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    crate::setup::ensure_all()?;
    let profile = if args.dev { "debug" } else { "release" };
    let mut build = Command::new("cargo");
    build.args(["build", "--quiet", "-p", "gateway", "-p", "hello-rust"]);
    if !args.dev {
        build.arg("--release");
    }
    run_cmd(&mut build)?;
    let bin = root().join("target").join(profile);

    let mut cmd = Command::new(bin.join("gateway"));
    cmd.args(["--listen", &args.listen]);
    if let Some(dir) = &args.data_dir {
        cmd.arg("--data-dir").arg(dir);
    }
    cmd.args(&args.gateway_args);
    let mut gateway = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the gateway")?;
    let mut lines = BufReader::new(gateway.stdout.take().context("gateway stdout")?).lines();
    let url = lines
        .next()
        .context("the gateway exited at start (see its log above)")??
        .strip_prefix("tally gateway listening on ")
        .context("unexpected first line from the gateway")?
        .to_string();
    let creds_line = lines.next().context("no credentials line")??;
    let password_file = creds_line
        .rsplit_once("password in ")
        .map(|(_, p)| PathBuf::from(p))
        .context("unexpected credentials line")?;
    std::thread::spawn(move || lines.for_each(|l| println!("{}", l.unwrap_or_default())));
    let data_dir = password_file
        .parent()
        .and_then(Path::parent)
        .context("data dir from credentials path")?
        .to_path_buf();

    let result = deploy_examples(&url, &data_dir, &bin, &password_file);
    if let Err(e) = result {
        // SIGTERM, not SIGKILL: the gateway stops the replicas it started.
        terminate(&mut gateway);
        return Err(e);
    }
    let mut agent = match start_agent(&args, &url, password_file.parent().unwrap_or(&data_dir)) {
        Ok(a) => a,
        Err(e) => {
            terminate(&mut gateway);
            return Err(e);
        }
    };
    let user_file = password_file.with_file_name("basic-auth-user");
    println!();
    println!("Tally is up: {url}");
    println!(
        "Admin credentials: {} and {}",
        user_file.display(),
        password_file.display()
    );
    println!("Try:");
    println!("  curl -s {url}/function/hello-shell -d 'Tally'");
    println!("  curl -s {url}/function/hello-python");
    println!(
        "  curl -s -u admin:$(cat {}) {url}/system/functions",
        password_file.display()
    );
    println!("Press Ctrl-C to stop.");
    // Ctrl-C or SIGTERM: ask the gateway to stop (it drains and stops the replicas).
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })?;
    loop {
        if let Some(status) = gateway.try_wait()? {
            if let Some(a) = agent.as_mut() {
                terminate(a);
            }
            if !status.success() {
                bail!("the gateway exited with {status}");
            }
            return Ok(());
        }
        if rx.recv_timeout(Duration::from_millis(200)).is_ok() {
            // The agent first: it flushes its last usage events to the gateway.
            if let Some(a) = agent.as_mut() {
                terminate(a);
            }
            terminate(&mut gateway);
            return Ok(());
        }
    }
}

fn terminate(child: &mut std::process::Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
}

/// As root, builds and starts the node agent beside the gateway and waits until its
/// eBPF programs are attached (its /metrics answers) and it has seen the replicas.
fn start_agent(args: &Args, url: &str, secrets: &Path) -> Result<Option<std::process::Child>> {
    if !nix::unistd::geteuid().is_root() {
        println!(
            "agent: not started (the eBPF programs need root); usage is metered by the gateway only"
        );
        return Ok(None);
    }
    let mut build = Command::new("cargo");
    build.args(["build", "--quiet", "-p", "agent"]);
    if !args.dev {
        build.arg("--release");
    }
    run_cmd(&mut build)?;
    let profile = if args.dev { "debug" } else { "release" };
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(root().join("target").join(profile).join("agent"))
        .args([
            "--gateway-url",
            url,
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
            "--secret-mount-path",
        ])
        .arg(secrets)
        // Its spool beside the gateway's data: two stacks never share one.
        .arg("--spool-dir")
        .arg(secrets.parent().unwrap_or(secrets).join("agent-spool"))
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .spawn()
        .context("starting the agent")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("the agent did not attach its programs within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // One replica poll (1 s) so the example functions are metered from the first call.
    std::thread::sleep(Duration::from_millis(1500));
    println!("agent: eBPF programs attached; metrics on http://127.0.0.1:{port}/metrics");
    Ok(Some(child))
}

/// Copies the examples where function processes can read them, then deploys the stack.
fn deploy_examples(url: &str, data_dir: &Path, bin: &Path, password_file: &Path) -> Result<()> {
    let functions = data_dir.join("functions");
    let examples = root().join("examples");
    for dir in ["hello-shell", "hello-python"] {
        copy_dir(&examples.join(dir), &functions.join(dir))?;
    }
    std::fs::create_dir_all(functions.join("hello-rust"))?;
    replace_executable(
        &bin.join("hello-rust"),
        &functions.join("hello-rust/hello-rust"),
    )?;
    let password = std::fs::read_to_string(password_file)?.trim().to_string();
    let user = std::fs::read_to_string(password_file.with_file_name("basic-auth-user"))?;
    let auth = crate::basic_auth(user.trim(), &password);
    wait_healthy(url)?;
    let stack = stack::load(&examples.join("stack.yml"))?;
    for (name, f) in &stack.functions {
        stack::deploy(url, &auth, &stack::deployment(name, f))?;
        println!("deployed {name}");
    }
    Ok(())
}

fn wait_healthy(url: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if ureq::get(&format!("{url}/healthz")).call().is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the gateway at {url} did not become healthy within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Puts a copy of `from` at `to`. Replicas the gateway brought back from its saved state may
/// already run the old binary, and writing over a running executable fails (ETXTBSY): the
/// copy is made beside it and renamed into place, so they keep the old file.
fn replace_executable(from: &Path, to: &Path) -> Result<()> {
    let mut staged = to.as_os_str().to_owned();
    staged.push(".new");
    let staged = PathBuf::from(staged);
    std::fs::copy(from, &staged).with_context(|| format!("copying to {}", staged.display()))?;
    std::fs::rename(&staged, to).with_context(|| format!("renaming to {}", to.display()))?;
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to)?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
            let mode = std::fs::metadata(&target)?.permissions().mode() | 0o444;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A running binary can be replaced (a plain copy over it is refused).
    #[test]
    fn a_running_executable_is_replaced() {
        let dir = std::env::temp_dir().join(format!("tally-xtask-up-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let exe = dir.join("sleeper");
        std::fs::copy("/bin/sleep", &exe).expect("copy sleep");
        let mut running = std::process::Command::new(&exe)
            .arg("30")
            .spawn()
            .expect("run the copy");
        let plain = std::fs::copy("/bin/true", &exe);
        let replaced = replace_executable(Path::new("/bin/true"), &exe);
        let _ = running.kill();
        let _ = running.wait();
        let now = std::fs::read(&exe).expect("read back");
        let _ = std::fs::remove_dir_all(&dir);
        let busy = plain.expect_err("copying over a running binary");
        assert_eq!(
            busy.raw_os_error(),
            Some(nix::errno::Errno::ETXTBSY as i32),
            "{busy}"
        );
        replaced.expect("replaced while running");
        assert_eq!(now, std::fs::read("/bin/true").expect("read /bin/true"));
    }
}
