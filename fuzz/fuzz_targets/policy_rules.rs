//! Access policies (rules with paths, methods and CIDRs) as gateways receive them, and their
//! evaluation against arbitrary requests: parsed or refused, decided, never a panic. Input: the
//! policy's JSON, then NUL-separated method, path, client address, e-mail and roles.
#![no_main]

use kakuremichi_proto::identity::{glob_matches, normalize_path, AccessPolicy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|b| *b == 0);
    let policy = parts.next().unwrap_or_default();
    let mut text = || {
        parts
            .next()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default()
    };
    let (method, path, client, email, roles) = (text(), text(), text(), text(), text());
    let roles: Vec<String> = roles.split(',').map(str::to_owned).collect();
    let client: std::net::IpAddr = client
        .parse()
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    // Paths are normalized before any rule sees them, as the gateway does.
    let normalized = normalize_path(&path).ok();
    let _ = glob_matches(&method, &path);
    let Ok(policy) = serde_json::from_slice::<AccessPolicy>(policy) else {
        return;
    };
    if let Some(p) = &normalized {
        if let Some((i, rule)) = policy.rule_for(&method, p, client) {
            assert!(i < policy.rules.len());
            assert!(rule.matches(&method, p, client));
        }
    }
    let _ = policy.allows(&email, &roles);
    let _ = policy.allows_email_code(&email);
    let _ = policy.takes_keys();
    let merged = policy.overlaid_with(Some(&policy));
    let _ = merged.allows(&email, &roles);
});
