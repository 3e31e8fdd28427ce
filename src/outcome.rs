//! The outcome of each object (stack, ECS service) of a pass, computed once
//! from its report: what the pass did to it, joined with the final plan by
//! identity. Alerts, metrics and `/status` all read these, so they never
//! disagree about an object (and none re-derives it from list positions or
//! reason texts).

use crate::apply::{Report, ServiceResult, StackResult};
use crate::plan::{BlockedBy, Health, ServiceAction, StackAction, Sync};

/// Where an object stands after a pass, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(tag = "condition", content = "by", rename_all = "snake_case")]
pub enum Condition {
    /// An operation failed, or the object is stuck failed.
    Failed,
    /// A needed change may not run.
    Blocked(BlockedBy),
    /// Working on an older state (rolled back, fewer tasks, failed rollout).
    Degraded,
    /// Differs from the desired state (or is missing, orphaned, in flight).
    Drift,
    /// In sync and healthy.
    Clean,
}

/// What kind of object an outcome is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    Stack,
    Service,
}

/// One object's outcome.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Outcome {
    /// `stack:<key>` (an orphan: `stack:<name>`) or `ecs:<service>`.
    pub object: String,
    pub kind: ObjectKind,
    /// The stack's key (an orphan's name), or the service's name (its
    /// stack's key while the name is not known).
    pub id: String,
    #[serde(flatten)]
    pub condition: Condition,
    pub sync: Sync,
    pub health: Health,
    /// Why: the failure or block of the pass, else the final plan's reason.
    pub reason: String,
}

/// The outcomes of a pass: its stacks in plan order, then its services.
pub fn outcomes(report: &Report) -> Vec<Outcome> {
    let mut out = Vec::new();
    for s in &report.final_plan.stacks {
        let result = report
            .stacks
            .iter()
            .find(|r| r.key == s.key && r.name == s.name)
            .map(|r| &r.result);
        let (condition, reason) = match (result, &s.action) {
            (Some(r), _) if r.failed() => (Condition::Failed, r.detail().unwrap_or_default()),
            _ if s.health == Health::Failed => (Condition::Failed, s.reason.clone()),
            (Some(StackResult::Blocked { by, reason }), _) => {
                (Condition::Blocked(*by), reason.clone())
            }
            (_, StackAction::Blocked { by, .. }) => (Condition::Blocked(*by), s.reason.clone()),
            _ => (
                settled(s.sync, s.health, s.action == StackAction::None),
                s.reason.clone(),
            ),
        };
        out.push(Outcome {
            object: format!("stack:{}", s.id()),
            kind: ObjectKind::Stack,
            id: s.id().to_owned(),
            condition,
            sync: s.sync,
            health: s.health,
            reason,
        });
    }
    for s in &report.final_plan.services {
        let result = report
            .services
            .iter()
            .find(|r| r.stack == s.stack && r.cluster == s.cluster && r.service == s.service)
            .map(|r| &r.result);
        let (condition, reason) = match (result, &s.action) {
            (Some(ServiceResult::Failed { reason }), _) => (Condition::Failed, reason.clone()),
            _ if s.health == Health::Failed => (Condition::Failed, s.reason.clone()),
            (Some(ServiceResult::Blocked { by, reason }), _) => {
                (Condition::Blocked(*by), reason.clone())
            }
            (_, ServiceAction::Blocked { by, .. }) => (Condition::Blocked(*by), s.reason.clone()),
            _ => (
                settled(s.sync, s.health, s.action == ServiceAction::None),
                s.reason.clone(),
            ),
        };
        let id = s.service.as_deref().unwrap_or(&s.stack);
        out.push(Outcome {
            object: format!("ecs:{id}"),
            kind: ObjectKind::Service,
            id: id.to_owned(),
            condition,
            sync: s.sync,
            health: s.health,
            reason,
        });
    }
    out
}

/// The condition of an object that neither failed nor is blocked.
fn settled(sync: Sync, health: Health, idle: bool) -> Condition {
    match (health, sync) {
        (Health::Degraded, _) => Condition::Degraded,
        (Health::Healthy, Sync::InSync) if idle => Condition::Clean,
        _ => Condition::Drift,
    }
}
