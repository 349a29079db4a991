//! Traces (issue 13, operations): with `--otlp-endpoint`, control, the gateway and the agent
//! export spans over OTLP/HTTP (protobuf) and one request is one trace from the gateway through
//! the agent to the app, which gets a `traceparent` of that trace whose parent is the agent's
//! span. The collector here is the test's own: an axum server on loopback taking
//! `POST /v1/traces` and decoding `ExportTraceServiceRequest` with `opentelemetry-proto`, the
//! real wire format.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, HeaderMap, StatusCode};
use kakuremichi_e2e::{wait_for, Stack, StackOptions, DEMO_HOST};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;

/// A trace id and span id a client on the internet made up.
const CLIENT_TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// One exported span with the service that sent it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    instance: String,
    span: opentelemetry_proto::tonic::trace::v1::Span,
}

/// What the collector received, decoded.
#[derive(Debug, Default, Clone)]
struct Received {
    spans: Arc<Mutex<Vec<Got>>>,
    posts: Arc<Mutex<usize>>,
    /// Posts that were not protobuf `ExportTraceServiceRequest`s.
    bad: Arc<Mutex<usize>>,
}

fn string_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            _ => None,
        })
}

/// An OTLP/HTTP collector on loopback; returns its base URL.
async fn collector(received: Received) -> String {
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let received = received.clone();
            async move {
                let protobuf = headers
                    .get(header::CONTENT_TYPE)
                    .is_some_and(|v| v == "application/x-protobuf");
                let request = match ExportTraceServiceRequest::decode(body) {
                    Ok(r) if protobuf => r,
                    _ => {
                        *received.bad.lock().unwrap() += 1;
                        return (StatusCode::BAD_REQUEST, Vec::new());
                    }
                };
                *received.posts.lock().unwrap() += 1;
                let mut spans = received.spans.lock().unwrap();
                for rs in request.resource_spans {
                    let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
                    let service = string_attr(&attrs, "service.name").unwrap_or_default();
                    let instance = string_attr(&attrs, "service.instance.id").unwrap_or_default();
                    for ss in rs.scope_spans {
                        for span in ss.spans {
                            spans.push(Got {
                                service: service.clone(),
                                instance: instance.clone(),
                                span,
                            });
                        }
                    }
                }
                (
                    StatusCode::OK,
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `traceparent` -> (trace id, parent span id), both hex.
fn parse_traceparent(v: &str) -> (String, String) {
    let parts: Vec<&str> = v.split('-').collect();
    assert_eq!(parts.len(), 4, "{v}");
    assert_eq!(parts[0], "00", "{v}");
    (parts[1].to_owned(), parts[2].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_from_the_gateway_through_the_agent_to_the_app() {
    // Batches leave every 100 ms instead of every 5 s: the test waits for them.
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    let received = Received::default();
    let endpoint = collector(received.clone()).await;
    let otlp = vec!["--otlp-endpoint".to_owned(), endpoint];
    let mut opts = StackOptions::loopback();
    opts.gateway_args = otlp.clone();
    opts.agent_args = otlp.clone();
    opts.control_args = otlp;
    let stack = Stack::start_with(opts).await.unwrap();

    // A client on the internet sends its own traceparent: the gateway starts a trace of its own.
    let answer = stack
        .request_builder(reqwest::Method::GET, DEMO_HOST, "/headers")
        .header("traceparent", CLIENT_TRACEPARENT)
        .header("tracestate", "client=1")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let seen: serde_json::Value = answer.json().await.unwrap();
    let app_traceparent = seen["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("the app got no traceparent: {seen}"));
    let (trace_id, app_parent) = parse_traceparent(app_traceparent);
    assert_ne!(
        trace_id, CLIENT_TRACE_ID,
        "an untrusted client does not choose the trace"
    );
    assert!(seen.get("tracestate").is_none(), "{seen}");

    // Both services' spans of that trace arrive (bounded wait: 100 ms batches).
    let spans = wait_for(
        "the gateway's and the agent's spans",
        Duration::from_secs(10),
        || {
            let received = received.clone();
            let trace_id = trace_id.clone();
            async move {
                let spans: Vec<Got> = received
                    .spans
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|g| hex(&g.span.trace_id) == trace_id)
                    .cloned()
                    .collect();
                let has = |s: &str| spans.iter().any(|g| g.service == s);
                Ok((has("kakuremichi-gateway") && has("kakuremichi-agent")).then_some(spans))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", stack.logs()));

    let gateway: Vec<&Got> = spans
        .iter()
        .filter(|g| g.service == "kakuremichi-gateway")
        .collect();
    let agent: Vec<&Got> = spans
        .iter()
        .filter(|g| g.service == "kakuremichi-agent")
        .collect();
    assert_eq!(gateway.len(), 1, "{spans:#?}");
    assert_eq!(agent.len(), 1, "{spans:#?}");
    let (gw, ag) = (&gateway[0].span, &agent[0].span);

    // The gateway's server span: a root, linked to the client's context, with HTTP attributes.
    assert_eq!(gw.kind, SpanKind::Server as i32);
    assert!(gw.parent_span_id.is_empty(), "a new trace: {gw:?}");
    assert_eq!(gw.links.len(), 1, "{gw:?}");
    assert_eq!(hex(&gw.links[0].trace_id), CLIENT_TRACE_ID);
    assert_eq!(hex(&gw.links[0].span_id), "b7ad6b7169203331");
    assert_eq!(
        string_attr(&gw.attributes, "http.request.method").as_deref(),
        Some("GET")
    );
    assert_eq!(
        string_attr(&gw.attributes, "url.path").as_deref(),
        Some("/headers")
    );
    assert_eq!(
        string_attr(&gw.attributes, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        string_attr(&gw.attributes, "server.address").as_deref(),
        Some(DEMO_HOST)
    );
    assert_eq!(
        string_attr(&gw.attributes, "kakuremichi.resource.id").as_deref(),
        Some(stack.resource_id.as_str())
    );
    assert_eq!(gateway[0].instance, stack.gateway_id, "the node id");

    // The agent's span is the gateway span's child, and the app's parent.
    assert_eq!(ag.kind, SpanKind::Client as i32);
    assert_eq!(hex(&ag.parent_span_id), hex(&gw.span_id));
    assert_eq!(
        app_parent,
        hex(&ag.span_id),
        "the app's parent is the agent's span"
    );
    assert_eq!(
        string_attr(&ag.attributes, "server.address").as_deref(),
        Some(stack.opts.app_listen.to_string().as_str())
    );
    assert_eq!(
        string_attr(&ag.attributes, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        agent[0].instance, stack.site_id,
        "the agent's node id is its site's"
    );
    assert!(
        ag.start_time_unix_nano >= gw.start_time_unix_nano
            && ag.end_time_unix_nano <= gw.end_time_unix_nano,
        "the agent's span lies within the gateway's"
    );

    // Control's API requests (the stack's set-up) are spans of kakuremichi-control.
    wait_for("control's spans", Duration::from_secs(10), || {
        let received = received.clone();
        async move {
            Ok(received
                .spans
                .lock()
                .unwrap()
                .iter()
                .any(|g| {
                    g.service == "kakuremichi-control"
                        && string_attr(&g.span.attributes, "url.path").as_deref()
                            == Some("/api/v1/resources")
                })
                .then_some(()))
        }
    })
    .await
    .unwrap();
    assert!(*received.posts.lock().unwrap() > 0);
    assert_eq!(
        *received.bad.lock().unwrap(),
        0,
        "every post was OTLP protobuf"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_changes_on_the_way() {
    let stack = Stack::start_with(StackOptions::loopback()).await.unwrap();
    let answer = stack
        .request_builder(reqwest::Method::GET, DEMO_HOST, "/headers")
        .header("traceparent", CLIENT_TRACEPARENT)
        .header("tracestate", "client=1")
        .send()
        .await
        .unwrap();
    let seen: serde_json::Value = answer.json().await.unwrap();
    // No span anywhere: what the client sent reaches the app as it was.
    assert_eq!(seen["traceparent"], CLIENT_TRACEPARENT, "{seen}");
    assert_eq!(seen["tracestate"], "client=1", "{seen}");
}
