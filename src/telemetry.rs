//! Log output (readable in development, JSON in production) and, when `[otlp]` switches it on,
//! span export to an OpenTelemetry collector over OTLP/HTTP.

use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, LogSettings, OtlpProtocol, OtlpSettings};

/// What the process must flush before it exits: the span exporter, when one runs.
#[must_use = "dropping the handle without `shutdown` loses the spans not yet exported"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans buffered so far. Blocks until the collector answered or the export
    /// timed out.
    pub fn flush(&self) {
        if let Some(provider) = &self.provider
            && let Err(e) = provider.force_flush()
        {
            tracing::error!(error = %e, "flushing spans to the OTLP collector failed");
        }
    }

    /// Exports the spans still buffered and stops the exporter. Blocks until the collector
    /// answered or the export timed out.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::error!(error = %e, "flushing spans to the OTLP collector failed");
        }
    }
}

/// Installs the global subscriber for logs only. `RUST_LOG` overrides the configured filter.
pub fn init(settings: &LogSettings) {
    if let Err(e) = install(settings, None) {
        eprintln!("logging was already initialised: {e}");
    }
}

/// Installs the global subscriber for logs and, when `otlp.enabled`, span export. An exporter
/// that cannot be built stops start-up.
pub fn init_with_export(log: &LogSettings, otlp: &OtlpSettings) -> anyhow::Result<Telemetry> {
    let provider = otlp.enabled.then(|| provider(otlp)).transpose()?;
    if let Err(e) = install(log, provider.clone()) {
        eprintln!("logging was already initialised: {e}");
    }
    if otlp.enabled {
        tracing::info!(
            endpoint = %otlp.endpoint,
            service_name = %otlp.service_name,
            "exporting spans over OTLP"
        );
    }
    Ok(Telemetry { provider })
}

fn provider(otlp: &OtlpSettings) -> anyhow::Result<SdkTracerProvider> {
    let protocol = match otlp.protocol {
        OtlpProtocol::HttpProtobuf => Protocol::HttpBinary,
        OtlpProtocol::HttpJson => Protocol::HttpJson,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(otlp.endpoint.as_str())
        .with_protocol(protocol)
        .with_timeout(Duration::from_millis(otlp.timeout_ms))
        .build()
        .with_context(|| format!("otlp.endpoint {:?}", otlp.endpoint))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(otlp.service_name.clone())
                .build(),
        )
        .build())
}

fn install(
    settings: &LogSettings,
    provider: Option<SdkTracerProvider>,
) -> Result<(), tracing_subscriber::util::TryInitError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.filter));
    let (json, pretty) = match settings.format {
        LogFormat::Json => (
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_target(true),
            ),
            None,
        ),
        LogFormat::Pretty => (
            None,
            Some(tracing_subscriber::fmt::layer().with_target(true)),
        ),
    };
    let otel = provider.map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("apex")));
    tracing_subscriber::registry()
        .with(filter)
        .with(json)
        .with(pretty)
        .with(otel)
        .try_init()
}
