//! The standard `OTEL_*` variables this crate decides on itself, parsed once
//! into [`TraceSettings`].
//!
//! Whether tracing is on, the protocol, the sampler, the default service name
//! and the exporter timeout are decided here; everything else (endpoint
//! resolution and the `/v1/traces` suffix, `OTEL_EXPORTER_OTLP_HEADERS`,
//! compression, `OTEL_RESOURCE_ATTRIBUTES`) is read by `opentelemetry-otlp`
//! and `opentelemetry_sdk` themselves.
//!
//! Invalid values follow the OpenTelemetry rule for environment variables:
//! a warning (collected in [`TraceSettings::warnings`] and logged once the
//! logger is up) and the documented default, never a refusal to start.

use std::time::Duration;

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP over gRPC (`grpc`, usually port 4317).
    Grpc,
    /// OTLP over HTTP with protobuf bodies (`http/protobuf`, usually port
    /// 4318); the default, as in the OpenTelemetry specification.
    HttpProtobuf,
}

/// The sampler, from `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerSetting {
    /// `always_on`.
    AlwaysOn,
    /// `always_off`.
    AlwaysOff,
    /// `traceidratio` with the ratio.
    TraceIdRatio(f64),
    /// `parentbased_always_on` (the default).
    ParentBasedAlwaysOn,
    /// `parentbased_always_off`.
    ParentBasedAlwaysOff,
    /// `parentbased_traceidratio` with the ratio for root spans.
    ParentBasedTraceIdRatio(f64),
}

/// Tracing settings read from the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// An OTLP endpoint is configured and the SDK is not disabled.
    pub enabled: bool,
    /// The transport.
    pub protocol: Protocol,
    /// The sampler.
    pub sampler: SamplerSetting,
    /// `service.name` to set on the resource; `None` when
    /// `OTEL_RESOURCE_ATTRIBUTES` names the service itself.
    pub service_name: Option<String>,
    /// Export timeout (`OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`, else
    /// `OTEL_EXPORTER_OTLP_TIMEOUT`, in milliseconds; default 10 s).
    pub timeout: Duration,
    /// Values that were invalid and replaced by their default.
    pub warnings: Vec<String>,
}

/// The OTLP export timeout when none is configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl TraceSettings {
    /// Reads the process environment; `default_service` is the service name
    /// used when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES`
    /// names one (the binary name).
    pub fn from_env(default_service: &str) -> Self {
        Self::from_lookup(default_service, |k| std::env::var(k).ok())
    }

    /// Like [`TraceSettings::from_env`], with the variables read through `get`.
    pub fn from_lookup(default_service: &str, get: impl Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str| {
            get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let mut warnings = Vec::new();
        let endpoint = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| get("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .is_some();
        let sdk_disabled = match get("OTEL_SDK_DISABLED") {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            Some(v) => {
                warnings.push(format!(
                    "OTEL_SDK_DISABLED={v:?} is neither true nor false; using false"
                ));
                false
            }
        };
        let exporter_none = match get("OTEL_TRACES_EXPORTER") {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("none") => true,
            Some(v) if v.eq_ignore_ascii_case("otlp") => false,
            Some(v) => {
                warnings.push(format!(
                    "OTEL_TRACES_EXPORTER={v:?} is not supported (otlp or none); using otlp"
                ));
                false
            }
        };
        let protocol_var = [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ]
        .into_iter()
        .find_map(|k| get(k).map(|v| (k, v)));
        let protocol = match protocol_var {
            None => Protocol::HttpProtobuf,
            Some((k, v)) => parse_protocol(&v).unwrap_or_else(|| {
                warnings.push(format!(
                    "{k}={v:?} is not supported (grpc or http/protobuf); using http/protobuf"
                ));
                Protocol::HttpProtobuf
            }),
        };
        let sampler = parse_sampler(
            get("OTEL_TRACES_SAMPLER").as_deref(),
            get("OTEL_TRACES_SAMPLER_ARG").as_deref(),
            &mut warnings,
        );
        let service_name = match get("OTEL_SERVICE_NAME") {
            Some(name) => Some(name),
            None if get("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attrs| names_service(&attrs)) => {
                None
            }
            None => Some(default_service.to_string()),
        };
        let timeout_var = [
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ]
        .into_iter()
        .find_map(|k| get(k).map(|v| (k, v)));
        let timeout = match timeout_var {
            None => DEFAULT_TIMEOUT,
            Some((k, v)) => match v.parse::<u64>() {
                Ok(ms) if ms > 0 => Duration::from_millis(ms),
                _ => {
                    warnings.push(format!(
                        "{k}={v:?} is not a positive number of milliseconds; using 10000"
                    ));
                    DEFAULT_TIMEOUT
                }
            },
        };
        TraceSettings {
            enabled: endpoint && !sdk_disabled && !exporter_none,
            protocol,
            sampler,
            service_name,
            timeout,
            warnings,
        }
    }
}

fn parse_protocol(v: &str) -> Option<Protocol> {
    match v.to_ascii_lowercase().as_str() {
        "grpc" => Some(Protocol::Grpc),
        "http/protobuf" => Some(Protocol::HttpProtobuf),
        _ => None,
    }
}

/// Whether `OTEL_RESOURCE_ATTRIBUTES` (`k=v,k=v`) sets `service.name`.
fn names_service(attrs: &str) -> bool {
    attrs.split(',').any(|kv| {
        kv.split_once('=')
            .is_some_and(|(k, v)| k.trim() == "service.name" && !v.trim().is_empty())
    })
}

/// Parses the sampler per the specification: an unknown sampler is
/// `parentbased_always_on`; a missing or invalid ratio (not a number in
/// [0, 1]) is 1.0. Both with a warning.
fn parse_sampler(
    name: Option<&str>,
    arg: Option<&str>,
    warnings: &mut Vec<String>,
) -> SamplerSetting {
    let Some(name) = name else {
        return SamplerSetting::ParentBasedAlwaysOn;
    };
    let mut ratio = || match arg.map(|a| (a, a.parse::<f64>())) {
        Some((_, Ok(r))) if (0.0..=1.0).contains(&r) => r,
        Some((a, _)) => {
            warnings.push(format!(
                "OTEL_TRACES_SAMPLER_ARG={a:?} is not a ratio between 0 and 1; using 1.0"
            ));
            1.0
        }
        None => {
            warnings.push(format!(
                "OTEL_TRACES_SAMPLER={name} needs OTEL_TRACES_SAMPLER_ARG (a ratio between 0 and 1); using 1.0"
            ));
            1.0
        }
    };
    match name.to_ascii_lowercase().as_str() {
        "always_on" => SamplerSetting::AlwaysOn,
        "always_off" => SamplerSetting::AlwaysOff,
        "traceidratio" => SamplerSetting::TraceIdRatio(ratio()),
        "parentbased_always_on" => SamplerSetting::ParentBasedAlwaysOn,
        "parentbased_always_off" => SamplerSetting::ParentBasedAlwaysOff,
        "parentbased_traceidratio" => SamplerSetting::ParentBasedTraceIdRatio(ratio()),
        other => {
            warnings.push(format!(
                "OTEL_TRACES_SAMPLER={other:?} is not supported (always_on, always_off, \
                 traceidratio, parentbased_always_on, parentbased_always_off, \
                 parentbased_traceidratio); using parentbased_always_on"
            ));
            SamplerSetting::ParentBasedAlwaysOn
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> TraceSettings {
        TraceSettings::from_lookup("claw-test", |k| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn off_without_an_endpoint_with_defaults() {
        let s = settings(&[]);
        assert!(!s.enabled);
        assert_eq!(s.protocol, Protocol::HttpProtobuf);
        assert_eq!(s.sampler, SamplerSetting::ParentBasedAlwaysOn);
        assert_eq!(s.service_name.as_deref(), Some("claw-test"));
        assert_eq!(s.timeout, DEFAULT_TIMEOUT);
        assert!(s.warnings.is_empty());
        // A blank endpoint is no endpoint.
        assert!(!settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "  ")]).enabled);
    }

    #[test]
    fn either_endpoint_turns_it_on_unless_disabled() {
        assert!(settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]).enabled);
        assert!(
            settings(&[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://c:4318/v1/traces"
            )])
            .enabled
        );
        for off in ["true", "TRUE", " True "] {
            let s = settings(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_SDK_DISABLED", off),
            ]);
            assert!(!s.enabled, "{off}");
        }
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ]);
        assert!(!s.enabled);
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_SDK_DISABLED", "yes"),
        ]);
        assert!(s.enabled);
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        assert!(s.warnings[0].contains("OTEL_SDK_DISABLED"));
    }

    #[test]
    fn protocol_signal_variable_wins_and_bad_values_fall_back() {
        assert_eq!(
            settings(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).protocol,
            Protocol::Grpc
        );
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
        ]);
        assert_eq!(s.protocol, Protocol::HttpProtobuf);
        for bad in ["http/json", "udp"] {
            let s = settings(&[("OTEL_EXPORTER_OTLP_PROTOCOL", bad)]);
            assert_eq!(s.protocol, Protocol::HttpProtobuf);
            assert!(
                s.warnings[0].contains("OTEL_EXPORTER_OTLP_PROTOCOL"),
                "{:?}",
                s.warnings
            );
        }
    }

    #[test]
    fn samplers_and_their_ratio() {
        let s = |name: &str, arg: Option<&str>| {
            let mut v = vec![("OTEL_TRACES_SAMPLER", name)];
            if let Some(a) = arg {
                v.push(("OTEL_TRACES_SAMPLER_ARG", a));
            }
            settings(&v)
        };
        assert_eq!(s("always_off", None).sampler, SamplerSetting::AlwaysOff);
        assert_eq!(
            s("always_on", Some("0.1")).sampler,
            SamplerSetting::AlwaysOn
        );
        assert_eq!(
            s("parentbased_traceidratio", Some("0.25")).sampler,
            SamplerSetting::ParentBasedTraceIdRatio(0.25)
        );
        assert_eq!(
            s("TraceIdRatio", Some("0")).sampler,
            SamplerSetting::TraceIdRatio(0.0)
        );
        assert!(s("traceidratio", Some("1")).warnings.is_empty());
    }

    #[test]
    fn a_bad_sampler_arg_falls_back_to_one_with_a_warning() {
        for bad in ["1.5", "-0.1", "half", "NaN"] {
            let s = settings(&[
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", bad),
            ]);
            assert_eq!(
                s.sampler,
                SamplerSetting::ParentBasedTraceIdRatio(1.0),
                "{bad}"
            );
            assert_eq!(s.warnings.len(), 1);
            assert!(
                s.warnings[0].contains("OTEL_TRACES_SAMPLER_ARG"),
                "{:?}",
                s.warnings
            );
            assert!(s.warnings[0].contains(bad), "{:?}", s.warnings);
        }
        let s = settings(&[("OTEL_TRACES_SAMPLER", "traceidratio")]);
        assert_eq!(s.sampler, SamplerSetting::TraceIdRatio(1.0));
        assert!(s.warnings[0].contains("needs OTEL_TRACES_SAMPLER_ARG"));
    }

    #[test]
    fn an_unknown_sampler_is_parent_based_always_on() {
        for bad in ["xray", "jaeger_remote", "sometimes"] {
            let s = settings(&[("OTEL_TRACES_SAMPLER", bad)]);
            assert_eq!(s.sampler, SamplerSetting::ParentBasedAlwaysOn);
            assert!(s.warnings[0].contains(bad), "{:?}", s.warnings);
        }
    }

    #[test]
    fn service_name_defaults_to_the_binary_unless_configured() {
        let s = settings(&[("OTEL_SERVICE_NAME", "gw-eu")]);
        assert_eq!(s.service_name.as_deref(), Some("gw-eu"));
        // OTEL_RESOURCE_ATTRIBUTES naming the service: the SDK reads it.
        let s = settings(&[(
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=prod, service.name=gw",
        )]);
        assert_eq!(s.service_name, None);
        let s = settings(&[("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod")]);
        assert_eq!(s.service_name.as_deref(), Some("claw-test"));
        let s = settings(&[("OTEL_RESOURCE_ATTRIBUTES", "service.name=")]);
        assert_eq!(s.service_name.as_deref(), Some("claw-test"));
    }

    #[test]
    fn timeouts_in_milliseconds() {
        let s = settings(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "2500")]);
        assert_eq!(s.timeout, Duration::from_millis(2500));
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "700"),
        ]);
        assert_eq!(s.timeout, Duration::from_millis(700));
        for bad in ["0", "10s", "-1"] {
            let s = settings(&[("OTEL_EXPORTER_OTLP_TIMEOUT", bad)]);
            assert_eq!(s.timeout, DEFAULT_TIMEOUT);
            assert_eq!(s.warnings.len(), 1);
        }
    }
}
