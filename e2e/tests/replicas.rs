//! Control replicas on one PostgreSQL (issue 13): three replicas started together on an empty
//! schema, 200 simulated nodes spread over them plus a real gateway and agent given all three
//! URLs, and a demo app served through them under continuous keep-alive load. A change made
//! through any replica reaches every node; every replica tells the same about who is online;
//! killing the replica that leads (and then the one the real agent is on) moves its nodes to
//! another within 5 s and the singleton work with it, and no request through the data plane
//! fails. Each step prints its figures.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kakuremichi_e2e::fleet::{
    enroll_fleet, ms, touch_every_agent, ControlOptions, Fleet, FleetControl, PgSchema,
    PrivatePostgres, Select, Timing,
};
use kakuremichi_e2e::load::{Figures, Load, LoadOptions};
use kakuremichi_e2e::{
    start_agent, start_demo_app, start_gateway, test_http_client, wait_for, Api, Stack,
    StackOptions, DEMO_HOST, TEST_ADMIN_KEY,
};
use uuid::Uuid;

fn postgres_url() -> String {
    std::env::var("KAKUREMICHI_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A metric's value on one replica (`name` with its labels, as printed).
async fn metric(url: &str, name: &str) -> anyhow::Result<f64> {
    let text = test_http_client()
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no {name} in {url}/metrics"))
}

/// The one replica that leads, among those alive, once exactly one does.
async fn wait_one_leader(replicas: &[Option<FleetControl>], timeout: Duration) -> usize {
    let found = wait_for("exactly one replica to lead", timeout, || async {
        let mut leaders = Vec::new();
        for (i, r) in replicas.iter().enumerate() {
            if let Some(r) = r {
                if metric(&r.url(), "kakuremichi_control_leader").await? == 1.0 {
                    leaders.push(i);
                }
            }
        }
        Ok((leaders.len() == 1).then(|| leaders[0]))
    })
    .await;
    found.unwrap_or_else(|e| panic!("{e:#}"))
}

/// Which replica (by listen address) holds node `id`'s session, from the store.
async fn holder(db: &str, id: Uuid) -> Option<String> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(db).await.ok()?;
    sqlx::query_scalar(
        "SELECT r.address FROM node_presence p JOIN control_replicas r ON r.id = p.replica_id \
         WHERE p.node_id = $1",
    )
    .bind(id.to_string())
    .fetch_optional(&mut conn)
    .await
    .ok()
    .flatten()
}

/// Keep-alive load through the real gateway while control replicas or their database fail: a
/// few clients, each `GET /` on one connection every 20 ms.
fn data_plane_load(gateway: std::net::SocketAddr) -> Load {
    let mut opts = LoadOptions::new(4, vec![gateway], DEMO_HOST);
    opts.path = "/".into();
    opts.pause = Duration::from_millis(20);
    Load::start(opts)
}

/// The load's figures over its whole run; asserts that nothing failed.
async fn no_failure(load: Load, from: Instant, what: &str) -> Figures {
    let clients = load.options().clients;
    let records = load.stop().await;
    let figures = Figures::of(&records, clients, from, Instant::now(), None, |_| false);
    println!("keep-alive load through the real path {what}: {figures}");
    assert!(
        figures.unexpected.is_empty(),
        "requests through the data plane failed {what}: {}",
        figures.unexpected_sample()
    );
    figures
}

/// Changes the simulated gateway's endpoint through `api` (which touches every agent's snapshot)
/// and waits until every simulated agent has the new version and, as `check` (any replica's API)
/// tells, the real agent applied it.
async fn fan_out(
    fleet: &Fleet,
    api: &Api,
    check: &Api,
    sim_gateway: Uuid,
    real_site: Uuid,
    port: u16,
    label: &str,
) {
    let (since, version) = touch_every_agent(api, sim_gateway, &format!("127.0.0.1:{port}"))
        .await
        .expect("a change");
    let lat = fleet
        .wait_version(Select::Agents, version, since, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{label}: {e:#}"));
    wait_for(
        "the real agent to apply it",
        Duration::from_secs(10),
        || async {
            let s = check.get(&format!("/api/v1/sites/{real_site}")).await?;
            Ok((s["applied_version"].as_u64() >= Some(version)).then_some(()))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{label}: {e:#}"));
    println!(
        "{label}: version {version} reached all 199 simulated agents ({}) and the real agent",
        lat.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_postgres_share_changes_presence_and_lead_and_survive_losing_two() {
    let dir = tempfile::Builder::new()
        .prefix("kakuremichi-replicas")
        .disable_cleanup(std::env::var_os("KAKUREMICHI_E2E_KEEP").is_some())
        .tempdir()
        .unwrap();
    let schema = PgSchema::create(&postgres_url())
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (scripts/setup starts it)");
    let db = schema.url();
    // One secrets key for every replica, as an operator copies it to each host.
    let key_file = dir.path().join("secrets.key");
    std::fs::write(&key_file, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();

    // Three replicas started together on the empty schema: migrations and seeding take turns.
    let opts: Vec<ControlOptions> = (0..3)
        .map(|i| {
            let mut o = ControlOptions::in_dir(&dir.path().join(format!("replica{i}")));
            o.log = dir.path().join(format!("replica{i}.log"));
            o.database_url = Some(db.clone());
            o.secrets_key_file = Some(key_file.clone());
            o
        })
        .collect();
    let started = Instant::now();
    let (a, b, c) = tokio::join!(
        FleetControl::start(opts[0].clone()),
        FleetControl::start(opts[1].clone()),
        FleetControl::start(opts[2].clone()),
    );
    let mut replicas: Vec<Option<FleetControl>> = [a, b, c]
        .into_iter()
        .map(|r| Some(r.unwrap_or_else(|e| panic!("a replica did not come up: {e:#}"))))
        .collect();
    let urls: Vec<String> = replicas.iter().map(|r| r.as_ref().unwrap().url()).collect();
    let apis: Vec<Api> = replicas
        .iter()
        .map(|r| r.as_ref().unwrap().api.clone())
        .collect();
    let leader = wait_one_leader(&replicas, Duration::from_secs(10)).await;
    println!(
        "3 replicas up together in {}; replica {leader} leads",
        ms(started.elapsed())
    );
    let logs = |replicas: &[Option<FleetControl>]| {
        replicas
            .iter()
            .flatten()
            .map(|r| r.log_tail(20))
            .collect::<Vec<_>>()
            .join("\n")
    };

    // 200 simulated nodes (199 sites, 1 gateway), made through the first replica.
    let enrollment = enroll_fleet(&apis[0], 199, 1, 16)
        .await
        .unwrap_or_else(|e| panic!("enrolling 200 nodes: {e:#}\n{}", logs(&replicas)));
    let sim_gateway = enrollment.gateways[0].node_id;

    // A real gateway and agent, given every replica's URL, and the demo app; made through the
    // second replica.
    let mut stack = StackOptions::loopback();
    stack.control_url_for_nodes = urls.join(",");
    stack.control_url_for_test = urls[1].clone();
    let app = start_demo_app(stack.app_listen, None, dir.path()).unwrap();
    let gw = apis[1]
        .create_gateway("edge", &stack.gateway_endpoint)
        .await
        .unwrap();
    let site = apis[1].create_site("home").await.unwrap();
    apis[1]
        .create_resource(DEMO_HOST, &site.id, &stack.app_listen.to_string())
        .await
        .unwrap();
    let gateway = start_gateway(&stack, dir.path(), Some(&gw.token)).unwrap();
    let agent = start_agent(&stack, dir.path(), Some(&site.token)).unwrap();
    let real_site: Uuid = site.id.parse().unwrap();
    let real_gateway: Uuid = gw.id.parse().unwrap();

    let fleet = Fleet::start_over(&urls, enrollment.all(), Timing::default());
    let connected = fleet
        .wait_connected(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&replicas)));
    let spread: Vec<usize> = (0..3)
        .map(|i| {
            fleet
                .nodes()
                .iter()
                .filter(|n| n.control_index() == i)
                .count()
        })
        .collect();
    println!(
        "200 simulated nodes connected in {} over the replicas {spread:?}",
        ms(connected)
    );

    let http = test_http_client();
    wait_for(
        "the demo app through the real gateway",
        Duration::from_secs(30),
        || async {
            let r = http
                .get(format!("http://{}/", stack.gateway_http_for_test))
                .header(reqwest::header::HOST, DEMO_HOST)
                .send()
                .await?;
            Ok((r.status() == 200).then_some(()))
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\n{}\n{}\n{}",
            gateway.log_tail(30),
            agent.log_tail(30),
            logs(&replicas)
        )
    });

    // Presence: every replica says the real nodes are online and counts the same fleet.
    let same_presence = wait_for(
        "every replica to show the same nodes online",
        Duration::from_secs(10),
        || async {
            let mut counts = Vec::new();
            for (api, url) in apis.iter().zip(&urls) {
                let site = api.get(&format!("/api/v1/sites/{real_site}")).await?;
                let gw = api.get(&format!("/api/v1/gateways/{real_gateway}")).await?;
                if site["online"] != true || gw["online"] != true {
                    return Ok(None);
                }
                counts.push(metric(url, "kakuremichi_nodes_online{kind=\"agent\"}").await?);
            }
            Ok((counts.iter().all(|c| *c == 200.0)).then_some(counts))
        },
    )
    .await;
    let counts = same_presence.unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&replicas)));
    println!("every replica shows the real nodes online and {counts:?} agents online");

    // A change through each replica reaches every simulated agent and the real one.
    for (i, api) in apis.iter().enumerate() {
        let label = format!("change through replica {i}");
        fan_out(
            &fleet,
            api,
            &apis[2],
            sim_gateway,
            real_site,
            30_000 + i as u16,
            &label,
        )
        .await;
    }

    // Keep-alive load through the real path from now on.
    let load_from = Instant::now();
    let load = data_plane_load(stack.gateway_http_for_test);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Kill the leader, then the replica the real agent is on (if it is another): each time, that
    // replica's nodes are back on another within 5 s and one replica leads.
    let mut killed = vec![leader];
    let agent_on = holder(&db, real_site).await;
    let second = urls
        .iter()
        .position(|u| Some(u.trim_start_matches("http://")) == agent_on.as_deref())
        .filter(|i| *i != leader)
        .unwrap_or_else(|| (0..3).find(|i| *i != leader).unwrap());
    killed.push(second);
    for (round, victim) in killed.iter().copied().enumerate() {
        let on_victim: Vec<Uuid> = fleet
            .nodes()
            .iter()
            .filter(|n| n.is_connected() && n.control_index() == victim)
            .map(|n| n.identity.node_id)
            .collect();
        let mut real_on_victim = Vec::new();
        for (id, what) in [(real_site, "agent"), (real_gateway, "gateway")] {
            if holder(&db, id).await.as_deref() == Some(urls[victim].trim_start_matches("http://"))
            {
                real_on_victim.push(what);
            }
        }
        let was_leader = replicas[victim].is_some()
            && metric(&urls[victim], "kakuremichi_control_leader")
                .await
                .unwrap_or(0.0)
                == 1.0;
        // Taken before the kill: a node may be welcomed elsewhere before the kill has been
        // reaped.
        let at = Instant::now();
        replicas[victim].as_mut().unwrap().kill();
        replicas[victim] = None;
        // Its simulated nodes: welcomed again by another replica.
        let moved = wait_for(
            "the killed replica's nodes on another",
            Duration::from_secs(5),
            || {
                let fleet = &fleet;
                let on_victim = &on_victim;
                async move {
                    let back = fleet
                        .nodes()
                        .iter()
                        .filter(|n| on_victim.contains(&n.identity.node_id));
                    let mut latest = Duration::ZERO;
                    for n in back {
                        match n.last_welcome() {
                            Some(w) if n.is_connected() && w >= at => {
                                latest = latest.max(w.duration_since(at))
                            }
                            _ => return Ok(None),
                        }
                    }
                    Ok(Some(latest))
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("round {round}: {e:#}\n{}", logs(&replicas)));
        // The real nodes: held by a live replica again.
        let live: Vec<String> = replicas
            .iter()
            .flatten()
            .map(|r| r.url().trim_start_matches("http://").to_owned())
            .collect();
        let real_back = wait_for(
            "the real nodes on a live replica",
            Duration::from_secs(5),
            || {
                let (db, live) = (&db, &live);
                async move {
                    for id in [real_site, real_gateway] {
                        match holder(db, id).await {
                            Some(a) if live.contains(&a) => {}
                            _ => return Ok(None),
                        }
                    }
                    Ok(Some(at.elapsed()))
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("round {round}: {e:#}\n{}", logs(&replicas)));
        let leader_now = wait_one_leader(&replicas, Duration::from_secs(5)).await;
        let lead_moved = at.elapsed();
        println!(
            "killed replica {victim} ({} simulated nodes{}{}): they were back on another within \
             {}; the real nodes held by a live replica within {}; replica {leader_now} leads \
             (checked {} after the kill)",
            on_victim.len(),
            if real_on_victim.is_empty() {
                String::new()
            } else {
                format!(", the real {}", real_on_victim.join(" and "))
            },
            if was_leader { ", the leader" } else { "" },
            ms(moved),
            ms(real_back),
            ms(lead_moved),
        );
        assert!(lead_moved <= Duration::from_secs(10));
    }

    // The last replica still fans every change out to every node.
    let last = replicas.iter().position(Option::is_some).unwrap();
    let label = format!("change through the last replica {last}");
    fan_out(
        &fleet,
        &apis[last],
        &apis[last],
        sim_gateway,
        real_site,
        30_010,
        &label,
    )
    .await;

    no_failure(load, load_from, "during both kills").await;
    let by_replica: HashMap<usize, usize> =
        fleet.nodes().iter().fold(HashMap::new(), |mut m, n| {
            *m.entry(n.control_index()).or_default() += 1;
            m
        });
    assert_eq!(by_replica.get(&last), Some(&200), "{by_replica:?}");
    drop(app);
    drop(replicas);
    schema.drop_schema().await.ok();
}

/// One API call with the admin key: its status, its `Retry-After` and how long it took.
async fn call(
    http: &reqwest::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, Option<String>, Duration) {
    let at = Instant::now();
    let mut req = http
        .request(method, format!("{base}{path}"))
        .bearer_auth(TEST_ADMIN_KEY);
    if let Some(b) = body {
        req = req.json(&b);
    }
    match req.send().await {
        Ok(r) => {
            let retry = r
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            (r.status().as_u16(), retry, at.elapsed())
        }
        Err(_) => (0, None, at.elapsed()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_api_answers_503_with_retry_after_and_nothing_is_lost() {
    let pg = PrivatePostgres::start_new().expect("a PostgreSQL of the test's own");
    let mut opts = StackOptions::loopback();
    opts.control_args = vec!["--database-url".into(), pg.url()];
    let stack = Stack::start_with(opts)
        .await
        .expect("the stack on PostgreSQL");
    let base = stack.opts.control_url_for_test.clone();
    let http = test_http_client();

    // Written before the restart.
    let mut before = Vec::new();
    for i in 0..5 {
        before.push(
            stack
                .api
                .create_site(&format!("before-{i}"))
                .await
                .unwrap()
                .id,
        );
    }

    let load_from = Instant::now();
    let load = data_plane_load(stack.opts.gateway_http_for_test);
    tokio::time::sleep(Duration::from_millis(300)).await;

    pg.stop_immediate().expect("stopping PostgreSQL");
    let down = Instant::now();
    // While it is away: reads and writes are answered 503 with Retry-After, never 500.
    let mut answers: std::collections::BTreeMap<u16, usize> = Default::default();
    let mut slowest = Duration::ZERO;
    let mut retry_after = None;
    while down.elapsed() < Duration::from_secs(5) {
        for (method, path, body) in [
            (reqwest::Method::GET, "/api/v1/sites", None),
            (
                reqwest::Method::POST,
                "/api/v1/sites",
                Some(serde_json::json!({"name": "while-away"})),
            ),
        ] {
            let (status, retry, took) = call(&http, &base, method, path, body).await;
            *answers.entry(status).or_default() += 1;
            slowest = slowest.max(took);
            if status == 503 {
                retry_after = retry_after.or(retry);
            }
        }
    }
    println!(
        "PostgreSQL away for {}: the API answered {answers:?} (status: count), slowest in {}, \
         Retry-After {retry_after:?}",
        ms(down.elapsed()),
        ms(slowest)
    );
    assert_eq!(
        answers.keys().copied().collect::<Vec<_>>(),
        vec![503],
        "only 503 while the database is away: {answers:?}\n{}",
        stack.control.log_tail(30)
    );
    assert!(retry_after.is_some(), "503 carries Retry-After");
    assert!(
        slowest < Duration::from_secs(5),
        "answered within 5 s, not held: {slowest:?}"
    );

    pg.start().expect("starting PostgreSQL again");
    let up = Instant::now();
    let back = wait_for(
        "the API to answer again",
        Duration::from_secs(5),
        || async {
            let (status, _, _) =
                call(&http, &base, reqwest::Method::GET, "/api/v1/sites", None).await;
            Ok((status == 200).then(|| up.elapsed()))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", stack.control.log_tail(30)));
    let (status, _, _) = call(
        &http,
        &base,
        reqwest::Method::POST,
        "/api/v1/sites",
        Some(serde_json::json!({"name": "after"})),
    )
    .await;
    assert_eq!(status, 201, "a write after the restart");
    let sites = stack.api.get("/api/v1/sites?limit=100").await.unwrap();
    let text = sites.to_string();
    for id in &before {
        assert!(
            text.contains(id.as_str()),
            "site {id} written before is kept: {text}"
        );
    }
    assert!(
        !text.contains("while-away"),
        "nothing half-written while away: {text}"
    );

    println!(
        "PostgreSQL back: API answering {} after the start",
        ms(back)
    );
    no_failure(load, load_from, "while PostgreSQL was restarted").await;
}
