//! The systemd units in `deploy/systemd/` stay hardened: `systemd-analyze security
//! --offline=yes` scores each no worse than the exposure recorded in docs/operations.md (the
//! table there and [`RECORDED`] must agree). It fails, never skips, without systemd-analyze
//! (`scripts/setup` installs Debian's `systemd`).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

/// Each unit and its recorded exposure (0 to 10, lower is safer) with systemd 252.
const RECORDED: [(&str, &str); 3] = [
    ("kakuremichi-control.service", "1.1"),
    ("kakuremichi-gateway.service", "1.5"),
    ("kakuremichi-agent.service", "1.2"),
];

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The overall exposure systemd-analyze printed last ("→ Overall exposure level for X: 1.2 OK").
fn overall(output: &str, unit: &str) -> f64 {
    let tail = format!("Overall exposure level for {unit}: ");
    output
        .lines()
        .find_map(|l| l.split_once(&tail))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure for {unit} in:\n{output}"))
}

#[test]
fn every_unit_scores_no_worse_than_its_recorded_exposure() {
    let docs = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    let units: Vec<String> = std::fs::read_dir(repo().join("deploy/systemd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".service"))
        .collect();
    assert_eq!(
        units.len(),
        RECORDED.len(),
        "a unit without a recorded figure: {units:?}"
    );
    for (unit, recorded) in RECORDED {
        let path = repo().join("deploy/systemd").join(unit);
        assert!(path.exists(), "{}", path.display());
        assert!(
            docs.lines().any(|l| l.starts_with(&format!("| `{unit}` |"))
                && l.contains(&format!("| {recorded} |"))),
            "docs/operations.md records no exposure {recorded} for {unit}"
        );
        let limit: f64 = recorded.parse().unwrap();
        // --threshold counts in tenths: the exit status says the score is over it.
        let threshold = (limit * 10.0).round() as u32;
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(format!("--threshold={threshold}"))
            .arg(&path)
            .output()
            .expect("systemd-analyze is missing: run scripts/setup (apt-get install systemd)");
        let text = String::from_utf8_lossy(&out.stdout);
        let score = overall(&text, unit);
        assert!(
            out.status.success() && score <= limit,
            "{unit} is exposed {score}, worse than the recorded {recorded}:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_figure_is_read_from_systemd_analyze_and_a_weaker_unit_fails_the_threshold() {
    // The pre-hardening unit (what deploy/ shipped before): the same command scores it 8.3 and
    // exits non-zero at the agent's threshold.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("weak.service");
    std::fs::write(
        &unit,
        "[Service]\nExecStart=/usr/local/bin/kakuremichi-agent\nDynamicUser=yes\n\
         NoNewPrivileges=yes\nProtectSystem=strict\nProtectHome=yes\nPrivateTmp=yes\n",
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager", "--threshold=12"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze is missing: run scripts/setup (apt-get install systemd)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(overall(&text, "weak.service") > 8.0, "{text}");
}
