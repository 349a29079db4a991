//! TLS at the edge: rustls with certificates chosen by SNI.
//!
//! Certificates come from a folder (`--tls-cert-dir`: every `NAME.crt` or `NAME.pem` chain with
//! its `NAME.key`; the names a certificate serves, wildcards included, are read from the
//! certificate itself), or, in development, are made on the fly for every published hostname
//! (`--tls-self-signed`, what the quickstart uses). A ClientHello for a name no certificate covers
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

/// Chooses the certificate for a ClientHello's SNI.
pub struct CertResolver {
    files: Vec<Loaded>,
    self_signed: bool,
    routes: Arc<RwLock<Arc<RouteTable>>>,
    cache: Mutex<HashMap<String, Arc<CertifiedKey>>>,
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
    /// Certificates from `dir` (if given), and self-signed ones for published hostnames that no
    /// file covers when `self_signed`.
    pub fn new(
        dir: Option<&Path>,
        self_signed: bool,
        routes: Arc<RwLock<Arc<RouteTable>>>,
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
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The certificate for `name` (lower case), if any.
    pub fn certificate_for(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        if let Some(hit) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Some(Arc::clone(hit));
        }
        let found = match self.files.iter().find(|f| f.covers(name)) {
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
        cache.insert(name.to_owned(), Arc::clone(&found));
        Some(found)
    }
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
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kakuremichi_proto::{Route, RouteProtocol};

    fn routes(hosts: &[&str]) -> Arc<RwLock<Arc<RouteTable>>> {
        let routes: Vec<Route> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| Route {
                resource_id: uuid::Uuid::from_u128(i as u128 + 1),
                hostname: (*h).to_owned(),
                protocol: RouteProtocol::Http,
                site_id: uuid::Uuid::from_u128(100),
                overlay_address: std::net::Ipv4Addr::new(100, 64, 0, 2),
                port: 10000,
                public_port: None,
                redirect_https: false,
                hsts_max_age: None,
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
        let r =
            CertResolver::new(Some(dir.path()), false, routes(&["demo.localhost"])).expect("loads");
        assert!(r.certificate_for("www.example").is_some());
        assert!(r.certificate_for("a.apps.example").is_some());
        assert!(r.certificate_for("apps.example").is_none());
        assert!(r.certificate_for("other.example").is_none());
        // Without self-signed mode, a published name with no file has no certificate.
        assert!(r.certificate_for("demo.localhost").is_none());

        let dev = CertResolver::new(None, true, routes(&["demo.localhost"])).expect("dev");
        let a = dev.certificate_for("demo.localhost").expect("made");
        let b = dev.certificate_for("demo.localhost").expect("cached");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(dev.certificate_for("unknown.localhost").is_none());
    }

    #[test]
    fn bad_folders_are_clear_errors() {
        let empty = tempfile::tempdir().expect("tempdir");
        let e = CertResolver::new(Some(empty.path()), false, routes(&[])).unwrap_err();
        assert!(e.to_string().contains("no NAME.crt"), "{e}");
        let bad = tempfile::tempdir().expect("tempdir");
        std::fs::write(bad.path().join("x.crt"), "not a certificate").expect("write");
        std::fs::write(bad.path().join("x.key"), "not a key").expect("write");
        let e = CertResolver::new(Some(bad.path()), false, routes(&[])).unwrap_err();
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
        let e = CertResolver::new(Some(mismatched.path()), false, routes(&[])).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
    }
}
