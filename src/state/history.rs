//! History entries made from what a pass did.

use std::time::SystemTime;

use super::{EntryKind, HistoryEntry, StackRecord, unix_ms};
use crate::apply::Report;
use crate::git::Checkout;
use crate::spec::DesiredEnv;

/// The entry of a pass (or a rollback) over `env`: the stacks it operated
/// on, with their revision, change set and result. `checkout` is the git
/// commit the desired state was read from.
pub fn of_report(
    kind: EntryKind,
    env: &DesiredEnv,
    report: &Report,
    caller: &str,
    checkout: Option<Checkout>,
    note: Option<String>,
) -> HistoryEntry {
    let stacks: Vec<StackRecord> = report
        .stacks
        .iter()
        .filter(|s| s.wrote())
        .map(|s| StackRecord {
            stack: s.id().to_owned(),
            revision: s
                .key
                .as_ref()
                .and_then(|k| env.stacks.get(k))
                .map(|d| d.revision.clone())
                .unwrap_or_default(),
            change_set: s.change_set.clone(),
            result: s.result.to_string(),
        })
        .collect();
    let services = report
        .services
        .iter()
        .filter(|s| s.wrote())
        .map(|s| StackRecord {
            stack: format!("ecs:{}", s.service.as_deref().unwrap_or("?")),
            revision: env
                .stacks
                .get(&s.stack)
                .map(|d| d.revision.clone())
                .unwrap_or_default(),
            change_set: None,
            result: s.result.describe(),
        });
    let stacks = stacks.into_iter().chain(services).collect::<Vec<_>>();
    HistoryEntry {
        at_ms: unix_ms(SystemTime::now()),
        kind,
        caller: caller.to_owned(),
        revision: Some(env.revision.clone()),
        dirty: checkout.as_ref().is_some_and(|c| c.dirty),
        commit: checkout.map(|c| c.commit),
        verdict: Some(verdict_label(report.verdict())),
        stacks,
        note,
    }
}

/// A pass that ended in an error (after it may have written).
pub fn of_error(
    kind: EntryKind,
    env: &DesiredEnv,
    caller: &str,
    checkout: Option<Checkout>,
    note: String,
) -> HistoryEntry {
    HistoryEntry {
        at_ms: unix_ms(SystemTime::now()),
        kind,
        caller: caller.to_owned(),
        revision: Some(env.revision.clone()),
        dirty: checkout.as_ref().is_some_and(|c| c.dirty),
        commit: checkout.map(|c| c.commit),
        verdict: Some("failed".into()),
        stacks: vec![],
        note: Some(note),
    }
}

/// A reconcile pass, with the commit of the files it read.
pub fn of_pass(
    env: &DesiredEnv,
    report: &Report,
    caller: &str,
    note: Option<String>,
) -> HistoryEntry {
    of_report(
        EntryKind::Pass,
        env,
        report,
        caller,
        crate::git::checkout(&env.sources),
        note,
    )
}

pub fn verdict_label(v: crate::plan::Verdict) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}
