//! The ACME test servers themselves: Knot answers for its zone and takes a TSIG-signed RFC 2136
//! update, and Pebble, resolving through that Knot, serves its directory and its issuing root.
//! A missing `pebble`, `knotd`, `kdig` or `knsupdate` fails this test (scripts/setup installs
//! them).

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kakuremichi_e2e::acme::{start_knot, start_pebble, PebbleOptions, KDIG, KNSUPDATE};
use kakuremichi_e2e::{free_tcp_port, wait_for, Api, Proc, Stack, StackOptions};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pebble_and_knot_start_and_answer() {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("kakuremichi-e2e-acme")
        .tempdir()
        .unwrap();

    let knot = start_knot(dir.path(), "acme.test").await.unwrap();
    assert_eq!(knot.zone, "acme.test");
    let pebble = start_pebble(
        dir.path(),
        PebbleOptions {
            http_port: free_tcp_port(),
            tls_port: free_tcp_port(),
            dns: knot.addr,
            validity_secs: Some(120),
        },
    )
    .await
    .unwrap();

    let directory = pebble.directory().await.unwrap();
    assert!(
        directory["newOrder"]
            .as_str()
            .is_some_and(|u| u.starts_with("https://127.0.0.1:")),
        "{directory}"
    );
    let roots = pebble.issuing_roots_pem().await.unwrap();
    assert!(
        roots
            .trim_start()
            .starts_with("-----BEGIN CERTIFICATE-----")
            && roots.trim_end().ends_with("-----END CERTIFICATE-----"),
        "{roots}"
    );
    assert_ne!(roots, pebble.api_ca_pem, "issuing root is not the API CA");
    let log = std::fs::read_to_string(pebble.proc.log_path()).unwrap();
    assert!(
        log.contains("Using certificate validity period of 120 seconds"),
        "{log}"
    );

    // The wildcard sends every name to loopback, which is how Pebble's VA finds the client.
    let out = Command::new(KDIG)
        .args([
            &format!("@{}", knot.addr.ip()),
            "-p",
            &knot.addr.port().to_string(),
            "+short",
            "anything.acme.test",
            "A",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "127.0.0.1");

    // One RFC 2136 update, signed with the TSIG key, as an ACME DNS-01 client sends it.
    let name = "_acme-challenge.x.acme.test";
    assert!(knot.txt(name).is_empty());
    // A name the server does not serve is REFUSED, which reads as an error, not as "none".
    assert!(knot.try_txt("_acme-challenge.x.other.test").is_err());
    let script = format!(
        "server {} {}\nzone {}.\nkey hmac-sha256:{} {}\nupdate add {name}. 60 TXT \"token-1\"\nsend\nanswer\n",
        knot.addr.ip(),
        knot.addr.port(),
        knot.zone,
        knot.tsig_name,
        knot.tsig_secret_b64,
    );
    let mut child = Command::new(KNSUPDATE)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && answer.contains("status: NOERROR"),
        "{answer}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(knot.txt(name), vec!["token-1".to_string()]);

    // The helper does the same, and an unsigned update is refused.
    knot.update(&format!(
        "update add {name}. 60 TXT \"token-2\"\nupdate delete {name}. TXT \"token-1\""
    ))
    .unwrap();
    assert_eq!(knot.txt(name), vec!["token-2".to_string()]);
    let mut unsigned = Command::new(KNSUPDATE)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    unsigned
        .stdin
        .take()
        .unwrap()
        .write_all(
            format!(
                "server {} {}\nzone acme.test.\nupdate delete {name}. TXT\nsend\n",
                knot.addr.ip(),
                knot.addr.port()
            )
            .as_bytes(),
        )
        .unwrap();
    assert!(!unsigned.wait().unwrap().success());
    assert_eq!(knot.txt(name), vec!["token-2".to_string()]);

    println!(
        "knot and pebble up and answering in {:?}",
        started.elapsed()
    );
}

/// The leaf certificate a gateway at `addr` serves for `sni`, verified against `roots_pem` (the
/// handshake fails unless the chain verifies for that name now).
async fn verified_leaf(
    addr: std::net::SocketAddr,
    sni: &str,
    roots_pem: &str,
) -> anyhow::Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned())?;
    let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await??;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| anyhow::anyhow!("no peer certificate"))?;
    Ok(leaf.as_ref().to_vec())
}

async fn certificates(api: &Api) -> Vec<Value> {
    api.get("/api/v1/certificates")
        .await
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Control orders certificates from a real ACME CA (Debian's pebble) by all three challenges,
/// and two gateways serve them: HTTP-01 for a resource's hostname (automatic), TLS-ALPN-01
/// answered by the second gateway (the name resolves to it only, so only its answer counts), and
/// a wildcard by DNS-01 through RFC 2136 updates of a real authoritative server (knot) that
/// pebble resolves with. Short-lived certificates renew on their own; keys are sealed at rest;
/// a gateway restarted while control is down still serves them from its cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_orders_http01_tls_alpn01_and_dns01_wildcard_certificates_two_gateways_serve_and_renew(
) {
    let work = tempfile::Builder::new()
        .prefix("kakuremichi-e2e-acme")
        .tempdir()
        .unwrap();
    let knot = start_knot(work.path(), "acme.test").await.unwrap();
    // b.acme.test is reached at the second gateway only.
    knot.update("update add b.acme.test. 60 A 127.0.0.2")
        .unwrap();
    let http_port = free_tcp_port();
    let https_port = free_tcp_port();
    const VALIDITY_SECS: u64 = 45;
    let pebble = start_pebble(
        work.path(),
        PebbleOptions {
            http_port,
            tls_port: https_port,
            dns: knot.addr,
            validity_secs: Some(VALIDITY_SECS),
        },
    )
    .await
    .unwrap();
    let tsig = work.path().join("tsig.secret");
    std::fs::write(&tsig, &knot.tsig_secret_b64).unwrap();

    let mut opts = StackOptions::loopback();
    opts.gateway_http_listen = ([127, 0, 0, 1], http_port).into();
    opts.gateway_http_for_test = opts.gateway_http_listen;
    opts.gateway_args = vec![
        "--https-listen".into(),
        format!("127.0.0.1:{https_port}"),
        "--tls-self-signed".into(),
    ];
    opts.control_args = vec![
        "--acme-directory".into(),
        pebble.directory_url.clone(),
        "--acme-ca-file".into(),
        pebble.api_ca_file.display().to_string(),
        "--acme-contact".into(),
        "admin@acme.test".into(),
        "--acme-dns-server".into(),
        knot.addr.to_string(),
        "--acme-dns-zone".into(),
        "acme.test".into(),
        "--acme-dns-tsig-name".into(),
        knot.tsig_name.clone(),
        "--acme-dns-tsig-secret-file".into(),
        tsig.display().to_string(),
        // The agent sessions hostname gets its certificate too.
        "--sessions-hostname".into(),
        "agents.acme.test".into(),
    ];
    let mut stack = Stack::start_with(opts).await.unwrap();
    let api = stack.api.clone();

    // The second gateway, on 127.0.0.2 with the same ports.
    let wg2 = kakuremichi_e2e::free_udp_port();
    let gw2 = api
        .create_gateway("edge2", &format!("127.0.0.1:{wg2}"))
        .await
        .unwrap();
    let gw2_dir = stack.dir.path().join("gateway2");
    std::fs::create_dir_all(&gw2_dir).unwrap();
    let mut gateway2 = Proc::spawn(
        "gateway2",
        &kakuremichi_e2e::bin("kakuremichi-gateway").unwrap(),
        &[
            "--control".into(),
            stack.opts.control_url_for_nodes.clone(),
            "--data-dir".into(),
            gw2_dir.display().to_string(),
            "--http-listen".into(),
            format!("127.0.0.2:{http_port}"),
            "--https-listen".into(),
            format!("127.0.0.2:{https_port}"),
            "--tls-self-signed".into(),
            "--wg-listen".into(),
            format!("127.0.0.1:{wg2}"),
            "--token".into(),
            gw2.token.clone(),
        ],
        &[],
        None,
        stack.dir.path().join("gateway2.log"),
    )
    .unwrap();

    // The resource's hostname gets an HTTP-01 certificate by itself; the demo resource's goes.
    api.create_resource(
        "app.acme.test",
        &stack.site_id,
        &stack.opts.app_listen.to_string(),
    )
    .await
    .unwrap();
    api.delete_resource(&stack.resource_id).await.unwrap();
    let http = reqwest::Client::new();
    wait_for(
        "the second gateway to serve the app",
        Duration::from_secs(30),
        || async {
            let r = http
                .get(format!("http://127.0.0.2:{http_port}/"))
                .header("host", "app.acme.test")
                .send()
                .await?;
            Ok((r.status() == 200).then_some(()))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", stack.logs(), gateway2.log_tail(40)));
    for body in [
        json!({"names": ["b.acme.test"], "challenge": "tls-alpn-01"}),
        json!({"names": ["*.wild.acme.test"]}),
    ] {
        let (status, c) = api
            .call(reqwest::Method::POST, "/api/v1/certificates", Some(body))
            .await
            .unwrap();
        assert_eq!(status, 201, "{c}");
    }
    let ordered = Instant::now();
    let all = wait_for(
        "four valid certificates",
        Duration::from_secs(90),
        || async {
            let all = certificates(&api).await;
            let valid = all.iter().filter(|c| c["status"] == "valid").count();
            Ok((all.len() == 4 && valid == 4).then_some(all))
        },
    )
    .await;
    let all = match all {
        Ok(all) => all,
        Err(e) => panic!(
            "{e:#}\n{:#}\n{}\n{}",
            Value::from(certificates(&api).await),
            stack.logs(),
            gateway2.log_tail(40)
        ),
    };
    println!("four certificates issued in {:?}", ordered.elapsed());
    let by_name = |n: &str| {
        all.iter()
            .find(|c| c["names"] == json!([n]))
            .unwrap_or_else(|| panic!("no certificate for {n}: {all:?}"))
            .clone()
    };
    let app = by_name("app.acme.test");
    assert_eq!(app["challenge"], "http-01");
    assert_eq!(app["auto_resource"], true);
    assert_eq!(by_name("b.acme.test")["challenge"], "tls-alpn-01");
    let sessions = by_name("agents.acme.test");
    assert_eq!(
        (&sessions["challenge"], &sessions["auto_resource"]),
        (&json!("http-01"), &json!(true))
    );
    assert_eq!(by_name("*.wild.acme.test")["challenge"], "dns-01");
    assert!(!json!(all).to_string().contains("PRIVATE KEY"));
    // The DNS-01 record was removed after the order.
    assert!(knot.txt("_acme-challenge.wild.acme.test").is_empty());

    // Both gateways serve the same verified certificates (pebble's chain, its root trusted).
    let roots = pebble.issuing_roots_pem().await.unwrap();
    let gw1: std::net::SocketAddr = ([127, 0, 0, 1], https_port).into();
    let gw2_addr: std::net::SocketAddr = ([127, 0, 0, 2], https_port).into();
    let mut first = std::collections::HashMap::new();
    for sni in [
        "app.acme.test",
        "b.acme.test",
        "x.wild.acme.test",
        "agents.acme.test",
    ] {
        let a = wait_for(
            "a gateway to serve the certificate",
            Duration::from_secs(10),
            || async { Ok(Some(verified_leaf(gw1, sni, &roots).await?)) },
        )
        .await
        .unwrap();
        let b = wait_for(
            "the other gateway to serve it",
            Duration::from_secs(10),
            || async { Ok(Some(verified_leaf(gw2_addr, sni, &roots).await?)) },
        )
        .await
        .unwrap();
        assert_eq!(a, b, "{sni}: the two gateways serve different certificates");
        first.insert(sni, a);
    }
    // A browser-like client trusting pebble's root gets the app over HTTPS through the tunnel,
    // from either gateway.
    for gw in [gw1, gw2_addr] {
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(roots.as_bytes()).unwrap())
            .resolve("app.acme.test", gw)
            .build()
            .unwrap();
        let r = client
            .get(format!("https://app.acme.test:{https_port}/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.text().await.unwrap().contains("kakuremichi demo app"));
    }

    // Keys are sealed in the store: no clear private key in control's database files.
    for entry in std::fs::read_dir(stack.dir.path().join("control"))
        .unwrap()
        .flatten()
    {
        let bytes = std::fs::read(entry.path()).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains("PRIVATE KEY"),
            "{} holds a clear private key",
            entry.path().display()
        );
    }

    // Renewal on its own at two thirds of the lifetime: a new certificate, served by both.
    let renewed = wait_for(
        "the certificates to be renewed",
        Duration::from_secs(VALIDITY_SECS),
        || async {
            let mut changed = 0;
            for (sni, old) in &first {
                let now = verified_leaf(gw1, sni, &roots).await?;
                if &now != old && verified_leaf(gw2_addr, sni, &roots).await? == now {
                    changed += 1;
                }
            }
            Ok((changed == first.len()).then_some(()))
        },
    )
    .await;
    if let Err(e) = renewed {
        panic!(
            "{e:#}\n{:#}\n{}",
            Value::from(certificates(&api).await),
            stack.logs()
        );
    }
    println!("renewed {:?} after the first issue", ordered.elapsed());

    // Control down, the gateway restarted: its cache still serves the certificate.
    stack.stop_control();
    stack.restart_gateway().unwrap();
    wait_for(
        "the restarted gateway to serve TLS from its cache",
        Duration::from_secs(15),
        || async { Ok(Some(verified_leaf(gw1, "app.acme.test", &roots).await?)) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", stack.logs()));
    gateway2.kill();
}
