//! The README's quickstart command works: everything starts on loopback, the demo resource answers
//! at demo.localhost:8080, the admin page is served, and Ctrl-C/SIGTERM stops every process.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test]
async fn quickstart_serves_demo_localhost_and_stops_cleanly() {
    let bin = kakuremichi_e2e::bin("kakuremichi-quickstart").unwrap();
    let mut child = Command::new(bin)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            println!("quickstart: {line}");
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut printed = String::new();
    while !printed.contains("Press Ctrl-C") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                printed.push_str(&line);
                printed.push('\n');
            }
            Err(_) => {
                let _ = child.kill();
                panic!("the quickstart did not come up:\n{printed}");
            }
        }
    }
    assert!(printed.contains("http://demo.localhost:8080/"), "{printed}");
    assert!(
        printed.contains("kma_"),
        "the admin key is printed: {printed}"
    );

    let http = kakuremichi_e2e::test_http_client();
    let resp = http
        .get("http://127.0.0.1:8080/")
        .header("host", "demo.localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("kakuremichi demo app"));
    // The resource behind sign-in asks for it: 401 to curl, a redirect to sign in for browsers.
    assert!(
        printed.contains("sign in as demo@example.com with password"),
        "{printed}"
    );
    kakuremichi_e2e::wait_for(
        "private.localhost to ask for sign-in",
        Duration::from_secs(10),
        || async {
            let r = http
                .get("http://127.0.0.1:8080/headers")
                .header("host", "private.localhost")
                .send()
                .await?;
            Ok((r.status() == 401).then_some(()))
        },
    )
    .await
    .unwrap();
    assert!(
        printed.contains("https://demo.localhost:8443/"),
        "{printed}"
    );
    let https = std::process::Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--insecure",
            "--http2",
            "--max-time",
            "20",
            "--resolve",
            "demo.localhost:8443:127.0.0.1",
            "https://demo.localhost:8443/",
        ])
        .output()
        .expect("curl is installed by scripts/setup");
    assert!(
        String::from_utf8_lossy(&https.stdout).contains("kakuremichi demo app"),
        "HTTPS on 8443: {}",
        String::from_utf8_lossy(&https.stderr)
    );
    let page = http.get("http://127.0.0.1:3000/").send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("kakuremichi"));
    // The printed admin signs in to the console and sees the quickstart's fleet.
    let password = printed
        .split("sign in as admin@example.com with password ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no admin password in {printed}"));
    let console = kakuremichi_e2e::identity::sign_in_to_console(
        "http://127.0.0.1:3000",
        "admin@example.com",
        password,
    )
    .await
    .unwrap();
    assert!(console.contains("<h1>Dashboard</h1>"), "{console}");
    assert!(console.contains("demo.localhost"), "{console}");

    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // Every process it started is gone with it.
    let gone = http.get("http://127.0.0.1:8080/").send().await;
    assert!(
        gone.is_err(),
        "the gateway still answers after the quickstart stopped"
    );
}
