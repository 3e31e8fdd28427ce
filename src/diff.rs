//! What differs between one desired stack and its live counterpart. Pure:
//! no IO, no clock.
//!
//! Templates are compared by meaning (parsed, long-form JSON), parameters
//! after defaults and output references are resolved, tags as maps. NoEcho
//! parameters come back from AWS as `****`: their live value is unknown, so
//! they are never reported as changed (a change set decides) and never shown.

use std::collections::{BTreeMap, BTreeSet};

use crate::cloud::Stack;
use crate::spec::{DesiredStack, REVISION_TAG};
use crate::template::Template;

/// How the live template compares with the desired one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateDiff {
    Same,
    Changed,
    /// Not fetched: the revision tag says it is the desired one.
    NotChecked,
}

/// One parameter that differs. Values of secret parameters are withheld.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ParamChange {
    pub key: String,
    pub live: Option<String>,
    pub desired: Option<String>,
    pub secret: bool,
}

impl std::fmt::Display for ParamChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.secret {
            return write!(f, "{} (secret, value hidden)", self.key);
        }
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(unset)".into());
        write!(
            f,
            "{}: {} -> {}",
            self.key,
            show(&self.live),
            show(&self.desired)
        )
    }
}

/// One tag that differs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TagChange {
    pub key: String,
    pub live: Option<String>,
    pub desired: Option<String>,
}

/// Everything that differs for one stack.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StackDiff {
    pub template: TemplateDiff,
    pub parameters: Vec<ParamChange>,
    pub tags: Vec<TagChange>,
    /// (live, desired) when they differ.
    pub termination_protection: Option<(bool, bool)>,
}

impl StackDiff {
    pub fn is_empty(&self) -> bool {
        self.template != TemplateDiff::Changed
            && self.parameters.is_empty()
            && self.tags.is_empty()
            && self.termination_protection.is_none()
    }

    /// A short list of what differs: `template`, `parameters (A, B)`, ...
    pub fn summary(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.template == TemplateDiff::Changed {
            out.push("template".to_owned());
        }
        if !self.parameters.is_empty() {
            let keys: Vec<&str> = self.parameters.iter().map(|p| p.key.as_str()).collect();
            out.push(format!("parameters ({})", keys.join(", ")));
        }
        let tags: Vec<&str> = self
            .tags
            .iter()
            .filter(|t| t.key != REVISION_TAG)
            .map(|t| t.key.as_str())
            .collect();
        if !tags.is_empty() {
            out.push(format!("tags ({})", tags.join(", ")));
        } else if !self.tags.is_empty() && out.is_empty() {
            out.push("revision tag".to_owned());
        }
        if self.termination_protection.is_some() {
            out.push("termination protection".to_owned());
        }
        out
    }
}

/// Compares a desired stack with its live state.
///
/// `parameters` are the desired values with output references resolved;
/// `tags` the desired tags including stackwarden's own; `live_template` the
/// parsed live template when it was fetched.
pub fn diff_stack(
    desired: &DesiredStack,
    parameters: &BTreeMap<String, String>,
    tags: &BTreeMap<String, String>,
    live: &Stack,
    live_template: Option<&Template>,
) -> StackDiff {
    let template = match live_template {
        None => TemplateDiff::NotChecked,
        Some(t) if t.canonical == desired.template.canonical => TemplateDiff::Same,
        Some(_) => TemplateDiff::Changed,
    };
    let secrets = desired.secret_parameters();
    let effective = desired.template.effective_parameters(parameters);
    let keys: BTreeSet<&String> = effective.keys().chain(live.parameters.keys()).collect();
    let parameters = keys
        .into_iter()
        .filter_map(|k| {
            let want = effective.get(k);
            let have = live.parameters.get(k);
            let secret = secrets.contains(k) || have.is_some_and(|v| v == "****");
            if secret
                || want == have
                || (want.is_some() && have.is_some() && same_value(want?, have?))
            {
                return None;
            }
            Some(ParamChange {
                key: k.clone(),
                live: have.cloned(),
                desired: want.cloned(),
                secret,
            })
        })
        .collect();
    let tag_keys: BTreeSet<&String> = tags.keys().chain(live.tags.keys()).collect();
    let tags = tag_keys
        .into_iter()
        .filter(|k| tags.get(*k) != live.tags.get(*k))
        .map(|k| TagChange {
            key: k.clone(),
            live: live.tags.get(k).cloned(),
            desired: tags.get(k).cloned(),
        })
        .collect();
    let termination_protection = (live.termination_protection != desired.termination_protection)
        .then_some((live.termination_protection, desired.termination_protection));
    StackDiff {
        template,
        parameters,
        tags,
        termination_protection,
    }
}

/// CloudFormation echoes lists without spaces and numbers as written; treat
/// `a, b` and `a,b` (and `1.0` and `1`) as the same value.
fn same_value(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.split(',').map(str::trim).collect::<Vec<_>>().join(",");
    if norm(a) == norm(b) {
        return true;
    }
    matches!((a.parse::<f64>(), b.parse::<f64>()), (Ok(x), Ok(y)) if x == y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::Duration;

    const BODY: &str = "Parameters:\n  Size: {Type: Number, Default: 1}\n  Password: {Type: String, NoEcho: true}\n  Subnets: {Type: CommaDelimitedList}\nResources:\n  Q: {Type: 'AWS::SQS::Queue'}\n";

    fn desired() -> DesiredStack {
        DesiredStack {
            key: "q".into(),
            name: "dev-q".into(),
            template_path: PathBuf::from("q.yaml"),
            template_body: BODY.into(),
            template_url: None,
            artifacts: vec![],
            nested_templates: vec![],
            template: Template::parse(BODY).unwrap(),
            parameters: BTreeMap::new(),
            depends_on: BTreeSet::new(),
            tags: BTreeMap::new(),
            termination_protection: false,
            timeout: Duration::from_secs(60),
            ecs_services: vec![],
            drift: Default::default(),
            revision: "r1".into(),
            owner: None,
        }
    }

    fn live(params: &[(&str, &str)]) -> Stack {
        Stack {
            name: "dev-q".into(),
            id: "id".into(),
            status: "CREATE_COMPLETE".into(),
            status_reason: None,
            parameters: params
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            tags: BTreeMap::from([("T".into(), "1".into())]),
            outputs: BTreeMap::new(),
            termination_protection: false,
            last_updated: None,
            drift: Default::default(),
        }
    }

    fn given(p: &[(&str, &str)]) -> BTreeMap<String, String> {
        p.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
    }

    #[test]
    fn equal_parameters_after_defaults_are_in_sync() {
        let d = diff_stack(
            &desired(),
            &given(&[("Password", "s3cret"), ("Subnets", "a, b")]),
            &BTreeMap::from([("T".into(), "1".into())]),
            &live(&[("Size", "1"), ("Password", "****"), ("Subnets", "a,b")]),
            None,
        );
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(d.template, TemplateDiff::NotChecked);
    }

    #[test]
    fn a_changed_parameter_is_named_with_both_values() {
        let d = diff_stack(
            &desired(),
            &given(&[("Size", "3"), ("Password", "x"), ("Subnets", "a")]),
            &BTreeMap::from([("T".into(), "1".into())]),
            &live(&[("Size", "1"), ("Password", "****"), ("Subnets", "a")]),
            None,
        );
        assert_eq!(d.parameters.len(), 1);
        assert_eq!(d.parameters[0].to_string(), "Size: 1 -> 3");
        assert_eq!(d.summary(), vec!["parameters (Size)"]);
    }

    #[test]
    fn no_echo_parameters_are_never_reported_or_shown() {
        let d = diff_stack(
            &desired(),
            &given(&[("Password", "new-secret"), ("Subnets", "a")]),
            &BTreeMap::from([("T".into(), "1".into())]),
            &live(&[("Size", "1"), ("Password", "****"), ("Subnets", "a")]),
            None,
        );
        assert!(d.parameters.is_empty());
        assert!(!format!("{d:?}").contains("new-secret"));
    }

    #[test]
    fn template_comparison_is_semantic() {
        let reformatted = Template::parse(&format!(
            "# comment\n{}",
            BODY.replace("{Type: 'AWS::SQS::Queue'}", "\n    Type: AWS::SQS::Queue")
        ))
        .unwrap();
        let changed = Template::parse(&BODY.replace("SQS::Queue", "SNS::Topic")).unwrap();
        let p = given(&[("Password", "x"), ("Subnets", "a")]);
        let t = BTreeMap::from([("T".into(), "1".into())]);
        let l = live(&[("Size", "1"), ("Password", "****"), ("Subnets", "a")]);
        assert_eq!(
            diff_stack(&desired(), &p, &t, &l, Some(&reformatted)).template,
            TemplateDiff::Same
        );
        assert_eq!(
            diff_stack(&desired(), &p, &t, &l, Some(&changed)).template,
            TemplateDiff::Changed
        );
    }

    #[test]
    fn tags_compare_as_maps() {
        let p = given(&[("Password", "x"), ("Subnets", "a")]);
        let l = live(&[("Size", "1"), ("Password", "****"), ("Subnets", "a")]);
        let d = diff_stack(
            &desired(),
            &p,
            &BTreeMap::from([("T".into(), "2".into())]),
            &l,
            None,
        );
        assert_eq!(d.summary(), vec!["tags (T)"]);
    }
}
