//! Long-lived and large exchanges through the whole path (issue 7): a WebSocket echoes 1,000
//! messages in order, server-sent events arrive as they are written, and 1 GiB each way passes
//! while the gateway's memory stays flat.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use kakuremichi_e2e::{Stack, DEMO_HOST};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_echoes_a_thousand_messages_in_order() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    use tokio_tungstenite::tungstenite::Message;
    let stack = Stack::start().await.unwrap();
    let mut req = format!("ws://{}/ws", stack.opts.gateway_http_for_test)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("host", DEMO_HOST.parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    // All 1,000 go out without waiting for echoes, so order is really tested.
    let sender = tokio::spawn(async move {
        for i in 0..1000 {
            tx.send(Message::text(format!("message {i}")))
                .await
                .unwrap();
        }
        tx
    });
    for i in 0..1000 {
        let got = tokio::time::timeout(Duration::from_secs(10), rx.next())
            .await
            .expect("no echo within 10 s")
            .unwrap()
            .unwrap();
        assert_eq!(got, Message::text(format!("message {i}")), "out of order");
    }
    let _ = sender.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_server_sent_event_arrives_within_100ms_of_being_written() {
    let stack = Stack::start().await.unwrap();
    let resp = stack.get(DEMO_HOST, "/sse/20/200").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut seen = 0u32;
    let mut worst = Duration::ZERO;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), body.next())
        .await
        .expect("the event stream stalled")
    {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros();
        buf.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let mut parts = event.trim().trim_start_matches("data: ").split(' ');
            let i: u32 = parts.next().unwrap().parse().unwrap();
            let written: u128 = parts.next().unwrap().parse().unwrap();
            assert_eq!(i, seen, "events out of order");
            let late = Duration::from_micros(u64::try_from(now.saturating_sub(written)).unwrap());
            assert!(
                late <= Duration::from_millis(100),
                "event {i} arrived {late:?} after it was written: buffered somewhere"
            );
            worst = worst.max(late);
            seen += 1;
        }
    }
    assert_eq!(seen, 20);
    println!("20 events, 200 ms apart; the latest arrived {worst:?} after it was written");
}

/// Samples `pid`'s RSS every 50 ms while `work` runs; returns its result and the peak in KiB.
async fn with_peak_rss<T>(pid: u32, work: impl std::future::Future<Output = T>) -> (T, u64) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(kakuremichi_e2e::rss_kib(pid).unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        })
    };
    let out = work.await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    (out, sampler.await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gib_each_way_leaves_the_gateways_memory_flat() {
    const GIB: u64 = 1 << 30;
    let stack = Stack::start().await.unwrap();
    let pid = stack.gateway.pid().unwrap();
    let before = stack.gateway.rss_kib().unwrap();

    let started = Instant::now();
    let (got, peak_down) = with_peak_rss(pid, async {
        let resp = stack
            .get(DEMO_HOST, &format!("/bytes/{GIB}"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.bytes_stream();
        let mut n = 0u64;
        while let Some(chunk) = body.next().await {
            n += chunk.unwrap().len() as u64;
        }
        n
    })
    .await;
    assert_eq!(got, GIB);
    let down = started.elapsed();

    let started = Instant::now();
    let (answer, peak_up) = with_peak_rss(pid, async {
        let chunk = bytes::Bytes::from(vec![42u8; 1 << 20]);
        let body = futures_util::stream::iter(
            (0..1024).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
        );
        let resp = stack
            .request_builder(reqwest::Method::POST, DEMO_HOST, "/discard")
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json::<serde_json::Value>().await.unwrap()
    })
    .await;
    assert_eq!(answer["len"].as_u64(), Some(GIB));
    let up = started.elapsed();

    let growth_mib = (peak_down.max(peak_up).saturating_sub(before)) / 1024;
    println!(
        "1 GiB down in {down:?}, up in {up:?}; gateway RSS {} MiB before, peak {} / {} MiB \
         (down / up): growth {growth_mib} MiB",
        before / 1024,
        peak_down / 1024,
        peak_up / 1024
    );
    assert!(
        growth_mib < 64,
        "the gateway grew by {growth_mib} MiB moving 1 GiB each way"
    );
}
