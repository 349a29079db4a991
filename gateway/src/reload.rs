//! What a SIGHUP changes in a running gateway: a pure function from the settings in force and the
//! settings read again (the `--config` file under the same command line and environment, which
//! still win) to the list of changes and the settings in force afterwards.
//!
//! Live: `trusted_proxies`, `upstream_timeout`, `body_timeout`, `connect_timeout` (the proxy's
//! next requests), `header_read_timeout` and `max_header_bytes` (the HTTP and HTTPS listeners'
//! next connections) and `shutdown_grace`. Everything else (listen addresses, the data dir,
//! control and its token, QUIC sizes, TLS, the connection caps, the TCP listen address) is bound
//! into sockets, the tunnel or admission counters at start: a change is logged as a WARN naming
//! the key and the old value stays until a restart.

use kakuremichi_node::reload::Changes;

use crate::config::Settings;

/// Compares `running` with `file` key by key; returns the changes and the settings in force
/// after applying the live ones (the others keep `running`'s values).
pub fn reload(running: &Settings, file: &Settings) -> (Changes, Settings) {
    let mut c = Changes::default();
    let mut next = running.clone();
    let (old, new) = (running, file);

    if c.compare(
        "trusted_proxies",
        &old.trusted_proxies,
        &new.trusted_proxies,
        true,
    ) {
        next.trusted_proxies = new.trusted_proxies.clone();
    }
    if c.compare(
        "upstream_timeout",
        &old.upstream_timeout,
        &new.upstream_timeout,
        true,
    ) {
        next.upstream_timeout = new.upstream_timeout;
    }
    if c.compare("body_timeout", &old.body_timeout, &new.body_timeout, true) {
        next.body_timeout = new.body_timeout;
    }
    if c.compare(
        "connect_timeout",
        &old.connect_timeout,
        &new.connect_timeout,
        true,
    ) {
        next.connect_timeout = new.connect_timeout;
    }
    let (ol, nl) = (&old.limits, &new.limits);
    if c.compare(
        "header_read_timeout",
        &ol.header_read_timeout,
        &nl.header_read_timeout,
        true,
    ) {
        next.limits.header_read_timeout = nl.header_read_timeout;
    }
    if c.compare(
        "max_header_bytes",
        &ol.max_header_bytes,
        &nl.max_header_bytes,
        true,
    ) {
        next.limits.max_header_bytes = nl.max_header_bytes;
    }
    if c.compare(
        "shutdown_grace",
        &old.shutdown_grace,
        &new.shutdown_grace,
        true,
    ) {
        next.shutdown_grace = new.shutdown_grace;
    }

    // Needs a restart.
    c.compare(
        "max_connections",
        &ol.max_connections,
        &nl.max_connections,
        false,
    );
    c.compare(
        "max_connections_per_client",
        &ol.max_connections_per_client,
        &nl.max_connections_per_client,
        false,
    );
    c.compare(
        "max_quic_handshakes",
        &ol.max_quic_handshakes,
        &nl.max_quic_handshakes,
        false,
    );
    let (on, nn) = (&old.node, &new.node);
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
    c.compare("http_listen", &old.http_listen, &new.http_listen, false);
    c.compare(
        "metrics_listen",
        &old.metrics_listen,
        &new.metrics_listen,
        false,
    );
    c.compare(
        "tcp_listen_ip",
        &old.tcp_listen_ip,
        &new.tcp_listen_ip,
        false,
    );
    c.compare(
        "https_listen",
        &old.https.as_ref().map(|h| h.listen),
        &new.https.as_ref().map(|h| h.listen),
        false,
    );
    c.compare(
        "tls_cert_dir",
        &old.https.as_ref().and_then(|h| h.cert_dir.clone()),
        &new.https.as_ref().and_then(|h| h.cert_dir.clone()),
        false,
    );
    c.compare(
        "tls_self_signed",
        &old.https.as_ref().is_some_and(|h| h.self_signed),
        &new.https.as_ref().is_some_and(|h| h.self_signed),
        false,
    );
    c.compare(
        "http3",
        &old.https.as_ref().is_some_and(|h| h.http3),
        &new.https.as_ref().is_some_and(|h| h.http3),
        false,
    );
    (c, next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cli;
    use clap::Parser as _;
    use std::time::Duration;

    fn settings(toml: &str) -> Settings {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(&path, format!("data_dir = \"/tmp/gw\"\n{toml}")).unwrap();
        Cli::parse_from(["kakuremichi-gateway", "--config", path.to_str().unwrap()])
            .resolve()
            .unwrap()
    }

    #[test]
    fn an_unchanged_file_changes_nothing() {
        let s = settings("trusted_proxies = [\"10.0.0.0/8\"]\n");
        let (changes, next) = reload(&s, &s.clone());
        assert!(changes.0.is_empty(), "{changes:?}");
        assert_eq!(next.trusted_proxies, s.trusted_proxies);
    }

    #[test]
    fn live_keys_change_and_the_rest_keeps_its_old_value() {
        let old = settings("http_listen = \"127.0.0.1:8080\"\nmax_connections = 100\n");
        let new = settings(
            "http_listen = \"127.0.0.1:9090\"\nmax_connections = 200\n\
             trusted_proxies = [\"192.0.2.1\"]\nupstream_timeout = \"5s\"\n\
             header_read_timeout = \"3s\"\nmax_header_bytes = 16384\nshutdown_grace = \"2s\"\n\
             [quic]\nmax_streams = 7\n",
        );
        let (changes, next) = reload(&old, &new);
        assert_eq!(
            changes.live(),
            [
                "trusted_proxies",
                "upstream_timeout",
                "header_read_timeout",
                "max_header_bytes",
                "shutdown_grace"
            ]
        );
        assert_eq!(
            changes.restart(),
            ["max_connections", "quic", "http_listen"]
        );
        assert_eq!(next.trusted_proxies, new.trusted_proxies);
        assert_eq!(next.upstream_timeout, Duration::from_secs(5));
        assert_eq!(next.limits.header_read_timeout, Duration::from_secs(3));
        assert_eq!(next.limits.max_header_bytes, 16384);
        assert_eq!(next.shutdown_grace, Duration::from_secs(2));
        // What needs a restart stays as it runs.
        assert_eq!(next.http_listen, old.http_listen);
        assert_eq!(next.limits.max_connections, 100);
        assert_eq!(next.node.quic, old.node.quic);
        // A second reload of the same file warns again (the old value is still in force) and
        // changes nothing live.
        let (again, _) = reload(&next, &new);
        assert!(again.live().is_empty(), "{again:?}");
        assert_eq!(again.restart(), ["max_connections", "quic", "http_listen"]);
    }

    #[test]
    fn https_keys_are_named_one_by_one() {
        let old = settings("");
        let new = settings("https_listen = \"127.0.0.1:8443\"\ntls_self_signed = true\n");
        let (changes, _) = reload(&old, &new);
        assert_eq!(changes.restart(), ["https_listen", "tls_self_signed"]);
    }
}
