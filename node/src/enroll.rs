//! Enrollment: trading a one-time token for a node credential, and the startup logic both
//! binaries share (use `state.json` if present, else enroll and save it).
//!
//! The control URL may be a comma-separated list (several control replicas, see
//! [`crate::control_url`]): enrollment tries them in order, going on to the next one when a replica
//! cannot be reached (cannot connect, timeout, 5xx) and stopping at the first definite answer
//! (enrolled, token refused, redirect…). The whole list is recorded in `state.json`.

use std::path::Path;
use std::time::Duration;

use kakuremichi_proto::{
    EnrollRequest, EnrollResponse, NodeKind, Secret, WgPublicKey, ENROLL_PATH, PROTOCOL_VERSION,
};
use serde::Deserialize;

use crate::control_url::{control_urls, redact_url};
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
    /// The control URL (a member of the list) is not http(s).
    #[error("control URL {0:?} must start with http:// or https://")]
    BadUrl(String),
    /// The list of control URLs holds no URL.
    #[error("no control URL in {0:?}: expected e.g. https://control.example.com")]
    NoUrl(String),
    /// Several control URLs were given and none could be reached: each one's failure (an
    /// [`EnrollError::Http`] or a 5xx [`EnrollError::Refused`]) with its control URL.
    #[error("enrollment failed at every control URL: {}", list_failures(.0))]
    AllFailed(Vec<(String, EnrollError)>),
    /// Reading or writing the data dir failed.
    #[error(transparent)]
    State(#[from] StateError),
}

fn list_failures(failures: &[(String, EnrollError)]) -> String {
    failures
        .iter()
        .map(|(url, error)| match error {
            // Names its URL already.
            EnrollError::Http { .. } => error.to_string(),
            _ => format!("{}: {error}", redact_url(url)),
        })
        .collect::<Vec<_>>()
        .join("; ")
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

/// Normalizes a control URL or a comma-separated list of them (see
/// [`crate::control_url::control_urls`]: white space, trailing slashes and empty members dropped),
/// checks the scheme of each and joins them again with `,`.
pub fn normalize_control_url(url: &str) -> Result<String, EnrollError> {
    let urls = control_urls(url);
    if urls.is_empty() {
        return Err(EnrollError::NoUrl(url.to_owned()));
    }
    if let Some(bad) = urls
        .iter()
        .find(|u| !(u.starts_with("http://") || u.starts_with("https://")))
    {
        return Err(EnrollError::BadUrl(bad.clone()));
    }
    Ok(urls.join(","))
}

/// `POST {control}/api/v1/enroll`, at each URL of the comma-separated list `control_url` in turn
/// until one gives a definite answer: a replica that cannot be reached (no connection, timeout,
/// 5xx) is skipped, anything else (the enrollment, a refused token, a redirect) is the result.
/// When none could be reached: the one failure for a single URL, else
/// [`EnrollError::AllFailed`].
pub async fn enroll(
    control_url: &str,
    kind: NodeKind,
    token: &Secret,
    public_key: WgPublicKey,
) -> Result<EnrollResponse, EnrollError> {
    let bases = control_urls(&normalize_control_url(control_url)?);
    // Redirects are not followed: a 307/308 would resend the token, possibly to plain http:// or
    // another host, past the check of the control URL. A replica that does not answer a
    // connection at all is given up sooner than one that is slow to answer.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| EnrollError::Http {
            url: control_url.to_owned(),
            error: error_chain(e),
        })?;
    let mut failures = Vec::new();
    for (i, base) in bases.iter().enumerate() {
        match enroll_at(&client, base, kind, token, public_key).await {
            Ok(answer) => return Ok(answer),
            Err(Attempt::Definite(error)) => return Err(error),
            Err(Attempt::Unreachable(error)) => {
                if i + 1 < bases.len() {
                    tracing::warn!(
                        url = %redact_url(base),
                        %error,
                        "control cannot be reached; trying the next control URL"
                    );
                }
                failures.push((base.clone(), error));
            }
        }
    }
    match failures.len() {
        1 => Err(failures.remove(0).1),
        _ => Err(EnrollError::AllFailed(failures)),
    }
}

/// How one control URL failed.
enum Attempt {
    /// The replica could not be reached or failed (5xx): another one may do.
    Unreachable(EnrollError),
    /// Control answered: another replica would answer the same (or the token is spent).
    Definite(EnrollError),
}

/// A reqwest error with its causes, without the URL (the caller names it).
fn error_chain(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut error = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        error = format!("{error}: {c}");
        cause = c.source();
    }
    error
}

/// `POST {base}/api/v1/enroll` at one control URL.
async fn enroll_at(
    client: &reqwest::Client,
    base: &str,
    kind: NodeKind,
    token: &Secret,
    public_key: WgPublicKey,
) -> Result<EnrollResponse, Attempt> {
    let url = format!("{base}{ENROLL_PATH}");
    let http = |e: reqwest::Error| EnrollError::Http {
        url: url.clone(),
        error: error_chain(e),
    };
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
        .map_err(|e| Attempt::Unreachable(http(e)))?;
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
        return Err(Attempt::Definite(EnrollError::Refused {
            status: status.as_u16(),
            message: format!(
                "redirected to {location}: enrollment does not follow redirects, give the URL \
                 control is served at as --control"
            ),
        }));
    }
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        let message = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) if !body.error.message.is_empty() => body.error.message,
            Ok(body) => body.error.code,
            Err(_) if text.trim().is_empty() => status.to_string(),
            Err(_) => text.chars().take(300).collect(),
        };
        let error = EnrollError::Refused {
            status: status.as_u16(),
            message,
        };
        // A 5xx is this replica failing (or the proxy in front of it), not control's verdict.
        return Err(if status.is_server_error() {
            Attempt::Unreachable(error)
        } else {
            Attempt::Definite(error)
        });
    }
    // Control took the token: another replica would only say it was used, so an unreadable
    // answer is the error to show.
    let answer: EnrollResponse = response
        .json()
        .await
        .map_err(|e| Attempt::Definite(http(e)))?;
    if answer.kind != kind {
        return Err(Attempt::Definite(EnrollError::KindMismatch(answer.kind)));
    }
    Ok(answer)
}

/// The startup logic of both binaries: if `<data_dir>/state.json` exists, use it (the token is
/// ignored; a changed `control_url` is saved); otherwise generate a key, enroll with `token`
/// (trying each URL of the list, see [`enroll`]) and save the state. `control_url` is one URL or a
/// comma-separated list; the state records it normalized, the whole list.
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
            let redact = |list: &str| {
                control_urls(list)
                    .iter()
                    .map(|u| redact_url(u).into_owned())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            tracing::info!(
                old = %redact(&state.control_url),
                new = %redact(&control_url),
                "control URL changed"
            );
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

    fn enrolled_agent() -> String {
        serde_json::json!({
            "node_id": "01234567-89ab-cdef-0123-456789abcdef",
            "kind": "agent",
            "credential": "kmn_cred",
            "overlay_address": "100.64.0.9"
        })
        .to_string()
    }

    /// A URL on 127.0.0.1 nothing listens at.
    async fn closed_port() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        format!("http://{addr}")
    }

    #[test]
    fn a_list_of_control_urls_is_normalized_member_by_member() {
        assert_eq!(
            normalize_control_url(" https://c1.example.com/ ,, https://c2.example.com// ").unwrap(),
            "https://c1.example.com,https://c2.example.com"
        );
        assert_eq!(
            normalize_control_url("http://127.0.0.1:3000/").unwrap(),
            "http://127.0.0.1:3000"
        );
        let err = normalize_control_url("https://c1.example.com,c2.example.com").unwrap_err();
        assert!(
            matches!(&err, EnrollError::BadUrl(u) if u == "c2.example.com"),
            "{err}"
        );
        let err = normalize_control_url(" , ").unwrap_err();
        assert!(matches!(err, EnrollError::NoUrl(_)), "{err}");
    }

    #[tokio::test]
    async fn enrollment_goes_on_to_the_next_url_when_one_cannot_be_reached() {
        let closed = closed_port().await;
        let (url, server) = one_shot("200 OK", enrolled_agent()).await;
        let dir = tempfile::tempdir().unwrap();
        let list = format!("{closed}, {url}");
        let state = load_or_enroll(
            dir.path(),
            &list,
            NodeKind::Agent,
            Some(&Secret::new("kme_token")),
        )
        .await
        .unwrap();
        let request = server.await.unwrap();
        assert!(request.contains("\"token\":\"kme_token\""), "{request}");
        assert_eq!(state.credential.expose(), "kmn_cred");
        // The whole list is recorded, normalized.
        let expected = format!("{closed},{}", url.trim_end_matches('/'));
        assert_eq!(state.control_url, expected);
        assert_eq!(
            NodeState::load(dir.path()).unwrap().unwrap().control_url,
            expected
        );
    }

    #[tokio::test]
    async fn enrollment_goes_on_to_the_next_url_after_a_5xx() {
        let (failing, first) = one_shot("503 Service Unavailable", "no upstream".into()).await;
        let (url, second) = one_shot("200 OK", enrolled_agent()).await;
        let dir = tempfile::tempdir().unwrap();
        let state = load_or_enroll(
            dir.path(),
            &format!("{failing},{url}"),
            NodeKind::Agent,
            Some(&Secret::new("kme_token")),
        )
        .await
        .unwrap();
        assert!(first.await.unwrap().starts_with("POST /api/v1/enroll "));
        assert!(second.await.unwrap().starts_with("POST /api/v1/enroll "));
        assert_eq!(state.credential.expose(), "kmn_cred");
    }

    #[tokio::test]
    async fn a_refused_token_is_final_and_the_next_url_is_not_tried() {
        let body = r#"{"error":{"code":"invalid_token","message":"the enrollment token is unknown or was already used"}}"#;
        let (refusing, _server) = one_shot("401 Unauthorized", body.into()).await;
        let next = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let next_url = format!("http://{}", next.local_addr().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let err = load_or_enroll(
            dir.path(),
            &format!("{refusing},{next_url}"),
            NodeKind::Agent,
            Some(&Secret::new("kme_token")),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, EnrollError::Refused { status: 401, .. }),
            "{err}"
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(200), next.accept())
                .await
                .is_err(),
            "the second control URL was tried"
        );
        assert!(NodeState::load(dir.path()).unwrap().is_none());
    }

    #[tokio::test]
    async fn every_url_unreachable_names_each_failure() {
        let a = closed_port().await;
        let (b, _server) = one_shot("502 Bad Gateway", String::new()).await;
        let dir = tempfile::tempdir().unwrap();
        let err = load_or_enroll(
            dir.path(),
            &format!("{a},{b}"),
            NodeKind::Agent,
            Some(&Secret::new("kme_token")),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, EnrollError::AllFailed(f) if f.len() == 2),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "enrollment failed at every control URL: enrollment request to {a}/api/v1/enroll \
                 failed: "
            )),
            "{text}"
        );
        assert!(
            text.ends_with(&format!(
                "; {}: control refused the enrollment (502): 502 Bad Gateway",
                b.trim_end_matches('/')
            )),
            "{text}"
        );
        assert!(!text.contains("kme_token"), "{text}");
        assert!(NodeState::load(dir.path()).unwrap().is_none());
        // A single URL keeps its own error.
        let err = load_or_enroll(
            dir.path(),
            &a,
            NodeKind::Agent,
            Some(&Secret::new("kme_token")),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, EnrollError::Http { .. }), "{err}");
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
