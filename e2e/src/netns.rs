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
//!
//! [`RoutedHost`] is a smaller lab: one namespace behind a router namespace whose forwarding a
//! test can black-hole port by port (a gateway cut off from control).

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
    /// The NAT router's outside interface (towards the gateway).
    nat_out_if: String,
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
        // One lab at a time on this machine, across test processes and test runs: the link to
        // the harness has fixed addresses, and a second lab's would take the first one's
        // traffic. Wait for the claim and for the address to be free (a lab of a process that
        // does not claim, or one left behind).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
        let holder = |addrs: &str| {
            addrs
                .lines()
                .find(|l| l.contains(" 198.18.0.1/"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or_default().to_owned())
        };
        let mut claimed = false;
        loop {
            claimed = claimed || crate::claim_name(NAT_LAB_CLAIM);
            let addrs = Command::new("ip")
                .args(["-o", "-4", "addr", "show"])
                .output()
                .context("running ip addr show")?;
            let held = holder(&String::from_utf8_lossy(&addrs.stdout));
            if claimed && held.is_none() {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "another NAT lab is up ({}): it has the harness-side link's addresses",
                    held.map_or("a test process holds the claim".into(), |i| format!(
                        "interface {i} holds 198.18.0.1"
                    ))
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let id = std::process::id() % 100_000;
        let lab = NatLab {
            gw_ns: format!("kmgw{id}"),
            nat_ns: format!("kmnat{id}"),
            lan_ns: format!("kmlan{id}"),
            root_if: format!("kmr{id}"),
            nat_out_if: format!("kmn{id}a"),
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
        // No segmentation offloads on the routed path: packets are at most the MTU, as on a
        // real link, so the router's random drops hit TCP segments and WireGuard datagrams
        // alike (veth would otherwise carry 64 KB TCP super-segments and drop one of those).
        for (ns, dev) in [(gw, &g1), (nat, &n0), (nat, &n1), (lan, &l0)] {
            in_ns(
                ns,
                &[
                    "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off",
                ],
            )
            .context("ethtool is needed (package ethtool)")?;
        }
        // routes: the LAN and the NAT go out through the gateway side; the gateway side has no
        // route back into the LAN.
        in_ns(lan, &["ip", "route", "add", "default", "via", "198.19.0.1"])?;
        in_ns(nat, &["ip", "route", "add", "default", "via", "198.18.1.1"])?;
        in_ns(nat, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        // NAT: masquerade what leaves (UDP by a rule of its own, first, which `rebind` swaps),
        // let back only what belongs to flows the LAN opened.
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
                "-p",
                "udp",
                "-j",
                "MASQUERADE",
            ],
        )?;
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

    /// Makes the NAT router drop packets at random with `probability`, both ways (this kernel has
    /// no `netem`: iptables' `statistic` match does it). 0 removes the rule.
    pub fn set_router_loss(&self, probability: f64) -> anyhow::Result<()> {
        let _ = in_ns(
            &self.nat_ns,
            &[
                "iptables",
                "-D",
                "FORWARD",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &self.current_loss(),
                "-j",
                "DROP",
            ],
        );
        if probability > 0.0 {
            let p = format!("{probability}");
            in_ns(
                &self.nat_ns,
                &[
                    "iptables",
                    "-I",
                    "FORWARD",
                    "1",
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &p,
                    "-j",
                    "DROP",
                ],
            )?;
            std::fs::write(self.loss_file(), &p)?;
        } else {
            let _ = std::fs::remove_file(self.loss_file());
        }
        Ok(())
    }

    fn loss_file(&self) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("{}.loss", self.nat_ns))
    }

    fn current_loss(&self) -> String {
        std::fs::read_to_string(self.loss_file()).unwrap_or_else(|_| "0".into())
    }

    /// The NAT forgets every mapping (`conntrack -F`) and moves the source ports it maps to
    /// (`ports`, e.g. `"41000-41999"`), as a home router does after a reboot or a lease change.
    pub fn rebind(&self, ports: &str) -> anyhow::Result<()> {
        in_ns(
            &self.nat_ns,
            &[
                "iptables",
                "-t",
                "nat",
                "-R",
                "POSTROUTING",
                "1",
                "-o",
                &self.nat_out_if,
                "-p",
                "udp",
                "-j",
                "MASQUERADE",
                "--to-ports",
                ports,
            ],
        )?;
        in_ns(&self.nat_ns, &["conntrack", "-F"])
            .context("conntrack is needed (package conntrack)")?;
        Ok(())
    }

    /// Lets the harness reach the gateway namespace's public address ([`GW_PUBLIC`]) too, as a
    /// browser on the internet reaches a control whose public URL names that address. Only that
    /// address: the gateway namespace does not forward, so the NAT and the LAN stay out of reach.
    pub fn route_harness_to_public_side(&self) -> anyhow::Result<()> {
        let public = std::net::Ipv4Addr::from(GW_PUBLIC).to_string();
        run(&[
            "ip",
            "route",
            "add",
            &format!("{public}/32"),
            "via",
            "198.18.0.2",
            "dev",
            &self.root_if,
        ])
    }

    /// Runs a command inside namespace `ns` and returns its standard output.
    pub fn exec_output(&self, ns: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()
            .with_context(|| format!("running {}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "`{}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a command inside namespace `ns`; returns whether it succeeded.
    pub fn exec_ok(&self, ns: &str, args: &[&str]) -> bool {
        in_ns(ns, args).is_ok()
    }

    fn teardown(&self) {
        let _ = std::fs::remove_file(self.loss_file());
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
        crate::release_name(NAT_LAB_CLAIM);
    }
}

/// The claim that one [`NatLab`] at a time holds.
const NAT_LAB_CLAIM: &str = "nat-lab";

/// Runs `script` with `sh -c` in namespace `ns`, with `env` added: (exit code, stdout, stderr).
pub fn sh_in(ns: &str, script: &str, env: &[(&str, String)]) -> (i32, String, String) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", script])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running ip netns exec");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Kills, when dropped, the agent whose pid a data folder's `agent.pid` names.
#[derive(Debug)]
pub struct InstalledAgent(pub std::path::PathBuf);

impl InstalledAgent {
    /// The pid its `agent.pid` names.
    pub fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.0.join("agent.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for InstalledAgent {
    fn drop(&mut self) {
        // Only if that pid is still an agent: once the agent has ended, its pid may be another
        // process's (a test's gateway, say), which must not be killed for it.
        let is_agent = |pid: i32| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("kakuremichi-agent"))
        };
        if let Some(pid) = self.pid().filter(|p| *p > 1 && is_agent(*p)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// One namespace (`host_ns`) that reaches the harness's own only through a router namespace
/// (`router_ns`), on a /24 of its own in 198.18.16.0-198.18.255.255 (claimed across test
/// processes, so several hosts run at once, beside a [`NatLab`]):
///
/// ```text
///  harness (root ns)             ns router                        ns host
///  198.18.k.1 ---veth--- 198.18.k.2   198.18.k.5 ---veth--- 198.18.k.6
///  control, agents, clients                                       a gateway
/// ```
/// A node in the host talks to control, agents and clients in the harness's namespace across
/// the router, where [`RoutedHost::cut_tcp_port`] drops a port's packets both ways: a black
/// hole, in which nothing is refused, reset or closed.
#[derive(Debug)]
pub struct RoutedHost {
    /// The namespace of the host.
    pub host_ns: String,
    /// The namespace of the router between the host and the harness.
    pub router_ns: String,
    /// The harness's address on the link to the router: where the host reaches services of
    /// the harness's namespace (listening on it or on 0.0.0.0).
    pub harness_addr: std::net::Ipv4Addr,
    /// The host's address, as the harness's namespace reaches it.
    pub host_addr: std::net::Ipv4Addr,
    root_if: String,
}

impl RoutedHost {
    /// Builds the router and the host. Names carry the process id.
    pub fn new() -> anyhow::Result<RoutedHost> {
        available()?;
        let id = std::process::id() % 100_000;
        let in_use = Command::new("ip")
            .args(["-o", "-4", "addr", "show"])
            .output()
            .context("running ip addr show")?;
        let in_use = String::from_utf8_lossy(&in_use.stdout).into_owned();
        let start = 16 + (id % 240) as u8;
        let k = (0..240u8)
            .map(|i| 16 + (start - 16 + i) % 240)
            .find(|k| {
                !in_use.contains(&format!(" 198.18.{k}."))
                    && crate::claim_name(&format!("net-198.18.{k}"))
            })
            .context("no free /24 in 198.18.16.0-198.18.255.255")?;
        let host = RoutedHost {
            host_ns: format!("kmch{id}"),
            router_ns: format!("kmcr{id}"),
            harness_addr: std::net::Ipv4Addr::new(198, 18, k, 1),
            host_addr: std::net::Ipv4Addr::new(198, 18, k, 6),
            root_if: format!("kmc{id}a"),
        };
        host.teardown();
        host.build(k, id).context("building the routed host")?;
        Ok(host)
    }

    fn build(&self, k: u8, id: u32) -> anyhow::Result<()> {
        let (router, host) = (&self.router_ns, &self.host_ns);
        let (r0, r1, h0) = (
            format!("kmc{id}b"),
            format!("kmc{id}c"),
            format!("kmc{id}d"),
        );
        for ns in [router, host] {
            run(&["ip", "netns", "add", ns])?;
            in_ns(ns, &["ip", "link", "set", "lo", "up"])?;
        }
        run(&[
            "ip",
            "link",
            "add",
            &self.root_if,
            "type",
            "veth",
            "peer",
            "name",
            &r0,
        ])?;
        run(&["ip", "link", "set", &r0, "netns", router])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("198.18.{k}.1/30"),
            "dev",
            &self.root_if,
        ])?;
        run(&["ip", "link", "set", &self.root_if, "up"])?;
        in_ns(
            router,
            &["ip", "addr", "add", &format!("198.18.{k}.2/30"), "dev", &r0],
        )?;
        in_ns(router, &["ip", "link", "set", &r0, "up"])?;
        run(&[
            "ip", "link", "add", &r1, "type", "veth", "peer", "name", &h0,
        ])?;
        run(&["ip", "link", "set", &r1, "netns", router])?;
        run(&["ip", "link", "set", &h0, "netns", host])?;
        in_ns(
            router,
            &["ip", "addr", "add", &format!("198.18.{k}.5/30"), "dev", &r1],
        )?;
        in_ns(router, &["ip", "link", "set", &r1, "up"])?;
        in_ns(
            host,
            &["ip", "addr", "add", &format!("198.18.{k}.6/30"), "dev", &h0],
        )?;
        in_ns(host, &["ip", "link", "set", &h0, "up"])?;
        in_ns(router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        in_ns(
            host,
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &format!("198.18.{k}.5"),
            ],
        )?;
        run(&[
            "ip",
            "route",
            "add",
            &format!("198.18.{k}.4/30"),
            "via",
            &format!("198.18.{k}.2"),
            "dev",
            &self.root_if,
        ])?;
        Ok(())
    }

    /// The router drops, both ways, every TCP packet to or from `port` (a service's port in
    /// the harness's namespace) until [`RoutedHost::restore_tcp_port`].
    pub fn cut_tcp_port(&self, port: u16) -> anyhow::Result<()> {
        let p = port.to_string();
        for dir in ["--dport", "--sport"] {
            in_ns(
                &self.router_ns,
                &[
                    "iptables", "-I", "FORWARD", "-p", "tcp", dir, &p, "-j", "DROP",
                ],
            )?;
        }
        Ok(())
    }

    /// Takes away the drops of [`RoutedHost::cut_tcp_port`].
    pub fn restore_tcp_port(&self, port: u16) -> anyhow::Result<()> {
        let p = port.to_string();
        for dir in ["--dport", "--sport"] {
            in_ns(
                &self.router_ns,
                &[
                    "iptables", "-D", "FORWARD", "-p", "tcp", dir, &p, "-j", "DROP",
                ],
            )?;
        }
        Ok(())
    }

    fn teardown(&self) {
        for ns in [&self.host_ns, &self.router_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.root_if])
            .output();
    }
}

impl Drop for RoutedHost {
    fn drop(&mut self) {
        self.teardown();
    }
}
