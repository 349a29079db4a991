//! The one-line agent install: `GET /install.sh` (a POSIX shell script with control's URL in
//! it) and `GET /download/kakuremichi-agent-linux-<arch>[.sha256]` (the agent binary from the
//! release folder, and its SHA-256), both without sign-in: the enrollment token the script is
//! given is what proves the host may join.

use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::Digest as _;

use crate::{ApiError, AppState};

/// The script, with `__KAKUREMICHI_CONTROL_URL__` where control's URL goes.
const SCRIPT: &str = include_str!("../assets/install.sh");

/// The architectures the script asks for (`uname -m`, normalized).
pub const ARCHES: [&str; 2] = ["x86_64", "aarch64"];

/// `/install.sh` and `/download/...`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/install.sh", get(script))
        .route("/download/{file}", get(download))
}

/// The URL the script fetches from: control's public URL when it was set, else the origin the
/// request came to (so a script fetched at `http://10.0.0.5:3000` fetches from there too).
pub fn control_url(state: &AppState, headers: &HeaderMap) -> String {
    let configured = state.store.public_url();
    if state.public_url_set {
        return configured.to_owned();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        });
    match host {
        Some(h) => format!("http://{h}"),
        None => configured.to_owned(),
    }
}

/// The one-liner for a site's enrollment token.
pub fn command(control: &str, token: &str) -> String {
    format!("curl -fsSL {control}/install.sh | sh -s -- --token {token}")
}

async fn script(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let body = SCRIPT.replace(
        "__KAKUREMICHI_CONTROL_URL__",
        &control_url(&state, &headers),
    );
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/x-shellscript; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response()
}

/// The file serving `kakuremichi-agent-linux-<arch>` in `dir`: that name, or, for this machine's
/// own architecture, a plain `kakuremichi-agent` (control's own release folder).
pub fn agent_binary(dir: &Path, arch: &str) -> Option<PathBuf> {
    release_binary(dir, "kakuremichi-agent", arch)
}

/// `program` (`kakuremichi-agent` or `kakuremichi-gateway`) for `arch` in `dir`: its
/// `-linux-<arch>` file, or the plain one when it is this machine's architecture.
pub fn release_binary(dir: &Path, program: &str, arch: &str) -> Option<PathBuf> {
    if !ARCHES.contains(&arch) || !PROGRAMS.contains(&program) {
        return None;
    }
    let named = dir.join(format!("{program}-linux-{arch}"));
    if named.is_file() {
        return Some(named);
    }
    let plain = dir.join(program);
    (arch == std::env::consts::ARCH && plain.is_file()).then_some(plain)
}

/// The programs control serves from its release folder.
pub const PROGRAMS: [&str; 2] = ["kakuremichi-agent", "kakuremichi-gateway"];

fn release_dir(state: &AppState) -> Option<PathBuf> {
    match &state.release_dir {
        Some(d) => Some(d.as_ref().clone()),
        None => std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf)),
    }
}

async fn download(
    State(state): State<AppState>,
    UrlPath(file): UrlPath<String>,
) -> Result<Response, ApiError> {
    let (name, digest) = match file.strip_suffix(".sha256") {
        Some(n) => (n, true),
        None => (file.as_str(), false),
    };
    let (program, arch) = PROGRAMS
        .iter()
        .find_map(|p| {
            name.strip_prefix(p)
                .and_then(|rest| rest.strip_prefix("-linux-"))
                .map(|arch| (*p, arch))
        })
        .ok_or_else(|| ApiError::NotFound(format!("no download {file}")))?;
    let path = release_dir(&state)
        .and_then(|d| release_binary(&d, program, arch))
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no {program} binary for linux-{arch} in control's release folder (it serves {})",
                ARCHES.join(", ")
            ))
        })?;
    if digest {
        let p = path.clone();
        let hex = tokio::task::spawn_blocking(move || sha256_file(&p))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Internal(format!("reading {}: {e}", path.display())))?;
        return Ok((
            [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"))],
            format!("{hex}  {name}\n"),
        )
            .into_response());
    }
    let f = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::Internal(format!("opening {}: {e}", path.display())))?;
    let len = f
        .metadata()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .len();
    let stream = futures_util::stream::unfold(f, |mut f| async move {
        use tokio::io::AsyncReadExt as _;
        let mut buf = vec![0u8; 256 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binary_is_the_named_one_or_the_plain_one_for_this_architecture() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(agent_binary(dir.path(), "x86_64"), None);
        std::fs::write(dir.path().join("kakuremichi-agent"), b"bin").unwrap();
        let own = std::env::consts::ARCH;
        assert_eq!(
            agent_binary(dir.path(), own),
            ARCHES
                .contains(&own)
                .then(|| dir.path().join("kakuremichi-agent"))
        );
        let other = if own == "aarch64" {
            "x86_64"
        } else {
            "aarch64"
        };
        assert_eq!(agent_binary(dir.path(), other), None);
        std::fs::write(
            dir.path().join(format!("kakuremichi-agent-linux-{other}")),
            b"bin",
        )
        .unwrap();
        assert!(agent_binary(dir.path(), other).is_some());
        assert_eq!(agent_binary(dir.path(), "../../etc/passwd"), None);
        assert_eq!(agent_binary(dir.path(), "riscv64"), None);
        assert_eq!(release_binary(dir.path(), "sh", other), None);
        std::fs::write(
            dir.path()
                .join(format!("kakuremichi-gateway-linux-{other}")),
            b"x",
        )
        .unwrap();
        assert!(release_binary(dir.path(), "kakuremichi-gateway", other).is_some());
    }

    #[test]
    fn the_script_has_its_placeholder_and_the_command_its_token() {
        assert!(SCRIPT.starts_with("#!/bin/sh\n"));
        assert_eq!(SCRIPT.matches("__KAKUREMICHI_CONTROL_URL__").count(), 1);
        assert_eq!(
            command("https://c.example.com", "kmt_x"),
            "curl -fsSL https://c.example.com/install.sh | sh -s -- --token kmt_x"
        );
    }
}
