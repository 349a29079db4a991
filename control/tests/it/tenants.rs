//! Organizations stay apart: a key of organization B walks every API route against organization
//! A's things and gets "not found" (or "forbidden" for the instance's own routes), never A's
//! data or a change to it; B's lists hold nothing of A's; and the snapshots that gateways and
//! agents receive hold only their own organization's sites, routes and gateways (plus the shared
//! gateways of the default organization).

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt as _;
use kakuremichi_control::store::{Store, DEFAULT_ORG};
use kakuremichi_control::{app, AppState};
use kakuremichi_proto::{NodeKind, Secret};
use serde_json::{json, Value};
use tower::ServiceExt as _;
use uuid::Uuid;

use crate::common::ADMIN_KEY;

struct Api {
    router: Router,
    store: Store,
    _dir: tempfile::TempDir,
}

impl Api {
    async fn new() -> Api {
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("control.db").display()
        );
        let store = Store::connect(&url, kakuremichi_control::overlay::OverlayNet::DEFAULT)
            .await
            .unwrap()
            .with_sealer(std::sync::Arc::new(
                kakuremichi_control::seal::Sealer::from_file(&dir.path().join("secrets.key"), true)
                    .unwrap(),
            ));
        store
            .ensure_admin_key(Some(&Secret::new(ADMIN_KEY)))
            .await
            .unwrap();
        Api {
            router: app(AppState::new(store.clone())),
            store,
            _dir: dir,
        }
    }

    async fn call(
        &self,
        key: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("/api/v1{path}"))
            .header(header::AUTHORIZATION, format!("Bearer {key}"));
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
        let resp = self
            .router
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("not JSON ({e}): {bytes:?}"))
        };
        (status, v)
    }

    /// A call that must answer `want`; returns the body.
    async fn ok(
        &self,
        key: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
        want: StatusCode,
    ) -> Value {
        let (s, v) = self.call(key, method.clone(), path, body).await;
        assert_eq!(s, want, "{method} {path}: {v}");
        v
    }

    async fn enroll(&self, token: &Value, kind: &str, key: u8) {
        let req = Request::builder()
            .method(Method::POST)
            .uri("/api/v1/enroll")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                json!({
                    "protocol_version": 1,
                    "kind": kind,
                    "token": token,
                    "public_key": kakuremichi_proto::WgPublicKey([key; 32]).to_base64(),
                })
                .to_string(),
            ))
            .unwrap();
        let resp = self.router.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
}

/// One organization's things, made through the API with its admin key.
struct Tenant {
    key: String,
    org: String,
    site: String,
    gateway: String,
    resource: String,
    target: String,
    user: String,
    api_key: String,
    provider: String,
    certificate: String,
    share_link: String,
    policy: String,
}

async fn tenant(api: &Api, name: &str, n: u8) -> Tenant {
    let created = api
        .ok(
            ADMIN_KEY,
            Method::POST,
            "/orgs",
            Some(json!({"name": name})),
            StatusCode::CREATED,
        )
        .await;
    let key = created["admin_key"].as_str().unwrap().to_owned();
    let org = created["id"].as_str().unwrap().to_owned();
    let k = key.as_str();
    let site = api
        .ok(
            k,
            Method::POST,
            "/sites",
            Some(json!({"name": format!("{name}-site")})),
            StatusCode::CREATED,
        )
        .await;
    api.enroll(&site["enrollment_token"], "agent", n).await;
    let gateway = api
        .ok(
            k,
            Method::POST,
            "/gateways",
            Some(
                json!({"name": format!("{name}-gw"), "endpoint": format!("{name}.example:51820")}),
            ),
            StatusCode::CREATED,
        )
        .await;
    api.enroll(&gateway["enrollment_token"], "gateway", n + 100)
        .await;
    let site = site["id"].as_str().unwrap().to_owned();
    let resource = api
        .ok(
            k,
            Method::POST,
            "/resources",
            Some(
                json!({"hostname": format!("{name}.example"), "site_id": site,
                        "target": "127.0.0.1:9000", "access": {"roles": ["member"]}}),
            ),
            StatusCode::CREATED,
        )
        .await;
    let resource = resource["id"].as_str().unwrap().to_owned();
    let target = api
        .ok(
            k,
            Method::POST,
            &format!("/resources/{resource}/targets"),
            Some(json!({"site_id": site, "target": "127.0.0.1:9001"})),
            StatusCode::CREATED,
        )
        .await;
    let user = api
        .ok(
            k,
            Method::POST,
            "/users",
            Some(json!({"email": format!("someone@{name}.example"), "roles": ["member"]})),
            StatusCode::CREATED,
        )
        .await;
    api.ok(
        k,
        Method::POST,
        "/roles",
        Some(json!({"name": "deployer", "description": name, "permissions": ["resource:write"]})),
        StatusCode::CREATED,
    )
    .await;
    let api_key = api
        .ok(
            k,
            Method::POST,
            "/api-keys",
            Some(json!({"name": "ci", "scopes": ["site:read"]})),
            StatusCode::CREATED,
        )
        .await;
    let provider = api
        .ok(
            k,
            Method::POST,
            "/identity-providers",
            Some(json!({"name": format!("{name}-op"), "kind": "oidc",
                        "issuer": format!("https://op.{name}.example"),
                        "client_id": "c", "client_secret": "s"})),
            StatusCode::CREATED,
        )
        .await;
    let made = rcgen::generate_simple_self_signed(vec![format!("{name}.example")]).unwrap();
    let certificate = api
        .ok(
            k,
            Method::POST,
            "/certificates",
            Some(
                json!({"chain_pem": made.cert.pem(), "key_pem": made.signing_key.serialize_pem()}),
            ),
            StatusCode::CREATED,
        )
        .await;
    let share_link = api
        .ok(
            k,
            Method::POST,
            &format!("/resources/{resource}/share-links"),
            Some(json!({"name": format!("{name} guests"), "max_uses": 3})),
            StatusCode::CREATED,
        )
        .await;
    api.ok(
        k,
        Method::PUT,
        &format!("/resources/{resource}/passcode"),
        Some(json!({"kind": "password", "value": format!("{name} secret")})),
        StatusCode::OK,
    )
    .await;
    let policy = api
        .ok(
            k,
            Method::POST,
            "/policies",
            Some(json!({"name": "staff", "access": {"roles": ["member"]}})),
            StatusCode::CREATED,
        )
        .await;
    let s = |v: &Value| v["id"].as_str().unwrap().to_owned();
    Tenant {
        policy: s(&policy),
        share_link: s(&share_link),
        key,
        org,
        site,
        gateway: s(&gateway),
        resource,
        target: s(&target),
        user: s(&user),
        api_key: s(&api_key),
        provider: s(&provider),
        certificate: s(&certificate),
    }
}

/// Every API route behind a key, as `(method, route pattern)`: the walk below covers each, and
/// [`the_walk_covers_every_route`] fails when a route is added without joining it.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/sites"),
    ("POST", "/sites"),
    ("GET", "/sites/{id}"),
    ("PATCH", "/sites/{id}"),
    ("DELETE", "/sites/{id}"),
    ("POST", "/sites/{id}/enrollment-token"),
    ("POST", "/sites/{id}/revoke"),
    ("GET", "/gateways"),
    ("POST", "/gateways"),
    ("GET", "/gateways/{id}"),
    ("PATCH", "/gateways/{id}"),
    ("DELETE", "/gateways/{id}"),
    ("POST", "/gateways/{id}/enrollment-token"),
    ("POST", "/gateways/{id}/revoke"),
    ("GET", "/resources"),
    ("POST", "/resources"),
    ("GET", "/resources/{id}"),
    ("PATCH", "/resources/{id}"),
    ("DELETE", "/resources/{id}"),
    ("POST", "/resources/{id}/targets"),
    ("DELETE", "/resources/{id}/targets/{target_id}"),
    ("GET", "/policies"),
    ("POST", "/policies"),
    ("GET", "/policies/{id}"),
    ("PATCH", "/policies/{id}"),
    ("DELETE", "/policies/{id}"),
    ("GET", "/resources/{id}/share-links"),
    ("POST", "/resources/{id}/share-links"),
    ("DELETE", "/resources/{id}/share-links/{link_id}"),
    ("GET", "/resources/{id}/passcode"),
    ("PUT", "/resources/{id}/passcode"),
    ("DELETE", "/resources/{id}/passcode"),
    ("GET", "/certificates"),
    ("POST", "/certificates"),
    ("GET", "/certificates/{id}"),
    ("DELETE", "/certificates/{id}"),
    ("POST", "/certificates/{id}/renew"),
    ("GET", "/config/version"),
    ("GET", "/users"),
    ("POST", "/users"),
    ("GET", "/users/{id}"),
    ("PATCH", "/users/{id}"),
    ("DELETE", "/users/{id}"),
    ("POST", "/users/{id}/sign-out"),
    ("POST", "/users/{id}/totp"),
    ("DELETE", "/users/{id}/totp"),
    ("GET", "/signing-keys"),
    ("POST", "/signing-keys/rotate"),
    ("GET", "/audit"),
    ("GET", "/api-keys"),
    ("POST", "/api-keys"),
    ("DELETE", "/api-keys/{id}"),
    ("GET", "/identity-providers"),
    ("POST", "/identity-providers"),
    ("GET", "/identity-providers/{id}"),
    ("DELETE", "/identity-providers/{id}"),
    ("GET", "/roles"),
    ("POST", "/roles"),
    ("GET", "/roles/{name}"),
    ("PATCH", "/roles/{name}"),
    ("DELETE", "/roles/{name}"),
    ("GET", "/orgs"),
    ("POST", "/orgs"),
    ("GET", "/orgs/{id}"),
    ("PATCH", "/orgs/{id}"),
    ("DELETE", "/orgs/{id}"),
    ("POST", "/orgs/{id}/members"),
    ("GET", "/resources/stats"),
    ("GET", "/resources/oauth-grants"),
    ("DELETE", "/resources/oauth-grants/{id}"),
    ("GET", "/me"),
    ("GET", "/me/api-keys"),
    ("POST", "/me/api-keys"),
    ("DELETE", "/me/api-keys/{id}"),
    ("POST", "/me/password"),
];

#[test]
fn the_walk_covers_every_route() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/api");
    let mut found = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        if path.ends_with("nodes.rs") {
            for base in ["/sites", "/gateways"] {
                for (m, p) in [
                    ("GET", ""),
                    ("POST", ""),
                    ("GET", "/{id}"),
                    ("PATCH", "/{id}"),
                    ("DELETE", "/{id}"),
                    ("POST", "/{id}/enrollment-token"),
                    ("POST", "/{id}/revoke"),
                ] {
                    found.insert((m.to_owned(), format!("{base}{p}")));
                }
            }
            // The node routes above are what nodes.rs declares.
            assert_eq!(
                text.matches(".route(").count(),
                4,
                "nodes.rs changed its routes"
            );
            continue;
        }
        // Each `.route(` and what follows up to the next one (or the end of the router's
        // function): the path, on its line or the next, and the handlers' methods.
        for chunk in text.split(".route(").skip(1) {
            let chunk = chunk.split("\n}\n").next().unwrap_or("");
            let Some(rest) = chunk.trim_start().strip_prefix('"') else {
                continue;
            };
            let Some((route, handlers)) = rest.split_once('"') else {
                continue;
            };
            for (name, method) in [
                ("get(", "GET"),
                ("post(", "POST"),
                ("patch(", "PATCH"),
                ("delete(", "DELETE"),
            ] {
                if handlers.contains(name) {
                    found.insert((method.to_owned(), route.to_owned()));
                }
            }
        }
    }
    // Node enrollment is by one-time token, not by organization key; the API's description
    // is public.
    found.remove(&("POST".to_owned(), "/enroll".to_owned()));
    found.remove(&("GET".to_owned(), "/openapi.json".to_owned()));
    let walked: BTreeSet<_> = ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    let missing: Vec<_> = found.difference(&walked).collect();
    assert!(
        missing.is_empty(),
        "routes the tenant walk does not cover: {missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organization_b_can_neither_see_nor_touch_nor_reach_organization_a() {
    let api = Api::new().await;
    let a = tenant(&api, "alpha", 1).await;
    let b = tenant(&api, "beta", 2).await;
    // A shared gateway of the default organization.
    let shared = api
        .ok(
            ADMIN_KEY,
            Method::POST,
            "/gateways",
            Some(json!({"name": "shared", "endpoint": "shared.example:51820"})),
            StatusCode::CREATED,
        )
        .await;
    api.enroll(&shared["enrollment_token"], "gateway", 200)
        .await;
    let before = a_as_seen_by_a(&api, &a).await;

    // Walk every route as B, aimed at A's things.
    let bk = b.key.as_str();
    for (method, pattern) in ROUTES {
        let id = match pattern.split('/').nth(1).unwrap() {
            "sites" => &a.site,
            "gateways" => &a.gateway,
            "resources" => &a.resource,
            "certificates" => &a.certificate,
            "users" => &a.user,
            "api-keys" => &a.api_key,
            "identity-providers" => &a.provider,
            "orgs" => &a.org,
            "policies" => &a.policy,
            "me" => &a.api_key,
            _ => "deployer",
        };
        let path = pattern
            .replace("{id}", id)
            .replace("{name}", "nosuchrole")
            .replace("{target_id}", &a.target)
            .replace("{link_id}", &a.share_link);
        let body = match (*method, *pattern) {
            ("GET" | "DELETE", _) => None,
            ("POST", "/resources") => {
                Some(json!({"hostname": "x.beta.example", "site_id": a.site, "target": "h:1"}))
            }
            ("POST", "/resources/{id}/targets") => {
                Some(json!({"site_id": a.site, "target": "h:1"}))
            }
            ("PATCH", "/resources/{id}") => Some(json!({"name": "taken"})),
            ("POST", "/resources/{id}/share-links") => Some(json!({"max_uses": 1})),
            ("PUT", "/resources/{id}/passcode") => Some(json!({"kind": "pin", "value": "000000"})),
            ("POST", "/api-keys") => {
                Some(json!({"name": "x", "scopes": ["site:read"], "user_id": a.user}))
            }
            ("PATCH", "/users/{id}") => Some(json!({"roles": ["viewer"]})),
            ("PATCH", "/roles/{name}") => Some(json!({"description": "taken"})),
            ("POST", "/orgs/{id}/members") => Some(json!({"email": "someone@beta.example"})),
            ("POST", "/orgs") => Some(json!({"name": "gamma"})),
            ("POST", "/me/api-keys") => Some(json!({"name": "mine"})),
            ("POST", "/me/password") => Some(json!({"new_password": "a long new password"})),
            ("PATCH", _) => Some(json!({"name": "taken"})),
            (
                "POST",
                "/sites"
                | "/gateways"
                | "/users"
                | "/roles"
                | "/certificates"
                | "/identity-providers"
                | "/policies",
            ) => {
                // Creations make B's own things; checked below by what B's lists hold.
                continue;
            }
            _ => None,
        };
        let (s, v) = api
            .call(
                bk,
                Method::from_bytes(method.as_bytes()).unwrap(),
                &path,
                body,
            )
            .await;
        let allowed: &[StatusCode] = match (*method, *pattern) {
            // Lists: B's own things only (checked below).
            (
                "GET",
                "/sites"
                | "/gateways"
                | "/resources"
                | "/certificates"
                | "/users"
                | "/audit"
                | "/api-keys"
                | "/identity-providers"
                | "/roles"
                | "/orgs"
                | "/policies"
                | "/resources/stats"
                | "/resources/oauth-grants",
            ) => &[StatusCode::OK],
            // B's key is its organization's admin key, which is no user's: no "me".
            (_, "/me" | "/me/api-keys" | "/me/api-keys/{id}" | "/me/password") => {
                &[StatusCode::BAD_REQUEST]
            }
            // Instance-wide facts that belong to no organization.
            ("GET", "/config/version" | "/signing-keys") => &[StatusCode::OK],
            // A's site or user named in B's request: the same answer as for one that does not exist.
            ("POST", "/resources" | "/api-keys") => &[StatusCode::BAD_REQUEST],
            // Only the default organization's keys.
            ("POST", "/signing-keys/rotate" | "/orgs" | "/orgs/{id}/members")
            | ("DELETE", "/orgs/{id}") => &[StatusCode::FORBIDDEN],
            _ => &[StatusCode::NOT_FOUND],
        };
        assert!(allowed.contains(&s), "B {method} {path}: {s} {v}");
        let text = v.to_string();
        if *pattern == "/audit" {
            // B's log holds B's own requests (with the ids B typed), nothing of A's.
            for e in v.as_array().unwrap() {
                assert_eq!(e["org_id"], b.org.as_str(), "B's audit holds {e}");
            }
        } else if s == StatusCode::OK {
            // Lists never show A's things.
            for id in [
                &a.site,
                &a.gateway,
                &a.resource,
                &a.user,
                &a.api_key,
                &a.provider,
                &a.certificate,
                &a.share_link,
                &a.policy,
            ] {
                assert!(
                    !text.contains(id.as_str()),
                    "B {method} {path} shows A's {id}: {text}"
                );
            }
            assert!(
                !text.contains("alpha"),
                "B {method} {path} shows A's names: {text}"
            );
        }
    }
    // B cannot make its own resource follow A's policy: the same answer as for none.
    let (s, v) = api
        .call(
            bk,
            Method::PATCH,
            &format!("/resources/{}", b.resource),
            Some(json!({"policy_id": a.policy})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // B holds its own things of the same names, and A's are unchanged.
    let (_, roles) = api.call(bk, Method::GET, "/roles/deployer", None).await;
    assert_eq!(roles["description"], "beta");
    assert_eq!(
        a_as_seen_by_a(&api, &a).await,
        before,
        "B changed something of A's"
    );

    // The default organization sees every organization, but none of their things.
    let orgs = api
        .ok(ADMIN_KEY, Method::GET, "/orgs", None, StatusCode::OK)
        .await;
    assert_eq!(orgs.as_array().unwrap().len(), 3);
    let sites = api
        .ok(ADMIN_KEY, Method::GET, "/sites", None, StatusCode::OK)
        .await;
    assert!(sites.as_array().unwrap().is_empty(), "{sites}");

    // Gateways: A's gateway serves only A; the shared one serves both; agents dial their own
    // organization's gateways and the shared ones.
    let snap = |kind, id: &str| {
        let store = api.store.clone();
        let id: Uuid = id.parse().unwrap();
        async move { store.snapshot(kind, id).await.unwrap().unwrap() }
    };
    let ga = snap(NodeKind::Gateway, &a.gateway).await;
    let hosts = |s: &kakuremichi_proto::ConfigSnapshot| {
        s.routes
            .iter()
            .map(|r| r.hostname.clone())
            .collect::<Vec<_>>()
    };
    let peers = |s: &kakuremichi_proto::ConfigSnapshot| {
        s.peers
            .iter()
            .map(|p| p.node_id.to_string())
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(hosts(&ga), ["alpha.example"]);
    assert_eq!(peers(&ga), BTreeSet::from([a.site.clone()]));
    assert!(
        ga.certificates.iter().all(|c| c.names == ["alpha.example"]),
        "{:?}",
        ga.certificates.len()
    );
    assert_eq!(ga.certificates.len(), 1);
    let gs = snap(NodeKind::Gateway, shared["id"].as_str().unwrap()).await;
    assert_eq!(hosts(&gs), ["alpha.example", "beta.example"]);
    assert_eq!(gs.certificates.len(), 2);
    let sb = snap(NodeKind::Agent, &b.site).await;
    assert_eq!(
        peers(&sb),
        BTreeSet::from([b.gateway.clone(), shared["id"].as_str().unwrap().to_owned()])
    );

    // B's key cannot act in A by naming it, and a deleted organization's keys stop at once.
    let (s, _) = api
        .call(
            bk,
            Method::POST,
            "/api-keys",
            Some(json!({"name": "x", "scopes": ["site:read"], "org_id": a.org})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, v) = api
        .call(ADMIN_KEY, Method::DELETE, &format!("/orgs/{}", b.org), None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v.to_string().contains("site"), "{v}");
}

/// Everything of A's, as A's admin key reads it.
async fn a_as_seen_by_a(api: &Api, a: &Tenant) -> Vec<Value> {
    let k = a.key.as_str();
    let mut out = Vec::new();
    for path in [
        format!("/sites/{}", a.site),
        format!("/gateways/{}", a.gateway),
        format!("/resources/{}", a.resource),
        format!("/certificates/{}", a.certificate),
        format!("/users/{}", a.user),
        format!("/identity-providers/{}", a.provider),
        "/roles/deployer".to_owned(),
        format!("/orgs/{}", a.org),
        "/api-keys".to_owned(),
        format!("/resources/{}/share-links", a.resource),
        format!("/resources/{}/passcode", a.resource),
        format!("/policies/{}", a.policy),
    ] {
        let mut v = api.ok(k, Method::GET, &path, None, StatusCode::OK).await;
        // Presence changes on its own; the rest must not.
        if let Some(o) = v.as_object_mut() {
            for volatile in ["online", "last_seen_at", "status_at", "last_used_at"] {
                o.remove(volatile);
            }
        }
        if let Some(list) = v.as_array_mut() {
            for item in list {
                if let Some(o) = item.as_object_mut() {
                    o.remove("last_used_at");
                }
            }
        }
        out.push(v);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_in_two_organizations_holds_different_roles_in_each() {
    let api = Api::new().await;
    let created = api
        .ok(
            ADMIN_KEY,
            Method::POST,
            "/orgs",
            Some(json!({"name": "alpha"})),
            StatusCode::CREATED,
        )
        .await;
    let alpha = created["id"].as_str().unwrap().to_owned();
    let alpha_key = created["admin_key"].as_str().unwrap().to_owned();
    // Dee views the default organization and administers alpha.
    let dee = api
        .ok(
            ADMIN_KEY,
            Method::POST,
            "/users",
            Some(json!({"email": "dee@example.com", "roles": ["viewer"]})),
            StatusCode::CREATED,
        )
        .await;
    let dee = dee["id"].as_str().unwrap().to_owned();
    // Only the instance adds an existing account to an organization; alpha's admin cannot.
    let (s, _) = api
        .call(
            &alpha_key,
            Method::POST,
            &format!("/orgs/{alpha}/members"),
            Some(json!({"email": "dee@example.com"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let member = api
        .ok(
            ADMIN_KEY,
            Method::POST,
            &format!("/orgs/{alpha}/members"),
            Some(json!({"email": "dee@example.com", "roles": ["admin"]})),
            StatusCode::CREATED,
        )
        .await;
    assert_eq!(member["roles"], json!(["admin"]));
    let personal = api
        .ok(
            ADMIN_KEY,
            Method::POST,
            "/api-keys",
            Some(json!({"name": "dee", "scopes": ["site:read", "api_key:write"], "user_id": dee})),
            StatusCode::CREATED,
        )
        .await;
    let dk = personal["secret"].as_str().unwrap().to_owned();
    // In the default organization she reads, and cannot write.
    api.ok(&dk, Method::GET, "/sites", None, StatusCode::OK)
        .await;
    let (s, _) = api
        .call(&dk, Method::POST, "/sites", Some(json!({"name": "x"})))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Her key for alpha, made by the instance's admins (she could make it herself with a key
    // that may write keys), holds what her role there gives.
    let (s, v) = api
        .call(
            ADMIN_KEY,
            Method::POST,
            "/api-keys",
            Some(json!({"name": "dee-alpha", "scopes": ["site:read", "wizard:write"], "org_id": alpha, "user_id": dee})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // Alpha's own admin cannot make keys for its members in other organizations.
    let (s, v) = api
        .call(
            &alpha_key,
            Method::POST,
            "/api-keys",
            Some(json!({"name": "x", "scopes": ["site:read"], "org_id": DEFAULT_ORG, "user_id": dee})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let in_alpha = api
        .ok(
            ADMIN_KEY,
            Method::POST,
            "/api-keys",
            Some(json!({"name": "dee-alpha", "scopes": ["site:read", "site:write"], "org_id": alpha, "user_id": dee})),
            StatusCode::CREATED,
        )
        .await;
    assert_eq!(in_alpha["org_id"], alpha.as_str());
    let ak = in_alpha["secret"].as_str().unwrap().to_owned();
    api.ok(
        &ak,
        Method::POST,
        "/sites",
        Some(json!({"name": "dee-site"})),
        StatusCode::CREATED,
    )
    .await;
    let sites = api
        .ok(&alpha_key, Method::GET, "/sites", None, StatusCode::OK)
        .await;
    assert_eq!(sites[0]["name"], "dee-site");
    assert!(api
        .ok(ADMIN_KEY, Method::GET, "/sites", None, StatusCode::OK)
        .await
        .as_array()
        .unwrap()
        .is_empty());
    // Alpha's admin cannot change her account (she belongs elsewhere too), only her roles
    // there; taking her out of alpha stops her alpha key at once, and her account stays.
    let (s, v) = api
        .call(
            &alpha_key,
            Method::PATCH,
            &format!("/users/{dee}"),
            Some(json!({"disabled": true})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    api.ok(
        &alpha_key,
        Method::PATCH,
        &format!("/users/{dee}"),
        Some(json!({"roles": ["viewer"]})),
        StatusCode::OK,
    )
    .await;
    let (s, _) = api
        .call(&ak, Method::POST, "/sites", Some(json!({"name": "again"})))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "a viewer's key wrote");
    api.ok(
        &alpha_key,
        Method::DELETE,
        &format!("/users/{dee}"),
        None,
        StatusCode::NO_CONTENT,
    )
    .await;
    let (s, _) = api.call(&ak, Method::GET, "/sites", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    api.ok(&dk, Method::GET, "/sites", None, StatusCode::OK)
        .await;
    // An organization with things cannot be deleted; an empty one can, and its keys stop.
    let (s, _) = api
        .call(ADMIN_KEY, Method::DELETE, &format!("/orgs/{alpha}"), None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let site = sites[0]["id"].as_str().unwrap();
    api.ok(
        &alpha_key,
        Method::DELETE,
        &format!("/sites/{site}"),
        None,
        StatusCode::NO_CONTENT,
    )
    .await;
    api.ok(
        ADMIN_KEY,
        Method::DELETE,
        &format!("/orgs/{alpha}"),
        None,
        StatusCode::NO_CONTENT,
    )
    .await;
    let (s, _) = api.call(&alpha_key, Method::GET, "/sites", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = api
        .call(
            ADMIN_KEY,
            Method::DELETE,
            &format!("/orgs/{DEFAULT_ORG}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}
