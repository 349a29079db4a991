//! Search, sort and cursor pagination of the API's lists: `?q=` (case-insensitive, in names,
//! hostnames, emails, endpoints and ids), `?sort=field` or `-field` (any field of the objects;
//! default `name`, else `email`), `?limit=` (1 to 1000) and `?cursor=` (from the previous page's
//! `Link: <...>; rel="next"`, RFC 8288). The body stays the JSON array it always was;
//! `X-Total-Count` is the number of matches. Without any of them the list is as it always was.

use std::cmp::Ordering;

use axum::extract::rejection::QueryRejection;
use axum::extract::Query;
use axum::http::{header, HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;

use crate::ApiError;

/// The most a page holds.
pub const MAX_LIMIT: usize = 1000;

/// The query of a list.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Search text.
    pub q: Option<String>,
    /// Sort field, `-` first for descending.
    pub sort: Option<String>,
    /// Page size.
    pub limit: Option<usize>,
    /// Where the page starts (opaque).
    pub cursor: Option<String>,
}

/// A list request's query and URI (for the next page's link); a bad query is an [`ApiError`].
#[derive(Debug, Clone)]
pub struct Paged {
    /// The query.
    pub q: PageQuery,
    /// The request's URI as the client sent it.
    pub uri: Uri,
}

impl Paged {
    /// Answers `items` searched, sorted and paged (see [`page`]).
    pub fn page<T: serde::Serialize>(&self, items: Vec<T>) -> Result<Response, ApiError> {
        page(items, &self.q, &self.uri)
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Paged {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let q = query(Query::<PageQuery>::from_request_parts(parts, state).await)?;
        let uri = parts
            .extensions
            .get::<axum::extract::OriginalUri>()
            .map_or_else(|| parts.uri.clone(), |o| o.0.clone());
        Ok(Paged { q, uri })
    }
}

/// [`PageQuery`] with an [`ApiError`] for a bad query.
pub fn query(q: Result<Query<PageQuery>, QueryRejection>) -> Result<PageQuery, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))
}

const SEARCHED: [&str; 5] = ["name", "hostname", "email", "endpoint", "id"];

fn sort_key(v: &Value) -> String {
    match v {
        Value::String(s) => s.to_lowercase(),
        // Numbers sort as numbers: zero-padded.
        Value::Number(n) => n.as_i64().map_or_else(
            || n.to_string(),
            |i| format!("{:020}", i.saturating_add(i64::MAX / 2)),
        ),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Answers `items` searched, sorted and paged by `q` (`uri`: the request's, for the next link).
pub fn page<T: serde::Serialize>(
    items: Vec<T>,
    q: &PageQuery,
    uri: &Uri,
) -> Result<Response, ApiError> {
    let rows: Vec<Value> = items
        .into_iter()
        .map(|i| serde_json::to_value(i).map_err(|e| ApiError::Internal(e.to_string())))
        .collect::<Result<_, _>>()?;
    if q.q.is_none() && q.sort.is_none() && q.limit.is_none() && q.cursor.is_none() {
        return Ok(axum::Json(rows).into_response());
    }
    let limit = match q.limit {
        None => MAX_LIMIT,
        Some(l) if (1..=MAX_LIMIT).contains(&l) => l,
        Some(l) => {
            return Err(ApiError::BadRequest(format!(
                "limit {l}: from 1 to {MAX_LIMIT}"
            )))
        }
    };
    let rows: Vec<Value> = match q.q.as_deref().map(str::to_lowercase) {
        None => rows,
        Some(text) => rows
            .into_iter()
            .filter(|r| {
                SEARCHED.iter().any(|f| {
                    r[*f]
                        .as_str()
                        .is_some_and(|s| s.to_lowercase().contains(&text))
                })
            })
            .collect(),
    };
    let (field, descending) = match q.sort.as_deref() {
        Some(s) => match s.strip_prefix('-') {
            Some(f) => (f.to_owned(), true),
            None => (s.to_owned(), false),
        },
        None if rows.first().is_some_and(|r| r.get("name").is_some()) => ("name".into(), false),
        None => ("email".into(), false),
    };
    if field.is_empty()
        || !field
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(ApiError::BadRequest(format!("sort {field:?}: not a field")));
    }
    let key = |r: &Value| (sort_key(&r[field.as_str()]), sort_key(&r["id"]));
    // Each row's key once (not twice per comparison).
    let mut keyed: Vec<((String, String), Value)> =
        rows.into_iter().map(|r| (key(&r), r)).collect();
    keyed.sort_by(|a, b| {
        let o = a.0.cmp(&b.0);
        if descending {
            o.reverse()
        } else {
            o
        }
    });
    let (keys, mut rows): (Vec<(String, String)>, Vec<Value>) = keyed.into_iter().unzip();
    let total = rows.len();
    let start = match &q.cursor {
        None => 0,
        Some(c) => {
            let after: (String, String) = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(c)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| ApiError::BadRequest("cursor: not one this API gave".into()))?;
            keys.iter()
                .position(|k| {
                    let o = k.cmp(&after);
                    if descending {
                        o == Ordering::Less
                    } else {
                        o == Ordering::Greater
                    }
                })
                .unwrap_or(total)
        }
    };
    let end = (start + limit).min(total);
    let next = (end < total).then(|| {
        let last = &keys[end - 1];
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(last).unwrap_or_default())
    });
    let page: Vec<Value> = rows.drain(start..end).collect();
    let mut resp = axum::Json(page).into_response();
    resp.headers_mut()
        .insert("x-total-count", HeaderValue::from(total));
    if let Some(cursor) = next {
        let mut pairs: Vec<String> = uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty() && !p.starts_with("cursor=") && !p.starts_with("limit="))
            .map(str::to_owned)
            .collect();
        pairs.push(format!("limit={limit}"));
        pairs.push(format!("cursor={cursor}"));
        let link = format!("<{}?{}>; rel=\"next\"", uri.path(), pairs.join("&"));
        if let Ok(v) = HeaderValue::from_str(&link) {
            resp.headers_mut().insert(header::LINK, v);
        }
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    async fn run(items: &[Value], q: &str) -> (Vec<String>, Option<String>, usize) {
        let uri: Uri = format!("/api/v1/sites?{q}").parse().unwrap();
        let query: PageQuery = serde_urlencoded_like(q);
        let resp = page(items.to_vec(), &query, &uri).unwrap();
        let link = resp
            .headers()
            .get(header::LINK)
            .map(|v| v.to_str().unwrap().to_owned());
        let total = resp
            .headers()
            .get("x-total-count")
            .map_or(0, |v| v.to_str().unwrap().parse().unwrap());
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let v: Vec<Value> = serde_json::from_slice(&body).unwrap();
        (
            v.iter()
                .map(|r| r["name"].as_str().unwrap().to_owned())
                .collect(),
            link,
            total,
        )
    }

    fn serde_urlencoded_like(q: &str) -> PageQuery {
        let mut out = PageQuery::default();
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap();
            match k {
                "q" => out.q = Some(v.into()),
                "sort" => out.sort = Some(v.into()),
                "limit" => out.limit = Some(v.parse().unwrap()),
                "cursor" => out.cursor = Some(v.into()),
                _ => panic!("{k}"),
            }
        }
        out
    }

    #[tokio::test]
    async fn pages_follow_their_cursor_to_the_end_in_order() {
        let items: Vec<Value> = (0..25)
            .map(|i| json!({"id": format!("{i:02}"), "name": format!("site-{:02}", 24 - i), "created_at": i}))
            .collect();
        let (all, link, _) = run(&items, "").await;
        assert_eq!(all.len(), 25);
        assert!(link.is_none());
        let mut seen = Vec::new();
        let mut q = "limit=10".to_owned();
        loop {
            let (names, link, total) = run(&items, &q).await;
            assert_eq!(total, 25);
            seen.extend(names);
            let Some(link) = link else { break };
            q = link
                .split_once('?')
                .unwrap()
                .1
                .split_once('>')
                .unwrap()
                .0
                .to_owned();
        }
        let want: Vec<String> = (0..25).map(|i| format!("site-{i:02}")).collect();
        assert_eq!(seen, want);
        let (names, _, total) = run(&items, "q=site-1&sort=-created_at&limit=3").await;
        assert_eq!(total, 10);
        assert_eq!(names, ["site-10", "site-11", "site-12"]);
        let uri: Uri = "/x".parse().unwrap();
        for bad in [
            PageQuery {
                limit: Some(0),
                ..Default::default()
            },
            PageQuery {
                limit: Some(1001),
                ..Default::default()
            },
            PageQuery {
                cursor: Some("zz".into()),
                ..Default::default()
            },
            PageQuery {
                sort: Some("a b".into()),
                ..Default::default()
            },
        ] {
            assert!(page(items.clone(), &bad, &uri).is_err(), "{bad:?}");
        }
    }
}
