//! Roles: the built-in ones (owner, admin, member, viewer) and what each may do through the API.
//! Custom roles are named sets of permissions in the store
//! ([`crate::store::Store::permissions_of`]); a user's permissions are the union of their roles'.
//! A personal API key holds the permissions both it and its user's roles give, checked at every
//! request, so a change of roles takes effect at once.

use crate::api::PERMISSIONS;

/// What a member may do: read the fleet, reach resources with an API key, and start and use
/// agent sessions.
const MEMBER: &[&str] = &[
    "site:read",
    "gateway:read",
    "resource:read",
    "resource:access",
    "certificate:read",
    "config:read",
    "org:read",
    "session:create",
    "session:list",
    "session:access",
    "session:delete",
];

/// What a viewer may do: read the fleet.
const VIEWER: &[&str] = &[
    "site:read",
    "gateway:read",
    "resource:read",
    "certificate:read",
    "config:read",
    "org:read",
];

/// The permissions of a built-in role; `None` for any other name.
pub fn built_in(name: &str) -> Option<&'static [&'static str]> {
    match name {
        "owner" | "admin" => Some(PERMISSIONS),
        "member" => Some(MEMBER),
        "viewer" => Some(VIEWER),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_roles_give_only_known_permissions_and_nest() {
        for role in crate::store::BUILT_IN_ROLES {
            let perms = built_in(role).unwrap();
            assert!(perms.iter().all(|p| PERMISSIONS.contains(p)), "{role}");
        }
        assert!(VIEWER.iter().all(|p| MEMBER.contains(p)));
        assert!(!MEMBER.iter().any(|p| p.ends_with(":write")));
        assert!(MEMBER.contains(&crate::store::ACCESS_PERMISSION));
        assert!(built_in("deployer").is_none());
    }
}
