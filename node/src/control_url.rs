//! The one rule for the URL a node reaches control at: HTTPS, unless control is on this machine.
//!
//! The enrollment token goes to control in the enrollment request, and the node credential in
//! every control-channel hello: over plain `http://` (and `ws://`) both cross the network in clear
//! text, where anyone on the path can copy them and impersonate the node. So a node refuses a plain
//! `http://` control URL unless its host is loopback (`127.0.0.0/8`, `::1`, `localhost` or a name
//! ending in `.localhost`, which resolve to loopback), or the operator opted out with
//! `--allow-insecure-control` (a lab, a test network).
//!
//! The control URL may be a comma-separated list of base URLs, one per control replica
//! (`https://c1.example.com,https://c2.example.com`): [`control_urls`] splits it, and
//! [`check_control_urls`] applies the rule above to each member. The list stays one string wherever
//! it is stored (`--control`, `control` in the `--config` file, `control_url` in `state.json`).

use std::borrow::Cow;
use std::net::{IpAddr, Ipv6Addr};

use reqwest::Url;

/// A control URL the node must not use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlUrlError {
    /// The URL does not parse.
    #[error("control URL {url:?} is not a valid URL ({reason}): expected e.g. https://control.example.com")]
    Invalid {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The scheme is neither `http` nor `https`.
    #[error("control URL {url:?} must start with http:// or https://")]
    Scheme {
        /// The URL as given.
        url: String,
    },
    /// The list of control URLs holds no URL (empty, or only commas and white space).
    #[error(
        "no control URL in {given:?}: expected e.g. https://control.example.com, or several \
         separated by commas"
    )]
    Empty {
        /// The list as given.
        given: String,
    },
    /// Plain `http://` to a host that is not loopback, and insecure control was not allowed.
    #[error(
        "control URL {url} is not HTTPS: the credential would travel in clear text; use https://, \
         or pass --allow-insecure-control for a lab"
    )]
    Insecure {
        /// The URL as given.
        url: String,
    },
}

/// Checks that `url` is a usable control URL and that credentials sent to it stay off clear text:
/// `https://` always passes, `http://` only to a loopback host (see [`is_loopback_host`]) or with
/// `allow_insecure` (`--allow-insecure-control`). Anything else, or a URL that does not parse, is
/// an error saying what to do.
pub fn check_control_url(url: &str, allow_insecure: bool) -> Result<(), ControlUrlError> {
    let trimmed = url.trim();
    let parsed = Url::parse(trimmed).map_err(|e| ControlUrlError::Invalid {
        url: trimmed.to_owned(),
        reason: e.to_string(),
    })?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" => {
            // The `http` scheme always has a host once parsed ("http://" alone fails to parse).
            let loopback = parsed.host_str().is_some_and(is_loopback_host);
            if loopback || allow_insecure {
                Ok(())
            } else {
                Err(ControlUrlError::Insecure {
                    url: trimmed.to_owned(),
                })
            }
        }
        _ => Err(ControlUrlError::Scheme {
            url: trimmed.to_owned(),
        }),
    }
}

/// The members of a control URL list: `s` split on `,`, each trimmed of white space and of
/// trailing `/`, empty members dropped. A single URL gives a list of one; nothing gives an empty
/// list (which [`check_control_urls`] refuses).
pub fn control_urls(s: &str) -> Vec<String> {
    s.split(',')
        .map(|u| u.trim().trim_end_matches('/'))
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

/// [`check_control_url`] applied to each member of the comma-separated list `s` (see
/// [`control_urls`]): the first bad member is the error, named in it; a list without any URL is
/// [`ControlUrlError::Empty`]. Returns the members.
pub fn check_control_urls(s: &str, allow_insecure: bool) -> Result<Vec<String>, ControlUrlError> {
    let urls = control_urls(s);
    if urls.is_empty() {
        return Err(ControlUrlError::Empty {
            given: s.to_owned(),
        });
    }
    for url in &urls {
        check_control_url(url, allow_insecure)?;
    }
    Ok(urls)
}

/// `url` fit for a log line: a `user:password@` before the host is replaced by `***@`, so that
/// nothing a URL could carry as a credential is written out.
pub fn redact_url(url: &str) -> Cow<'_, str> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_len].rfind('@') {
        Some(at) => Cow::Owned(format!("{}***{}", &url[..start], &rest[at..])),
        None => Cow::Borrowed(url),
    }
}

/// Whether a URL's host (as [`Url::host_str`] gives it: IPv6 in brackets) never leaves this
/// machine: `127.0.0.0/8`, `::1` (also IPv4-mapped `::ffff:127.x.y.z`), `localhost` and names under
/// `.localhost` (RFC 6761 keeps them on loopback), case-insensitively, with or without a final dot.
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match bare.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.is_loopback(),
        Ok(IpAddr::V6(v6)) => {
            v6 == Ipv6Addr::LOCALHOST || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Err(_) => {
            let name = bare.strip_suffix('.').unwrap_or(bare).to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_is_always_fine() {
        for url in [
            "https://control.example.com",
            "https://10.0.0.1:3000/",
            "HTTPS://Control.Example.com:8443/base",
            "  https://[2001:db8::1]:3000  ",
        ] {
            assert_eq!(check_control_url(url, false), Ok(()), "{url}");
        }
    }

    #[test]
    fn http_to_loopback_is_fine() {
        for url in [
            "http://127.0.0.1:3000",
            "http://127.0.0.1:3000/",
            "http://127.1.2.3",
            "http://[::1]:3000",
            "http://[::ffff:127.0.0.1]:3000",
            "http://localhost:3000",
            "http://LOCALHOST",
            "http://localhost.:3000",
            "http://demo.localhost:8080",
            "http://a.b.localhost",
        ] {
            assert_eq!(check_control_url(url, false), Ok(()), "{url}");
        }
    }

    #[test]
    fn http_elsewhere_is_refused_with_what_to_do() {
        for url in [
            "http://10.0.0.1",
            "http://10.0.0.1:3000",
            "http://example.com",
            "http://198.19.0.1:3000/",
            "http://[2001:db8::1]:3000",
            "http://[::ffff:10.0.0.1]",
            "http://0.0.0.0:3000",
            // Look-alikes of loopback that are not.
            "http://localhost.example.com",
            "http://notlocalhost",
            "http://127.0.0.1.nip.io",
            "http://127.0.0.1@example.com",
        ] {
            let err = check_control_url(url, false).unwrap_err();
            assert!(
                matches!(err, ControlUrlError::Insecure { .. }),
                "{url}: {err}"
            );
        }
        assert_eq!(
            check_control_url("http://10.0.0.1:3000", false)
                .unwrap_err()
                .to_string(),
            "control URL http://10.0.0.1:3000 is not HTTPS: the credential would travel in clear \
             text; use https://, or pass --allow-insecure-control for a lab"
        );
    }

    #[test]
    fn allow_insecure_lets_http_through() {
        for url in [
            "http://10.0.0.1:3000",
            "http://example.com",
            "http://127.0.0.1:3000",
        ] {
            assert_eq!(check_control_url(url, true), Ok(()), "{url}");
        }
        // The flag is about clear text only: garbage stays garbage.
        assert!(check_control_url("ftp://example.com", true).is_err());
        assert!(check_control_url("example.com", true).is_err());
    }

    #[test]
    fn loopback_hosts() {
        for host in [
            "127.0.0.1",
            "127.255.0.9",
            "[::1]",
            "::1",
            "localhost",
            "x.localhost.",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in ["10.0.0.1", "[2001:db8::1]", "localhost.example", "", "[::1"] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn a_list_is_split_trimmed_and_slashes_dropped() {
        assert_eq!(
            control_urls(
                " https://c1.example.com/ ,https://c2.example.com//,, \t,http://127.0.0.1:3000"
            ),
            [
                "https://c1.example.com",
                "https://c2.example.com",
                "http://127.0.0.1:3000"
            ]
        );
        assert!(control_urls("").is_empty());
        assert!(control_urls(" , ,").is_empty());
    }

    #[test]
    fn a_single_url_is_a_list_of_one() {
        assert_eq!(
            control_urls("https://control.example.com/"),
            ["https://control.example.com"]
        );
        assert_eq!(
            check_control_urls("http://127.0.0.1:3000/", false),
            Ok(vec!["http://127.0.0.1:3000".to_owned()])
        );
        assert_eq!(
            check_control_urls("http://10.0.0.1:3000", false),
            Err(ControlUrlError::Insecure {
                url: "http://10.0.0.1:3000".into()
            })
        );
    }

    #[test]
    fn every_url_of_a_list_is_checked_and_the_bad_one_named() {
        assert_eq!(
            check_control_urls("https://c1.example.com, https://c2.example.com/", false),
            Ok(vec![
                "https://c1.example.com".to_owned(),
                "https://c2.example.com".to_owned()
            ])
        );
        let err =
            check_control_urls("https://c1.example.com,http://c2.example.com", false).unwrap_err();
        assert_eq!(
            err,
            ControlUrlError::Insecure {
                url: "http://c2.example.com".into()
            }
        );
        assert!(
            err.to_string()
                .contains("http://c2.example.com is not HTTPS"),
            "{err}"
        );
        // The flag covers every member, garbage stays garbage.
        assert!(check_control_urls("http://c1.example.com,http://c2.example.com", true).is_ok());
        let err = check_control_urls("https://c1.example.com,c2.example.com", true).unwrap_err();
        assert!(matches!(err, ControlUrlError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("\"c2.example.com\""), "{err}");
        let err =
            check_control_urls("ftp://c1.example.com , https://c2.example.com", true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "control URL \"ftp://c1.example.com\" must start with http:// or https://"
        );
    }

    #[test]
    fn an_empty_list_is_refused() {
        for given in ["", "  ", ",", " , / ,"] {
            let err = check_control_urls(given, true).unwrap_err();
            assert_eq!(
                err,
                ControlUrlError::Empty {
                    given: given.into()
                }
            );
            assert!(err.to_string().starts_with("no control URL in"), "{err}");
        }
    }

    #[test]
    fn user_info_is_redacted_for_logs() {
        assert_eq!(
            redact_url("wss://control.example.com/api/v1/nodes/connect"),
            "wss://control.example.com/api/v1/nodes/connect"
        );
        assert_eq!(
            redact_url("https://user:pw@control.example.com:8443/a@b"),
            "https://***@control.example.com:8443/a@b"
        );
        assert_eq!(redact_url("ws://a@b@127.0.0.1"), "ws://***@127.0.0.1");
        assert_eq!(redact_url("http://h/?q=a@b"), "http://h/?q=a@b");
    }

    #[test]
    fn garbage_is_a_clear_error() {
        for url in [
            "",
            "control.example.com",
            "not a url",
            "http://",
            "http://exa mple.com",
            "https://:3000",
        ] {
            let err = check_control_url(url, false).unwrap_err();
            assert!(
                matches!(err, ControlUrlError::Invalid { .. }),
                "{url:?}: {err}"
            );
            assert!(err.to_string().contains("is not a valid URL"), "{err}");
        }
        let err = check_control_url("ftp://control.example.com", false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "control URL \"ftp://control.example.com\" must start with http:// or https://"
        );
        assert!(matches!(
            check_control_url("ws://127.0.0.1:3000", false),
            Err(ControlUrlError::Scheme { .. })
        ));
    }
}
