//! `plan` and `status`: observe each environment, plan, print.

use std::io::IsTerminal;

use super::{Format, Outcome, Select, Show, load_selected};
use crate::changeset::{self, LiveSide};
use crate::cloud::Retrying;
use crate::cloud::aws::AwsCloud;
use crate::cloud::{
    ChangeSetKind, ChangeSetRequest, ChangeSetStatus, Cloud, CloudError, ResourceChange,
    StackStatus,
};
use crate::observe::{Depth, observe};
use crate::plan::{Plan, StackAction, plan, resolve_parameters};
use crate::policy::Violation;
use crate::spec::DesiredEnv;

/// Change-set previews of one stack.
#[derive(Debug, serde::Serialize)]
struct Preview {
    stack: String,
    /// The change set's changes, then those inside its nested stacks
    /// (named `Nested.LogicalId`).
    changes: Vec<ResourceChange>,
    /// What `reconcile` would refuse to execute: the policy's verdict on
    /// this very change set, as a pass would judge it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    blocked_by_policy: Vec<Violation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Why no change set was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<String>,
}

pub(super) async fn plan_command(
    select: &Select,
    full: bool,
    stats: bool,
    change_sets: bool,
    show: Show,
    state: &super::state::StateArgs,
) -> anyhow::Result<Outcome> {
    let (envs, load_failed) = load_selected(select)?;
    let state = state.open().await;
    // Who holds each environment, when replicas share them (one Query).
    let leases = match &state {
        Some(s) => s.leases().await.unwrap_or_else(|e| {
            eprintln!("warning: leases unknown: {e}");
            Default::default()
        }),
        None => Default::default(),
    };
    let mut outcome = if load_failed {
        Outcome::Failed
    } else {
        Outcome::InSync
    };
    let mut json = Vec::new();
    for env in &envs {
        let cloud = Retrying::new(AwsCloud::connect(&env.region, env.assume_role.as_ref()).await);
        let depth = if full { Depth::Full } else { Depth::Fast };
        let mut observed = match observe(&cloud, env, depth).await {
            Ok(o) => o,
            Err(e) => {
                eprintln!(
                    "error: {}: cannot observe {} in {}: {e}",
                    env.name, env.name, env.region
                );
                outcome = Outcome::Failed;
                continue;
            }
        };
        // Plan and status only read: an unreadable table is a warning.
        match super::state::read_suspension(state.as_ref(), &env.name).await {
            Ok(s) => observed.suspension = s,
            Err(e) => eprintln!("warning: {}: suspension unknown: {e}", env.name),
        }
        observed.sync_window = env.policy.windows.state(std::time::SystemTime::now());
        let plan = plan(env, &observed);
        let previews = if change_sets {
            preview_change_sets(&cloud, env, &plan, &observed).await
        } else {
            Vec::new()
        };
        outcome = outcome.worst(plan.verdict().into());
        if previews.iter().any(|p| p.error.is_some()) {
            outcome = Outcome::Failed;
        }
        match select.output {
            Format::Json => json.push(serde_json::json!({
                "environment": env.name,
                "region": env.region,
                "revision": env.revision,
                "verdict": plan.verdict(),
                "suspended": plan.suspended,
                "sync_window": plan.sync_window,
                "lease_holder": leases.get(&env.name).map(|l| &l.value.holder).filter(|h| !h.is_empty()),
                "stacks": plan.stacks,
                "services": plan.services,
                "change_sets": previews,
            })),
            Format::Text => {
                print_text(env, &plan, &previews, show);
                if let Some(l) = leases.get(&env.name) {
                    match l.value.holder.as_str() {
                        "" => println!("  lease free (no replica holds it)"),
                        holder => println!("  lease held by {holder}"),
                    }
                }
            }
        }
        if stats {
            eprintln!("{}: {} AWS API calls", env.name, cloud.calls().get());
        }
    }
    if select.output == Format::Json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    }
    Ok(outcome)
}

/// Creates a change set for each stack with a pending create or update,
/// reads its changes, and deletes it (a CREATE preview leaves nothing:
/// deleting its only change set removes the REVIEW_IN_PROGRESS stack).
async fn preview_change_sets<C: Cloud>(
    cloud: &C,
    env: &DesiredEnv,
    plan: &Plan,
    observed: &crate::plan::Observed,
) -> Vec<Preview> {
    let mut out = Vec::new();
    for p in &plan.stacks {
        let kind = match p.action {
            StackAction::Create => ChangeSetKind::Create,
            StackAction::Update { .. } => ChangeSetKind::Update,
            _ => continue,
        };
        let Some(key) = &p.key else { continue };
        let stack = &env.stacks[key];
        let parameters = match resolve_parameters(stack, env, observed) {
            Ok(p) => p,
            Err((_, why)) => {
                out.push(Preview {
                    stack: key.clone(),
                    changes: vec![],
                    blocked_by_policy: vec![],
                    error: None,
                    skipped: Some(format!("not previewed: {why}")),
                });
                continue;
            }
        };
        let mut request = stack.change_set_request(
            &env.name,
            preview_name(&stack.revision),
            kind,
            parameters,
            format!("stackwarden plan preview of revision {}", stack.revision),
        );
        // A planned revert is previewed as what it is: a drift-aware change set.
        request.revert_drift = matches!(
            p.action,
            StackAction::Update {
                revert_drift: true,
                ..
            }
        );
        let live = observed.stacks.get(&stack.name).map(|l| LiveSide {
            template: observed.templates.get(&stack.name),
            parameters: &l.parameters,
        });
        let result = preview_one(cloud, &request, stack.timeout)
            .await
            .map(|changes| {
                let verdict = changeset::gate(
                    stack,
                    &env.policy,
                    &changes.0,
                    &changes.1,
                    live,
                    &request.parameters,
                );
                (changes, verdict)
            });
        // Always clean up, whatever happened.
        let _ = cloud
            .delete_change_set(&request.stack_name, &request.change_set_name)
            .await;
        // A CREATE change set made the stack (REVIEW_IN_PROGRESS), and
        // deleting the change set does not delete it: the preview removes
        // the placeholder it made, and only that (nothing else on it).
        if !observed.stacks.contains_key(&stack.name)
            && let Err(e) = remove_placeholder(cloud, &stack.name).await
        {
            eprintln!(
                "warning: {}: the preview's placeholder stack {} was not removed: {e}",
                env.name, stack.name
            );
        }
        out.push(match result {
            Ok(((mut changes, nested), blocked_by_policy)) => Preview {
                stack: key.clone(),
                changes: {
                    changes.extend(nested);
                    changes
                },
                blocked_by_policy,
                error: None,
                skipped: None,
            },
            Err(e) => Preview {
                stack: key.clone(),
                changes: vec![],
                blocked_by_policy: vec![],
                error: Some(e.to_string()),
                skipped: None,
            },
        });
    }
    out
}

/// Preview change sets are named apart from reconcile's own
/// (`stackwarden-<rev>`), so a concurrent reconcile never takes one for a
/// stale change set of its own, and with a nonce, so two previews do not
/// collide.
fn preview_name(revision: &str) -> String {
    use rand::Rng;
    let nonce: u32 = rand::thread_rng().r#gen();
    format!("preview-{}-{nonce:08x}", &revision[..12])
}

/// Deletes `name` if it is a stack in REVIEW_IN_PROGRESS with no change
/// set left: the placeholder a CREATE preview made.
async fn remove_placeholder<C: Cloud>(cloud: &C, name: &str) -> Result<(), CloudError> {
    let Some(live) = cloud.describe_stack(name).await? else {
        return Ok(());
    };
    if live.status != StackStatus::ReviewInProgress {
        return Ok(());
    }
    if !cloud.list_change_sets(name).await?.is_empty() {
        // Someone else (a reconcile) has a change set on it now: theirs.
        return Ok(());
    }
    cloud.delete_stack(name).await
}

/// Creates the change set and reads its changes and those inside its
/// nested stacks, waiting at most `timeout` (the stack's operation
/// timeout) for AWS to compute them.
async fn preview_one<C: Cloud>(
    cloud: &C,
    request: &ChangeSetRequest,
    timeout: std::time::Duration,
) -> Result<(Vec<ResourceChange>, Vec<ResourceChange>), CloudError> {
    crate::artifacts::publish(cloud, &request.artifacts).await?;
    cloud.create_change_set(request).await?;
    let deadline = crate::retry::instant_after(timeout);
    let still_computing = || {
        CloudError::Transport(format!(
            "change set still being computed after {}",
            humantime::format_duration(timeout)
        ))
    };
    let cs = changeset::computed(
        cloud,
        &request.stack_name,
        &request.change_set_name,
        deadline,
    )
    .await?
    .ok_or_else(still_computing)?;
    match cs.status {
        ChangeSetStatus::NoChanges => Ok((vec![], vec![])),
        ChangeSetStatus::Failed(why) => Err(CloudError::Validation(why)),
        // Computed, but the stack got busy or someone deleted it: what it
        // said may already be stale, so no preview rather than a wrong one.
        ChangeSetStatus::Unavailable
        | ChangeSetStatus::Deleted
        | ChangeSetStatus::Executing
        | ChangeSetStatus::Executed => Err(CloudError::Conflict(format!(
            "the preview change set became {:?} before it was read (another operation on the stack?)",
            cs.status
        ))),
        ChangeSetStatus::Pending => Err(still_computing()),
        ChangeSetStatus::Ready => {
            let nested = changeset::nested_changes(cloud, &request.stack_name, &cs, deadline)
                .await
                .map_err(CloudError::Validation)?;
            Ok((cs.changes, nested))
        }
    }
}

fn paint(text: &str, code: &str) -> String {
    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    if color {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

/// What the sync window means for this plan, in one line.
pub(super) fn window_line(plan: &Plan) -> Option<String> {
    let w = plan.sync_window.as_ref()?;
    Some(if w.open || w.ignored {
        w.describe()
    } else {
        format!(
            "{}: nothing is written until then (`reconcile --once --ignore-windows` overrides)",
            w.describe()
        )
    })
}

fn print_text(env: &DesiredEnv, plan: &Plan, previews: &[Preview], show: Show) {
    println!(
        "{} ({}, revision {}, mode {:?}): {:?}",
        env.name,
        env.region,
        env.revision,
        env.policy.mode,
        plan.verdict()
    );
    if let Some(s) = &plan.suspended {
        println!(
            "  {}: nothing is written until `stackwarden resume -e {}`",
            s.describe(),
            env.name
        );
    }
    if let Some(line) = window_line(plan) {
        println!("  {line}");
    }
    let w = plan
        .stacks
        .iter()
        .map(|s| s.id().len())
        .max()
        .unwrap_or(5)
        .max(5);
    match show {
        Show::Plan => println!(
            "  {:<4} {:<w$}  {:<10} {:<11} {:<17} WHY",
            "WAVE", "STACK", "SYNC", "HEALTH", "ACTION"
        ),
        Show::Status => println!(
            "  {:<4} {:<w$}  {:<10} {:<11} {:<27} WHY",
            "WAVE", "STACK", "SYNC", "HEALTH", "STATUS"
        ),
    }
    for s in &plan.stacks {
        let key = s.id();
        let wave = if s.wave == 0 {
            "-".to_owned()
        } else {
            s.wave.to_string()
        };
        let action = s.action.label();
        let painted = match s.action {
            StackAction::None => paint(&format!("{action:<17}"), "32"),
            StackAction::Blocked { .. } | StackAction::Skip { .. } => {
                paint(&format!("{action:<17}"), "33")
            }
            _ => paint(&format!("{action:<17}"), "36"),
        };
        match show {
            Show::Plan => println!(
                "  {wave:<4} {key:<w$}  {:<10} {:<11} {painted} {}",
                format!("{:?}", s.sync),
                format!("{:?}", s.health),
                s.reason
            ),
            Show::Status => println!(
                "  {wave:<4} {key:<w$}  {:<10} {:<11} {:<27} {}",
                format!("{:?}", s.sync),
                format!("{:?}", s.health),
                s.status.clone().unwrap_or_else(|| "-".into()),
                s.reason
            ),
        }
        if let Some(d) = &s.drift {
            println!(
                "  {:<4} {:<w$}    {}",
                "",
                "",
                d.summary(std::time::SystemTime::now())
            );
            for line in d.lines() {
                println!("  {:<4} {:<w$}      {line}", "", "");
            }
        }
        if show == Show::Plan
            && let Some(d) = &s.diff
        {
            for p in &d.parameters {
                println!("  {:<4} {:<w$}    parameter {p}", "", "");
            }
            for t in d.tags.iter().filter(|t| !t.key.starts_with("stackwarden:")) {
                println!(
                    "  {:<4} {:<w$}    tag {}: {} -> {}",
                    "",
                    "",
                    t.key,
                    t.live.as_deref().unwrap_or("(unset)"),
                    t.desired.as_deref().unwrap_or("(unset)")
                );
            }
        }
    }
    for s in &plan.services {
        let name = format!("ecs:{}", s.service.as_deref().unwrap_or("?"));
        let counts = match (s.running, s.desired) {
            (Some(r), Some(d)) => format!("{r}/{d} running"),
            _ => "-".into(),
        };
        match show {
            Show::Plan => println!(
                "  {:<4} {name}  {:?} {:?} {} ({counts}) {}",
                "svc",
                s.sync,
                s.health,
                s.action.label(),
                s.reason
            ),
            Show::Status => println!(
                "  {:<4} {name}  {:?} {:?} {counts} {}",
                "svc", s.sync, s.health, s.reason
            ),
        }
    }
    for p in previews {
        println!("  change set for {}:", p.stack);
        if let Some(e) = &p.error {
            println!("    error: {e}");
        } else if let Some(why) = &p.skipped {
            println!("    {why}");
        } else if p.changes.is_empty() {
            println!("    (no resource changes)");
        } else {
            println!(
                "    {:<32} {:<44} {:<8} REPLACEMENT",
                "RESOURCE", "TYPE", "ACTION"
            );
            for c in &p.changes {
                let replacement = match c.replacement {
                    Some(r) => format!("{r:?}"),
                    None => "unknown".into(),
                };
                println!(
                    "    {:<32} {:<44} {:<8} {replacement}",
                    c.logical_id,
                    c.resource_type,
                    format!("{:?}", c.action)
                );
            }
        }
        if !p.blocked_by_policy.is_empty() {
            println!("    reconcile would not execute it (allow with policy.allow_replacement):");
            for v in &p.blocked_by_policy {
                println!("      {}", paint(&v.to_string(), "31"));
            }
        }
    }
}
