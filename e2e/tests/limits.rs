//! Per-resource limits and the PROXY protocol (issue 7), through the real binaries: a body over
//! the resource's size cap is answered 413 (by its Content-Length, or cut while it streams), a
//! request body that stops arriving 408, a target slower than the resource's response timeout
//! 504, a response that goes silent longer than the idle timeout is cut; a TCP target that asks
//! for it gets a PROXY protocol v2 header naming the real client, another target of the same
//! resource does not, and an idle TCP connection is closed.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kakuremichi_e2e::{free_tcp_port, metric, Stack, StackOptions, DEMO_HOST};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Sends `head` and `body` on a fresh connection, then waits (at most 10 s) for the answer's
/// status line; returns the status and how long it took after the last byte was sent.
async fn raw_status(gateway: SocketAddr, head: &str, body: &[u8]) -> (u16, Duration) {
    let mut s = TcpStream::connect(gateway).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let sent = Instant::now();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(2).any(|w| w == b"\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("no answer within 10 s")
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&got);
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, sent.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_resource_limits_answer_413_408_504_and_cut_silent_responses() {
    let metrics_port = free_tcp_port();
    let mut opts = StackOptions::loopback();
    opts.gateway_args = vec![
        "--metrics-listen".into(),
        format!("127.0.0.1:{metrics_port}"),
    ];
    let stack = Stack::start_with(opts).await.unwrap();
    stack.wait_serving(Duration::from_secs(20)).await.unwrap();
    let gateway = stack.opts.gateway_http_for_test;
    let patched = stack
        .api
        .patch(
            &format!("/api/v1/resources/{}", stack.resource_id),
            serde_json::json!({"limits": {
                "max_request_body_bytes": 1024,
                "response_timeout_ms": 2000,
                "idle_timeout_ms": 1000
            }}),
        )
        .await
        .unwrap();
    assert_eq!(
        patched["limits"]["max_request_body_bytes"], 1024,
        "{patched}"
    );

    // Once the gateway has the limits, 2 KiB with a Content-Length is refused before the app.
    let post = |len: usize| {
        stack
            .request_builder(reqwest::Method::POST, DEMO_HOST, "/echo")
            .body(vec![b'x'; len])
    };
    kakuremichi_e2e::wait_for(
        "the gateway to apply the limits",
        Duration::from_secs(10),
        || async { Ok((post(2048).send().await?.status() == 413).then_some(())) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", stack.logs()));
    let small = post(1024).send().await.unwrap();
    assert_eq!(small.status(), 200);
    assert_eq!(
        small.bytes().await.unwrap().len(),
        1024,
        "exactly the cap passes"
    );
    let refused = post(1025).send().await.unwrap();
    assert_eq!(refused.status(), 413);
    assert!(refused.text().await.unwrap().contains("1024 bytes"));

    // Chunked, with no length: cut as it streams, still 413 (to an app that answers only once
    // it has read the whole body).
    let chunks = futures_util::stream::iter(
        (0..8).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'y'; 512]))),
    );
    let streamed = stack
        .request_builder(reqwest::Method::POST, DEMO_HOST, "/discard")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 413);

    // A body that stops arriving: 408 after the idle timeout (1 s), not the gateway's 60 s
    // (to an app that reads the whole body before it answers).
    let (status, took) = raw_status(
        gateway,
        &format!(
            "POST /discard HTTP/1.1\r\nHost: {DEMO_HOST}\r\nContent-Length: 100\r\nConnection: close\r\n\r\n"
        ),
        b"only ten b",
    )
    .await;
    assert_eq!(status, 408, "a stalled body");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "408 after {took:?}"
    );

    // A target slower than the response timeout (2 s): 504, in about two seconds.
    let started = Instant::now();
    let slow = stack.get(DEMO_HOST, "/slow/5000").await.unwrap();
    assert_eq!(slow.status(), 504);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "504 after {took:?}"
    );
    // The response timeout counts from the end of the request: an upload that takes 3 s (a
    // chunk every 500 ms, under the 1 s idle timeout) is answered, not cut at 2 s.
    let slow_chunks = futures_util::stream::unfold(0u32, |i| async move {
        if i == 6 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        Some((
            Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'z'; 100])),
            i + 1,
        ))
    });
    let slow_upload = stack
        .request_builder(reqwest::Method::POST, DEMO_HOST, "/discard")
        .body(reqwest::Body::wrap_stream(slow_chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(slow_upload.status(), 200);
    assert_eq!(slow_upload.text().await.unwrap(), r#"{"len":600}"#);
    assert_eq!(
        stack.get(DEMO_HOST, "/slow/200").await.unwrap().status(),
        200
    );

    // A response that goes silent longer than the idle timeout is cut: events 200 ms apart pass,
    // 2.5 s apart do not.
    let sse = stack.get(DEMO_HOST, "/sse/4/200").await.unwrap();
    let text = sse.text().await.unwrap();
    assert_eq!(text.matches("data: ").count(), 4, "{text}");
    let mut sse = stack.get(DEMO_HOST, "/sse/3/2500").await.unwrap();
    let mut seen = String::new();
    let cut = loop {
        match sse.chunk().await {
            Ok(Some(c)) => seen.push_str(&String::from_utf8_lossy(&c)),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(cut, "the silent response ended as cut: {seen:?}");
    assert_eq!(seen.matches("data: ").count(), 1, "{seen}");

    // Everything else is still served, and the refusals are counted.
    assert_eq!(
        stack.get(DEMO_HOST, "/bytes/10").await.unwrap().status(),
        200
    );
    let too_large = metric(
        metrics_port,
        "kakuremichi_gateway_requests_refused_total{reason=\"body_too_large\"}",
    )
    .await;
    assert!(too_large >= 3, "body_too_large counted {too_large}");
    let timeouts = metric(
        metrics_port,
        "kakuremichi_gateway_requests_refused_total{reason=\"body_timeout\"}",
    )
    .await;
    assert_eq!(timeouts, 1);

    // Limits removed: big bodies pass again.
    stack
        .api
        .patch(
            &format!("/api/v1/resources/{}", stack.resource_id),
            serde_json::json!({"limits": {}}),
        )
        .await
        .unwrap();
    kakuremichi_e2e::wait_for(
        "the gateway to drop the limits",
        Duration::from_secs(10),
        || async { Ok((post(4096).send().await?.status() == 200).then_some(())) },
    )
    .await
    .unwrap();
}

/// A TCP target that speaks the PROXY protocol v2: reads the header, answers `src=<client>
/// dst=<gateway>\n`, then echoes. Without a valid header it answers `no proxy header\n`.
async fn proxy_protocol_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut fixed = [0u8; 16];
                if s.read_exact(&mut fixed).await.is_err() {
                    return;
                }
                let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
                let mut header = fixed.to_vec();
                header.resize(16 + len, 0);
                if s.read_exact(&mut header[16..]).await.is_err() {
                    return;
                }
                let answer = match ppp::v2::Header::try_from(&header[..]) {
                    Ok(h) => match h.addresses {
                        ppp::v2::Addresses::IPv4(a) => format!(
                            "src={}:{} dst={}:{}\n",
                            a.source_address,
                            a.source_port,
                            a.destination_address,
                            a.destination_port
                        ),
                        other => format!("addresses {other:?}\n"),
                    },
                    Err(_) => "no proxy header\n".to_owned(),
                };
                let _ = s.write_all(answer.as_bytes()).await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A plain TCP echo.
async fn plain_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Connects to the gateway port, sends `hello\n`, and reads until it has `want` lines.
async fn exchange(port: u16, want: usize) -> (SocketAddr, String, TcpStream) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let me = s.local_addr().unwrap();
    s.write_all(b"hello\n").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while got.iter().filter(|b| **b == b'\n').count() < want {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("no answer through the TCP resource")
            .unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    (me, String::from_utf8(got).unwrap(), s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_target_gets_the_client_address_by_proxy_protocol_v2_and_idle_connections_close() {
    let mut opts = StackOptions::loopback();
    opts.gateway_args = vec!["--tcp-listen-ip".into(), "127.0.0.1".into()];
    let stack = Stack::start_with(opts).await.unwrap();
    stack.wait_serving(Duration::from_secs(20)).await.unwrap();
    let pp = proxy_protocol_echo().await;
    let plain = plain_echo().await;
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
                "target": pp.to_string(),
                "proxy_protocol": true,
                "targets": [{"site_id": stack.site_id, "target": plain.to_string(), "proxy_protocol": false}],
                "limits": {"idle_timeout_ms": 1000}
            })),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{created}");
    kakuremichi_e2e::wait_for(
        "the TCP resource to answer",
        Duration::from_secs(20),
        || async move { Ok(TcpStream::connect(("127.0.0.1", port)).await.ok()) },
    )
    .await
    .unwrap();

    // Round robin over the two targets: each connection reaches one; the PROXY one learns the
    // real client's address and the gateway port, the other sees only the client's bytes.
    let mut with_header = 0;
    let mut without = 0;
    for _ in 0..6 {
        let (me, got, _s) = exchange(port, 1).await;
        let first = got.lines().next().unwrap_or_default();
        if first.starts_with("src=") {
            assert_eq!(
                first,
                format!("src={me} dst=127.0.0.1:{port}"),
                "the header names this client and the gateway port"
            );
            with_header += 1;
        } else {
            assert_eq!(first, "hello", "no header reached the plain target");
            without += 1;
        }
    }
    assert!(
        with_header >= 2 && without >= 2,
        "both targets reached: {with_header} with the header, {without} without"
    );

    // An idle connection is closed after the resource's idle timeout (1 s); bytes keep it open.
    let (_, _, mut s) = exchange(port, 1).await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.write_all(b"x\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed while busy");
    }
    let idle_from = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an idle connection stayed open")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let took = idle_from.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(3),
        "closed after {took:?} idle"
    );
}
