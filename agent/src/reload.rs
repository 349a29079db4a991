//! What a SIGHUP changes in a running agent: a pure function from the settings in force and the
//! settings read again (the `--config` file under the same command line and environment, which
//! still win) to the list of changes and the settings in force afterwards.
//!
//! The agent's targets come from control, not from its file, so little is live: `shutdown_grace`.
//! Everything else is bound at start (the data dir, the WireGuard socket, control and its token,
//! QUIC sizes) or belongs to the session host, made once with its command, folders, ports,
//! limits and labels: a change is logged as a WARN naming the key, and the old value stays until
//! a restart.

use kakuremichi_node::reload::Changes;

use crate::config::AgentSettings;

/// Compares `running` with `file` key by key; returns the changes and the settings in force
/// after applying the live ones (the others keep `running`'s values).
pub fn reload(running: &AgentSettings, file: &AgentSettings) -> (Changes, AgentSettings) {
    let mut c = Changes::default();
    let mut next = running.clone();
    if c.compare(
        "shutdown_grace",
        &running.shutdown_grace,
        &file.shutdown_grace,
        true,
    ) {
        next.shutdown_grace = file.shutdown_grace;
    }

    let (on, nn) = (&running.node, &file.node);
    c.compare("control", &on.control, &nn.control, false);
    c.compare(
        "token",
        &on.token.as_ref().map(|t| t.expose()),
        &nn.token.as_ref().map(|t| t.expose()),
        false,
    );
    c.compare(
        "allow_insecure_control",
        &on.allow_insecure_control,
        &nn.allow_insecure_control,
        false,
    );
    c.compare("data_dir", &on.data_dir, &nn.data_dir, false);
    c.compare("wg_listen", &on.wg_listen, &nn.wg_listen, false);
    c.compare("quic", &on.quic, &nn.quic, false);

    // The session host's settings, compared as they print (secrets never live here).
    let (os, ns) = (&running.sessions, &file.sessions);
    let debug = |v: &dyn std::fmt::Debug| format!("{v:?}");
    for (key, old, new) in [
        ("session_command", debug(&os.command), debug(&ns.command)),
        ("session_dir", debug(&os.work_dir), debug(&ns.work_dir)),
        ("session_env_dir", debug(&os.env_dir), debug(&ns.env_dir)),
        (
            "session_startup_script",
            debug(&os.startup_script),
            debug(&ns.startup_script),
        ),
        ("session_user", debug(&os.run_as), debug(&ns.run_as)),
        (
            "session_resume_command",
            debug(&os.resume_command),
            debug(&ns.resume_command),
        ),
        (
            "session_resume_max_age",
            debug(&os.resume_max_age),
            debug(&ns.resume_max_age),
        ),
        ("session_limits", debug(&os.rlimits), debug(&ns.rlimits)),
        (
            "session_ports_and_max_sessions",
            debug(&os.limits),
            debug(&ns.limits),
        ),
        ("session_labels", debug(&os.labels), debug(&ns.labels)),
    ] {
        c.compare(key, &old, &new, false);
    }
    (c, next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cli;
    use clap::Parser as _;
    use std::time::Duration;

    fn settings(toml: &str) -> AgentSettings {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, format!("data_dir = \"/tmp/agent\"\n{toml}")).unwrap();
        Cli::parse_from(["kakuremichi-agent", "--config", path.to_str().unwrap()])
            .resolve_all()
            .unwrap()
    }

    #[test]
    fn the_grace_period_changes_live_and_the_rest_waits_for_a_restart() {
        let old = settings("");
        assert_eq!(old.shutdown_grace, Duration::from_secs(10));
        let (none, _) = reload(&old, &old.clone());
        assert!(none.0.is_empty(), "{none:?}");

        let new = settings(
            "shutdown_grace = \"1s\"\nwg_listen = \"127.0.0.1:5000\"\nmax_sessions = 3\n\
             [session_labels]\nrepo = \"x\"\n",
        );
        let (changes, next) = reload(&old, &new);
        assert_eq!(changes.live(), ["shutdown_grace"]);
        assert_eq!(
            changes.restart(),
            [
                "wg_listen",
                "session_ports_and_max_sessions",
                "session_labels"
            ]
        );
        assert_eq!(next.shutdown_grace, Duration::from_secs(1));
        assert_eq!(next.node.wg_listen, old.node.wg_listen);
        assert_eq!(next.sessions.labels, old.sessions.labels);
    }
}
