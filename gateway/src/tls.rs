//! TLS at the edge: rustls with certificates chosen by SNI.
//!
//! Certificates come from a folder (`--tls-cert-dir`: every `NAME.crt` or `NAME.pem` chain with
//! its `NAME.key`; the names a certificate serves, wildcards included, are read from the
//! certificate itself), from control (ordered by ACME or uploaded, pushed in the snapshot and kept
//! in the gateway's config cache, so they are served while control is down: [`ManagedCerts`]),
//! or, in development, are made on the fly for every published hostname (`--tls-self-signed`,
//! what the quickstart uses), in that order. A ClientHello offering only ALPN `acme-tls/1` gets
//! the TLS-ALPN-01 challenge certificate for its name while control validates it (RFC 8737). A ClientHello for a name no certificate covers
//! and no route publishes ends the handshake with an alert; a ClientHello without SNI too. TLS 1.2
//! and 1.3; ALPN `h2` and `http/1.1`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use kakuremichi_proto::{AcmeChallenge, TlsCertificate};

use crate::routing::RouteTable;

/// Certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The folder holds no certificate.
    #[error("{0}: no NAME.crt (or NAME.pem) with a NAME.key found")]
    Empty(PathBuf),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate and the end-entity certificate's DER, to test names against.
struct Loaded {
    key: Arc<CertifiedKey>,
    leaf: CertificateDer<'static>,
    path: PathBuf,
}

impl Loaded {
    fn covers(&self, name: &str) -> bool {
        let Ok(server_name) = ServerName::try_from(name) else {
            return false;
        };
        webpki::EndEntityCert::try_from(&self.leaf)
            .and_then(|c| c.verify_is_valid_for_subject_name(&server_name))
            .is_ok()
    }
}

fn load_pair(cert_path: &Path, key_path: &Path) -> Result<Loaded, TlsError> {
    let file_err = |path: &Path, message: String| TlsError::File {
        path: path.to_owned(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| file_err(cert_path, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert_path, e.to_string()))?;
    let leaf = chain
        .first()
        .cloned()
        .ok_or_else(|| file_err(cert_path, "no certificate in the file".into()))?;
    let key =
        PrivateKeyDer::from_pem_file(key_path).map_err(|e| file_err(key_path, e.to_string()))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| file_err(key_path, e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        file_err(
            key_path,
            format!("does not match {}: {e}", cert_path.display()),
        )
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        leaf,
        path: cert_path.to_owned(),
    })
}

/// Loads every `NAME.crt`/`NAME.pem` with its `NAME.key` from `dir`.
fn load_dir(dir: &Path) -> Result<Vec<Loaded>, TlsError> {
    let entries = std::fs::read_dir(dir).map_err(|e| TlsError::File {
        path: dir.to_owned(),
        message: e.to_string(),
    })?;
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    let mut loaded = Vec::new();
    for path in paths {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext != "crt" && ext != "pem" {
            continue;
        }
        let key = path.with_extension("key");
        if !key.exists() {
            continue;
        }
        loaded.push(load_pair(&path, &key)?);
    }
    if loaded.is_empty() {
        return Err(TlsError::Empty(dir.to_owned()));
    }
    Ok(loaded)
}

/// The ALPN protocol of TLS-ALPN-01 validation handshakes.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

#[derive(Default)]
struct ManagedSet {
    certs: Vec<Loaded>,
    alpn: HashMap<String, Arc<CertifiedKey>>,
    expiry: Vec<(String, i64)>,
}

/// Certificates and TLS-ALPN-01 answers pushed by control, swapped on every snapshot that changes
/// them.
#[derive(Default)]
pub struct ManagedCerts {
    set: RwLock<Arc<ManagedSet>>,
    generation: std::sync::atomic::AtomicU64,
    applied: Mutex<(Vec<TlsCertificate>, Vec<AcmeChallenge>)>,
}

impl std::fmt::Debug for ManagedCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedCerts")
            .field("certificates", &self.current().certs.len())
            .finish_non_exhaustive()
    }
}

impl ManagedCerts {
    fn current(&self) -> Arc<ManagedSet> {
        Arc::clone(&self.set.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Takes a snapshot's certificates and challenge answers (a no-op when they did not change).
    /// A certificate that does not load is logged and skipped; the others are served.
    pub fn apply(&self, certificates: &[TlsCertificate], challenges: &[AcmeChallenge]) {
        {
            let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
            if applied.0 == certificates && applied.1 == challenges {
                return;
            }
            *applied = (certificates.to_vec(), challenges.to_vec());
        }
        let mut set = ManagedSet::default();
        for c in certificates {
            match load_pem(&c.chain_pem, c.key_pem.expose()) {
                Ok((key, leaf)) => {
                    set.certs.push(Loaded {
                        key,
                        leaf,
                        path: PathBuf::from(format!("control:{}", c.id)),
                    });
                    for n in &c.names {
                        set.expiry.push((n.clone(), c.not_after_ms));
                    }
                }
                Err(error) => {
                    tracing::warn!(certificate_id = %c.id, names = ?c.names, %error, "cannot load a certificate from control");
                }
            }
        }
        for ch in challenges {
            if let AcmeChallenge::TlsAlpn01 { name, digest } = ch {
                match alpn_challenge_cert(name, digest) {
                    Some(k) => {
                        set.alpn.insert(name.to_ascii_lowercase(), k);
                    }
                    None => tracing::warn!(%name, "cannot make a TLS-ALPN-01 certificate"),
                }
            }
        }
        tracing::info!(
            certificates = set.certs.len(),
            tls_alpn_challenges = set.alpn.len(),
            "certificates from control applied"
        );
        *self.set.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Each name of each certificate from control with its expiry (unix ms), for metrics.
    pub fn expiry(&self) -> Vec<(String, i64)> {
        self.current().expiry.clone()
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }
}

fn load_pem(
    chain_pem: &str,
    key_pem: &str,
) -> Result<(Arc<CertifiedKey>, CertificateDer<'static>), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let leaf = chain
        .first()
        .cloned()
        .ok_or("no certificate in the chain")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| e.to_string())?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| e.to_string())?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| e.to_string())?;
    Ok((Arc::new(certified), leaf))
}

/// The RFC 8737 certificate: self-signed for `name`, with the critical acmeIdentifier extension
/// holding the SHA-256 digest of the key authorization.
fn alpn_challenge_cert(name: &str, digest_b64: &str) -> Option<Arc<CertifiedKey>> {
    use base64::Engine as _;
    let digest = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(digest_b64)
        .ok()?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).ok()?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(&digest)];
    let key = rcgen::KeyPair::generate().ok()?;
    let cert = params.self_signed(&key).ok()?;
    let der = PrivateKeyDer::try_from(key.serialize_der()).ok()?;
    let signing = provider().key_provider.load_private_key(der).ok()?;
    Some(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

/// Chooses the certificate for a ClientHello's SNI.
pub struct CertResolver {
    files: Vec<Loaded>,
    self_signed: bool,
    routes: Arc<RwLock<Arc<RouteTable>>>,
    managed: Arc<ManagedCerts>,
    cache: Mutex<HashMap<String, (u64, Arc<CertifiedKey>)>>,
}

impl std::fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertResolver")
            .field(
                "files",
                &self.files.iter().map(|l| &l.path).collect::<Vec<_>>(),
            )
            .field("self_signed", &self.self_signed)
            .finish_non_exhaustive()
    }
}

impl CertResolver {
    /// Certificates from `dir` (if given), then those from control (`managed`), then
    /// self-signed ones for published hostnames when `self_signed`.
    pub fn new(
        dir: Option<&Path>,
        self_signed: bool,
        routes: Arc<RwLock<Arc<RouteTable>>>,
        managed: Arc<ManagedCerts>,
    ) -> Result<CertResolver, TlsError> {
        let files = match dir {
            Some(d) => load_dir(d)?,
            None => Vec::new(),
        };
        for f in &files {
            tracing::info!(file = %f.path.display(), "loaded a TLS certificate");
        }
        Ok(CertResolver {
            files,
            self_signed,
            routes,
            managed,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The certificate for `name` (lower case), if any.
    pub fn certificate_for(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let generation = self.managed.generation();
        if let Some((g, hit)) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            if *g == generation {
                return Some(Arc::clone(hit));
            }
        }
        let managed = self.managed.current();
        let found = match self
            .files
            .iter()
            .chain(managed.certs.iter())
            .find(|f| f.covers(name))
        {
            Some(f) => Arc::clone(&f.key),
            None => {
                if !self.self_signed {
                    return None;
                }
                let published = self
                    .routes
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .lookup(name)
                    .is_some();
                if !published {
                    return None;
                }
                self_signed(name)?
            }
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: names are published hostnames or names the files cover.
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(name.to_owned(), (generation, Arc::clone(&found)));
        Some(found)
    }

    /// The TLS-ALPN-01 challenge certificate for `name`, while control validates it.
    pub fn acme_challenge_for(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.managed.current().alpn.get(name).cloned()
    }
}

/// The certificate the relay's TLS name gets: self-signed, made once per process. Agents do
/// not verify it (WireGuard inside authenticates the gateway).
fn relay_certificate() -> Option<Arc<CertifiedKey>> {
    static CERT: std::sync::OnceLock<Option<Arc<CertifiedKey>>> = std::sync::OnceLock::new();
    CERT.get_or_init(|| self_signed(crate::relay::RELAY_SERVER_NAME))
        .clone()
}

fn self_signed(name: &str) -> Option<Arc<CertifiedKey>> {
    let made = rcgen::generate_simple_self_signed(vec![name.to_owned()]).ok()?;
    let key = PrivateKeyDer::try_from(made.signing_key.serialize_der()).ok()?;
    let signing = provider().key_provider.load_private_key(key).ok()?;
    tracing::info!(%name, "made a self-signed development certificate");
    Some(Arc::new(CertifiedKey::new(
        vec![made.cert.der().clone()],
        signing,
    )))
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?.to_ascii_lowercase();
        let acme = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
        if acme {
            let cert = self.acme_challenge_for(&name);
            tracing::info!(%name, answered = cert.is_some(), "TLS-ALPN-01 validation handshake");
            return cert;
        }
        if name == crate::relay::RELAY_SERVER_NAME {
            return relay_certificate();
        }
        let cert = self.certificate_for(&name);
        if cert.is_none() {
            tracing::debug!(%name, "TLS handshake for a name no certificate covers");
        }
        cert
    }
}

/// The server configuration: TLS 1.2 and 1.3, ALPN h2 and http/1.1, certificates by SNI.
pub fn server_config(resolver: Arc<CertResolver>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kakuremichi_proto::Route;

    fn routes(hosts: &[&str]) -> Arc<RwLock<Arc<RouteTable>>> {
        let routes: Vec<Route> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                Route::http(
                    uuid::Uuid::from_u128(i as u128 + 1),
                    h,
                    uuid::Uuid::from_u128(100),
                    std::net::Ipv4Addr::new(100, 64, 0, 2),
                    10000,
                )
            })
            .collect();
        Arc::new(RwLock::new(Arc::new(RouteTable::from_routes(&routes))))
    }

    fn write_cert(dir: &Path, file: &str, names: &[&str]) {
        let made = rcgen::generate_simple_self_signed(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .expect("rcgen");
        std::fs::write(dir.join(format!("{file}.crt")), made.cert.pem()).expect("write");
        std::fs::write(
            dir.join(format!("{file}.key")),
            made.signing_key.serialize_pem(),
        )
        .expect("write");
    }

    #[test]
    fn files_by_name_and_wildcard_then_self_signed_for_published_names_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_cert(dir.path(), "apps", &["*.apps.example"]);
        write_cert(dir.path(), "www", &["www.example"]);
        std::fs::write(dir.path().join("notes.txt"), "ignored").expect("write");
        let r = CertResolver::new(
            Some(dir.path()),
            false,
            routes(&["demo.localhost"]),
            Arc::default(),
        )
        .expect("loads");
        assert!(r.certificate_for("www.example").is_some());
        assert!(r.certificate_for("a.apps.example").is_some());
        assert!(r.certificate_for("apps.example").is_none());
        assert!(r.certificate_for("other.example").is_none());
        // Without self-signed mode, a published name with no file has no certificate.
        assert!(r.certificate_for("demo.localhost").is_none());

        let dev = CertResolver::new(None, true, routes(&["demo.localhost"]), Arc::default())
            .expect("dev");
        let a = dev.certificate_for("demo.localhost").expect("made");
        let b = dev.certificate_for("demo.localhost").expect("cached");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(dev.certificate_for("unknown.localhost").is_none());
    }

    #[test]
    fn bad_folders_are_clear_errors() {
        let empty = tempfile::tempdir().expect("tempdir");
        let e =
            CertResolver::new(Some(empty.path()), false, routes(&[]), Arc::default()).unwrap_err();
        assert!(e.to_string().contains("no NAME.crt"), "{e}");
        let bad = tempfile::tempdir().expect("tempdir");
        std::fs::write(bad.path().join("x.crt"), "not a certificate").expect("write");
        std::fs::write(bad.path().join("x.key"), "not a key").expect("write");
        let e =
            CertResolver::new(Some(bad.path()), false, routes(&[]), Arc::default()).unwrap_err();
        assert!(
            e.to_string().contains("x.crt") || e.to_string().contains("x.key"),
            "{e}"
        );
        let mismatched = tempfile::tempdir().expect("tempdir");
        write_cert(mismatched.path(), "a", &["a.example"]);
        write_cert(mismatched.path(), "b", &["b.example"]);
        std::fs::rename(
            mismatched.path().join("b.key"),
            mismatched.path().join("a.key"),
        )
        .expect("rename");
        let e = CertResolver::new(Some(mismatched.path()), false, routes(&[]), Arc::default())
            .unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
    }

    #[test]
    fn certificates_from_control_are_served_replaced_and_answer_tls_alpn_01() {
        let managed = Arc::new(ManagedCerts::default());
        let r = CertResolver::new(
            None,
            true,
            routes(&["app.apps.example"]),
            Arc::clone(&managed),
        )
        .expect("resolver");
        // Before control sends one: the development certificate.
        let dev = r.certificate_for("app.apps.example").expect("self-signed");
        let made =
            rcgen::generate_simple_self_signed(vec!["*.apps.example".to_owned()]).expect("rcgen");
        let pushed = TlsCertificate {
            id: uuid::Uuid::from_u128(7),
            names: vec!["*.apps.example".into()],
            chain_pem: made.cert.pem(),
            key_pem: kakuremichi_proto::Secret::new(made.signing_key.serialize_pem()),
            not_after_ms: 4_000_000_000_000,
        };
        let broken = TlsCertificate {
            id: uuid::Uuid::from_u128(8),
            names: vec!["broken.example".into()],
            chain_pem: "junk".into(),
            key_pem: kakuremichi_proto::Secret::new("junk"),
            not_after_ms: 0,
        };
        use base64::Engine as _;
        let digest = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([9u8; 32]);
        managed.apply(
            &[broken, pushed.clone()],
            &[AcmeChallenge::TlsAlpn01 {
                name: "new.example".into(),
                digest,
            }],
        );
        let served = r.certificate_for("app.apps.example").expect("from control");
        assert!(
            !Arc::ptr_eq(&served, &dev),
            "the cached development cert was replaced"
        );
        assert_eq!(served.cert[0].as_ref(), made.cert.der().as_ref());
        assert!(r.certificate_for("other.apps.example").is_some());
        assert_eq!(
            managed.expiry(),
            vec![("*.apps.example".to_owned(), 4_000_000_000_000)]
        );
        // The RFC 8737 certificate carries the digest in the acmeIdentifier extension.
        let alpn = r.acme_challenge_for("new.example").expect("challenge cert");
        let der = alpn.cert[0].as_ref();
        let oid_and_digest = [&[0x04u8, 0x22, 0x04, 0x20][..], &[9u8; 32][..]].concat();
        assert!(der
            .windows(oid_and_digest.len())
            .any(|w| w == oid_and_digest.as_slice()));
        assert!(r.acme_challenge_for("app.apps.example").is_none());
        // Removed by control: back to the development certificate.
        managed.apply(&[], &[]);
        let again = r
            .certificate_for("app.apps.example")
            .expect("self-signed again");
        assert_ne!(again.cert[0].as_ref(), made.cert.der().as_ref());
        assert!(r.acme_challenge_for("new.example").is_none());
    }
}
