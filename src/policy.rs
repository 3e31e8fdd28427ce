//! Safety rules, as pure functions: which resource changes may run.
//!
//! A change that replaces or removes a resource of a protected type is
//! blocked unless the desired state allows that logical resource. Where AWS
//! gives no replacement information (the emulator never does; AWS says
//! `Conditional` when it cannot know), the change is treated as a possible
//! replacement: safety does not depend on the quality of a preview.

use crate::cloud::{ChangeAction, Replacement, ResourceChange};
use crate::spec::Policy;
use serde_json::Value as Json;
use std::collections::{BTreeMap, BTreeSet};

use crate::template::{Template, references_parameter};

/// A change the policy forbids.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    pub logical_id: String,
    pub resource_type: String,
    pub why: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}) {}",
            self.logical_id, self.resource_type, self.why
        )
    }
}

fn protected(policy: &Policy, stack_key: &str, logical_id: &str, resource_type: &str) -> bool {
    policy.protect.contains(resource_type)
        && !policy
            .allow_replacement
            .contains(&(stack_key.to_owned(), logical_id.to_owned()))
}

/// A nested stack removed with everything in it: what it holds cannot be
/// seen from here, so it counts as protected unless `allow_replacement`
/// names it (`stack.LogicalId`).
fn removes_nested_stack(policy: &Policy, stack_key: &str, c: &ResourceChange) -> bool {
    c.action == ChangeAction::Remove
        && crate::cloud::NESTED_STACK_TYPES.contains(&c.resource_type.as_str())
        && !policy
            .allow_replacement
            .contains(&(stack_key.to_owned(), c.logical_id.clone()))
}

/// The changes of a change set that the policy forbids (a nested stack's
/// removal among them, at any depth). A modification the change set is
/// silent about counts as a possible replacement unless its logical id is
/// in `in_place` (see [`proven_in_place`]).
pub fn check_changes(
    stack_key: &str,
    changes: &[ResourceChange],
    policy: &Policy,
    in_place: &BTreeSet<String>,
) -> Vec<Violation> {
    changes
        .iter()
        .filter(|c| {
            protected(policy, stack_key, &c.logical_id, &c.resource_type)
                || removes_nested_stack(policy, stack_key, c)
        })
        .filter_map(|c| {
            let why = match (c.action, c.replacement) {
                // SyncWithActual changes only CloudFormation's record of the
                // resource, never the resource.
                (ChangeAction::Add | ChangeAction::Import | ChangeAction::SyncWithActual, _) => {
                    return None;
                }
                (ChangeAction::Remove, _) if removes_nested_stack(policy, stack_key, c) => {
                    "would be removed with every resource in it".to_owned()
                }
                (ChangeAction::Remove, _) => "would be removed".to_owned(),
                (_, Some(Replacement::False)) => return None,
                (_, Some(Replacement::True)) => "would be replaced (Replacement: True)".to_owned(),
                (_, Some(Replacement::Conditional)) => {
                    "may be replaced (Replacement: Conditional)".to_owned()
                }
                (_, None) if in_place.contains(&c.logical_id) => return None,
                (_, None) => "may be replaced (the change set does not say)".to_owned(),
            };
            Some(Violation {
                logical_id: c.logical_id.clone(),
                resource_type: c.resource_type.clone(),
                why,
            })
        })
        .collect()
}

/// One side of a forecast: a template and the parameter values it is
/// (or would be) deployed with.
#[derive(Debug, Clone, Copy)]
pub struct Deployed<'a> {
    pub template: &'a Template,
    pub parameters: &'a BTreeMap<String, String>,
}

/// Replacements and removals of protected resources forecast from the live
/// and desired templates and parameters alone, whatever a change set says:
/// a protected resource that disappears or changes type, or a create-only
/// property whose text changes or that references a parameter whose value
/// changes (`TableName: !Sub ${Environment}-reviews` with a new
/// `Environment`).
pub fn forecast(
    stack_key: &str,
    live: Deployed<'_>,
    desired: Deployed<'_>,
    policy: &Policy,
) -> Vec<Violation> {
    let changed_params: Vec<&str> = desired
        .parameters
        .iter()
        .filter(|(k, v)| {
            // A masked (NoEcho) live value is unknown: not a known change.
            live.parameters
                .get(*k)
                .is_some_and(|old| old != *v && old != "****")
        })
        .map(|(k, _)| k.as_str())
        .collect();
    let mut out = Vec::new();
    for (id, old) in &live.template.resources {
        if !protected(policy, stack_key, id, &old.kind) {
            continue;
        }
        match desired.template.resources.get(id) {
            // What CloudFormation alone expands may still declare it: the
            // change set's Remove, which the gate checks, is the evidence.
            None if !desired.template.fully_known() => {}
            None => out.push(Violation {
                logical_id: id.clone(),
                resource_type: old.kind.clone(),
                why: "would be removed (absent from the desired template)".into(),
            }),
            Some(new) if new.kind != old.kind => out.push(Violation {
                logical_id: id.clone(),
                resource_type: old.kind.clone(),
                why: format!("would be replaced (type changes to {})", new.kind),
            }),
            Some(new) => {
                let mut why: Vec<String> = Vec::new();
                for prop in crate::resource_types::create_only_properties(&old.kind) {
                    let (before, after) =
                        (prop.project(&old.properties), prop.project(&new.properties));
                    if before != after {
                        why.push(format!("create-only {prop} changes"));
                    } else if !after.is_null() {
                        let via: Vec<&str> = changed_params
                            .iter()
                            .copied()
                            .filter(|p| references_parameter(&after, p))
                            .collect();
                        if !via.is_empty() {
                            why.push(format!(
                                "create-only {prop} changes with parameter {}",
                                via.join(", ")
                            ));
                        }
                    }
                }
                if !why.is_empty() {
                    out.push(Violation {
                        logical_id: id.clone(),
                        resource_type: old.kind.clone(),
                        why: format!("would be replaced ({})", why.join("; ")),
                    });
                }
            }
        }
    }
    out
}

/// The resources whose update is proven to happen in place from the
/// templates and AWS's published create-only properties alone: the type
/// has a published schema, and no create-only property changes its text,
/// refers to a parameter whose value changes (or is hidden by NoEcho), or
/// holds what the templates cannot know (an import, a dynamic reference,
/// another resource's name or attribute, a condition, a mapping, an SSM
/// parameter type); a template with a `Transform` proves nothing. Used only where a
/// change set does not say whether it replaces (the emulator never does);
/// AWS's `True` or `Conditional` is never overruled.
pub fn proven_in_place(live: Deployed<'_>, desired: Deployed<'_>) -> BTreeSet<String> {
    // A transform (a macro, the language extensions) rewrites the template
    // where this cannot see: nothing is proven.
    let transformed = |t: &Template| t.canonical.get("Transform").is_some();
    if transformed(live.template) || transformed(desired.template) {
        return BTreeSet::new();
    }
    // A value that is hidden (NoEcho) or only names where the value lives
    // (an SSM parameter type) is unknown, as is one that changes.
    let unknown_or_changed = |p: &str| {
        let opaque = desired
            .template
            .parameters
            .get(p)
            .is_some_and(|d| d.no_echo || d.kind.starts_with("AWS::SSM::Parameter::Value"));
        opaque
            || match (live.parameters.get(p), desired.parameters.get(p)) {
                (Some(old), Some(new)) => old != new || old == "****",
                (None, None) => false,
                _ => true,
            }
    };
    live.template
        .resources
        .iter()
        .filter(|(id, old)| {
            let Some(new) = desired.template.resources.get(*id) else {
                return false;
            };
            new.kind == old.kind
                && crate::resource_types::has_schema(&new.kind)
                && crate::resource_types::create_only_properties(&new.kind)
                    .iter()
                    .all(|path| {
                        let (before, after) =
                            (path.project(&old.properties), path.project(&new.properties));
                        before == after
                            && knowable(&after, live.template)
                            && knowable(&after, desired.template)
                            && !desired
                                .template
                                .parameters
                                .keys()
                                .any(|p| unknown_or_changed(p) && references_parameter(&after, p))
                    })
        })
        .map(|(id, _)| id.clone())
        .collect()
}

/// Whether a property value is known from the template and its parameters
/// alone: literals, parameters, pseudo parameters and functions of them.
fn knowable(v: &Json, template: &Template) -> bool {
    let known_name =
        |name: &str| name.starts_with("AWS::") || template.parameters.contains_key(name);
    match v {
        Json::String(s) => !s.contains("{{resolve:"),
        Json::Array(items) => items.iter().all(|i| knowable(i, template)),
        Json::Object(m) => m.iter().all(|(k, inner)| match k.as_str() {
            "Ref" => inner.as_str().is_some_and(known_name),
            // Another resource's attribute, an import, a transform; and
            // what depends on the Conditions or Mappings sections, whose
            // changes this does not follow.
            "Fn::GetAtt" | "Fn::ImportValue" | "Fn::Transform" | "Fn::If" | "Fn::FindInMap"
            | "Condition" => false,
            "Fn::Sub" => {
                let (text, vars) = match inner {
                    Json::String(t) => (t.as_str(), None),
                    Json::Array(a) => match (a.first().and_then(Json::as_str), a.get(1)) {
                        (Some(t), vars) => (t, vars.and_then(Json::as_object)),
                        _ => return false,
                    },
                    _ => return false,
                };
                !text.contains("{{resolve:")
                    && sub_names(text)
                        .all(|n| vars.is_some_and(|vs| vs.contains_key(n)) || known_name(n))
                    && vars.is_none_or(|vs| vs.values().all(|x| knowable(x, template)))
            }
            _ => knowable(inner, template),
        }),
        _ => true,
    }
}

/// The names a `Fn::Sub` string substitutes (`${Name}`, `${Res.Attr}`;
/// `${!Literal}` is not one).
fn sub_names(text: &str) -> impl Iterator<Item = &str> {
    text.split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once('}').map(|(name, _)| name))
        .filter(|name| !name.starts_with('!'))
}

/// Whether a template holds any protected resource: such a stack is never
/// deleted and recreated automatically.
pub fn holds_protected(template: &Template, policy: &Policy) -> bool {
    !protected_resources(template, policy).is_empty()
}

/// The template's resources of a protected type, as `LogicalId (Type)`.
pub fn protected_resources(template: &Template, policy: &Policy) -> Vec<String> {
    template
        .resources
        .iter()
        .filter(|(_, r)| policy.protect.contains(&r.kind))
        .map(|(id, r)| format!("{id} ({})", r.kind))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn policy(allow: &[(&str, &str)]) -> Policy {
        Policy {
            mode: crate::spec::Mode::Converge,
            prune: false,
            allow_prune: Default::default(),
            rollback_skip: Default::default(),
            protect: crate::resource_types::default_protected_types()
                .map(str::to_owned)
                .collect(),
            allow_replacement: allow
                .iter()
                .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                .collect::<BTreeSet<_>>(),
            recreate_failed: false,
            continue_rollback: false,
            windows: Default::default(),
        }
    }

    fn change(
        action: ChangeAction,
        id: &str,
        ty: &str,
        replacement: Option<Replacement>,
    ) -> ResourceChange {
        ResourceChange {
            action,
            logical_id: id.into(),
            resource_type: ty.into(),
            replacement,
            scope: vec![],
            nested_change_set: None,
            drift: None,
        }
    }

    const TABLE: &str = "AWS::DynamoDB::Table";

    #[test]
    fn removing_a_nested_stack_is_blocked_at_any_depth_unless_allowed() {
        const NESTED: &str = "AWS::CloudFormation::Stack";
        let removed = change(ChangeAction::Remove, "Inner", NESTED, None);
        let deeper = change(ChangeAction::Remove, "Inner.Deeper", NESTED, None);
        let modified = change(
            ChangeAction::Modify,
            "Inner",
            NESTED,
            Some(Replacement::False),
        );
        let v = check_changes(
            "data",
            &[removed.clone(), deeper, modified],
            &policy(&[]),
            &BTreeSet::new(),
        );
        let ids: Vec<&str> = v.iter().map(|v| v.logical_id.as_str()).collect();
        assert_eq!(ids, ["Inner", "Inner.Deeper"]);
        assert!(v[0].why.contains("every resource in it"), "{}", v[0].why);
        assert!(
            check_changes(
                "data",
                &[removed],
                &policy(&[("data", "Inner")]),
                &BTreeSet::new()
            )
            .is_empty()
        );
    }

    #[test]
    fn replacing_or_removing_a_protected_resource_is_blocked() {
        let p = policy(&[]);
        for (c, blocked) in [
            (
                change(ChangeAction::Modify, "T", TABLE, Some(Replacement::True)),
                true,
            ),
            (
                change(
                    ChangeAction::Modify,
                    "T",
                    TABLE,
                    Some(Replacement::Conditional),
                ),
                true,
            ),
            (change(ChangeAction::Modify, "T", TABLE, None), true),
            (change(ChangeAction::Remove, "T", TABLE, None), true),
            (
                change(ChangeAction::Modify, "T", TABLE, Some(Replacement::False)),
                false,
            ),
            (change(ChangeAction::Add, "T", TABLE, None), false),
            (
                change(
                    ChangeAction::Modify,
                    "Q",
                    "AWS::SNS::Topic",
                    Some(Replacement::True),
                ),
                false,
            ),
            (
                change(ChangeAction::Remove, "Q", "AWS::SNS::Topic", None),
                false,
            ),
        ] {
            assert_eq!(
                !check_changes("data", std::slice::from_ref(&c), &p, &BTreeSet::new()).is_empty(),
                blocked,
                "{c:?}"
            );
        }
    }

    #[test]
    fn an_allowed_logical_resource_may_be_replaced() {
        let p = policy(&[("data", "T")]);
        let c = change(ChangeAction::Modify, "T", TABLE, Some(Replacement::True));
        assert!(check_changes("data", std::slice::from_ref(&c), &p, &BTreeSet::new()).is_empty());
        // Allowed in its own stack only.
        assert!(!check_changes("other", &[c], &p, &BTreeSet::new()).is_empty());
    }

    #[test]
    fn forecast_sees_a_key_schema_change_the_change_set_hides() {
        let live = Template::parse("Resources:\n  T: {Type: 'AWS::DynamoDB::Table', Properties: {KeySchema: [{AttributeName: id, KeyType: HASH}], BillingMode: PAY_PER_REQUEST}}\n").unwrap();
        let new_key = Template::parse("Resources:\n  T: {Type: 'AWS::DynamoDB::Table', Properties: {KeySchema: [{AttributeName: pk, KeyType: HASH}], BillingMode: PAY_PER_REQUEST}}\n").unwrap();
        let new_billing = Template::parse("Resources:\n  T: {Type: 'AWS::DynamoDB::Table', Properties: {KeySchema: [{AttributeName: id, KeyType: HASH}], BillingMode: PROVISIONED}}\n").unwrap();
        let removed = Template::parse("Resources:\n  Q: {Type: 'AWS::SNS::Topic'}\n").unwrap();
        let p = policy(&[]);
        let none = BTreeMap::new();
        let d = |t| Deployed {
            template: t,
            parameters: &none,
        };
        let v = forecast("data", d(&live), d(&new_key), &p);
        assert_eq!(v.len(), 1);
        assert!(v[0].why.contains("KeySchema"), "{v:?}");
        assert!(forecast("data", d(&live), d(&new_billing), &p).is_empty());
        assert!(
            forecast("data", d(&live), d(&removed), &p)[0]
                .why
                .contains("removed")
        );
    }

    /// The forecast reads AWS's published create-only properties for every
    /// type, nested paths included, not a hand-picked list.
    #[test]
    fn forecast_covers_nested_create_only_paths_and_every_stateful_type() {
        let msk = |subnets: &str, size: u32| {
            Template::parse(&format!("Resources:\n  K: {{Type: 'AWS::MSK::Cluster', Properties: {{BrokerNodeGroupInfo: {{ClientSubnets: [{subnets}], InstanceType: kafka.m5.large}}, NumberOfBrokerNodes: {size}}}}}\n")).unwrap()
        };
        let logs = |name: &str| {
            Template::parse(&format!("Resources:\n  L: {{Type: 'AWS::Logs::LogGroup', Properties: {{LogGroupName: {name}, RetentionInDays: 7}}}}\n")).unwrap()
        };
        let none = BTreeMap::new();
        let d = |t| Deployed {
            template: t,
            parameters: &none,
        };
        let p = policy(&[]);
        let (live, moved, grown) = (msk("a, b", 2), msk("a, c", 2), msk("a, b", 4));
        let v = forecast("data", d(&live), d(&moved), &p);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].why
                .contains("create-only BrokerNodeGroupInfo.ClientSubnets changes"),
            "{v:?}"
        );
        assert!(forecast("data", d(&live), d(&grown), &p).is_empty());
        let v = forecast("logs", d(&logs("/a")), d(&logs("/b")), &p);
        assert!(v[0].why.contains("LogGroupName"), "{v:?}");
    }

    #[test]
    fn an_in_place_update_is_proven_only_from_what_the_templates_show() {
        let t = Template::parse(concat!(
            "Parameters:\n  Env: {Type: String}\n  Days: {Type: Number}\n  Secret: {Type: String, NoEcho: true}\n",
            "Resources:\n",
            "  Logs: {Type: 'AWS::Logs::LogGroup', Properties: {LogGroupName: !Sub '/x/${Env}', RetentionInDays: !Ref Days}}\n",
            "  Named: {Type: 'AWS::Logs::LogGroup', Properties: {LogGroupName: !Sub '${Logs}-copy', RetentionInDays: !Ref Days}}\n",
            "  Attr: {Type: 'AWS::SQS::Queue', Properties: {QueueName: !GetAtt Logs.Arn, DelaySeconds: !Ref Days}}\n",
            "  Resolved: {Type: 'AWS::SQS::Queue', Properties: {QueueName: '{{resolve:ssm:/q}}', DelaySeconds: !Ref Days}}\n",
            "  Hidden: {Type: 'AWS::SQS::Queue', Properties: {QueueName: !Ref Secret, DelaySeconds: !Ref Days}}\n",
            "  Custom: {Type: 'Custom::Store', Properties: {Size: !Ref Days}}\n",
        ))
        .unwrap();
        let params = |env: &str, days: &str| {
            BTreeMap::from([
                ("Env".to_owned(), env.to_owned()),
                ("Days".to_owned(), days.to_owned()),
                ("Secret".to_owned(), "****".to_owned()),
            ])
        };
        let (live, longer, renamed) = (params("dev", "7"), params("dev", "30"), params("qa", "7"));
        let d = |parameters| Deployed {
            template: &t,
            parameters,
        };
        let proven = proven_in_place(d(&live), d(&longer));
        assert_eq!(
            proven.iter().map(String::as_str).collect::<Vec<_>>(),
            ["Logs"],
            "a retention change of a log group named from parameters only"
        );
        // A parameter of a create-only property changes: no proof.
        assert!(!proven_in_place(d(&live), d(&renamed)).contains("Logs"));
        // A changed create-only text is no proof either.
        let other = Template::parse("Parameters:\n  Env: {Type: String}\n  Days: {Type: Number}\nResources:\n  Logs: {Type: 'AWS::Logs::LogGroup', Properties: {LogGroupName: /y, RetentionInDays: !Ref Days}}\n").unwrap();
        assert!(
            proven_in_place(
                d(&live),
                Deployed {
                    template: &other,
                    parameters: &live
                }
            )
            .is_empty()
        );
        // A condition, a mapping, an SSM parameter type or a transform
        // proves nothing.
        for (name, extra) in [
            (
                "!If [Prod, a, b]",
                "Conditions:\n  Prod: !Equals [!Ref Env, prod]\n",
            ),
            (
                "!FindInMap [M, dev, Name]",
                "Mappings:\n  M: {dev: {Name: x}}\n",
            ),
            ("!Ref Ssm", "Transform: AWS::LanguageExtensions\n"),
        ] {
            let t = Template::parse(&format!(
                "{extra}Parameters:\n  Env: {{Type: String}}\n  Days: {{Type: Number}}\n  Ssm: {{Type: 'AWS::SSM::Parameter::Value<String>'}}\nResources:\n  L: {{Type: 'AWS::Logs::LogGroup', Properties: {{LogGroupName: {name}, RetentionInDays: !Ref Days}}}}\n"
            ))
            .unwrap();
            let d = |parameters| Deployed {
                template: &t,
                parameters,
            };
            assert!(proven_in_place(d(&live), d(&longer)).is_empty(), "{name}");
        }
        let t = Template::parse("Parameters:\n  Days: {Type: Number}\n  Ssm: {Type: 'AWS::SSM::Parameter::Value<String>'}\nResources:\n  L: {Type: 'AWS::Logs::LogGroup', Properties: {LogGroupName: !Ref Ssm, RetentionInDays: !Ref Days}}\n").unwrap();
        let d = |parameters| Deployed {
            template: &t,
            parameters,
        };
        assert!(
            proven_in_place(d(&live), d(&longer)).is_empty(),
            "an SSM parameter type"
        );
        // Proof lets a silent modification through; `Conditional` never.
        let p = policy(&[]);
        let silent = change(ChangeAction::Modify, "Logs", "AWS::Logs::LogGroup", None);
        assert!(check_changes("s", std::slice::from_ref(&silent), &p, &proven).is_empty());
        let conditional = ResourceChange {
            replacement: Some(Replacement::Conditional),
            ..silent
        };
        assert!(!check_changes("s", &[conditional], &p, &proven).is_empty());
    }

    #[test]
    fn forecast_sees_a_parameter_that_renames_a_protected_table() {
        let t = Template::parse("Parameters:\n  Environment: {Type: String}\n  Billing: {Type: String}\nResources:\n  T: {Type: 'AWS::DynamoDB::Table', Properties: {TableName: !Sub '${Environment}-reviews', BillingMode: !Ref Billing}}\n").unwrap();
        let params = |env: &str, billing: &str| {
            BTreeMap::from([
                ("Environment".to_owned(), env.to_owned()),
                ("Billing".to_owned(), billing.to_owned()),
            ])
        };
        let (live, renamed, rebilled) = (
            params("dev", "PAY_PER_REQUEST"),
            params("qa", "PAY_PER_REQUEST"),
            params("dev", "PROVISIONED"),
        );
        let d = |parameters| Deployed {
            template: &t,
            parameters,
        };
        let v = forecast("data", d(&live), d(&renamed), &policy(&[]));
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].why
                .contains("TableName changes with parameter Environment")
        );
        assert!(forecast("data", d(&live), d(&rebilled), &policy(&[])).is_empty());
        assert!(forecast("data", d(&live), d(&renamed), &policy(&[("data", "T")])).is_empty());
    }
}
