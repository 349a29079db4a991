//! QUIC's TLS inside the tunnel: a throwaway self-signed certificate per process on the
//! listening side, and a client that accepts any certificate but still checks the handshake
//! signature.
//!
//! Peer authentication is WireGuard's job: an inner packet is only delivered when it was
//! decrypted with the key of the peer whose allowed IP is its source address, and a QUIC
//! connection is bound to that address. TLS here only keys QUIC's packet protection, so it
//! verifies nothing about names or chains. Must never be used for a connection that does not
//! run inside the tunnel. (Public so that a QUIC peer behind another WireGuard implementation
//! can speak to the tunnel, as the interoperability test's peer does.)

use std::sync::{Arc, OnceLock};

use quinn_proto::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The ALPN protocol of the tunnel's QUIC connections.
pub const ALPN: &[u8] = b"kakuremichi/1";
/// The name the client asks for; nothing checks it.
pub const SERVER_NAME: &str = "kakuremichi.invalid";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side's TLS configuration: built once per process (the key pair is generated then).
pub fn server_crypto() -> Result<Arc<QuicServerConfig>, String> {
    static SERVER: OnceLock<Result<Arc<QuicServerConfig>, String>> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])
                .map_err(|e| format!("cannot generate the QUIC certificate: {e}"))?;
            let cert = certified.cert.der().clone();
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                certified.signing_key.serialize_der(),
            ));
            let mut tls = rustls::ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| e.to_string())?
                .with_no_client_auth()
                .with_single_cert(vec![cert], key)
                .map_err(|e| e.to_string())?;
            tls.alpn_protocols = vec![ALPN.to_vec()];
            tls.max_early_data_size = 0;
            QuicServerConfig::try_from(tls)
                .map(Arc::new)
                .map_err(|e| e.to_string())
        })
        .clone()
}

/// The client side's TLS configuration.
pub fn client_crypto() -> Result<Arc<QuicClientConfig>, String> {
    static CLIENT: OnceLock<Result<Arc<QuicClientConfig>, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            let provider = provider();
            let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(InsideTunnel(provider)))
                .with_no_client_auth();
            tls.alpn_protocols = vec![ALPN.to_vec()];
            tls.enable_early_data = false;
            QuicClientConfig::try_from(tls)
                .map(Arc::new)
                .map_err(|e| e.to_string())
        })
        .clone()
}

/// A TLS client configuration for a connection whose payload is WireGuard datagrams (the relay
/// WebSocket of the UDP-blocked fallback): WireGuard authenticates the gateway, so this accepts
/// any certificate (still checking the handshake signature), TLS 1.3 only, with `alpn`.
pub fn relay_client_config(alpn: &[u8]) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(InsideTunnel(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(tls))
}

/// Accepts any certificate (WireGuard authenticated the peer), checks the handshake signature.
#[derive(Debug)]
struct InsideTunnel(Arc<CryptoProvider>);

impl ServerCertVerifier for InsideTunnel {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
