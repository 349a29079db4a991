//! HTTP/3 at the edge: a QUIC endpoint (quinn) on the HTTPS port's UDP twin, the same
//! certificates by SNI (ALPN `h3`), and every request handed to the same proxy as HTTP/1.1 and
//! HTTP/2. HTTPS responses advertise it with `Alt-Svc`.
//!
//! Limits: connections are admitted against the same per-client and global caps (a refused
//! client's Initial is answered with a refusal, no state kept); handshakes in progress are capped
//! (`--max-quic-handshakes`), and past half of the cap a client must prove its address with a
//! stateless Retry before any state is kept for it; at most 100 concurrent request streams per
//! connection; 30 s idle timeout.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf as _, Bytes};
use http::Request;
use http_body_util::BodyExt as _;
use quinn::crypto::rustls::QuicServerConfig;
use tokio::sync::watch;
use tracing::Instrument as _;

use crate::listener::{Admission, ListenerLimits};
use crate::proxy::{stopping, BoxError, Proxy, RequestBody};
use crate::tls::{CertResolver, TlsError};

/// The QUIC server configuration for HTTP/3: TLS 1.3, ALPN h3, certificates by SNI.
pub fn server_config(resolver: Arc<CertResolver>) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| TlsError::Config(e.to_string()))?
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(100u32.into())
        .max_concurrent_uni_streams(10u32.into())
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_secs(30))
                .map_err(|e| TlsError::Config(e.to_string()))?,
        ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Serves HTTP/3 on `socket` until `shutdown` turns true.
pub async fn serve_h3(
    socket: std::net::UdpSocket,
    config: quinn::ServerConfig,
    proxy: Arc<Proxy>,
    limits: ListenerLimits,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let admission = Admission::new(&limits);
    let metrics = proxy.metrics();
    let handshaking = Arc::new(AtomicUsize::new(0));
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
            _ = stopping(&mut shutdown) => break,
        };
        let client = incoming.remote_address();
        match handshake_verdict(
            handshaking.load(Ordering::Relaxed),
            limits.max_quic_handshakes,
            incoming.remote_address_validated(),
        ) {
            HandshakeVerdict::Start => {}
            HandshakeVerdict::Retry => {
                metrics.record_refused_connection("quic_retry");
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                continue;
            }
            HandshakeVerdict::Refuse => {
                metrics.record_refused_connection("quic_handshakes");
                incoming.refuse();
                continue;
            }
        }
        let admitted = match admission.admit(client.ip()) {
            Ok(a) => a,
            Err(refusal) => {
                metrics.record_refused_connection(refusal.label());
                incoming.refuse();
                continue;
            }
        };
        let proxy = Arc::clone(&proxy);
        let handshake = Handshaking::start(&handshaking);
        tokio::spawn(
            async move {
                let _admitted = admitted;
                let conn = incoming.await;
                drop(handshake);
                let conn = match conn {
                    Ok(c) => c,
                    Err(error) => {
                        tracing::debug!(%error, "QUIC handshake failed");
                        return;
                    }
                };
                serve_connection(conn, client, proxy).await;
            }
            .instrument(tracing::debug_span!("h3", %client)),
        );
    }
    endpoint.close(0u32.into(), b"shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
    Ok(())
}

/// What becomes of a new QUIC connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeVerdict {
    /// Its handshake starts.
    Start,
    /// It is answered with a stateless Retry, so that it proves its address first (a flood from
    /// spoofed addresses then costs no state).
    Retry,
    /// It is refused: too many handshakes are in progress.
    Refuse,
}

/// The verdict on a new connection attempt, with `in_progress` handshakes under way out of at
/// most `max`: past half of them, clients prove their address first; at the cap, none starts.
pub fn handshake_verdict(in_progress: usize, max: usize, validated: bool) -> HandshakeVerdict {
    if in_progress >= max {
        HandshakeVerdict::Refuse
    } else if !validated && in_progress >= max / 2 {
        HandshakeVerdict::Retry
    } else {
        HandshakeVerdict::Start
    }
}

/// Counts one handshake in progress until dropped.
struct Handshaking(Arc<AtomicUsize>);

impl Handshaking {
    fn start(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Handshaking(Arc::clone(count))
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection(conn: quinn::Connection, client: SocketAddr, proxy: Arc<Proxy>) {
    let mut h3 = match h3::server::Connection::new(h3_quinn::Connection::new(conn)).await {
        Ok(h) => h,
        Err(error) => {
            tracing::debug!(%error, "HTTP/3 setup failed");
            return;
        }
    };
    loop {
        match h3.accept().await {
            Ok(Some(resolver)) => {
                let proxy = Arc::clone(&proxy);
                tokio::spawn(
                    async move {
                        let (req, stream) = match resolver.resolve_request().await {
                            Ok(r) => r,
                            Err(error) => {
                                tracing::debug!(%error, "bad HTTP/3 request");
                                return;
                            }
                        };
                        if let Err(error) = serve_request(req, stream, client, &proxy).await {
                            tracing::debug!(%error, "HTTP/3 request ended with an error");
                        }
                    }
                    .in_current_span(),
                );
            }
            Ok(None) => return,
            Err(error) => {
                tracing::debug!(%error, "HTTP/3 connection ended");
                return;
            }
        }
    }
}

async fn serve_request<S>(
    req: Request<()>,
    stream: h3::server::RequestStream<S, Bytes>,
    client: SocketAddr,
    proxy: &Proxy,
) -> Result<(), BoxError>
where
    S: h3::quic::BidiStream<Bytes> + Send + 'static,
    <S as h3::quic::BidiStream<Bytes>>::RecvStream: Send + 'static,
    <S as h3::quic::BidiStream<Bytes>>::SendStream: Send + 'static,
{
    let (mut send, recv) = stream.split();
    // The request body, pulled from the QUIC stream as the upstream reads it.
    let body = futures_util::stream::unfold(
        Some(BodyReader {
            stream: recv,
            ended: false,
        }),
        |recv| async move {
            let mut recv = recv?;
            match recv.stream.recv_data().await {
                Ok(Some(mut chunk)) => {
                    let bytes = chunk.copy_to_bytes(chunk.remaining());
                    Some((Ok(http_body::Frame::data(bytes)), Some(recv)))
                }
                Ok(None) => {
                    recv.ended = true;
                    None
                }
                Err(e) => Some((Err(Box::new(e) as BoxError), None)),
            }
        },
    );
    let body: RequestBody = http_body_util::StreamBody::new(body).boxed_unsync();
    let response = proxy
        .handle_boxed(req.map(|()| body), client, "https")
        .await;
    let (parts, mut body) = response.into_parts();
    send.send_response(http::Response::from_parts(parts, ()))
        .await?;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(data) => send.send_data(data).await?,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    send.send_trailers(trailers).await?;
                }
            }
        }
    }
    send.finish().await?;
    Ok(())
}

/// The receiving half of a request stream. A request body the proxy stops reading before its end
/// (a response that did not need it, a refused body) is stopped with `H3_NO_ERROR`, as RFC 9114
/// section 4.1 asks, not with QUIC's implicit code 0, which clients report as an error.
struct BodyReader<S: h3::quic::RecvStream> {
    stream: h3::server::RequestStream<S, Bytes>,
    ended: bool,
}

impl<S: h3::quic::RecvStream> Drop for BodyReader<S> {
    fn drop(&mut self) {
        if !self.ended {
            self.stream.stop_sending(h3::error::Code::H3_NO_ERROR);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_past_half_the_cap_prove_their_address_and_none_start_at_the_cap() {
        use HandshakeVerdict::*;
        assert_eq!(handshake_verdict(0, 512, false), Start);
        assert_eq!(handshake_verdict(255, 512, false), Start);
        assert_eq!(handshake_verdict(256, 512, false), Retry);
        assert_eq!(handshake_verdict(256, 512, true), Start);
        assert_eq!(handshake_verdict(511, 512, true), Start);
        assert_eq!(handshake_verdict(512, 512, true), Refuse);
        assert_eq!(handshake_verdict(512, 512, false), Refuse);
        // A cap of one: every unproven client is asked to prove its address.
        assert_eq!(handshake_verdict(0, 1, false), Retry);
        assert_eq!(handshake_verdict(0, 1, true), Start);
    }
}
