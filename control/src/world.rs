//! The world: everything that goes into node snapshots, loaded once per config version, and the
//! pure function that builds one node's [`ConfigSnapshot`] from it.
//!
//! With a thousand nodes a change used to cost a thousand sets of queries (each session asked the
//! store for its own snapshot). Now the first session to see a new version loads the world in one
//! read transaction ([`crate::store::Store::load_world`]), the others share that `Arc`, and each
//! builds its snapshot in memory ([`World::snapshot`]). The world also carries each node's stored
//! credential digest, so a session notices at once when its node was revoked or re-enrolled.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use kakuremichi_proto::identity::GatewayIdentity;
use kakuremichi_proto::{
    AcmeChallenge, Backend, ConfigSnapshot, NodeKind, OverlayConfig, PeerConfig, Route,
    RouteProtocol, SessionRoute, SessionShare, SessionSpec, SessionsEndpoint, Target,
    TlsCertificate, WgPublicKey, DEFAULT_OVERLAY_MTU,
};
use uuid::Uuid;

use crate::store::{Resource, AGENT_KEEPALIVE_SECS, DEFAULT_ORG};

/// A site or gateway as snapshots need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldNode {
    /// Id.
    pub id: Uuid,
    /// The organization it belongs to.
    pub org_id: Uuid,
    /// Display name.
    pub name: String,
    /// Overlay address.
    pub overlay_address: Ipv4Addr,
    /// Gateways: the endpoint agents dial (may be empty).
    pub endpoint: Option<String>,
    /// WireGuard public key, once enrolled.
    pub public_key: Option<WgPublicKey>,
    /// The stored credential digest, if the node holds a credential.
    pub credential_hash: Option<String>,
}

/// The agent-sessions endpoint as of one config version.
#[derive(Debug, Clone, Default)]
pub struct SessionsWorld {
    /// The gateways' hostname for it.
    pub hostname: String,
    /// Control's public URL.
    pub control_url: String,
    /// Live sessions, oldest first, each with the users who may reach it.
    pub sessions: Vec<(crate::store::LiveSession, Vec<Uuid>)>,
}

/// Everything snapshots are made of, as of one config version.
#[derive(Debug, Clone, Default)]
pub struct World {
    /// The config version this world was read at.
    pub version: u64,
    /// The overlay prefix length.
    pub prefix_len: u8,
    /// Sites, oldest first.
    pub sites: Vec<WorldNode>,
    /// Gateways, oldest first.
    pub gateways: Vec<WorldNode>,
    /// Resources, by hostname.
    pub resources: Vec<Resource>,
    /// Certificates for gateways (valid ones, keys opened), with their organization.
    pub certificates: Vec<(Uuid, TlsCertificate)>,
    /// ACME challenge answers for gateways.
    pub acme_challenges: Vec<AcmeChallenge>,
    /// Keys, sign-in page and revocations for gateways.
    pub identity: Option<GatewayIdentity>,
    /// The agent-sessions endpoint, when control runs one.
    pub sessions: Option<SessionsWorld>,
    sites_by_id: HashMap<Uuid, usize>,
    gateways_by_id: HashMap<Uuid, usize>,
    resources_by_site: HashMap<Uuid, Vec<(usize, u16, String)>>,
}

impl World {
    /// A world from its parts (in any order; they are sorted here).
    pub fn new(
        version: u64,
        prefix_len: u8,
        sites: Vec<WorldNode>,
        gateways: Vec<WorldNode>,
        mut resources: Vec<Resource>,
    ) -> World {
        resources.sort_by(|a, b| {
            (a.hostname.as_str(), a.public_port).cmp(&(b.hostname.as_str(), b.public_port))
        });
        let index = |nodes: &[WorldNode]| {
            nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (n.id, i))
                .collect::<HashMap<_, _>>()
        };
        // Site -> (resource index, overlay port, target) of every target the site's agent serves.
        let mut resources_by_site: HashMap<Uuid, Vec<(usize, u16, String)>> = HashMap::new();
        for (i, r) in resources.iter().enumerate() {
            resources_by_site.entry(r.site_id).or_default().push((
                i,
                r.overlay_port,
                r.target.clone(),
            ));
            for t in &r.more_targets {
                resources_by_site.entry(t.site_id).or_default().push((
                    i,
                    t.overlay_port,
                    t.target.clone(),
                ));
            }
        }
        for list in resources_by_site.values_mut() {
            list.sort_by_key(|(_, port, _)| *port);
        }
        World {
            version,
            prefix_len,
            sites_by_id: index(&sites),
            gateways_by_id: index(&gateways),
            sites,
            gateways,
            resources,
            resources_by_site,
            certificates: Vec::new(),
            acme_challenges: Vec::new(),
            identity: None,
            sessions: None,
        }
    }

    /// The same world with the agent-sessions endpoint.
    pub fn with_sessions(mut self, sessions: Option<SessionsWorld>) -> World {
        self.sessions = sessions;
        self
    }

    /// The same world with identity settings for gateways.
    pub fn with_identity(mut self, identity: GatewayIdentity) -> World {
        self.identity = Some(identity);
        self
    }

    /// The same world with certificates and ACME challenge answers for gateways.
    pub fn with_tls(
        mut self,
        certificates: Vec<(Uuid, TlsCertificate)>,
        acme_challenges: Vec<AcmeChallenge>,
    ) -> World {
        self.certificates = certificates;
        self.acme_challenges = acme_challenges;
        self
    }

    /// One node.
    pub fn node(&self, kind: NodeKind, id: Uuid) -> Option<&WorldNode> {
        match kind {
            NodeKind::Agent => self.sites_by_id.get(&id).map(|&i| &self.sites[i]),
            NodeKind::Gateway => self.gateways_by_id.get(&id).map(|&i| &self.gateways[i]),
        }
    }

    /// The snapshot of one node, or `None` if the node does not exist.
    ///
    /// Organizations stay apart: a gateway of the default organization is shared and serves
    /// every organization's resources; any other gateway serves only its own organization's
    /// (sites, routes and certificates). An agent dials its own organization's gateways and the
    /// shared ones.
    pub fn snapshot(&self, kind: NodeKind, id: Uuid) -> Option<ConfigSnapshot> {
        let me = self.node(kind, id)?;
        let serves = |org: Uuid| me.org_id == DEFAULT_ORG || org == me.org_id;
        let mut snap = ConfigSnapshot {
            sessions: Vec::new(),
            sessions_endpoint: None,
            version: self.version,
            node_id: id,
            kind,
            overlay: OverlayConfig {
                address: me.overlay_address,
                prefix_len: self.prefix_len,
                mtu: DEFAULT_OVERLAY_MTU,
            },
            peers: Vec::new(),
            routes: Vec::new(),
            targets: Vec::new(),
            certificates: Vec::new(),
            acme_challenges: Vec::new(),
            identity: None,
        };
        match kind {
            NodeKind::Gateway => {
                snap.certificates = self
                    .certificates
                    .iter()
                    .filter(|(org, _)| serves(*org))
                    .map(|(_, c)| c.clone())
                    .collect();
                snap.acme_challenges.clone_from(&self.acme_challenges);
                let sessions_host = self.sessions.as_ref().map(|s| s.hostname.as_str());
                // Only gateways that serve a resource needing sign-in (or the sessions
                // endpoint) need the keys.
                if sessions_host.is_some()
                    || self
                        .resources
                        .iter()
                        .any(|r| r.access.is_some() && serves(r.org_id))
                {
                    snap.identity = self.identity.clone().map(|mut id| {
                        // API keys only for the hostnames this gateway serves.
                        id.api_keys.retain(|k| {
                            Some(k.host.as_str()) == sessions_host
                                || self
                                    .resources
                                    .iter()
                                    .any(|r| r.hostname == k.host && serves(r.org_id))
                        });
                        Box::new(id)
                    });
                }
                if let Some(sw) = &self.sessions {
                    let sessions = sw
                        .sessions
                        .iter()
                        .filter(|(s, _)| serves(s.org_id))
                        .filter_map(|(s, users)| {
                            let site = self.node(NodeKind::Agent, s.site_id)?;
                            site.public_key?;
                            Some(SessionRoute {
                                id: s.id,
                                site_id: s.site_id,
                                overlay_address: site.overlay_address,
                                users: users.clone(),
                                share: s.share.as_ref().map(|(digest, exp)| SessionShare {
                                    digest: digest.clone(),
                                    expires_at_ms: *exp,
                                }),
                            })
                        })
                        .collect();
                    snap.sessions_endpoint = Some(Box::new(SessionsEndpoint {
                        hostname: sw.hostname.clone(),
                        control_url: sw.control_url.clone(),
                        sessions,
                    }));
                }
                for site in self.sites.iter().filter(|s| serves(s.org_id)) {
                    let Some(key) = site.public_key else { continue };
                    snap.peers.push(PeerConfig {
                        node_id: site.id,
                        kind: NodeKind::Agent,
                        name: site.name.clone(),
                        public_key: key,
                        overlay_address: site.overlay_address,
                        endpoint: None,
                        persistent_keepalive: None,
                    });
                }
                for r in self.resources.iter().filter(|r| serves(r.org_id)) {
                    // Every target whose site is enrolled; the first is the route's own.
                    let pp = r.proxy_protocol && r.protocol == RouteProtocol::Tcp;
                    let mut backends = std::iter::once((r.site_id, r.overlay_port, pp))
                        .chain(r.more_targets.iter().map(|t| {
                            let pp = t.proxy_protocol_or(r.proxy_protocol)
                                && r.protocol == RouteProtocol::Tcp;
                            (t.site_id, t.overlay_port, pp)
                        }))
                        .filter_map(|(site_id, port, proxy_protocol)| {
                            let site = self.node(NodeKind::Agent, site_id)?;
                            site.public_key?;
                            Some(Backend {
                                site_id,
                                overlay_address: site.overlay_address,
                                port,
                                proxy_protocol,
                            })
                        });
                    let Some(first) = backends.next() else {
                        continue;
                    };
                    snap.routes.push(Route {
                        resource_id: r.id,
                        hostname: r.hostname.clone(),
                        protocol: r.protocol,
                        site_id: first.site_id,
                        overlay_address: first.overlay_address,
                        port: first.port,
                        public_port: r.public_port,
                        redirect_https: r.redirect_https,
                        hsts_max_age: r.hsts_max_age,
                        more_backends: backends.collect(),
                        balance: r.balance,
                        sticky: r.sticky,
                        limits: r.limits,
                        proxy_protocol: first.proxy_protocol,
                        access: r.access.clone(),
                    });
                }
            }
            NodeKind::Agent => {
                let mine = |gw: &&WorldNode| gw.org_id == DEFAULT_ORG || gw.org_id == me.org_id;
                for gw in self.gateways.iter().filter(mine) {
                    let (Some(key), Some(endpoint)) = (gw.public_key, gw.endpoint.as_ref()) else {
                        continue;
                    };
                    if endpoint.is_empty() {
                        continue;
                    }
                    snap.peers.push(PeerConfig {
                        node_id: gw.id,
                        kind: NodeKind::Gateway,
                        name: gw.name.clone(),
                        public_key: key,
                        overlay_address: gw.overlay_address,
                        endpoint: Some(endpoint.clone()),
                        persistent_keepalive: Some(AGENT_KEEPALIVE_SECS),
                    });
                }
                if let Some(sw) = &self.sessions {
                    snap.sessions = sw
                        .sessions
                        .iter()
                        .filter(|(s, _)| s.site_id == id)
                        .map(|(s, _)| SessionSpec {
                            id: s.id,
                            role: s.team_id.clone(),
                            env: s.env.clone(),
                            ttl_secs: s.ttl_secs,
                            initial_message: s.initial_message.clone(),
                            oneshot: s.oneshot,
                        })
                        .collect();
                }
                for (i, port, target) in self.resources_by_site.get(&id).into_iter().flatten() {
                    let r = &self.resources[*i];
                    snap.targets.push(Target {
                        resource_id: r.id,
                        port: *port,
                        target: target.clone(),
                        health_check: r.health_check.clone(),
                        hostname: if r.protocol == RouteProtocol::Http {
                            r.hostname.clone()
                        } else {
                            String::new()
                        },
                    });
                }
            }
        }
        Some(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u8, key: Option<u8>, endpoint: Option<&str>) -> WorldNode {
        WorldNode {
            id: Uuid::from_u128(u128::from(n)),
            org_id: DEFAULT_ORG,
            name: format!("n{n}"),
            overlay_address: Ipv4Addr::new(100, 64, 0, n),
            endpoint: endpoint.map(str::to_owned),
            public_key: key.map(|k| WgPublicKey([k; 32])),
            credential_hash: None,
        }
    }

    fn resource(n: u8, site: u8, hostname: &str, port: u16) -> Resource {
        Resource {
            id: Uuid::from_u128(1000 + u128::from(n)),
            org_id: DEFAULT_ORG,
            name: hostname.into(),
            protocol: RouteProtocol::Http,
            hostname: hostname.into(),
            public_port: None,
            redirect_https: false,
            hsts_max_age: None,
            site_id: Uuid::from_u128(u128::from(site)),
            target: format!("127.0.0.1:{}", 9000 + u16::from(n)),
            overlay_port: port,
            created_at: 0,
            balance: Default::default(),
            sticky: false,
            health_check: None,
            limits: Default::default(),
            proxy_protocol: false,
            more_targets: vec![],
            access: None,
            own_access: None,
            policy_id: None,
        }
    }

    fn world() -> World {
        World::new(
            7,
            10,
            // Site 2 is not enrolled yet.
            vec![
                node(1, Some(1), None),
                node(2, None, None),
                node(3, Some(3), None),
            ],
            // Gateway 11 has no endpoint, 12 no key.
            vec![
                node(10, Some(10), Some("gw.example:51820")),
                node(11, Some(11), Some("")),
                node(12, None, Some("x:1")),
            ],
            vec![
                resource(1, 1, "b.example", 10001),
                resource(2, 1, "a.example", 10000),
                resource(3, 2, "c.example", 10000),
                resource(4, 3, "d.example", 10000),
            ],
        )
    }

    #[test]
    fn gateway_sees_enrolled_sites_and_their_routes_by_hostname() {
        let w = world();
        let s = w
            .snapshot(NodeKind::Gateway, Uuid::from_u128(10))
            .expect("gateway exists");
        assert_eq!(s.version, 7);
        assert_eq!(s.overlay.prefix_len, 10);
        let peers: Vec<_> = s.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(peers, ["n1", "n3"]);
        let hosts: Vec<_> = s.routes.iter().map(|r| r.hostname.as_str()).collect();
        assert_eq!(hosts, ["a.example", "b.example", "d.example"]);
        assert!(s.targets.is_empty());
    }

    #[test]
    fn agent_sees_dialable_gateways_and_its_own_targets_by_port() {
        let w = world();
        let s = w
            .snapshot(NodeKind::Agent, Uuid::from_u128(1))
            .expect("site exists");
        assert_eq!(s.peers.len(), 1);
        assert_eq!(s.peers[0].endpoint.as_deref(), Some("gw.example:51820"));
        assert_eq!(s.peers[0].persistent_keepalive, Some(AGENT_KEEPALIVE_SECS));
        let ports: Vec<_> = s.targets.iter().map(|t| t.port).collect();
        assert_eq!(ports, [10000, 10001]);
        assert!(s.routes.is_empty());
        assert_eq!(w.snapshot(NodeKind::Agent, Uuid::from_u128(99)), None);
        // Ids are per kind.
        assert_eq!(w.snapshot(NodeKind::Gateway, Uuid::from_u128(1)), None);
    }

    #[test]
    fn several_targets_reach_gateways_and_each_site_serves_its_own() {
        let mut lb = resource(5, 2, "lb.example", 10001);
        lb.balance = kakuremichi_proto::Balance::LeastOutstanding;
        lb.sticky = true;
        lb.health_check = Some(kakuremichi_proto::HealthCheck {
            path: Some("/healthz".into()),
            expected_status: None,
            interval_ms: 1000,
            timeout_ms: 500,
            unhealthy_threshold: 1,
            healthy_threshold: 2,
        });
        let extra = |n: u128, site: u8, port: u16| crate::store::ResourceTarget {
            id: Uuid::from_u128(5000 + n),
            site_id: Uuid::from_u128(u128::from(site)),
            target: format!("10.0.0.{n}:80"),
            overlay_port: port,
            created_at: 0,
            proxy_protocol: None,
        };
        // The primary is on site 2 (not enrolled): site 1 and 3 serve.
        lb.more_targets = vec![extra(1, 1, 10005), extra(2, 3, 10001), extra(3, 1, 10006)];
        let w = World::new(
            8,
            10,
            vec![
                node(1, Some(1), None),
                node(2, None, None),
                node(3, Some(3), None),
            ],
            vec![node(10, Some(10), Some("gw.example:51820"))],
            vec![resource(1, 1, "a.example", 10000), lb],
        );
        let gw = w.snapshot(NodeKind::Gateway, Uuid::from_u128(10)).unwrap();
        let route = gw
            .routes
            .iter()
            .find(|r| r.hostname == "lb.example")
            .unwrap();
        assert_eq!(
            route.site_id,
            Uuid::from_u128(1),
            "the first enrolled target leads"
        );
        assert_eq!(route.port, 10005);
        let more: Vec<_> = route
            .more_backends
            .iter()
            .map(|b| (b.overlay_address, b.port))
            .collect();
        assert_eq!(
            more,
            [
                (Ipv4Addr::new(100, 64, 0, 3), 10001),
                (Ipv4Addr::new(100, 64, 0, 1), 10006)
            ]
        );
        assert_eq!(route.balance, kakuremichi_proto::Balance::LeastOutstanding);
        assert!(route.sticky);
        let site1 = w.snapshot(NodeKind::Agent, Uuid::from_u128(1)).unwrap();
        let t: Vec<_> = site1
            .targets
            .iter()
            .map(|t| (t.port, t.target.as_str()))
            .collect();
        assert_eq!(
            t,
            [
                (10000, "127.0.0.1:9001"),
                (10005, "10.0.0.1:80"),
                (10006, "10.0.0.3:80")
            ]
        );
        assert!(site1.targets[0].health_check.is_none());
        assert_eq!(site1.targets[1].hostname, "lb.example");
        assert_eq!(
            site1.targets[1]
                .health_check
                .as_ref()
                .map(|h| h.interval_ms),
            Some(1000)
        );
        let site3 = w.snapshot(NodeKind::Agent, Uuid::from_u128(3)).unwrap();
        assert_eq!(site3.targets.len(), 1);
        assert_eq!(site3.targets[0].port, 10001);
    }

    #[test]
    fn tcp_targets_carry_the_connect_check_and_no_hostname() {
        let mut db = resource(6, 1, "", 10000);
        db.protocol = RouteProtocol::Tcp;
        db.public_port = Some(5432);
        let check = kakuremichi_proto::HealthCheck {
            path: None,
            expected_status: None,
            interval_ms: 5000,
            timeout_ms: 2000,
            unhealthy_threshold: 1,
            healthy_threshold: 2,
        };
        db.health_check = Some(check.clone());
        db.limits.idle_timeout_ms = Some(30_000);
        db.more_targets = vec![crate::store::ResourceTarget {
            id: Uuid::from_u128(6001),
            site_id: Uuid::from_u128(3),
            target: "10.0.0.6:5432".into(),
            overlay_port: 10004,
            created_at: 0,
            proxy_protocol: Some(true),
        }];
        let w = World::new(
            9,
            10,
            vec![node(1, Some(1), None), node(3, Some(3), None)],
            vec![node(10, Some(10), Some("gw.example:51820"))],
            vec![db],
        );
        let gw = w.snapshot(NodeKind::Gateway, Uuid::from_u128(10)).unwrap();
        assert_eq!(gw.routes.len(), 1);
        assert_eq!(
            (gw.routes[0].site_id, gw.routes[0].port),
            (Uuid::from_u128(1), 10000)
        );
        assert_eq!(
            gw.routes[0].more_backends,
            [Backend {
                site_id: Uuid::from_u128(3),
                overlay_address: Ipv4Addr::new(100, 64, 0, 3),
                port: 10004,
                proxy_protocol: true,
            }],
            "a target's own proxy_protocol wins over the resource's"
        );
        assert!(!gw.routes[0].proxy_protocol);
        assert_eq!(gw.routes[0].limits.idle_timeout_ms, Some(30_000));
        assert!(!gw.routes[0].sticky);
        for (site, port, target) in [(1, 10000, "127.0.0.1:9006"), (3, 10004, "10.0.0.6:5432")] {
            let s = w.snapshot(NodeKind::Agent, Uuid::from_u128(site)).unwrap();
            assert_eq!(s.targets.len(), 1);
            let t = &s.targets[0];
            assert_eq!((t.port, t.target.as_str()), (port, target));
            assert_eq!(t.health_check.as_ref(), Some(&check));
            assert_eq!(t.hostname, "", "a TCP check sends no Host");
        }
    }

    #[test]
    fn organizations_stay_apart_except_on_shared_gateways() {
        let a = Uuid::from_u128(0xa);
        let b = Uuid::from_u128(0xb);
        let in_org = |mut n: WorldNode, org| {
            n.org_id = org;
            n
        };
        let res = |n, site, host: &str, org| Resource {
            org_id: org,
            ..resource(n, site, host, 10000)
        };
        let w = World::new(
            1,
            10,
            vec![
                in_org(node(1, Some(1), None), a),
                in_org(node(2, Some(2), None), b),
            ],
            vec![
                in_org(node(10, Some(10), Some("a:1")), a),
                in_org(node(11, Some(11), Some("b:1")), b),
                node(12, Some(12), Some("shared:1")),
            ],
            vec![res(1, 1, "a.example", a), res(2, 2, "b.example", b)],
        );
        let hosts = |s: &ConfigSnapshot| {
            s.routes
                .iter()
                .map(|r| r.hostname.clone())
                .collect::<Vec<_>>()
        };
        let peers = |s: &ConfigSnapshot| s.peers.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        let gw_a = w.snapshot(NodeKind::Gateway, Uuid::from_u128(10)).unwrap();
        assert_eq!(hosts(&gw_a), ["a.example"]);
        assert_eq!(peers(&gw_a), ["n1"]);
        let shared = w.snapshot(NodeKind::Gateway, Uuid::from_u128(12)).unwrap();
        assert_eq!(hosts(&shared), ["a.example", "b.example"]);
        assert_eq!(peers(&shared), ["n1", "n2"]);
        let site_b = w.snapshot(NodeKind::Agent, Uuid::from_u128(2)).unwrap();
        assert_eq!(peers(&site_b), ["n11", "n12"]);
    }
}
