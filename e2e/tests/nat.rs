//! Across a real NAT: the agent and the private app sit in a network namespace behind iptables
//! MASQUERADE with no inbound path; control and the gateway sit in another namespace.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::Duration;

use kakuremichi_e2e::netns::{NatLab, GW_PUBLIC, LAN_HOST};
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
