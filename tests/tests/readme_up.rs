//! The README's first command: `cargo xtask up` starts the stack with the example
//! functions and prints three curl lines that work as printed. (Run with debug builds
//! and its own port and data directory, so it can run beside anything else.)

use std::process::Command;
use std::time::Duration;

use tally_e2e::Running;

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

    let status = up.terminate();
    assert!(status.success(), "xtask up exited with {status}");
    assert!(
        std::net::TcpStream::connect_timeout(&listen.parse().unwrap(), Duration::from_millis(200))
            .is_err(),
        "the gateway still listens after the stack stopped"
    );
}
