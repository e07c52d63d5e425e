//! The README's first command: `cargo xtask up` starts the stack with the example
//! functions and prints three curl lines that work as printed. (Run with debug builds
//! and its own port and data directory, so it can run beside anything else.)

use std::process::Command;
use std::time::Duration;

use tally_e2e::Running;
use tally_e2e::stack::RemoveCgroups;

#[test]
fn xtask_up_starts_the_stack_and_its_curl_lines_work() {
    let data = tempfile::Builder::new()
        .prefix("tally-up-")
        .tempdir()
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let data_dir = data.path().to_str().unwrap().to_string();
    let cgroups = format!("tally-e2e-{}", std::process::id());
    // Declared before the stack, so dropped after it, whether the test passed or not.
    let _cgroups = RemoveCgroups(cgroups.clone());
    let mut up = Running::cargo(&[
        "xtask",
        "up",
        "--dev",
        "--listen",
        &listen,
        "--data-dir",
        &data_dir,
        "--",
        "--cgroup-parent",
        &cgroups,
    ]);
    let out = up.until("Press Ctrl-C to stop.", Duration::from_secs(600));
    let text = out.join("\n");
    assert!(
        text.contains(&format!("Tally is up: http://{listen}")),
        "{text}"
    );
    assert!(text.contains("basic-auth-password"), "{text}");
    for name in ["hello-shell", "hello-python", "hello-rust"] {
        assert!(text.contains(&format!("deployed {name}")), "{text}");
    }
    let curls: Vec<&String> = out
        .iter()
        .filter(|l| l.trim_start().starts_with("curl "))
        .collect();
    assert_eq!(curls.len(), 3, "{text}");
    let expect = [
        "Hello from a shell function",
        "\"hello\": \"from python\"",
        "\"name\":\"hello-rust\"",
    ];
    for (line, want) in curls.iter().zip(expect) {
        let result = Command::new("sh")
            .args(["-c", line.trim()])
            .output()
            .unwrap();
        let body = String::from_utf8_lossy(&result.stdout);
        assert!(
            result.status.success() && body.contains(want),
            "{line}: {body}"
        );
    }
    let rust = Command::new("curl")
        .args(["-s", &format!("http://{listen}/function/hello-rust")])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&rust.stdout), "Hello from Rust\n");

    if nix::unistd::geteuid().is_root() {
        assert!(text.contains("agent: eBPF programs attached"), "{text}");
        // Invocations of both kinds are metered in the kernel and reach the gateway.
        let password =
            std::fs::read_to_string(data.path().join("secrets/basic-auth-password")).unwrap();
        for (function, call_id) in [
            ("hello-shell", "e2e-fork-1"),
            ("hello-python", "e2e-http-1"),
        ] {
            let out = Command::new("curl")
                .args([
                    "-s",
                    "-H",
                    &format!("X-Call-Id: {call_id}"),
                    "-d",
                    "metered",
                    &format!("http://{listen}/function/{function}"),
                ])
                .output()
                .unwrap();
            assert!(out.status.success());
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            loop {
                let usage = Command::new("curl")
                    .args([
                        "-s",
                        "-u",
                        &format!("admin:{}", password.trim()),
                        &format!("http://{listen}/system/usage?call_id={call_id}"),
                    ])
                    .output()
                    .unwrap();
                let body = String::from_utf8_lossy(&usage.stdout).to_string();
                if body.contains("\"source\":\"kernel\"") {
                    assert!(
                        body.contains(&format!("\"function_name\":\"{function}\"")),
                        "{body}"
                    );
                    assert!(body.contains("\"duration_ns\":"), "{body}");
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "no kernel event for {call_id}: {body}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    } else {
        eprintln!("SKIPPED the agent part of xtask_up_starts_the_stack: needs root for eBPF");
    }

    let status = up.terminate();
    assert!(status.success(), "xtask up exited with {status}");
    assert!(
        std::net::TcpStream::connect_timeout(&listen.parse().unwrap(), Duration::from_millis(200))
            .is_err(),
        "the gateway still listens after the stack stopped"
    );
}
