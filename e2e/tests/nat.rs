//! Across a real NAT: the agent and the private app sit in a network namespace behind iptables
//! MASQUERADE with no inbound path; control and the gateway sit in another namespace.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::Duration;

use kakuremichi_e2e::netns::{sh_in, InstalledAgent, NatLab, GW_PUBLIC, LAN_HOST};
use kakuremichi_e2e::{Stack, StackOptions, DEMO_HOST};

#[tokio::test]
async fn request_crosses_a_real_nat_to_an_agent_with_no_inbound_path() {
    let lab = NatLab::new().unwrap();
    let gw_public = std::net::Ipv4Addr::from(GW_PUBLIC);
    let lan = std::net::Ipv4Addr::from(LAN_HOST);
    let opts = StackOptions::in_lab(&lab);
    let stack = Stack::start_with(opts).await.unwrap();

    // The private app is not reachable from the gateway's side: no inbound path.
    assert!(
        !lab.exec_ok(
            &lab.gw_ns,
            &[
                "curl",
                "-s",
                "-m",
                "2",
                "-o",
                "/dev/null",
                &format!("http://{lan}:9000/")
            ]
        ),
        "the LAN must not be reachable from outside"
    );
    // But the LAN reaches out (the agent does exactly that).
    assert!(lab.exec_ok(
        &lab.lan_ns,
        &[
            "curl",
            "-s",
            "-m",
            "2",
            "-o",
            "/dev/null",
            &format!("http://{gw_public}:3000/healthz")
        ]
    ));

    for _ in 0..5 {
        let resp = stack.get(DEMO_HOST, "/").await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.text().await.unwrap().contains("kakuremichi demo app"));
    }
    let resp = stack.get(DEMO_HOST, "/bytes/1048576").await.unwrap();
    assert_eq!(resp.bytes().await.unwrap().len(), 1 << 20);

    // The gateway saw the agent through the NAT's outside address (status reports are periodic).
    let path = format!("/api/v1/gateways/{}", stack.gateway_id);
    let seen = kakuremichi_e2e::wait_for(
        "the NATed endpoint in the gateway's status",
        Duration::from_secs(15),
        || async {
            let gw = stack.api.get(&path).await?;
            Ok(gw["peers"].to_string().contains("198.18.1.2").then_some(gw))
        },
    )
    .await;
    assert!(seen.is_ok(), "{seen:?}\n{}", stack.logs());
}

fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(')').map_or("", |(_, r)| r.trim_start());
    !state.is_empty() && !state.starts_with('Z')
}

#[tokio::test]
async fn a_fresh_host_behind_the_nat_joins_with_the_one_line_install_its_site_shows() {
    let lab = NatLab::new().unwrap();
    let mut opts = StackOptions::in_lab(&lab);
    opts.control_args = vec!["--public-url".into(), opts.control_url_for_nodes.clone()];
    let stack = Stack::start_with(opts).await.unwrap();
    let control = stack.opts.control_url_for_nodes.clone();
    // The fresh host's disk: its own binary folder and data folder.
    let disk = tempfile::tempdir().unwrap();
    let bin_dir = disk.path().join("bin");
    let data = disk.path().join("data");
    let _agent = InstalledAgent(data.clone());
    let (status, site) = stack
        .api
        .call(
            reqwest::Method::POST,
            "/api/v1/sites",
            Some(serde_json::json!({"name": "fresh-host"})),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{site}");
    let site_id = site["id"].as_str().unwrap().to_owned();
    let token = site["enrollment_token"].as_str().unwrap().to_owned();
    let command = site["install_command"].as_str().unwrap().to_owned();
    assert_eq!(
        command,
        format!("curl -fsSL {control}/install.sh | sh -s -- --token {token}")
    );
    let local = format!(
        " --bin-dir {} --data-dir {} --service none",
        bin_dir.display(),
        data.display()
    );

    // Bad input first: each a clear error, nothing installed.
    let url = format!("{control}/install.sh");
    let (code, _, err) = sh_in(
        &lab.lan_ns,
        &format!(
            "curl -fsSL {url} | sh -s -- --bin-dir {} --data-dir {}",
            bin_dir.display(),
            data.display()
        ),
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--token is needed"), "{err}");
    let (code, _, err) = sh_in(
        &lab.lan_ns,
        &format!("curl -fsSL {url} | sh -s -- --frobnicate"),
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown option --frobnicate"), "{err}");
    let fake = disk.path().join("fake-uname");
    std::fs::create_dir_all(&fake).unwrap();
    std::fs::write(
        fake.join("uname"),
        "#!/bin/sh\nif [ \"$1\" = -m ]; then echo riscv64; else echo Linux; fi\n",
    )
    .unwrap();
    std::fs::set_permissions(
        fake.join("uname"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!("{}:{}", fake.display(), std::env::var("PATH").unwrap());
    let (code, _, err) = sh_in(&lab.lan_ns, &format!("{command}{local}"), &[("PATH", path)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("unsupported architecture riscv64"), "{err}");
    assert!(!bin_dir.join("kakuremichi-agent").exists());
    let (code, _, _) = sh_in(
        &lab.lan_ns,
        &format!("curl -fsS -o /dev/null {control}/download/kakuremichi-agent-linux-sparc"),
        &[],
    );
    assert_ne!(code, 0);

    // The one-liner, as the page shows it, on a host behind the NAT with no inbound path.
    let (code, out, err) = sh_in(&lab.lan_ns, &format!("{command}{local}"), &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    let ran = std::time::Instant::now();
    assert!(out.contains("started the agent in the background"), "{out}");
    assert!(out.contains("@reboot"), "{out}");
    let meta = std::fs::metadata(data.join("token")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read_to_string(data.join("token")).unwrap().trim(),
        token
    );
    let site_path = format!("/api/v1/sites/{site_id}");
    let until_online = |what: &'static str| {
        let api = stack.api.clone();
        let path = site_path.clone();
        async move {
            kakuremichi_e2e::wait_for(what, Duration::from_secs(20), || async {
                Ok((api.get(&path).await?["online"] == true).then_some(()))
            })
            .await
            .unwrap();
        }
    };
    until_online("the installed agent to connect").await;
    println!("online {:?} after the installer returned", ran.elapsed());
    // It serves: a resource on the new site, to the LAN's app, through the gateway.
    stack
        .api
        .create_resource(
            "fresh.localhost",
            &site_id,
            &stack.opts.app_listen.to_string(),
        )
        .await
        .unwrap();
    let serves = || async {
        kakuremichi_e2e::wait_for("the new site to serve", Duration::from_secs(20), || async {
            let r = stack.get("fresh.localhost", "/").await?;
            Ok((r.status() == 200).then_some(()))
        })
        .await
        .unwrap();
    };
    serves().await;

    // Safe to run twice: the same command updates and restarts the agent, same identity.
    let first_pid = _agent.pid().unwrap();
    let state = std::fs::read(data.join("state.json")).unwrap();
    let (code, out, err) = sh_in(&lab.lan_ns, &format!("{command}{local}"), &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("stopping the agent that runs"), "{out}");
    let second_pid = _agent.pid().unwrap();
    assert_ne!(first_pid, second_pid);
    assert!(!alive(first_pid), "the first agent still runs");
    assert_eq!(std::fs::read(data.join("state.json")).unwrap(), state);
    until_online("the agent to connect again").await;
    serves().await;

    // A regenerated token (the old credential revoked): the new one-liner enrolls the host again.
    let (status, fresh) = stack
        .api
        .call(
            reqwest::Method::POST,
            &format!("{site_path}/enrollment-token"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{fresh}");
    let again = fresh["install_command"].as_str().unwrap().to_owned();
    assert_ne!(again, command);
    let (code, out, err) = sh_in(&lab.lan_ns, &format!("{again}{local}"), &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("enrolls again"), "{out}");
    until_online("the agent to enroll again").await;
    serves().await;
    assert!(alive(_agent.pid().unwrap()));

    // Where systemd runs: a unit, enabled and restarted (systemctl stands in for systemd here,
    // which this machine does not run).
    let units = disk.path().join("systemd");
    let stub = disk.path().join("stub");
    std::fs::create_dir_all(&stub).unwrap();
    let calls = disk.path().join("systemctl.calls");
    std::fs::write(
        stub.join("systemctl"),
        format!("#!/bin/sh\necho \"$*\" >> {}\n", calls.display()),
    )
    .unwrap();
    std::fs::set_permissions(
        stub.join("systemctl"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!("{}:{}", stub.display(), std::env::var("PATH").unwrap());
    let local_systemd = local.replace("--service none", "--service systemd");
    let (code, out, err) = sh_in(
        &lab.lan_ns,
        &format!("{again}{local_systemd} -- --session-command 'agentapi server --port {{port}}'"),
        &[
            ("PATH", path),
            ("KAKUREMICHI_SYSTEMD_DIR", units.display().to_string()),
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let unit = std::fs::read_to_string(units.join("kakuremichi-agent.service")).unwrap();
    let exec = unit
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .unwrap()
        .to_owned();
    for part in [
        format!("'{}'", bin_dir.join("kakuremichi-agent").display()),
        format!("--control '{control}'"),
        format!("--token-file '{}'", data.join("token").display()),
        format!("--data-dir '{}'", data.display()),
        "--allow-insecure-control".to_owned(),
        "'--session-command' 'agentapi server --port {port}'".to_owned(),
    ] {
        assert!(exec.contains(&part), "{part} not in {exec}");
    }
    assert!(unit.contains("Restart=always"), "{unit}");
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap(),
        "daemon-reload\nenable kakuremichi-agent.service\nrestart kakuremichi-agent.service\n"
    );
}
