//! The gateway's and the agent's `--config` files (TOML, unknown fields refused), read and
//! validated as at start: any text is settings or a clear error, never a panic.
#![no_main]

use std::sync::OnceLock;

use clap::Parser as _;
use libfuzzer_sys::fuzz_target;

fn path() -> &'static std::path::Path {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!(
            "kakuremichi-fuzz-config-{}.toml",
            std::process::id()
        ))
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if std::fs::write(path(), text).is_err() {
        return;
    }
    let file = path().display().to_string();
    if let Ok(cli) =
        kakuremichi_gateway::config::Cli::try_parse_from(["kakuremichi-gateway", "--config", &file])
    {
        let _ = cli.resolve();
    }
    if let Ok(cli) =
        kakuremichi_agent::config::Cli::try_parse_from(["kakuremichi-agent", "--config", &file])
    {
        let _ = cli.resolve_all();
    }
});
