//! Enrollment: trading a one-time token for a node credential, and the startup logic both
//! binaries share (use `state.json` if present, else enroll and save it).

use std::path::Path;
use std::time::Duration;

use kakuremichi_proto::{
    EnrollRequest, EnrollResponse, NodeKind, Secret, WgPublicKey, ENROLL_PATH, PROTOCOL_VERSION,
};
use serde::Deserialize;

use crate::state::{ensure_dir, NodeState, PrivateKey, StateError};

/// Enrollment or loading the node state failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The node has no state and no token was given.
    #[error(
        "this node is not enrolled yet ({path} does not exist): start it once with --token \
         (the enrollment token shown when the site or gateway was created)"
    )]
    NoToken {
        /// Where the state was looked for.
        path: String,
    },
    /// Control answered with an error.
    #[error("control refused the enrollment ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Control's message.
        message: String,
    },
    /// Control could not be reached or answered garbage.
    #[error("enrollment request to {url} failed: {error}")]
    Http {
        /// The enrollment URL.
        url: String,
        /// The cause (shown in the message, not chained, so it is printed once).
        error: String,
    },
    /// The state in the data dir is for another kind of node.
    #[error("{path} belongs to a {found}, not a {expected}: use another --data-dir")]
    WrongKind {
        /// The state file.
        path: String,
        /// Kind in the file.
        found: NodeKind,
        /// Kind of this binary.
        expected: NodeKind,
    },
    /// Control enrolled the node as another kind.
    #[error(
        "control enrolled this node as a {0}: the token was issued for the other kind of node"
    )]
    KindMismatch(NodeKind),
    /// The control URL is not http(s).
    #[error("control URL {0:?} must start with http:// or https://")]
    BadUrl(String),
    /// Reading or writing the data dir failed.
    #[error(transparent)]
    State(#[from] StateError),
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// Normalizes a control URL (trims a trailing slash) and checks its scheme.
pub fn normalize_control_url(url: &str) -> Result<String, EnrollError> {
    let trimmed = url.trim().trim_end_matches('/');
    if trimmed.starts_with("http://") || trimmed.starts_with("https://") {
        Ok(trimmed.to_owned())
    } else {
        Err(EnrollError::BadUrl(url.to_owned()))
    }
}

/// `POST {control}/api/v1/enroll`.
pub async fn enroll(
    control_url: &str,
    kind: NodeKind,
    token: &Secret,
    public_key: WgPublicKey,
) -> Result<EnrollResponse, EnrollError> {
    let base = normalize_control_url(control_url)?;
    let url = format!("{base}{ENROLL_PATH}");
    let http = |e: reqwest::Error| {
        let e = e.without_url();
        let mut error = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            error = format!("{error}: {c}");
            cause = c.source();
        }
        EnrollError::Http {
            url: url.clone(),
            error,
        }
    };
    // Redirects are not followed: a 307/308 would resend the token, possibly to plain http:// or
    // another host, past the check of the control URL.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(http)?;
    let request = EnrollRequest {
        protocol_version: PROTOCOL_VERSION,
        kind,
        token: token.clone(),
        public_key,
    };
    let response = client
        .post(&url)
        .json(&request)
        .send()
        .await
        .map_err(http)?;
    let status = response.status();
    if status.is_redirection() {
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .unwrap_or("nowhere")
            .chars()
            .take(300)
            .collect::<String>();
        return Err(EnrollError::Refused {
            status: status.as_u16(),
            message: format!(
                "redirected to {location}: enrollment does not follow redirects, give the URL \
                 control is served at as --control"
            ),
        });
    }
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        let message = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) if !body.error.message.is_empty() => body.error.message,
            Ok(body) => body.error.code,
            Err(_) if text.trim().is_empty() => status.to_string(),
            Err(_) => text.chars().take(300).collect(),
        };
        return Err(EnrollError::Refused {
            status: status.as_u16(),
            message,
        });
    }
    let answer: EnrollResponse = response.json().await.map_err(http)?;
    if answer.kind != kind {
        return Err(EnrollError::KindMismatch(answer.kind));
    }
    Ok(answer)
}

/// The startup logic of both binaries: if `<data_dir>/state.json` exists, use it (the token is
/// ignored); otherwise generate a key, enroll with `token` and save the state.
pub async fn load_or_enroll(
    data_dir: &Path,
    control_url: &str,
    kind: NodeKind,
    token: Option<&Secret>,
) -> Result<NodeState, EnrollError> {
    let control_url = normalize_control_url(control_url)?;
    ensure_dir(data_dir)?;
    let path = NodeState::path(data_dir);
    if let Some(mut state) = NodeState::load(data_dir)? {
        if state.kind != kind {
            return Err(EnrollError::WrongKind {
                path: path.display().to_string(),
                found: state.kind,
                expected: kind,
            });
        }
        if token.is_some() {
            tracing::info!(
                path = %path.display(),
                "already enrolled: ignoring --token"
            );
        }
        if state.control_url != control_url {
            tracing::info!(old = %state.control_url, new = %control_url, "control URL changed");
            state.control_url = control_url;
            state.save(data_dir)?;
        }
        return Ok(state);
    }
    let Some(token) = token else {
        return Err(EnrollError::NoToken {
            path: path.display().to_string(),
        });
    };
    let private_key = PrivateKey::generate();
    let answer = enroll(&control_url, kind, token, private_key.public_key()).await?;
    let state = NodeState {
        node_id: answer.node_id,
        kind,
        credential: answer.credential,
        private_key,
        control_url,
        overlay_address: Some(answer.overlay_address),
    };
    state.save(data_dir)?;
    tracing::info!(node_id = %state.node_id, %kind, overlay = %answer.overlay_address, "enrolled");
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot HTTP server answering `status` and `body`, returning the request it got.
    async fn one_shot(
        status: &'static str,
        body: String,
    ) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 8192];
            let mut got = Vec::new();
            loop {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some(idx) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if got.len() >= idx + 4 + len {
                        break;
                    }
                }
            }
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            s.write_all(resp.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&got).to_string()
        });
        (format!("http://{addr}/"), handle)
    }

    #[tokio::test]
    async fn enrolls_and_saves_state_then_reuses_it() {
        let body = serde_json::json!({
            "node_id": "01234567-89ab-cdef-0123-456789abcdef",
            "kind": "agent",
            "credential": "kmn_cred",
            "overlay_address": "100.64.0.9"
        })
        .to_string();
        let (url, server) = one_shot("200 OK", body).await;
        let dir = tempfile::tempdir().unwrap();
        let token = Secret::new("kme_token");
        let state = load_or_enroll(dir.path(), &url, NodeKind::Agent, Some(&token))
            .await
            .unwrap();
        let request = server.await.unwrap();
        assert!(request.starts_with("POST /api/v1/enroll "), "{request}");
        assert!(request.contains("\"token\":\"kme_token\""));
        assert!(request.contains(&state.private_key.public_key().to_base64()));
        assert_eq!(state.credential.expose(), "kmn_cred");
        assert_eq!(state.overlay_address, Some(Ipv4Addr::new(100, 64, 0, 9)));
        // Second start: no token, no server needed.
        let again = load_or_enroll(dir.path(), &url, NodeKind::Agent, None)
            .await
            .unwrap();
        assert_eq!(again, state);
        // Wrong kind for this data dir.
        let err = load_or_enroll(dir.path(), &url, NodeKind::Gateway, None)
            .await
            .unwrap_err();
        assert!(matches!(err, EnrollError::WrongKind { .. }), "{err}");
    }

    #[tokio::test]
    async fn surfaces_control_error_message() {
        let body = r#"{"error":{"code":"invalid_token","message":"the enrollment token is unknown or was already used"}}"#;
        let (url, _server) = one_shot("401 Unauthorized", body.into()).await;
        let dir = tempfile::tempdir().unwrap();
        let err = load_or_enroll(dir.path(), &url, NodeKind::Gateway, Some(&Secret::new("x")))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "control refused the enrollment (401): the enrollment token is unknown or was already used"
        );
        assert!(NodeState::load(dir.path()).unwrap().is_none());
    }

    #[tokio::test]
    async fn redirects_are_not_followed_with_the_token() {
        let (url, server) = one_shot(
            "307 Temporary Redirect\r\nlocation: http://elsewhere.example/api/v1/enroll",
            String::new(),
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let err = load_or_enroll(
            dir.path(),
            &url,
            NodeKind::Agent,
            Some(&Secret::new("kme_t")),
        )
        .await
        .unwrap_err();
        server.await.unwrap();
        assert!(
            matches!(err, EnrollError::Refused { status: 307, .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("redirected to http://elsewhere.example/api/v1/enroll"),
            "{err}"
        );
        assert!(NodeState::load(dir.path()).unwrap().is_none());
    }

    #[tokio::test]
    async fn no_state_and_no_token_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_or_enroll(dir.path(), "http://127.0.0.1:1", NodeKind::Agent, None)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("start it once with --token"),
            "{err}"
        );
        let err = load_or_enroll(dir.path(), "ftp://x", NodeKind::Agent, None)
            .await
            .unwrap_err();
        assert!(matches!(err, EnrollError::BadUrl(_)));
    }
}
