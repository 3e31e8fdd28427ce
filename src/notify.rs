//! Alerts: what is worth telling people after a pass, and telling it once.
//!
//! [`findings`] turns a pass's report into findings (pure). [`Episodes`]
//! remembers which findings are already told: a finding alerts when it
//! appears, again after `repeat_after` if still there, and its end alerts
//! once as recovered. So a drift present for a hundred passes is one alert,
//! not a hundred. [`Notifier`] sends an alert; [`SnsNotifier`] is SNS.
//!
//! Alerts never carry secrets: they are built from plan reasons and results,
//! which never hold NoEcho values.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::apply::Report;
use crate::cloud::CloudError;
use crate::outcome::{Condition, outcomes};
use crate::plan::{BlockedBy, Health, Sync};
use crate::state::StoredEpisode;

/// What kind of trouble a finding is, most severe first.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An operation failed, rolled back, or the stack is stuck failed; or
    /// the desired state cannot be loaded.
    Failed,
    /// The policy forbids the change that would fix it.
    Blocked,
    /// Running on an older state: a rolled-back update, a failed rollout.
    Degraded,
    /// Out of sync, and this pass did not (or may not) fix it.
    Drift,
    /// A previously alerted finding is gone.
    Recovered,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Failed => "failed",
            Kind::Blocked => "blocked",
            Kind::Degraded => "degraded",
            Kind::Drift => "drift",
            Kind::Recovered => "recovered",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Kind::Failed => "failed",
            Kind::Blocked => "blocked by policy",
            Kind::Degraded => "degraded",
            Kind::Drift => "drifted",
            Kind::Recovered => "recovered",
        }
    }

    pub fn severity(self) -> &'static str {
        match self {
            Kind::Failed => "critical",
            Kind::Blocked | Kind::Degraded | Kind::Drift => "warning",
            Kind::Recovered => "info",
        }
    }
}

/// One thing wrong with one object of an environment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Finding {
    /// `stack:<key>`, `ecs:<service>`, `resource:<key>/<LogicalId><path>`
    /// (a drifted property), or `desired-state`.
    pub object: String,
    pub kind: Kind,
    /// What differs or what went wrong, stable across passes.
    pub difference: String,
    /// What it is now (a drifted property's expected and actual values):
    /// told, but not part of what identifies the episode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Finding {
    /// What differs, with what it is now when known: `drifted (expected
    /// 30, actual 120)`.
    pub fn what(&self) -> String {
        match &self.detail {
            Some(d) => format!("{} ({d})", self.difference),
            None => self.difference.clone(),
        }
    }

    fn fingerprint(&self) -> (String, Kind, String) {
        (self.object.clone(), self.kind, self.difference.clone())
    }
}

/// The findings of a pass: failed, blocked (by policy), degraded and
/// drifted objects, from the pass's outcomes.
pub fn findings(report: &Report) -> Vec<Finding> {
    let mut out: Vec<Finding> = outcomes(report)
        .into_iter()
        .filter_map(|o| {
            let kind = match o.condition {
                Condition::Failed => Kind::Failed,
                Condition::Blocked(BlockedBy::Policy) => Kind::Blocked,
                _ if o.health == Health::Degraded => Kind::Degraded,
                _ if matches!(o.sync, Sync::OutOfSync | Sync::Missing | Sync::Orphaned) => {
                    Kind::Drift
                }
                _ => return None,
            };
            Some(Finding {
                detail: None,
                object: o.object,
                kind,
                difference: o.reason,
            })
        })
        .collect();
    out.extend(drift_findings(report));
    out.sort();
    out
}

/// The objects whose findings a pass could not know (their open episodes
/// stay open rather than being told recovered): the drifted properties of
/// stacks whose drift results could not be read, and of resources the
/// latest detection did not check.
pub fn unknown(report: &Report) -> Vec<String> {
    let mut out = Vec::new();
    for p in &report.final_plan.stacks {
        let (Some(key), Some(d)) = (&p.key, &p.drift) else {
            continue;
        };
        if d.status == crate::cloud::DriftStatus::Unknown || d.detection_failed.is_some() {
            out.push(format!("resource:{key}/"));
        } else {
            out.extend(d.not_checked.iter().map(|l| format!("resource:{key}/{l}/")));
        }
    }
    out
}

/// What a pass that could not run knows of resource drift: nothing, so
/// no drift episode ends.
pub fn unknown_without_a_pass() -> Vec<String> {
    vec!["resource:".to_owned()]
}

/// One finding per drifted property of the stacks' latest detections:
/// an episode is a (stack, resource, property), whatever its values, so
/// each property's end is told as it comes.
fn drift_findings(report: &Report) -> Vec<Finding> {
    report
        .final_plan
        .stacks
        .iter()
        .filter_map(|p| Some((p.key.as_ref()?, p.drift.as_ref()?)))
        .flat_map(|(key, d)| {
            d.each().map(move |(r, diff)| Finding {
                object: format!("resource:{key}/{}{}", r.logical_id, diff.path),
                kind: Kind::Drift,
                difference: format!(
                    "resource drift: {} ({}) {}",
                    r.logical_id, r.resource_type, diff.path
                ),
                detail: Some(diff.describe()),
            })
        })
        .collect()
}

/// A message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub environment: String,
    pub subject: String,
    /// Human-readable text, then the same as JSON.
    pub message: String,
    pub severity: &'static str,
    /// The most severe kind in the alert (for subscription filters).
    pub event: &'static str,
    pub findings: Vec<Finding>,
}

/// The open episodes of one environment.
#[derive(Debug)]
pub struct Episodes {
    repeat_after: Duration,
    open: BTreeMap<(String, Kind, String), (Finding, Instant)>,
}

impl Episodes {
    pub fn new(repeat_after: Duration) -> Episodes {
        Episodes {
            repeat_after,
            open: BTreeMap::new(),
        }
    }

    pub fn repeat_after(&self) -> Duration {
        self.repeat_after
    }

    /// Findings whose episode is open.
    pub fn open(&self) -> impl Iterator<Item = &Finding> {
        self.open.values().map(|(f, _)| f)
    }

    /// The open episodes, to store: `now` and `wall_now` are the same
    /// moment on the two clocks.
    pub fn stored(&self, now: Instant, wall_now: SystemTime) -> Vec<StoredEpisode> {
        self.open
            .values()
            .map(|(f, last)| StoredEpisode {
                finding: f.clone(),
                last_alert: crate::state::unix(wall_now - now.duration_since(*last)),
            })
            .collect()
    }

    /// Episodes as stored by [`Episodes::stored`] (by this process or
    /// another): what they told is not told again.
    pub fn restore(
        repeat_after: Duration,
        stored: &[StoredEpisode],
        now: Instant,
        wall_now: SystemTime,
    ) -> Episodes {
        let mut e = Episodes::new(repeat_after);
        for s in stored {
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(s.last_alert);
            let age = wall_now.duration_since(at).unwrap_or_default();
            // Older than the process's clock can go back: due to repeat.
            let last = now
                .checked_sub(age)
                .or_else(|| now.checked_sub(repeat_after))
                .unwrap_or(now);
            e.open
                .insert(s.finding.fingerprint(), (s.finding.clone(), last));
        }
        e
    }

    /// Takes the findings of a pass and returns the alert to send, if any:
    /// new findings, findings unresolved for `repeat_after` since their last
    /// alert, and findings that ended (recovered). Open episodes of objects
    /// starting with one of `unknown` (whose state the pass could not
    /// know) neither end nor repeat. Pure apart from `now`.
    pub fn update(
        &mut self,
        environment: &str,
        current: &[Finding],
        unknown: &[String],
        now: Instant,
    ) -> Option<Alert> {
        let mut tell: Vec<Finding> = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for f in current {
            let key = f.fingerprint();
            seen.insert(key.clone());
            match self.open.get_mut(&key) {
                Some((_, last)) if now.duration_since(*last) < self.repeat_after => {}
                Some((_, last)) => {
                    *last = now;
                    tell.push(f.clone());
                }
                None => {
                    self.open.insert(key, (f.clone(), now));
                    tell.push(f.clone());
                }
            }
        }
        let ended: Vec<_> = self
            .open
            .keys()
            .filter(|k| !seen.contains(*k) && !unknown.iter().any(|u| k.0.starts_with(u.as_str())))
            .cloned()
            .collect();
        let still_open: std::collections::BTreeSet<&String> =
            current.iter().map(|f| &f.object).collect();
        for key in ended {
            let (f, _) = self.open.remove(&key).expect("listed");
            // An object that only changed kind (drift -> failed) is not
            // recovered: its new finding is told above.
            if !still_open.contains(&f.object) {
                tell.push(Finding {
                    detail: None,
                    object: f.object,
                    kind: Kind::Recovered,
                    difference: format!("was {}: {}", f.kind.label(), f.difference),
                });
            }
        }
        (!tell.is_empty()).then(|| compose(environment, tell))
    }
}

fn compose(environment: &str, mut findings: Vec<Finding>) -> Alert {
    findings.sort_by(|a, b| a.kind.cmp(&b.kind).then(a.object.cmp(&b.object)));
    let worst = findings[0].kind;
    let mut by_kind: BTreeMap<Kind, Vec<&Finding>> = BTreeMap::new();
    for f in &findings {
        by_kind.entry(f.kind).or_default().push(f);
    }
    let parts: Vec<String> = by_kind
        .iter()
        .map(|(kind, fs)| {
            if fs.len() == 1 {
                format!("{} {}", fs[0].object, kind.verb())
            } else {
                let all = |prefix: &str| fs.iter().all(|f| f.object.starts_with(prefix));
                let noun = if all("stack:") {
                    "stacks"
                } else if all("resource:") {
                    "resource properties"
                } else {
                    "objects"
                };
                format!("{} {noun} {}", fs.len(), kind.verb())
            }
        })
        .collect();
    let subject = truncate(
        &format!("[stackwarden] {environment}: {}", parts.join(", ")),
        99,
    );
    let mut text = format!("{subject}\n\n");
    for f in &findings {
        text.push_str(&format!("- {} {}: {}\n", f.object, f.kind.verb(), f.what()));
    }
    let suggested = format!("stackwarden plan -e {environment}");
    text.push_str(&format!("\nSee what would change: {suggested}\n\n"));
    let json = serde_json::json!({
        "environment": environment,
        "severity": worst.severity(),
        "event": worst.label(),
        "findings": findings,
        "suggested_command": suggested,
    });
    text.push_str(&serde_json::to_string_pretty(&json).expect("JSON"));
    Alert {
        environment: environment.to_owned(),
        subject,
        message: text,
        severity: worst.severity(),
        event: worst.label(),
        findings,
    }
}

/// SNS subjects are limited to 100 characters.
fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max - 1).collect();
    out.push('…');
    out
}

/// Where alerts go.
pub trait Notifier: Send + std::marker::Sync {
    fn publish(
        &self,
        topic_arn: &str,
        alert: &Alert,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
}

/// Alerts on Amazon SNS, with `environment`, `severity` and `event` as
/// message attributes for subscription filter policies.
#[derive(Clone)]
pub struct SnsNotifier {
    config: aws_config::SdkConfig,
}

impl SnsNotifier {
    pub async fn connect() -> SnsNotifier {
        SnsNotifier {
            config: crate::cloud::aws::shared_config().await,
        }
    }
}

impl Notifier for SnsNotifier {
    async fn publish(&self, topic_arn: &str, alert: &Alert) -> Result<(), CloudError> {
        use aws_sdk_sns::types::MessageAttributeValue;
        // The topic's region is in its ARN: arn:aws:sns:<region>:<account>:<name>.
        let region = topic_arn.split(':').nth(3).unwrap_or_default().to_owned();
        let config = aws_sdk_sns::config::Builder::from(&self.config)
            .region(aws_config::Region::new(region))
            .build();
        let client = aws_sdk_sns::Client::from_conf(config);
        let attr = |v: &str| {
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value(v)
                .build()
                .expect("data type is set")
        };
        client
            .publish()
            .topic_arn(topic_arn)
            .subject(&alert.subject)
            .message(&alert.message)
            .message_attributes("environment", attr(&alert.environment))
            .message_attributes("severity", attr(alert.severity))
            .message_attributes("event", attr(alert.event))
            .send()
            .await
            .map_err(crate::cloud::aws::classify)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drift(object: &str) -> Finding {
        Finding {
            detail: None,
            object: object.into(),
            kind: Kind::Drift,
            difference: "differs: parameters (X)".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_drift_present_for_a_hundred_passes_alerts_once_and_recovers_once() {
        let mut e = Episodes::new(Duration::from_secs(6 * 3600));
        let mut alerts = Vec::new();
        for _ in 0..100 {
            alerts.extend(e.update("prod", &[drift("stack:network")], &[], Instant::now()));
            tokio::time::advance(Duration::from_secs(60)).await;
        }
        assert_eq!(alerts.len(), 1);
        assert_eq!(
            alerts[0].subject,
            "[stackwarden] prod: stack:network drifted"
        );
        assert_eq!(alerts[0].event, "drift");
        assert_eq!(alerts[0].severity, "warning");
        let recovered = e
            .update("prod", &[], &[], Instant::now())
            .expect("recovered");
        assert_eq!(recovered.event, "recovered");
        assert_eq!(e.update("prod", &[], &[], Instant::now()), None);
        // Drifting again is a new episode.
        assert!(
            e.update("prod", &[drift("stack:network")], &[], Instant::now())
                .is_some()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unresolved_episode_is_repeated_after_repeat_after() {
        let mut e = Episodes::new(Duration::from_secs(3600));
        assert!(
            e.update("dev", &[drift("stack:a")], &[], Instant::now())
                .is_some()
        );
        tokio::time::advance(Duration::from_secs(3599)).await;
        assert!(
            e.update("dev", &[drift("stack:a")], &[], Instant::now())
                .is_none()
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            e.update("dev", &[drift("stack:a")], &[], Instant::now())
                .is_some()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_episode_whose_state_is_unknown_neither_ends_nor_repeats() {
        let mut e = Episodes::new(Duration::from_secs(60));
        let prop = [drift("resource:queues/Jobs/VisibilityTimeout")];
        assert!(e.update("dev", &prop, &[], Instant::now()).is_some());
        let unknown = ["resource:queues/".to_owned()];
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(120)).await;
            assert_eq!(e.update("dev", &[], &unknown, Instant::now()), None);
        }
        let end = e
            .update("dev", &[], &[], Instant::now())
            .expect("recovered");
        assert_eq!(end.event, "recovered");
        assert_eq!(
            end.subject,
            "[stackwarden] dev: resource:queues/Jobs/VisibilityTimeout recovered"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_subject_counts_and_the_message_carries_json() {
        let mut e = Episodes::new(Duration::from_secs(3600));
        let failed = Finding {
            detail: None,
            object: "stack:msk".into(),
            kind: Kind::Failed,
            difference: "UPDATE_ROLLBACK_COMPLETE: Broker failed".into(),
        };
        let a = e
            .update(
                "prod",
                &[drift("stack:a"), drift("stack:b"), failed],
                &[],
                Instant::now(),
            )
            .unwrap();
        assert_eq!(
            a.subject,
            "[stackwarden] prod: stack:msk failed, 2 stacks drifted"
        );
        assert_eq!(a.severity, "critical");
        assert_eq!(a.event, "failed");
        let json_start = a.message.find('{').unwrap();
        let v: serde_json::Value = serde_json::from_str(&a.message[json_start..]).unwrap();
        assert_eq!(v["findings"].as_array().unwrap().len(), 3);
        assert_eq!(v["suggested_command"], "stackwarden plan -e prod");
    }

    #[tokio::test(start_paused = true)]
    async fn a_drift_that_turns_into_a_failure_is_told_as_a_failure_not_a_recovery() {
        let mut e = Episodes::new(Duration::from_secs(3600));
        e.update("dev", &[drift("stack:a")], &[], Instant::now());
        let failed = Finding {
            detail: None,
            object: "stack:a".into(),
            kind: Kind::Failed,
            difference: "x".into(),
        };
        let a = e.update("dev", &[failed], &[], Instant::now()).unwrap();
        assert_eq!(a.findings.len(), 1);
        assert_eq!(a.event, "failed");
    }
}
