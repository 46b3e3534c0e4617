//! `telemetry:` — how a process logs, and where the gateway's request spans go.
//!
//! Logs: JSON lines on stderr when it is not a terminal (`log_format: auto`, the default), the
//! human format on a terminal; `json` or `text` force one. One line per start-up decision and
//! state change; none per request (`RUST_LOG=tollgate_gateway=debug` shows some).
//!
//! Spans: `otlp: { endpoint, sample_ratio }` exports the gateway's request spans (see
//! `tollgate_gateway::trace`) over OTLP/HTTP with protobuf bodies, to `endpoint` plus
//! `/v1/traces` (the OTLP/HTTP convention for a base URL; an endpoint that already ends in
//! `/v1/traces` is used as it is). Plain `http://` only: send to a local OpenTelemetry
//! Collector, which forwards over TLS where needed. Ended spans queue in the SDK's batch
//! processor (2,048 spans, dropped when full) and leave every 5 s or 512 spans
//! (`OTEL_BSP_*` variables change these), on a thread of their own: export never waits on,
//! or slows, the request path. The export itself needs the `otel` cargo feature; a build
//! without it refuses a configuration that asks for spans (exit 2), rather than dropping
//! them silently.

use std::io::IsTerminal;

use serde::{Deserialize, Serialize};

/// The `telemetry` section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP export of request spans; off when absent.
    #[serde(default)]
    pub otlp: Option<OtlpConfig>,
    #[serde(default)]
    pub log_format: LogFormat,
}

/// Where and how many request spans are exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The OTLP/HTTP receiver, e.g. `http://127.0.0.1:4318`.
    pub endpoint: String,
    /// The share of new traces recorded (0 to 1); a caller's sampling decision is followed.
    #[serde(default = "default_ratio")]
    pub sample_ratio: f64,
    /// `service.name` of the spans.
    #[serde(default = "default_service")]
    pub service_name: String,
}

fn default_ratio() -> f64 {
    0.01
}

fn default_service() -> String {
    "tollgate-gateway".into()
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON unless stderr is a terminal.
    #[default]
    Auto,
    Json,
    Text,
}

impl TelemetryConfig {
    pub fn validate(&self) -> Result<(), String> {
        let Some(otlp) = &self.otlp else {
            return Ok(());
        };
        if !(0.0..=1.0).contains(&otlp.sample_ratio) {
            return Err(format!(
                "telemetry.otlp.sample_ratio: {} is not between 0 and 1",
                otlp.sample_ratio
            ));
        }
        if otlp.service_name.is_empty() {
            return Err("telemetry.otlp.service_name: must not be empty".into());
        }
        traces_url(&otlp.endpoint)
            .map(|_| ())
            .map_err(|e| format!("telemetry.otlp.endpoint: {e}"))
    }
}

/// The URL spans are posted to.
pub fn traces_url(endpoint: &str) -> Result<String, String> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| format!("`{endpoint}` is not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "`{endpoint}`: OTLP over TLS is not built in; export to a local OpenTelemetry Collector over http"
            ));
        }
        _ => return Err(format!("`{endpoint}` is not an http:// URL")),
    }
    if uri.host().is_none() {
        return Err(format!("`{endpoint}` has no host"));
    }
    let base = endpoint.trim_end_matches('/');
    Ok(if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    })
}

/// Starts logging to stderr in `format`, at the level `RUST_LOG` says (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    let started = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
    started.unwrap_or_else(|e| eprintln!("warning: logging was started already: {e}"));
}

/// The export of the gateway's request spans: the tracer the gateway makes them with.
pub struct SpanExport {
    pub tracer: tollgate_gateway::trace::Tracing,
    #[cfg(feature = "otel")]
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

impl SpanExport {
    /// Sends what is queued and stops (at exit).
    pub fn shutdown(self) {
        #[cfg(feature = "otel")]
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "span export did not shut down cleanly");
        }
    }
}

/// Starts exporting request spans as `config` says; `instance` names this gateway in the
/// spans' resource (`service.instance.id`). Call on the process's Tokio runtime.
#[cfg(feature = "otel")]
pub fn export_spans(config: &OtlpConfig, instance: &str) -> anyhow::Result<SpanExport> {
    use opentelemetry::KeyValue;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};

    let url = traces_url(&config.endpoint).map_err(anyhow::Error::msg)?;
    let client = OnRuntime {
        client: opentelemetry_http::hyper::HyperClient::with_default_connector(
            std::time::Duration::from_secs(10),
            None,
        ),
        runtime: tokio::runtime::Handle::current(),
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(url.clone())
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()?;
    let resource = Resource::builder_empty()
        .with_attributes([
            KeyValue::new("service.name", config.service_name.clone()),
            KeyValue::new("service.instance.id", instance.to_string()),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        ])
        .build();
    // The gateway samples before it asks for a span (see `tollgate_gateway::trace::Tracing`):
    // the provider records what it is asked to.
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::AlwaysOn)
        .with_resource(resource)
        .build();
    let tracer = tollgate_gateway::trace::Tracing::new(
        provider.tracer("tollgate-gateway"),
        config.sample_ratio,
    );
    tracing::info!(%url, sample_ratio = config.sample_ratio, "exporting request spans over OTLP/HTTP");
    Ok(SpanExport { tracer, provider })
}

#[cfg(not(feature = "otel"))]
pub fn export_spans(_: &OtlpConfig, _: &str) -> anyhow::Result<SpanExport> {
    Err(crate::config::ConfigError(
        "telemetry.otlp: this tollgate was built without OTLP export; build it with `--features otel`".into(),
    )
    .into())
}

/// The OTLP exporter's HTTP client, run on the process's Tokio runtime: the SDK's batch
/// processor exports from a thread of its own, outside any runtime, and hyper needs one.
#[cfg(feature = "otel")]
#[derive(Debug)]
struct OnRuntime {
    client: opentelemetry_http::hyper::HyperClient,
    runtime: tokio::runtime::Handle,
}

#[cfg(feature = "otel")]
#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        self.runtime
            .spawn(async move { client.send_bytes(request).await })
            .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_go_to_the_traces_path_of_a_plain_http_endpoint() {
        for (endpoint, url) in [
            ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
            ("http://collector:4318/", "http://collector:4318/v1/traces"),
            ("http://c:4318/v1/traces", "http://c:4318/v1/traces"),
            ("http://c:4318/otlp", "http://c:4318/otlp/v1/traces"),
        ] {
            assert_eq!(traces_url(endpoint).unwrap(), url);
        }
        for bad in ["https://c:4318", "c:4318", "not a url", "http:///v1"] {
            assert!(traces_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_sample_ratio_is_a_share() {
        let config = |ratio| TelemetryConfig {
            otlp: Some(OtlpConfig {
                endpoint: "http://127.0.0.1:4318".into(),
                sample_ratio: ratio,
                service_name: default_service(),
            }),
            log_format: LogFormat::Auto,
        };
        assert!(config(0.0).validate().is_ok());
        assert!(config(1.0).validate().is_ok());
        assert!(config(1.5).validate().unwrap_err().contains("sample_ratio"));
        assert!(config(f64::NAN).validate().is_err());
    }
}
