//! Resource drift on the simulated cloud, on tokio's paused clock: a
//! detection takes its time, may fail with partial results or be
//! throttled; ignore rules; revert mode writes back what a drift-aware
//! change set can, under the policy, and never loops on what it cannot;
//! an alert per drift episode.

mod common;

use std::time::Duration;

use common::{Workspace, sim_cloud, sim_pass};
use stackwarden::apply::{Options, Report, StackReport, StackResult};
use stackwarden::cloud::sim::{SimCloud, SimConfig};
use stackwarden::cloud::{Cloud, DriftStatus, Retrying};
use stackwarden::detect::{Detected, Detections, detect_env, detect_stack};
use stackwarden::drift::{DriftMode, Ignore};
use stackwarden::notify::{Episodes, findings};
use stackwarden::plan::{BlockedBy, StackAction, StackPlan, Verdict};
use stackwarden::spec::{self, DesiredEnv};
use tokio::time::Instant;

const TABLES: &str = "dev-performance-mgmt-dynamodb";
const CLUSTER: &str = "dev-performance-mgmt-ecs-cluster";

fn load(ws: &Workspace) -> DesiredEnv {
    spec::load(&ws.path("desired-state/dev.yaml")).expect("dev loads")
}

async fn detect(cloud: &Retrying<SimCloud>, env: &DesiredEnv, key: &str) -> Detected {
    detect_stack(
        cloud,
        &env.stacks[key],
        &Detections::new(2),
        Instant::now() + Duration::from_secs(300),
    )
    .await
}

fn result_of<'r>(report: &'r Report, key: &str) -> &'r StackReport {
    report.stacks.iter().find(|r| r.is(key)).expect("reported")
}

fn plan_of<'r>(report: &'r Report, key: &str) -> &'r StackPlan {
    report
        .final_plan
        .stacks
        .iter()
        .find(|p| p.is(key))
        .expect("planned")
}

/// The reason of a stack blocked by the policy.
fn blocked_by_policy(r: &StackReport) -> &str {
    match &r.result {
        StackResult::Blocked {
            by: BlockedBy::Policy,
            reason,
        } => reason,
        other => panic!("not blocked by the policy: {other:?}"),
    }
}

fn drift_of(d: &Detected) -> &stackwarden::drift::StackDrift {
    match d {
        Detected::Done { drift } => drift,
        other => panic!("no drift read: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_detection_takes_its_time_may_fail_partially_and_rides_out_throttling() {
    let env = load(&Workspace::new());
    let cloud = sim_cloud(&env, 0);
    let report = sim_pass(&cloud, &env, Options::default()).await;
    assert_eq!(report.verdict(), Verdict::InSync);
    let sim = cloud.inner();
    sim.edit_out_of_band(TABLES, "ReviewCyclesTable", "/BillingMode", "PROVISIONED");

    // Until a detection ran, nothing is known and DescribeStacks says so.
    let live = cloud.describe_stack(TABLES).await.unwrap().unwrap();
    assert_eq!(live.drift.status, DriftStatus::NotChecked);
    let started = Instant::now();
    let d = detect(&cloud, &env, "dynamodb").await;
    assert!(started.elapsed() >= SimConfig::default().drift_detection_latency);
    let drift = drift_of(&d);
    assert_eq!(drift.status, DriftStatus::Drifted);
    assert_eq!(
        drift.lines(),
        [
            "ReviewCyclesTable (AWS::DynamoDB::Table) /BillingMode: expected PAY_PER_REQUEST, actual PROVISIONED"
        ]
    );
    assert!(drift.detection_failed.is_none());
    let live = cloud.describe_stack(TABLES).await.unwrap().unwrap();
    assert_eq!(live.drift.status, DriftStatus::Drifted);
    assert!(live.drift.last_check.is_some());

    // A failed detection is reported as such, with what it could check.
    sim.fail_next_detection(TABLES, "Rate exceeded reading AWS::DynamoDB::Table");
    let d = detect(&cloud, &env, "dynamodb").await;
    assert!(d.failed());
    assert!(
        drift_of(&d)
            .detection_failed
            .as_deref()
            .unwrap()
            .contains("Rate exceeded")
    );
    assert!(!drift_of(&d).not_checked.is_empty());

    // Throttled calls are retried; bounded detections all end.
    sim.set_throttle_rate(0.3);
    let keys: Vec<String> = env.stacks.keys().cloned().collect();
    let found = detect_env(
        &cloud,
        &env,
        &keys,
        &Detections::new(2),
        Instant::now() + Duration::from_secs(900),
    )
    .await;
    sim.set_throttle_rate(0.0);
    assert_eq!(found.len(), keys.len());
    assert!(
        found.values().all(|d| matches!(d, Detected::Done { .. })),
        "{found:?}"
    );
    assert!(cloud.throttles() > 0);
    assert!(drift_of(&found["dynamodb"]).drifted());
    assert!(!drift_of(&found["network"]).drifted());
    // Never two detections of a stack at once.
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
}

#[tokio::test(start_paused = true)]
async fn revert_writes_back_what_it_can_and_never_loops_on_create_only_drift() {
    let mut env = load(&Workspace::new());
    let cloud = sim_cloud(&env, 0);
    sim_pass(&cloud, &env, Options::default()).await;
    let sim = cloud.inner();
    sim.edit_out_of_band(TABLES, "ReviewCyclesTable", "/BillingMode", "PROVISIONED");
    sim.edit_out_of_band(TABLES, "ReviewCyclesTable", "/TableName", "renamed-by-hand");
    sim.edit_out_of_band(CLUSTER, "TaskLogGroup", "/RetentionInDays", "3");
    env.stacks.get_mut("dynamodb").unwrap().drift.mode = DriftMode::Revert;
    // The cluster's log retention is someone else's to set.
    env.stacks.get_mut("ecs-cluster").unwrap().drift.ignore =
        vec![Ignore::parse("TaskLogGroup.RetentionInDays").unwrap()];
    let keys: Vec<String> = env.stacks.keys().cloned().collect();
    detect_env(
        &cloud,
        &env,
        &keys,
        &Detections::new(2),
        Instant::now() + Duration::from_secs(900),
    )
    .await;

    let options = Options::default();
    let report = sim_pass(&cloud, &env, options.clone()).await;
    let tables = result_of(&report, "dynamodb");
    assert_eq!(tables.result, StackResult::Updated, "{tables:?}");
    assert!(
        tables
            .change_set
            .as_deref()
            .unwrap()
            .ends_with("-revert-drift")
    );
    // What stays is the create-only table name, reported, not reverted.
    assert_eq!(
        sim.live_edits(TABLES, "ReviewCyclesTable")
            .keys()
            .collect::<Vec<_>>(),
        ["/TableName"]
    );
    let after = drift_of(tables.drift_after.as_ref().unwrap());
    assert_eq!(after.revertible().count(), 0);
    assert_eq!(after.each().count(), 1);
    assert!(after.lines()[0].contains("not revertible: create-only"));
    // Ignored drift is not drift.
    let cluster = plan_of(&report, "ecs-cluster");
    assert!(!cluster.drift.as_ref().unwrap().drifted());
    assert_eq!(
        cluster.drift.as_ref().unwrap().ignored,
        ["TaskLogGroup /RetentionInDays"]
    );

    // The next passes report it and write nothing.
    for _ in 0..2 {
        let again = sim_pass(&cloud, &env, options.clone()).await;
        assert!(!again.wrote(), "{:?}", again.stacks);
        assert_eq!(again.verdict(), Verdict::Differences);
        let p = plan_of(&again, "dynamodb");
        assert_eq!(p.action, StackAction::None);
        assert!(p.reason.contains("nothing revertible"), "{}", p.reason);
    }
}

#[tokio::test(start_paused = true)]
async fn a_revert_combined_with_a_change_that_replaces_a_protected_table_is_blocked() {
    let ws = Workspace::new();
    let env = load(&ws);
    let cloud = sim_cloud(&env, 0);
    sim_pass(&cloud, &env, Options::default()).await;
    let sim = cloud.inner();
    sim.edit_out_of_band(TABLES, "ReviewCyclesTable", "/BillingMode", "PROVISIONED");
    // The desired state now also changes the table's key: a replacement.
    ws.edit(
        "templates/dynamodb.yaml",
        "        - {AttributeName: cycleId, KeyType: HASH}",
        "        - {AttributeName: organizationId, KeyType: HASH}",
    );
    let mut env = load(&ws);
    env.stacks.get_mut("dynamodb").unwrap().drift.mode = DriftMode::Revert;
    detect(&cloud, &env, "dynamodb").await;
    let report = sim_pass(&cloud, &env, Options::default()).await;
    let tables = result_of(&report, "dynamodb");
    let reason = blocked_by_policy(tables);
    assert!(reason.contains("ReviewCyclesTable"), "{reason}");
    assert!(
        tables
            .change_set
            .as_deref()
            .unwrap()
            .ends_with("-revert-drift")
    );
    assert_eq!(
        sim.live_edits(TABLES, "ReviewCyclesTable")["/BillingMode"],
        "PROVISIONED"
    );
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
}

#[tokio::test(start_paused = true)]
async fn alert_mode_tells_a_drift_episode_once_and_its_end_once() {
    let env = load(&Workspace::new());
    let cloud = sim_cloud(&env, 0);
    sim_pass(&cloud, &env, Options::default()).await;
    let sim = cloud.inner();
    let mut episodes = Episodes::new(Duration::from_secs(6 * 3600));
    sim.edit_out_of_band(CLUSTER, "TaskLogGroup", "/RetentionInDays", "3");
    detect(&cloud, &env, "ecs-cluster").await;
    let mut told = Vec::new();
    for _ in 0..3 {
        let report = sim_pass(&cloud, &env, Options::default()).await;
        assert!(!report.wrote(), "alert mode writes nothing");
        told.extend(episodes.update("dev", &findings(&report), &[], Instant::now()));
        tokio::time::advance(Duration::from_secs(60)).await;
    }
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0].event, "drift");
    assert!(
        told[0].message.contains("TaskLogGroup (AWS::Logs::LogGroup) /RetentionInDays (/RetentionInDays: expected 14, actual 3)"),
        "{}",
        told[0].message
    );
    // Someone puts it back; the next detection ends the episode.
    sim.clear_edits(CLUSTER, "TaskLogGroup");
    detect(&cloud, &env, "ecs-cluster").await;
    let report = sim_pass(&cloud, &env, Options::default()).await;
    let end = episodes
        .update("dev", &findings(&report), &[], Instant::now())
        .unwrap();
    assert_eq!(end.event, "recovered");
    let report = sim_pass(&cloud, &env, Options::default()).await;
    assert!(
        episodes
            .update("dev", &findings(&report), &[], Instant::now())
            .is_none()
    );
}

#[tokio::test(start_paused = true)]
async fn ignored_drift_is_never_written_back_by_a_revert() {
    let mut env = load(&Workspace::new());
    let cloud = sim_cloud(&env, 0);
    sim_pass(&cloud, &env, Options::default()).await;
    let sim = cloud.inner();
    let tables = env.stacks.get_mut("dynamodb").unwrap();
    tables.drift.mode = DriftMode::Revert;
    tables.drift.ignore = vec![Ignore::parse("FeedbackRecordsTable.BillingMode").unwrap()];

    // Ignored drift in the stack: a drift-aware change set would revert it
    // with the rest, so there is none.
    sim.edit_out_of_band(TABLES, "ReviewCyclesTable", "/BillingMode", "PROVISIONED");
    sim.edit_out_of_band(
        TABLES,
        "FeedbackRecordsTable",
        "/BillingMode",
        "PROVISIONED",
    );
    detect(&cloud, &env, "dynamodb").await;
    let report = sim_pass(&cloud, &env, Options::default()).await;
    assert!(!report.wrote(), "{:?}", report.stacks);
    let p = plan_of(&report, "dynamodb");
    assert!(
        p.reason.contains("would also revert ignored drift"),
        "{}",
        p.reason
    );
    assert_eq!(sim.live_edits(TABLES, "FeedbackRecordsTable").len(), 1);

    // Ignored drift that appears after the detection: the change set shows
    // it, and it is left for review.
    sim.clear_edits(TABLES, "FeedbackRecordsTable");
    detect(&cloud, &env, "dynamodb").await;
    sim.edit_out_of_band(
        TABLES,
        "FeedbackRecordsTable",
        "/BillingMode",
        "PROVISIONED",
    );
    let report = sim_pass(&cloud, &env, Options::default()).await;
    let r = result_of(&report, "dynamodb");
    let reason = blocked_by_policy(r);
    assert!(reason.contains("FeedbackRecordsTable"), "{reason}");
    assert_eq!(sim.live_edits(TABLES, "FeedbackRecordsTable").len(), 1);
    assert_eq!(sim.live_edits(TABLES, "ReviewCyclesTable").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_revert_with_nothing_left_to_revert_is_not_tried_every_pass() {
    let mut env = load(&Workspace::new());
    let cloud = sim_cloud(&env, 0);
    sim_pass(&cloud, &env, Options::default()).await;
    let sim = cloud.inner();
    env.stacks.get_mut("dynamodb").unwrap().drift.mode = DriftMode::Revert;
    sim.edit_out_of_band(TABLES, "ReviewCyclesTable", "/BillingMode", "PROVISIONED");
    detect(&cloud, &env, "dynamodb").await;
    // Put back by hand before the pass: the drift-aware change set is empty.
    sim.clear_edits(TABLES, "ReviewCyclesTable");
    let options = Options::default();
    let first = sim_pass(&cloud, &env, options.clone()).await;
    let r = result_of(&first, "dynamodb");
    assert_eq!(r.result, StackResult::NoChanges, "{r:?}");
    let made = sim.calls()["CreateChangeSet"];
    for _ in 0..3 {
        let again = sim_pass(&cloud, &env, options.clone()).await;
        assert!(!again.wrote());
        let p = plan_of(&again, "dynamodb");
        assert!(p.reason.contains("a revert already ran"), "{}", p.reason);
    }
    assert_eq!(sim.calls()["CreateChangeSet"], made);
    // The next detection finds nothing: the episode is over, and drift that
    // comes back later is reverted again.
    detect(&cloud, &env, "dynamodb").await;
    let report = sim_pass(&cloud, &env, options.clone()).await;
    assert_eq!(report.verdict(), Verdict::InSync);
    sim.edit_out_of_band(TABLES, "ReviewCyclesTable", "/BillingMode", "PROVISIONED");
    detect(&cloud, &env, "dynamodb").await;
    let report = sim_pass(&cloud, &env, options.clone()).await;
    let r = result_of(&report, "dynamodb");
    assert_eq!(r.result, StackResult::Updated, "{r:?}");
    assert!(sim.live_edits(TABLES, "ReviewCyclesTable").is_empty());
    assert_eq!(r.drift_reverted.len(), 1, "{r:?}");
}

#[tokio::test(start_paused = true)]
async fn a_detection_given_up_waiting_for_keeps_its_slot_and_is_polled_not_started_again() {
    let env = load(&Workspace::new());
    let cloud = sim_cloud(&env, 0);
    sim_pass(&cloud, &env, Options::default()).await;
    let sim = cloud.inner();
    sim.edit_out_of_band(TABLES, "ReviewCyclesTable", "/BillingMode", "PROVISIONED");
    let slots = Detections::new(1);
    let soon = |s| Instant::now() + Duration::from_secs(s);
    let d = detect_stack(&cloud, &env.stacks["dynamodb"], &slots, soon(10)).await;
    assert!(
        matches!(&d, Detected::Failed { reason } if reason.contains("still in progress")),
        "{d:?}"
    );
    // Still in flight at AWS: it keeps the one slot.
    let other = detect_stack(&cloud, &env.stacks["network"], &slots, soon(5)).await;
    assert!(
        matches!(&other, Detected::Failed { reason } if reason.contains("no detection slot")),
        "{other:?}"
    );
    // The next attempt polls it rather than starting a second one.
    let d = detect_stack(&cloud, &env.stacks["dynamodb"], &slots, soon(300)).await;
    assert!(drift_of(&d).drifted());
    assert_eq!(sim.calls()["DetectStackDrift"], 1);
    let other = detect_stack(&cloud, &env.stacks["network"], &slots, soon(300)).await;
    assert!(!drift_of(&other).drifted());
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
}

#[tokio::test(start_paused = true)]
async fn a_detection_parked_before_the_stacks_last_update_is_followed_by_a_fresh_one() {
    const NETWORK: &str = "dev-performance-mgmt-network";
    let env = load(&Workspace::new());
    let cloud = sim_cloud(&env, 0);
    sim_pass(&cloud, &env, Options::default()).await;
    let sim = cloud.inner();
    let slots = Detections::new(2);
    let soon = |s| Instant::now() + Duration::from_secs(s);
    let d = detect_stack(&cloud, &env.stacks["network"], &slots, soon(10)).await;
    assert!(d.failed(), "{d:?}");
    // The stack is updated meanwhile (drift of a parameter, converged).
    sim.edit_parameter(NETWORK, "FlowLogRetentionDays", "90");
    let report = sim_pass(&cloud, &env, Options::default()).await;
    assert_eq!(result_of(&report, "network").result, StackResult::Updated);
    let d = detect_stack(&cloud, &env.stacks["network"], &slots, soon(600)).await;
    let drift = drift_of(&d);
    assert!(!drift.stale, "{drift:?}");
    assert_eq!(
        sim.calls()["DetectStackDrift"],
        2,
        "a fresh detection after the update"
    );
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
}
