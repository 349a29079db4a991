//! MCP for agent sessions: the tools `list_sessions`, `create_session`, `send_message`,
//! `get_messages`, `delete_session`, answered by [`handle`] over anything that implements
//! [`Sessions`]. Two transports use it: a local server over stdio (JSON-RPC 2.0, one message per
//! line) that an MCP client (Claude Desktop, an IDE) runs as `kakuremichi sessions mcp`, with a
//! [`Client`]; and the gateways' `POST /mcp` on the sessions hostname (streamable HTTP).

use std::future::Future;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

use crate::{Client, ClientError, Message, Session, StartRequest};

/// What the tools need: the sessions API as one user sees it.
pub trait Sessions: Sync {
    /// `/search`.
    fn search(
        &self,
        query: &[(String, String)],
    ) -> impl Future<Output = Result<Vec<Session>, ClientError>> + Send;
    /// `/start`: the new session's id.
    fn start(&self, req: &StartRequest)
        -> impl Future<Output = Result<String, ClientError>> + Send;
    /// `POST /{id}/message`.
    fn send(&self, id: &str, content: &str)
        -> impl Future<Output = Result<(), ClientError>> + Send;
    /// `GET /{id}/messages`.
    fn messages(&self, id: &str) -> impl Future<Output = Result<Vec<Message>, ClientError>> + Send;
    /// `DELETE /sessions/{id}`.
    fn delete(&self, id: &str) -> impl Future<Output = Result<(), ClientError>> + Send;
}

impl Sessions for Client {
    fn search(
        &self,
        query: &[(String, String)],
    ) -> impl Future<Output = Result<Vec<Session>, ClientError>> + Send {
        Client::search(self, query)
    }
    fn start(
        &self,
        req: &StartRequest,
    ) -> impl Future<Output = Result<String, ClientError>> + Send {
        Client::start(self, req)
    }
    fn send(
        &self,
        id: &str,
        content: &str,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        Client::send(self, id, content)
    }
    fn messages(&self, id: &str) -> impl Future<Output = Result<Vec<Message>, ClientError>> + Send {
        Client::messages(self, id)
    }
    fn delete(&self, id: &str) -> impl Future<Output = Result<(), ClientError>> + Send {
        Client::delete(self, id)
    }
}

/// The protocol version this server speaks.
pub const PROTOCOL_VERSION: &str = "2025-06-18";

/// The tools, as `tools/list` shows them.
pub fn tools() -> Value {
    let id = json!({"type": "string", "description": "The session's id"});
    json!([
        {
            "name": "list_sessions",
            "description": "List agent sessions (newest first), optionally by status or tags.",
            "inputSchema": {"type": "object", "properties": {
                "status": {"type": "string", "description": "creating, starting, active, running, stopped or failed"},
                "tags": {"type": "object", "additionalProperties": {"type": "string"}}
            }}
        },
        {
            "name": "create_session",
            "description": "Start an agent session on an edge agent; returns its id.",
            "inputSchema": {"type": "object", "properties": {
                "message": {"type": "string", "description": "A first message for the agent"},
                "tags": {"type": "object", "additionalProperties": {"type": "string"}},
                "environment": {"type": "object", "additionalProperties": {"type": "string"}},
                "site": {"type": "string", "description": "The site (agent) to run on"},
                "team_id": {"type": "string", "description": "Start a team session for this team"}
            }}
        },
        {
            "name": "send_message",
            "description": "Send a message to a session's agent.",
            "inputSchema": {"type": "object", "properties": {"session_id": id, "message": {"type": "string"}}, "required": ["session_id", "message"]}
        },
        {
            "name": "get_messages",
            "description": "A session's conversation.",
            "inputSchema": {"type": "object", "properties": {"session_id": id}, "required": ["session_id"]}
        },
        {
            "name": "delete_session",
            "description": "End a session.",
            "inputSchema": {"type": "object", "properties": {"session_id": id}, "required": ["session_id"]}
        }
    ])
}

fn strings(v: &Value) -> std::collections::BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

fn arg<'a>(args: &'a Value, name: &str) -> Result<&'a str, ClientError> {
    args[name]
        .as_str()
        .ok_or_else(|| ClientError::Invalid(format!("{name} is required (a string)")))
}

/// Runs one tool: its result as JSON text.
pub async fn call<S: Sessions>(client: &S, name: &str, args: &Value) -> Result<Value, ClientError> {
    match name {
        "list_sessions" => {
            let mut q: Vec<(String, String)> = Vec::new();
            if let Some(s) = args["status"].as_str() {
                q.push(("status".into(), s.into()));
            }
            for (k, v) in strings(&args["tags"]) {
                q.push((format!("tag.{k}"), v));
            }
            Ok(json!({"sessions": client.search(&q).await?}))
        }
        "create_session" => {
            let mut req = StartRequest {
                environment: strings(&args["environment"]),
                tags: strings(&args["tags"]),
                site: args["site"].as_str().map(str::to_owned),
                ..Default::default()
            };
            if let Some(m) = args["message"].as_str() {
                req.params.insert("message".into(), json!(m));
            }
            if let Some(t) = args["team_id"].as_str() {
                req.scope = Some("team".into());
                req.team_id = Some(t.into());
            }
            Ok(json!({"session_id": client.start(&req).await?}))
        }
        "send_message" => {
            client
                .send(arg(args, "session_id")?, arg(args, "message")?)
                .await?;
            Ok(json!({"ok": true}))
        }
        "get_messages" => Ok(json!({"messages": client.messages(arg(args, "session_id")?).await?})),
        "delete_session" => {
            client.delete(arg(args, "session_id")?).await?;
            Ok(json!({"ok": true}))
        }
        other => Err(ClientError::Invalid(format!("unknown tool {other:?}"))),
    }
}

/// Answers one JSON-RPC message; `None` for a notification.
pub async fn handle<S: Sessions>(client: &S, msg: &Value) -> Option<Value> {
    let id = msg.get("id").cloned()?;
    let method = msg["method"].as_str().unwrap_or("");
    let result = match method {
        "initialize" => json!({
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {"tools": {"listChanged": false}},
            "serverInfo": {"name": "kakuremichi-sessions", "version": env!("CARGO_PKG_VERSION")},
        }),
        "ping" => json!({}),
        "tools/list" => json!({"tools": tools()}),
        "tools/call" => {
            let name = msg["params"]["name"].as_str().unwrap_or("");
            let args = msg["params"]
                .get("arguments")
                .cloned()
                .unwrap_or_else(|| json!({}));
            match call(client, name, &args).await {
                Ok(v) => {
                    json!({"content": [{"type": "text", "text": v.to_string()}], "structuredContent": v, "isError": false})
                }
                Err(e) => {
                    json!({"content": [{"type": "text", "text": e.to_string()}], "isError": true})
                }
            }
        }
        other => {
            return Some(
                json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": format!("method not found: {other}")}}),
            )
        }
    };
    Some(json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

/// Serves MCP on stdin and stdout until stdin ends.
pub async fn serve_stdio(client: Client) -> std::io::Result<()> {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<Value>(&line) {
            Ok(msg) => handle(&client, &msg).await,
            Err(e) => Some(
                json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": format!("parse error: {e}")}}),
            ),
        };
        if let Some(a) = answer {
            out.write_all(format!("{a}\n").as_bytes()).await?;
            out.flush().await?;
        }
    }
    Ok(())
}
