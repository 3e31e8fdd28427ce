//! What `stackwarden rollback` does to a stack, by the state it is in
//! (pure). A rollback gets a stack out of a failed or running operation
//! and back to its last stable state, with the operation AWS documents for
//! that state:
//!
//! | state | action |
//! |---|---|
//! | CREATE_FAILED, UPDATE_FAILED (rollback was disabled) | RollbackStack |
//! | UPDATE_ROLLBACK_FAILED | ContinueUpdateRollback, skipping `--skip` resources |
//! | UPDATE_IN_PROGRESS, our change set executing | CancelUpdateStack (`--cancel` only) |
//! | ROLLBACK_FAILED, DELETE_FAILED, IMPORT_ROLLBACK_FAILED | refused, with the manual remedy |
//! | anything stable | nothing to roll back |
//!
//! The same safety holds as for reconcile: RollbackStack of a failed
//! creation deletes the stack (AWS deletes a stack that never had a stable
//! state), so it is refused for a stack holding protected resources or
//! under termination protection; observe mode writes nothing.

use std::collections::{BTreeMap, BTreeSet};

use crate::cloud::{StackStatus, client_token};
use crate::plan::{BlockedBy, Observed, StackAction, StackPlan};
use crate::spec::{DesiredEnv, DesiredStack, Mode};

/// What the operator asked of `rollback`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// Stack keys; empty: every stack.
    pub stacks: BTreeSet<String>,
    /// By stack key: logical ids to pass as ResourcesToSkip.
    pub skip: BTreeMap<String, Vec<String>>,
    /// Cancel our own update in flight.
    pub cancel: bool,
}

impl Request {
    /// Parses `--skip STACK.LogicalId` values against the environment's
    /// stacks (a nested stack's resource is `STACK.Nested.LogicalId`).
    ///
    /// # Errors
    /// A value without a dot, or naming a stack the environment does not
    /// declare.
    pub fn with_skips(mut self, env: &DesiredEnv, skips: &[String]) -> Result<Request, String> {
        for s in skips {
            let Some((key, id)) = s
                .split_once('.')
                .filter(|(k, id)| !k.is_empty() && !id.is_empty())
            else {
                return Err(format!("--skip {s}: expected STACK.LogicalId"));
            };
            if !env.stacks.contains_key(key) {
                return Err(format!(
                    "--skip {s}: no stack `{key}` in {} (stacks: {})",
                    env.name,
                    env.stacks.keys().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
            if !self.selects(key) {
                return Err(format!(
                    "--skip {s}: stack `{key}` is not among the --stack selected"
                ));
            }
            self.skip
                .entry(key.to_owned())
                .or_default()
                .push(id.to_owned());
        }
        Ok(self)
    }

    /// Whether the stack `key` is among those asked for.
    pub fn selects(&self, key: &str) -> bool {
        self.stacks.is_empty() || self.stacks.contains(key)
    }
}

/// The rollback plan of one stack. `planned` is its ordinary plan (for
/// sync, health and diff, which a rollback does not change).
pub fn recover_one(
    env: &DesiredEnv,
    stack: &DesiredStack,
    observed: &Observed,
    request: &Request,
    planned: StackPlan,
) -> StackPlan {
    let (action, reason) = decide(env, stack, observed, request);
    let mut p = StackPlan {
        action,
        reason,
        ..planned
    };
    if env.policy.mode == Mode::Observe && p.action.mutates() {
        p.reason = format!("{}; observe mode", p.reason);
        p.action = StackAction::Blocked {
            by: BlockedBy::ObserveMode,
            reason: "observe mode".into(),
        };
    }
    p
}

fn decide(
    env: &DesiredEnv,
    stack: &DesiredStack,
    observed: &Observed,
    request: &Request,
) -> (StackAction, String) {
    let blocked = |by, reason: String| {
        (
            StackAction::Blocked {
                by,
                reason: reason.clone(),
            },
            reason,
        )
    };
    if !request.selects(&stack.key) {
        return (StackAction::None, "not selected".into());
    }
    let Some(live) = observed.stacks.get(&stack.name) else {
        return (
            StackAction::None,
            "does not exist: nothing to roll back".into(),
        );
    };
    let why = live.status_reason.as_deref().unwrap_or("no reason given");
    // One token per failed state the stack is in: a retried call is the
    // same request, the next failure a new one.
    let token = |op: &str| {
        let when = live
            .last_updated
            .map(|t| crate::state::unix_ms(t).to_string())
            .unwrap_or_default();
        client_token(&[op, &live.id, live.status.as_str(), why, &when])
    };
    let skips = request.skip.get(&stack.key).cloned().unwrap_or_default();
    if !skips.is_empty() && live.status != StackStatus::UpdateRollbackFailed {
        return blocked(
            BlockedBy::FailedState,
            format!(
                "--skip applies to a stack in UPDATE_ROLLBACK_FAILED; {} is {}",
                stack.key, live.status
            ),
        );
    }
    match &live.status {
        StackStatus::CreateFailed => {
            let live_template = observed.templates.get(&stack.name);
            let protected = crate::policy::holds_protected(&stack.template, &env.policy)
                || live_template.is_some_and(|t| crate::policy::holds_protected(t, &env.policy));
            if protected {
                blocked(
                    BlockedBy::Policy,
                    format!(
                        "creation failed ({why}); rolling it back deletes the stack, which holds protected resources: not done. Fix forward (correct the cause and reconcile), or delete it by hand"
                    ),
                )
            } else if live.termination_protection {
                blocked(
                    BlockedBy::DeletionRefused,
                    format!(
                        "creation failed ({why}); rolling it back deletes the stack, and termination protection is on"
                    ),
                )
            } else {
                (
                    StackAction::RollBack {
                        token: token("rollback-stack"),
                    },
                    format!(
                        "creation failed ({why}): RollbackStack (a stack that never had a stable state is deleted)"
                    ),
                )
            }
        }
        StackStatus::UpdateFailed => (
            StackAction::RollBack {
                token: token("rollback-stack"),
            },
            format!("update failed ({why}): RollbackStack to the last stable state"),
        ),
        StackStatus::UpdateRollbackFailed => {
            // AWS takes only resources in UPDATE_FAILED (a nested stack's
            // resource is reached through its parent's logical id).
            let episode = observed.rollback_episodes.get(&stack.name);
            if let Some(e) = episode {
                let not_failed: Vec<&String> = skips
                    .iter()
                    .filter(|id| {
                        let top = id.split('.').next().unwrap_or(id);
                        !e.failing.iter().any(|f| f == top)
                    })
                    .collect();
                if !not_failed.is_empty() {
                    return blocked(
                        BlockedBy::FailedState,
                        format!(
                            "cannot skip {}: not in UPDATE_FAILED (resources that failed to roll back: {})",
                            not_failed
                                .iter()
                                .map(|s| s.as_str())
                                .collect::<Vec<_>>()
                                .join(", "),
                            if e.failing.is_empty() {
                                "none found in the events".to_owned()
                            } else {
                                e.failing.join(", ")
                            }
                        ),
                    );
                }
            }
            let attempt = episode.map_or(0, |e| e.failures).to_string();
            let began = episode.map_or("", |e| e.began_with.as_str());
            let token = client_token(&[
                "continue-rollback",
                &stack.name,
                began,
                &attempt,
                &skips.join(","),
            ]);
            let also = if skips.is_empty() {
                String::new()
            } else {
                format!(", skipping {}", skips.join(", "))
            };
            (
                StackAction::ContinueRollback { skip: skips, token },
                format!("rollback failed ({why}): ContinueUpdateRollback{also}"),
            )
        }
        StackStatus::UpdateInProgress => {
            let ours = observed
                .executing
                .get(&stack.name)
                .filter(|cs| cs.starts_with(crate::spec::CHANGE_SET_PREFIX));
            match ours {
                Some(cs) if request.cancel => (
                    StackAction::CancelUpdate {
                        token: token(&format!("cancel-update {cs}")),
                    },
                    format!("our update ({cs}) is in flight: CancelUpdateStack, which rolls it back"),
                ),
                Some(cs) => blocked(
                    BlockedBy::InFlight,
                    format!(
                        "our update ({cs}) is in flight; pass --cancel to cancel it and roll it back"
                    ),
                ),
                None => blocked(
                    BlockedBy::InFlight,
                    "an update that is not stackwarden's is in flight: not cancelled (cancel it where it was started)".into(),
                ),
            }
        }
        StackStatus::RollbackFailed => blocked(
            BlockedBy::FailedState,
            format!(
                "ROLLBACK_FAILED ({why}): a failed creation that could not be rolled back has nothing to roll back to. Delete it (`aws cloudformation delete-stack --stack-name {}`, with --retain-resources for what cannot be deleted), then reconcile creates it again",
                stack.name
            ),
        ),
        StackStatus::DeleteFailed => blocked(
            BlockedBy::FailedState,
            format!(
                "DELETE_FAILED ({why}): a deletion cannot be rolled back. Remove what blocks it (see the stack's events), then `aws cloudformation delete-stack --stack-name {}` again (--retain-resources keeps what cannot be deleted)",
                stack.name
            ),
        ),
        s if s.in_progress() => blocked(
            BlockedBy::InFlight,
            format!("{s} in flight: wait for it to end, then roll back what failed"),
        ),
        StackStatus::ImportRollbackFailed | StackStatus::Other(_) => blocked(
            BlockedBy::FailedState,
            format!(
                "{} ({why}): no rollback applies; needs a person",
                live.status
            ),
        ),
        s => (
            StackAction::None,
            format!("{s}: stable, nothing to roll back"),
        ),
    }
}
