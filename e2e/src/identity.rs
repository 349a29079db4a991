//! A browser reduced to what sign-in needs (cookies per host, no redirects followed), for the
//! identity tests and the sign-in benchmark.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context as _};
use reqwest::header::{ACCEPT, COOKIE, HOST, LOCATION, SET_COOKIE};
use reqwest::{Method, StatusCode};

use crate::{wait_for, Stack, DEMO_HOST};

/// An HTTP client that follows no redirects.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("an HTTP client")
}

/// A browser, reduced to what this flow needs: cookies per host, no redirects followed.
#[derive(Debug, Clone)]
pub struct Browser {
    /// The client.
    pub http: reqwest::Client,
    /// host (without port) -> cookie name -> value.
    pub jar: HashMap<String, HashMap<String, String>>,
}

/// A page as the browser got it.
#[derive(Debug)]
pub struct Page {
    /// Status.
    pub status: StatusCode,
    /// Where it redirects, made absolute.
    pub location: Option<String>,
    /// Body.
    pub body: String,
}

impl Default for Browser {
    fn default() -> Self {
        Self::new()
    }
}

impl Browser {
    /// A browser with no cookies.
    pub fn new() -> Browser {
        Browser {
            http: client(),
            jar: HashMap::new(),
        }
    }

    /// A cookie it holds for `host`.
    pub fn cookie(&self, host: &str, name: &str) -> Option<&String> {
        self.jar.get(host)?.get(name)
    }

    /// Sends a request to `url`; requests for resource hostnames go to the gateway's address.
    pub async fn go(
        &mut self,
        stack: &Stack,
        method: Method,
        url: &str,
        form: Option<&[(&str, &str)]>,
    ) -> anyhow::Result<Page> {
        let parsed = url::Url::parse(url).with_context(|| format!("bad URL {url}"))?;
        let host = parsed.host_str().context("no host")?.to_owned();
        let authority = match parsed.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        let path = match parsed.query() {
            Some(q) => format!("{}?{q}", parsed.path()),
            None => parsed.path().to_owned(),
        };
        let target = if host.ends_with(".localhost") {
            format!("http://{}{path}", stack.opts.gateway_http_for_test)
        } else {
            url.to_owned()
        };
        let mut req = self
            .http
            .request(method, target)
            .header(HOST, authority)
            .header(ACCEPT, "text/html,application/xhtml+xml");
        if let Some(cookies) = self.jar.get(&host) {
            let c = cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("; ");
            if !c.is_empty() {
                req = req.header(COOKIE, c);
            }
        }
        if let Some(form) = form {
            req = req.form(form);
        }
        let resp = req.send().await?;
        for v in resp.headers().get_all(SET_COOKIE) {
            let v = v.to_str()?;
            let first = v.split(';').next().unwrap_or_default();
            let (k, val) = first.split_once('=').context("bad Set-Cookie")?;
            let jar = self.jar.entry(host.clone()).or_default();
            if val.is_empty() || v.contains("Max-Age=0") {
                jar.remove(k);
            } else {
                jar.insert(k.to_owned(), val.to_owned());
            }
        }
        let status = resp.status();
        let location = resp
            .headers()
            .get(LOCATION)
            .map(|l| l.to_str().unwrap_or_default().to_owned())
            .map(|l| {
                if l.starts_with('/') {
                    format!("{}://{}{l}", parsed.scheme(), parsed.authority())
                } else {
                    l
                }
            });
        let body = resp.text().await?;
        Ok(Page {
            status,
            location,
            body,
        })
    }

    /// Opens `url` on a protected resource, signs in as `email` at control, and follows the
    /// callback; returns the page the app served at the end.
    pub async fn sign_in(
        &mut self,
        stack: &Stack,
        url: &str,
        email: &str,
        password: &str,
    ) -> anyhow::Result<Page> {
        let (_, fields) = self.sign_in_page(stack, url).await?;
        let posted = self
            .post_sign_in_form(
                stack,
                "/auth/sign-in",
                &fields,
                &[("email", email), ("password", password)],
            )
            .await?;
        self.back_to_app(stack, posted).await
    }

    /// Opens `url` on a protected resource and follows the gateway's redirect to control's
    /// sign-in page; returns the page and its hidden fields (`csrf`, `rd`, `n`).
    pub async fn sign_in_page(
        &mut self,
        stack: &Stack,
        url: &str,
    ) -> anyhow::Result<(Page, SignInFields)> {
        let first = self.go(stack, Method::GET, url, None).await?;
        if first.status != StatusCode::FOUND {
            bail!(
                "expected a redirect to sign in, got {} {}",
                first.status,
                first.body
            );
        }
        let sign_in = first.location.context("no Location")?;
        if !sign_in.starts_with(&format!(
            "{}/auth/sign-in?",
            stack.opts.control_url_for_test
        )) {
            bail!("redirected to {sign_in}, not control's sign-in page");
        }
        let form = self.go(stack, Method::GET, &sign_in, None).await?;
        if form.status != StatusCode::OK {
            bail!("the sign-in page answered {} {}", form.status, form.body);
        }
        let fields = SignInFields {
            csrf: hidden(&form.body, "csrf").context("no csrf field")?,
            rd: hidden(&form.body, "rd").context("no rd field")?,
            n: hidden(&form.body, "n").context("no n field")?,
        };
        Ok((form, fields))
    }

    /// POSTs a form of the sign-in page to `action` on control, with `fields`' hidden values
    /// beside `values`.
    pub async fn post_sign_in_form(
        &mut self,
        stack: &Stack,
        action: &str,
        fields: &SignInFields,
        values: &[(&str, &str)],
    ) -> anyhow::Result<Page> {
        let mut form: Vec<(&str, &str)> = values.to_vec();
        form.extend([
            ("csrf", fields.csrf.as_str()),
            ("rd", fields.rd.as_str()),
            ("n", fields.n.as_str()),
        ]);
        self.go(
            stack,
            Method::POST,
            &format!("{}{action}", stack.opts.control_url_for_test),
            Some(&form),
        )
        .await
    }

    /// Follows control's answer to a sign-in form (a redirect to the gateway's callback) and
    /// the callback's redirect; returns the page the app served.
    pub async fn back_to_app(&mut self, stack: &Stack, posted: Page) -> anyhow::Result<Page> {
        if posted.status != StatusCode::SEE_OTHER {
            bail!("sign-in answered {} {}", posted.status, posted.body);
        }
        let callback = posted.location.context("no callback Location")?;
        if !callback.contains("/.kakuremichi/auth/callback?token=") {
            bail!("control sent the browser to {callback}, not a callback");
        }
        let back = self.go(stack, Method::GET, &callback, None).await?;
        if back.status != StatusCode::FOUND {
            bail!("the callback answered {} {}", back.status, back.body);
        }
        let app = back.location.context("no Location after the callback")?;
        self.go(stack, Method::GET, &app, None).await
    }
}

/// The hidden fields of control's sign-in page for one resource.
#[derive(Debug, Clone)]
pub struct SignInFields {
    /// The CSRF token.
    pub csrf: String,
    /// Where to return.
    pub rd: String,
    /// The nonce hash.
    pub n: String,
}

impl Browser {
    /// GETs `url` and follows redirects (at most 10), as a browser does; returns the last page.
    pub async fn follow(&mut self, stack: &Stack, url: &str) -> anyhow::Result<Page> {
        let mut url = url.to_owned();
        for _ in 0..10 {
            let page = self.go(stack, Method::GET, &url, None).await?;
            match (&page.location, page.status.is_redirection()) {
                (Some(next), true) => url = next.clone(),
                _ => return Ok(page),
            }
        }
        bail!("more than 10 redirects from {url}")
    }
}

/// The value of a hidden form field.
pub fn hidden(html: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html.find(&marker)? + marker.len();
    let end = html[start..].find('"')? + start;
    Some(
        html[start..end]
            .replace("&amp;", "&")
            .replace("&quot;", "\""),
    )
}

/// Gives the demo resource the access policy `access` and waits until the gateway asks for
/// sign-in there.
pub async fn protect_demo(stack: &Stack, access: serde_json::Value) -> anyhow::Result<()> {
    stack
        .api
        .patch(
            &format!("/api/v1/resources/{}", stack.resource_id),
            serde_json::json!({ "access": access }),
        )
        .await?;
    wait_for(
        "the gateway to ask for sign-in",
        Duration::from_secs(10),
        || async {
            let r = stack.get(DEMO_HOST, "/headers").await?;
            Ok((r.status() == 401).then_some(()))
        },
    )
    .await
}

/// The hostname of [`private_resource`].
pub const PRIVATE_HOST: &str = "private.localhost";

/// Creates a user (`user`: the body of `POST /api/v1/users`) and the resource [`PRIVATE_HOST`]
/// on the stack's site, to the demo app, with the sign-in policy `access`.
pub async fn private_resource(
    stack: &Stack,
    user: serde_json::Value,
    access: serde_json::Value,
) -> anyhow::Result<()> {
    let (status, body) = stack
        .api
        .call(Method::POST, "/api/v1/users", Some(user))
        .await?;
    anyhow::ensure!(status == 201, "creating the user: {status} {body}");
    let (status, body) = stack
        .api
        .call(
            Method::POST,
            "/api/v1/resources",
            Some(serde_json::json!({
                "hostname": PRIVATE_HOST, "site_id": stack.site_id,
                "target": stack.opts.app_listen.to_string(), "access": access
            })),
        )
        .await?;
    anyhow::ensure!(
        status == 201,
        "creating the private resource: {status} {body}"
    );
    Ok(())
}

/// Signs in at control's sign-in page as a browser does (CSRF cookie and field, then the session
/// cookie) and returns the console's dashboard page.
pub async fn sign_in_to_console(
    control: &str,
    email: &str,
    password: &str,
) -> anyhow::Result<String> {
    let jar = console_cookies(control, email, password).await?;
    let ui = reqwest::Client::new()
        .get(format!("{control}/ui"))
        .header(reqwest::header::COOKIE, jar)
        .send()
        .await?;
    anyhow::ensure!(ui.status() == 200, "/ui answered {}", ui.status());
    Ok(ui.text().await?)
}

/// Signs in at control's sign-in page as a browser does and returns the `Cookie` header value
/// its pages then need.
pub async fn console_cookies(control: &str, email: &str, password: &str) -> anyhow::Result<String> {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let cookies = |r: &reqwest::Response| -> Vec<String> {
        r.headers()
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok()?.split(';').next().map(str::to_owned))
            .collect()
    };
    let page = http.get(format!("{control}/auth/sign-in")).send().await?;
    let mut jar = cookies(&page);
    let html = page.text().await?;
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .context("no CSRF field on the sign-in page")?
        .to_owned();
    let r = http
        .post(format!("{control}/auth/sign-in"))
        .header(reqwest::header::COOKIE, jar.join("; "))
        .form(&[("email", email), ("password", password), ("csrf", &csrf)])
        .send()
        .await?;
    anyhow::ensure!(
        r.status() == 200 || r.status() == 303,
        "sign-in answered {}",
        r.status()
    );
    jar.extend(cookies(&r));
    Ok(jar.join("; "))
}
