//! DNS-01 through RFC 2136: control adds and removes `_acme-challenge` TXT records on an
//! authoritative server that accepts dynamic updates signed with a TSIG key (knot, bind9,
//! PowerDNS, ...). Updates go over TCP.

use std::net::SocketAddr;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use hickory_client::client::{Client, ClientHandle as _};
use hickory_client::proto::dnssec::rdata::tsig::TsigAlgorithm;
use hickory_client::proto::dnssec::tsig::TSigner;
use hickory_client::proto::op::ResponseCode;
use hickory_client::proto::rr::rdata::TXT;
use hickory_client::proto::rr::{Name, RData, Record};
use hickory_client::proto::runtime::TokioRuntimeProvider;
use hickory_client::proto::tcp::TcpClientStream;
use kakuremichi_proto::Secret;

/// Where and how to update DNS.
#[derive(Clone)]
pub struct Rfc2136 {
    /// The authoritative server (`ip:port`).
    pub server: SocketAddr,
    /// The zone to update (its SOA name), e.g. `example.com`.
    pub zone: String,
    /// The TSIG key's name.
    pub key_name: String,
    /// The TSIG key (hmac-sha256), base64.
    pub key_secret: Secret,
}

impl std::fmt::Debug for Rfc2136 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rfc2136")
            .field("server", &self.server)
            .field("zone", &self.zone)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

/// An update failed.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// A setting is unusable.
    #[error("DNS update settings: {0}")]
    Settings(String),
    /// The server could not be reached or answered garbage.
    #[error("DNS update to {server}: {message}")]
    Transport {
        /// The server.
        server: SocketAddr,
        /// What went wrong.
        message: String,
    },
    /// The server refused the update.
    #[error("DNS update of {name} refused by {server}: {code}")]
    Refused {
        /// The server.
        server: SocketAddr,
        /// The record's name.
        name: String,
        /// The response code.
        code: String,
    },
}

/// TTL of challenge records: short, they live for seconds.
const TTL: u32 = 60;

impl Rfc2136 {
    /// Checks the settings (zone and key parse) without contacting the server.
    pub fn validate(&self) -> Result<(), DnsError> {
        self.signer()?;
        Name::from_str(&self.zone).map_err(|e| DnsError::Settings(format!("zone: {e}")))?;
        Ok(())
    }

    fn signer(&self) -> Result<TSigner, DnsError> {
        use base64::Engine as _;
        let key = base64::engine::general_purpose::STANDARD
            .decode(self.key_secret.expose().trim())
            .map_err(|_| DnsError::Settings("the TSIG secret is not base64".into()))?;
        let name = Name::from_str(&self.key_name)
            .map_err(|e| DnsError::Settings(format!("TSIG key name: {e}")))?;
        TSigner::new(key, TsigAlgorithm::HmacSha256, name, 300)
            .map_err(|e| DnsError::Settings(format!("TSIG: {e}")))
    }

    /// Whether `name` lies in the zone.
    pub fn in_zone(&self, name: &str) -> bool {
        let zone = self.zone.trim_end_matches('.').to_ascii_lowercase();
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        name == zone || name.ends_with(&format!(".{zone}"))
    }

    async fn client(&self) -> Result<Client, DnsError> {
        let signer = self.signer()?;
        let (stream, handle) = TcpClientStream::new(
            self.server,
            None,
            Some(Duration::from_secs(5)),
            TokioRuntimeProvider::new(),
        );
        let (client, background) = Client::with_timeout(
            stream,
            handle,
            Duration::from_secs(5),
            Some(Arc::new(signer)),
        )
        .await
        .map_err(|e| self.transport(e))?;
        tokio::spawn(background);
        Ok(client)
    }

    fn transport(&self, e: impl std::fmt::Display) -> DnsError {
        DnsError::Transport {
            server: self.server,
            message: e.to_string(),
        }
    }

    fn record(&self, name: &str, value: &str) -> Result<(Record, Name), DnsError> {
        let fqdn = Name::from_str(&format!("{}.", name.trim_end_matches('.')))
            .map_err(|e| DnsError::Settings(format!("{name}: {e}")))?;
        let zone = Name::from_str(&format!("{}.", self.zone.trim_end_matches('.')))
            .map_err(|e| DnsError::Settings(format!("zone: {e}")))?;
        let record = Record::from_rdata(fqdn, TTL, RData::TXT(TXT::new(vec![value.to_owned()])));
        Ok((record, zone))
    }

    /// Adds a TXT record `value` at `name` (kept beside other values there).
    pub async fn add_txt(&self, name: &str, value: &str) -> Result<(), DnsError> {
        let (record, zone) = self.record(name, value)?;
        let mut client = self.client().await?;
        let response = client
            .append(record, zone, false)
            .await
            .map_err(|e| self.transport(e))?;
        self.check(name, response.response_code())
    }

    /// Removes the TXT record `value` at `name`.
    pub async fn remove_txt(&self, name: &str, value: &str) -> Result<(), DnsError> {
        let (record, zone) = self.record(name, value)?;
        let mut client = self.client().await?;
        let response = client
            .delete_by_rdata(record, zone)
            .await
            .map_err(|e| self.transport(e))?;
        self.check(name, response.response_code())
    }

    fn check(&self, name: &str, code: ResponseCode) -> Result<(), DnsError> {
        if code == ResponseCode::NoError {
            Ok(())
        } else {
            Err(DnsError::Refused {
                server: self.server,
                name: name.to_owned(),
                code: code.to_string(),
            })
        }
    }
}
