//! The OpenAPI 3.1 description of `/api/v1`, generated from the routes themselves.
//!
//! Every module builds its routes with [`ApiRouter`] and this module's [`get`], [`post`],
//! [`patch`], [`put`], [`delete`] and [`any`], which wrap axum's and also record each method
//! and path. The document at `/api/v1/openapi.json` is built from that record, so a route
//! cannot exist without being described, and nothing is described that is not routed. Request
//! and response bodies are described where a route says so ([`MethodDoc::body`],
//! [`MethodDoc::returns`]) with schemars, whose JSON Schema 2020-12 is OpenAPI 3.1's dialect.

use std::collections::BTreeMap;

use axum::handler::Handler;
use axum::http::Method;
use axum::routing::MethodRouter;
use axum::Router;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{json, Map, Value};

/// Describes one schema into a generator's components; returns the `$ref` (or inline) schema.
type SchemaFn = fn(&mut SchemaGenerator) -> Value;

fn schema_of<T: JsonSchema>(g: &mut SchemaGenerator) -> Value {
    g.subschema_for::<T>().to_value()
}

/// What is known of one operation besides its method and path.
#[derive(Debug, Clone)]
pub struct Op {
    /// The HTTP method.
    pub method: Method,
    summary: Option<&'static str>,
    body: Option<SchemaFn>,
    returns: Option<(u16, SchemaFn)>,
    /// Whether the route passes any method through (described as the usual five).
    proxy: bool,
    /// A list taking `?q`, `?sort`, `?limit` and `?cursor` (`api::page`).
    paged: bool,
}

impl Op {
    fn new(method: Method) -> Self {
        Op {
            method,
            summary: None,
            body: None,
            returns: None,
            proxy: false,
            paged: false,
        }
    }
}

/// One routed path and its operations.
#[derive(Debug, Clone)]
pub struct RouteDoc {
    /// The axum path, relative to `/api/v1` (`/sites/{id}`, `/sessions/{id}/{*rest}`).
    pub path: String,
    /// Its operations.
    pub ops: Vec<Op>,
    /// Whether an API key is needed.
    pub authenticated: bool,
}

/// An axum [`MethodRouter`] that remembers its methods and what each is documented with.
pub struct MethodDoc<S> {
    inner: MethodRouter<S>,
    ops: Vec<Op>,
}

macro_rules! method_fns {
    ($($name:ident => $m:ident),* $(,)?) => {
        $(
            #[doc = concat!("axum's `", stringify!($name), "`, recorded for the API description.")]
            pub fn $name<H, T, S>(handler: H) -> MethodDoc<S>
            where
                H: Handler<T, S>,
                T: 'static,
                S: Clone + Send + Sync + 'static,
            {
                MethodDoc { inner: axum::routing::$name(handler), ops: vec![Op::new(Method::$m)] }
            }
        )*

        impl<S: Clone + Send + Sync + 'static> MethodDoc<S> {
            $(
                #[doc = concat!("Adds a `", stringify!($m), "` handler.")]
                pub fn $name<H, T>(mut self, handler: H) -> Self
                where
                    H: Handler<T, S>,
                    T: 'static,
                {
                    self.inner = self.inner.$name(handler);
                    self.ops.push(Op::new(Method::$m));
                    self
                }
            )*
        }
    };
}

method_fns!(get => GET, post => POST, patch => PATCH, put => PUT, delete => DELETE);

/// axum's `any`: a route that passes every method on (to a gateway), described as the usual
/// five methods.
pub fn any<H, T, S>(handler: H) -> MethodDoc<S>
where
    H: Handler<T, S>,
    T: 'static,
    S: Clone + Send + Sync + 'static,
{
    let ops = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
    ]
    .into_iter()
    .map(|m| Op {
        proxy: true,
        ..Op::new(m)
    })
    .collect();
    MethodDoc {
        inner: axum::routing::any(handler),
        ops,
    }
}

impl<S> MethodDoc<S> {
    fn last(&mut self) -> Option<&mut Op> {
        self.ops.last_mut()
    }

    /// The last added method's one-line summary.
    pub fn summary(mut self, s: &'static str) -> Self {
        if let Some(op) = self.last() {
            op.summary = Some(s);
        }
        self
    }

    /// The last added method takes a JSON body of type `T`.
    pub fn body<T: JsonSchema>(mut self) -> Self {
        if let Some(op) = self.last() {
            op.body = Some(schema_of::<T>);
        }
        self
    }

    /// The last added method is a list paged by `api::page`.
    pub fn paged(mut self) -> Self {
        if let Some(op) = self.last() {
            op.paged = true;
        }
        self
    }

    /// The last added method answers `status` with a JSON body of type `T`.
    pub fn returns<T: JsonSchema>(mut self, status: u16) -> Self {
        if let Some(op) = self.last() {
            op.returns = Some((status, schema_of::<T>));
        }
        self
    }
}

impl<S> std::fmt::Debug for MethodDoc<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MethodDoc").field("ops", &self.ops).finish()
    }
}

/// A [`Router`] that also keeps the [`RouteDoc`] of every route added through it.
pub struct ApiRouter<S> {
    router: Router<S>,
    docs: Vec<RouteDoc>,
}

impl<S> std::fmt::Debug for ApiRouter<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiRouter")
            .field("docs", &self.docs)
            .finish()
    }
}

impl<S: Clone + Send + Sync + 'static> Default for ApiRouter<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Clone + Send + Sync + 'static> ApiRouter<S> {
    /// An empty router.
    pub fn new() -> Self {
        ApiRouter {
            router: Router::new(),
            docs: Vec::new(),
        }
    }

    /// Routes `path` (relative to `/api/v1`) to `methods`, and records it.
    pub fn route(mut self, path: &str, methods: MethodDoc<S>) -> Self {
        self.router = self.router.route(path, methods.inner);
        self.docs.push(RouteDoc {
            path: path.to_owned(),
            ops: methods.ops,
            authenticated: true,
        });
        self
    }

    /// Both routers' routes.
    pub fn merge(mut self, other: ApiRouter<S>) -> Self {
        self.router = self.router.merge(other.router);
        self.docs.extend(other.docs);
        self
    }

    /// Marks every route so far as open to anyone (no API key).
    pub fn public(mut self) -> Self {
        for d in &mut self.docs {
            d.authenticated = false;
        }
        self
    }

    /// The axum router and the record of its routes.
    pub fn into_parts(self) -> (Router<S>, Vec<RouteDoc>) {
        (self.router, self.docs)
    }
}

/// `/sessions/{id}/{*rest}` as OpenAPI writes a path (`{rest}`), and its parameter names.
fn openapi_path(path: &str) -> (String, Vec<(String, bool)>) {
    let mut out = String::with_capacity(path.len());
    let mut params = Vec::new();
    let mut rest = path;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        let name = &rest[open + 1..open + close];
        let (name, wildcard) = match name.strip_prefix('*') {
            Some(n) => (n, true),
            None => (name, false),
        };
        out.push('{');
        out.push_str(name);
        out.push('}');
        params.push((name.to_owned(), wildcard));
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    (out, params)
}

fn operation_id(method: &Method, path: &str) -> String {
    let mut id = method.as_str().to_ascii_lowercase();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        id.push('_');
        let part = part.trim_start_matches('{').trim_end_matches('}');
        let part = part.trim_start_matches('*');
        id.extend(
            part.chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }),
        );
    }
    id
}

fn tag_of(path: &str) -> String {
    path.trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or("")
        .to_owned()
}

fn paging_parameters() -> Vec<Value> {
    let param = |name: &str, description: &str, schema: Value| json!({"name": name, "in": "query", "required": false, "description": description, "schema": schema});
    vec![
        param(
            "q",
            "case-insensitive search in names, hostnames, emails, endpoints and ids",
            json!({"type": "string"}),
        ),
        param(
            "sort",
            "a field to sort by; `-field` for descending",
            json!({"type": "string"}),
        ),
        param(
            "limit",
            "a page of at most this many",
            json!({"type": "integer", "minimum": 1, "maximum": 1000}),
        ),
        param(
            "cursor",
            "where the page starts: from the previous page's `Link: rel=next`",
            json!({"type": "string"}),
        ),
    ]
}

fn error_response(what: &str) -> Value {
    json!({
        "description": what,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

/// The OpenAPI 3.1 document of `routes` (paths relative to `/api/v1`).
pub fn openapi(routes: &[RouteDoc]) -> Value {
    // Bodies sent are described as serde reads them, answers as serde writes them (a field
    // skipped when empty is not required in an answer); see `merge_schemas`.
    let settings = schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "#/components/schemas/".into());
    let mut generator = settings.clone().for_deserialize().into_generator();
    let mut answers = settings.for_serialize().into_generator();
    let mut answer_at = Vec::new();
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut tags = std::collections::BTreeSet::new();
    for route in routes {
        let (path, params) = openapi_path(&route.path);
        let tag = tag_of(&route.path);
        tags.insert(tag.clone());
        let item = paths.entry(path.clone()).or_default();
        for op in &route.ops {
            let parameters: Vec<Value> = params
                .iter()
                .map(|(name, wildcard)| {
                    let mut p = json!({
                        "name": name, "in": "path", "required": true,
                        "schema": {"type": "string"},
                    });
                    if *wildcard {
                        p["description"] = json!("the rest of the path; it may contain `/`");
                    }
                    p
                })
                .collect();
            let mut parameters = parameters;
            if op.paged {
                parameters.extend(paging_parameters());
            }
            let mut responses = Map::new();
            match op.returns {
                Some((status, schema)) => {
                    let mut ok = json!({
                        "description": "success",
                        "content": {"application/json": {"schema": schema(&mut answers)}}
                    });
                    if op.paged {
                        ok["headers"] = json!({
                            "Link": {
                                "description": "`<...>; rel=\"next\"` (RFC 8288) while more follow",
                                "schema": {"type": "string"}
                            },
                            "X-Total-Count": {
                                "description": "how many match, on every page",
                                "schema": {"type": "integer"}
                            }
                        });
                    }
                    answer_at.push((path.clone(), op.method.clone(), status.to_string()));
                    responses.insert(status.to_string(), ok);
                }
                None if op.proxy => {
                    responses.insert(
                        "default".into(),
                        json!({"description": "what the session's agent answers"}),
                    );
                }
                None => {
                    responses.insert("2XX".into(), json!({"description": "success"}));
                }
            }
            responses.insert("400".into(), error_response("bad request"));
            if route.authenticated {
                responses.insert(
                    "401".into(),
                    error_response("no API key, or not a valid one"),
                );
                responses.insert(
                    "403".into(),
                    error_response("the API key lacks the permission"),
                );
            }
            responses.insert("404".into(), error_response("not found"));
            let mut operation = json!({
                "operationId": operation_id(&op.method, &route.path),
                "tags": [tag],
                "responses": responses,
            });
            if !parameters.is_empty() {
                operation["parameters"] = Value::Array(parameters);
            }
            if let Some(s) = op.summary {
                operation["summary"] = json!(s);
            }
            if route.authenticated {
                operation["security"] = json!([{"apiKey": []}, {"bearer": []}]);
                // `self`: any user's own key (the `/me` routes), whatever their roles.
                let needed = super::permission(&op.method, &route.path);
                operation["x-kakuremichi-permission"] = if needed.is_empty() {
                    json!("self")
                } else {
                    json!(needed)
                };
            } else {
                operation["security"] = json!([]);
            }
            if let Some(body) = op.body {
                operation["requestBody"] = json!({
                    "required": true,
                    "content": {"application/json": {"schema": body(&mut generator)}}
                });
            } else if matches!(op.method, Method::POST | Method::PATCH | Method::PUT) {
                operation["requestBody"] = json!({
                    "required": false,
                    "content": {"application/json": {"schema": {"type": "object"}}}
                });
            }
            if matches!(op.method, Method::POST) && route.authenticated {
                let params = operation
                    .get_mut("parameters")
                    .and_then(Value::as_array_mut)
                    .map(std::mem::take)
                    .unwrap_or_default();
                let mut params = params;
                params.push(json!({
                    "name": "Idempotency-Key", "in": "header", "required": false,
                    "description": "the first answer is kept 24 h and replayed for the same key",
                    "schema": {"type": "string", "maxLength": 255},
                }));
                operation["parameters"] = Value::Array(params);
            }
            item.insert(op.method.as_str().to_ascii_lowercase(), operation);
        }
    }
    let mut schemas: Map<String, Value> = generator.take_definitions(true).into_iter().collect();
    let renamed = merge_schemas(&mut schemas, answers.take_definitions(true));
    for (path, method, status) in answer_at {
        let method = method.as_str().to_ascii_lowercase();
        if let Some(schema) = paths.get_mut(&path).and_then(|item| {
            item.get_mut(&method)?.pointer_mut(&format!(
                "/responses/{status}/content/application~1json/schema"
            ))
        }) {
            rename_refs(schema, &renamed);
        }
    }
    schemas.insert(
        "Error".into(),
        json!({
            "type": "object",
            "description": "every error of the API",
            "required": ["error", "message"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string", "examples": ["not_found"]},
                        "message": {"type": "string"}
                    }
                },
                "message": {"type": "string", "description": "the same message, as agentapi-proxy's errors carry it"}
            }
        }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "kakuremichi control API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The REST API of kakuremichi's control: sites, gateways, resources, \
                access policies, identity and agent sessions. Lists take ?q, ?sort, ?limit and \
                ?cursor and answer Link rel=next and X-Total-Count.",
        },
        "servers": [{"url": "/api/v1"}],
        "tags": tags.into_iter().map(|t| json!({"name": t})).collect::<Vec<_>>(),
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearer": {"type": "http", "scheme": "bearer"}
            }
        }
    })
}

const REF_PREFIX: &str = "#/components/schemas/";

/// Adds the answers' schemas to the bodies'. A name both have with different schemas (a type
/// that is read and written, with fields skipped when empty) is kept twice: the answer's as
/// `<name>.Response`, and every answer schema that refers to it, directly or not, too.
/// Returns the renames, for the operations' answer schemas.
fn merge_schemas(
    schemas: &mut Map<String, Value>,
    answers: Map<String, Value>,
) -> BTreeMap<String, String> {
    let mut renamed = BTreeMap::new();
    loop {
        let mut more = false;
        for (name, schema) in &answers {
            if renamed.contains_key(name) {
                continue;
            }
            let mut schema = schema.clone();
            rename_refs(&mut schema, &renamed);
            if schemas.get(name).is_some_and(|s| *s != schema) {
                renamed.insert(name.clone(), format!("{name}.Response"));
                more = true;
            }
        }
        if !more {
            break;
        }
    }
    for (name, mut schema) in answers {
        rename_refs(&mut schema, &renamed);
        let name = renamed.get(&name).cloned().unwrap_or(name);
        schemas.entry(name).or_insert(schema);
    }
    renamed
}

/// Points every `$ref` to a renamed schema at its new name.
fn rename_refs(value: &mut Value, renamed: &BTreeMap<String, String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if key == "$ref" {
                    if let Some(new) = v
                        .as_str()
                        .and_then(|r| r.strip_prefix(REF_PREFIX))
                        .and_then(|name| renamed.get(name))
                    {
                        *v = Value::String(format!("{REF_PREFIX}{new}"));
                    }
                } else {
                    rename_refs(v, renamed);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rename_refs(v, renamed)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_schema_that_differs_is_kept_beside_the_body_one_with_its_referrers() {
        let mut schemas = Map::new();
        schemas.insert("Policy".into(), json!({"required": ["users"]}));
        schemas.insert("Same".into(), json!({"type": "string"}));
        let answers: Map<String, Value> = serde_json::from_value(json!({
            "Policy": {"required": []},
            "Same": {"type": "string"},
            "View": {"properties": {"access": {"$ref": "#/components/schemas/Policy"}}},
        }))
        .unwrap();
        let renamed = merge_schemas(&mut schemas, answers);
        assert_eq!(renamed.len(), 1);
        assert_eq!(schemas["Policy.Response"], json!({"required": []}));
        assert_eq!(schemas["Policy"], json!({"required": ["users"]}));
        assert_eq!(
            schemas["View"]["properties"]["access"]["$ref"],
            "#/components/schemas/Policy.Response"
        );
        assert!(!schemas.contains_key("Same.Response"));
    }

    #[test]
    fn wildcards_become_plain_parameters_and_ids_are_unique_words() {
        let (p, params) = openapi_path("/sessions/{id}/{*rest}");
        assert_eq!(p, "/sessions/{id}/{rest}");
        assert_eq!(
            params,
            vec![("id".to_owned(), false), ("rest".to_owned(), true)]
        );
        assert_eq!(
            operation_id(&Method::GET, "/sites/{id}/enrollment-token"),
            "get_sites_id_enrollment_token"
        );
    }
}
