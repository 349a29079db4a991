//! `/resources`: public hostnames (HTTP) or public ports on every gateway (TCP) forwarded to
//! private targets through a site.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use kakuremichi_proto::RouteProtocol;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{invalid, valid_opt, ApiJson, ApiPath};
use crate::store::{NewResource, Resource, ResourcePatch};
use crate::{validate, ApiError, AppState};

/// Body of `POST /resources`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateResource {
    /// Display name; defaults to the hostname (HTTP) or `tcp-<port>` (TCP).
    pub name: Option<String>,
    /// `http` (default), `tcp` or `udp`.
    #[serde(default)]
    pub protocol: Option<RouteProtocol>,
    /// HTTP: public hostname (lower-cased). TCP: must be absent.
    pub hostname: Option<String>,
    /// TCP: the port every gateway listens on (1-65535); absent: the lowest free from 20000.
    pub public_port: Option<u16>,
    /// HTTP: answer plain-HTTP requests with a 308 to HTTPS (default false).
    pub redirect_https: Option<bool>,
    /// HTTP: send `Strict-Transport-Security: max-age=<this>` over HTTPS (0 to 63072000).
    pub hsts_max_age: Option<u32>,
    /// The site whose agent reaches the target.
    pub site_id: Uuid,
    /// Private target, `host:port`.
    pub target: String,
}

/// Body of `PATCH /resources/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateResource {
    /// New name.
    pub name: Option<String>,
    /// New hostname (HTTP).
    pub hostname: Option<String>,
    /// New public port (TCP).
    pub public_port: Option<u16>,
    /// Redirect plain HTTP to HTTPS (HTTP).
    pub redirect_https: Option<bool>,
    /// New HSTS max-age; `null` turns HSTS off (HTTP).
    #[serde(default, deserialize_with = "present")]
    pub hsts_max_age: Option<Option<u32>>,
    /// New site (the resource gets a new overlay port there).
    pub site_id: Option<Uuid>,
    /// New target.
    pub target: Option<String>,
}

/// A resource as the API shows it.
#[derive(Debug, Serialize)]
pub struct ResourceView {
    /// Id.
    pub id: Uuid,
    /// Display name.
    pub name: String,
    /// `http` or `tcp`.
    pub protocol: RouteProtocol,
    /// HTTP: public hostname.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// TCP: the port every gateway listens on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_port: Option<u16>,
    /// HTTP: plain HTTP is redirected to HTTPS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect_https: Option<bool>,
    /// HTTP: HSTS max-age, if sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hsts_max_age: Option<u32>,
    /// The site.
    pub site_id: Uuid,
    /// Private target.
    pub target: String,
    /// Port on the site's overlay address leading to the target.
    pub overlay_port: u16,
    /// Creation time (unix ms).
    pub created_at: i64,
}

impl From<Resource> for ResourceView {
    fn from(r: Resource) -> Self {
        Self {
            id: r.id,
            name: r.name,
            protocol: r.protocol,
            hostname: (r.protocol == RouteProtocol::Http).then_some(r.hostname),
            public_port: r.public_port,
            redirect_https: (r.protocol == RouteProtocol::Http).then_some(r.redirect_https),
            hsts_max_age: r.hsts_max_age,
            site_id: r.site_id,
            target: r.target,
            overlay_port: r.overlay_port,
            created_at: r.created_at,
        }
    }
}

/// The resources router.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/resources", get(list).post(create))
        .route("/resources/{id}", get(one).patch(update).delete(remove))
}

async fn create(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CreateResource>,
) -> Result<(StatusCode, ApiJson<ResourceView>), ApiError> {
    let protocol = body.protocol.unwrap_or(RouteProtocol::Http);
    let (hostname, public_port, default_name) = match protocol {
        RouteProtocol::Http => {
            if body.public_port.is_some() {
                return Err(invalid(
                    "public_port is for TCP resources; an HTTP resource has a hostname".into(),
                ));
            }
            let raw = body
                .hostname
                .as_deref()
                .ok_or_else(|| invalid("hostname is required for an HTTP resource".into()))?;
            let h = validate::hostname(raw).map_err(invalid)?;
            (h.clone(), None, h)
        }
        RouteProtocol::Tcp | RouteProtocol::Udp => {
            if body.hostname.is_some() {
                return Err(invalid(
                    "a TCP or UDP resource has no hostname: it is reached at public_port on \
                     every gateway"
                        .into(),
                ));
            }
            if body.redirect_https.is_some() || body.hsts_max_age.is_some() {
                return Err(invalid(
                    "redirect_https and hsts_max_age are for HTTP resources".into(),
                ));
            }
            if body.public_port == Some(0) {
                return Err(invalid("public_port must be from 1 to 65535".into()));
            }
            (String::new(), body.public_port, String::new())
        }
    };
    let name = match body.name.as_deref() {
        Some(n) => validate::name(n).map_err(invalid)?,
        None if protocol != RouteProtocol::Http => String::new(),
        None => validate::name(&default_name).map_err(invalid)?,
    };
    let target = validate::host_port(&body.target, "target").map_err(invalid)?;
    check_hsts(body.hsts_max_age)?;
    let mut r = state
        .store
        .create_resource(&NewResource {
            name: name.clone(),
            protocol,
            hostname,
            public_port,
            redirect_https: body.redirect_https.unwrap_or(false),
            hsts_max_age: body.hsts_max_age,
            site_id: body.site_id,
            target,
        })
        .await?;
    if name.is_empty() {
        // A TCP resource's default name is its port, known once allocated.
        let port = r.public_port.unwrap_or_default();
        r = state
            .store
            .update_resource(
                r.id,
                &ResourcePatch {
                    name: Some(if protocol == RouteProtocol::Udp {
                        format!("udp-{port}")
                    } else {
                        format!("tcp-{port}")
                    }),
                    ..Default::default()
                },
            )
            .await?;
    }
    tracing::info!(resource_id = %r.id, site_id = %r.site_id, "resource created");
    Ok((StatusCode::CREATED, ApiJson(r.into())))
}

async fn list(State(state): State<AppState>) -> Result<ApiJson<Vec<ResourceView>>, ApiError> {
    let all = state.store.list_resources().await?;
    Ok(ApiJson(all.into_iter().map(Into::into).collect()))
}

async fn one(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiJson<ResourceView>, ApiError> {
    Ok(ApiJson(state.store.get_resource(id).await?.into()))
}

async fn update(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<UpdateResource>,
) -> Result<ApiJson<ResourceView>, ApiError> {
    let patch = ResourcePatch {
        name: valid_opt(body.name.as_deref(), validate::name)?,
        hostname: valid_opt(body.hostname.as_deref(), validate::hostname)?,
        public_port: match body.public_port {
            Some(0) => return Err(invalid("public_port must be from 1 to 65535".into())),
            p => p,
        },
        redirect_https: body.redirect_https,
        hsts_max_age: {
            check_hsts(body.hsts_max_age.flatten())?;
            body.hsts_max_age
        },
        site_id: body.site_id,
        target: valid_opt(body.target.as_deref(), |t| validate::host_port(t, "target"))?,
    };
    Ok(ApiJson(
        state.store.update_resource(id, &patch).await?.into(),
    ))
}

async fn remove(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    state.store.delete_resource(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The longest HSTS max-age accepted: two years.
pub const MAX_HSTS_MAX_AGE: u32 = 63_072_000;

fn check_hsts(v: Option<u32>) -> Result<(), ApiError> {
    match v {
        Some(v) if v > MAX_HSTS_MAX_AGE => Err(invalid(format!(
            "hsts_max_age must be at most {MAX_HSTS_MAX_AGE} (two years)"
        ))),
        _ => Ok(()),
    }
}

/// A field that may be absent (keep), `null` (clear) or a value (set).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}
