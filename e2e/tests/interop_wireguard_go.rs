//! Interoperability with a real WireGuard implementation: our userspace tunnel (boringtun
//! carrying QUIC) talks to Debian's `wireguard-go` on a TUN device in a network namespace, where
//! a plain quinn endpoint on the kernel's UDP answers on the overlay address. Streams go both
//! ways: so our packets are WireGuard that wireguard-go accepts, and IPv4/UDP that the kernel
//! accepts, and theirs are understood by us.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::io::BufRead as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use kakuremichi_e2e::bin;
use kakuremichi_tunnel::{PeerSpec, Tunnel, TunnelConfig, QUIC_PORT};
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

    // Their side: a quinn endpoint on the overlay address, behind wireguard-go.
    let mut peer = KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(bin("kakuremichi-quic-peer").unwrap())
            .args([
                "--listen",
                &format!("100.64.0.2:{QUIC_PORT}"),
                "--greeting",
                "hello from the kernel side",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let peer_out = peer.0.stdout.take().unwrap();

    // Our side: a userspace tunnel in the harness's namespace, dialing QUIC like an agent.
    let (tunnel, mut incoming) = Tunnel::bind(TunnelConfig {
        private_key: our_private,
        overlay_address: Ipv4Addr::new(100, 64, 0, 1),
        mtu: 1420,
        listen: SocketAddr::from(([198, 18, 9, 1], 0)),
        dials: true,
        quic: Default::default(),
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

    // Them -> us: their stream arrives, we answer and close.
    let mut stream = tokio::time::timeout(Duration::from_secs(20), incoming.accept())
        .await
        .expect("no stream from the kernel side")
        .unwrap();
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"hello from the kernel side");
    stream.write_all(b"hello from userspace").await.unwrap();
    stream.shutdown().await.unwrap();
    drop(stream);
    let answer = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(peer_out)
            .read_line(&mut line)
            .unwrap();
        line
    })
    .await
    .unwrap();
    assert_eq!(answer.trim_end(), "hello from userspace");

    // Us -> them: 1 MiB echoed back byte-exact.
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let stream = tunnel.connect(Ipv4Addr::new(100, 64, 0, 2)).await.unwrap();
    let (mut r, mut w) = tokio::io::split(stream);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
        w
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut echoed))
        .await
        .expect("echo through wireguard-go took too long")
        .unwrap();
    let _w = writer.await.unwrap();
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "echoed bytes differ");
    let stats = tunnel.peer_stats();
    assert!(stats[0].last_handshake.is_some());
    tunnel.shutdown();
}
