//! Store tests, each on SQLite and on PostgreSQL.

use std::net::Ipv4Addr;
use std::time::Duration;

use kakuremichi_control::activity::NodeActivity;
use kakuremichi_control::store::{
    NewResource, NewTarget, Node, Resource, ResourcePatch, Store, StoreError, DEFAULT_ORG,
};
use kakuremichi_proto::{ConfigSnapshot, NodeKind, RouteProtocol, Secret, WgPublicKey};

use kakuremichi_control::secrets;

use crate::common;
use crate::on_both_backends;

fn key(b: u8) -> WgPublicKey {
    WgPublicKey([b; 32])
}

/// Creates a site (an agent node); returns it and its enrollment token.
async fn add_site(store: &Store, name: &str) -> (Node, Secret) {
    store
        .create_node(NodeKind::Agent, DEFAULT_ORG, name, None)
        .await
        .unwrap()
}

/// Creates a gateway; returns it and its enrollment token.
async fn add_gateway(store: &Store, name: &str, endpoint: &str) -> (Node, Secret) {
    store
        .create_node(NodeKind::Gateway, DEFAULT_ORG, name, Some(endpoint))
        .await
        .unwrap()
}

/// Creates a resource [`res`] on a site.
async fn add_resource(store: &Store, hostname: &str, site_id: uuid::Uuid) -> Resource {
    store
        .create_resource(&res(hostname, site_id))
        .await
        .unwrap()
}

/// The snapshot of a node that exists.
async fn snapshot(store: &Store, kind: NodeKind, id: uuid::Uuid) -> ConfigSnapshot {
    store.snapshot(kind, id).await.unwrap().unwrap()
}

fn nt(site_id: uuid::Uuid, target: &str) -> NewTarget {
    NewTarget {
        site_id,
        target: target.into(),
        proxy_protocol: None,
    }
}

fn res(hostname: &str, site_id: uuid::Uuid) -> NewResource {
    NewResource {
        name: hostname.into(),
        protocol: RouteProtocol::Http,
        hostname: hostname.into(),
        public_port: None,
        redirect_https: false,
        hsts_max_age: None,
        site_id,
        target: "127.0.0.1:9000".into(),
        balance: Default::default(),
        sticky: false,
        health_check: None,
        limits: Default::default(),
        proxy_protocol: false,
        more_targets: vec![],
        access: None,
        policy_id: None,
    }
}

on_both_backends!(
    node_crud,
    resource_crud_and_unique_hostname,
    overlay_addresses_are_lowest_free,
    overlay_ports_are_not_reused_once_freed,
    config_version_bumps_on_every_change,
    enrollment_token_is_one_time,
    admin_key_seeded_once,
    snapshots_follow_enrollment,
    a_public_key_belongs_to_one_node_across_kinds,
    revoking_and_regenerating_drop_the_credential_and_the_key,
    expired_enrollment_tokens_are_refused,
    legacy_argon2_hashes_still_work_and_are_replaced,
    activity_is_written_in_one_batch,
    tcp_resources_get_unique_public_ports_and_reach_gateways,
    https_redirect_and_hsts_round_trip_into_gateway_routes,
    several_targets_get_ports_on_their_sites_and_reach_gateways_and_agents,
    limits_and_proxy_protocol_are_stored_and_pushed,
    acme_certificates_are_leased_retried_issued_and_pushed_to_gateways_only,
    users_sessions_keys_and_revocations_reach_gateways,
    sso_links_roles_and_passkey_challenges,
    sign_in_buckets_refill_and_keep_each_address_apart,
    api_keys_reach_gateways_for_resources_that_accept_them,
    share_links_count_uses_expire_and_revoke_their_sessions,
    policies_lie_under_their_resources_and_reach_gateways,
    passcodes_replace_and_revoke_and_email_codes_work_once,
    oauth_codes_and_refresh_tokens_work_once_and_a_replay_revokes_the_grant,
    metadata_clients_are_one_per_url_and_follow_their_document,
);

/// A client known by its metadata document: made on first sight, then the same row with the
/// document's newest name and redirect URIs; registered clients have no URL.
async fn metadata_clients_are_one_per_url_and_follow_their_document(store: Store) {
    let url = "https://app.example.com/client.json";
    assert!(store.oauth_client_by_url(url).await.unwrap().is_none());
    let first = store
        .upsert_metadata_client(url, "App", &["http://127.0.0.1/cb".to_owned()])
        .await
        .unwrap();
    assert_eq!(first.metadata_url.as_deref(), Some(url));
    assert_eq!(first.client_id(), url);
    let again = store
        .upsert_metadata_client(url, "App 2", &["https://app.example.com/cb".to_owned()])
        .await
        .unwrap();
    assert_eq!(again.id, first.id);
    assert_eq!(again.name, "App 2");
    assert_eq!(again.redirect_uris, ["https://app.example.com/cb"]);
    assert_eq!(
        store.oauth_client(first.id).await.unwrap().as_ref(),
        Some(&again)
    );
    let other = store
        .upsert_metadata_client(
            "https://other.example/c",
            "Other",
            &["http://127.0.0.1/cb".to_owned()],
        )
        .await
        .unwrap();
    assert_ne!(other.id, first.id);
    // Registered clients, any number of them, have none.
    for _ in 0..2 {
        let c = store
            .create_oauth_client("c", &["http://127.0.0.1/cb".to_owned()])
            .await
            .unwrap();
        assert_eq!(c.metadata_url, None);
        assert_eq!(c.client_id(), c.id.to_string());
        assert_eq!(store.oauth_client(c.id).await.unwrap(), Some(c));
    }
}

/// OAuth: a code and a refresh token each work once; a second use revokes the grant, whose id
/// then reaches gateways among the revoked sessions, and ends its other refresh tokens.
async fn oauth_codes_and_refresh_tokens_work_once_and_a_replay_revokes_the_grant(store: Store) {
    use kakuremichi_control::store::{GrantRefusal, OAuthCode, OAuthGrant};
    let store = store.with_sealer(std::sync::Arc::new(kakuremichi_control::seal::Sealer::new(
        [5; 32],
    )));
    store.ensure_signing_key().await.unwrap();
    let client = store
        .create_oauth_client("c", &["http://127.0.0.1/cb".to_owned()])
        .await
        .unwrap();
    assert_eq!(
        store.oauth_client(client.id).await.unwrap().unwrap(),
        client
    );
    assert!(store
        .oauth_client(uuid::Uuid::new_v4())
        .await
        .unwrap()
        .is_none());
    let grant = OAuthGrant {
        grant_id: uuid::Uuid::new_v4(),
        client_id: client.id,
        user_id: uuid::Uuid::new_v4(),
        org_id: DEFAULT_ORG,
        resource: "https://mcp.example/mcp".into(),
        scope: "mcp".into(),
    };
    let code = OAuthCode {
        grant: grant.clone(),
        redirect_uri: "http://127.0.0.1/cb".into(),
        challenge: "c".repeat(43),
    };
    let t0 = kakuremichi_control::store::now_ms();
    store
        .create_oauth_code("d1", &code, t0 + 60_000)
        .await
        .unwrap();
    store
        .create_oauth_code("d2", &code, t0 + 60_000)
        .await
        .unwrap();
    assert_eq!(
        store.take_oauth_code("nope", t0).await.unwrap(),
        Err(GrantRefusal::Unknown)
    );
    assert_eq!(
        store.take_oauth_code("d2", t0 + 60_000).await.unwrap(),
        Err(GrantRefusal::Expired)
    );
    assert_eq!(store.take_oauth_code("d1", t0).await.unwrap(), Ok(code));
    store
        .create_refresh_token("r1", &grant, t0 + 60_000)
        .await
        .unwrap();
    assert_eq!(
        store.take_refresh_token("r1", t0).await.unwrap(),
        Ok(grant.clone())
    );
    store
        .create_refresh_token("r2", &grant, t0 + 60_000)
        .await
        .unwrap();
    assert!(!store.grant_revoked(grant.grant_id).await.unwrap());
    let before = store.config_version().await.unwrap();
    assert_eq!(
        store.take_oauth_code("d1", t0).await.unwrap(),
        Err(GrantRefusal::Replayed)
    );
    assert!(
        store.config_version().await.unwrap() > before,
        "a replay pushes"
    );
    assert!(store.grant_revoked(grant.grant_id).await.unwrap());
    assert_eq!(
        store.take_refresh_token("r2", t0).await.unwrap(),
        Err(GrantRefusal::Replayed),
        "the grant's live refresh token ends too"
    );
    let revoked = store
        .load_world()
        .await
        .unwrap()
        .identity
        .unwrap()
        .revoked_sessions;
    assert!(revoked.contains(&grant.grant_id), "{revoked:?}");
}

/// A resource's passcode: one live at a time, another organization cannot set it, replacing or
/// removing it puts its id among the revoked sessions gateways get; an e-mailed code works once,
/// for its resource, before it expires, and a few wrong guesses spend it.
async fn passcodes_replace_and_revoke_and_email_codes_work_once(store: Store) {
    use kakuremichi_control::store::{EmailCodeRefusal, PasscodeKind, EMAIL_CODE_ATTEMPTS};
    let store = store.with_sealer(std::sync::Arc::new(kakuremichi_control::seal::Sealer::new(
        [5; 32],
    )));
    store.ensure_signing_key().await.unwrap();
    let (site, _) = store
        .create_node(NodeKind::Agent, DEFAULT_ORG, "s", None)
        .await
        .unwrap();
    let mut new = res("visit.example", site.id);
    new.access = Some(Default::default());
    let r = store.create_resource(&new).await.unwrap();
    assert!(store.live_passcode(r.id).await.unwrap().is_none());
    assert!(store
        .set_passcode(uuid::Uuid::new_v4(), r.id, PasscodeKind::Pin, "h0")
        .await
        .is_err());
    store
        .set_passcode(DEFAULT_ORG, r.id, PasscodeKind::Password, "h1")
        .await
        .unwrap();
    let first = store.live_passcode(r.id).await.unwrap().unwrap();
    assert_eq!(
        (first.kind, first.hash.as_str()),
        (PasscodeKind::Password, "h1")
    );
    assert!(!format!("{first:?}").contains("h1"), "no hash in Debug");
    let before = store.config_version().await.unwrap();
    let info = store
        .set_passcode(DEFAULT_ORG, r.id, PasscodeKind::Pin, "h2")
        .await
        .unwrap();
    assert_eq!(info.kind, PasscodeKind::Pin);
    assert!(
        store.config_version().await.unwrap() > before,
        "replacing pushes"
    );
    let second = store.live_passcode(r.id).await.unwrap().unwrap();
    assert_ne!(second.id, first.id);
    let revoked = || async {
        store
            .load_world()
            .await
            .unwrap()
            .identity
            .unwrap()
            .revoked_sessions
    };
    let now = revoked().await;
    assert!(
        now.contains(&first.id) && !now.contains(&second.id),
        "{now:?}"
    );
    assert_eq!(
        store
            .passcode_info(DEFAULT_ORG, r.id)
            .await
            .unwrap()
            .unwrap()
            .kind,
        PasscodeKind::Pin
    );
    assert!(store
        .passcode_info(uuid::Uuid::new_v4(), r.id)
        .await
        .unwrap()
        .is_none());
    store.remove_passcode(DEFAULT_ORG, r.id).await.unwrap();
    assert!(revoked().await.contains(&second.id));
    assert!(store.live_passcode(r.id).await.unwrap().is_none());
    assert!(store.remove_passcode(DEFAULT_ORG, r.id).await.is_err());

    let t0 = kakuremichi_control::store::now_ms();
    let id = store
        .create_email_code(r.id, "ann@example.com", "123456", t0 + 60_000)
        .await
        .unwrap();
    let other = uuid::Uuid::new_v4();
    assert_eq!(
        store
            .redeem_email_code(id, other, "123456", t0)
            .await
            .unwrap(),
        Err(EmailCodeRefusal::Wrong),
        "another resource"
    );
    assert_eq!(
        store
            .redeem_email_code(id, r.id, "123456", t0 + 60_000)
            .await
            .unwrap(),
        Err(EmailCodeRefusal::Expired)
    );
    assert_eq!(
        store
            .redeem_email_code(id, r.id, "654321", t0)
            .await
            .unwrap(),
        Err(EmailCodeRefusal::Wrong)
    );
    assert_eq!(
        store
            .redeem_email_code(id, r.id, "123456", t0)
            .await
            .unwrap(),
        Ok("ann@example.com".to_owned())
    );
    assert_eq!(
        store
            .redeem_email_code(id, r.id, "123456", t0)
            .await
            .unwrap(),
        Err(EmailCodeRefusal::Spent),
        "once"
    );
    let guessed = store
        .create_email_code(r.id, "ann@example.com", "222222", t0 + 60_000)
        .await
        .unwrap();
    for _ in 0..EMAIL_CODE_ATTEMPTS {
        assert_eq!(
            store
                .redeem_email_code(guessed, r.id, "000000", t0)
                .await
                .unwrap(),
            Err(EmailCodeRefusal::Wrong)
        );
    }
    assert_eq!(
        store
            .redeem_email_code(guessed, r.id, "222222", t0)
            .await
            .unwrap(),
        Err(EmailCodeRefusal::Spent),
        "too many wrong guesses spend it"
    );
}

/// A reusable access policy: resources that follow it get its fields with their own laid over
/// them, in the API's view and in gateways' routes; changing it pushes; one in use cannot be
/// deleted; another organization's cannot be followed.
async fn policies_lie_under_their_resources_and_reach_gateways(store: Store) {
    use kakuremichi_control::store::{ResourcePatch, StoreError};
    use kakuremichi_proto::identity::AccessPolicy;
    let (s, st) = add_site(&store, "s").await;
    let (g, gt) = add_gateway(&store, "g", "gw.example:51820").await;
    store.enroll(NodeKind::Agent, &st, &key(1)).await.unwrap();
    store.enroll(NodeKind::Gateway, &gt, &key(2)).await.unwrap();
    let staff: AccessPolicy = serde_json::from_value(serde_json::json!({
        "roles": ["member"], "rules": [{"action": "deny", "cidrs": ["192.0.2.0/24"]}]
    }))
    .unwrap();
    let p = store
        .create_policy(DEFAULT_ORG, "staff", &staff)
        .await
        .unwrap();
    assert!(matches!(
        store.create_policy(DEFAULT_ORG, "staff", &staff).await,
        Err(StoreError::Conflict(_))
    ));
    let mut own = res("own.example", s.id);
    own.policy_id = Some(p.id);
    own.access = Some(AccessPolicy {
        roles: vec!["admin".into()],
        ..Default::default()
    });
    let own = store.create_resource(&own).await.unwrap();
    let mut plain = res("plain.example", s.id);
    plain.policy_id = Some(p.id);
    let plain = store.create_resource(&plain).await.unwrap();
    let access = own.access.clone().unwrap();
    assert_eq!(access.roles, vec!["admin".to_owned()]);
    assert_eq!(access.rules, staff.rules);
    assert_eq!(
        own.own_access.as_ref().unwrap().roles,
        vec!["admin".to_owned()]
    );
    assert_eq!(plain.access.as_ref(), Some(&staff));
    assert_eq!(
        store.get_policy(DEFAULT_ORG, p.id).await.unwrap().resources,
        2
    );
    let route = |snap: &kakuremichi_proto::ConfigSnapshot, host: &str| {
        snap.routes
            .iter()
            .find(|r| r.hostname == host)
            .unwrap()
            .access
            .clone()
    };
    let snap = snapshot(&store, NodeKind::Gateway, g.id).await;
    assert_eq!(route(&snap, "own.example"), Some(access));
    assert_eq!(route(&snap, "plain.example"), Some(staff.clone()));
    // Changing the policy changes both, with one push.
    let before = store.config_version().await.unwrap();
    let open = AccessPolicy {
        email_domains: vec!["example.com".into()],
        ..Default::default()
    };
    store
        .update_policy(DEFAULT_ORG, p.id, None, Some(&open))
        .await
        .unwrap();
    assert!(store.config_version().await.unwrap() > before);
    let snap = snapshot(&store, NodeKind::Gateway, g.id).await;
    assert_eq!(route(&snap, "plain.example"), Some(open.clone()));
    assert_eq!(
        route(&snap, "own.example").unwrap().email_domains,
        vec!["example.com".to_owned()]
    );
    // Another organization's policy cannot be followed.
    let other = store.create_org("other", None).await.unwrap().0.id;
    let theirs = store
        .create_policy(other, "theirs", &AccessPolicy::default())
        .await
        .unwrap();
    let follow = |p: Option<uuid::Uuid>| ResourcePatch {
        policy_id: Some(p),
        ..Default::default()
    };
    assert!(matches!(
        store
            .update_resource(plain.id, &follow(Some(theirs.id)))
            .await,
        Err(StoreError::Invalid(_))
    ));
    // In use: not deleted. Once no resource follows it: deleted; a resource without its policy
    // keeps only its own fields.
    assert!(matches!(
        store.delete_policy(DEFAULT_ORG, p.id).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.delete_policy(other, p.id).await,
        Err(StoreError::NotFound(_))
    ));
    let plain = store
        .update_resource(plain.id, &follow(None))
        .await
        .unwrap();
    assert_eq!(plain.access, None, "it was public but for its policy");
    let own = store.update_resource(own.id, &follow(None)).await.unwrap();
    assert_eq!(own.access.unwrap().roles, vec!["admin".to_owned()]);
    store.delete_policy(DEFAULT_ORG, p.id).await.unwrap();
    assert!(store.list_policies(DEFAULT_ORG).await.unwrap().is_empty());
}

/// Share links: each opening counts one use, atomically; a used-up, expired, revoked or
/// unknown link, or one opened on another hostname, opens nothing and says why; a revoked link's
/// id reaches gateways among the revoked sessions.
async fn share_links_count_uses_expire_and_revoke_their_sessions(store: Store) {
    use kakuremichi_control::store::ShareRefusal;
    let store = store.with_sealer(std::sync::Arc::new(kakuremichi_control::seal::Sealer::new(
        [5; 32],
    )));
    store.ensure_signing_key().await.unwrap();
    let (site, _) = store
        .create_node(NodeKind::Agent, DEFAULT_ORG, "s", None)
        .await
        .unwrap();
    let mut new = res("shared.example", site.id);
    new.access = Some(Default::default());
    let r = store.create_resource(&new).await.unwrap();
    let t0 = kakuremichi_control::store::now_ms();
    let (link, secret) = store
        .create_share_link(DEFAULT_ORG, r.id, "guests", t0 + 60_000, Some(2))
        .await
        .unwrap();
    assert!(secret.expose().starts_with("kml_"));
    assert_eq!((link.uses, link.max_uses), (0, Some(2)));
    // Another organization cannot make one for this resource.
    let other = uuid::Uuid::new_v4();
    assert!(store
        .create_share_link(other, r.id, "x", t0 + 60_000, None)
        .await
        .is_err());
    let open = |host: &'static str, at: i64| {
        let (store, secret) = (store.clone(), secret.clone());
        async move { store.redeem_share_link(&secret, host, at).await.unwrap() }
    };
    assert_eq!(open("other.example", t0).await, Err(ShareRefusal::Unknown));
    assert_eq!(open("shared.example", t0).await.unwrap().uses, 1);
    assert_eq!(open("shared.example", t0).await.unwrap().uses, 2);
    assert_eq!(open("shared.example", t0).await, Err(ShareRefusal::UsedUp));
    let wrong = kakuremichi_proto::Secret::new(format!("kml_{}_wrong", link.id.simple()));
    assert_eq!(
        store
            .redeem_share_link(&wrong, "shared.example", t0)
            .await
            .unwrap(),
        Err(ShareRefusal::Unknown)
    );
    let (_, unlimited) = store
        .create_share_link(DEFAULT_ORG, r.id, "open", t0 + 60_000, None)
        .await
        .unwrap();
    let again = |at: i64| {
        let (store, secret) = (store.clone(), unlimited.clone());
        async move {
            store
                .redeem_share_link(&secret, "shared.example", at)
                .await
                .unwrap()
        }
    };
    for _ in 0..5 {
        assert!(again(t0).await.is_ok());
    }
    assert_eq!(again(t0 + 60_000).await, Err(ShareRefusal::Expired));
    let before = store.config_version().await.unwrap();
    store
        .revoke_share_link(DEFAULT_ORG, r.id, link.id)
        .await
        .unwrap();
    assert!(
        store.config_version().await.unwrap() > before,
        "revoking pushes"
    );
    assert_eq!(open("shared.example", t0).await, Err(ShareRefusal::Revoked));
    let revoked = store
        .load_world()
        .await
        .unwrap()
        .identity
        .unwrap()
        .revoked_sessions;
    assert!(revoked.contains(&link.id), "{revoked:?}");
    let listed = store.list_share_links(DEFAULT_ORG, r.id).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed
        .iter()
        .any(|l| l.id == link.id && l.revoked_at.is_some() && l.uses == 2));
    assert!(store
        .revoke_share_link(DEFAULT_ORG, r.id, link.id)
        .await
        .is_err());
    // Deleting the resource takes its links.
    store.delete_resource(r.id).await.unwrap();
    assert!(store
        .list_share_links(DEFAULT_ORG, r.id)
        .await
        .unwrap()
        .is_empty());
}

/// Gateways get, for each resource that accepts API keys, the personal keys of members allowed
/// there whose scopes and roles give `resource:access`, with an assertion control signed; a
/// revoked key, a disabled user, a key without the permission or a resource that does not
/// accept keys give none.
async fn api_keys_reach_gateways_for_resources_that_accept_them(store: Store) {
    use kakuremichi_control::store::{NewUser, UserPatch};
    use kakuremichi_proto::identity::AccessPolicy;
    let store = store.with_sealer(std::sync::Arc::new(kakuremichi_control::seal::Sealer::new(
        [5; 32],
    )));
    store.ensure_signing_key().await.unwrap();
    // The admin key seeded at first start (no user, no name, every permission) is among the
    // keys read, and reaches no gateway.
    store
        .ensure_admin_key(Some(&Secret::new(crate::common::ADMIN_KEY)))
        .await
        .unwrap();
    let (site, _) = store
        .create_node(NodeKind::Agent, DEFAULT_ORG, "s", None)
        .await
        .unwrap();
    let mut new = res("keys.example", site.id);
    new.access = Some(AccessPolicy {
        roles: vec!["member".into()],
        api_keys: true,
        ..Default::default()
    });
    store.create_resource(&new).await.unwrap();
    let mut plain = res("nokeys.example", site.id);
    plain.access = Some(AccessPolicy::default());
    store.create_resource(&plain).await.unwrap();
    let ann = store
        .create_user(
            DEFAULT_ORG,
            &NewUser {
                email: "ann@example.com".into(),
                name: "Ann".into(),
                password_hash: None,
                roles: vec!["member".into()],
            },
        )
        .await
        .unwrap();
    let scopes = |s: &[&str]| s.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>();
    let (key, secret) = store
        .create_api_key(
            DEFAULT_ORG,
            "k",
            &scopes(&["resource:access"]),
            None,
            Some(ann.id),
        )
        .await
        .unwrap();
    store
        .create_api_key(
            DEFAULT_ORG,
            "r",
            &scopes(&["resource:read"]),
            None,
            Some(ann.id),
        )
        .await
        .unwrap();
    let (svc, svc_secret) = store
        .create_api_key(
            DEFAULT_ORG,
            "svc",
            &scopes(&["resource:access"]),
            None,
            None,
        )
        .await
        .unwrap();
    let (svc_read, _) = store
        .create_api_key(
            DEFAULT_ORG,
            "svc-read",
            &scopes(&["resource:read"]),
            None,
            None,
        )
        .await
        .unwrap();
    let edge =
        |store: Store| async move { store.load_world().await.unwrap().identity.unwrap().api_keys };
    let keys = edge(store.clone()).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0].id, key.id);
    assert_eq!(keys[0].host, "keys.example");
    assert_eq!(
        keys[0].digest,
        kakuremichi_control::secrets::digest(&secret)
    );
    let payload = keys[0].assertion.split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["amr"], serde_json::json!(["api_key"]));
    assert_eq!(claims["sid"], key.id.to_string());
    assert_eq!(claims["aud"], "keys.example");
    // A disabled user's key goes; so does a revoked key.
    store
        .update_user(
            DEFAULT_ORG,
            ann.id,
            &UserPatch {
                disabled: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(edge(store.clone()).await.is_empty());
    store
        .update_user(
            DEFAULT_ORG,
            ann.id,
            &UserPatch {
                disabled: Some(false),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(edge(store.clone()).await.len(), 1);
    let before = store.config_version().await.unwrap();
    store.revoke_api_key(DEFAULT_ORG, key.id).await.unwrap();
    assert!(
        store.config_version().await.unwrap() > before,
        "revoking pushes"
    );
    assert!(edge(store.clone()).await.is_empty());

    // Service keys: only where a policy names them, only with resource:access, as themselves.
    let mut machines = res("machines.example", site.id);
    machines.access = Some(AccessPolicy {
        service_keys: vec![svc.id, svc_read.id],
        ..Default::default()
    });
    store.create_resource(&machines).await.unwrap();
    assert!(store.refresh_edge_credentials().await.unwrap());
    let keys = edge(store.clone()).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(
        (keys[0].id, keys[0].host.as_str()),
        (svc.id, "machines.example")
    );
    assert_eq!(
        keys[0].digest,
        kakuremichi_control::secrets::digest(&svc_secret)
    );
    let payload = keys[0].assertion.split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["amr"], serde_json::json!(["service_key"]));
    assert_eq!(claims["sub"], svc.id.to_string());
    assert_eq!(claims["name"], "svc");
    assert_eq!(claims["email"], "");
    store.revoke_api_key(DEFAULT_ORG, svc.id).await.unwrap();
    assert!(edge(store.clone()).await.is_empty());
}

/// The sign-in rate limit's buckets: bursts of the limit, one token back every 60 s / limit, each
/// address on its own, and a refused attempt costs nothing more.
async fn sign_in_buckets_refill_and_keep_each_address_apart(store: Store) {
    let t0 = 1_000_000_000_000;
    for _ in 0..3 {
        assert_eq!(store.take_sign_in("192.0.2.1", 3, t0).await.unwrap(), None);
    }
    let wait = store.take_sign_in("192.0.2.1", 3, t0).await.unwrap();
    assert_eq!(wait, Some(20_000), "one token comes back in 60 s / 3");
    // Hammering does not push it further away.
    for _ in 0..10 {
        assert_eq!(
            store.take_sign_in("192.0.2.1", 3, t0).await.unwrap(),
            Some(20_000)
        );
    }
    assert_eq!(store.take_sign_in("192.0.2.2", 3, t0).await.unwrap(), None);
    assert_eq!(
        store
            .take_sign_in("192.0.2.1", 3, t0 + 10_000)
            .await
            .unwrap(),
        Some(10_000)
    );
    assert_eq!(
        store
            .take_sign_in("192.0.2.1", 3, t0 + 20_000)
            .await
            .unwrap(),
        None
    );
    // A minute idle fills the bucket again, and never above the limit.
    let later = t0 + 3_600_000;
    for _ in 0..3 {
        assert_eq!(
            store.take_sign_in("192.0.2.1", 3, later).await.unwrap(),
            None
        );
    }
    assert!(store
        .take_sign_in("192.0.2.1", 3, later)
        .await
        .unwrap()
        .is_some());
}

async fn sso_links_roles_and_passkey_challenges(store: Store) {
    use kakuremichi_control::store::{
        CustomRole, ExternalAccount, NewIdentityProvider, NewUser, ProviderKind,
    };
    let store = store.with_sealer(std::sync::Arc::new(kakuremichi_control::seal::Sealer::new(
        [5; 32],
    )));
    // A provider: the secret is sealed, read back only by name.
    let p = store
        .create_identity_provider(&NewIdentityProvider {
            org_id: DEFAULT_ORG,
            name: "corp".into(),
            kind: ProviderKind::Oidc,
            display_name: "Corp".into(),
            issuer: "https://id.example.com".into(),
            client_id: "c".into(),
            client_secret: Secret::new("s3cret"),
            scopes: vec!["openid".into()],
            role_claim: Some("groups".into()),
            role_map: [("eng".to_owned(), vec!["member".to_owned()])].into(),
            default_roles: vec![],
            auto_provision: true,
        })
        .await
        .unwrap();
    let (_, secret) = store
        .identity_provider_by_name("corp")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(secret.expose(), "s3cret");
    assert!(matches!(
        store
            .create_identity_provider(&NewIdentityProvider {
                org_id: DEFAULT_ORG,
                name: "corp".into(),
                kind: ProviderKind::Github,
                display_name: "x".into(),
                issuer: "https://github.com".into(),
                client_id: "c".into(),
                client_secret: Secret::new("s"),
                scopes: vec![],
                role_claim: None,
                role_map: Default::default(),
                default_roles: vec![],
                auto_provision: true,
            })
            .await,
        Err(StoreError::Conflict(_))
    ));
    // First sign-in provisions with the mapped roles; the next finds the user by subject.
    let account = |email: &str, verified: bool, roles: &[&str]| ExternalAccount {
        subject: "sub-1".into(),
        email: email.into(),
        email_verified: verified,
        name: "Ann".into(),
        mapped_roles: Some(roles.iter().map(|r| (*r).to_owned()).collect()),
    };
    let ann = store
        .sso_user(&p, &account("ann@example.com", true, &["member"]))
        .await
        .unwrap();
    assert_eq!(ann.roles, ["member"]);
    let again = store
        .sso_user(&p, &account("renamed@example.com", false, &[]))
        .await
        .unwrap();
    assert_eq!(again.id, ann.id, "found by subject, not e-mail");
    assert!(again.roles.is_empty(), "roles follow the provider");
    // An unverified address never links to an existing user.
    store
        .create_user(
            DEFAULT_ORG,
            &NewUser {
                email: "bob@example.com".into(),
                name: "Bob".into(),
                password_hash: None,
                roles: vec!["admin".into()],
            },
        )
        .await
        .unwrap();
    let mut bob = account("bob@example.com", false, &[]);
    bob.subject = "sub-2".into();
    assert!(matches!(
        store.sso_user(&p, &bob).await,
        Err(StoreError::Invalid(_))
    ));

    // Roles: permissions are the union; a role in use cannot go.
    store
        .create_role(
            DEFAULT_ORG,
            &CustomRole {
                name: "deployer".into(),
                description: String::new(),
                permissions: vec!["resource:write".into()],
                created_at: 0,
            },
        )
        .await
        .unwrap();
    let perms = store
        .permissions_of(
            DEFAULT_ORG,
            &["viewer".into(), "deployer".into(), "nobody".into()],
        )
        .await
        .unwrap();
    assert!(perms.contains("resource:read") && perms.contains("resource:write"));
    assert!(!perms.contains("site:write"));
    assert!(store.role_exists(DEFAULT_ORG, "deployer").await.unwrap());
    assert!(!store.role_exists(DEFAULT_ORG, "nobody").await.unwrap());
    store
        .update_user(
            DEFAULT_ORG,
            ann.id,
            &kakuremichi_control::store::UserPatch {
                roles: Some(vec!["deployer".into()]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(matches!(
        store.delete_role(DEFAULT_ORG, "deployer").await,
        Err(StoreError::Conflict(_))
    ));

    // Passkey ceremonies are taken once, by kind, before they expire.
    let id = store
        .put_challenge(ann.id, "authenticate", "{}", 60_000)
        .await
        .unwrap();
    assert!(store
        .take_challenge(id, "register")
        .await
        .unwrap()
        .is_none());
    let id = store
        .put_challenge(ann.id, "authenticate", "{\"x\":1}", 60_000)
        .await
        .unwrap();
    let (user, state) = store
        .take_challenge(id, "authenticate")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((user, state.as_str()), (ann.id, "{\"x\":1}"));
    assert!(store
        .take_challenge(id, "authenticate")
        .await
        .unwrap()
        .is_none());
    let old = store
        .put_challenge(ann.id, "authenticate", "{}", -1)
        .await
        .unwrap();
    assert!(store
        .take_challenge(old, "authenticate")
        .await
        .unwrap()
        .is_none());
    // A credential belongs to one user.
    store
        .add_passkey(ann.id, "laptop", "cred-1", "{}")
        .await
        .unwrap();
    assert!(matches!(
        store.add_passkey(ann.id, "again", "cred-1", "{}").await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.list_passkeys(ann.id).await.unwrap().len(), 1);
}

async fn users_sessions_keys_and_revocations_reach_gateways(store: Store) {
    use kakuremichi_control::store::{NewUser, UserPatch, SESSION_LIFE_MS};
    use kakuremichi_proto::identity::AccessPolicy;
    let store = store.with_sealer(std::sync::Arc::new(kakuremichi_control::seal::Sealer::new(
        [4; 32],
    )));
    store.ensure_signing_key().await.unwrap();
    store.ensure_signing_key().await.unwrap();
    let keys = store.published_keys(SESSION_LIFE_MS).await.unwrap();
    assert_eq!(keys.len(), 1, "one current key, made once");
    let signer = store.signer().await.unwrap();
    assert_eq!(signer.kid, keys[0].kid);
    assert!(!format!("{signer:?}").contains("pkcs8: ["), "{signer:?}");

    let hash = kakuremichi_control::secrets::hash_password(&Secret::new("a long password"))
        .await
        .unwrap();
    let ann = store
        .create_user(
            DEFAULT_ORG,
            &NewUser {
                email: "ann@example.com".into(),
                name: "Ann".into(),
                password_hash: Some(hash),
                roles: vec!["member".into()],
            },
        )
        .await
        .unwrap();
    let dup = store
        .create_user(
            DEFAULT_ORG,
            &NewUser {
                email: "ann@example.com".into(),
                name: "Other".into(),
                password_hash: None,
                roles: vec![],
            },
        )
        .await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    let (found, hash) = store
        .user_by_email("ANN@example.com")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, ann.id);
    assert!(hash.unwrap().starts_with("$argon2id$"));

    // Lockout after N wrong passwords; an unlock clears it.
    for _ in 0..2 {
        assert_eq!(
            store
                .record_failed_sign_in(ann.id, 3, 60_000)
                .await
                .unwrap(),
            None
        );
    }
    let until = store
        .record_failed_sign_in(ann.id, 3, 60_000)
        .await
        .unwrap();
    assert!(until.is_some());
    assert_eq!(store.get_user(ann.id).await.unwrap().locked_until, until);
    let u = store
        .update_user(
            DEFAULT_ORG,
            ann.id,
            &UserPatch {
                unlock: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((u.locked_until, u.failed_sign_ins), (None, 0));

    // Sessions: found by their cookie only; revoking one reaches gateways' snapshots.
    let (gw, _) = add_gateway(&store, "edge", "203.0.113.1:51820").await;
    let (site, _) = add_site(&store, "home").await;
    store
        .claim_key(NodeKind::Agent, site.id, &WgPublicKey([7; 32]))
        .await
        .unwrap();
    let mut r = res("app.example", site.id);
    r.access = Some(AccessPolicy {
        roles: vec!["member".into()],
        ..Default::default()
    });
    store.create_resource(&r).await.unwrap();
    let (s1, cookie) = store
        .create_session(ann.id, 60_000, &["pwd".into()], None)
        .await
        .unwrap();
    let (found, user) = store.session_by_cookie(&cookie).await.unwrap().unwrap();
    assert_eq!((found.id, user.id), (s1.id, ann.id));
    let forged = Secret::new(format!("{}x", cookie.expose()));
    assert!(store.session_by_cookie(&forged).await.unwrap().is_none());
    assert!(store
        .session_by_cookie(&Secret::new("kms_nope"))
        .await
        .unwrap()
        .is_none());

    let before = store.config_version().await.unwrap();
    store.revoke_session(s1.id).await.unwrap();
    assert!(
        store.config_version().await.unwrap() > before,
        "a revocation bumps the version"
    );
    assert!(store.session_by_cookie(&cookie).await.unwrap().is_none());
    let snap = snapshot(&store, NodeKind::Gateway, gw.id).await;
    let identity = snap
        .identity
        .expect("gateways get identity once a resource needs sign-in");
    assert_eq!(identity.revoked_sessions, vec![s1.id]);
    assert_eq!(identity.keys.len(), 1);
    assert!(identity.sign_in_url.ends_with("/auth/sign-in"));
    let route = snap
        .routes
        .iter()
        .find(|r| r.hostname == "app.example")
        .unwrap();
    assert_eq!(
        route.access.as_ref().unwrap().roles,
        vec!["member".to_string()]
    );
    assert!(snapshot(&store, NodeKind::Agent, site.id)
        .await
        .identity
        .is_none());

    // Disabling cuts every token; rotating keeps the old key verifying.
    let (s2, cookie2) = store
        .create_session(ann.id, 60_000, &["pwd".into()], None)
        .await
        .unwrap();
    store
        .update_user(
            DEFAULT_ORG,
            ann.id,
            &UserPatch {
                disabled: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(store.session_by_cookie(&cookie2).await.unwrap().is_none());
    let kid = store.rotate_signing_key().await.unwrap();
    let snap = snapshot(&store, NodeKind::Gateway, gw.id).await;
    let identity = snap.identity.unwrap();
    assert!(identity.revoked_sessions.contains(&s2.id));
    assert!(identity
        .user_cutoffs
        .iter()
        .any(|c| c.user == ann.id && c.disabled));
    assert_eq!(identity.keys.len(), 2, "the retired key still verifies");
    assert_eq!(identity.keys[0].kid, kid, "the new key first");
    assert_eq!(store.signer().await.unwrap().kid, kid);

    // A deleted user's sessions stay revoked.
    store.delete_user(DEFAULT_ORG, ann.id).await.unwrap();
    assert!(matches!(
        store.get_user(ann.id).await,
        Err(StoreError::NotFound(_))
    ));
    let snap = snapshot(&store, NodeKind::Gateway, gw.id).await;
    assert!(snap.identity.unwrap().revoked_sessions.contains(&s2.id));

    // The audit log filters by action (exact or prefix), actor, outcome and time.
    use kakuremichi_control::store::{AuditEntry, AuditFilter};
    for (i, action) in ["sign_in", "POST /api/v1/users", "POST /api/v1/sites"]
        .iter()
        .enumerate()
    {
        store
            .record_audit(&AuditEntry {
                at: 1000 + i as i64,
                actor: if i == 0 {
                    "anonymous".into()
                } else {
                    "admin-key:x".into()
                },
                action: (*action).into(),
                target: Some("t".into()),
                outcome: if i == 0 {
                    "denied".into()
                } else {
                    "201".into()
                },
                client: Some("127.0.0.1".into()),
                org_id: None,
                detail: None,
            })
            .await
            .unwrap();
    }
    let all = store
        .list_audit(DEFAULT_ORG, &AuditFilter::default())
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].action, "POST /api/v1/sites", "newest first");
    let posts = AuditFilter {
        action: Some("POST *".into()),
        ..Default::default()
    };
    assert_eq!(
        store.list_audit(DEFAULT_ORG, &posts).await.unwrap().len(),
        2
    );
    let denied = AuditFilter {
        outcome: Some("denied".into()),
        ..Default::default()
    };
    assert_eq!(
        store.list_audit(DEFAULT_ORG, &denied).await.unwrap()[0].action,
        "sign_in"
    );
    let recent = AuditFilter {
        since: Some(1001),
        limit: Some(1),
        ..Default::default()
    };
    assert_eq!(
        store.list_audit(DEFAULT_ORG, &recent).await.unwrap().len(),
        1
    );
    let by = AuditFilter {
        actor: Some("admin-key:x".into()),
        ..Default::default()
    };
    assert_eq!(store.list_audit(DEFAULT_ORG, &by).await.unwrap().len(), 2);
}

async fn acme_certificates_are_leased_retried_issued_and_pushed_to_gateways_only(store: Store) {
    use kakuremichi_control::store::{CertStatus, ChallengeKind, Issued, StoredChallenge};
    // Without a secrets key, certificates are refused (keys are never kept in the clear).
    let refused = store
        .create_acme_certificate(
            DEFAULT_ORG,
            &["a.example".into()],
            ChallengeKind::Http01,
            false,
        )
        .await;
    assert!(
        matches!(refused, Err(StoreError::Invalid(_))),
        "{refused:?}"
    );
    let store = store.with_sealer(std::sync::Arc::new(kakuremichi_control::seal::Sealer::new(
        [3; 32],
    )));
    let (gw, _) = add_gateway(&store, "edge", "203.0.113.1:51820").await;
    let (site, _) = add_site(&store, "home").await;
    let c = store
        .create_acme_certificate(
            DEFAULT_ORG,
            &["a.example".into()],
            ChallengeKind::Http01,
            false,
        )
        .await
        .unwrap();
    assert_eq!(c.status, CertStatus::Pending);
    let now = kakuremichi_control::store::now_ms();
    // One claimant at a time: a second replica finds nothing while the lease holds.
    let claimed = store.claim_due_certificate(now, 60_000).await.unwrap();
    assert_eq!(claimed.map(|c| c.id), Some(c.id));
    assert!(store
        .claim_due_certificate(now, 60_000)
        .await
        .unwrap()
        .is_none());
    // A challenge answer reaches gateways, not agents.
    let v0 = store.config_version().await.unwrap();
    let v = store
        .add_acme_challenge(
            c.id,
            &StoredChallenge {
                kind: ChallengeKind::Http01,
                name: "a.example".into(),
                token: "tok".into(),
                value: "tok.thumb".into(),
            },
        )
        .await
        .unwrap();
    assert!(v > v0);
    let g = snapshot(&store, NodeKind::Gateway, gw.id).await;
    assert_eq!(
        g.acme_challenges,
        vec![kakuremichi_proto::AcmeChallenge::Http01 {
            token: "tok".into(),
            key_authorization: "tok.thumb".into()
        }]
    );
    assert!(snapshot(&store, NodeKind::Agent, site.id)
        .await
        .acme_challenges
        .is_empty());
    store.clear_acme_challenges(c.id).await.unwrap();
    assert!(snapshot(&store, NodeKind::Gateway, gw.id)
        .await
        .acme_challenges
        .is_empty());
    // A failure: released, failed, due again later.
    store
        .certificate_failed(c.id, "CA said no", now + 5_000)
        .await
        .unwrap();
    let failed = store.get_certificate(c.id).await.unwrap();
    assert_eq!(failed.status, CertStatus::Failed);
    assert_eq!(failed.failures, 1);
    assert_eq!(failed.last_error.as_deref(), Some("CA said no"));
    assert!(store
        .claim_due_certificate(now, 60_000)
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        store.next_certificate_due().await.unwrap(),
        Some(now + 5_000)
    );
    let again = store
        .claim_due_certificate(now + 5_000, 60_000)
        .await
        .unwrap();
    assert_eq!(again.map(|c| c.id), Some(c.id));
    // Issued: valid, sealed at rest, opened in the gateway's snapshot.
    let made = rcgen::generate_simple_self_signed(vec!["a.example".to_owned()]).unwrap();
    let key_pem = made.signing_key.serialize_pem();
    store
        .certificate_issued(
            c.id,
            &Issued {
                chain_pem: made.cert.pem(),
                key_pem: Secret::new(key_pem.clone()),
                not_before: now,
                not_after: now + 90_000,
            },
            now + 60_000,
        )
        .await
        .unwrap();
    let valid = store.get_certificate(c.id).await.unwrap();
    assert_eq!(valid.status, CertStatus::Valid);
    assert_eq!(valid.failures, 0);
    assert_eq!(valid.last_error, None);
    let g = snapshot(&store, NodeKind::Gateway, gw.id).await;
    assert_eq!(g.certificates.len(), 1);
    assert_eq!(g.certificates[0].key_pem.expose(), key_pem);
    assert_eq!(g.certificates[0].names, vec!["a.example".to_owned()]);
    assert!(snapshot(&store, NodeKind::Agent, site.id)
        .await
        .certificates
        .is_empty());
    // A later failure (renewal) keeps it valid and served.
    store
        .certificate_failed(c.id, "renewal failed", now + 70_000)
        .await
        .unwrap();
    assert_eq!(
        store.get_certificate(c.id).await.unwrap().status,
        CertStatus::Valid
    );
    assert_eq!(
        snapshot(&store, NodeKind::Gateway, gw.id)
            .await
            .certificates
            .len(),
        1
    );
    // The same database with another secrets key does not serve keys it cannot open.
    let other =
        store
            .clone()
            .with_sealer(std::sync::Arc::new(kakuremichi_control::seal::Sealer::new(
                [4; 32],
            )));
    assert!(snapshot(&other, NodeKind::Gateway, gw.id)
        .await
        .certificates
        .is_empty());
    // The ACME account round-trips sealed.
    assert!(store
        .acme_account("https://ca/dir")
        .await
        .unwrap()
        .is_none());
    store
        .save_acme_account("https://ca/dir", &Secret::new("{\"id\":\"x\"}"))
        .await
        .unwrap();
    assert_eq!(
        store
            .acme_account("https://ca/dir")
            .await
            .unwrap()
            .unwrap()
            .expose(),
        "{\"id\":\"x\"}"
    );
    store.delete_certificate(c.id).await.unwrap();
    assert!(snapshot(&store, NodeKind::Gateway, gw.id)
        .await
        .certificates
        .is_empty());
    assert!(matches!(
        store.delete_certificate(c.id).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn node_crud(store: Store) {
    let (site, token) = add_site(&store, "home").await;
    assert!(token.expose().starts_with("kme_"));
    assert_eq!(site.name, "home");
    assert!(!site.enrolled());
    let (gw, _) = add_gateway(&store, "edge", "203.0.113.1:51820").await;
    assert_eq!(gw.endpoint.as_deref(), Some("203.0.113.1:51820"));
    // Names are unique per kind.
    assert!(matches!(
        store
            .create_node(NodeKind::Agent, DEFAULT_ORG, "home", None)
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.list_nodes(NodeKind::Agent).await.unwrap().len(), 1);
    let gw2 = store
        .update_node(
            NodeKind::Gateway,
            gw.id,
            Some("edge2"),
            Some("gw.example.com:51820"),
        )
        .await
        .unwrap();
    assert_eq!(gw2.name, "edge2");
    assert_eq!(gw2.endpoint.as_deref(), Some("gw.example.com:51820"));
    assert_eq!(store.get_node(NodeKind::Gateway, gw.id).await.unwrap(), gw2);
    // A site's id is not a gateway's.
    assert!(matches!(
        store.get_node(NodeKind::Gateway, site.id).await,
        Err(StoreError::NotFound(_))
    ));
    store.delete_node(NodeKind::Gateway, gw.id).await.unwrap();
    assert!(matches!(
        store.delete_node(NodeKind::Gateway, gw.id).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn resource_crud_and_unique_hostname(store: Store) {
    let (site, _) = add_site(&store, "home").await;
    let (site2, _) = add_site(&store, "office").await;
    let r = add_resource(&store, "demo.localhost", site.id).await;
    assert_eq!(r.overlay_port, 10000);
    assert_eq!(store.get_resource(r.id).await.unwrap(), r);
    let dup = store
        .create_resource(&res("demo.localhost", site2.id))
        .await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    let missing = store
        .create_resource(&res("x.localhost", uuid::Uuid::new_v4()))
        .await;
    assert!(
        matches!(missing, Err(StoreError::Invalid(_))),
        "{missing:?}"
    );

    let r2 = add_resource(&store, "two.localhost", site.id).await;
    let clash = store
        .update_resource(
            r2.id,
            &ResourcePatch {
                hostname: Some("demo.localhost".into()),
                ..Default::default()
            },
        )
        .await;
    assert!(matches!(clash, Err(StoreError::Conflict(_))));
    let moved = store
        .update_resource(
            r2.id,
            &ResourcePatch {
                site_id: Some(site2.id),
                target: Some("10.0.0.5:80".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((moved.site_id, moved.overlay_port), (site2.id, 10000));
    assert_eq!(moved.target, "10.0.0.5:80");
    assert_eq!(store.list_resources().await.unwrap().len(), 2);

    // Deleting a site deletes its resources.
    store.delete_node(NodeKind::Agent, site.id).await.unwrap();
    let left = store.list_resources().await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, r2.id);
    store.delete_resource(r2.id).await.unwrap();
    assert!(matches!(
        store.get_resource(r2.id).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn overlay_addresses_are_lowest_free(store: Store) {
    let (a, _) = add_site(&store, "a").await;
    let (g, _) = add_gateway(&store, "g", "h:1").await;
    let (b, _) = add_site(&store, "b").await;
    assert_eq!(a.overlay_address, Ipv4Addr::new(100, 64, 0, 1));
    assert_eq!(g.overlay_address, Ipv4Addr::new(100, 64, 0, 2));
    assert_eq!(b.overlay_address, Ipv4Addr::new(100, 64, 0, 3));
    store.delete_node(NodeKind::Gateway, g.id).await.unwrap();
    let (c, _) = add_site(&store, "c").await;
    assert_eq!(c.overlay_address, Ipv4Addr::new(100, 64, 0, 2));
}

async fn overlay_ports_are_not_reused_once_freed(store: Store) {
    let (s, _) = add_site(&store, "s").await;
    let (t, _) = add_site(&store, "t").await;
    let a = add_resource(&store, "a.localhost", s.id).await;
    let b = add_resource(&store, "b.localhost", s.id).await;
    let c = add_resource(&store, "c.localhost", t.id).await;
    assert_eq!(
        (a.overlay_port, b.overlay_port, c.overlay_port),
        (10000, 10001, 10000)
    );
    // A freed port is not handed out again: a node may still hold it for the old resource.
    store.delete_resource(a.id).await.unwrap();
    let d = add_resource(&store, "d.localhost", s.id).await;
    assert_eq!(d.overlay_port, 10002);
    // Each site counts on its own.
    let e = add_resource(&store, "e.localhost", t.id).await;
    assert_eq!(e.overlay_port, 10001);
}

async fn config_version_bumps_on_every_change(store: Store) {
    let mut rx = store.subscribe();
    let v0 = store.config_version().await.unwrap();
    assert_eq!(*rx.borrow_and_update(), v0);
    let (s, token) = add_site(&store, "s").await;
    let v1 = store.config_version().await.unwrap();
    assert!(v1 > v0);
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), v1);
    store
        .enroll(NodeKind::Agent, &token, &key(1))
        .await
        .unwrap();
    let v2 = store.config_version().await.unwrap();
    assert!(v2 > v1);
    let r = add_resource(&store, "a.localhost", s.id).await;
    let v3 = store.config_version().await.unwrap();
    assert!(v3 > v2);
    store
        .update_resource(
            r.id,
            &ResourcePatch {
                target: Some("127.0.0.1:1".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let v4 = store.config_version().await.unwrap();
    assert!(v4 > v3);
    store.delete_resource(r.id).await.unwrap();
    let v5 = store.config_version().await.unwrap();
    assert!(v5 > v4);
    // Same public key in a hello: no bump; a new one: bump.
    store
        .claim_key(NodeKind::Agent, s.id, &key(1))
        .await
        .unwrap();
    assert_eq!(store.config_version().await.unwrap(), v5);
    store
        .claim_key(NodeKind::Agent, s.id, &key(2))
        .await
        .unwrap();
    let v6 = store.config_version().await.unwrap();
    assert!(v6 > v5);
    // Status and applied reports do not bump.
    store
        .record_activity(&[(
            (NodeKind::Agent, s.id),
            NodeActivity {
                applied_version: Some(v6),
                seen_at: Some(1),
                ..Default::default()
            },
        )])
        .await
        .unwrap();
    assert_eq!(store.config_version().await.unwrap(), v6);
    assert_eq!(*rx.borrow_and_update(), v6);
}

async fn enrollment_token_is_one_time(store: Store) {
    let (s, token) = add_site(&store, "s").await;
    // The kind must match the token's node.
    assert!(matches!(
        store.enroll(NodeKind::Gateway, &token, &key(1)).await,
        Err(StoreError::BadSecret)
    ));
    assert!(matches!(
        store
            .enroll(NodeKind::Agent, &Secret::new("kme_nonsense"), &key(1))
            .await,
        Err(StoreError::BadSecret)
    ));
    let resp = store
        .enroll(NodeKind::Agent, &token, &key(1))
        .await
        .unwrap();
    assert_eq!(resp.node_id, s.id);
    assert_eq!(resp.overlay_address, s.overlay_address);
    assert!(matches!(
        store.enroll(NodeKind::Agent, &token, &key(1)).await,
        Err(StoreError::BadSecret)
    ));
    store
        .authenticate_node(NodeKind::Agent, s.id, &resp.credential)
        .await
        .unwrap();
    let node = store.get_node(NodeKind::Agent, s.id).await.unwrap();
    assert!(node.enrolled());
    assert_eq!(node.public_key, Some(key(1)));
    assert!(matches!(
        store
            .authenticate_node(NodeKind::Agent, s.id, &Secret::new("kmc_wrong"))
            .await,
        Err(StoreError::BadSecret)
    ));
    // A regenerated token works once and replaces the old credential.
    let t2 = store
        .regenerate_enrollment_token(NodeKind::Agent, s.id)
        .await
        .unwrap();
    let resp2 = store.enroll(NodeKind::Agent, &t2, &key(2)).await.unwrap();
    assert!(store
        .authenticate_node(NodeKind::Agent, s.id, &resp.credential)
        .await
        .is_err());
    assert!(store
        .authenticate_node(NodeKind::Agent, s.id, &resp2.credential)
        .await
        .is_ok());
}

async fn admin_key_seeded_once(store: Store) {
    let seeded = Secret::new(crate::common::ADMIN_KEY);
    assert_eq!(store.ensure_admin_key(Some(&seeded)).await.unwrap(), None);
    assert!(store.verify_admin_key(&seeded).await.unwrap());
    // Once a key exists, nothing is generated or seeded.
    assert_eq!(store.ensure_admin_key(None).await.unwrap(), None);
    assert!(!store
        .verify_admin_key(&Secret::new("kma_0123456789abcdef0123456789abcdef_wrong"))
        .await
        .unwrap());
    assert!(!store
        .verify_admin_key(&Secret::new("garbage"))
        .await
        .unwrap());
}

async fn snapshots_follow_enrollment(store: Store) {
    let (s, st) = add_site(&store, "s").await;
    let (g, gt) = add_gateway(&store, "g", "gw.example:51820").await;
    let r = add_resource(&store, "a.localhost", s.id).await;
    let snap = snapshot(&store, NodeKind::Gateway, g.id).await;
    assert!(snap.peers.is_empty() && snap.routes.is_empty());
    assert_eq!(snap.overlay.prefix_len, 10);
    assert_eq!(snap.overlay.mtu, 1420);
    store.enroll(NodeKind::Agent, &st, &key(1)).await.unwrap();
    store.enroll(NodeKind::Gateway, &gt, &key(2)).await.unwrap();
    let snap = snapshot(&store, NodeKind::Gateway, g.id).await;
    assert_eq!(snap.version, store.config_version().await.unwrap());
    assert_eq!(snap.peers.len(), 1);
    assert_eq!(snap.peers[0].public_key, key(1));
    assert_eq!(snap.peers[0].endpoint, None);
    assert_eq!(snap.routes.len(), 1);
    assert_eq!(snap.routes[0].overlay_address, s.overlay_address);
    assert_eq!(snap.routes[0].port, r.overlay_port);
    let snap = snapshot(&store, NodeKind::Agent, s.id).await;
    assert_eq!(snap.peers.len(), 1);
    assert_eq!(snap.peers[0].endpoint.as_deref(), Some("gw.example:51820"));
    assert_eq!(snap.peers[0].persistent_keepalive, Some(25));
    assert_eq!(snap.targets.len(), 1);
    assert_eq!(snap.targets[0].port, 10000);
    assert!(store
        .snapshot(NodeKind::Agent, uuid::Uuid::new_v4())
        .await
        .unwrap()
        .is_none());
}

async fn a_public_key_belongs_to_one_node_across_kinds(store: Store) {
    let (a, at) = add_site(&store, "a").await;
    let (b, bt) = add_site(&store, "b").await;
    let (_g, gt) = add_gateway(&store, "g", "gw.example:51820").await;
    store.enroll(NodeKind::Agent, &at, &key(1)).await.unwrap();
    // Enrolling with a key another node holds is refused, and the token is not spent.
    assert!(matches!(
        store.enroll(NodeKind::Agent, &bt, &key(1)).await,
        Err(StoreError::KeyInUse)
    ));
    assert!(matches!(
        store.enroll(NodeKind::Gateway, &gt, &key(1)).await,
        Err(StoreError::KeyInUse)
    ));
    store.enroll(NodeKind::Agent, &bt, &key(2)).await.unwrap();
    store.enroll(NodeKind::Gateway, &gt, &key(3)).await.unwrap();
    // A hello claiming another node's key changes nothing.
    let v = store.config_version().await.unwrap();
    assert!(matches!(
        store.claim_key(NodeKind::Agent, b.id, &key(1)).await,
        Err(StoreError::KeyInUse)
    ));
    assert!(matches!(
        store.claim_key(NodeKind::Agent, b.id, &key(3)).await,
        Err(StoreError::KeyInUse)
    ));
    assert_eq!(store.config_version().await.unwrap(), v);
    let got = store.get_node(NodeKind::Agent, b.id).await.unwrap();
    assert_eq!(got.public_key, Some(key(2)));
    // A node may move to a fresh key; its old key is free again.
    store
        .claim_key(NodeKind::Agent, a.id, &key(9))
        .await
        .unwrap();
    store
        .claim_key(NodeKind::Agent, b.id, &key(1))
        .await
        .unwrap();
    // Deleting a node frees its key.
    store.delete_node(NodeKind::Agent, b.id).await.unwrap();
    store
        .claim_key(NodeKind::Agent, a.id, &key(1))
        .await
        .unwrap();
}

async fn revoking_and_regenerating_drop_the_credential_and_the_key(store: Store) {
    let (s, st) = add_site(&store, "s").await;
    let (g, gt) = add_gateway(&store, "g", "gw.example:51820").await;
    let resp = store.enroll(NodeKind::Agent, &st, &key(1)).await.unwrap();
    store.enroll(NodeKind::Gateway, &gt, &key(2)).await.unwrap();
    assert_eq!(
        snapshot(&store, NodeKind::Gateway, g.id).await.peers.len(),
        1
    );
    let v = store.config_version().await.unwrap();
    store.revoke_node(NodeKind::Agent, s.id).await.unwrap();
    assert!(store.config_version().await.unwrap() > v, "revoking bumps");
    assert!(matches!(
        store
            .authenticate_node(NodeKind::Agent, s.id, &resp.credential)
            .await,
        Err(StoreError::BadSecret)
    ));
    let node = store.get_node(NodeKind::Agent, s.id).await.unwrap();
    assert!(!node.enrolled());
    assert!(snapshot(&store, NodeKind::Gateway, g.id)
        .await
        .peers
        .is_empty());
    // Its key is free; a new token brings the node back, and regenerating revokes again.
    let t2 = store
        .regenerate_enrollment_token(NodeKind::Agent, s.id)
        .await
        .unwrap();
    let resp2 = store.enroll(NodeKind::Agent, &t2, &key(1)).await.unwrap();
    store
        .authenticate_node(NodeKind::Agent, s.id, &resp2.credential)
        .await
        .unwrap();
    let _t3 = store
        .regenerate_enrollment_token(NodeKind::Agent, s.id)
        .await
        .unwrap();
    assert!(store
        .authenticate_node(NodeKind::Agent, s.id, &resp2.credential)
        .await
        .is_err());
    assert!(matches!(
        store
            .revoke_node(NodeKind::Agent, uuid::Uuid::new_v4())
            .await,
        Err(StoreError::NotFound(_))
    ));
}

async fn expired_enrollment_tokens_are_refused(store: Store) {
    let store = store.with_enrollment_token_ttl(std::time::Duration::from_millis(1));
    let (_s, st) = add_site(&store, "s").await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert!(matches!(
        store.enroll(NodeKind::Agent, &st, &key(1)).await,
        Err(StoreError::Expired)
    ));
    let store = store.with_enrollment_token_ttl(std::time::Duration::from_secs(60));
    let (_s, st) = add_site(&store, "t").await;
    store.enroll(NodeKind::Agent, &st, &key(1)).await.unwrap();
}

async fn legacy_argon2_hashes_still_work_and_are_replaced(store: Store) {
    let (s, st) = add_site(&store, "s").await;
    let resp = store.enroll(NodeKind::Agent, &st, &key(1)).await.unwrap();
    // As an earlier version stored it.
    let legacy = secrets::hash_password(&resp.credential).await.unwrap();
    store
        .set_credential_hash_for_test(NodeKind::Agent, s.id, &legacy)
        .await;
    let digest = store
        .authenticate_node(NodeKind::Agent, s.id, &resp.credential)
        .await
        .unwrap();
    assert_eq!(digest, secrets::digest(&resp.credential));
    assert_eq!(
        store
            .authenticate_node(NodeKind::Agent, s.id, &resp.credential)
            .await
            .unwrap(),
        digest,
        "the digest replaced the argon2 hash"
    );
}

async fn activity_is_written_in_one_batch(store: Store) {
    let mut batch = Vec::new();
    let mut ids = Vec::new();
    for i in 0..50 {
        let (s, _) = add_site(&store, &format!("s{i}")).await;
        ids.push(s.id);
        batch.push((
            (NodeKind::Agent, s.id),
            NodeActivity {
                seen_at: Some(1000 + i),
                applied_version: Some(7),
                software_version: Some("1.2.3".into()),
                status: Some((
                    "{\"applied_version\":7,\"peers\":[],\"targets\":[]}".into(),
                    999,
                )),
            },
        ));
    }
    store.record_activity(&batch).await.unwrap();
    let n = store.get_node(NodeKind::Agent, ids[49]).await.unwrap();
    assert_eq!(n.last_seen_at, Some(1049));
    assert_eq!(n.applied_version, Some(7));
    assert_eq!(n.software_version.as_deref(), Some("1.2.3"));
    assert_eq!(n.last_status_at, Some(999));
    // Fields left out keep their values.
    store
        .record_activity(&[(
            (NodeKind::Agent, ids[0]),
            NodeActivity {
                seen_at: Some(5000),
                ..Default::default()
            },
        )])
        .await
        .unwrap();
    let n = store.get_node(NodeKind::Agent, ids[0]).await.unwrap();
    assert_eq!(n.last_seen_at, Some(5000));
    assert_eq!(n.applied_version, Some(7));
    assert!(n.last_status.is_some());
}

async fn tcp_resources_get_unique_public_ports_and_reach_gateways(store: Store) {
    let (s, st) = add_site(&store, "s").await;
    let (g, gt) = add_gateway(&store, "g", "gw.example:51820").await;
    store.enroll(NodeKind::Agent, &st, &key(1)).await.unwrap();
    store.enroll(NodeKind::Gateway, &gt, &key(2)).await.unwrap();
    let tcp = |port: Option<u16>| NewResource {
        name: "db".into(),
        protocol: RouteProtocol::Tcp,
        hostname: String::new(),
        public_port: port,
        redirect_https: false,
        hsts_max_age: None,
        site_id: s.id,
        target: "127.0.0.1:5432".into(),
        balance: Default::default(),
        sticky: false,
        health_check: None,
        limits: Default::default(),
        proxy_protocol: false,
        more_targets: vec![],
        access: None,
        policy_id: None,
    };
    let a = store.create_resource(&tcp(None)).await.unwrap();
    assert_eq!(a.public_port, Some(20000));
    assert_eq!(a.protocol, RouteProtocol::Tcp);
    let b = store.create_resource(&tcp(None)).await.unwrap();
    assert_eq!(b.public_port, Some(20001), "the lowest free port");
    let c = store.create_resource(&tcp(Some(15432))).await.unwrap();
    assert_eq!(c.public_port, Some(15432));
    assert!(matches!(
        store.create_resource(&tcp(Some(15432))).await,
        Err(StoreError::Conflict(_))
    ));
    // A UDP resource takes a public port too (numbers are shared with TCP), and keeps its kind.
    let udp = store
        .create_resource(&NewResource {
            protocol: RouteProtocol::Udp,
            name: "dns".into(),
            ..tcp(Some(15353))
        })
        .await
        .unwrap();
    assert_eq!(udp.protocol, RouteProtocol::Udp);
    assert_eq!(
        store.get_resource(udp.id).await.unwrap().protocol,
        RouteProtocol::Udp
    );
    assert!(matches!(
        store
            .create_resource(&NewResource {
                protocol: RouteProtocol::Udp,
                ..tcp(Some(15432))
            })
            .await,
        Err(StoreError::Conflict(_))
    ));
    let udp_routes: Vec<_> = snapshot(&store, NodeKind::Gateway, g.id)
        .await
        .routes
        .into_iter()
        .filter(|r| r.protocol == RouteProtocol::Udp)
        .map(|r| r.public_port)
        .collect();
    assert_eq!(udp_routes, [Some(15353)]);
    store.delete_resource(udp.id).await.unwrap();
    // TCP resources have no hostname, so several coexist with HTTP ones.
    add_resource(&store, "web.localhost", s.id).await;
    let snap = snapshot(&store, NodeKind::Gateway, g.id).await;
    let mut ports: Vec<_> = snap
        .routes
        .iter()
        .filter(|r| r.protocol == RouteProtocol::Tcp)
        .map(|r| r.public_port.unwrap())
        .collect();
    ports.sort();
    assert_eq!(ports, [15432, 20000, 20001]);
    assert!(snap
        .routes
        .iter()
        .any(|r| r.protocol == RouteProtocol::Http && r.hostname == "web.localhost"));
    // The agent gets a target per resource, whatever the protocol.
    assert_eq!(
        snapshot(&store, NodeKind::Agent, s.id).await.targets.len(),
        4
    );
    // A port moves; the same port twice is refused; a hostname on TCP is invalid.
    let moved = store
        .update_resource(
            b.id,
            &ResourcePatch {
                public_port: Some(20005),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(moved.public_port, Some(20005));
    assert!(matches!(
        store
            .update_resource(
                b.id,
                &ResourcePatch {
                    public_port: Some(15432),
                    ..Default::default()
                },
            )
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store
            .update_resource(
                b.id,
                &ResourcePatch {
                    hostname: Some("x.localhost".into()),
                    ..Default::default()
                },
            )
            .await,
        Err(StoreError::Invalid(_))
    ));
    // Keeping its own port is fine.
    store
        .update_resource(
            b.id,
            &ResourcePatch {
                public_port: Some(20005),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let listed = store.list_resources().await.unwrap();
    assert_eq!(listed.len(), 4);
}

async fn https_redirect_and_hsts_round_trip_into_gateway_routes(store: Store) {
    let (s, st) = add_site(&store, "s").await;
    let (g, gt) = add_gateway(&store, "g", "gw.example:51820").await;
    store.enroll(NodeKind::Agent, &st, &key(1)).await.unwrap();
    store.enroll(NodeKind::Gateway, &gt, &key(2)).await.unwrap();
    let r = add_resource(&store, "a.localhost", s.id).await;
    assert!(!r.redirect_https);
    assert_eq!(r.hsts_max_age, None);
    let r = store
        .update_resource(
            r.id,
            &ResourcePatch {
                redirect_https: Some(true),
                hsts_max_age: Some(Some(600)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(r.redirect_https);
    assert_eq!(
        store.get_resource(r.id).await.unwrap().hsts_max_age,
        Some(600)
    );
    let snap = snapshot(&store, NodeKind::Gateway, g.id).await;
    assert!(snap.routes[0].redirect_https);
    assert_eq!(snap.routes[0].hsts_max_age, Some(600));
    // null clears HSTS; absent keeps the redirect.
    let r = store
        .update_resource(
            r.id,
            &ResourcePatch {
                hsts_max_age: Some(None),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(r.redirect_https);
    assert_eq!(store.get_resource(r.id).await.unwrap().hsts_max_age, None);
}

async fn several_targets_get_ports_on_their_sites_and_reach_gateways_and_agents(store: Store) {
    let (a, at) = add_site(&store, "a").await;
    let (b, bt) = add_site(&store, "b").await;
    let (g, gt) = add_gateway(&store, "g", "gw.example:51820").await;
    store.enroll(NodeKind::Agent, &at, &key(1)).await.unwrap();
    store.enroll(NodeKind::Agent, &bt, &key(3)).await.unwrap();
    store.enroll(NodeKind::Gateway, &gt, &key(2)).await.unwrap();
    let check = kakuremichi_proto::HealthCheck {
        path: Some("/healthz".into()),
        expected_status: Some(204),
        interval_ms: 1000,
        timeout_ms: 300,
        unhealthy_threshold: 1,
        healthy_threshold: 2,
    };
    let r = store
        .create_resource(&NewResource {
            balance: kakuremichi_proto::Balance::LeastOutstanding,
            sticky: true,
            health_check: Some(check.clone()),
            more_targets: vec![nt(b.id, "10.0.0.2:80"), nt(a.id, "10.0.0.3:80")],
            ..res("lb.example", a.id)
        })
        .await
        .unwrap();
    assert_eq!(r.overlay_port, 10000);
    let ports: Vec<_> = r
        .more_targets
        .iter()
        .map(|t| (t.site_id, t.overlay_port))
        .collect();
    assert_eq!(ports, [(b.id, 10000), (a.id, 10001)], "ports are per site");
    assert_eq!(r.health_check.as_ref(), Some(&check));
    // A later resource on site a does not reuse a target's port.
    let other = add_resource(&store, "other.example", a.id).await;
    assert_eq!(other.overlay_port, 10002);
    let added = store
        .add_resource_target(r.id, &nt(b.id, "10.0.0.4:80"))
        .await
        .unwrap();
    assert_eq!(added.overlay_port, 10001);
    assert!(matches!(
        store
            .add_resource_target(uuid::Uuid::new_v4(), &nt(b.id, "h:1"))
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store
            .add_resource_target(r.id, &nt(uuid::Uuid::new_v4(), "h:1"))
            .await,
        Err(StoreError::Invalid(_))
    ));
    let gw = snapshot(&store, NodeKind::Gateway, g.id).await;
    let route = gw.routes.iter().find(|x| x.resource_id == r.id).unwrap();
    assert_eq!(route.more_backends.len(), 3);
    assert_eq!(route.balance, kakuremichi_proto::Balance::LeastOutstanding);
    assert!(route.sticky);
    let agent_b = snapshot(&store, NodeKind::Agent, b.id).await;
    let ports: Vec<_> = agent_b.targets.iter().map(|t| t.port).collect();
    assert_eq!(ports, [10000, 10001]);
    assert_eq!(agent_b.targets[0].health_check.as_ref(), Some(&check));
    assert_eq!(agent_b.targets[0].hostname, "lb.example");
    // Patch, remove a target, and the site's deletion takes its targets with it.
    let patched = store
        .update_resource(
            r.id,
            &ResourcePatch {
                balance: Some(kakuremichi_proto::Balance::RoundRobin),
                health_check: Some(None),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(patched.balance, kakuremichi_proto::Balance::RoundRobin);
    assert!(patched.health_check.is_none());
    assert_eq!(patched.more_targets.len(), 3);
    store.delete_resource_target(r.id, added.id).await.unwrap();
    assert!(matches!(
        store.delete_resource_target(r.id, added.id).await,
        Err(StoreError::NotFound(_))
    ));
    let before = store.config_version().await.unwrap();
    store.delete_node(NodeKind::Agent, b.id).await.unwrap();
    assert!(store.config_version().await.unwrap() > before);
    let left = store.get_resource(r.id).await.unwrap();
    let sites: Vec<_> = left.more_targets.iter().map(|t| t.site_id).collect();
    assert_eq!(sites, [a.id]);
}

async fn limits_and_proxy_protocol_are_stored_and_pushed(store: Store) {
    let (a, at) = add_site(&store, "a").await;
    let (g, gt) = add_gateway(&store, "g", "gw.example:51820").await;
    store.enroll(NodeKind::Agent, &at, &key(1)).await.unwrap();
    store.enroll(NodeKind::Gateway, &gt, &key(2)).await.unwrap();
    let limits = kakuremichi_proto::Limits {
        max_request_body_bytes: Some(1024),
        response_timeout_ms: Some(5000),
        idle_timeout_ms: Some(2500),
    };
    let http = store
        .create_resource(&NewResource {
            limits,
            ..res("limited.example", a.id)
        })
        .await
        .unwrap();
    assert_eq!(store.get_resource(http.id).await.unwrap().limits, limits);
    let db = store
        .create_resource(&NewResource {
            protocol: RouteProtocol::Tcp,
            hostname: String::new(),
            proxy_protocol: true,
            more_targets: vec![
                NewTarget {
                    proxy_protocol: Some(false),
                    ..nt(a.id, "10.0.0.2:5432")
                },
                nt(a.id, "10.0.0.3:5432"),
            ],
            ..res("db", a.id)
        })
        .await
        .unwrap();
    let pp: Vec<_> = db.more_targets.iter().map(|t| t.proxy_protocol).collect();
    assert_eq!(pp, [Some(false), None]);
    let gw = snapshot(&store, NodeKind::Gateway, g.id).await;
    let route = gw.routes.iter().find(|x| x.resource_id == db.id).unwrap();
    assert!(route.proxy_protocol);
    let more: Vec<_> = route
        .more_backends
        .iter()
        .map(|b| b.proxy_protocol)
        .collect();
    assert_eq!(
        more,
        [false, true],
        "a target without a say follows the resource"
    );
    let limited = gw.routes.iter().find(|x| x.resource_id == http.id).unwrap();
    assert_eq!(limited.limits, limits);
    assert!(!limited.proxy_protocol);
    // Turned off on the resource: the target that said nothing follows.
    let patched = store
        .update_resource(
            db.id,
            &ResourcePatch {
                proxy_protocol: Some(false),
                limits: Some(kakuremichi_proto::Limits {
                    idle_timeout_ms: Some(1000),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(!patched.proxy_protocol);
    assert_eq!(patched.limits.idle_timeout_ms, Some(1000));
    let gw = snapshot(&store, NodeKind::Gateway, g.id).await;
    let route = gw.routes.iter().find(|x| x.resource_id == db.id).unwrap();
    assert!(!route.proxy_protocol);
    assert!(route.more_backends.iter().all(|b| !b.proxy_protocol));
    // PROXY protocol is refused on an HTTP resource's targets.
    assert!(matches!(
        store
            .add_resource_target(
                http.id,
                &NewTarget {
                    proxy_protocol: Some(true),
                    ..nt(a.id, "h:1")
                }
            )
            .await,
        Err(StoreError::Invalid(_))
    ));
}

/// Three replicas started at the same moment on an empty PostgreSQL database all come up: the
/// migrations and the first-run seeding take turns, the first seeds, the others find its keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_started_together_on_an_empty_postgres_all_come_up_with_one_set_of_keys() {
    for initial in [
        Some(kakuremichi_proto::Secret::new(common::ADMIN_KEY)),
        None,
    ] {
        let (url, _guard) = common::empty_postgres().await;
        let start = |url: String, initial: Option<kakuremichi_proto::Secret>| async move {
            let store = kakuremichi_control::store::Store::connect_with(
                &url,
                kakuremichi_control::overlay::OverlayNet::DEFAULT,
                4,
            )
            .await?
            .with_sealer(std::sync::Arc::new(kakuremichi_control::seal::Sealer::new(
                [5; 32],
            )));
            store.ensure_signing_key().await?;
            let made = store.ensure_admin_key(initial.as_ref()).await?;
            Ok::<_, kakuremichi_control::store::StoreError>((store, made))
        };
        let (a, b, c) = tokio::join!(
            start(url.clone(), initial.clone()),
            start(url.clone(), initial.clone()),
            start(url.clone(), initial.clone()),
        );
        let started = [a, b, c]
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("a replica did not come up: {e}")))
            .collect::<Vec<_>>();
        // One admin key made (and printed by one replica only when generated), one signing key.
        let generated = started.iter().filter(|(_, made)| made.is_some()).count();
        assert_eq!(generated, usize::from(initial.is_none()), "{initial:?}");
        let store = &started[0].0;
        let keys = store
            .list_api_keys(kakuremichi_control::store::DEFAULT_ORG)
            .await
            .unwrap();
        assert_eq!(keys.len(), 1, "{keys:?}");
        let published = store.published_keys(0).await.unwrap();
        assert_eq!(published.len(), 1, "{published:?}");
    }
}

/// Rolling upgrade: a replica of the version before (re)starts on a database a newer release has
/// already migrated further (a migration it does not know is recorded), and comes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_of_the_version_before_starts_on_a_database_a_newer_release_migrated() {
    use sqlx::Connection as _;
    let (url, _guard) = common::empty_postgres().await;
    let connect = || {
        kakuremichi_control::store::Store::connect_with(
            &url,
            kakuremichi_control::overlay::OverlayNet::DEFAULT,
            2,
        )
    };
    connect().await.unwrap().close().await;
    // What a newer release leaves: one more (additive) migration applied.
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE from_a_newer_release (id TEXT PRIMARY KEY)")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99999999, 'from a newer release', TRUE, '\\x00'::bytea, 1)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let store = connect()
        .await
        .unwrap_or_else(|e| panic!("the older replica did not start: {e}"));
    assert!(store.config_version().await.is_ok());
}

/// A replica started with another secrets key than the one that sealed the database's signing
/// key refuses to start, saying which file to copy, rather than serve tokens nobody can check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_another_secrets_key_refuses_to_start_and_says_why() {
    let (url, _guard) = common::empty_postgres().await;
    let with_key = |key: u8| {
        let url = url.clone();
        async move {
            let store = kakuremichi_control::store::Store::connect_with(
                &url,
                kakuremichi_control::overlay::OverlayNet::DEFAULT,
                2,
            )
            .await?
            .with_sealer(std::sync::Arc::new(kakuremichi_control::seal::Sealer::new(
                [key; 32],
            )));
            store.ensure_signing_key().await
        }
    };
    with_key(1).await.unwrap();
    with_key(1).await.unwrap();
    let err = with_key(2).await.unwrap_err().to_string();
    assert!(err.contains("secrets key"), "{err}");
}

/// Two replicas on one PostgreSQL: a config change committed through one is published on the
/// other's signal (NOTIFY), and an agent session's change reported to one reaches the other's
/// status streams and long polls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_hears_the_other_replicas_config_changes_and_session_changes() {
    let (url, _guard) = common::empty_postgres().await;
    let open = || async {
        kakuremichi_control::store::Store::connect_with(
            &url,
            kakuremichi_control::overlay::OverlayNet::DEFAULT,
            4,
        )
        .await
        .unwrap()
        .with_sealer(std::sync::Arc::new(kakuremichi_control::seal::Sealer::new(
            [3; 32],
        )))
    };
    let a = kakuremichi_control::AppState::new(open().await);
    let b = kakuremichi_control::AppState::new(open().await);
    tokio::spawn(kakuremichi_control::replicas::follow_changes(
        b.clone(),
        url.clone(),
    ));
    let mut sessions = b.session_events.subscribe();
    let mut versions = b.store.subscribe();

    let (site, _) = a
        .store
        .create_node(NodeKind::Agent, DEFAULT_ORG, "box", None)
        .await
        .unwrap();
    let made = a.store.config_version().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while *versions.borrow_and_update() < made {
            versions.changed().await.unwrap();
        }
    })
    .await
    .expect("the other replica publishes the version");

    let session = a
        .store
        .create_agent_session(
            kakuremichi_control::store::NewAgentSession {
                org_id: DEFAULT_ORG,
                user_id: None,
                scope: "user".into(),
                team_id: None,
                site_id: site.id,
                tags: Default::default(),
                params: serde_json::json!({}),
                ttl_secs: None,
            },
            &Default::default(),
        )
        .await
        .unwrap();
    // The listening connection may still be opening: say it again until heard (at most 10 s).
    let heard = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            a.session_changed(session.clone()).await;
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(500), sessions.recv()).await
            {
                return s;
            }
        }
    })
    .await
    .expect("the other replica hears of the session");
    assert_eq!(heard.id, session.id);
}
