//! `/gateways`: public gateways, with the endpoint agents dial.

use crate::api::doc::ApiRouter;
use kakuremichi_proto::NodeKind;
use serde::Deserialize;

use super::nodes::{self, NodeApi};
use super::{invalid, valid_opt};
use crate::{validate, ApiError, AppState};

/// Body of `POST /gateways`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGateway {
    /// Display name, unique.
    pub name: String,
    /// The public `host:port` agents dial (the gateway's WireGuard UDP port).
    pub endpoint: String,
}

/// Body of `PATCH /gateways/{id}`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateGateway {
    /// New name.
    pub name: Option<String>,
    /// New endpoint.
    pub endpoint: Option<String>,
}

/// Gateways as a [`NodeApi`]: a name and the endpoint agents dial.
#[derive(Debug, Clone, Copy)]
pub struct Gateways;

fn endpoint(s: &str) -> Result<String, String> {
    validate::host_port(s, "endpoint")
}

impl NodeApi for Gateways {
    const KIND: NodeKind = NodeKind::Gateway;
    const PATH: &'static str = "/gateways";
    type Create = CreateGateway;
    type Update = UpdateGateway;

    fn create_fields(body: CreateGateway) -> Result<(String, Option<String>), ApiError> {
        let name = validate::name(&body.name).map_err(invalid)?;
        Ok((name, Some(endpoint(&body.endpoint).map_err(invalid)?)))
    }

    fn update_fields(body: UpdateGateway) -> Result<(Option<String>, Option<String>), ApiError> {
        let name = valid_opt(body.name.as_deref(), validate::name)?;
        Ok((name, valid_opt(body.endpoint.as_deref(), endpoint)?))
    }
}

/// The gateways router.
pub fn router() -> ApiRouter<AppState> {
    nodes::router::<Gateways>()
}
