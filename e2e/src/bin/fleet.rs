//! The fleet bench (issue 6): a real control process and a thousand simulated nodes speaking the
//! real control-channel protocol, in this one process.
//!
//! It enrolls the fleet, connects it, measures the fan-out of changes that touch every agent,
//! control's memory and CPU at steady state, the reconnect storm after a SIGKILL and after a
//! graceful restart (SIGTERM), and a crowd of hellos with wrong credentials. Prints a Markdown
//! table.
//!
//! `kakuremichi-fleet --nodes 1000 --gateways 2 --backend sqlite|postgres`
//!
//! With `--replicas N` (PostgreSQL): N control replicas started together on one fresh schema,
//! the fleet spread over them (each node given every URL, moving on when its replica dies):
//! fan-out of changes made through each replica in turn, RSS and CPU per replica, and how long
//! the nodes of a SIGKILLed replica take to be back on the others.

#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, ValueEnum};
use kakuremichi_e2e::fleet::{
    bad_crowd, clock_ticks_per_second, cpu_ticks, enroll_fleet, ms, touch_every_agent,
    ControlOptions, Counters, Fleet, FleetControl, PgSchema, RssSampler, Select, Summary, Timing,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    Sqlite,
    Postgres,
}

/// Command line of the fleet bench.
#[derive(Debug, Parser)]
#[command(name = "kakuremichi-fleet")]
struct Args {
    /// Simulated agents (sites).
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Simulated gateways.
    #[arg(long, default_value_t = 2)]
    gateways: usize,
    /// Control's database.
    #[arg(long, value_enum, default_value_t = Backend::Sqlite)]
    backend: Backend,
    /// PostgreSQL server for `--backend postgres` (a fresh schema is used and dropped).
    #[arg(
        long,
        env = "KAKUREMICHI_TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres_url: String,
    /// Concurrent API calls while enrolling.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Changes measured for the fan-out.
    #[arg(long, default_value_t = 3)]
    changes: u16,
    /// Seconds of the steady-state CPU window.
    #[arg(long, default_value_t = 10)]
    steady_secs: u64,
    /// Wrong hellos sent at once.
    #[arg(long, default_value_t = 1000)]
    crowd: usize,
    /// Seconds any one wait (connect, fan-out, reconnect) may take.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Control replicas on one PostgreSQL (more than 1 implies `--backend postgres`).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
}

/// The table: (section, metric, value).
#[derive(Debug, Default)]
struct Table(Vec<(String, String, String)>);

impl Table {
    fn row(&mut self, section: &str, metric: &str, value: impl Into<String>) {
        let value = value.into();
        eprintln!("[fleet] {section}: {metric}: {value}");
        self.0.push((section.into(), metric.into(), value));
    }

    fn print(&self, title: &str) {
        println!();
        println!("{title}");
        println!();
        println!("| phase | metric | value |");
        println!("| --- | --- | --- |");
        for (s, m, v) in &self.0 {
            println!("| {s} | {m} | {v} |");
        }
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn storm_rows(table: &mut Table, section: &str, c: &Counters) {
    table.row(section, "handshake attempts", c.attempts.to_string());
    table.row(
        section,
        "handshake timeouts",
        c.handshake_timeouts.to_string(),
    );
    table.row(section, "handshake errors", c.handshake_errors.to_string());
    table.row(section, "busy answers", c.busy.to_string());
    table.row(section, "refusals", c.refusals_text());
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.replicas > 1 {
        args.backend = Backend::Postgres;
    }
    let schema = match args.backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(PgSchema::create(&args.postgres_url).await?),
    };
    let result = if args.replicas > 1 {
        match &schema {
            Some(s) => run_replicas(&args, s).await,
            None => bail!("--replicas needs PostgreSQL"),
        }
    } else {
        run(&args, schema.as_ref()).await
    };
    if let Some(s) = &schema {
        if let Err(e) = s.drop_schema().await {
            eprintln!("[fleet] could not drop schema {}: {e:#}", s.schema);
        }
    }
    let table = result?;
    table.print(&format!(
        "kakuremichi control at fleet scale: {} agents + {} gateways, {} backend, {} replica(s)",
        args.nodes,
        args.gateways,
        match args.backend {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        },
        args.replicas
    ));
    Ok(())
}

/// Raises this process's open-files limit for `sockets` sockets (nodes, crowd, controls).
fn raise_nofile(sockets: usize) {
    let want = (sockets as u64) * 2 + 1024;
    match rlimit::increase_nofile_limit(want) {
        Ok(got) if got < want => eprintln!(
            "[fleet] RLIMIT_NOFILE is {got} (hard limit), below the {want} wanted: expect \
             connect errors"
        ),
        Ok(_) => {}
        Err(e) => eprintln!("[fleet] cannot raise RLIMIT_NOFILE: {e}"),
    }
}

/// Several replicas on one schema: see the crate doc.
async fn run_replicas(args: &Args, schema: &PgSchema) -> anyhow::Result<Table> {
    let timeout = Duration::from_secs(args.timeout_secs);
    let mut t = Table::default();
    raise_nofile(args.nodes + args.gateways);
    let dir = tempfile::Builder::new()
        .prefix("kakuremichi-fleet")
        .disable_cleanup(std::env::var_os("KAKUREMICHI_E2E_KEEP").is_some())
        .tempdir()?;
    let key_file = dir.path().join("secrets.key");
    std::fs::write(&key_file, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")?;
    let started = Instant::now();
    let starts = (0..args.replicas).map(|i| {
        let mut o = ControlOptions::in_dir(&dir.path().join(format!("replica{i}")));
        o.log = dir.path().join(format!("replica{i}.log"));
        o.database_url = Some(schema.url());
        o.secrets_key_file = Some(key_file.clone());
        FleetControl::start(o)
    });
    let mut replicas = futures_util::future::try_join_all(starts).await?;
    t.row(
        "start",
        &format!(
            "{} replicas started together on an empty schema",
            args.replicas
        ),
        secs(started.elapsed()),
    );
    let urls: Vec<String> = replicas.iter().map(FleetControl::url).collect();
    let apis: Vec<_> = replicas.iter().map(|r| r.api.clone()).collect();

    let enrollment = enroll_fleet(&apis[0], args.nodes, args.gateways.max(1), args.concurrency)
        .await
        .map_err(|e| e.context(replicas[0].log_tail(30)))?;
    let n_nodes = args.nodes + args.gateways.max(1);
    t.row(
        "enroll",
        &format!("{} sites + {} gateways", args.nodes, args.gateways.max(1)),
        secs(enrollment.elapsed()),
    );
    let gateway_id = enrollment.gateways[0].node_id;
    let fleet = Fleet::start_over(&urls, enrollment.all(), Timing::default());
    let connected = fleet.wait_connected(timeout).await?;
    t.row(
        "connect",
        &format!(
            "all {n_nodes} welcomed, spread over {} replicas",
            args.replicas
        ),
        secs(connected),
    );

    // Steady state: RSS and CPU per replica.
    let ticks = clock_ticks_per_second() as f64;
    let before: Vec<Option<u64>> = replicas
        .iter()
        .map(|r| r.pid().and_then(cpu_ticks))
        .collect();
    let window = Duration::from_secs(args.steady_secs);
    tokio::time::sleep(window).await;
    for (i, r) in replicas.iter().enumerate() {
        let cpu = match (before[i], r.pid().and_then(cpu_ticks)) {
            (Some(a), Some(b)) => format!(
                "{:.1}%",
                (b.saturating_sub(a)) as f64 / ticks / window.as_secs_f64() * 100.0
            ),
            _ => "n/a".into(),
        };
        let held = fleet
            .nodes()
            .iter()
            .filter(|n| n.control_index() == i)
            .count();
        t.row(
            "steady",
            &format!("replica {i}: nodes held, RSS, CPU over {}", secs(window)),
            format!(
                "{held}, {}, {cpu}",
                r.rss_kib().map(mib).unwrap_or_else(|| "n/a".into())
            ),
        );
    }

    // Fan-out of changes through each replica in turn.
    for c in 0..args.changes {
        let via = usize::from(c) % replicas.len();
        let (since, version) =
            touch_every_agent(&apis[via], gateway_id, &format!("127.0.0.1:{}", 31000 + c)).await?;
        let lat = fleet
            .wait_version(Select::Agents, version, since, timeout)
            .await?;
        let s: Summary = lat.summary();
        t.row(
            "fan-out",
            &format!(
                "change {} through replica {via}: all {} agents (p50 / p99 / max)",
                c + 1,
                args.nodes
            ),
            format!("{} / {} / {}", ms(s.p50), ms(s.p99), ms(s.max)),
        );
    }

    // One replica SIGKILLed: its nodes back on the others.
    let victim = 0;
    let on_victim: Vec<_> = fleet
        .nodes()
        .iter()
        .filter(|n| n.control_index() == victim)
        .cloned()
        .collect();
    let samplers: Vec<_> = replicas
        .iter()
        .skip(1)
        .filter_map(|r| r.pid())
        .map(|pid| RssSampler::start(pid, Duration::from_millis(100)))
        .collect();
    // Taken before the kill: a node may be welcomed elsewhere before the kill has been reaped.
    let killed = Instant::now();
    replicas[victim].kill();
    let deadline = killed + timeout;
    let back = loop {
        let all_back = on_victim
            .iter()
            .all(|n| n.is_connected() && n.last_welcome().is_some_and(|w| w >= killed));
        if all_back {
            break on_victim
                .iter()
                .filter_map(|n| n.last_welcome())
                .max()
                .map_or(Duration::ZERO, |w| w.duration_since(killed));
        }
        if Instant::now() > deadline {
            let lagging: Vec<String> = on_victim
                .iter()
                .filter(|n| !(n.is_connected() && n.last_welcome().is_some_and(|w| w >= killed)))
                .map(|n| n.describe())
                .collect();
            bail!(
                "{} of the killed replica's {} nodes were not back within {timeout:?} (fleet: \
                 {}); for example:\n{}",
                lagging.len(),
                on_victim.len(),
                fleet.counters(),
                lagging[..lagging.len().min(3)].join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    t.row(
        "replica killed",
        &format!(
            "its {} nodes back on the other replicas (SIGKILL to last welcome)",
            on_victim.len()
        ),
        secs(back),
    );
    for (i, s) in samplers.into_iter().enumerate() {
        let peak = s.stop().await;
        t.row(
            "replica killed",
            &format!("replica {}: RSS peak while taking them over", i + 1),
            mib(peak.peak_kib),
        );
    }
    let still = fleet.connected_count();
    t.row(
        "replica killed",
        "nodes connected after",
        format!("{still} of {n_nodes}"),
    );
    Ok(t)
}

async fn run(args: &Args, schema: Option<&PgSchema>) -> anyhow::Result<Table> {
    if args.gateways == 0 {
        bail!("--gateways must be at least 1: the fan-out changes a gateway's endpoint");
    }
    let timeout = Duration::from_secs(args.timeout_secs);
    let mut t = Table::default();

    // This process holds a socket per node and per wrong hello, control as many again; control
    // inherits the limit.
    let want = ((args.nodes + args.gateways + args.crowd) as u64) * 2 + 1024;
    match rlimit::increase_nofile_limit(want) {
        Ok(got) if got < want => eprintln!(
            "[fleet] RLIMIT_NOFILE is {got} (hard limit), below the {want} wanted: expect \
             connect errors"
        ),
        Ok(_) => {}
        Err(e) => eprintln!("[fleet] cannot raise RLIMIT_NOFILE: {e}"),
    }

    let dir = tempfile::Builder::new()
        .prefix("kakuremichi-fleet")
        .disable_cleanup(std::env::var_os("KAKUREMICHI_E2E_KEEP").is_some())
        .tempdir()?;
    let mut opts = ControlOptions::in_dir(dir.path());
    opts.database_url = schema.map(PgSchema::url);
    let mut control = FleetControl::start(opts).await?;
    let api = control.api.clone();
    eprintln!(
        "[fleet] control pid {:?} at {}, log {}",
        control.pid(),
        control.url(),
        dir.path().join("control.log").display()
    );

    // Enrollment.
    let enrollment = enroll_fleet(&api, args.nodes, args.gateways, args.concurrency)
        .await
        .map_err(|e| e.context(control.log_tail(30)))?;
    let n_nodes = args.nodes + args.gateways;
    t.row(
        "enroll",
        &format!(
            "{} sites + {} gateways (concurrency {})",
            args.nodes, args.gateways, args.concurrency
        ),
        format!(
            "{} (create {}, enroll {}; {:.0} nodes/s)",
            secs(enrollment.elapsed()),
            secs(enrollment.create_time),
            secs(enrollment.enroll_time),
            n_nodes as f64 / enrollment.elapsed().as_secs_f64().max(1e-9)
        ),
    );
    let gateway_id = enrollment.gateways[0].node_id;

    // Connect.
    let fleet = Fleet::start(&control.url(), enrollment.all(), Timing::default());
    let connected = fleet
        .wait_connected(timeout)
        .await
        .map_err(|e| e.context(control.log_tail(30)))?;
    let c = fleet.counters();
    t.row(
        "connect",
        &format!("all {n_nodes} welcomed"),
        format!(
            "{} ({} attempts, {} busy, {} timeouts)",
            secs(connected),
            c.attempts,
            c.busy,
            c.handshake_timeouts
        ),
    );

    // Fan-out.
    let mut all = Vec::new();
    for i in 0..args.changes {
        let (since, version) =
            touch_every_agent(&api, gateway_id, &format!("127.0.0.1:{}", 30000 + i)).await?;
        let lat = fleet
            .wait_version(Select::Agents, version, since, timeout)
            .await
            .map_err(|e| e.context(control.log_tail(30)))?;
        t.row(
            "fan-out",
            &format!("change {} to {} agents", i + 1, args.nodes),
            lat.summary().to_string(),
        );
        all.extend(lat.durations());
    }
    let s = Summary::of(&all);
    t.row(
        "fan-out",
        &format!("all {} changes: p50 / p99 / max", args.changes),
        format!("{} / {} / {}", ms(s.p50), ms(s.p99), ms(s.max)),
    );

    // Steady state.
    let pid = control.pid().context("control is not running")?;
    let hz = clock_ticks_per_second() as f64;
    let ticks_before = cpu_ticks(pid).context("reading control's /proc stat")?;
    let window_start = Instant::now();
    let sampler = RssSampler::start(pid, Duration::from_millis(100));
    tokio::time::sleep(Duration::from_secs(args.steady_secs)).await;
    let ticks_after = cpu_ticks(pid).context("reading control's /proc stat")?;
    let window = window_start.elapsed().as_secs_f64();
    let steady_peak = sampler.stop().await.peak_kib;
    let rss_now = control.rss_kib().unwrap_or(0);
    t.row(
        "steady",
        &format!("control RSS with {n_nodes} connected"),
        format!(
            "{} (peak {} over the window)",
            mib(rss_now),
            mib(steady_peak)
        ),
    );
    t.row(
        "steady",
        &format!("control CPU over {} s", args.steady_secs),
        format!(
            "{:.1} % of one core",
            (ticks_after.saturating_sub(ticks_before)) as f64 / hz / window * 100.0
        ),
    );

    // SIGKILL and restart.
    let before = fleet.counters();
    control.kill();
    let killed = Instant::now();
    control.spawn_again()?;
    let restarted = Instant::now();
    let sampler = RssSampler::start(
        control.pid().context("control is not running")?,
        Duration::from_millis(100),
    );
    let back = fleet
        .wait_reconnected(restarted, timeout)
        .await
        .map_err(|e| e.context(control.log_tail(30)))?;
    let peak = sampler.stop().await.peak_kib;
    let storm = fleet.counters().since(&before);
    t.row(
        "SIGKILL",
        "all back after the restart",
        format!(
            "{} ({} after the kill)",
            secs(back),
            secs(back + restarted.duration_since(killed))
        ),
    );
    storm_rows(&mut t, "SIGKILL", &storm);
    t.row("SIGKILL", "control RSS peak during the storm", mib(peak));

    // Graceful restart.
    let before = fleet.counters();
    let shutdown = control.terminate(Duration::from_secs(30)).await?;
    control.spawn_again()?;
    let restarted = Instant::now();
    let sampler = RssSampler::start(
        control.pid().context("control is not running")?,
        Duration::from_millis(100),
    );
    let back = fleet
        .wait_reconnected(restarted, timeout)
        .await
        .map_err(|e| e.context(control.log_tail(30)))?;
    let peak = sampler.stop().await.peak_kib;
    let storm = fleet.counters().since(&before);
    t.row("SIGTERM", "graceful shutdown took", secs(shutdown));
    t.row(
        "SIGTERM",
        "all back after the restart",
        format!("{} ({} after SIGTERM)", secs(back), secs(back + shutdown)),
    );
    storm_rows(&mut t, "SIGTERM", &storm);
    t.row("SIGTERM", "control RSS peak during the storm", mib(peak));

    // The bad crowd.
    let before = fleet.counters();
    let pid = control.pid().context("control is not running")?;
    let rss_before = control.rss_kib().unwrap_or(0);
    let sampler = RssSampler::start(pid, Duration::from_millis(100));
    let report = bad_crowd(&control.url(), args.crowd, Duration::from_secs(10)).await;
    let peak = sampler.stop().await.peak_kib;
    let after = fleet.counters().since(&before);
    let section = "bad crowd";
    t.row(
        section,
        &format!("{} wrong hellos at once: answers", args.crowd),
        report.answers_text(),
    );
    t.row(
        section,
        "no answer within 10 s / closed unanswered / failed to open",
        format!(
            "{} / {} / {}",
            report.no_answer, report.closed_without_answer, report.connect_failed
        ),
    );
    t.row(section, "answer latency", report.answer_latency.to_string());
    t.row(
        section,
        "control RSS before / peak",
        format!("{} / {}", mib(rss_before), mib(peak)),
    );
    t.row(
        section,
        "real fleet meanwhile",
        format!(
            "{} of {n_nodes} connected, {} sessions lost",
            fleet.connected_count(),
            after.sessions_lost
        ),
    );

    drop(fleet);
    control.kill();
    Ok(t)
}
