//! What a process tells [`crate::init`] about itself: its service name, where (if anywhere) to
//! send OTLP, the resource attributes that tell its telemetry apart from its peers', and how
//! often metrics are pushed.

use std::time::Duration;

use crate::TelemetryError;

/// The environment variable that enables OTLP export when the config names no endpoint.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// How often metrics are pushed unless the config says otherwise.
pub const DEFAULT_METRICS_EXPORT_INTERVAL: Duration = Duration::from_secs(5);

/// Telemetry settings of one process.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// The OTel `service.name` resource attribute, e.g. `medtvt-coordinator`.
    pub service_name: String,
    /// OTLP/gRPC collector endpoint, e.g. `http://localhost:4317`. `None` falls back to
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; when neither is set only the console log is installed.
    pub otlp_endpoint: Option<String>,
    /// Extra resource attributes on every span and metric (role, rank, worker name, run id).
    pub resource_attributes: Vec<(String, String)>,
    /// Period of the metric reader's push to the collector.
    pub metrics_export_interval: Duration,
}

impl TelemetryConfig {
    /// A config with the given service name, no endpoint, no attributes and a 5 s metric period.
    pub fn new(service_name: impl Into<String>) -> Self {
        Self {
            service_name: service_name.into(),
            otlp_endpoint: None,
            resource_attributes: Vec::new(),
            metrics_export_interval: DEFAULT_METRICS_EXPORT_INTERVAL,
        }
    }

    /// Sets the OTLP/gRPC endpoint (overrides `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub fn with_otlp_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.otlp_endpoint = Some(endpoint.into());
        self
    }

    /// Adds one resource attribute, e.g. `("medtvt.role", "learner")`.
    pub fn with_attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.resource_attributes.push((key.into(), value.into()));
        self
    }

    /// Sets the metric push period.
    pub fn with_metrics_export_interval(mut self, interval: Duration) -> Self {
        self.metrics_export_interval = interval;
        self
    }

    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<(), TelemetryError> {
        if self.service_name.trim().is_empty() {
            return Err(invalid("service_name", "is empty; name the process, e.g. `medtvt-learner`"));
        }
        if let Some((key, _)) = self.resource_attributes.iter().find(|(key, _)| key.trim().is_empty()) {
            return Err(invalid("resource_attributes", format!("has an empty key ({key:?})")));
        }
        if self.metrics_export_interval.is_zero() {
            return Err(invalid("metrics_export_interval", "is zero; use e.g. 5 s"));
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            check_endpoint("otlp_endpoint", endpoint)?;
        }
        Ok(())
    }

    /// The endpoint to export to: the config's, else a non-empty `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn resolved_otlp_endpoint(&self) -> Result<Option<String>, TelemetryError> {
        let from_env = std::env::var(OTLP_ENDPOINT_ENV).ok();
        let endpoint = pick_endpoint(self.otlp_endpoint.as_deref(), from_env.as_deref());
        if let Some(endpoint) = &endpoint {
            check_endpoint(OTLP_ENDPOINT_ENV, endpoint)?;
        }
        Ok(endpoint)
    }
}

/// The config's endpoint wins; an empty or blank value counts as unset.
fn pick_endpoint(configured: Option<&str>, from_env: Option<&str>) -> Option<String> {
    [configured, from_env].into_iter().flatten().map(str::trim).find(|endpoint| !endpoint.is_empty()).map(str::to_owned)
}

/// Only plain-text gRPC is compiled in (no TLS feature), so the scheme must be http.
fn check_endpoint(field: &'static str, endpoint: &str) -> Result<(), TelemetryError> {
    if endpoint.starts_with("http://") && endpoint.len() > "http://".len() {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("is {endpoint:?}; expected a plain-text OTLP/gRPC URL such as http://localhost:4317"),
        ))
    }
}

fn invalid(field: &'static str, problem: impl Into<String>) -> TelemetryError {
    TelemetryError::InvalidConfig { field, problem: problem.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_endpoint_wins_over_environment_and_blank_counts_as_unset() {
        assert_eq!(pick_endpoint(Some("http://a:1"), Some("http://b:2")).as_deref(), Some("http://a:1"));
        assert_eq!(pick_endpoint(None, Some("http://b:2")).as_deref(), Some("http://b:2"));
        assert_eq!(pick_endpoint(Some("  "), Some("http://b:2")).as_deref(), Some("http://b:2"));
        assert_eq!(pick_endpoint(None, Some("")), None);
        assert_eq!(pick_endpoint(None, None), None);
    }

    #[test]
    fn validate_names_the_bad_field() {
        let field_of = |config: TelemetryConfig| match config.validate() {
            Err(TelemetryError::InvalidConfig { field, .. }) => Some(field),
            _ => None,
        };
        assert_eq!(field_of(TelemetryConfig::new("x")), None);
        assert_eq!(field_of(TelemetryConfig::new(" ")), Some("service_name"));
        assert_eq!(field_of(TelemetryConfig::new("x").with_attribute("", "v")), Some("resource_attributes"));
        assert_eq!(
            field_of(TelemetryConfig::new("x").with_metrics_export_interval(Duration::ZERO)),
            Some("metrics_export_interval")
        );
        assert_eq!(field_of(TelemetryConfig::new("x").with_otlp_endpoint("localhost:4317")), Some("otlp_endpoint"));
        assert_eq!(field_of(TelemetryConfig::new("x").with_otlp_endpoint("https://c:4317")), Some("otlp_endpoint"));
        assert_eq!(field_of(TelemetryConfig::new("x").with_otlp_endpoint("http://c:4317")), None);
    }
}
