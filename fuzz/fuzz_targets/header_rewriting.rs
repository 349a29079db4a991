//! The gateway's rewriting of a client's request headers for the app: any header set, any client
//! address, trusted or not, comes out with no hop-by-hop header, no client-supplied `Forwarded`,
//! and the gateway's own `X-Forwarded-For`, never a panic. Input: a client address byte, a
//! trusted flag, then `name: value` lines.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use kakuremichi_gateway::proxy::{rewrite_request_headers, upgrade_protocol, Forwarding};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [a, flags, rest @ ..] = data else {
        return;
    };
    let client = std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, *a));
    let trusted: Vec<ipnet::IpNet> = if flags & 1 == 1 {
        vec!["10.0.0.0/8".parse().expect("a CIDR")]
    } else {
        Vec::new()
    };
    let mut headers = HeaderMap::new();
    for line in rest.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let host = headers
        .get(http::header::HOST)
        .cloned()
        .unwrap_or(HeaderValue::from_static("app.example.com"));
    let upgrade = upgrade_protocol(&headers);
    let forwarding = Forwarding {
        proto: if flags & 2 == 2 { "https" } else { "http" },
        trusted_proxies: &trusted,
    };
    rewrite_request_headers(&mut headers, client, &host, upgrade.as_ref(), &forwarding);
    assert!(headers.get("forwarded").is_none());
    assert!(headers.get("proxy-connection").is_none());
    assert!(headers.get("keep-alive").is_none());
    let xff = headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .expect("X-Forwarded-For is set");
    assert!(xff.ends_with(&client.to_string()), "{xff}");
});
