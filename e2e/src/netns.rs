//! A small lab of network namespaces for tests that cross a real NAT.
//!
//! ```text
//!  harness (root ns)          ns "gw"                 ns "nat"                   ns "lan"
//!  198.18.0.1 ---veth--- 198.18.0.2                                          
//!                        198.18.1.1 ---veth--- 198.18.1.2 (MASQUERADE)
//!                        control, gateway      198.19.0.1 ---veth--- 198.19.0.2
//!                                                                     agent, private app
//! ```
//! The gateway's namespace has no route to the LAN and the NAT drops every new flow from outside,
//! so the agent has no inbound path: only the flows it opens come back. All addresses sit in
//! 198.18.0.0/15, the block set aside for benchmarks and tests, inside namespaces this lab made.

use std::process::Command;

use anyhow::{bail, Context as _};

/// The namespaces and links of one lab; removed on drop.
#[derive(Debug)]
pub struct NatLab {
    /// Namespace of control and the gateway (the public side).
    pub gw_ns: String,
    /// Namespace of the NAT router.
    pub nat_ns: String,
    /// Namespace of the agent and the private app.
    pub lan_ns: String,
    root_if: String,
}

/// The gateway namespace's address as the harness reaches it.
pub const GW_FROM_HARNESS: [u8; 4] = [198, 18, 0, 2];
/// The gateway namespace's public address as the NAT and the agent reach it.
pub const GW_PUBLIC: [u8; 4] = [198, 18, 1, 1];
/// The NAT's outside address (the address agents' flows appear to come from).
pub const NAT_OUTSIDE: [u8; 4] = [198, 18, 1, 2];
/// The LAN host's address (agent and private app).
pub const LAN_HOST: [u8; 4] = [198, 19, 0, 2];

fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn in_ns(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    run(&full)
}

/// Whether this process may build a lab (root, with `ip` and `iptables`).
pub fn available() -> anyhow::Result<()> {
    run(&["ip", "netns", "list"])
        .context("`ip netns` is needed (package iproute2, run as root)")?;
    run(&["iptables", "--version"]).context("iptables is needed (package iptables)")?;
    Ok(())
}

impl NatLab {
    /// Builds the lab. Names carry the process id so parallel runs do not collide.
    pub fn new() -> anyhow::Result<NatLab> {
        available()?;
        let id = std::process::id() % 100_000;
        let lab = NatLab {
            gw_ns: format!("kmgw{id}"),
            nat_ns: format!("kmnat{id}"),
            lan_ns: format!("kmlan{id}"),
            root_if: format!("kmr{id}"),
        };
        lab.teardown();
        lab.build().context("building the NAT lab")?;
        Ok(lab)
    }

    fn build(&self) -> anyhow::Result<()> {
        let (gw, nat, lan) = (&self.gw_ns, &self.nat_ns, &self.lan_ns);
        let id = std::process::id() % 100_000;
        let (g0, g1, n0, n1, l0) = (
            format!("kmg{id}a"),
            format!("kmg{id}b"),
            format!("kmn{id}a"),
            format!("kmn{id}b"),
            format!("kml{id}a"),
        );
        for ns in [gw, nat, lan] {
            run(&["ip", "netns", "add", ns])?;
            in_ns(ns, &["ip", "link", "set", "lo", "up"])?;
        }
        // harness <-> gw
        run(&[
            "ip",
            "link",
            "add",
            &self.root_if,
            "type",
            "veth",
            "peer",
            "name",
            &g0,
        ])?;
        run(&["ip", "link", "set", &g0, "netns", gw])?;
        run(&["ip", "addr", "add", "198.18.0.1/24", "dev", &self.root_if])?;
        run(&["ip", "link", "set", &self.root_if, "up"])?;
        in_ns(gw, &["ip", "addr", "add", "198.18.0.2/24", "dev", &g0])?;
        in_ns(gw, &["ip", "link", "set", &g0, "up"])?;
        // gw <-> nat
        run(&[
            "ip", "link", "add", &g1, "type", "veth", "peer", "name", &n0,
        ])?;
        run(&["ip", "link", "set", &g1, "netns", gw])?;
        run(&["ip", "link", "set", &n0, "netns", nat])?;
        in_ns(gw, &["ip", "addr", "add", "198.18.1.1/24", "dev", &g1])?;
        in_ns(gw, &["ip", "link", "set", &g1, "up"])?;
        in_ns(nat, &["ip", "addr", "add", "198.18.1.2/24", "dev", &n0])?;
        in_ns(nat, &["ip", "link", "set", &n0, "up"])?;
        // nat <-> lan
        run(&[
            "ip", "link", "add", &n1, "type", "veth", "peer", "name", &l0,
        ])?;
        run(&["ip", "link", "set", &n1, "netns", nat])?;
        run(&["ip", "link", "set", &l0, "netns", lan])?;
        in_ns(nat, &["ip", "addr", "add", "198.19.0.1/24", "dev", &n1])?;
        in_ns(nat, &["ip", "link", "set", &n1, "up"])?;
        in_ns(lan, &["ip", "addr", "add", "198.19.0.2/24", "dev", &l0])?;
        in_ns(lan, &["ip", "link", "set", &l0, "up"])?;
        // routes: the LAN and the NAT go out through the gateway side; the gateway side has no
        // route back into the LAN.
        in_ns(lan, &["ip", "route", "add", "default", "via", "198.19.0.1"])?;
        in_ns(nat, &["ip", "route", "add", "default", "via", "198.18.1.1"])?;
        in_ns(nat, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        // NAT: masquerade what leaves, let back only what belongs to flows the LAN opened.
        in_ns(
            nat,
            &[
                "iptables",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                &n0,
                "-j",
                "MASQUERADE",
            ],
        )?;
        in_ns(
            nat,
            &[
                "iptables",
                "-A",
                "FORWARD",
                "-i",
                &n0,
                "-o",
                &n1,
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            ],
        )?;
        in_ns(
            nat,
            &[
                "iptables", "-A", "FORWARD", "-i", &n0, "-o", &n1, "-j", "DROP",
            ],
        )?;
        in_ns(
            nat,
            &[
                "iptables",
                "-A",
                "INPUT",
                "-i",
                &n0,
                "-m",
                "conntrack",
                "--ctstate",
                "NEW",
                "-j",
                "DROP",
            ],
        )?;
        Ok(())
    }

    /// Runs a command inside namespace `ns`; returns whether it succeeded.
    pub fn exec_ok(&self, ns: &str, args: &[&str]) -> bool {
        in_ns(ns, args).is_ok()
    }

    fn teardown(&self) {
        for ns in [&self.gw_ns, &self.nat_ns, &self.lan_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.root_if])
            .output();
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        self.teardown();
    }
}
