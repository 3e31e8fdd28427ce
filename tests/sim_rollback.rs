//! `stackwarden rollback`'s engine (the recovery intent) on the simulated
//! cloud: each failed state gets the call AWS documents for it, or a
//! refusal with the remedy; and a suspension writes nothing.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;

use common::{Workspace, dev_new_revision, sim_cloud, sim_pass};
use stackwarden::apply::{Gate, Intent, Options, Report, StackResult};
use stackwarden::cloud::sim::SimCloud;
use stackwarden::cloud::{Retrying, StackStatus};
use stackwarden::plan::{BlockedBy, Verdict};
use stackwarden::recovery::Request;
use stackwarden::spec::{self, DesiredEnv};
use stackwarden::state::{Backend, MemoryStore, State, Suspension};

fn dev() -> DesiredEnv {
    spec::load(&Workspace::new().path("desired-state/dev.yaml")).expect("dev loads")
}

async fn converge(cloud: &Retrying<SimCloud>, env: &DesiredEnv) -> Report {
    sim_pass(cloud, env, Options::default()).await
}

/// `stackwarden rollback -e dev [--stack KEY] [--skip ...] [--cancel]`.
async fn rollback(
    cloud: &Retrying<SimCloud>,
    env: &DesiredEnv,
    stacks: &[&str],
    skips: &[&str],
    cancel: bool,
) -> Report {
    let request = Request {
        stacks: stacks
            .iter()
            .map(|s| (*s).to_owned())
            .collect::<BTreeSet<_>>(),
        cancel,
        ..Request::default()
    }
    .with_skips(
        env,
        &skips.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
    )
    .expect("valid skips");
    sim_pass(
        cloud,
        env,
        Options {
            intent: Intent::Recover(request),
            ..Options::default()
        },
    )
    .await
}

fn result<'r>(r: &'r Report, key: &str) -> &'r StackResult {
    &r.stacks
        .iter()
        .find(|s| s.is(key))
        .unwrap_or_else(|| panic!("{key} reported"))
        .result
}

fn calls(cloud: &Retrying<SimCloud>, op: &str) -> u64 {
    cloud.calls().get(op).copied().unwrap_or(0)
}

fn status(cloud: &Retrying<SimCloud>, env: &DesiredEnv, key: &str) -> Option<StackStatus> {
    cloud.stack(&env.stacks[key].name).map(|s| s.status)
}

#[tokio::test(start_paused = true)]
async fn update_failed_is_rolled_back_to_its_last_stable_state_once() {
    let env = dev();
    let cloud = sim_cloud(&env, 1);
    let created = converge(&cloud, &env).await;
    let svc = &created.services[0];
    let (cluster, service) = (svc.cluster.clone().unwrap(), svc.service.clone().unwrap());
    cloud.force_status(
        &env.stacks["network"].name,
        "UPDATE_FAILED",
        "Resource Vpc failed: rate exceeded",
    );
    // Services are not a rollback's business.
    cloud.edit_desired_count(&cluster, &service, 5);
    let r = rollback(&cloud, &env, &["network"], &[], false).await;
    assert_eq!(result(&r, "network"), &StackResult::RolledBack, "{r:#?}");
    assert_eq!(
        status(&cloud, &env, "network"),
        Some(StackStatus::UpdateRollbackComplete)
    );
    assert_eq!(calls(&cloud, "RollbackStack"), 1);
    assert_eq!(calls(&cloud, "UpdateService"), 0, "{r:#?}");
    assert!(r.services.is_empty());
    // The others were not selected, and nothing else was written.
    assert_eq!(result(&r, "msk"), &StackResult::InSync, "{r:#?}");
    assert_eq!(r.changed(), 1);

    // Stable now: nothing to roll back.
    let again = rollback(&cloud, &env, &[], &[], false).await;
    assert_eq!(again.changed(), 0, "{again:#?}");
    assert_eq!(calls(&cloud, "RollbackStack"), 1);
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());
}

#[tokio::test(start_paused = true)]
async fn a_failed_creation_is_rolled_back_by_deleting_it_unless_it_holds_protected_resources() {
    let env = dev();
    let cloud = sim_cloud(&env, 2);
    converge(&cloud, &env).await;
    cloud.force_status(&env.stacks["iam"].name, "CREATE_FAILED", "Role failed");
    cloud.force_status(
        &env.stacks["dynamodb"].name,
        "CREATE_FAILED",
        "Table failed",
    );
    let r = rollback(&cloud, &env, &[], &[], false).await;
    // AWS deletes a stack that never had a stable state.
    assert_eq!(result(&r, "iam"), &StackResult::RolledBack, "{r:#?}");
    assert_eq!(status(&cloud, &env, "iam"), None);
    assert!(
        matches!(result(&r, "dynamodb"), StackResult::Blocked { by: BlockedBy::Policy, reason } if reason.contains("protected")),
        "{r:#?}"
    );
    assert_eq!(
        status(&cloud, &env, "dynamodb"),
        Some(StackStatus::CreateFailed)
    );
    assert_eq!(calls(&cloud, "RollbackStack"), 1, "only iam");
    // What remains is reported: the failed table stack, the missing iam.
    assert_eq!(r.verdict(), Verdict::Failed);
}

#[tokio::test(start_paused = true)]
async fn update_rollback_failed_is_continued_and_skips_only_what_failed() {
    let env = dev();
    let cloud = sim_cloud(&env, 3);
    converge(&cloud, &env).await;
    let network = env.stacks["network"].name.clone();
    cloud.fail_update_rollback(&network, &["FlowLogGroup"]);

    // Without the skip, continuing fails again on the same resource.
    let r = rollback(&cloud, &env, &["network"], &[], false).await;
    assert!(
        matches!(result(&r, "network"), StackResult::Failed { reason } if reason.contains("UPDATE_ROLLBACK_FAILED")),
        "{r:#?}"
    );
    assert_eq!(calls(&cloud, "ContinueUpdateRollback"), 1);

    // A skip of a resource that did not fail is refused before any call.
    let r = rollback(&cloud, &env, &["network"], &["network.Vpc"], false).await;
    assert!(
        matches!(result(&r, "network"), StackResult::Blocked { by: BlockedBy::FailedState, reason } if reason.contains("cannot skip Vpc") && reason.contains("FlowLogGroup")),
        "{r:#?}"
    );
    assert_eq!(calls(&cloud, "ContinueUpdateRollback"), 1);

    // Skipping it: continued to UPDATE_ROLLBACK_COMPLETE.
    let r = rollback(&cloud, &env, &["network"], &["network.FlowLogGroup"], false).await;
    assert_eq!(
        result(&r, "network"),
        &StackResult::RollbackContinued,
        "{r:#?}"
    );
    assert_eq!(
        status(&cloud, &env, "network"),
        Some(StackStatus::UpdateRollbackComplete)
    );
    assert_eq!(calls(&cloud, "ContinueUpdateRollback"), 2);
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());
}

#[tokio::test(start_paused = true)]
async fn rollback_failed_and_delete_failed_are_refused_with_the_manual_remedy() {
    let env = dev();
    let cloud = sim_cloud(&env, 4);
    converge(&cloud, &env).await;
    cloud.force_status(&env.stacks["iam"].name, "ROLLBACK_FAILED", "Role stuck");
    cloud.force_status(&env.stacks["alb"].name, "DELETE_FAILED", "Bucket not empty");
    let writes = cloud.write_calls();
    let r = rollback(&cloud, &env, &[], &[], false).await;
    for (key, remedy) in [("iam", "delete-stack"), ("alb", "--retain-resources")] {
        assert!(
            matches!(result(&r, key), StackResult::Blocked { by: BlockedBy::FailedState, reason } if reason.contains(remedy)),
            "{key}: {r:#?}"
        );
    }
    assert_eq!(cloud.write_calls(), writes, "nothing is written");
    // --skip on a stack that is not stuck in a rollback is refused too.
    let r = rollback(&cloud, &env, &["msk"], &["msk.Cluster"], false).await;
    assert!(
        matches!(result(&r, "msk"), StackResult::Blocked { reason, .. } if reason.contains("UPDATE_ROLLBACK_FAILED")),
        "{r:#?}"
    );
    assert_eq!(cloud.write_calls(), writes);
}

#[tokio::test(start_paused = true)]
async fn our_update_in_flight_is_cancelled_only_with_cancel_and_never_someone_elses() {
    let env = dev();
    let cloud = sim_cloud(&env, 5);
    converge(&cloud, &env).await;
    // A new revision; the pass is cut off while network's update runs.
    let next = dev_new_revision();
    let cut = tokio::time::timeout(Duration::from_secs(60), converge(&cloud, &next)).await;
    assert!(cut.is_err(), "the pass ended within a minute");
    assert_eq!(
        status(&cloud, &env, "network"),
        Some(StackStatus::UpdateInProgress)
    );

    let r = rollback(&cloud, &next, &["network"], &[], false).await;
    assert!(
        matches!(result(&r, "network"), StackResult::Blocked { by: BlockedBy::InFlight, reason } if reason.contains("--cancel")),
        "{r:#?}"
    );
    assert_eq!(calls(&cloud, "CancelUpdateStack"), 0);

    let r = rollback(&cloud, &next, &["network"], &[], true).await;
    assert_eq!(
        result(&r, "network"),
        &StackResult::UpdateCancelled,
        "{r:#?}"
    );
    assert_eq!(
        status(&cloud, &env, "network"),
        Some(StackStatus::UpdateRollbackComplete)
    );
    assert_eq!(calls(&cloud, "CancelUpdateStack"), 1);

    // Someone else's update is theirs to cancel.
    let iam = env.stacks["iam"].name.clone();
    cloud.start_foreign_update(&iam, Duration::from_secs(3600));
    let r = rollback(&cloud, &next, &["iam"], &[], true).await;
    assert!(
        matches!(result(&r, "iam"), StackResult::Blocked { by: BlockedBy::InFlight, reason } if reason.contains("not stackwarden's")),
        "{r:#?}"
    );
    assert_eq!(calls(&cloud, "CancelUpdateStack"), 1);
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());
}

#[tokio::test(start_paused = true)]
async fn a_suspended_environment_is_planned_and_reported_but_never_written() {
    let env = dev();
    let cloud = sim_cloud(&env, 6);
    converge(&cloud, &env).await;
    cloud.edit_parameter(&env.stacks["network"].name, "FlowLogRetentionDays", "90");
    let writes = cloud.write_calls();
    let suspension = Suspension {
        by: "arn:aws:iam::123456789012:user/oncall".into(),
        since: 1_767_225_600,
        reason: "rolled back to v1 (abc)".into(),
    };
    let r = sim_pass(
        &cloud,
        &env,
        Options {
            suspension: Some(suspension.clone()),
            ..Options::default()
        },
    )
    .await;
    assert_eq!(cloud.write_calls(), writes, "a suspended pass wrote");
    assert_eq!(r.verdict(), Verdict::Differences);
    assert!(
        matches!(result(&r, "network"), StackResult::Blocked { by: BlockedBy::Suspended, reason } if reason.contains("rolled back to v1")),
        "{r:#?}"
    );
    assert_eq!(r.final_plan.suspended, Some(suspension.clone()));

    // A rollback is the operator's own act: it is not held by the suspension.
    cloud.force_status(&env.stacks["network"].name, "UPDATE_FAILED", "failed");
    let request = Request {
        stacks: BTreeSet::from(["network".to_owned()]),
        ..Request::default()
    };
    let r = sim_pass(
        &cloud,
        &env,
        Options {
            intent: Intent::Recover(request),
            suspension: Some(suspension),
            ..Options::default()
        },
    )
    .await;
    assert_eq!(result(&r, "network"), &StackResult::RolledBack, "{r:#?}");
}

/// Says "suspended" once the cloud has executed more than `after` change
/// sets: someone suspends the environment while the pass runs.
struct SuspendedAfter {
    cloud: Retrying<SimCloud>,
    after: u64,
    asked: AtomicUsize,
}

impl Gate for SuspendedAfter {
    fn check(&self) -> BoxFuture<'_, Result<Option<String>, String>> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        let suspended = calls(&self.cloud, "ExecuteChangeSet") > self.after;
        Box::pin(async move { Ok(suspended.then(|| "suspended by oncall: incident".to_owned())) })
    }
}

#[tokio::test(start_paused = true)]
async fn a_suspension_made_during_a_pass_stops_it_at_its_next_write() {
    let env = dev();
    let cloud = sim_cloud(&env, 7);
    converge(&cloud, &env).await;
    let next = dev_new_revision();
    let executed = calls(&cloud, "ExecuteChangeSet");
    // Suspended right after network's change set was executed.
    let gate = Arc::new(SuspendedAfter {
        cloud: cloud.clone(),
        after: executed,
        asked: AtomicUsize::new(0),
    });
    let r = sim_pass(
        &cloud,
        &next,
        Options {
            gate: Some(gate.clone()),
            ..Options::default()
        },
    )
    .await;
    assert!(gate.asked.load(Ordering::SeqCst) >= 2);
    // The first stack of the first wave (dynamodb and network run
    // together) was executed; the other was stopped at its next write, and
    // nothing was executed after the suspension.
    assert_eq!(calls(&cloud, "ExecuteChangeSet"), executed + 1);
    let updated: Vec<&str> = r
        .stacks
        .iter()
        .filter(|s| s.result == StackResult::Updated)
        .map(|s| s.id())
        .collect();
    assert_eq!(updated.len(), 1, "{r:#?}");
    let stopped = r
        .stacks
        .iter()
        .filter(|s| matches!(&s.result, StackResult::Blocked { by: BlockedBy::Suspended, reason } if reason.contains("incident")))
        .count();
    assert!(stopped >= 1, "{r:#?}");
    assert!(
        r.stacks.iter().all(|s| matches!(
            s.result,
            StackResult::Updated | StackResult::Blocked { .. } | StackResult::Skipped { .. }
        )),
        "{r:#?}"
    );
    assert_eq!(r.verdict(), Verdict::Differences);
}

#[tokio::test]
async fn two_writers_racing_on_the_state_table_lose_no_update() {
    let state = State::new(Backend::Memory(MemoryStore::default()));
    common::races::one_suspension_of_ten_is_made(&state).await;
    common::races::no_episode_of_eight_writers_is_lost(&state).await;
}
