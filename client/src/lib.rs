//! A client of kakuremichi's agent-sessions API, which is agentapi-proxy's: the gateways'
//! sessions hostname (`https://agents.example.com`) or control's `/api/v1/sessions`. It starts,
//! searches and deletes sessions, talks to a session's agentapi (`/{id}/message`,
//! `/{id}/messages`, `/{id}/status`, `/{id}/events`) and shares it. The `kakuremichi` binary is
//! its CLI (`kakuremichi sessions start|search|rm|open|tail|send|mcp`).

pub mod admin;
pub mod apply;
pub mod mcp;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint answered with an error.
    #[error("{status}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Its `message`.
        message: String,
    },
    /// The endpoint could not be reached, or the connection broke.
    #[error("cannot reach the endpoint: {0}")]
    Transport(#[from] reqwest::Error),
    /// An answer this client cannot read.
    #[error("unexpected answer: {0}")]
    Decode(String),
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
}

/// What `/start` takes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StartRequest {
    /// Environment for the agent process.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, String>,
    /// Tags.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// `message`, `agent_type`, `oneshot`, `session_ttl`.
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub params: serde_json::Map<String, Value>,
    /// `user` or `team`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The team of a team session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub team_id: Option<String>,
    /// The site to run on (kakuremichi's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

/// One session, as `/search` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Session {
    /// Id.
    pub session_id: String,
    /// Status.
    pub status: String,
    /// `user` or `team`.
    #[serde(default)]
    pub scope: String,
    /// Team.
    #[serde(default)]
    pub team_id: String,
    /// Owner.
    #[serde(default)]
    pub user_id: String,
    /// RFC 3339.
    #[serde(default)]
    pub started_at: String,
    /// Tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Why it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One message of a session's conversation.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Message {
    /// Id.
    #[serde(default)]
    pub id: u64,
    /// `user` or `agent`.
    pub role: String,
    /// Text.
    pub content: String,
    /// When.
    #[serde(default)]
    pub time: String,
}

/// A share link.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Share {
    /// The token.
    pub token: String,
    /// `/s/<token>/`, relative to the endpoint.
    pub share_url: String,
    /// RFC 3339, if it expires.
    #[serde(default)]
    pub expires_at: Option<String>,
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// `event:` (empty for the default).
    pub event: String,
    /// `data:` lines, joined by newlines.
    pub data: String,
}

/// A client of one sessions endpoint with one API key.
#[derive(Clone)]
pub struct Client {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of `endpoint` (`https://agents.example.com`, or control's
    /// `https://control.example.com/api/v1/sessions`) with `key` (sent as a bearer token);
    /// `connect_to`: reach the endpoint's host at this address instead of resolving it.
    pub fn new(
        endpoint: &str,
        key: &str,
        connect_to: Option<SocketAddr>,
    ) -> Result<Client, ClientError> {
        let url = reqwest::Url::parse(endpoint)
            .map_err(|e| ClientError::Invalid(format!("endpoint {endpoint:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ClientError::Invalid(format!(
                "endpoint {endpoint:?}: use http:// or https://"
            )));
        }
        if key.trim().is_empty() {
            return Err(ClientError::Invalid("the API key is empty".into()));
        }
        let mut b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none());
        if let (Some(addr), Some(host)) = (connect_to, url.host_str()) {
            b = b.resolve(host, addr);
        }
        Ok(Client {
            base: endpoint.trim_end_matches('/').to_owned(),
            key: key.trim().to_owned(),
            http: b.build()?,
        })
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &str {
        &self.base
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
    }

    async fn json(&self, r: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let resp = r.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
        if !(200..300).contains(&status) {
            let message = v["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| text.trim().to_owned());
            return Err(ClientError::Api { status, message });
        }
        Ok(v)
    }

    /// Starts a session: its id.
    pub async fn start(&self, req: &StartRequest) -> Result<String, ClientError> {
        let v = self
            .json(self.req(reqwest::Method::POST, "/start").json(req))
            .await?;
        v["session_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| ClientError::Decode(format!("no session_id in {v}")))
    }

    /// Sessions matching `query` (`status`, `scope`, `team_id`, `tag.<k>`), newest first.
    pub async fn search(&self, query: &[(String, String)]) -> Result<Vec<Session>, ClientError> {
        let v = self
            .json(self.req(reqwest::Method::GET, "/search").query(query))
            .await?;
        serde_json::from_value(v["sessions"].clone())
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Ends a session.
    pub async fn delete(&self, id: &str) -> Result<(), ClientError> {
        self.json(self.req(reqwest::Method::DELETE, &format!("/sessions/{}", seg(id)?)))
            .await
            .map(|_| ())
    }

    /// Sends a user message to a session's agent.
    pub async fn send(&self, id: &str, content: &str) -> Result<(), ClientError> {
        self.json(
            self.req(reqwest::Method::POST, &format!("/{}/message", seg(id)?))
                .json(&serde_json::json!({"content": content, "type": "user"})),
        )
        .await
        .map(|_| ())
    }

    /// A session's conversation.
    pub async fn messages(&self, id: &str) -> Result<Vec<Message>, ClientError> {
        let v = self
            .json(self.req(reqwest::Method::GET, &format!("/{}/messages", seg(id)?)))
            .await?;
        serde_json::from_value(v["messages"].clone())
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// A session's agent status (`stable` or `running`).
    pub async fn status(&self, id: &str) -> Result<String, ClientError> {
        let v = self
            .json(self.req(reqwest::Method::GET, &format!("/{}/status", seg(id)?)))
            .await?;
        v["status"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| ClientError::Decode(format!("no status in {v}")))
    }

    /// A session's share link (made when it has none).
    pub async fn share(&self, id: &str) -> Result<Share, ClientError> {
        let v = self
            .json(self.req(
                reqwest::Method::POST,
                &format!("/sessions/{}/share", seg(id)?),
            ))
            .await?;
        serde_json::from_value(v).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// The full URL of a path on the endpoint.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A session's events (`/{id}/events`), as they come.
    pub async fn events(
        &self,
        id: &str,
    ) -> Result<impl Stream<Item = Result<SseEvent, ClientError>>, ClientError> {
        let resp = self
            .req(reqwest::Method::GET, &format!("/{}/events", seg(id)?))
            .header("accept", "text/event-stream")
            .send()
            .await?;
        let status = resp.status().as_u16();
        if status != 200 {
            let text = resp.text().await.unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_owned))
                .unwrap_or(text);
            return Err(ClientError::Api { status, message });
        }
        let mut parser = SseParser::default();
        Ok(resp.bytes_stream().flat_map(move |chunk| {
            let out: Vec<Result<SseEvent, ClientError>> = match chunk {
                Ok(bytes) => parser.push(&bytes).into_iter().map(Ok).collect(),
                Err(e) => vec![Err(ClientError::Transport(e))],
            };
            futures_util::stream::iter(out)
        }))
    }
}

/// A session id as one path segment (ids are UUIDs: anything else is refused here).
fn seg(id: &str) -> Result<&str, ClientError> {
    if !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        Ok(id)
    } else {
        Err(ClientError::Invalid(format!("{id:?} is not a session id")))
    }
}

/// Splits a byte stream into server-sent events.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: String,
    current: SseEvent,
}

impl SseParser {
    /// Feeds bytes; the events they completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buf.push_str(&String::from_utf8_lossy(bytes));
        let mut out = Vec::new();
        while let Some(i) = self.buf.find('\n') {
            let line: String = self.buf.drain(..=i).collect();
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.current.data.is_empty() || !self.current.event.is_empty() {
                    out.push(std::mem::take(&mut self.current));
                }
            } else if let Some(v) = line.strip_prefix("data:") {
                if !self.current.data.is_empty() {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(v.strip_prefix(' ').unwrap_or(v));
            } else if let Some(v) = line.strip_prefix("event:") {
                self.current.event = v.trim().to_owned();
            }
            // Comments (`:`), `id:` and `retry:` are not needed here.
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.push(b"event: message_update\ndata: {\"a\"").is_empty());
        let e = p.push(b":1}\n\n: heartbeat\n\ndata: x\r\ndata: y\r\n\r\n");
        assert_eq!(
            e,
            vec![
                SseEvent {
                    event: "message_update".into(),
                    data: "{\"a\":1}".into()
                },
                SseEvent {
                    event: String::new(),
                    data: "x\ny".into()
                },
            ]
        );
    }

    #[test]
    fn bad_arguments_are_refused_before_any_call() {
        assert!(Client::new("ftp://x", "k", None).is_err());
        assert!(Client::new("https://x", " ", None).is_err());
        assert!(seg("../admin").is_err());
        assert!(seg("0c6f-1").is_ok());
    }
}
