//! `/resources/{id}/passcode`: a password or PIN that lets visitors into one protected resource
//! without an account (hashed with argon2id; never shown again). Replacing or removing it ends
//! the sessions it opened.

use crate::api::doc::get;
use crate::api::doc::ApiRouter;
use axum::extract::State;
use axum::http::StatusCode;
use kakuremichi_proto::Secret;
use serde::Deserialize;
use uuid::Uuid;

use super::{invalid, ApiJson, ApiPath, Org};
use crate::store::{PasscodeInfo, PasscodeKind};
use crate::{secrets, ApiError, AppState};

/// Body of `PUT /resources/{id}/passcode`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetPasscode {
    /// `password` (8 to 256 characters) or `pin` (6 digits).
    pub kind: PasscodeKind,
    /// The password or PIN.
    pub value: Secret,
}

/// The passcode router.
pub fn router() -> ApiRouter<AppState> {
    ApiRouter::new().route(
        "/resources/{id}/passcode",
        get(show).put(set).delete(remove),
    )
}

/// Checks a passcode of `kind`.
pub fn check(kind: PasscodeKind, value: &str) -> Result<(), String> {
    match kind {
        PasscodeKind::Password => {
            let n = value.chars().count();
            if !(8..=256).contains(&n) || value.trim() != value {
                return Err(
                    "a password has 8 to 256 characters, without spaces at either end".into(),
                );
            }
        }
        PasscodeKind::Pin => {
            if value.len() != 6 || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err("a PIN has exactly 6 digits".into());
            }
        }
    }
    Ok(())
}

async fn set(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<SetPasscode>,
) -> Result<ApiJson<PasscodeInfo>, ApiError> {
    check(body.kind, body.value.expose()).map_err(invalid)?;
    let r = state.store.get_resource(id).await?;
    org.owns(r.org_id, "resource")?;
    if r.access.is_none() {
        return Err(invalid(
            "this resource is public: give it an access policy before a password or PIN".into(),
        ));
    }
    let hash = secrets::hash_password(&body.value)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let info = state
        .store
        .set_passcode(org.0, id, body.kind, &hash)
        .await?;
    tracing::info!(resource_id = %id, kind = ?body.kind, "resource passcode set");
    Ok(ApiJson(info))
}

async fn show(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiJson<PasscodeInfo>, ApiError> {
    state
        .store
        .passcode_info(org.0, id)
        .await?
        .map(ApiJson)
        .ok_or_else(|| ApiError::NotFound("passcode not found".into()))
}

async fn remove(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    state.store.remove_passcode(org.0, id).await?;
    tracing::info!(resource_id = %id, "resource passcode removed");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_pins_are_checked() {
        assert!(check(PasscodeKind::Password, "correct horse").is_ok());
        assert!(check(PasscodeKind::Password, "short").is_err());
        assert!(check(PasscodeKind::Password, " padded password").is_err());
        assert!(check(PasscodeKind::Password, &"x".repeat(257)).is_err());
        assert!(check(PasscodeKind::Pin, "123456").is_ok());
        for bad in ["12345", "1234567", "12345a", "١٢٣٤٥٦"] {
            assert!(check(PasscodeKind::Pin, bad).is_err(), "{bad}");
        }
    }
}
