//! A QUIC peer for the WireGuard interoperability test: plain quinn on the kernel's UDP, run
//! behind `wireguard-go`'s TUN device, speaking to the tunnel's QUIC endpoint with the tunnel's
//! own TLS settings.
//!
//! It listens on `--listen`, echoes every bidirectional stream it is given until the other side
//! finishes it, and on the first connection opens one stream of its own, sends `--greeting`,
//! and prints the answer on stdout as one line. Test tooling only.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    /// UDP address to listen on (the overlay address behind the TUN device).
    #[arg(long)]
    listen: SocketAddr,
    /// What to send on the stream this peer opens.
    #[arg(long, default_value = "hello from the kernel side")]
    greeting: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let crypto = kakuremichi_tunnel::tls::server_crypto().map_err(anyhow::Error::msg)?;
    let mut config = quinn::ServerConfig::with_crypto(crypto);
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        10_000,
    ))));
    config.transport_config(Arc::new(transport));
    let endpoint = quinn::Endpoint::server(config, args.listen).context("binding the endpoint")?;
    let mut greeted = false;
    while let Some(incoming) = endpoint.accept().await {
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("handshake failed: {e}");
                continue;
            }
        };
        if !greeted {
            greeted = true;
            let conn = conn.clone();
            let greeting = args.greeting.clone();
            tokio::spawn(async move {
                match greet(&conn, &greeting).await {
                    Ok(answer) => {
                        #[allow(clippy::print_stdout)]
                        {
                            println!("{}", answer.trim_end());
                        }
                    }
                    Err(e) => eprintln!("greeting failed: {e:#}"),
                }
            });
        }
        tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut recv, &mut send).await;
                    let _ = send.finish();
                    let _ = send.stopped().await;
                });
            }
        });
    }
    Ok(())
}

async fn greet(conn: &quinn::Connection, greeting: &str) -> anyhow::Result<String> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(greeting.as_bytes()).await?;
    send.finish()?;
    let answer = recv.read_to_end(1 << 16).await?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}
