//! SIGHUP reloads of the `--config` file and the shutdown grace period, shared by the gateway and
//! the agent.
//!
//! A reload is a pure comparison first: the settings in force and the settings the file gives now
//! become a list of [`Change`]s, each either applied live or kept until a restart (as rathole's
//! `calculate_events`). Each binary says per key which is which; this module only records the
//! verdicts and logs them. A file that does not read or validate changes nothing: the caller
//! logs the error and keeps serving with what it has.

use std::time::Duration;

use crate::settings::ConfigError;

/// One setting that differs between the settings in force and the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The key, as the `--config` file spells it.
    pub key: &'static str,
    /// Applied at once (`true`), or only at the next restart (`false`: the old value stays).
    pub live: bool,
}

/// The changes one reload found, in the order the keys were compared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes(pub Vec<Change>);

impl Changes {
    /// Records `key` if `old` and `new` differ; `live` says whether it can change while running.
    pub fn compare<T: PartialEq + ?Sized>(
        &mut self,
        key: &'static str,
        old: &T,
        new: &T,
        live: bool,
    ) -> bool {
        let differs = old != new;
        if differs {
            self.0.push(Change { key, live });
        }
        differs
    }

    /// The keys applied live.
    pub fn live(&self) -> Vec<&'static str> {
        self.0.iter().filter(|c| c.live).map(|c| c.key).collect()
    }

    /// The keys that need a restart.
    pub fn restart(&self) -> Vec<&'static str> {
        self.0.iter().filter(|c| !c.live).map(|c| c.key).collect()
    }

    /// Logs the outcome: a WARN for each key that needs a restart (naming it), one INFO line
    /// with the keys applied live.
    pub fn log(&self) {
        for key in self.restart() {
            tracing::warn!(
                key,
                "config reload: {key} changed, but it takes effect only at a restart; keeping the \
                 old value"
            );
        }
        let live = self.live();
        if live.is_empty() {
            tracing::info!("config reloaded: nothing to change");
        } else {
            tracing::info!(keys = ?live, "config reloaded");
        }
    }
}

/// The shutdown grace period when none is given.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The longest shutdown grace period accepted.
pub const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(3600);

/// Parses a shutdown grace period: whole seconds (`5`) or a number with a unit (`500ms`, `5s`,
/// `2m`, `1h`); from 0 (stop at once) to an hour.
pub fn parse_grace(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("{s:?} is not a grace period (examples: 5, 5s, 500ms, 2m)");
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(bad()),
    };
    if d > MAX_SHUTDOWN_GRACE {
        return Err(format!("{s:?} is longer than an hour"));
    }
    Ok(d)
}

/// The `--shutdown-grace` flag of both node binaries (`#[command(flatten)]`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ShutdownArgs {
    /// On SIGTERM or ctrl-c: stop accepting at once, then let requests and streams in flight
    /// finish for at most this long (5, 5s, 500ms, 2m; 0 to an hour) [default: 10s].
    #[arg(long, env = "KAKUREMICHI_SHUTDOWN_GRACE", value_parser = parse_grace)]
    pub shutdown_grace: Option<Duration>,
}

impl ShutdownArgs {
    /// The flag over the file's `shutdown_grace` over the default, validated.
    pub fn resolve(&self, file: Option<&str>) -> Result<Duration, ConfigError> {
        match (self.shutdown_grace, file) {
            (Some(d), _) => Ok(d),
            (None, Some(s)) => {
                parse_grace(s).map_err(|e| ConfigError::Invalid(format!("shutdown_grace: {e}")))
            }
            (None, None) => Ok(DEFAULT_SHUTDOWN_GRACE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_periods_parse_with_or_without_a_unit_and_are_bounded() {
        assert_eq!(parse_grace("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_grace(" 5s "), Ok(Duration::from_secs(5)));
        assert_eq!(parse_grace("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_grace("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_grace("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_grace("0"), Ok(Duration::ZERO));
        for bad in ["", "s", "-1", "5 days", "1.5s", "2h", "soon"] {
            assert!(parse_grace(bad).is_err(), "{bad:?} accepted");
        }
        let args = ShutdownArgs::default();
        assert_eq!(args.resolve(None).unwrap(), DEFAULT_SHUTDOWN_GRACE);
        assert_eq!(args.resolve(Some("3s")).unwrap(), Duration::from_secs(3));
        let err = args.resolve(Some("3 weeks")).unwrap_err();
        assert!(err.to_string().starts_with("shutdown_grace: "), "{err}");
        let flag = ShutdownArgs {
            shutdown_grace: Some(Duration::from_secs(1)),
        };
        assert_eq!(flag.resolve(Some("3s")).unwrap(), Duration::from_secs(1));
    }

    #[test]
    fn changes_record_only_what_differs_with_its_verdict() {
        let mut c = Changes::default();
        assert!(!c.compare("same", &1, &1, true));
        assert!(c.compare("timeout", &1, &2, true));
        assert!(c.compare("listen", "a", "b", false));
        assert_eq!(c.live(), ["timeout"]);
        assert_eq!(c.restart(), ["listen"]);
    }
}
