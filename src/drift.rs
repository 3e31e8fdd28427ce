//! Resource drift: what was changed out of band in a stack's resources (the
//! console during an incident, another tool), as CloudFormation's drift
//! detection reports it, judged against the desired state's `drift:`
//! settings. Pure: detection results in, a per-stack assessment out.
//!
//! Drift is read from detection results (`DescribeStackResourceDrifts`),
//! never inferred from a drift-aware change set: AWS documents phantom
//! changes on such change sets for stacks that are in sync.

use std::time::{Duration, SystemTime};

use crate::cloud::{
    DifferenceKind, DriftStatus, PropertyDifference, ResourceDrift, ResourceDriftStatus,
};
use crate::spec::DesiredStack;

/// What to do about a drifted stack.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Deserialize,
    serde::Serialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum DriftMode {
    /// Report and alert; change nothing.
    #[default]
    Alert,
    /// Also write the template's values back with a drift-aware change
    /// set, under the same policy as any change set.
    Revert,
}

/// How often drift is detected when the desired state does not say.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(3600);

/// Bounds of `drift.interval`: a detection reads every resource of the
/// stack, so more often than every few minutes only invites throttling.
pub const INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_secs(300), Duration::from_secs(7 * 86_400));

/// A stack's drift settings, resolved (environment, then the stack's own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriftSettings {
    pub mode: DriftMode,
    pub interval: Duration,
    /// Resources or properties of this stack whose drift is expected (a
    /// desired count owned by autoscaling).
    pub ignore: Vec<Ignore>,
}

impl Default for DriftSettings {
    fn default() -> DriftSettings {
        DriftSettings {
            mode: DriftMode::Alert,
            interval: DEFAULT_INTERVAL,
            ignore: Vec::new(),
        }
    }
}

/// One `ignore` entry of a stack: a resource, or a property path below it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ignore {
    pub logical_id: String,
    /// Property path segments (`ProvisionedThroughput.ReadCapacityUnits`);
    /// empty: the whole resource.
    pub path: Vec<String>,
}

impl Ignore {
    /// `LogicalId` or `LogicalId.Property.Path`.
    ///
    /// # Errors
    /// An empty segment.
    pub fn parse(text: &str) -> Result<Ignore, String> {
        let mut parts = text.split('.');
        let logical_id = parts.next().unwrap_or_default().to_owned();
        let path: Vec<String> = parts.map(str::to_owned).collect();
        if logical_id.is_empty() || path.iter().any(String::is_empty) {
            return Err(format!(
                "`{text}` must be <LogicalId> or <LogicalId>.<Property>[.<Property>...]"
            ));
        }
        Ok(Ignore { logical_id, path })
    }

    /// Whether it covers the property at `segments` (a drift's property
    /// path split at `/`) of resource `logical_id`; `None` asks for the
    /// resource itself.
    fn covers(&self, logical_id: &str, segments: Option<&[&str]>) -> bool {
        self.logical_id == logical_id
            && match segments {
                None => self.path.is_empty(),
                Some(segs) => {
                    self.path.len() <= segs.len() && self.path.iter().zip(segs).all(|(a, b)| a == b)
                }
            }
    }
}

impl std::fmt::Display for Ignore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.logical_id)?;
        for p in &self.path {
            write!(f, ".{p}")?;
        }
        Ok(())
    }
}

/// What stands in for a value that must not be shown.
pub const MASK: &str = "****";

/// One drifted property, as shown.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Difference {
    /// As AWS writes it: `/VisibilityTimeout`.
    pub path: String,
    pub expected: Option<String>,
    pub actual: Option<String>,
    pub kind: DifferenceKind,
    /// Why a drift-aware change set leaves it as it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unrevertable: Option<String>,
}

impl Difference {
    /// `/VisibilityTimeout: expected 30, actual 120`.
    pub fn describe(&self) -> String {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
        match self.kind {
            DifferenceKind::Add => format!("{}: added {}", self.path, show(&self.actual)),
            DifferenceKind::Remove => format!("{}: removed {}", self.path, show(&self.expected)),
            DifferenceKind::NotEqual => format!(
                "{}: expected {}, actual {}",
                self.path,
                show(&self.expected),
                show(&self.actual)
            ),
        }
    }
}

/// A drifted resource, its ignored properties left out.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DriftedResource {
    pub logical_id: String,
    pub resource_type: String,
    pub status: ResourceDriftStatus,
    pub differences: Vec<Difference>,
}

/// One stack's drift from its latest detection, judged.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StackDrift {
    /// DRIFTED only when a resource drifted outside the ignore rules.
    pub status: DriftStatus,
    /// When the detection began (DescribeStacks' LastCheckTimestamp).
    #[serde(serialize_with = "serialize_time")]
    pub checked: Option<SystemTime>,
    /// The stack was updated after this detection began: what it found may
    /// not hold any more (a revert since, an update). Shown, never reverted;
    /// the daemon detects such a stack again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stale: bool,
    /// Set when the detection ended DETECTION_FAILED: what it reported is
    /// partial.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detection_failed: Option<String>,
    pub resources: Vec<DriftedResource>,
    /// `LogicalId /Path` of drift the ignore rules cover.
    pub ignored: Vec<String>,
    /// Resources detection did not check (types without drift support).
    pub not_checked: Vec<String>,
}

fn serialize_time<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&humantime::format_rfc3339_seconds(*t).to_string()),
        None => s.serialize_none(),
    }
}

impl StackDrift {
    /// A stack never checked (or whose check says nothing yet).
    pub fn unchecked() -> StackDrift {
        StackDrift {
            status: DriftStatus::NotChecked,
            checked: None,
            stale: false,
            detection_failed: None,
            resources: Vec::new(),
            ignored: Vec::new(),
            not_checked: Vec::new(),
        }
    }

    pub fn drifted(&self) -> bool {
        !self.resources.is_empty()
    }

    /// The differences a drift-aware change set would write back.
    pub fn revertible(&self) -> impl Iterator<Item = (&DriftedResource, &Difference)> {
        self.each().filter(|(_, d)| d.unrevertable.is_none())
    }

    /// Every drifted property (a deleted resource counts as one, path `/`).
    pub fn each(&self) -> impl Iterator<Item = (&DriftedResource, &Difference)> {
        self.resources
            .iter()
            .flat_map(|r| r.differences.iter().map(move |d| (r, d)))
    }

    /// One line per drifted property: `Queue (AWS::SQS::Queue) /Path: ...`.
    pub fn lines(&self) -> Vec<String> {
        self.each()
            .map(|(r, d)| {
                let mut line = format!("{} ({}) {}", r.logical_id, r.resource_type, d.describe());
                if let Some(why) = &d.unrevertable {
                    line.push_str(&format!(" [not revertible: {why}]"));
                }
                line
            })
            .collect()
    }

    /// "drifted, checked 12m ago" and the like, for plan and status.
    pub fn summary(&self, now: SystemTime) -> String {
        let age = self.checked.map(|c| {
            let secs = now.duration_since(c).unwrap_or_default().as_secs();
            humantime::format_duration(Duration::from_secs(secs - secs % 60)).to_string()
        });
        let when = match age {
            Some(a) if a == "0s" => ", checked just now".to_owned(),
            Some(a) => format!(", checked {a} ago"),
            None => String::new(),
        };
        match self.status {
            DriftStatus::Drifted => format!(
                "drifted ({} propert{}){when}",
                self.each().count(),
                if self.each().count() == 1 { "y" } else { "ies" }
            ),
            DriftStatus::InSync => format!("no drift{when}"),
            DriftStatus::NotChecked => "drift not checked".into(),
            DriftStatus::Unknown => format!("drift unknown{when}"),
        }
    }
}

/// Whether a detection's results predate the stack's last update (a
/// revert, an update since): they may not hold any more. The results are
/// as old as their earliest resource check (`StackResourceDrift.Timestamp`),
/// else as the detection's start (`began`).
pub fn outdated(
    live: &crate::cloud::Stack,
    drifts: &[ResourceDrift],
    began: Option<SystemTime>,
) -> bool {
    let at = drifts.iter().filter_map(|r| r.checked).min().or(began);
    matches!((live.last_updated, at), (Some(u), Some(a)) if u > a)
}

/// Judges a stack's latest detection: ignore rules applied, secret values
/// masked, and each difference marked revertible or not.
pub fn assess(
    stack: &DesiredStack,
    settings: &DriftSettings,
    checked: Option<SystemTime>,
    detection_failed: Option<String>,
    drifts: &[ResourceDrift],
) -> StackDrift {
    let mut out = StackDrift {
        checked,
        detection_failed,
        ..StackDrift::unchecked()
    };
    for r in drifts {
        match &r.status {
            ResourceDriftStatus::NotChecked | ResourceDriftStatus::Other(_) => {
                out.not_checked.push(r.logical_id.clone());
                continue;
            }
            ResourceDriftStatus::InSync => continue,
            ResourceDriftStatus::Modified | ResourceDriftStatus::Deleted => {}
        }
        if settings
            .ignore
            .iter()
            .any(|i| i.covers(&r.logical_id, None))
        {
            out.ignored.push(r.logical_id.clone());
            continue;
        }
        let differences: Vec<PropertyDifference> = if r.status == ResourceDriftStatus::Deleted {
            vec![PropertyDifference {
                path: "/".into(),
                expected: Some("exists".into()),
                actual: Some("deleted".into()),
                kind: DifferenceKind::Remove,
            }]
        } else {
            r.differences.clone()
        };
        let mut kept = Vec::new();
        for d in differences {
            let segments: Vec<&str> = d.path.trim_start_matches('/').split('/').collect();
            if settings
                .ignore
                .iter()
                .any(|i| i.covers(&r.logical_id, Some(&segments)))
            {
                out.ignored.push(format!("{} {}", r.logical_id, d.path));
                continue;
            }
            let secret = is_secret(stack, &r.logical_id, &segments, &d);
            let unrevertable = (r.status != ResourceDriftStatus::Deleted
                && crate::resource_types::create_only_properties(&r.resource_type)
                    .iter()
                    .any(|p| p.covers(&segments)))
            .then(|| "create-only property: CloudFormation does not revert it".to_owned());
            kept.push(Difference {
                expected: if secret {
                    Some(MASK.into())
                } else {
                    d.expected
                },
                actual: if secret { Some(MASK.into()) } else { d.actual },
                path: d.path,
                kind: d.kind,
                unrevertable,
            });
        }
        if !kept.is_empty() {
            out.resources.push(DriftedResource {
                logical_id: r.logical_id.clone(),
                resource_type: r.resource_type.clone(),
                status: r.status.clone(),
                differences: kept,
            });
        }
    }
    out.status = if out.drifted() {
        DriftStatus::Drifted
    } else if checked.is_some() {
        DriftStatus::InSync
    } else {
        DriftStatus::NotChecked
    };
    out
}

/// Whether the values of a drifted property must not be shown: the
/// template sets it from a NoEcho parameter or a dynamic reference
/// (`{{resolve:secretsmanager:...}}`), or AWS's own values hold one.
fn is_secret(
    stack: &DesiredStack,
    logical_id: &str,
    segments: &[&str],
    d: &PropertyDifference,
) -> bool {
    let dynamic = |v: &Option<String>| v.as_deref().is_some_and(|s| s.contains("{{resolve:"));
    if dynamic(&d.expected) || dynamic(&d.actual) {
        return true;
    }
    let Some(resource) = stack.template.resources.get(logical_id) else {
        // Not in the desired template (a nested or removed resource): its
        // source is unknown, so nothing proves it harmless.
        return true;
    };
    let secrets = stack.secret_parameters();
    // The property as far as the path reaches into the template; a value
    // computed by a function stands for everything below it, and so does a
    // list: AWS may compare lists as sets, so its index need not be the
    // template's.
    let mut v = &resource.properties;
    for seg in segments {
        let next = match v {
            serde_json::Value::Object(m)
                if !m.keys().any(|k| k == "Ref" || k.starts_with("Fn::")) =>
            {
                m.get(*seg)
            }
            _ => None,
        };
        match next {
            Some(n) => v = n,
            None => break,
        }
    }
    secrets
        .iter()
        .any(|p| crate::template::references_parameter(v, p))
        || v.to_string().contains("{{resolve:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignore_entries_cover_a_resource_or_a_property_and_what_is_below_it() {
        let whole = Ignore::parse("Service").unwrap();
        let count = Ignore::parse("Service.DesiredCount").unwrap();
        let nested = Ignore::parse("Table.ProvisionedThroughput").unwrap();
        assert!(whole.covers("Service", None));
        assert!(!count.covers("Service", None));
        assert!(count.covers("Service", Some(&["DesiredCount"])));
        assert!(!count.covers("Service", Some(&["TaskDefinition"])));
        assert!(nested.covers(
            "Table",
            Some(&["ProvisionedThroughput", "ReadCapacityUnits"])
        ));
        assert!(!nested.covers("Other", Some(&["ProvisionedThroughput"])));
        assert_eq!(count.to_string(), "Service.DesiredCount");
        for bad in ["", ".X", "Service.", "A..B"] {
            assert!(Ignore::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn differences_read_as_people_say_them() {
        let d = |kind, e: Option<&str>, a: Option<&str>| Difference {
            path: "/P".into(),
            expected: e.map(str::to_owned),
            actual: a.map(str::to_owned),
            kind,
            unrevertable: None,
        };
        assert_eq!(
            d(DifferenceKind::NotEqual, Some("30"), Some("120")).describe(),
            "/P: expected 30, actual 120"
        );
        assert_eq!(
            d(
                DifferenceKind::Add,
                None,
                Some("{\"CidrIp\":\"0.0.0.0/0\"}")
            )
            .describe(),
            "/P: added {\"CidrIp\":\"0.0.0.0/0\"}"
        );
        assert_eq!(
            d(DifferenceKind::Remove, Some("x"), None).describe(),
            "/P: removed x"
        );
    }
}
