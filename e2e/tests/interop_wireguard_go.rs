//! Interoperability with a real WireGuard implementation: our userspace tunnel (boringtun +
//! smoltcp) talks to Debian's `wireguard-go` with the kernel's TCP/IP on a TUN device in a
//! network namespace, both ways.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Command;
use std::time::Duration;

use kakuremichi_e2e::{demo_pattern, start_demo_app};
use kakuremichi_tunnel::{PeerSpec, Tunnel, TunnelConfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Ns {
    name: String,
    veth: String,
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
    }
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "`{}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wg_key(args: &[&str], input: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new("wg")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    String::from_utf8(child.wait_with_output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string()
}

#[tokio::test]
async fn tunnel_interoperates_with_wireguard_go_both_ways() {
    use base64::Engine as _;
    let id = std::process::id() % 100_000;
    let ns = Ns {
        name: format!("kmwg{id}"),
        veth: format!("kmwr{id}"),
    };
    let inner = format!("kmwi{id}");
    sh(&["ip", "netns", "add", &ns.name]);
    sh(&[
        "ip", "link", "add", &ns.veth, "type", "veth", "peer", "name", &inner,
    ]);
    sh(&["ip", "link", "set", &inner, "netns", &ns.name]);
    sh(&["ip", "addr", "add", "198.18.9.1/30", "dev", &ns.veth]);
    sh(&["ip", "link", "set", &ns.veth, "up"]);
    let inns = |args: &[&str]| {
        let mut full = vec!["ip", "netns", "exec", &ns.name];
        full.extend_from_slice(args);
        sh(&full);
    };
    inns(&["ip", "link", "set", "lo", "up"]);
    inns(&["ip", "addr", "add", "198.18.9.2/30", "dev", &inner]);
    inns(&["ip", "link", "set", &inner, "up"]);

    // wireguard-go on a TUN device inside the namespace.
    let their_private = wg_key(&["genkey"], "");
    let their_public = wg_key(&["pubkey"], &their_private);
    let our_private = kakuremichi_tunnel::generate_private_key();
    let our_public = kakuremichi_tunnel::public_key(&our_private);
    let b64 = base64::engine::general_purpose::STANDARD;
    let key_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key_file.path(), &their_private).unwrap();
    // In the foreground, as our child, so that it dies with the test (a daemonized one would keep
    // the namespace alive). It prints a notice where the kernel has WireGuard: that is fine.
    let ifname = format!("kmwgo{id}");
    let _wg_go = KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &ns.name, "wireguard-go", "-f", &ifname])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..100 {
        let up = Command::new("ip")
            .args(["netns", "exec", &ns.name, "ip", "link", "show", &ifname])
            .output()
            .unwrap();
        if up.status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    inns(&[
        "wg",
        "set",
        &ifname,
        "private-key",
        key_file.path().to_str().unwrap(),
        "listen-port",
        "51999",
        "peer",
        &b64.encode(our_public),
        "allowed-ips",
        "100.64.0.1/32",
    ]);
    inns(&["ip", "addr", "add", "100.64.0.2/10", "dev", &ifname]);
    inns(&["ip", "link", "set", &ifname, "mtu", "1420", "up"]);

    // Their side serves the demo app on the overlay address.
    let dir = tempfile::tempdir().unwrap();
    let _app = start_demo_app(
        SocketAddr::from(([100, 64, 0, 2], 9000)),
        Some(&ns.name),
        dir.path(),
    )
    .unwrap();

    // Our side: a userspace tunnel in the harness's namespace.
    let (tunnel, mut incoming) = Tunnel::bind(TunnelConfig {
        private_key: our_private,
        overlay_address: Ipv4Addr::new(100, 64, 0, 1),
        mtu: 1420,
        listen: SocketAddr::from(([198, 18, 9, 1], 0)),
    })
    .await
    .unwrap();
    let their_key: [u8; 32] = b64.decode(&their_public).unwrap().try_into().unwrap();
    tunnel.set_peers(vec![PeerSpec {
        public_key: their_key,
        allowed_ip: Ipv4Addr::new(100, 64, 0, 2),
        endpoint: Some(SocketAddr::from(([198, 18, 9, 2], 51999))),
        persistent_keepalive: Some(25),
    }]);
    tunnel.set_listen_ports(vec![7000]);

    // Us -> them: an HTTP request to the app behind wireguard-go, 1 MiB back, byte-exact.
    let body = {
        let mut last_err = None;
        let mut got = None;
        for _ in 0..50 {
            match fetch(&tunnel, "/bytes/1048576").await {
                Ok(b) => {
                    got = Some(b);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        got.unwrap_or_else(|| panic!("no answer through wireguard-go: {last_err:?}"))
    };
    assert_eq!(body.len(), 1 << 20);
    assert!(body
        .iter()
        .enumerate()
        .all(|(i, b)| *b == demo_pattern(i as u64)));

    // Them -> us: curl inside the namespace reaches a port we listen on over the overlay.
    let server = tokio::spawn(async move {
        let mut stream = incoming.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut req = Vec::new();
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0);
            req.extend_from_slice(&buf[..n]);
        }
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 21\r\nconnection: close\r\n\r\nhello from userspace\n")
            .await
            .unwrap();
        stream.shutdown().await.unwrap();
    });
    let out = tokio::task::spawn_blocking({
        let ns = ns.name.clone();
        move || {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns,
                    "curl",
                    "-s",
                    "-m",
                    "10",
                    "http://100.64.0.1:7000/",
                ])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from userspace\n"
    );
    server.await.unwrap();
    let stats = tunnel.peer_stats();
    assert!(stats[0].last_handshake.is_some());
    tunnel.shutdown();
}

async fn fetch(tunnel: &Tunnel, path: &str) -> anyhow::Result<Vec<u8>> {
    let mut s = tokio::time::timeout(
        Duration::from_secs(3),
        tunnel.connect(SocketAddrV4::new(Ipv4Addr::new(100, 64, 0, 2), 9000)),
    )
    .await??;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut all)).await??;
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no header end"))?;
    anyhow::ensure!(all.starts_with(b"HTTP/1.0 200") || all.starts_with(b"HTTP/1.1 200"));
    Ok(all[split + 4..].to_vec())
}
