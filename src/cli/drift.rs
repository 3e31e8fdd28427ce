//! `stackwarden drift`: detect resource drift now and show it.

use std::collections::BTreeSet;
use std::time::Duration;

use super::{Format, Outcome, Select, load_selected};
use crate::cloud::Retrying;
use crate::cloud::aws::AwsCloud;
use crate::detect::{Detected, detect_env};

pub(super) struct DriftArgs<'a> {
    pub select: &'a Select,
    pub stacks: &'a [String],
    pub max_detections: usize,
    pub wait: Duration,
}

/// Detects every selected stack's drift (at most `max_detections` at once
/// per account and region, all within `wait`) and prints it. Exit 0 no
/// drift, 2 drift found, 1 an error or a detection that failed.
pub(super) async fn run(args: DriftArgs<'_>) -> anyhow::Result<Outcome> {
    let (envs, load_failed) = load_selected(args.select)?;
    let mut outcome = if load_failed {
        Outcome::Failed
    } else {
        Outcome::InSync
    };
    let wanted: BTreeSet<&String> = args.stacks.iter().collect();
    for k in &wanted {
        if !envs.iter().any(|e| e.stacks.contains_key(*k)) {
            anyhow::bail!("no selected environment has a stack `{k}`");
        }
    }
    let limits = crate::apply::Limits::new(1).with_detections(args.max_detections);
    // One bound for the whole run, whatever the environments.
    let deadline = crate::retry::instant_after(args.wait);
    let mut json = Vec::new();
    for env in &envs {
        let cloud = Retrying::new(AwsCloud::connect(&env.region, env.assume_role.as_ref()).await);
        let keys: Vec<String> = env
            .order()
            .map(|s| s.key.clone())
            .filter(|k| wanted.is_empty() || wanted.contains(k))
            .collect();
        let found = detect_env(&cloud, env, &keys, &limits.detections_of(env), deadline).await;
        for d in found.values() {
            outcome = outcome.worst(match d {
                Detected::Done { drift } if drift.detection_failed.is_some() => Outcome::Failed,
                Detected::Done { drift } if drift.drifted() => Outcome::Differences,
                Detected::Done { .. } => Outcome::InSync,
                // Not checked (missing, in progress, failed): its drift is
                // unknown, which is not "no drift".
                Detected::Failed { .. } | Detected::Skipped { .. } => Outcome::Failed,
            });
        }
        match args.select.output {
            Format::Json => json.push(serde_json::json!({
                "environment": env.name,
                "region": env.region,
                "stacks": keys.iter().map(|k| serde_json::json!({
                    "stack": k,
                    "name": env.stacks[k].name,
                    "mode": env.stacks[k].drift.mode,
                    "detection": found[k],
                })).collect::<Vec<_>>(),
            })),
            Format::Text => {
                println!("{} ({}): drift", env.name, env.region);
                for k in &keys {
                    print_stack(k, &env.stacks[k].drift.mode, &found[k]);
                }
            }
        }
    }
    if args.select.output == Format::Json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    }
    Ok(outcome)
}

fn print_stack(key: &str, mode: &crate::drift::DriftMode, d: &Detected) {
    match d {
        Detected::Skipped { reason } => println!("  {key}: not checked: {reason}"),
        Detected::Failed { reason } => println!("  {key}: detection failed: {reason}"),
        Detected::Done { drift } => {
            let mode = match mode {
                crate::drift::DriftMode::Alert => "alert",
                crate::drift::DriftMode::Revert => "revert",
            };
            println!(
                "  {key}: {} (mode {mode})",
                if drift.drifted() {
                    "DRIFTED"
                } else {
                    "IN_SYNC"
                }
            );
            if let Some(why) = &drift.detection_failed {
                println!("    detection failed, results partial: {why}");
            }
            for r in &drift.resources {
                println!(
                    "    {} ({}): {}",
                    r.logical_id,
                    r.resource_type,
                    r.status.as_str()
                );
                for diff in &r.differences {
                    let note = diff
                        .unrevertable
                        .as_ref()
                        .map_or(String::new(), |w| format!(" [not revertible: {w}]"));
                    println!("      {}{note}", diff.describe());
                }
            }
            if !drift.ignored.is_empty() {
                println!("    ignored: {}", drift.ignored.join(", "));
            }
            if !drift.not_checked.is_empty() {
                println!("    not checked: {}", drift.not_checked.join(", "));
            }
        }
    }
}
