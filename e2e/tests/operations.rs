//! Operations (issue 13): `--log-format json` makes every binary log one JSON object a line, for
//! log shippers, with the same events as the text format.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use kakuremichi_e2e::{bin, free_tcp_port, wait_for};

/// Every non-empty line of `text` is a JSON object with a level and fields; returns them.
fn json_lines(text: &str, who: &str) -> Vec<serde_json::Value> {
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{who}: a log line that is not JSON ({e}): {l}"))
        })
        .collect();
    assert!(!lines.is_empty(), "{who} logged nothing");
    for l in &lines {
        assert!(
            l["level"].is_string() && l["fields"].is_object(),
            "{who}: {l}"
        );
    }
    lines
}

#[test]
fn gateway_and_agent_log_json_objects_with_log_format_json() {
    let dir = tempfile::tempdir().unwrap();
    // Control is nowhere: each binary tries to enroll, logs why it cannot, and exits.
    let closed = format!("http://127.0.0.1:{}", free_tcp_port());
    for name in ["kakuremichi-gateway", "kakuremichi-agent"] {
        let out = Command::new(bin(name).unwrap())
            .args(["--log-format", "json", "--control", &closed, "--token"])
            .arg("kmt_0123456789abcdef0123456789abcdef_secretsecretsecret")
            .arg("--data-dir")
            .arg(dir.path().join(name))
            .env("RUST_LOG", "info")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{name} cannot enroll");
        let lines = json_lines(&String::from_utf8_lossy(&out.stderr), name);
        assert!(
            lines.iter().any(|l| l["level"] == "ERROR"),
            "{name}: the failure is logged as an error object: {lines:?}"
        );
    }
    // The text format stays the default.
    let out = Command::new(bin("kakuremichi-gateway").unwrap())
        .args(["--control", &closed, "--token"])
        .arg("kmt_0123456789abcdef0123456789abcdef_secretsecretsecret")
        .arg("--data-dir")
        .arg(dir.path().join("text"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.lines()
            .any(|l| serde_json::from_str::<serde_json::Value>(l).is_err()),
        "{text}"
    );
}

#[tokio::test]
async fn control_logs_json_objects_with_log_format_json() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_tcp_port();
    let log = std::fs::File::create(dir.path().join("control.log")).unwrap();
    let mut child = Command::new(bin("kakuremichi-control").unwrap())
        .args([
            "--log-format",
            "json",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "info")
        .stderr(log.try_clone().unwrap())
        .stdout(log)
        .spawn()
        .unwrap();
    let http = kakuremichi_e2e::test_http_client();
    let up = wait_for("control to answer", Duration::from_secs(20), || async {
        Ok(http
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
            .then_some(()))
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    up.unwrap();
    let text = std::fs::read_to_string(dir.path().join("control.log")).unwrap();
    let lines = json_lines(&text, "control");
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "kakuremichi control is up"),
        "{text}"
    );
}
