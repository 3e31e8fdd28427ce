//! The change-set lifecycle's shared steps: wait for a change set to be
//! computed, read what changes inside its nested stacks, and gate it by the
//! policy. `reconcile` (apply.rs) and `plan --change-sets` (a preview that
//! tells what reconcile would do, blocks included) both go through these,
//! so a preview never judges a change set differently from a pass.

use std::collections::BTreeMap;

use tokio::time::Instant;

use crate::cloud::{ChangeAction, ChangeSet, ChangeSetStatus, Cloud, CloudError, ResourceChange};
use crate::policy::{self, Deployed, Violation};
use crate::retry;
use crate::spec::{DesiredStack, Policy};
use crate::template::Template;

/// Polls a change set until it is computed (any status but pending), with
/// the poll backoff; throttled polls just poll later.
///
/// # Errors
/// A cloud error other than throttling. `Ok(None)`: still pending at
/// `deadline`.
pub async fn computed<C: Cloud>(
    cloud: &C,
    stack: &str,
    name: &str,
    deadline: Instant,
) -> Result<Option<ChangeSet>, CloudError> {
    let mut backoff = retry::poll_backoff();
    loop {
        match cloud.describe_change_set(stack, name).await {
            Ok(cs) if cs.status != ChangeSetStatus::Pending => return Ok(Some(cs)),
            Ok(_) => {}
            Err(e) if e.is_transient() => {}
            Err(e) => return Err(e),
        }
        if retry::pause(&mut backoff, deadline).await.is_err() {
            return Ok(None);
        }
    }
}

/// Every change inside the nested stacks of a change set, recursively,
/// named `Nested.LogicalId` (`Outer.Inner.LogicalId` deeper down).
///
/// # Errors
/// Why a nested change set could not be inspected: AWS gave none for a
/// changed nested stack, or it failed, or it is still being computed
/// at the deadline, or it cannot be described.
pub async fn nested_changes<C: Cloud>(
    cloud: &C,
    stack: &str,
    cs: &ChangeSet,
    deadline: Instant,
) -> Result<Vec<ResourceChange>, String> {
    /// Nesting deeper than this is refused rather than followed.
    const MAX_DEPTH: usize = 5;
    let mut out = Vec::new();
    let mut frontier: Vec<(String, ResourceChange)> = cs
        .changes
        .iter()
        .map(|c| (String::new(), c.clone()))
        .collect();
    let mut depth = 0;
    while !frontier.is_empty() {
        let mut next = Vec::new();
        for (prefix, c) in frontier {
            let nested_type = crate::cloud::NESTED_STACK_TYPES.contains(&c.resource_type.as_str());
            if !nested_type || matches!(c.action, ChangeAction::Add | ChangeAction::Remove) {
                // A new nested stack replaces nothing; a removed one is
                // judged whole (policy::check_changes).
                continue;
            }
            let path = format!("{prefix}{}", c.logical_id);
            let Some(id) = &c.nested_change_set else {
                return Err(format!(
                    "no nested change set for {path}: what changes inside it cannot be inspected"
                ));
            };
            if depth >= MAX_DEPTH {
                return Err(format!("{path} is nested deeper than {MAX_DEPTH} levels"));
            }
            let inner = match computed(cloud, stack, id, deadline).await {
                Ok(Some(inner)) => inner,
                Ok(None) => {
                    return Err(format!("the change set of {path} is still being computed"));
                }
                Err(e) => return Err(format!("the change set of {path} cannot be read: {e}")),
            };
            match inner.status {
                ChangeSetStatus::Ready | ChangeSetStatus::NoChanges => {}
                other => {
                    return Err(format!("the change set of {path} is {other:?}"));
                }
            }
            for n in inner.changes {
                let named = ResourceChange {
                    logical_id: format!("{path}.{}", n.logical_id),
                    ..n.clone()
                };
                out.push(named);
                next.push((format!("{path}."), n));
            }
        }
        frontier = next;
        depth += 1;
    }
    Ok(out)
}

/// What the live stack is, for the gate: its template as read (`None`
/// when it could not be), and its parameters as AWS echoes them.
#[derive(Debug, Clone, Copy)]
pub struct LiveSide<'a> {
    pub template: Option<&'a Template>,
    pub parameters: &'a BTreeMap<String, String>,
}

/// The policy's verdict on a computed change set (pure): the changes it
/// forbids, in the parent and inside nested stacks, plus the replacements
/// forecast from the templates that the change set may not show. `live` is
/// `None` for a stack that does not exist yet.
pub fn gate(
    stack: &DesiredStack,
    policy: &Policy,
    changes: &[ResourceChange],
    nested: &[ResourceChange],
    live: Option<LiveSide<'_>>,
    desired_parameters: &BTreeMap<String, String>,
) -> Vec<Violation> {
    let desired_params = stack.template.effective_parameters(desired_parameters);
    // A loop over a parameter given as another stack's output expands only
    // now that its value is known.
    let rebound = (!stack.template.fully_known())
        .then(|| {
            let known = desired_parameters
                .iter()
                .map(|(k, v)| (k.clone(), Some(v.clone())))
                .collect();
            Template::parse_with(&stack.template_body, &known).ok()
        })
        .flatten();
    let template = rebound.as_ref().unwrap_or(&stack.template);
    let desired = Deployed {
        template,
        parameters: &desired_params,
    };
    // Without the live template nothing can be proven in place, and the
    // forecast compares the desired template with itself (parameters only).
    let live_side = live.map(|l| Deployed {
        template: l.template.unwrap_or(template),
        parameters: l.parameters,
    });
    let in_place = match (live_side, live.and_then(|l| l.template)) {
        (Some(l), Some(_)) => policy::proven_in_place(l, desired),
        _ => Default::default(),
    };
    let mut violations = policy::check_changes(&stack.key, changes, policy, &in_place);
    violations.extend(policy::check_changes(
        &stack.key,
        nested,
        policy,
        &Default::default(),
    ));
    if let Some(l) = live_side {
        for v in policy::forecast(&stack.key, l, desired, policy) {
            if !violations.iter().any(|x| x.logical_id == v.logical_id) {
                violations.push(v);
            }
        }
    }
    violations
}
