//! Validation of values admins send: names, hostnames, `host:port` targets and endpoints.

use std::net::{Ipv4Addr, Ipv6Addr};

/// The longest name a site, gateway or resource may have.
pub const MAX_NAME_LEN: usize = 64;

/// A trimmed, non-empty name of at most [`MAX_NAME_LEN`] characters.
pub fn name(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("name must not be empty".into());
    }
    if s.chars().count() > MAX_NAME_LEN {
        return Err(format!("name must be at most {MAX_NAME_LEN} characters"));
    }
    if s.chars().any(char::is_control) {
        return Err("name must not contain control characters".into());
    }
    Ok(s.to_owned())
}

fn is_dns_name(s: &str) -> bool {
    if s.is_empty() || s.len() > 253 {
        return false;
    }
    s.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    })
}

/// A public hostname (RFC 1123 labels), returned in lower case. `demo.localhost` is fine; IP
/// addresses, ports, wildcards and trailing dots are not.
pub fn hostname(s: &str) -> Result<String, String> {
    let h = s.trim().to_ascii_lowercase();
    if !is_dns_name(&h) {
        return Err(format!(
            "hostname {s:?} is not valid: use dot-separated labels of letters, digits and '-' (e.g. demo.localhost)"
        ));
    }
    if h.parse::<Ipv4Addr>().is_ok() {
        return Err(format!("hostname {s:?} is an IP address, not a hostname"));
    }
    Ok(h)
}

/// A `host:port` (host: DNS name, IPv4 or `[IPv6]`; port 1..=65535), with the host lower-cased.
pub fn host_port(s: &str, what: &str) -> Result<String, String> {
    let err =
        || format!("{what} {s:?} is not valid: expected host:port with a port between 1 and 65535");
    let s = s.trim();
    let (host, port) = s.rsplit_once(':').ok_or_else(err)?;
    let port: u16 = port.parse().map_err(|_| err())?;
    if port == 0 {
        return Err(err());
    }
    let host = host.to_ascii_lowercase();
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner.parse::<Ipv6Addr>().is_ok()
    } else {
        host.parse::<Ipv4Addr>().is_ok() || is_dns_name(&host)
    };
    if !host_ok {
        return Err(err());
    }
    Ok(format!("{host}:{port}"))
}

/// An e-mail address (`local@domain`, at most 254 characters), returned in lower case.
pub fn email(s: &str) -> Result<String, String> {
    let e = s.trim().to_ascii_lowercase();
    let err = || format!("{s:?} is not an e-mail address");
    let (local, domain) = e.rsplit_once('@').ok_or_else(err)?;
    if e.len() > 254
        || local.is_empty()
        || local.len() > 64
        || !local
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'@' | b'"' | b',' | b'<' | b'>'))
        || !is_dns_name(domain)
    {
        return Err(err());
    }
    Ok(e)
}

/// A role or permission name: 1 to 64 of `a-z 0-9 _ - : .`.
pub fn role(s: &str) -> Result<String, String> {
    if s.is_empty()
        || s.len() > 64
        || !s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b':' | b'.')
        })
    {
        return Err(format!(
            "{s:?} is not a role name: use 1 to 64 of a-z, 0-9, '_', '-', ':' and '.'"
        ));
    }
    Ok(s.to_owned())
}

/// A password: 10 to 1024 characters (longer ones only cost hashing time).
pub fn password(s: &str) -> Result<(), String> {
    let n = s.chars().count();
    if n < 10 {
        return Err("the password must have at least 10 characters".into());
    }
    if n > 1024 {
        return Err("the password must have at most 1024 characters".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_roles_passwords() {
        assert_eq!(email(" Ann@Example.COM ").unwrap(), "ann@example.com");
        for bad in [
            "",
            "ann",
            "@x.com",
            "ann@",
            "a b@x.com",
            "ann@x..com",
            "a<b@x.com",
        ] {
            assert!(email(bad).is_err(), "{bad}");
        }
        assert!(role("resource:read").is_ok());
        assert!(role("Admin").is_err());
        assert!(role("").is_err());
        assert!(password("short").is_err());
        assert!(password("long enough password").is_ok());
    }

    #[test]
    fn hostnames() {
        assert_eq!(hostname("Demo.LocalHost").unwrap(), "demo.localhost");
        assert_eq!(hostname("a-b.example.com").unwrap(), "a-b.example.com");
        for bad in [
            "", "-a.com", "a-.com", "a..com", "a.com.", "a_b.com", "*.a.com", "a.com:80",
            "1.2.3.4", "a b.com",
        ] {
            assert!(hostname(bad).is_err(), "{bad}");
        }
        assert!(hostname(&format!("{}.com", "a".repeat(64))).is_err());
    }

    #[test]
    fn host_ports() {
        assert_eq!(host_port("127.0.0.1:80", "t").unwrap(), "127.0.0.1:80");
        assert_eq!(host_port("App.lan:65535", "t").unwrap(), "app.lan:65535");
        assert_eq!(host_port("[::1]:8080", "t").unwrap(), "[::1]:8080");
        for bad in [
            "127.0.0.1",
            "h:0",
            "h:65536",
            ":80",
            "h:x",
            "::1:80",
            "a b:1",
        ] {
            assert!(host_port(bad, "t").is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert_eq!(name(" home ").unwrap(), "home");
        assert!(name("  ").is_err());
        assert!(name(&"x".repeat(65)).is_err());
        assert!(name(&"é".repeat(64)).is_ok());
    }
}
