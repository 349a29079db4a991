//! `/sites`: agents' identities. Deleting a site deletes its resources.

use crate::api::doc::ApiRouter;
use kakuremichi_proto::NodeKind;
use serde::Deserialize;

use super::nodes::{self, NodeApi};
use super::{invalid, valid_opt};
use crate::{validate, ApiError, AppState};

/// Body of `POST /sites`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSite {
    /// Display name, unique.
    pub name: String,
}

/// Body of `PATCH /sites/{id}`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSite {
    /// New name.
    pub name: Option<String>,
}

/// Sites as a [`NodeApi`]: a name, no endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Sites;

impl NodeApi for Sites {
    const KIND: NodeKind = NodeKind::Agent;
    const PATH: &'static str = "/sites";
    type Create = CreateSite;
    type Update = UpdateSite;

    fn create_fields(body: CreateSite) -> Result<(String, Option<String>), ApiError> {
        Ok((validate::name(&body.name).map_err(invalid)?, None))
    }

    fn update_fields(body: UpdateSite) -> Result<(Option<String>, Option<String>), ApiError> {
        Ok((valid_opt(body.name.as_deref(), validate::name)?, None))
    }
}

/// The sites router.
pub fn router() -> ApiRouter<AppState> {
    nodes::router::<Sites>()
}
