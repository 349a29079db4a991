//! The W3C trace context (`traceparent`, `tracestate`) on HTTP requests: read from a request
//! into a span, written from a span onto a request. Without traces exported (no [`crate::start`])
//! spans carry no context: reading does nothing and writing leaves the headers as they are.

use http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The trace context headers.
pub const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// The remote context `headers` carry, if their `traceparent` is valid.
fn remote(headers: &HeaderMap) -> Option<opentelemetry::Context> {
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `span` (not yet entered) a child of the span whose context `headers` carry, if they
/// carry a valid one: for a hop whose sender is trusted (the gateway, seen by the agent; a
/// trusted proxy, seen by the gateway).
pub fn continue_from(span: &tracing::Span, headers: &HeaderMap) {
    if let Some(cx) = remote(headers) {
        let _ = span.set_parent(cx);
    }
}

/// Links `span` to the context `headers` carry, if valid, without joining that trace: for a
/// sender nobody vouches for (a client on the internet), whose trace id is its own choice.
pub fn link_to(span: &tracing::Span, headers: &HeaderMap) {
    if let Some(cx) = remote(headers) {
        span.add_link(cx.span().span_context().clone());
    }
}

/// Replaces the trace context in `headers` with `span`'s: the next hop's parent is `span`.
/// A span that carries no context (traces off) leaves `headers` as they are.
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    for name in TRACE_HEADERS {
        headers.remove(name);
    }
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    // An empty `tracestate` is better not sent (W3C Trace Context, 3.3.1.1).
    if headers.get("tracestate").is_some_and(|v| v.is_empty()) {
        headers.remove("tracestate");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    const CLIENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn with_traces<T>(f: impl FnOnce() -> T) -> T {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f)
    }

    fn headers(traceparent: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("traceparent", traceparent.parse().unwrap());
        h.insert("tracestate", "client=1".parse().unwrap());
        h
    }

    fn parts(h: &HeaderMap) -> Vec<String> {
        h["traceparent"]
            .to_str()
            .unwrap()
            .split('-')
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_continued_trace_keeps_its_id_and_the_next_hop_gets_this_span_as_parent() {
        let (out, mine) = with_traces(|| {
            let span = tracing::info_span!("hop");
            continue_from(&span, &headers(CLIENT));
            let mut out = headers("00-ffffffffffffffffffffffffffffffff-ffffffffffffffff-01");
            inject(&span, &mut out);
            (
                out,
                span.context().span().span_context().span_id().to_string(),
            )
        });
        let p = parts(&out);
        assert_eq!(p[1], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(p[2], mine);
        assert_ne!(p[2], "b7ad6b7169203331");
        assert_eq!(out.get_all("traceparent").iter().count(), 1);
        // tracestate is the span's (the parent's, carried along), not what the headers had.
        assert_eq!(out["tracestate"], "client=1");
    }

    #[test]
    fn a_linked_request_starts_a_trace_of_its_own() {
        let out = with_traces(|| {
            let span = tracing::info_span!("edge");
            link_to(&span, &headers(CLIENT));
            let mut out = headers(CLIENT);
            inject(&span, &mut out);
            out
        });
        let p = parts(&out);
        assert_ne!(p[1], "0af7651916cd43dd8448eb211c80319c");
        assert!(out.get("tracestate").is_none(), "{out:?}");
    }

    #[test]
    fn without_traces_the_headers_stay_as_they_came() {
        let subscriber = tracing_subscriber::registry();
        let out = tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("edge");
            continue_from(&span, &headers(CLIENT));
            let mut out = headers(CLIENT);
            inject(&span, &mut out);
            out
        });
        assert_eq!(out["traceparent"], CLIENT);
        assert_eq!(out["tracestate"], "client=1");
    }

    #[test]
    fn a_malformed_traceparent_is_ignored() {
        let out = with_traces(|| {
            let span = tracing::info_span!("hop");
            continue_from(&span, &headers("00-nothex-b7ad6b7169203331-01"));
            let mut out = HeaderMap::new();
            inject(&span, &mut out);
            out
        });
        assert_eq!(parts(&out).len(), 4);
        assert_ne!(parts(&out)[1], "00000000000000000000000000000000");
    }
}
