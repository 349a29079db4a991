//! Logging for every kakuremichi binary and, as an option, OpenTelemetry traces exported over
//! OTLP/HTTP (protobuf), with the W3C trace context (`traceparent`, `tracestate`) carried from
//! the gateway to the agent to the app.
//!
//! [`init`] installs the process's subscriber at start: log lines on stderr (`RUST_LOG`, default
//! `info`, text or one JSON object a line) and an OpenTelemetry layer that stays idle. Once the
//! process knows who it is (a node after enrollment, control after reading its settings),
//! [`start`] builds the OTLP exporter behind a batch processor and turns the layer on; only then
//! are spans built and sent. [`shutdown`] sends what is still queued.
//!
//! This crate must never export anything unless [`start`] was called, and never exports spans
//! other than kakuremichi's own (targets `kakuremichi*`, level INFO and above): a library's
//! spans, and every DEBUG and TRACE callsite, stay as cheap as without it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use opentelemetry::global::BoxedTracer;
use opentelemetry::trace::{noop::NoopTracer, SpanBuilder, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::{DynFilterFn, EnvFilter};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

mod client;
pub mod propagation;

pub use propagation::{continue_from, inject, link_to};

/// Whether spans are exported: set by [`start`], cleared by [`shutdown`].
static ENABLED: AtomicBool = AtomicBool::new(false);
/// The tracer the layer builds spans with, once [`start`] made it.
static TRACER: OnceLock<BoxedTracer> = OnceLock::new();
/// The provider, kept to flush it at [`shutdown`].
static PROVIDER: Mutex<Option<SdkTracerProvider>> = Mutex::new(None);

/// Errors of the trace settings and of starting the exporter.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP endpoint is not an `http://` or `https://` URL.
    #[error(
        "OTLP endpoint {0:?} is not an http:// or https:// URL (example: http://127.0.0.1:4318)"
    )]
    BadEndpoint(String),
    /// The exporter could not be built.
    #[error("cannot set up the OTLP exporter: {0}")]
    Exporter(String),
    /// [`start`] was called twice.
    #[error("traces are already exported")]
    AlreadyStarted,
}

/// Where spans go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TracesEndpoint {
    /// The URL spans are posted to (`--otlp-endpoint` with `/v1/traces` appended).
    Url(String),
    /// As the standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` say.
    Standard,
}

/// The endpoint traces go to: `--otlp-endpoint` (the collector's base URL, as
/// `OTEL_EXPORTER_OTLP_ENDPOINT`: `/v1/traces` is appended unless the path already ends with
/// it) if given, else the standard environment variables if either is set, else none (traces
/// off).
pub fn traces_endpoint(flag: Option<&str>) -> Result<Option<TracesEndpoint>, TelemetryError> {
    if let Some(url) = flag.map(str::trim).filter(|s| !s.is_empty()) {
        return traces_url(url).map(|u| Some(TracesEndpoint::Url(u)));
    }
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    if set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") || set("OTEL_EXPORTER_OTLP_ENDPOINT") {
        return Ok(Some(TracesEndpoint::Standard));
    }
    Ok(None)
}

/// `http://host:4318` -> `http://host:4318/v1/traces`; a URL already ending in `/v1/traces`
/// stays as it is.
fn traces_url(base: &str) -> Result<String, TelemetryError> {
    let bad = || TelemetryError::BadEndpoint(base.to_owned());
    let uri: http::Uri = base.parse().map_err(|_| bad())?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
        return Err(bad());
    }
    if uri.query().is_some() {
        return Err(bad());
    }
    let trimmed = base.trim_end_matches('/');
    if trimmed.ends_with("/v1/traces") {
        return Ok(trimmed.to_owned());
    }
    Ok(format!("{trimmed}/v1/traces"))
}

/// Installs the subscriber: log lines on stderr filtered by `RUST_LOG` (default `info`), as
/// text or JSON objects, and the OpenTelemetry layer, idle until [`start`]. A second call does
/// nothing.
pub fn init(json: bool) {
    let logs = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().with_current_span(true).boxed()
    } else {
        fmt.boxed()
    };
    // Only kakuremichi's own INFO-and-above callsites can ever reach the layer, and only while
    // exporting: every other callsite keeps the interest the log filter alone gives it.
    let exported = DynFilterFn::new(|m, _| {
        ENABLED.load(Ordering::Relaxed) && m.target().starts_with("kakuremichi")
    })
    .with_callsite_filter(|m| {
        if m.target().starts_with("kakuremichi") && *m.level() <= tracing::Level::INFO {
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::never()
        }
    })
    .with_max_level_hint(LevelFilter::INFO);
    let traces = tracing_opentelemetry::layer()
        .with_tracer(LateTracer)
        .with_filter(exported);
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(logs))
        .with(traces)
        .try_init();
}

/// Who is exporting: the resource every span of this process carries.
#[derive(Debug, Clone)]
pub struct Service {
    /// `service.name`: `kakuremichi-gateway`, `kakuremichi-agent` or `kakuremichi-control`.
    pub name: &'static str,
    /// `service.instance.id`: the node's id (or the control replica's).
    pub instance_id: String,
    /// More resource attributes (`kakuremichi.node.id`, ...).
    pub attributes: Vec<(&'static str, String)>,
}

/// How long one export may take (connecting, sending, reading the answer).
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts exporting spans to `endpoint` as `service`: an OTLP/HTTP protobuf exporter behind a
/// batch processor (its delay and sizes from the standard `OTEL_BSP_*` variables, default a
/// batch every 5 s), on a thread of its own. Call it outside of any async task's hot path: it
/// spawns threads.
pub fn start(endpoint: &TracesEndpoint, service: Service) -> Result<(), TelemetryError> {
    if TRACER.get().is_some() {
        return Err(TelemetryError::AlreadyStarted);
    }
    let client = client::BlockingClient::new(EXPORT_TIMEOUT)?;
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_timeout(EXPORT_TIMEOUT);
    if let TracesEndpoint::Url(url) = endpoint {
        builder = builder.with_endpoint(url.clone());
    }
    let exporter = builder
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let resource = Resource::builder()
        .with_service_name(service.name)
        .with_attribute(KeyValue::new("service.instance.id", service.instance_id))
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .with_attributes(
            service
                .attributes
                .into_iter()
                .map(|(k, v)| KeyValue::new(k, v)),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_batch_exporter(exporter)
        .build();
    let tracer = provider.tracer("kakuremichi");
    TRACER
        .set(BoxedTracer::new(Box::new(tracer)))
        .map_err(|_| TelemetryError::AlreadyStarted)?;
    *PROVIDER.lock().unwrap_or_else(|e| e.into_inner()) = Some(provider);
    ENABLED.store(true, Ordering::Relaxed);
    tracing::info!(endpoint = ?endpoint, "exporting traces over OTLP/HTTP");
    Ok(())
}

/// Whether spans are being exported ([`start`] was called): request paths build their spans
/// only then.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Sends the spans still queued and stops exporting. It blocks until they are sent (at most
/// [`EXPORT_TIMEOUT`] and a little): call it after the runtime's work is done, or from
/// `spawn_blocking`.
pub fn shutdown() {
    ENABLED.store(false, Ordering::Relaxed);
    let provider = PROVIDER.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(provider) = provider {
        match provider.shutdown() {
            Ok(()) => tracing::debug!("traces flushed"),
            Err(error) => tracing::warn!(%error, "cannot send the last traces"),
        }
    }
}

/// The tracer the layer holds from [`init`]: the one [`start`] made, once it did. Before that
/// the layer sees no span (its filter), so the no-op fallback is never really used.
#[derive(Debug, Clone, Copy)]
struct LateTracer;

impl opentelemetry::trace::Tracer for LateTracer {
    type Span = opentelemetry::global::BoxedSpan;

    fn build_with_context(
        &self,
        builder: SpanBuilder,
        parent_cx: &opentelemetry::Context,
    ) -> Self::Span {
        match TRACER.get() {
            Some(tracer) => tracer.build_with_context(builder, parent_cx),
            None => {
                BoxedTracer::new(Box::new(NoopTracer::new())).build_with_context(builder, parent_cx)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_is_a_base_url_and_gets_the_traces_path() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318").unwrap(),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://otel.example.com/").unwrap(),
            "https://otel.example.com/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/v1/traces").unwrap(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/prefix").unwrap(),
            "http://c:4318/prefix/v1/traces"
        );
        for bad in [
            "127.0.0.1:4318",
            "ftp://c/",
            "http://",
            "http://c/?a=b",
            "nonsense",
        ] {
            assert!(
                matches!(traces_url(bad), Err(TelemetryError::BadEndpoint(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn no_flag_and_no_standard_variable_is_no_traces() {
        // The test environment sets neither variable.
        if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
            && std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
        {
            assert_eq!(traces_endpoint(None).unwrap(), None);
            assert_eq!(traces_endpoint(Some("  ")).unwrap(), None);
        }
        assert_eq!(
            traces_endpoint(Some("http://c:4318")).unwrap(),
            Some(TracesEndpoint::Url("http://c:4318/v1/traces".into()))
        );
    }
}
