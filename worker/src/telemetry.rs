//! Logging and traces: `RUST_LOG` filters (default `info`; the old daemon's `LOG_LEVEL` when
//! `RUST_LOG` is unset), `LOG_FORMAT` picks text or JSON lines, and with
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set the spans are exported over OTLP/HTTP (protobuf) as well,
//! the OpenTelemetry convention (the `OTEL_EXPORTER_OTLP_*` variables the exporter reads apply).
//!
//! Exported: one `operation` span per execution of an operation (inside the command's trace
//! when its command carried a `traceparent`), with a child per CloudStack HTTP request
//! (`cloudstack.request`), per job wait (`cloudstack.job`), device correlation
//! (`device.correlate`) and export step (`nbd.export`).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::LogFormat;

/// What must be flushed at exit: the span exporter, when one runs.
#[must_use = "call shutdown() at exit, or spans still queued are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is still queued (at most 5 s: a collector that does not answer does not
    /// hold up the stop) and stops. Blocking
    /// work, off the runtime's workers: the export itself runs on the runtime.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let done = tokio::task::spawn_blocking(move || {
            provider.shutdown_with_timeout(std::time::Duration::from_secs(5))
        })
        .await;
        if let Ok(Err(e)) = done {
            eprintln!("volume-daemon: exporting the last spans failed: {e}");
        }
    }
}

/// Installs the global subscriber. Call once, first thing in `main`, inside the runtime.
pub fn init(format: LogFormat) -> Telemetry {
    let (filter, legacy) = log_filter();
    // Colours only for a person at a terminal: journald and files store the escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let endpoint = otlp_endpoint();
    let (provider, export_error) = match &endpoint {
        None => (None, None),
        Some(endpoint) => match exporter(endpoint) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        },
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("volume-daemon"))
            .with_tracked_inactivity(false)
    });
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_target(false);
    match format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry
            .with(fmt.json().flatten_event(true).with_current_span(true))
            .init(),
    }
    if let Some(e) = export_error {
        tracing::error!(error = %e, "OTEL_EXPORTER_OTLP_ENDPOINT is set but no span exporter could be built: spans are not exported");
    } else if provider.is_some() {
        tracing::info!(endpoint, "exporting spans over OTLP/HTTP");
    }
    legacy.warn();
    Telemetry { provider }
}

/// The old daemon's `LOG_LEVEL`, and what became of it.
enum LegacyLevel {
    Unset,
    Honoured(String),
    Ignored,
}

impl LegacyLevel {
    fn warn(self) {
        match self {
            Self::Honoured(level) => tracing::warn!(
                level,
                "LOG_LEVEL is the old daemon's variable: honoured as the log filter; set RUST_LOG instead"
            ),
            Self::Ignored => {
                tracing::warn!("LOG_LEVEL is the old daemon's variable: ignored, RUST_LOG is set")
            }
            Self::Unset => {}
        }
    }
}

/// `RUST_LOG`, else the old daemon's `LOG_LEVEL`, else `info`.
fn log_filter() -> (EnvFilter, LegacyLevel) {
    let legacy = std::env::var("LOG_LEVEL")
        .ok()
        .filter(|l| !l.trim().is_empty());
    let rust_log = std::env::var_os("RUST_LOG").is_some();
    match (legacy, rust_log) {
        (Some(level), false) => (
            EnvFilter::try_new(level.trim().to_lowercase())
                .unwrap_or_else(|_| EnvFilter::new("info")),
            LegacyLevel::Honoured(level),
        ),
        (legacy, _) => (
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
            if legacy.is_some() {
                LegacyLevel::Ignored
            } else {
                LegacyLevel::Unset
            },
        ),
    }
}

/// Makes `span` (an operation's) a child of the command's trace: exported, it carries the
/// command's trace id and the producer's span as parent. Without an exporter, nothing.
pub(crate) fn continue_trace(span: &tracing::Span, trace: &schema::trace::TraceContext) {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let (Ok(trace_id), Ok(parent), Ok(flags)) = (
        TraceId::from_hex(trace.trace_id()),
        SpanId::from_hex(trace.parent_id()),
        u8::from_str_radix(trace.flags(), 16),
    ) else {
        return;
    };
    let state = trace
        .tracestate
        .as_deref()
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let remote = SpanContext::new(trace_id, parent, TraceFlags::new(flags), true, state);
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

/// The exported span id of the current span (16 hex digits), when spans are exported: the
/// parent id an operation's event carries, so that the event points at the very span the
/// collector received.
pub(crate) fn current_span_id() -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let context = tracing::Span::current().context();
    let span = context.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.span_id().to_string())
}

/// `OTEL_EXPORTER_OTLP_ENDPOINT` (or its traces-only form), when set and not empty.
fn otlp_endpoint() -> Option<String> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .filter_map(|k| std::env::var(k).ok())
    .find(|v| !v.trim().is_empty())
}

/// The OTLP/HTTP protobuf exporter, batched, sending through the daemon's own HTTP client
/// (reqwest on rustls with the ring provider, bounded timeouts).
fn exporter(endpoint: &str) -> Result<SdkTracerProvider, String> {
    let http = cloudstack::Client::http().map_err(|e| e.to_string())?;
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(OtlpHttp {
            http,
            runtime: tokio::runtime::Handle::current(),
        })
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
    // The traces-only variable is a complete URL; the general one gets `/v1/traces` appended
    // by the exporter when it reads it itself.
    if std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_err() {
        builder = builder.with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')));
    }
    let exporter = builder.build().map_err(|e| format!("{endpoint}: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("volume-daemon")
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The exporter's HTTP client: the daemon's reqwest (rustls, no second TLS stack). The batch
/// processor exports from a thread of its own, outside the runtime: each request runs on the
/// daemon's runtime and is awaited from there.
#[derive(Debug)]
struct OtlpHttp {
    http: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpHttp {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let http = self.http.clone();
        let sent = self.runtime.spawn(async move {
            let (parts, body) = request.into_parts();
            let mut req = http.request(parts.method, parts.uri.to_string());
            for (name, value) in &parts.headers {
                req = req.header(name, value);
            }
            let resp = req.body(body).send().await?;
            let mut answer = opentelemetry_http::Response::builder().status(resp.status());
            for (name, value) in resp.headers() {
                answer = answer.header(name, value);
            }
            let bytes = resp.bytes().await?;
            Ok::<_, opentelemetry_http::HttpError>(answer.body(bytes)?)
        });
        sent.await?
    }
}
