//! Single-stream throughput of two tunnels on loopback.
//!
//! `cargo run --release -p kakuremichi-tunnel --example throughput [MiB]`
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use kakuremichi_tunnel::{generate_private_key, public_key, PeerSpec, Tunnel, TunnelConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main]
async fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    let gw_ip = Ipv4Addr::new(100, 64, 0, 1);
    let agent_ip = Ipv4Addr::new(100, 64, 0, 2);
    let gw_key = generate_private_key();
    let agent_key = generate_private_key();
    let config = |key, ip, dials| TunnelConfig {
        private_key: key,
        overlay_address: ip,
        mtu: 1420,
        listen: "127.0.0.1:0".parse().unwrap(),
        dials,
        quic: Default::default(),
    };
    let (gateway, _gi) = Tunnel::bind(config(gw_key, gw_ip, false)).await.unwrap();
    let (agent, mut incoming) = Tunnel::bind(config(agent_key, agent_ip, true))
        .await
        .unwrap();
    gateway.set_peers(vec![PeerSpec {
        public_key: public_key(&agent_key),
        allowed_ip: agent_ip,
        endpoint: None,
        persistent_keepalive: None,
    }]);
    agent.set_peers(vec![PeerSpec {
        public_key: public_key(&gw_key),
        allowed_ip: gw_ip,
        endpoint: Some(gateway.local_addr()),
        persistent_keepalive: Some(25),
    }]);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let total = mib << 20;
    let sink = tokio::spawn(async move {
        let mut stream = incoming.accept().await.unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0usize;
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        got
    });
    let mut stream = gateway.connect(agent_ip).await.unwrap();
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        stream.write_all(&chunk).await.unwrap();
        sent += chunk.len();
    }
    stream.shutdown().await.unwrap();
    let got = sink.await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(got, total);
    println!(
        "{} MiB in {:.2} s: {:.0} Mbit/s",
        mib,
        secs,
        (total as f64 * 8.0) / secs / 1e6
    );
}
