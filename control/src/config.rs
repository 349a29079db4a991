//! Settings of the control binary: command line and environment (clap) over an optional TOML file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kakuremichi_proto::Secret;
use serde::Deserialize;

use crate::overlay::OverlayNet;
use crate::store::Backend;

/// The default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3000";
/// The default data directory.
pub const DEFAULT_DATA_DIR: &str = "./data";

/// The settings of `--config FILE` (every key optional; the command line and env win).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Listen address.
    pub listen: Option<String>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Database URL.
    pub database_url: Option<String>,
    /// Overlay CIDR.
    pub overlay_cidr: Option<String>,
    /// Admin key to seed when the store has none.
    pub initial_admin_key: Option<Secret>,
    /// PostgreSQL pool size.
    pub database_max_connections: Option<u32>,
    /// How long enrollment tokens are valid, e.g. "24h", "30m".
    pub enrollment_token_ttl: Option<String>,
    /// Open connections at most.
    pub max_connections: Option<usize>,
    /// Node handshakes in progress at most.
    pub max_handshakes: Option<usize>,
    /// The file holding the key that seals private keys at rest.
    pub secrets_key_file: Option<PathBuf>,
    /// The URL browsers reach control at (sign-in pages, token issuer).
    pub public_url: Option<String>,
    /// Sign-in attempts per minute from one client address.
    pub sign_in_per_minute: Option<u32>,
    /// How long a sign-in lasts (`8h`, `7d`).
    pub session_life: Option<String>,
    /// Password/PIN attempts per minute from one client on one resource (and e-mail code
    /// requests per client and per address).
    pub passcode_attempts_per_minute: Option<u32>,
    /// The SMTP relay that sends e-mailed codes (`smtp://host:25`, `smtps://user:pass@host`).
    pub smtp_url: Option<Secret>,
    /// The sender address of e-mailed codes.
    pub smtp_from: Option<String>,
    /// Where MCP clients' metadata documents may be fetched from: `public`, `any` or `off`.
    pub client_metadata_documents: Option<String>,
    /// Extra root certificates (PEM) trusted when fetching them.
    pub client_metadata_ca_file: Option<PathBuf>,
    /// The hostname gateways serve agent sessions at (agentapi-proxy's API).
    pub sessions_hostname: Option<String>,
    /// The folder of the agent binaries control serves to `install.sh`.
    pub release_dir: Option<PathBuf>,
    /// How long requests in flight may take to finish after SIGTERM (`10s`, `500ms`, `0`).
    pub shutdown_grace: Option<String>,
    /// Certificates by ACME (`[acme]`).
    #[serde(default)]
    pub acme: AcmeRaw,
    /// The OTLP/HTTP collector traces go to (`--otlp-endpoint`).
    pub otlp_endpoint: Option<String>,
}

/// ACME settings before validation (command line/env over the `[acme]` table).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeRaw {
    /// Directory URL; ACME is off without one.
    pub directory: Option<String>,
    /// Contact e-mail addresses, comma-separated.
    pub contact: Option<String>,
    /// Extra root (PEM) trusted for the CA's API.
    pub ca_file: Option<PathBuf>,
    /// `http-01` (default), `tls-alpn-01` or `off`.
    pub for_resources: Option<String>,
    /// RFC 2136 server `ip:port` for DNS-01.
    pub dns_server: Option<String>,
    /// The zone updated.
    pub dns_zone: Option<String>,
    /// TSIG key name.
    pub dns_tsig_name: Option<String>,
    /// File with the TSIG key (hmac-sha256, base64).
    pub dns_tsig_secret_file: Option<PathBuf>,
    /// How long to wait for gateways to apply a challenge, e.g. "10s".
    pub gateway_wait: Option<String>,
}

impl AcmeRaw {
    fn over(self, file: AcmeRaw) -> AcmeRaw {
        AcmeRaw {
            directory: self.directory.or(file.directory),
            contact: self.contact.or(file.contact),
            ca_file: self.ca_file.or(file.ca_file),
            for_resources: self.for_resources.or(file.for_resources),
            dns_server: self.dns_server.or(file.dns_server),
            dns_zone: self.dns_zone.or(file.dns_zone),
            dns_tsig_name: self.dns_tsig_name.or(file.dns_tsig_name),
            dns_tsig_secret_file: self.dns_tsig_secret_file.or(file.dns_tsig_secret_file),
            gateway_wait: self.gateway_wait.or(file.gateway_wait),
        }
    }

    fn validate(self) -> Result<Option<crate::acme::AcmeSettings>, ConfigError> {
        let invalid =
            |setting: &'static str, message: String| ConfigError::Invalid { setting, message };
        let Some(directory) = self.directory else {
            if self.dns_server.is_some() || self.ca_file.is_some() {
                return Err(invalid(
                    "ACME settings",
                    "--acme-directory is needed for the other ACME settings".into(),
                ));
            }
            return Ok(None);
        };
        if !directory.starts_with("https://") && !directory.starts_with("http://") {
            return Err(invalid(
                "ACME directory",
                format!("{directory:?} is not an http(s) URL"),
            ));
        }
        if let Some(ca) = &self.ca_file {
            if !ca.is_file() {
                return Err(invalid(
                    "ACME CA file",
                    format!("{} is not a file", ca.display()),
                ));
            }
        }
        let for_resources = match self.for_resources.as_deref() {
            None | Some("http-01") => Some(crate::store::ChallengeKind::Http01),
            Some("tls-alpn-01") => Some(crate::store::ChallengeKind::TlsAlpn01),
            Some("off") => None,
            Some(other) => {
                return Err(invalid(
                    "ACME for resources",
                    format!("{other:?}: expected http-01, tls-alpn-01 or off"),
                ))
            }
        };
        let dns = match self.dns_server {
            None => None,
            Some(server) => {
                let server = server.parse().map_err(|_| {
                    invalid("ACME DNS server", format!("{server:?} is not an ip:port"))
                })?;
                let zone = self.dns_zone.ok_or_else(|| {
                    invalid("ACME DNS zone", "--acme-dns-zone is required".into())
                })?;
                let key_name = self.dns_tsig_name.ok_or_else(|| {
                    invalid(
                        "ACME DNS TSIG name",
                        "--acme-dns-tsig-name is required".into(),
                    )
                })?;
                let path = self.dns_tsig_secret_file.ok_or_else(|| {
                    invalid(
                        "ACME DNS TSIG secret",
                        "--acme-dns-tsig-secret-file is required".into(),
                    )
                })?;
                let secret = std::fs::read_to_string(&path).map_err(|e| {
                    invalid("ACME DNS TSIG secret", format!("{}: {e}", path.display()))
                })?;
                let dns = crate::dns::Rfc2136 {
                    server,
                    zone,
                    key_name,
                    key_secret: Secret::new(secret.trim()),
                };
                dns.validate()
                    .map_err(|e| invalid("ACME DNS settings", e.to_string()))?;
                Some(dns)
            }
        };
        let gateway_wait = match self.gateway_wait {
            None => Duration::from_secs(10),
            Some(t) => parse_duration(&t).ok_or_else(|| {
                invalid(
                    "ACME gateway wait",
                    format!("{t:?} is not a duration such as 10s"),
                )
            })?,
        };
        Ok(Some(crate::acme::AcmeSettings {
            directory,
            contact: self
                .contact
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(|c| {
                    if c.starts_with("mailto:") {
                        c.to_owned()
                    } else {
                        format!("mailto:{c}")
                    }
                })
                .collect(),
            ca_file: self.ca_file,
            for_resources,
            dns,
            gateway_wait,
        }))
    }
}

/// A setting was invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for these settings.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: toml::de::Error,
    },
    /// A value was invalid.
    #[error("invalid {setting}: {message}")]
    Invalid {
        /// Which setting.
        setting: &'static str,
        /// Why.
        message: String,
    },
}

impl FileConfig {
    /// Reads and parses a TOML file.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the HTTP server listens.
    pub listen: SocketAddr,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The database URL.
    pub database_url: String,
    /// The overlay network.
    pub overlay: OverlayNet,
    /// Admin key to seed when the store has none.
    pub initial_admin_key: Option<Secret>,
    /// PostgreSQL pool size (SQLite always uses one connection).
    pub database_max_connections: u32,
    /// How long enrollment tokens are valid.
    pub enrollment_token_ttl: Duration,
    /// Open connections at most.
    pub max_connections: usize,
    /// Node handshakes in progress at most.
    pub max_handshakes: usize,
    /// The key that seals private keys at rest (made on first start when missing).
    pub secrets_key_file: PathBuf,
    /// Certificates by ACME, if configured.
    pub acme: Option<crate::acme::AcmeSettings>,
    /// The URL browsers reach control at, without a trailing slash.
    pub public_url: String,
    /// Sign-in attempts per minute from one client address.
    pub sign_in_per_minute: u32,
    /// How long a sign-in lasts: control's session, and the token every gateway holds.
    pub session_life: Duration,
    /// Password/PIN attempts per minute from one client on one resource.
    pub passcode_attempts_per_minute: u32,
    /// The SMTP relay of e-mailed codes and their sender, checked ([`crate::visitors::Mailer`]).
    pub smtp: Option<(Secret, String)>,
    /// Where MCP clients' metadata documents are fetched from.
    pub client_metadata: crate::client_metadata::Reach,
    /// Extra roots trusted when fetching them (read and parsed at validation).
    pub client_metadata_roots: Vec<reqwest::Certificate>,
    /// The hostname gateways serve agent sessions at, lower case.
    pub sessions_hostname: Option<String>,
    /// The folder of the agent binaries `install.sh` fetches (`None`: the folder of control's
    /// own executable).
    pub release_dir: Option<PathBuf>,
    /// Whether the public URL was set (not the default from the listen address).
    pub public_url_set: bool,
    /// How long requests in flight may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
}

/// Default sign-in attempts per minute from one client address.
pub const DEFAULT_SIGN_IN_PER_MINUTE: u32 = 20;

/// Default PostgreSQL pool size.
pub const DEFAULT_DATABASE_MAX_CONNECTIONS: u32 = 8;
/// Default cap on open connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default cap on node handshakes in progress.
pub const DEFAULT_MAX_HANDSHAKES: usize = 64;

/// Raw settings before validation (each from the command line/env, else the file, else default).
#[derive(Debug, Default, Clone)]
pub struct RawSettings {
    /// Listen address.
    pub listen: Option<String>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Database URL.
    pub database_url: Option<String>,
    /// Overlay CIDR.
    pub overlay_cidr: Option<String>,
    /// Initial admin key.
    pub initial_admin_key: Option<Secret>,
    /// PostgreSQL pool size.
    pub database_max_connections: Option<u32>,
    /// Enrollment token lifetime.
    pub enrollment_token_ttl: Option<String>,
    /// Open connections at most.
    pub max_connections: Option<usize>,
    /// Node handshakes in progress at most.
    pub max_handshakes: Option<usize>,
    /// The secrets key file.
    pub secrets_key_file: Option<PathBuf>,
    /// Public URL.
    pub public_url: Option<String>,
    /// Sign-in attempts per minute per client address.
    pub sign_in_per_minute: Option<u32>,
    /// Session life.
    pub session_life: Option<String>,
    /// Passcode attempts per minute.
    pub passcode_attempts_per_minute: Option<u32>,
    /// SMTP relay URL.
    pub smtp_url: Option<Secret>,
    /// Sender of e-mailed codes.
    pub smtp_from: Option<String>,
    /// Where metadata documents are fetched from.
    pub client_metadata_documents: Option<String>,
    /// Extra roots for fetching them.
    pub client_metadata_ca_file: Option<PathBuf>,
    /// Sessions hostname.
    pub sessions_hostname: Option<String>,
    /// Release folder.
    pub release_dir: Option<PathBuf>,
    /// Shutdown grace period.
    pub shutdown_grace: Option<String>,
    /// ACME.
    pub acme: AcmeRaw,
}

impl RawSettings {
    /// `self` (command line and env) over `file`.
    pub fn over(self, file: FileConfig) -> RawSettings {
        RawSettings {
            listen: self.listen.or(file.listen),
            data_dir: self.data_dir.or(file.data_dir),
            database_url: self.database_url.or(file.database_url),
            overlay_cidr: self.overlay_cidr.or(file.overlay_cidr),
            initial_admin_key: self.initial_admin_key.or(file.initial_admin_key),
            database_max_connections: self
                .database_max_connections
                .or(file.database_max_connections),
            enrollment_token_ttl: self.enrollment_token_ttl.or(file.enrollment_token_ttl),
            max_connections: self.max_connections.or(file.max_connections),
            max_handshakes: self.max_handshakes.or(file.max_handshakes),
            secrets_key_file: self.secrets_key_file.or(file.secrets_key_file),
            public_url: self.public_url.or(file.public_url),
            sign_in_per_minute: self.sign_in_per_minute.or(file.sign_in_per_minute),
            session_life: self.session_life.or(file.session_life),
            passcode_attempts_per_minute: self
                .passcode_attempts_per_minute
                .or(file.passcode_attempts_per_minute),
            smtp_url: self.smtp_url.or(file.smtp_url),
            smtp_from: self.smtp_from.or(file.smtp_from),
            client_metadata_documents: self
                .client_metadata_documents
                .or(file.client_metadata_documents),
            client_metadata_ca_file: self
                .client_metadata_ca_file
                .or(file.client_metadata_ca_file),
            sessions_hostname: self.sessions_hostname.or(file.sessions_hostname),
            release_dir: self.release_dir.or(file.release_dir),
            shutdown_grace: self.shutdown_grace.or(file.shutdown_grace),
            acme: self.acme.over(file.acme),
        }
    }

    /// Applies defaults and validates.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let listen_s = self.listen.unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen = listen_s.parse().map_err(|_| ConfigError::Invalid {
            setting: "listen address",
            message: format!("{listen_s:?} is not an IP:port such as 127.0.0.1:3000"),
        })?;
        let data_dir = self.data_dir.unwrap_or_else(|| DEFAULT_DATA_DIR.into());
        let database_url = match self.database_url {
            Some(u) => u,
            None => format!(
                "sqlite://{}?mode=rwc",
                data_dir.join("control.db").display()
            ),
        };
        if Backend::of_url(&database_url).is_none() {
            return Err(ConfigError::Invalid {
                setting: "database URL",
                message: "expected sqlite://FILE or postgres://...".into(),
            });
        }
        let overlay = match self.overlay_cidr {
            Some(c) => c
                .parse()
                .map_err(|e: crate::overlay::BadCidr| ConfigError::Invalid {
                    setting: "overlay CIDR",
                    message: e.to_string(),
                })?,
            None => OverlayNet::DEFAULT,
        };
        if let Some(k) = &self.initial_admin_key {
            if crate::secrets::embedded_id(crate::secrets::ADMIN_KEY_PREFIX, k).is_none() {
                return Err(ConfigError::Invalid {
                    setting: "initial admin key",
                    message: "expected kma_<32 hex digits>_<secret>".into(),
                });
            }
        }
        let database_max_connections = self
            .database_max_connections
            .unwrap_or(DEFAULT_DATABASE_MAX_CONNECTIONS);
        if database_max_connections == 0 {
            return Err(ConfigError::Invalid {
                setting: "database max connections",
                message: "must be at least 1".into(),
            });
        }
        let enrollment_token_ttl = match self.enrollment_token_ttl {
            None => crate::store::DEFAULT_ENROLLMENT_TOKEN_TTL,
            Some(t) => parse_duration(&t).ok_or_else(|| ConfigError::Invalid {
                setting: "enrollment token TTL",
                message: format!(
                    "{t:?} is not a duration such as 24h, 30m or 90s (at least 1s, at most 365d)"
                ),
            })?,
        };
        let positive = |v: Option<usize>, default: usize, setting: &'static str| match v {
            Some(0) => Err(ConfigError::Invalid {
                setting,
                message: "must be at least 1".into(),
            }),
            v => Ok(v.unwrap_or(default)),
        };
        let secrets_key_file = self
            .secrets_key_file
            .unwrap_or_else(|| data_dir.join("secrets.key"));
        let acme = self.acme.validate()?;
        let public_url_set = self.public_url.is_some();
        let public_url = match self.public_url {
            None => format!("http://{listen}"),
            Some(u) => {
                let t = u.trim().trim_end_matches('/');
                let rest = t
                    .strip_prefix("https://")
                    .or_else(|| t.strip_prefix("http://"));
                if rest.is_none_or(|r| r.is_empty() || r.contains(['/', '?', '#', ' '])) {
                    return Err(ConfigError::Invalid {
                        setting: "public URL",
                        message: format!(
                            "{u:?} is not an http(s) origin such as https://control.example.com"
                        ),
                    });
                }
                t.to_owned()
            }
        };
        let sign_in_per_minute = match self.sign_in_per_minute {
            Some(0) => {
                return Err(ConfigError::Invalid {
                    setting: "sign-in attempts per minute",
                    message: "must be at least 1".into(),
                })
            }
            v => v.unwrap_or(DEFAULT_SIGN_IN_PER_MINUTE),
        };
        let session_life = match self.session_life {
            None => Duration::from_millis(crate::store::SESSION_LIFE_MS.unsigned_abs()),
            Some(t) => parse_duration(&t)
                .filter(|d| *d <= Duration::from_secs(90 * 86_400))
                .ok_or_else(|| ConfigError::Invalid {
                    setting: "session life",
                    message: format!(
                        "{t:?} is not a duration such as 8h, 7d or 30m (at least 1s, at most 90d)"
                    ),
                })?,
        };
        let passcode_attempts_per_minute = match self.passcode_attempts_per_minute {
            Some(0) => {
                return Err(ConfigError::Invalid {
                    setting: "passcode attempts per minute",
                    message: "must be at least 1".into(),
                })
            }
            v => v.unwrap_or(crate::visitors::DEFAULT_ATTEMPTS_PER_MINUTE),
        };
        let smtp = match self.smtp_url {
            None => None,
            Some(url) => {
                let from = self.smtp_from.unwrap_or_else(|| {
                    let host = url::Url::parse(&public_url)
                        .ok()
                        .and_then(|u| u.host_str().map(str::to_owned))
                        .filter(|h| h.contains('.'))
                        .unwrap_or_else(|| "kakuremichi.localhost".into());
                    format!("kakuremichi@{host}")
                });
                crate::visitors::Mailer::new(&url, &from).map_err(|e| ConfigError::Invalid {
                    setting: "SMTP relay",
                    message: e.to_string(),
                })?;
                Some((url, from))
            }
        };
        let client_metadata = match self.client_metadata_documents.as_deref() {
            None => crate::client_metadata::Reach::default(),
            Some(r) => r.parse().map_err(|message| ConfigError::Invalid {
                setting: "client metadata documents",
                message,
            })?,
        };
        let client_metadata_roots = match &self.client_metadata_ca_file {
            None => Vec::new(),
            Some(path) => {
                let bad = |message: String| ConfigError::Invalid {
                    setting: "client metadata CA file",
                    message,
                };
                let pem = std::fs::read(path)
                    .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
                let roots = reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| bad(format!("{}: {e}", path.display())))?;
                if roots.is_empty() {
                    return Err(bad(format!("{} holds no certificate", path.display())));
                }
                roots
            }
        };
        let sessions_hostname = match self.sessions_hostname.as_deref() {
            None | Some("") => None,
            Some(h) => {
                Some(
                    crate::validate::hostname(h).map_err(|message| ConfigError::Invalid {
                        setting: "sessions hostname",
                        message,
                    })?,
                )
            }
        };
        if let Some(dir) = &self.release_dir {
            if !dir.is_dir() {
                return Err(ConfigError::Invalid {
                    setting: "release folder",
                    message: format!("{} is not a folder", dir.display()),
                });
            }
        }
        let shutdown_grace = match &self.shutdown_grace {
            None => DEFAULT_SHUTDOWN_GRACE,
            Some(g) => parse_grace(g).ok_or_else(|| ConfigError::Invalid {
                setting: "shutdown grace period",
                message: format!("{g:?} is not 0 to an hour, such as 10, 10s, 500ms or 2m"),
            })?,
        };
        Ok(Settings {
            shutdown_grace,
            public_url_set,
            release_dir: self.release_dir,
            sessions_hostname,
            client_metadata,
            client_metadata_roots,
            public_url,
            sign_in_per_minute,
            session_life,
            passcode_attempts_per_minute,
            smtp,
            secrets_key_file,
            acme,
            listen,
            data_dir,
            database_url,
            overlay,
            initial_admin_key: self.initial_admin_key,
            database_max_connections,
            enrollment_token_ttl,
            max_connections: positive(
                self.max_connections,
                DEFAULT_MAX_CONNECTIONS,
                "max connections",
            )?,
            max_handshakes: positive(
                self.max_handshakes,
                DEFAULT_MAX_HANDSHAKES,
                "max handshakes",
            )?,
        })
    }
}

/// The shutdown grace period when none is given.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A shutdown grace period: whole seconds (`5`) or a number with a unit (`500ms`, `5s`, `2m`,
/// `1h`); from 0 (stop at once) to an hour. The same as the gateway's and the agent's.
pub fn parse_grace(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    (d <= Duration::from_secs(3600)).then_some(d)
}

/// One setting that differs between the settings in force and the file read again on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The key, as the `--config` file spells it.
    pub key: &'static str,
    /// Applied at once; `false`: only at a restart (the old value stays).
    pub live: bool,
}

/// What a SIGHUP changes in a running control (a pure function, as rathole's
/// `calculate_events`): the settings in force and those read again (the command line and the
/// environment still win over the file) become the list of changed keys, and the settings in
/// force afterwards. Only `shutdown_grace` changes live; everything else is bound into the
/// listener, the store, the hub or the certificate tasks at start, so a change is reported
/// (the caller logs a WARN naming it) and the old value kept until a restart.
pub fn reload(running: &RawSettings, file: &RawSettings) -> (Vec<Change>, RawSettings) {
    let mut changes = Vec::new();
    let mut next = running.clone();
    let secret = |s: &Option<Secret>| s.as_ref().map(|s| s.expose().to_owned());
    let show = |v: &dyn std::fmt::Debug| format!("{v:?}");
    let (o, n) = (running, file);
    if o.shutdown_grace != n.shutdown_grace {
        changes.push(Change {
            key: "shutdown_grace",
            live: true,
        });
        next.shutdown_grace = n.shutdown_grace.clone();
    }
    let restart = [
        ("listen", show(&o.listen), show(&n.listen)),
        ("data_dir", show(&o.data_dir), show(&n.data_dir)),
        ("database_url", show(&o.database_url), show(&n.database_url)),
        ("overlay_cidr", show(&o.overlay_cidr), show(&n.overlay_cidr)),
        (
            "initial_admin_key",
            show(&secret(&o.initial_admin_key)),
            show(&secret(&n.initial_admin_key)),
        ),
        (
            "database_max_connections",
            show(&o.database_max_connections),
            show(&n.database_max_connections),
        ),
        (
            "enrollment_token_ttl",
            show(&o.enrollment_token_ttl),
            show(&n.enrollment_token_ttl),
        ),
        (
            "max_connections",
            show(&o.max_connections),
            show(&n.max_connections),
        ),
        (
            "max_handshakes",
            show(&o.max_handshakes),
            show(&n.max_handshakes),
        ),
        (
            "secrets_key_file",
            show(&o.secrets_key_file),
            show(&n.secrets_key_file),
        ),
        ("public_url", show(&o.public_url), show(&n.public_url)),
        (
            "sign_in_per_minute",
            show(&o.sign_in_per_minute),
            show(&n.sign_in_per_minute),
        ),
        ("session_life", show(&o.session_life), show(&n.session_life)),
        (
            "passcode_attempts_per_minute",
            show(&o.passcode_attempts_per_minute),
            show(&n.passcode_attempts_per_minute),
        ),
        (
            "smtp_url",
            show(&secret(&o.smtp_url)),
            show(&secret(&n.smtp_url)),
        ),
        ("smtp_from", show(&o.smtp_from), show(&n.smtp_from)),
        (
            "client_metadata_documents",
            show(&o.client_metadata_documents),
            show(&n.client_metadata_documents),
        ),
        (
            "client_metadata_ca_file",
            show(&o.client_metadata_ca_file),
            show(&n.client_metadata_ca_file),
        ),
        (
            "sessions_hostname",
            show(&o.sessions_hostname),
            show(&n.sessions_hostname),
        ),
        ("release_dir", show(&o.release_dir), show(&n.release_dir)),
        ("acme", show(&o.acme), show(&n.acme)),
    ];
    for (key, old, new) in restart {
        if old != new {
            changes.push(Change { key, live: false });
        }
    }
    (changes, next)
}

/// A duration written as a number and a unit: `90s`, `30m`, `24h`, `7d`; from 1 s to 365 days.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let secs = match unit.trim() {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    (1..=365 * 86_400)
        .contains(&secs)
        .then(|| Duration::from_secs(secs))
}

#[cfg(test)]
mod reload_tests {
    use super::*;

    fn raw(toml: &str) -> RawSettings {
        RawSettings {
            listen: Some("127.0.0.1:3000".into()),
            ..Default::default()
        }
        .over(toml::from_str(toml).unwrap())
    }

    #[test]
    fn the_grace_period_reloads_live_and_the_rest_waits_for_a_restart() {
        let old = raw("shutdown_grace = \"5s\"\nmax_handshakes = 64\n");
        assert_eq!(
            old.clone().validate().unwrap().shutdown_grace,
            Duration::from_secs(5)
        );
        let (none, _) = reload(&old, &old.clone());
        assert!(none.is_empty(), "{none:?}");
        // The command line's listen wins over the file's, so it does not change.
        let new = raw(
            "shutdown_grace = \"1s\"\nmax_handshakes = 8\nlisten = \"0.0.0.0:1\"\n\
             smtp_url = \"smtp://a\"\n[acme]\ndirectory = \"https://x\"\n",
        );
        let (changes, next) = reload(&old, &new);
        let keys: Vec<(&str, bool)> = changes.iter().map(|c| (c.key, c.live)).collect();
        assert_eq!(
            keys,
            [
                ("shutdown_grace", true),
                ("max_handshakes", false),
                ("smtp_url", false),
                ("acme", false)
            ]
        );
        assert_eq!(next.shutdown_grace.as_deref(), Some("1s"));
        assert_eq!(next.max_handshakes, Some(64));
        assert_eq!(next.smtp_url, None);
    }

    #[test]
    fn grace_periods_are_checked() {
        assert_eq!(parse_grace("0"), Some(Duration::ZERO));
        assert_eq!(parse_grace("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grace("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_grace("2m"), Some(Duration::from_secs(120)));
        for bad in ["", "2h", "1.5s", "-1", "soon"] {
            assert_eq!(parse_grace(bad), None, "{bad:?}");
        }
        let err = raw("shutdown_grace = \"a while\"\n")
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("shutdown grace"), "{err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_precedence() {
        let file: FileConfig =
            toml::from_str("listen = \"0.0.0.0:4000\"\noverlay_cidr = \"10.0.0.0/16\"").unwrap();
        let raw = RawSettings {
            listen: Some("127.0.0.1:5000".into()),
            ..Default::default()
        };
        let s = raw.over(file).validate().unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:5000");
        assert_eq!(s.overlay.to_string(), "10.0.0.0/16");
        assert_eq!(s.database_url, "sqlite://./data/control.db?mode=rwc");
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        assert!(toml::from_str::<FileConfig>("lisen = \"x\"").is_err());
        let bad = RawSettings {
            listen: Some("nope".into()),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = RawSettings {
            database_url: Some("mysql://x".into()),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = RawSettings {
            initial_admin_key: Some(Secret::new("short")),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        for ttl in [
            "",
            "24",
            "h",
            "0s",
            "-1h",
            "1y",
            "400d",
            "99999999999999999999d",
        ] {
            let bad = RawSettings {
                enrollment_token_ttl: Some(ttl.into()),
                ..Default::default()
            };
            assert!(bad.validate().is_err(), "{ttl:?} accepted");
        }
        let bad = RawSettings {
            max_handshakes: Some(0),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn durations_and_fleet_defaults() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_duration(" 24h "), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(7 * 86_400)));
        let s = RawSettings::default().validate().unwrap();
        assert_eq!(s.enrollment_token_ttl, Duration::from_secs(86_400));
        assert_eq!(s.database_max_connections, 8);
        assert_eq!(s.max_handshakes, 64);
        let file: FileConfig =
            toml::from_str("enrollment_token_ttl = \"1h\"\nmax_connections = 50").unwrap();
        let s = RawSettings::default().over(file).validate().unwrap();
        assert_eq!(s.enrollment_token_ttl, Duration::from_secs(3600));
        assert_eq!(s.max_connections, 50);
    }

    #[test]
    fn session_life_defaults_to_a_day_and_stays_within_ninety_days() {
        let s = RawSettings::default().validate().unwrap();
        assert_eq!(s.session_life, Duration::from_secs(86_400));
        let file: FileConfig = toml::from_str("session_life = \"8h\"").unwrap();
        let s = RawSettings::default().over(file).validate().unwrap();
        assert_eq!(s.session_life, Duration::from_secs(8 * 3600));
        for bad in ["91d", "0s", "soon"] {
            let raw = RawSettings {
                session_life: Some(bad.into()),
                ..Default::default()
            };
            assert!(raw.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn client_metadata_documents_default_to_public_addresses() {
        use crate::client_metadata::Reach;
        let s = RawSettings::default().validate().unwrap();
        assert_eq!(s.client_metadata, Reach::Public);
        let file: FileConfig = toml::from_str("client_metadata_documents = \"off\"").unwrap();
        let s = RawSettings::default().over(file).validate().unwrap();
        assert_eq!(s.client_metadata, Reach::Off);
        let bad = RawSettings {
            client_metadata_documents: Some("everywhere".into()),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        for path in [empty, dir.path().join("missing.pem")] {
            let bad = RawSettings {
                client_metadata_ca_file: Some(path.clone()),
                ..Default::default()
            };
            assert!(bad.validate().is_err(), "{}", path.display());
        }
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.cert.pem()).unwrap();
        let s = RawSettings {
            client_metadata_ca_file: Some(good),
            ..Default::default()
        }
        .validate()
        .unwrap();
        assert_eq!(s.client_metadata_roots.len(), 1);
    }
}
