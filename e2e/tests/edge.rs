//! The gateway's public listener under abuse (issue 7): slowloris connections are capped per
//! client and closed after the header-read timeout while other clients keep being served, an
//! oversized head gets 431, and a client's own X-Forwarded-For never reaches the app as sent.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kakuremichi_e2e::{free_tcp_port, metric, Stack, StackOptions, DEMO_HOST};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

/// The gateway's count of UDP datagrams carried in one direction, one way (`carried`).
async fn udp_carried(metrics_port: u16, direction: &str, carried: &str) -> u64 {
    metric(
        metrics_port,
        &format!(
            "kakuremichi_gateway_udp_datagrams_total{{direction=\"{direction}\",carried=\"{carried}\"}}"
        ),
    )
    .await
}

/// A connection from another loopback address (127.0.0.2): another client.
async fn request_from_another_client(gateway: SocketAddr) -> u16 {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut s = socket.connect(gateway).await.unwrap();
    s.write_all(
        format!("GET /bytes/100 HTTP/1.1\r\nHost: {DEMO_HOST}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("another client was not answered within 10 s")
        .unwrap();
    let head = String::from_utf8_lossy(&out);
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_slowloris_connections_are_capped_and_closed_while_others_are_served() {
    let metrics_port = free_tcp_port();
    let mut opts = StackOptions::loopback();
    opts.gateway_args = vec![
        "--header-read-timeout".into(),
        "2s".into(),
        "--metrics-listen".into(),
        format!("127.0.0.1:{metrics_port}"),
    ];
    let stack = Stack::start_with(opts).await.unwrap();
    stack.wait_serving(Duration::from_secs(20)).await.unwrap();
    let gateway = stack.opts.gateway_http_for_test;

    // 2,000 connections from 127.0.0.1, each sending half a request head and then nothing.
    let started = Instant::now();
    let mut slow = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let mut s = TcpStream::connect(gateway).await.unwrap();
        let _ = s
            .write_all(format!("GET / HTTP/1.1\r\nHost: {DEMO_HOST}\r\nX-Slow: ").as_bytes())
            .await;
        slow.push(s);
    }
    let opened = started.elapsed();
    // Meanwhile another client is served, several times.
    for _ in 0..5 {
        assert_eq!(request_from_another_client(gateway).await, 200);
    }
    // Every slow connection is closed by the gateway: the ones over the per-client cap at once,
    // the others after the 2 s header-read timeout.
    let mut lasted = Vec::with_capacity(slow.len());
    let tasks: Vec<_> = slow
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                let r = tokio::time::timeout(Duration::from_secs(10), async {
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                    }
                })
                .await;
                (r.is_ok(), started.elapsed())
            })
        })
        .collect();
    for t in tasks {
        let (closed, at) = t.await.unwrap();
        assert!(closed, "a slowloris connection stayed open for 10 s");
        lasted.push(at);
    }
    let longest = lasted.iter().max().copied().unwrap_or_default();
    let refused = metric(
        metrics_port,
        "kakuremichi_gateway_connections_refused_total{reason=\"per_client_limit\"}",
    )
    .await;
    println!(
        "2,000 slowloris connections opened in {opened:?}; all closed by {longest:?}; \
         {refused} refused at once by the per-client cap"
    );
    assert!(
        longest >= Duration::from_millis(1500),
        "admitted connections were closed before the header-read timeout"
    );
    assert!(
        refused >= 1000,
        "only {refused} of 2,000 connections from one client were refused"
    );
    // And the gateway is still fine.
    assert_eq!(request_from_another_client(gateway).await, 200);
    let resp = stack.get(DEMO_HOST, "/").await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_head_gets_431_and_client_forwarded_headers_are_replaced() {
    let stack = Stack::start().await.unwrap();
    stack.wait_serving(Duration::from_secs(20)).await.unwrap();
    let gateway = stack.opts.gateway_http_for_test;

    let mut s = TcpStream::connect(gateway).await.unwrap();
    let big = "a".repeat(100 * 1024);
    let _ = s
        .write_all(
            format!("GET / HTTP/1.1\r\nHost: {DEMO_HOST}\r\nX-Big: {big}\r\n\r\n").as_bytes(),
        )
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let head = String::from_utf8_lossy(&out);
    assert!(
        head.starts_with("HTTP/1.1 431"),
        "expected 431 for a 100 KiB header, got {:?}",
        head.lines().next()
    );

    let resp = stack
        .request_builder(reqwest::Method::GET, DEMO_HOST, "/headers")
        .header("x-forwarded-for", "203.0.113.66")
        .header("x-real-ip", "203.0.113.67")
        .header("x-forwarded-proto", "gopher")
        .header("x-forwarded-host", "evil.example")
        .header("forwarded", "for=203.0.113.68")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(h["x-forwarded-for"].as_str(), Some("127.0.0.1"), "{h}");
    assert_eq!(h["x-real-ip"].as_str(), Some("127.0.0.1"), "{h}");
    assert_eq!(h["x-forwarded-proto"].as_str(), Some("http"), "{h}");
    assert_eq!(h["x-forwarded-host"].as_str(), Some(DEMO_HOST), "{h}");
    assert!(h.get("forwarded").is_none(), "{h}");
}

fn curl(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl is installed by scripts/setup");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_h2_and_h1_by_sni_refuses_unknown_names_and_garbage() {
    let https_port = free_tcp_port();
    let mut opts = StackOptions::loopback();
    opts.gateway_args = vec![
        "--https-listen".into(),
        format!("127.0.0.1:{https_port}"),
        "--tls-self-signed".into(),
    ];
    let stack = Stack::start_with(opts).await.unwrap();
    stack.wait_serving(Duration::from_secs(20)).await.unwrap();
    let resolve = format!("{DEMO_HOST}:{https_port}:127.0.0.1");
    let url = format!("https://{DEMO_HOST}:{https_port}/");

    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let (ok, out, err) = tokio::task::spawn_blocking({
            let (resolve, url) = (resolve.clone(), url.clone());
            move || {
                curl(&[
                    flag,
                    "--insecure",
                    "--resolve",
                    &resolve,
                    "--write-out",
                    "\nversion=%{http_version} status=%{http_code}",
                    &url,
                ])
            }
        })
        .await
        .unwrap();
        assert!(ok, "curl {flag} failed: {err}\n{}", stack.logs());
        assert!(out.contains("kakuremichi demo app"), "{out}");
        assert!(
            out.ends_with(&format!("version={version} status=200")),
            "{flag}: {out}"
        );
    }
    // The app learns that the client used HTTPS.
    let (ok, out, err) = tokio::task::spawn_blocking({
        let resolve = resolve.clone();
        move || {
            curl(&[
                "--http2",
                "--insecure",
                "--resolve",
                &resolve,
                &format!("https://{DEMO_HOST}:{https_port}/headers"),
            ])
        }
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    let h: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(h["x-forwarded-proto"].as_str(), Some("https"), "{h}");

    // A name nothing publishes: the handshake is refused.
    let (ok, _, err) = tokio::task::spawn_blocking(move || {
        curl(&[
            "--insecure",
            "--resolve",
            &format!("unknown.localhost:{https_port}:127.0.0.1"),
            &format!("https://unknown.localhost:{https_port}/"),
        ])
    })
    .await
    .unwrap();
    assert!(!ok, "an unknown SNI got a certificate");
    assert!(
        err.to_lowercase().contains("ssl") || err.contains("alert"),
        "{err}"
    );

    // A malformed ClientHello: the connection is closed, nothing else is disturbed.
    let mut s = TcpStream::connect(("127.0.0.1", https_port)).await.unwrap();
    s.write_all(b"\x16\x03\x01\x00\x05garbage-that-is-not-a-client-hello\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "a malformed ClientHello kept the connection open"
    );
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        curl(&["--http2", "--insecure", "--resolve", &resolve, &url])
    })
    .await
    .unwrap();
    assert!(ok && out.contains("kakuremichi demo app"), "{err}");
}

/// Accepts any certificate: the test's client talks to its own gateway's self-signed one.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

use std::sync::Arc;

async fn h2_connect(
    port: u16,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from(DEMO_HOST).unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    (send, tokio::spawn(conn))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_rapid_reset_flood_is_cut_off_while_others_are_served() {
    let https_port = free_tcp_port();
    let mut opts = StackOptions::loopback();
    opts.gateway_args = vec![
        "--https-listen".into(),
        format!("127.0.0.1:{https_port}"),
        "--tls-self-signed".into(),
    ];
    let stack = Stack::start_with(opts).await.unwrap();
    stack.wait_serving(Duration::from_secs(20)).await.unwrap();

    // A well-behaved HTTP/2 client first: one request works.
    let (mut good, _good_conn) = h2_connect(https_port).await;
    let req = http::Request::get(format!("https://{DEMO_HOST}/bytes/100"))
        .body(())
        .unwrap();
    let (resp, _) = good.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);

    // The attacker: open a stream and reset it at once, 20,000 times, as fast as it can.
    let (mut bad, bad_conn) = h2_connect(https_port).await;
    let mut sent = 0u32;
    let flood = async {
        for _ in 0..20_000u32 {
            bad = match bad.ready().await {
                Ok(b) => b,
                Err(_) => return,
            };
            let req = http::Request::get(format!("https://{DEMO_HOST}/slow/1000"))
                .body(())
                .unwrap();
            match bad.send_request(req, false) {
                Ok((_resp, mut stream)) => {
                    stream.send_reset(h2::Reason::CANCEL);
                    sent += 1;
                }
                Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), flood).await;
    let bad_end = tokio::time::timeout(Duration::from_secs(10), bad_conn).await;
    println!("rapid reset: {sent} streams opened and reset before the gateway cut the connection");
    assert!(
        sent < 20_000,
        "the gateway accepted 20,000 opened-and-reset streams on one connection"
    );
    match bad_end {
        Ok(Ok(Err(e))) => println!("the flooding connection ended with: {e}"),
        other => panic!("the gateway did not cut the flooding connection: {other:?}"),
    }

    // Others are served, on the existing connection and on new ones.
    let req = http::Request::get(format!("https://{DEMO_HOST}/bytes/100"))
        .body(())
        .unwrap();
    let mut good = good.ready().await.unwrap();
    let (resp, _) = good.send_request(req, true).unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), resp)
            .await
            .expect("the good client waited 10 s")
            .unwrap()
            .status(),
        200
    );
    let resp = stack.get(DEMO_HOST, "/").await.unwrap();
    assert_eq!(resp.status(), 200);
}

fn psql(port: u16, sql: &str) -> Result<String, String> {
    let out = std::process::Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "test",
            "-tAc",
            sql,
        ])
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .map_err(|e| format!("psql is installed by scripts/setup: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_resource_puts_postgres_behind_the_agent_on_a_gateway_port_without_a_restart() {
    let mut opts = StackOptions::loopback();
    opts.gateway_args = vec!["--tcp-listen-ip".into(), "127.0.0.1".into()];
    let stack = Stack::start_with(opts).await.unwrap();
    stack.wait_serving(Duration::from_secs(20)).await.unwrap();
    let port = free_tcp_port();
    let (status, created) = stack
        .api
        .call(
            reqwest::Method::POST,
            "/api/v1/resources",
            Some(serde_json::json!({
                "protocol": "tcp",
                "public_port": port,
                "site_id": stack.site_id,
                "target": "127.0.0.1:5432",
            })),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["protocol"], "tcp");
    assert_eq!(created["public_port"], port);
    assert_eq!(created["name"], format!("tcp-{port}"));
    assert!(created.get("hostname").is_none(), "{created}");

    // psql through the gateway's port, the tunnel and the agent, to the PostgreSQL on this machine.
    let answer = kakuremichi_e2e::wait_for(
        "psql through the TCP resource",
        Duration::from_secs(20),
        || async move {
            Ok(
                tokio::task::spawn_blocking(move || psql(port, "SELECT 6 * 7"))
                    .await?
                    .ok(),
            )
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", stack.logs()));
    assert_eq!(answer, "42");
    // A bigger exchange both ways.
    let big = tokio::task::spawn_blocking(move || {
        psql(
            port,
            "SELECT count(*), sum(length(x)) FROM (SELECT repeat('x', 1000) AS x FROM generate_series(1, 5000)) t",
        )
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(big, "5000|5000000");

    // Bad input: a hostname on a TCP resource, a public port twice.
    let (status, body) = stack
        .api
        .call(
            reqwest::Method::POST,
            "/api/v1/resources",
            Some(serde_json::json!({
                "protocol": "tcp",
                "hostname": "x.localhost",
                "site_id": stack.site_id,
                "target": "127.0.0.1:5432",
            })),
        )
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    let (status, body) = stack
        .api
        .call(
            reqwest::Method::POST,
            "/api/v1/resources",
            Some(serde_json::json!({
                "protocol": "tcp",
                "public_port": port,
                "site_id": stack.site_id,
                "target": "127.0.0.1:5432",
            })),
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");

    // Deleting the resource closes the port, with no restart.
    let id = created["id"].as_str().unwrap().to_owned();
    stack.api.delete_resource(&id).await.unwrap();
    kakuremichi_e2e::wait_for(
        "the gateway to close the TCP port",
        Duration::from_secs(10),
        || async move {
            Ok(TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
                .then_some(()))
        },
    )
    .await
    .unwrap();
}

/// What an HTTP/3 request saw: the response's status and body, and how sending the request
/// body ended (`None`: it was sent whole).
struct H3Outcome {
    status: u16,
    body: Vec<u8>,
    send_stopped: Option<h3::error::StreamError>,
}

/// `GET https://demo.localhost:<port><path>` over HTTP/3; returns the status and the body.
async fn h3_get(port: u16, path: &str) -> (u16, Vec<u8>) {
    let out = h3_request(port, http::Method::GET, path, 0).await;
    // A server may stop reading a request it has answered (RFC 9114, 4.1): only with H3_NO_ERROR.
    if let Some(e) = out.send_stopped {
        assert_stopped_cleanly(&e);
    }
    (out.status, out.body)
}

fn assert_stopped_cleanly(e: &h3::error::StreamError) {
    assert!(
        matches!(e, h3::error::StreamError::RemoteTerminate { code, .. }
            if *code == h3::error::Code::H3_NO_ERROR),
        "the request stream was stopped with {e:?}, not H3_NO_ERROR"
    );
}

/// An HTTP/3 request to `https://demo.localhost:<port><path>` sending a body of `body_len` bytes
/// (with its Content-Length) in 16 KiB chunks, until the server stops reading.
async fn h3_request(port: u16, method: http::Method, path: &str, body_len: usize) -> H3Outcome {
    use bytes::Buf as _;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint
        .connect(SocketAddr::from(([127, 0, 0, 1], port)), DEMO_HOST)
        .unwrap()
        .await
        .unwrap();
    let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn))
        .await
        .unwrap();
    let drive = tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("https://{DEMO_HOST}:{port}{path}"));
    if body_len > 0 {
        req = req.header(http::header::CONTENT_LENGTH, body_len);
    }
    let mut stream = send.send_request(req.body(()).unwrap()).await.unwrap();
    let mut send_stopped = None;
    let mut left = body_len;
    while left > 0 && send_stopped.is_none() {
        let n = left.min(16 * 1024);
        left -= n;
        send_stopped = stream
            .send_data(bytes::Bytes::from(vec![b'x'; n]))
            .await
            .err();
    }
    if send_stopped.is_none() {
        send_stopped = stream.finish().await.err();
    }
    let resp = stream.recv_response().await.unwrap();
    let mut body = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.unwrap() {
        body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    drop(send);
    drive.abort();
    endpoint.close(0u32.into(), b"done");
    H3Outcome {
        status: resp.status().as_u16(),
        body,
        send_stopped,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_fetches_the_app_through_the_tunnel_and_https_advertises_it() {
    let https_port = free_tcp_port();
    let metrics_port = free_tcp_port();
    let mut opts = StackOptions::loopback();
    // A cap of one handshake in progress: every new client proves its address by a Retry first.
    opts.gateway_args = vec![
        "--https-listen".into(),
        format!("127.0.0.1:{https_port}"),
        "--tls-self-signed".into(),
        "--http3".into(),
        "--max-quic-handshakes".into(),
        "1".into(),
        "--metrics-listen".into(),
        format!("127.0.0.1:{metrics_port}"),
    ];
    let stack = Stack::start_with(opts).await.unwrap();
    stack.wait_serving(Duration::from_secs(20)).await.unwrap();

    let (status, body) = tokio::time::timeout(Duration::from_secs(20), h3_get(https_port, "/"))
        .await
        .expect("HTTP/3 request timed out");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("kakuremichi demo app"));
    let retries = metric(
        metrics_port,
        "kakuremichi_gateway_connections_refused_total{reason=\"quic_retry\"}",
    )
    .await;
    assert!(
        retries >= 1,
        "the client was not asked to prove its address"
    );
    let (status, body) = h3_get(https_port, "/bytes/1000000").await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), 1_000_000);
    assert!(body
        .iter()
        .enumerate()
        .all(|(i, b)| *b == kakuremichi_e2e::demo_pattern(i as u64)));
    let (status, body) = h3_get(https_port, "/headers").await;
    assert_eq!(status, 200);
    let h: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(h["x-forwarded-proto"].as_str(), Some("https"), "{h}");

    // A body over the resource's cap is answered 413 at once, and the rest of it is refused with
    // STOP_SENDING(H3_NO_ERROR), never QUIC's bare code 0 (which clients take as a failure). 8 MiB
    // is more than the stream's flow-control window, so the client must hear the stop.
    stack
        .api
        .patch(
            &format!("/api/v1/resources/{}", stack.resource_id),
            serde_json::json!({"limits": {"max_request_body_bytes": 1024}}),
        )
        .await
        .unwrap();
    let refused = kakuremichi_e2e::wait_for(
        "the gateway to refuse a large HTTP/3 body",
        Duration::from_secs(10),
        || async {
            let out = h3_request(https_port, http::Method::POST, "/echo", 8 << 20).await;
            Ok((out.status == 413).then_some(out))
        },
    )
    .await
    .unwrap();
    let stopped = refused
        .send_stopped
        .expect("the server read 8 MiB it had refused");
    assert_stopped_cleanly(&stopped);

    // HTTPS over TCP says where HTTP/3 is.
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        curl(&[
            "--http2",
            "--insecure",
            "--head",
            "--resolve",
            &format!("{DEMO_HOST}:{https_port}:127.0.0.1"),
            &format!("https://{DEMO_HOST}:{https_port}/"),
        ])
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert!(
        out.to_lowercase()
            .contains(&format!("alt-svc: h3=\":{https_port}\"; ma=86400")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_resource_metrics_count_requests_bytes_and_latency() {
    let metrics_port = free_tcp_port();
    let mut opts = StackOptions::loopback();
    opts.gateway_args = vec![
        "--metrics-listen".into(),
        format!("127.0.0.1:{metrics_port}"),
    ];
    let stack = Stack::start_with(opts).await.unwrap();
    stack.wait_serving(Duration::from_secs(20)).await.unwrap();
    let id = stack.resource_id.clone();
    let before = metric(
        metrics_port,
        &format!(
            "kakuremichi_gateway_resource_requests_total{{resource_id=\"{id}\",class=\"2xx\"}}"
        ),
    )
    .await;
    for _ in 0..10 {
        let resp = stack.get(DEMO_HOST, "/bytes/1000").await.unwrap();
        assert_eq!(resp.bytes().await.unwrap().len(), 1000);
    }
    let resp = stack
        .request_builder(reqwest::Method::POST, DEMO_HOST, "/discard")
        .body(vec![0u8; 5000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let after = metric(
        metrics_port,
        &format!(
            "kakuremichi_gateway_resource_requests_total{{resource_id=\"{id}\",class=\"2xx\"}}"
        ),
    )
    .await;
    assert_eq!(after - before, 11);
    let out = metric(
        metrics_port,
        &format!("kakuremichi_gateway_resource_bytes_out_total{{resource_id=\"{id}\"}}"),
    )
    .await;
    assert!(out >= 10_000, "bytes out {out}");
    let inn = metric(
        metrics_port,
        &format!("kakuremichi_gateway_resource_bytes_in_total{{resource_id=\"{id}\"}}"),
    )
    .await;
    assert!(inn >= 5000, "bytes in {inn}");
    let count = metric(
        metrics_port,
        &format!("kakuremichi_gateway_resource_response_seconds_count{{resource_id=\"{id}\"}}"),
    )
    .await;
    assert!(count >= 11, "histogram count {count}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_can_redirect_plain_http_to_https_and_send_hsts() {
    let https_port = free_tcp_port();
    let mut opts = StackOptions::loopback();
    opts.gateway_args = vec![
        "--https-listen".into(),
        format!("127.0.0.1:{https_port}"),
        "--tls-self-signed".into(),
    ];
    let stack = Stack::start_with(opts).await.unwrap();
    stack.wait_serving(Duration::from_secs(20)).await.unwrap();
    let path = format!("/api/v1/resources/{}", stack.resource_id);
    for bad in [
        serde_json::json!({"hsts_max_age": 63_072_001u64}),
        serde_json::json!({"redirect_https": "yes"}),
    ] {
        let (status, body) = stack
            .api
            .call(reqwest::Method::PATCH, &path, Some(bad))
            .await
            .unwrap();
        assert_eq!(status, 400, "{body}");
    }
    let updated = stack
        .api
        .patch(
            &path,
            serde_json::json!({"redirect_https": true, "hsts_max_age": 300}),
        )
        .await
        .unwrap();
    assert_eq!(updated["redirect_https"], true);
    assert_eq!(updated["hsts_max_age"], 300);
    let http = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let gateway = stack.opts.gateway_http_for_test;
    let location = kakuremichi_e2e::wait_for(
        "plain HTTP to be redirected",
        Duration::from_secs(10),
        || {
            let http = http.clone();
            async move {
                let resp = http
                    .get(format!("http://{gateway}/headers?x=1"))
                    .header("host", DEMO_HOST)
                    .send()
                    .await?;
                Ok((resp.status() == 308).then(|| resp.headers()["location"].clone()))
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(
        location,
        format!("https://{DEMO_HOST}:{https_port}/headers?x=1").as_str()
    );
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        curl(&[
            "--http2",
            "--insecure",
            "--include",
            "--resolve",
            &format!("{DEMO_HOST}:{https_port}:127.0.0.1"),
            &format!("https://{DEMO_HOST}:{https_port}/"),
        ])
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert!(
        out.to_lowercase()
            .contains("strict-transport-security: max-age=300"),
        "{out}"
    );
    assert!(out.contains("kakuremichi demo app"));
}

/// A UDP echo server: answers every datagram with the same bytes.
async fn udp_echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    (addr, task)
}

/// A UDP resource: datagrams from several clients to a gateway port reach an echo server behind
/// the agent and come back to each client, sizes from 0 bytes to 8 KiB; removed, it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_resource_echoes_datagrams_of_several_clients_through_the_tunnel() {
    let mut opts = StackOptions::loopback();
    let metrics_port = free_tcp_port();
    opts.gateway_args = vec![
        "--tcp-listen-ip".into(),
        "127.0.0.1".into(),
        "--metrics-listen".into(),
        format!("127.0.0.1:{metrics_port}"),
    ];
    let stack = Stack::start_with(opts).await.unwrap();
    let (echo, _echo_task) = udp_echo().await;
    let port = kakuremichi_e2e::free_udp_port();
    let created = stack
        .api
        .create_port_resource("udp", port, &stack.site_id, &echo.to_string())
        .await
        .unwrap();
    assert_eq!(created["protocol"], "udp");
    assert_eq!(created["name"], format!("udp-{port}"));
    let gateway: SocketAddr = ([127, 0, 0, 1], port).into();

    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(gateway).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    // The first answer once the gateway bound the port and the flow reached the agent.
    let first = kakuremichi_e2e::wait_for(
        "a UDP echo through the tunnel",
        Duration::from_secs(20),
        || async {
            let mut buf = vec![0u8; 65_535];
            client.send(b"ping").await?;
            match tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf)).await {
                Ok(Ok(n)) => Ok(Some(buf[..n].to_vec())),
                _ => Ok(None),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", stack.logs()));
    assert_eq!(first, b"ping");
    // Drain late echoes of the retries above.
    while tokio::time::timeout(Duration::from_millis(200), client.recv(&mut buf))
        .await
        .is_ok()
    {}

    // Three clients, 100 datagrams each, sizes 0..8 KiB, answers to the right client. Loopback does
    // not drop: every datagram comes back. Those that fit ride QUIC datagrams, the larger ones
    // the flow's stream.
    let mut tasks = Vec::new();
    for c in 0..3u8 {
        tasks.push(tokio::spawn(async move {
            let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            s.connect(gateway).await.unwrap();
            let mut buf = vec![0u8; 65_535];
            for i in 0..100u32 {
                let len = (i as usize * 83) % 8193;
                let d: Vec<u8> = (0..len).map(|k| (k as u8) ^ c ^ (i as u8)).collect();
                s.send(&d).await.unwrap();
                let n = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf))
                    .await
                    .unwrap_or_else(|_| panic!("client {c}: no echo of datagram {i}"))
                    .unwrap();
                assert_eq!(&buf[..n], &d[..], "client {c} datagram {i}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Of each client's 100, those of at most about 1,300 bytes (i * 83 % 8193: i up to 15 or
    // 16, and i = 99, which wraps to 24) fit one QUIC datagram; the rest do not. Each flow's
    // first rides its stream, and the "ping" flow's retries may add a few.
    let to_agent = udp_carried(metrics_port, "to_agent", "quic_datagram").await;
    let from_agent = udp_carried(metrics_port, "to_client", "quic_datagram").await;
    assert!(
        (3 * 14..=3 * 19 + 100).contains(&to_agent),
        "small datagrams ride QUIC datagrams towards the agent: {to_agent}"
    );
    assert!(
        (3 * 15..=3 * 19 + 100).contains(&from_agent),
        "and back: {from_agent}"
    );
    let on_stream = udp_carried(metrics_port, "to_agent", "stream").await;
    eprintln!("UDP datagrams: {to_agent} QUIC datagrams to the agent, {from_agent} back, {on_stream} on streams");
    assert!(
        on_stream >= 3 * 83,
        "large ones ride the stream: {on_stream}"
    );

    // Removed: the gateway closes the port; datagrams get no answer.
    stack
        .api
        .delete_resource(created["id"].as_str().unwrap())
        .await
        .unwrap();
    kakuremichi_e2e::wait_for(
        "the UDP resource to stop answering",
        Duration::from_secs(10),
        || async {
            let mut buf = vec![0u8; 65_535];
            let _ = client.send(b"gone?").await;
            Ok(
                // No answer: a timeout, or the port-unreachable error a closed port brings.
                (!matches!(
                    tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf)).await,
                    Ok(Ok(_))
                ))
                .then_some(()),
            )
        },
    )
    .await
    .unwrap();
}

/// A masked, final client text frame (payload under 126 bytes).
fn ws_client_frame(payload: &[u8]) -> bytes::Bytes {
    let mask = [0x1b, 0x2c, 0x3d, 0x4e];
    let mut f = vec![0x81, 0x80 | u8::try_from(payload.len()).unwrap()];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    bytes::Bytes::from(f)
}

/// The next server frame's payload (unmasked, under 126 bytes), reading more as needed.
async fn read_ws_frame(recv: &mut h2::RecvStream, buf: &mut Vec<u8>) -> Vec<u8> {
    loop {
        if buf.len() >= 2 {
            assert_eq!(buf[0], 0x81, "a final text frame");
            let len = usize::from(buf[1] & 0x7f);
            if buf.len() >= 2 + len {
                let payload = buf[2..2 + len].to_vec();
                buf.drain(..2 + len);
                return payload;
            }
        }
        let chunk = tokio::time::timeout(Duration::from_secs(5), recv.data())
            .await
            .expect("no echo within 5 s")
            .expect("the stream ended")
            .unwrap();
        let _ = recv.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
    }
}

/// A WebSocket over HTTP/2 (RFC 8441): the gateway advertises extended CONNECT, sends the app
/// the HTTP/1.1 upgrade it expects through the tunnel, answers 200, and frames flow both ways on
/// the HTTP/2 stream while the same connection keeps serving ordinary requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_over_http2_extended_connect_echoes_through_the_tunnel() {
    let https_port = free_tcp_port();
    let mut opts = StackOptions::loopback();
    opts.gateway_args = vec![
        "--https-listen".into(),
        format!("127.0.0.1:{https_port}"),
        "--tls-self-signed".into(),
    ];
    let stack = Stack::start_with(opts).await.unwrap();
    stack.wait_serving(Duration::from_secs(20)).await.unwrap();
    let (client, _conn) = h2_connect(https_port).await;
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get(format!("https://{DEMO_HOST}/bytes/10"))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    assert!(
        client.is_extended_connect_protocol_enabled(),
        "the gateway sends SETTINGS_ENABLE_CONNECT_PROTOCOL"
    );

    let mut req = http::Request::builder()
        .method("CONNECT")
        .uri(format!("https://{DEMO_HOST}/ws"))
        .header("sec-websocket-version", "13")
        .body(())
        .unwrap();
    req.extensions_mut()
        .insert(h2::ext::Protocol::from("websocket"));
    let mut client = client.ready().await.unwrap();
    let (resp, mut send) = client.send_request(req, false).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("no answer to the CONNECT")
        .unwrap();
    assert_eq!(resp.status(), 200, "{resp:?}");
    assert!(resp.headers().get("upgrade").is_none());
    let mut recv = resp.into_body();
    let mut buf = Vec::new();
    for i in 0..200 {
        let msg = format!("message {i}");
        send.send_data(ws_client_frame(msg.as_bytes()), false)
            .unwrap();
        assert_eq!(read_ws_frame(&mut recv, &mut buf).await, msg.as_bytes());
    }
    // The connection still serves ordinary requests beside the WebSocket stream.
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get(format!("https://{DEMO_HOST}/bytes/10"))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
}
