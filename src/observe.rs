//! Observation: what AWS says now about one environment, read as cheaply as
//! the decision allows.
//!
//! The environment's stacks (one DescribeStacks page in a quiet region; by
//! name and by tag in a busy one, never paging through other teams'
//! stacks); GetTemplate
//! only for stable stacks whose revision tag differs from the desired one (or
//! for all of them when a full comparison is asked for); DescribeServices
//! in batches of 10 per cluster.

use std::collections::{BTreeMap, BTreeSet};

use crate::cloud::{ChangeSetStatus, Cloud, CloudError, Stack, StackStatus};
use crate::plan::{Observed, RollbackEpisode, resolve};
use crate::spec::{DesiredEnv, DesiredStack, ENVIRONMENT_TAG, Mode, REVISION_TAG};
use crate::template::Template;

/// How thoroughly to compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Depth {
    /// Trust a matching revision tag: no GetTemplate for stacks that carry
    /// the desired revision.
    Fast,
    /// Fetch and compare every stable stack's template.
    #[default]
    Full,
}

/// Reads the live state of an environment.
///
/// # Errors
/// A cloud error that persisted through retries.
pub async fn observe<C: Cloud>(
    cloud: &C,
    env: &DesiredEnv,
    depth: Depth,
) -> Result<Observed, CloudError> {
    let names: BTreeSet<String> = env.stacks.values().map(|s| s.name.clone()).collect();
    let read_at = cloud.now();
    let stacks = cloud
        .describe_stacks(&names, (ENVIRONMENT_TAG, &env.name))
        .await?;
    let mut observed = Observed {
        stacks,
        stacks_read_at: Some(read_at),
        ..Observed::default()
    };

    let mut wanted: Vec<&str> = env
        .stacks
        .values()
        .filter_map(|d| {
            let live = observed.stacks.get(&d.name)?;
            let stable = !live.in_progress() && live.status != StackStatus::ReviewInProgress;
            let tagged = live.tags.get(REVISION_TAG) == Some(&d.revision);
            (stable && (depth == Depth::Full || !tagged)).then_some(d.name.as_str())
        })
        .collect();
    // An orphan the policy may prune is deleted only after its template is
    // checked for protected resources.
    if env.policy.prune && env.policy.mode == Mode::Converge {
        wanted.extend(
            observed
                .stacks
                .iter()
                .filter(|(name, s)| {
                    !names.contains(*name)
                        && crate::plan::claim(env, s) == Some(crate::plan::Claim::Ours)
                })
                .map(|(name, _)| name.as_str()),
        );
    }
    let bodies =
        futures::future::join_all(wanted.iter().map(|name| cloud.get_template(name))).await;
    for (name, body) in wanted.into_iter().zip(bodies) {
        // A live template that does not parse compares as changed: keep it
        // out of `templates` only if it cannot be read at all.
        let body = body?;
        // Loops over parameters expand with the values the stack was
        // deployed with (a masked NoEcho value is unknown).
        let deployed: BTreeMap<String, Option<String>> = observed
            .stacks
            .get(name)
            .map(|s| {
                s.parameters
                    .iter()
                    .map(|(k, v)| (k.clone(), (v.as_str() != "****").then(|| v.clone())))
                    .collect()
            })
            .unwrap_or_default();
        match Template::parse_with(&body, &deployed) {
            Ok(t) => {
                observed.templates.insert(name.to_owned(), t);
            }
            Err(e) => {
                tracing::warn!(message = "Live template does not parse.", stack = name, error = %e.message)
            }
        }
    }

    for d in env.stacks.values() {
        read_failures(cloud, d, &mut observed).await?;
    }
    crate::detect::read_latest(cloud, env, &mut observed).await;
    observe_services(cloud, env, &mut observed).await?;
    Ok(observed)
}

/// What the stack's own history says when it stopped in a failed state:
/// whether the revision that failed is this one (ROLLBACK_COMPLETE,
/// UPDATE_ROLLBACK_COMPLETE) and what its stuck rollback did
/// (UPDATE_ROLLBACK_FAILED). Costs calls only for stacks in those states;
/// a pass calls it for the one stack it is about to act on.
///
/// # Errors
/// A cloud error that persisted through retries.
pub async fn read_failures<C: Cloud>(
    cloud: &C,
    stack: &DesiredStack,
    observed: &mut Observed,
) -> Result<(), CloudError> {
    let live = observed.stacks.get(&stack.name);
    match failed_revision(cloud, stack, live).await? {
        Some(r) => observed.failed_revisions.insert(stack.name.clone(), r),
        None => observed.failed_revisions.remove(&stack.name),
    };
    match rollback_episode(cloud, stack, live).await? {
        Some(e) => observed.rollback_episodes.insert(stack.name.clone(), e),
        None => observed.rollback_episodes.remove(&stack.name),
    };
    Ok(())
}

/// For a declared stack stuck in UPDATE_ROLLBACK_FAILED, what the events of
/// its latest operation say: how many times the rollback failed (a
/// continued rollback that failed again adds one) and which resources
/// failed last.
async fn rollback_episode<C: Cloud>(
    cloud: &C,
    d: &DesiredStack,
    live: Option<&Stack>,
) -> Result<Option<RollbackEpisode>, CloudError> {
    if live.map(|s| &s.status) != Some(&StackStatus::UpdateRollbackFailed) {
        return Ok(None);
    }
    let events = cloud.operation_events(&d.name).await?;
    let stack_level = |e: &crate::cloud::StackEvent| e.is_stack_level(&d.name);
    let failures = events
        .iter()
        .filter(|e| stack_level(e) && e.status == "UPDATE_ROLLBACK_FAILED")
        .count();
    // The latest attempt begins at the last UPDATE_ROLLBACK_IN_PROGRESS.
    let last = events
        .iter()
        .rposition(|e| stack_level(e) && e.status == "UPDATE_ROLLBACK_IN_PROGRESS")
        .unwrap_or(0);
    let mut failing: Vec<String> = events[last..]
        .iter()
        .filter(|e| !stack_level(e) && e.status == "UPDATE_FAILED")
        .map(|e| e.logical_id.clone())
        .collect();
    failing.sort();
    failing.dedup();
    let began_with = events.first().map(|e| e.id.clone()).unwrap_or_default();
    Ok(Some(RollbackEpisode {
        failures,
        failing,
        began_with,
    }))
}

/// The desired revision, when the stack's operation to it was executed by
/// stackwarden and rolled back: its status says rolled back and its
/// executed change set is this revision's.
async fn failed_revision<C: Cloud>(
    cloud: &C,
    d: &DesiredStack,
    live: Option<&Stack>,
) -> Result<Option<String>, CloudError> {
    let Some(live) = live else {
        return Ok(None);
    };
    if !matches!(
        live.status,
        StackStatus::RollbackComplete | StackStatus::UpdateRollbackComplete
    ) {
        return Ok(None);
    }
    let ours = d.change_set_name();
    let sets = cloud.list_change_sets(&d.name).await?;
    if !sets.iter().any(|cs| cs.name == ours) {
        return Ok(None);
    }
    match cloud.describe_change_set(&d.name, &ours).await {
        Ok(cs)
            if matches!(
                cs.status,
                ChangeSetStatus::Executed | ChangeSetStatus::Failed(_)
            ) =>
        {
            Ok(Some(d.revision.clone()))
        }
        Ok(_) | Err(CloudError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Describes the ECS services the environment declares whose names are
/// known (their stacks' outputs exist), in batches of 10 per cluster.
///
/// # Errors
/// A cloud error that persisted through retries.
pub async fn observe_services<C: Cloud>(
    cloud: &C,
    env: &DesiredEnv,
    observed: &mut Observed,
) -> Result<(), CloudError> {
    let mut by_cluster: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for stack in env.stacks.values() {
        for svc in &stack.ecs_services {
            if let (Ok(c), Ok(s)) = (
                resolve(&svc.cluster, env, observed),
                resolve(&svc.service, env, observed),
            ) {
                by_cluster.entry(c).or_default().insert(s);
            }
        }
    }
    observed.services.clear();
    for (cluster, services) in by_cluster {
        let services: Vec<String> = services.into_iter().collect();
        match cloud.describe_services(&cluster, &services).await {
            Ok(found) => {
                for s in found {
                    observed
                        .services
                        .insert((cluster.clone(), s.name.clone()), s);
                }
            }
            // The cluster is gone or not created yet: its services are missing.
            Err(CloudError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    observed.failed_redeploys = failed_redeploys(cloud, env, observed).await;
    Ok(())
}

/// The (stack revision, task definition) pairs whose ECS redeploy ended
/// without that task definition running, from ECS's own deployment
/// history, so a restarted controller remembers them as it remembers failed
/// stack revisions. Asked only for a settled service that runs another task
/// definition than its stack declares (a redeploy is about to be planned),
/// and only about deployments made since the stack's last update (its
/// revision). History that cannot be read (the API is denied, or the
/// emulator lacks it) is logged and read as none: the pass still works,
/// with only this process's memory against a redeploy loop.
async fn failed_redeploys<C: Cloud>(
    cloud: &C,
    env: &DesiredEnv,
    observed: &Observed,
) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for stack in env.stacks.values() {
        let Some(live_stack) = observed.stacks.get(&stack.name) else {
            continue;
        };
        for svc in &stack.ecs_services {
            let (Ok(cluster), Ok(service)) = (
                resolve(&svc.cluster, env, observed),
                resolve(&svc.service, env, observed),
            ) else {
                continue;
            };
            let Some(live) = observed.services.get(&(cluster.clone(), service.clone())) else {
                continue;
            };
            // Only where the plan would redeploy: a settled service that
            // runs another task definition than its stack declares.
            let Some(expected) = crate::plan::redeploy_target(svc, env, observed, live) else {
                continue;
            };
            if live.deploying() {
                continue;
            }
            let since = live_stack
                .last_updated
                .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
            match cloud.failed_deployments(&cluster, &service, since).await {
                Ok(failed) => {
                    if let Some(f) = failed.iter().find(|f| f.task_definition == expected) {
                        tracing::info!(message = "A redeploy of this revision ended without running it.", environment = %env.name, service, task_definition = %expected, status = %f.status, reason = f.reason.as_deref().unwrap_or(""));
                        out.insert((stack.revision.clone(), expected));
                    }
                }
                Err(e) => {
                    tracing::warn!(message = "Cannot read the ECS deployment history; only this process remembers failed redeploys.", environment = %env.name, service, error = %e);
                }
            }
        }
    }
    out
}
