//! Metrics of passes: the same numbers to CloudWatch (once per pass per
//! environment) and on `/metrics` in Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;

use crate::apply::Report;
use crate::cloud::CloudError;
use crate::outcome::{Condition, ObjectKind, outcomes};
use crate::plan::{Health, Verdict};

/// What one pass over one environment measured.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct PassMetrics {
    pub environment: String,
    pub stacks_in_sync: u64,
    pub stacks_drifted: u64,
    pub stacks_failed: u64,
    pub stacks_blocked: u64,
    pub services_healthy: u64,
    pub services_degraded: u64,
    pub duration_seconds: f64,
    /// 1 when the pass ended in an error (observe, account check, invalid
    /// desired state), else 0.
    pub errors: u64,
    pub change_sets_executed: u64,
    pub throttles: u64,
    /// 1 while the environment is suspended (`stackwarden suspend`).
    pub suspended: u64,
    /// AWS API calls of the pass (not sent to CloudWatch).
    pub api_calls: u64,
    /// Per stack key: 1 in sync and healthy, 0 not.
    pub stack_in_sync: BTreeMap<String, u64>,
    /// Per stack key, for stacks whose drift was ever detected: drifted
    /// resources (outside the ignore rules) of the latest detection.
    pub drifted_resources: BTreeMap<String, u64>,
    /// Per stack key: when its drift was last detected (AWS's clock).
    #[serde(skip)]
    pub drift_checked: BTreeMap<String, std::time::SystemTime>,
}

impl PassMetrics {
    /// The numbers of a finished pass. `throttles` is the count of this pass.
    pub fn from_report(report: &Report, throttles: u64) -> PassMetrics {
        let mut m = PassMetrics {
            environment: report.environment.clone(),
            duration_seconds: report.seconds,
            change_sets_executed: report.changed() as u64,
            throttles,
            suspended: u64::from(report.final_plan.suspended.is_some()),
            ..PassMetrics::default()
        };
        for p in &report.final_plan.stacks {
            if let (Some(key), Some(d)) = (&p.key, &p.drift) {
                m.drifted_resources
                    .insert(key.clone(), d.resources.len() as u64);
                if let Some(t) = d.checked {
                    m.drift_checked.insert(key.clone(), t);
                }
            }
        }
        for o in outcomes(report) {
            let clean = o.condition == Condition::Clean;
            match o.kind {
                ObjectKind::Stack => {
                    match o.condition {
                        Condition::Failed => m.stacks_failed += 1,
                        Condition::Blocked(_) => m.stacks_blocked += 1,
                        Condition::Clean => m.stacks_in_sync += 1,
                        Condition::Degraded | Condition::Drift => m.stacks_drifted += 1,
                    }
                    m.stack_in_sync.insert(o.id, u64::from(clean));
                }
                ObjectKind::Service if clean => m.services_healthy += 1,
                ObjectKind::Service if o.health == Health::Degraded => {
                    m.services_degraded += 1;
                }
                ObjectKind::Service => {}
            }
        }
        m
    }

    /// The numbers of a pass that ended in an error.
    pub fn from_error(environment: &str, duration_seconds: f64, throttles: u64) -> PassMetrics {
        PassMetrics {
            environment: environment.to_owned(),
            duration_seconds,
            errors: 1,
            throttles,
            ..PassMetrics::default()
        }
    }

    /// (CloudWatch name, unit, stack key, value) of the per-stack metrics,
    /// ages counted up to `now`.
    fn stack_values(
        &self,
        now: std::time::SystemTime,
    ) -> Vec<(&'static str, &'static str, &str, f64)> {
        let in_sync = self
            .stack_in_sync
            .iter()
            .map(|(k, v)| ("StackInSync", "Count", k.as_str(), *v as f64));
        let drifted = self
            .drifted_resources
            .iter()
            .map(|(k, v)| ("DriftedResources", "Count", k.as_str(), *v as f64));
        let age = self.drift_checked.iter().map(move |(k, t)| {
            let secs = now.duration_since(*t).unwrap_or_default().as_secs_f64();
            ("DriftDetectionAge", "Seconds", k.as_str(), secs)
        });
        in_sync.chain(drifted).chain(age).collect()
    }

    /// (name, unit, value) of the environment-level metrics.
    fn values(&self) -> [(&'static str, &'static str, f64); 11] {
        [
            ("StacksInSync", "Count", self.stacks_in_sync as f64),
            ("StacksDrifted", "Count", self.stacks_drifted as f64),
            ("StacksFailed", "Count", self.stacks_failed as f64),
            ("StacksBlocked", "Count", self.stacks_blocked as f64),
            ("ServicesHealthy", "Count", self.services_healthy as f64),
            ("ServicesDegraded", "Count", self.services_degraded as f64),
            ("PassDuration", "Seconds", self.duration_seconds),
            ("Errors", "Count", self.errors as f64),
            (
                "ChangeSetsExecuted",
                "Count",
                self.change_sets_executed as f64,
            ),
            ("Throttles", "Count", self.throttles as f64),
            ("Suspended", "Count", self.suspended as f64),
        ]
    }
}

/// Where pass metrics go besides `/metrics`.
pub trait MetricsSink: Send + std::marker::Sync {
    fn put(
        &self,
        namespace: &str,
        region: &str,
        metrics: &PassMetrics,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
}

/// CloudWatch `PutMetricData`: dimension `Environment`, and `Environment` +
/// `Stack` for `StackInSync`.
#[derive(Clone)]
pub struct CloudWatchSink {
    config: aws_config::SdkConfig,
}

impl CloudWatchSink {
    pub async fn connect() -> CloudWatchSink {
        CloudWatchSink {
            config: crate::cloud::aws::shared_config().await,
        }
    }
}

impl MetricsSink for CloudWatchSink {
    async fn put(&self, namespace: &str, region: &str, m: &PassMetrics) -> Result<(), CloudError> {
        use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit};
        let config = aws_sdk_cloudwatch::config::Builder::from(&self.config)
            .region(aws_config::Region::new(region.to_owned()))
            .build();
        let client = aws_sdk_cloudwatch::Client::from_conf(config);
        let dim = |k: &str, v: &str| Dimension::builder().name(k).value(v).build();
        let mut data: Vec<MetricDatum> = m
            .values()
            .iter()
            .map(|(name, unit, value)| {
                MetricDatum::builder()
                    .metric_name(*name)
                    .unit(StandardUnit::from(*unit))
                    .value(*value)
                    .dimensions(dim("Environment", &m.environment))
                    .build()
            })
            .collect();
        data.extend(
            m.stack_values(std::time::SystemTime::now())
                .into_iter()
                .map(|(name, unit, stack, value)| {
                    MetricDatum::builder()
                        .metric_name(name)
                        .unit(StandardUnit::from(unit))
                        .value(value)
                        .dimensions(dim("Environment", &m.environment))
                        .dimensions(dim("Stack", stack))
                        .build()
                }),
        );
        // PutMetricData takes up to 1000 data per call.
        for chunk in data.chunks(1000) {
            client
                .put_metric_data()
                .namespace(namespace)
                .set_metric_data(Some(chunk.to_vec()))
                .send()
                .await
                .map_err(crate::cloud::aws::classify)?;
        }
        Ok(())
    }
}

/// The numbers behind `/metrics`: the last pass of each environment, and
/// counters since the process started.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    last: BTreeMap<String, PassMetrics>,
    passes: BTreeMap<(String, &'static str), u64>,
    errors: BTreeMap<String, u64>,
    change_sets: BTreeMap<String, u64>,
    throttles: BTreeMap<String, u64>,
    api_calls: BTreeMap<String, u64>,
    alerts: BTreeMap<String, u64>,
    /// By environment: (this replica holds its lease, hand-overs to it).
    leases: BTreeMap<String, (bool, u64)>,
}

impl Registry {
    /// Records a pass (its verdict, or `error`).
    pub fn record(&mut self, m: &PassMetrics, verdict: Option<Verdict>) {
        let env = m.environment.clone();
        let result = match verdict {
            Some(Verdict::InSync) => "in_sync",
            Some(Verdict::Differences) => "differences",
            Some(Verdict::Failed) => "failed",
            None => "error",
        };
        *self.passes.entry((env.clone(), result)).or_default() += 1;
        *self.errors.entry(env.clone()).or_default() += m.errors;
        *self.change_sets.entry(env.clone()).or_default() += m.change_sets_executed;
        *self.throttles.entry(env.clone()).or_default() += m.throttles;
        *self.api_calls.entry(env.clone()).or_default() += m.api_calls;
        self.last.insert(env, m.clone());
    }

    pub fn set_leases(&mut self, leases: &BTreeMap<String, crate::lease::LeaseStatus>) {
        self.leases = leases
            .iter()
            .map(|(e, l)| (e.clone(), (l.held, l.handovers)))
            .collect();
    }

    pub fn record_alert(&mut self, environment: &str) {
        *self.alerts.entry(environment.to_owned()).or_default() += 1;
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(out, "{name}{{{labels}}} {v}");
            }
        };
        let env = |e: &str| format!("environment=\"{}\"", escape(e));
        family(
            "stackwarden_stacks",
            "gauge",
            "Stacks by state after the last pass.",
            self.last
                .values()
                .flat_map(|m| {
                    [
                        ("in_sync", m.stacks_in_sync),
                        ("drifted", m.stacks_drifted),
                        ("failed", m.stacks_failed),
                        ("blocked", m.stacks_blocked),
                    ]
                    .map(|(s, v)| (format!("{},state=\"{s}\"", env(&m.environment)), v as f64))
                })
                .collect(),
        );
        // The per-stack metrics, as CloudWatch gets them.
        let now = std::time::SystemTime::now();
        for (metric, name, help) in [
            (
                "StackInSync",
                "stackwarden_stack_in_sync",
                "1 when the stack is in sync and healthy after the last pass.",
            ),
            (
                "DriftedResources",
                "stackwarden_drifted_resources",
                "Drifted resources of the stack at its latest drift detection (ignored drift left out).",
            ),
            (
                "DriftDetectionAge",
                "stackwarden_drift_detection_age_seconds",
                "Seconds since the stack's drift was last detected.",
            ),
        ] {
            family(
                name,
                "gauge",
                help,
                self.last
                    .values()
                    .flat_map(|m| {
                        m.stack_values(now)
                            .into_iter()
                            .filter(|(n, ..)| *n == metric)
                            .map(|(_, _, stack, v)| {
                                (
                                    format!("{},stack=\"{}\"", env(&m.environment), escape(stack)),
                                    v,
                                )
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect(),
            );
        }
        family(
            "stackwarden_services",
            "gauge",
            "ECS services by health after the last pass.",
            self.last
                .values()
                .flat_map(|m| {
                    [
                        ("healthy", m.services_healthy),
                        ("degraded", m.services_degraded),
                    ]
                    .map(|(s, v)| (format!("{},health=\"{s}\"", env(&m.environment)), v as f64))
                })
                .collect(),
        );
        family(
            "stackwarden_suspended",
            "gauge",
            "1 while the environment is suspended: observed, never written.",
            self.last
                .values()
                .map(|m| (env(&m.environment), m.suspended as f64))
                .collect(),
        );
        family(
            "stackwarden_lease_held",
            "gauge",
            "1 on the replica that holds the environment's lease, 0 on the others.",
            self.leases
                .iter()
                .map(|(e, (held, _))| (env(e), f64::from(u8::from(*held))))
                .collect(),
        );
        family(
            "stackwarden_lease_handovers_total",
            "counter",
            "Times this replica took an environment's lease over from another.",
            self.leases
                .iter()
                .map(|(e, (_, n))| (env(e), *n as f64))
                .collect(),
        );
        family(
            "stackwarden_pass_duration_seconds",
            "gauge",
            "Duration of the last pass.",
            self.last
                .values()
                .map(|m| (env(&m.environment), m.duration_seconds))
                .collect(),
        );
        family(
            "stackwarden_passes_total",
            "counter",
            "Passes by result.",
            self.passes
                .iter()
                .map(|((e, r), v)| (format!("{},result=\"{r}\"", env(e)), *v as f64))
                .collect(),
        );
        for (name, help, map) in [
            (
                "stackwarden_errors_total",
                "Passes that ended in an error.",
                &self.errors,
            ),
            (
                "stackwarden_change_sets_executed_total",
                "Stack operations started.",
                &self.change_sets,
            ),
            (
                "stackwarden_aws_throttles_total",
                "AWS throttling errors seen.",
                &self.throttles,
            ),
            (
                "stackwarden_aws_calls_total",
                "AWS API calls made by passes.",
                &self.api_calls,
            ),
            (
                "stackwarden_alerts_total",
                "Alerts published.",
                &self.alerts,
            ),
        ] {
            family(
                name,
                "counter",
                help,
                map.iter().map(|(e, v)| (env(e), *v as f64)).collect(),
            );
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_help_type_and_labelled_samples() {
        let mut r = Registry::default();
        let m = PassMetrics {
            environment: "dev".into(),
            api_calls: 10,
            stacks_in_sync: 7,
            stacks_drifted: 1,
            duration_seconds: 0.5,
            change_sets_executed: 2,
            stack_in_sync: BTreeMap::from([("network".into(), 0), ("iam".into(), 1)]),
            ..PassMetrics::default()
        };
        r.record(&m, Some(Verdict::Differences));
        r.record(&m, Some(Verdict::Differences));
        let text = r.render();
        assert!(text.contains("# TYPE stackwarden_stacks gauge"), "{text}");
        assert!(text.contains("stackwarden_stacks{environment=\"dev\",state=\"in_sync\"} 7"));
        assert!(
            text.contains("stackwarden_stack_in_sync{environment=\"dev\",stack=\"network\"} 0")
        );
        assert!(
            text.contains("stackwarden_passes_total{environment=\"dev\",result=\"differences\"} 2")
        );
        assert!(text.contains("stackwarden_change_sets_executed_total{environment=\"dev\"} 4"));
        assert!(text.contains("stackwarden_aws_calls_total{environment=\"dev\"} 20"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
