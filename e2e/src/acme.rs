//! The servers ACME tests run against: Debian's `pebble` (a small ACME CA made for tests) and
//! `knotd` (an authoritative DNS server that takes RFC 2136 updates signed with TSIG).
//!
//! Both run as child [`Proc`]s on loopback with fresh ports, each with its own files in the
//! folder the test gives, and are killed when their handle drops. Knot serves one zone whose
//! every name resolves to 127.0.0.1, so pointing Pebble's resolver at it (`-dnsserver`) makes
//! HTTP-01 and TLS-ALPN-01 validations come back to loopback, and DNS-01 TXT records can be
//! written into it with the TSIG key.
//!
//! ```text
//!  client under test --ACME (HTTPS, api_ca_pem)--> pebble --DNS--> knotd <--RFC 2136 (TSIG)-- client
//!                      <--HTTP-01 :http_port / TLS-ALPN-01 :tls_port (to 127.0.0.1)--
//! ```
//! The tools come from `scripts/setup` (packages `pebble`, `knot`, `knot-dnsutils`); a missing
//! one fails the test with that hint, it never skips it.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use rand::RngCore as _;
use serde_json::{json, Value};

use crate::Proc;

/// Where Debian's `knot` package puts the server.
pub const KNOTD: &str = "/usr/sbin/knotd";
/// Where Debian's `knot-dnsutils` package puts the DNS lookup tool.
pub const KDIG: &str = "/usr/bin/kdig";
/// Where Debian's `knot-dnsutils` package puts the RFC 2136 update tool.
pub const KNSUPDATE: &str = "/usr/bin/knsupdate";
/// Where Debian's `pebble` package puts the test CA.
pub const PEBBLE: &str = "/usr/bin/pebble";

/// The TSIG key name [`start_knot`] gives its update key.
pub const TSIG_NAME: &str = "kakuremichi-acme.";

/// How long a server may take to answer after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Fails with the package to install when `path` is missing.
fn tool(path: &str, package: &str) -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(path);
    if !path.exists() {
        bail!(
            "{} is missing: install Debian's `{package}` package (scripts/setup does)",
            path.display()
        );
    }
    Ok(path)
}

/// A loopback port free for both UDP and TCP (bound then released, like [`crate::free_tcp_port`]).
pub fn free_udp_and_tcp_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let udp = UdpSocket::bind("127.0.0.1:0").context("binding a UDP port on loopback")?;
        let port = udp.local_addr()?.port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("found no loopback port free for both UDP and TCP in 100 tries")
}

/// A running authoritative `knotd` for one zone, killed on drop.
#[derive(Debug)]
pub struct Knot {
    /// Where it answers, over UDP and TCP alike (127.0.0.1).
    pub addr: SocketAddr,
    /// The zone it serves, without the final dot (e.g. `acme.test`).
    pub zone: String,
    /// The TSIG key name, with the final dot ([`TSIG_NAME`]).
    pub tsig_name: String,
    /// The TSIG key's secret (HMAC-SHA256), standard base64 as Knot's and BIND's tools write it.
    pub tsig_secret_b64: String,
    /// The server's process.
    pub proc: Proc,
}

/// Starts `knotd` in the foreground, serving `zone` from files under `dir/knot`.
///
/// The zone holds its SOA, an NS `ns.<zone>`, and `@`, `ns` and `*` A records for 127.0.0.1, so
/// every name under it resolves to loopback. Any name under the zone can be changed by RFC 2136
/// UPDATE signed with the random TSIG key ([`Knot::update`], or any client given
/// `tsig_name`/`tsig_secret_b64`, algorithm hmac-sha256); unsigned or badly signed updates get
/// NOTAUTH. Updates live in the journal under `dir/knot` (the zone file is never rewritten).
///
/// DNS wildcards do not cover names that exist, and that includes empty non-terminals: once
/// `_acme-challenge.x.<zone>` holds a record, `x.<zone>` no longer answers A (NOERROR, no data)
/// until that record is deleted again, which matters to a test mixing DNS-01 with HTTP-01 on one
/// name.
///
/// It runs as the current user (root is fine: no `user:` is set) and returns once the zone's SOA
/// answers.
pub async fn start_knot(dir: &Path, zone: &str) -> anyhow::Result<Knot> {
    let knotd = tool(KNOTD, "knot")?;
    tool(KDIG, "knot-dnsutils")?;
    let zone = zone.trim_end_matches('.').to_string();
    if zone.is_empty() {
        bail!("start_knot needs a zone name");
    }
    let home = dir.join("knot");
    let (run, storage, journal) = (home.join("run"), home.join("storage"), home.join("journal"));
    for d in [&run, &storage, &journal] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }

    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    let tsig_secret_b64 = base64::engine::general_purpose::STANDARD.encode(secret);

    let zone_file = storage.join(format!("{zone}.zone"));
    std::fs::write(
        &zone_file,
        format!(
            "$ORIGIN {zone}.\n\
             $TTL 5\n\
             @ SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 1\n\
             @ NS ns.{zone}.\n\
             @ A 127.0.0.1\n\
             ns A 127.0.0.1\n\
             * A 127.0.0.1\n"
        ),
    )
    .with_context(|| format!("writing {}", zone_file.display()))?;

    let port = free_udp_and_tcp_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let config = home.join("knot.conf");
    std::fs::write(
        &config,
        format!(
            "server:\n\
             \x20   rundir: \"{run}\"\n\
             \x20   pidfile: \"{run}/knot.pid\"\n\
             \x20   listen: 127.0.0.1@{port}\n\
             log:\n\
             \x20 - target: stderr\n\
             \x20   any: info\n\
             database:\n\
             \x20   storage: \"{storage}\"\n\
             \x20   journal-db: \"{journal}\"\n\
             key:\n\
             \x20 - id: {TSIG_NAME}\n\
             \x20   algorithm: hmac-sha256\n\
             \x20   secret: {tsig_secret_b64}\n\
             acl:\n\
             \x20 - id: acme-update\n\
             \x20   key: {TSIG_NAME}\n\
             \x20   action: update\n\
             template:\n\
             \x20 - id: default\n\
             \x20   storage: \"{storage}\"\n\
             \x20   file: \"%s.zone\"\n\
             \x20   zonefile-sync: -1\n\
             \x20   zonefile-load: whole\n\
             \x20   journal-content: changes\n\
             zone:\n\
             \x20 - domain: {zone}.\n\
             \x20   acl: acme-update\n",
            run = run.display(),
            storage = storage.display(),
            journal = journal.display(),
        ),
    )
    .with_context(|| format!("writing {}", config.display()))?;

    let mut proc = Proc::spawn(
        "knotd",
        &knotd,
        &["-c".into(), config.display().to_string()],
        &[],
        None,
        dir.join("knotd.log"),
    )?;

    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if !proc.is_running() {
            bail!("knotd exited while starting\n{}", proc.log_tail(40));
        }
        let soa = tokio::process::Command::new(KDIG)
            .args(kdig_args(addr, &zone, "SOA"))
            .stdin(Stdio::null())
            .output()
            .await
            .context("running kdig")?;
        if soa.status.success() && !String::from_utf8_lossy(&soa.stdout).trim().is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {START_TIMEOUT:?} waiting for knotd to answer {zone} SOA: {}\n{}",
                String::from_utf8_lossy(&soa.stderr).trim(),
                proc.log_tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    Ok(Knot {
        addr,
        zone,
        tsig_name: TSIG_NAME.to_string(),
        tsig_secret_b64,
        proc,
    })
}

/// `kdig` arguments for a short answer to `name type` from the server at `addr`.
fn kdig_args(addr: SocketAddr, name: &str, rtype: &str) -> Vec<String> {
    vec![
        format!("@{}", addr.ip()),
        "-p".into(),
        addr.port().to_string(),
        "+short".into(),
        "+timeout=1".into(),
        "+retry=2".into(),
        name.to_string(),
        rtype.to_string(),
    ]
}

impl Knot {
    /// The TXT records at `name` (e.g. `_acme-challenge.x.acme.test`), one string per record
    /// (a record's character-strings joined), as the server answers right now; empty when there
    /// are none. For assertions.
    ///
    /// # Panics
    /// When `kdig` cannot ask (see [`Knot::try_txt`]), so that an assertion that no record is
    /// left cannot pass because nothing was asked.
    pub fn txt(&self, name: &str) -> Vec<String> {
        match self.try_txt(name) {
            Ok(records) => records,
            Err(e) => panic!("reading TXT {name}: {e:#}\n{}", self.proc.log_tail(20)),
        }
    }

    /// The TXT records at `name`, or why `kdig` could not get them. An answer other than
    /// NOERROR or NXDOMAIN (REFUSED for a name outside the zone, say) is an error, not "none".
    pub fn try_txt(&self, name: &str) -> anyhow::Result<Vec<String>> {
        let out = Command::new(KDIG)
            .args([
                format!("@{}", self.addr.ip()),
                "-p".into(),
                self.addr.port().to_string(),
                "+timeout=1".into(),
                "+retry=2".into(),
                name.to_string(),
                "TXT".into(),
            ])
            .stdin(Stdio::null())
            .output()
            .context("running kdig")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let status = stdout
            .lines()
            .find_map(|l| l.split("status: ").nth(1))
            .and_then(|rest| rest.split(';').next());
        if !out.status.success() || !matches!(status, Some("NOERROR" | "NXDOMAIN")) {
            bail!(
                "kdig TXT {name} failed: {}{}",
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        parse_txt_answer(&stdout)
    }

    /// Sends one RFC 2136 UPDATE signed with the TSIG key, through `knsupdate`. `commands` are
    /// knsupdate lines such as `update add _acme-challenge.x.acme.test. 60 TXT "token"` or
    /// `update delete _acme-challenge.x.acme.test. TXT`; the server, zone, key and `send` are
    /// added. Fails unless the server answers NOERROR.
    pub fn update(&self, commands: &str) -> anyhow::Result<()> {
        tool(KNSUPDATE, "knot-dnsutils")?;
        let script = format!(
            "server {} {}\nzone {}.\nkey hmac-sha256:{} {}\n{}\nsend\nanswer\n",
            self.addr.ip(),
            self.addr.port(),
            self.zone,
            self.tsig_name,
            self.tsig_secret_b64,
            commands.trim_end()
        );
        let mut child = Command::new(KNSUPDATE)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting knsupdate")?;
        child
            .stdin
            .take()
            .context("knsupdate's stdin")?
            .write_all(script.as_bytes())
            .context("writing to knsupdate")?;
        let out = child.wait_with_output().context("waiting for knsupdate")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !stdout.contains("status: NOERROR") {
            bail!(
                "knsupdate failed ({}): {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                stdout.trim()
            );
        }
        Ok(())
    }
}

/// The TXT records in the ANSWER SECTION of `kdig`'s full output (owner, TTL, class, type,
/// data on each line), each as [`parse_txt_rdata`] reads it.
fn parse_txt_answer(output: &str) -> anyhow::Result<Vec<String>> {
    let mut records = Vec::new();
    let mut in_answer = false;
    for line in output.lines() {
        if line.starts_with(";;") {
            in_answer = line.starts_with(";; ANSWER SECTION:");
            continue;
        }
        if !in_answer || line.trim().is_empty() {
            continue;
        }
        let mut rest = line;
        let mut fields = Vec::with_capacity(4);
        for _ in 0..4 {
            rest = rest.trim_start();
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            fields.push(&rest[..end]);
            rest = &rest[end..];
        }
        if fields[3] == "TXT" {
            records.push(parse_txt_rdata(rest)?);
        }
    }
    Ok(records)
}

/// One TXT record's data as `kdig` prints it (`"part one" "part two"`), its strings joined.
fn parse_txt_rdata(line: &str) -> anyhow::Result<String> {
    let mut out = Vec::new();
    let mut chars = line.trim().bytes().peekable();
    while let Some(c) = chars.next() {
        match c {
            b'"' => loop {
                match chars.next() {
                    Some(b'"') => break,
                    Some(b'\\') => {
                        let digits: Vec<u8> =
                            std::iter::from_fn(|| chars.next_if(|d| d.is_ascii_digit()))
                                .take(3)
                                .collect();
                        if digits.is_empty() {
                            out.push(chars.next().context("TXT ends inside an escape")?);
                        } else {
                            let n: u8 = std::str::from_utf8(&digits)?
                                .parse()
                                .context("bad \\DDD escape in TXT")?;
                            out.push(n);
                        }
                    }
                    Some(b) => out.push(b),
                    None => bail!("unterminated string in TXT answer {line:?}"),
                }
            },
            b' ' | b'\t' => {}
            other => out.push(other),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// What [`start_pebble`] needs.
#[derive(Debug, Clone)]
pub struct PebbleOptions {
    /// The port Pebble's VA connects to for HTTP-01 (on whatever the name resolves to).
    pub http_port: u16,
    /// The port Pebble's VA connects to for TLS-ALPN-01.
    pub tls_port: u16,
    /// The DNS server Pebble resolves every name with, and reads DNS-01 TXT records from
    /// (usually [`Knot::addr`]).
    pub dns: SocketAddr,
    /// The lifetime of issued certificates in seconds (`certificateValidityPeriod`; Pebble's
    /// default of five years when `None`). Pebble 2.4.0 honours it: notAfter is notBefore plus
    /// this many seconds less one.
    pub validity_secs: Option<u64>,
}

/// A running Pebble ACME CA, killed on drop.
#[derive(Debug)]
pub struct Pebble {
    /// The ACME directory, `https://127.0.0.1:PORT/dir`.
    pub directory_url: String,
    /// The management API, `https://127.0.0.1:PORT` (roots, intermediates, certificate status).
    pub management_url: String,
    /// The CA (PEM) that signed Pebble's own HTTPS certificate for its ACME and management APIs:
    /// what an ACME client must trust to talk to Pebble. It is not the CA of issued certificates
    /// (see [`Pebble::issuing_roots_pem`]).
    pub api_ca_pem: String,
    /// The same CA as a file.
    pub api_ca_file: PathBuf,
    /// The server's process.
    pub proc: Proc,
    http: reqwest::Client,
}

/// Starts Pebble under `dir/pebble` with a fresh API certificate and returns once its directory
/// answers over HTTPS.
///
/// It runs with `-config FILE -dnsserver DNS -strict=false`, `PEBBLE_VA_NOSLEEP=1` (validations
/// start at once), `PEBBLE_WFE_NONCEREJECT=0` (no nonce is rejected at random),
/// `PEBBLE_AUTHZREUSE=0` (every order gets fresh authorizations to solve), and with
/// `PEBBLE_VA_ALWAYS_VALID`, `PEBBLE_CHAIN_LENGTH` and `PEBBLE_ALTERNATE_ROOTS` removed from its
/// environment, so challenges are really validated and the chain is root, one intermediate,
/// leaf. Pebble makes a new root and intermediate on every start; nothing is kept.
pub async fn start_pebble(dir: &Path, opts: PebbleOptions) -> anyhow::Result<Pebble> {
    let pebble = tool(PEBBLE, "pebble")?;
    let home = dir.join("pebble");
    std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;

    let api = api_certificate().context("making Pebble's API certificate")?;
    let api_ca_file = home.join("api-ca.pem");
    let cert_file = home.join("api-cert.pem");
    let key_file = home.join("api-key.pem");
    for (path, text) in [
        (&api_ca_file, &api.ca_pem),
        (&cert_file, &api.cert_pem),
        (&key_file, &api.key_pem),
    ] {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }

    let acme_port = crate::free_tcp_port();
    let mgmt_port = crate::free_tcp_port();
    let mut settings = json!({
        "listenAddress": format!("127.0.0.1:{acme_port}"),
        "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
        "certificate": cert_file.display().to_string(),
        "privateKey": key_file.display().to_string(),
        "httpPort": opts.http_port,
        "tlsPort": opts.tls_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": false,
    });
    if let Some(secs) = opts.validity_secs {
        settings["certificateValidityPeriod"] = json!(secs);
    }
    let config = home.join("pebble-config.json");
    std::fs::write(
        &config,
        serde_json::to_vec_pretty(&json!({ "pebble": settings }))?,
    )
    .with_context(|| format!("writing {}", config.display()))?;

    // Through env(1): Proc::spawn inherits the harness's environment and can only add to it.
    let mut args: Vec<String> = Vec::new();
    for var in [
        "PEBBLE_VA_ALWAYS_VALID",
        "PEBBLE_CHAIN_LENGTH",
        "PEBBLE_ALTERNATE_ROOTS",
    ] {
        args.extend(["-u".into(), var.into()]);
    }
    args.extend([
        pebble.display().to_string(),
        "-config".into(),
        config.display().to_string(),
        "-dnsserver".into(),
        opts.dns.to_string(),
        "-strict=false".into(),
    ]);
    let mut proc = Proc::spawn(
        "pebble",
        Path::new("/usr/bin/env"),
        &args,
        &[
            ("PEBBLE_VA_NOSLEEP", "1".into()),
            ("PEBBLE_WFE_NONCEREJECT", "0".into()),
            ("PEBBLE_AUTHZREUSE", "0".into()),
        ],
        None,
        dir.join("pebble.log"),
    )?;

    let http = reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(api.ca_pem.as_bytes())
                .context("loading Pebble's API CA")?,
        )
        .timeout(Duration::from_secs(10))
        .build()
        .context("building an HTTPS client for Pebble")?;
    let directory_url = format!("https://127.0.0.1:{acme_port}/dir");

    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if !proc.is_running() {
            bail!("pebble exited while starting\n{}", proc.log_tail(40));
        }
        let err = match get_json(&http, &directory_url).await {
            Ok(dir) if dir.get("newOrder").is_some() => break,
            Ok(dir) => anyhow::anyhow!("directory without newOrder: {dir}"),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            bail!(
                "timed out after {START_TIMEOUT:?} waiting for Pebble's directory: {err:#}\n{}",
                proc.log_tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    Ok(Pebble {
        directory_url,
        management_url: format!("https://127.0.0.1:{mgmt_port}"),
        api_ca_pem: api.ca_pem,
        api_ca_file,
        proc,
        http,
    })
}

impl Pebble {
    /// An HTTPS client that trusts Pebble's API certificate (and nothing else).
    pub fn http_client(&self) -> &reqwest::Client {
        &self.http
    }

    /// The ACME directory as JSON.
    pub async fn directory(&self) -> anyhow::Result<Value> {
        get_json(&self.http, &self.directory_url).await
    }

    /// The root (PEM) that certificates Pebble issues chain to, from the management API's
    /// `/roots/0`: what a client needs to trust to verify them. Pebble sends the intermediate
    /// with every certificate, so a verifier needs only this root; the intermediate is left out on
    /// purpose so a server that forgets to send its chain fails verification.
    pub async fn issuing_roots_pem(&self) -> anyhow::Result<String> {
        self.management_pem("/roots/0").await
    }

    /// The intermediate (PEM) that signs issued certificates, from `/intermediates/0`.
    pub async fn issuing_intermediate_pem(&self) -> anyhow::Result<String> {
        self.management_pem("/intermediates/0").await
    }

    async fn management_pem(&self, path: &str) -> anyhow::Result<String> {
        let url = format!("{}{path}", self.management_url);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = resp.status();
        let text = resp.text().await.with_context(|| format!("GET {url}"))?;
        if !status.is_success() || !text.contains("-----BEGIN CERTIFICATE-----") {
            bail!("GET {url}: {status}: {text}");
        }
        Ok(text)
    }
}

async fn get_json(http: &reqwest::Client, url: &str) -> anyhow::Result<Value> {
    let resp = http
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        bail!("GET {url}: {status}");
    }
    resp.json().await.with_context(|| format!("GET {url}"))
}

/// A self-signed CA and a certificate for 127.0.0.1 and localhost signed by it, as PEM.
pub struct ApiCertificate {
    /// The CA's certificate.
    pub ca_pem: String,
    /// The server's certificate.
    pub cert_pem: String,
    /// The server's key.
    pub key_pem: String,
}

impl std::fmt::Debug for ApiCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiCertificate")
            .field("ca_pem", &self.ca_pem)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A new CA and a server certificate for 127.0.0.1 and localhost signed by it.
pub fn api_certificate() -> anyhow::Result<ApiCertificate> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "kakuremichi e2e Pebble API CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert_pem = leaf.signed_by(&key, &issuer)?.pem();
    Ok(ApiCertificate {
        ca_pem,
        cert_pem,
        key_pem: key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_answers_are_unquoted_and_joined() {
        assert_eq!(parse_txt_rdata("\"abc-_123\"").unwrap(), "abc-_123");
        assert_eq!(parse_txt_rdata("\"part \" \"two\"").unwrap(), "part two");
        assert_eq!(parse_txt_rdata(r#""a\"b\\c\065""#).unwrap(), "a\"b\\cA");
        assert!(parse_txt_rdata("\"open").is_err());
    }

    #[test]
    fn only_answer_section_txt_records_count() {
        let out = ";; ->>HEADER<<- opcode: QUERY; status: NOERROR; id: 14227\n\
                   ;; QUESTION SECTION:\n\
                   ;; a.acme.test.\t\tIN\tTXT\n\
                   \n\
                   ;; ANSWER SECTION:\n\
                   a.acme.test.\t60\tIN\tCNAME\tb.acme.test.\n\
                   b.acme.test.\t60\tIN\tTXT\t\"one\"\n\
                   b.acme.test.\t60\tIN\tTXT\t\"tw\" \"o\"\n\
                   \n\
                   ;; Received 69 B\n";
        assert_eq!(parse_txt_answer(out).unwrap(), vec!["one", "two"]);
        assert!(parse_txt_answer(";; ANSWER SECTION:\n").unwrap().is_empty());
    }
}
