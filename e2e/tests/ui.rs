//! The admin web UI in a real browser (Debian's Chromium driven by playwright-core): an admin
//! goes from the set-up of the owner to an app served through the tunnel with no API call made
//! by the test, the agent installed with the one-liner the page shows on a host behind a real
//! NAT, then protects it with single sign-on through a real OpenID Provider (npm
//! `oidc-provider`), which an end user signs in with, and disables her: refused within 2 s.
//! Along the way: screenshots at 1280 and 375 px (kept in `target/tmp/ui-walk`), axe-core in
//! both themes, console errors, CSRF, CSP and escaping.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kakuremichi_e2e::netns::{sh_in, InstalledAgent, NatLab, GW_FROM_HARNESS, LAN_HOST};
use kakuremichi_e2e::sso::Op;
use kakuremichi_e2e::{Stack, StackOptions};

fn epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test]
async fn an_admin_walks_the_web_ui_from_set_up_to_an_app_served_from_behind_a_nat() {
    let lab = NatLab::new().unwrap();
    let mut opts = StackOptions::in_lab(&lab);
    opts.control_args = vec!["--public-url".into(), opts.control_url_for_nodes.clone()];
    let stack = Stack::start_with(opts).await.unwrap();
    // The end user's browser reaches control at its public URL (the sign-in for the resource);
    // the OpenID Provider listens on the harness's side of the link, which control reaches too.
    lab.route_harness_to_public_side().unwrap();
    let op = Op::start_on(
        stack.dir.path(),
        std::net::Ipv4Addr::new(198, 18, 0, 1),
        &format!("{}/auth/sso/op/callback", stack.opts.control_url_for_nodes),
    )
    .await
    .unwrap();
    let gw = std::net::Ipv4Addr::from(GW_FROM_HARNESS);
    let lan = std::net::Ipv4Addr::from(LAN_HOST);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-walk");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = tempfile::tempdir().unwrap();
    let data = disk.path().join("data");
    let _agent = InstalledAgent(data.clone());
    let args = serde_json::json!({
        "control": stack.opts.control_url_for_test,
        "admin_key": stack.opts.admin_key,
        "email": "owner@example.com",
        "password": "correct horse battery",
        "app_host": "walk.localhost",
        "app_url": format!("http://walk.localhost:{}/", stack.opts.gateway_http_for_test.port()),
        "target": format!("{lan}:9000"),
        "dir": dir,
        "chromium_args": [format!("--host-resolver-rules=MAP walk.localhost {gw}")],
        "op": op.issuer,
        "op_client_id": op.client_id,
        "op_client_secret": op.client_secret,
        "sso_user": "alice",
        "sso_email": "alice@example.com",
    });
    let browser =
        tokio::spawn(async move { kakuremichi_e2e::sso::run_script("ui.mjs", &args).await });

    // The test's one part: a person pasting the page's command into a shell on the fresh host.
    let command = kakuremichi_e2e::wait_for(
        "the install command on the page",
        Duration::from_secs(60),
        || async { Ok(std::fs::read_to_string(dir.join("install-command")).ok()) },
    )
    .await
    .unwrap();
    assert!(
        command.starts_with(&format!(
            "curl -fsSL {}/install.sh | sh -s -- --token ",
            stack.opts.control_url_for_nodes
        )),
        "{command}"
    );
    let local = format!(
        " --bin-dir {} --data-dir {} --service none",
        disk.path().join("bin").display(),
        data.display()
    );
    let (code, out, err) = sh_in(&lab.lan_ns, &format!("{command}{local}"), &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    std::fs::write(dir.join("installed"), b"").unwrap();
    // When control first has the agent online (the page must show it within 2 s of that).
    let connected = kakuremichi_e2e::wait_for(
        "the installed agent online",
        Duration::from_secs(30),
        || async {
            let sites = stack.api.get("/api/v1/sites?q=home-lab").await?;
            Ok((sites[0]["online"] == true).then(epoch_ms))
        },
    )
    .await
    .unwrap();

    let out = browser.await.unwrap();
    let out = match out {
        Ok(v) => v,
        Err(e) => panic!("{e:#}\n{}", stack.logs()),
    };
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
    let lag = out["online_at"].as_i64().unwrap() - connected;
    println!(
        "the page showed the site online {lag} ms after control had it online (polled every 50 ms)"
    );
    assert!(lag < 2000, "{lag} ms");
    assert_eq!(out["reloaded"], false, "the page was reloaded");
    assert!(
        out["app_text"]
            .as_str()
            .unwrap()
            .contains("kakuremichi demo app"),
        "{out}"
    );
    // The dashboard had it healthy, its requests counted.
    assert_eq!(out["dashboard"]["health"], "healthy", "{out}");
    assert!(out["dashboard"]["requests"].as_u64().unwrap() >= 1, "{out}");
    // Protected with single sign-on: the end user signs in at the real provider and reaches the
    // app; once the admin disables her, her next requests are refused within 2 s.
    assert!(
        out["sso_app_text"]
            .as_str()
            .unwrap()
            .contains("kakuremichi demo app"),
        "{out}"
    );
    assert!(
        out["sso_signed_in_at"]
            .as_str()
            .unwrap()
            .starts_with(&stack.opts.control_url_for_nodes),
        "{out}"
    );
    assert_eq!(out["before_revoke_status"], 200, "{out}");
    let refused = out["refused_status"].as_u64().unwrap();
    assert!(
        [302, 303, 401, 403].contains(&refused),
        "refused with {refused}"
    );
    let revoke_lag = out["revoke_lag_ms"].as_i64().unwrap();
    println!("the disabled user's requests were refused {revoke_lag} ms after the page confirmed");
    assert!(revoke_lag < 2000, "{revoke_lag} ms");
    assert_eq!(out["csrf_status"], 403);
    assert_eq!(out["csp_blocked"], true);
    assert!(out["pwned"].is_null(), "{out}");
    assert_eq!(out["escaped_title"], "<script>window.__pwned = 1</script>");
    assert_eq!(out["console_errors"], serde_json::json!([]));
    assert_eq!(out["axe"], serde_json::json!([]), "axe-core");
    assert_eq!(out["policy_rule"], "/hooks/*", "{out}");
    let pages = out["pages"].as_array().unwrap();
    assert!(pages.len() >= 20, "{pages:?}");
    for p in pages {
        assert_eq!(p["status"], 200, "{p}");
    }
    let shots = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "png"))
        })
        .count();
    assert_eq!(shots, 2 * out["steps"].as_array().unwrap().len());
}
