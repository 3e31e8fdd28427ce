//! `apply::reconcile` against the simulated cloud on tokio's paused clock:
//! the stuck-and-failed playbook one scenario at a time, then invariants
//! over hundreds of seeds with random faults.

mod common;

use stackwarden::cloud::StackStatus;
use std::collections::BTreeMap;
use std::time::Duration;

use common::{Workspace, dev_new_revision};
use rand::{Rng, SeedableRng, rngs::StdRng};
use stackwarden::apply::{self, Options, Report, ServiceResult, StackResult};
use stackwarden::cloud::Retrying;
use stackwarden::cloud::sim::{self, SERVICE_MINUTES, SimCloud, SimConfig};
use stackwarden::cloud::{ChangeSetKind, ChangeSetRequest, Cloud};
use stackwarden::observe::Depth;
use stackwarden::outcome::Condition;
use stackwarden::plan::{BlockedBy, Health, Verdict};
use stackwarden::spec::{self, DesiredEnv, Mode};
use tokio::sync::Semaphore;

const ALL: [&str; 8] = [
    "network",
    "dynamodb",
    "msk",
    "elasticache",
    "iam",
    "alb",
    "ecs-cluster",
    "service",
];

fn load(ws: &Workspace) -> DesiredEnv {
    spec::load(&ws.path("desired-state/dev.yaml")).expect("dev loads")
}

fn dev() -> DesiredEnv {
    load(&Workspace::new())
}

/// dev whose ReviewCycles table gets a new key schema: a replacement.
fn dev_replacing_the_table() -> DesiredEnv {
    let ws = Workspace::new();
    ws.edit(
        "templates/dynamodb.yaml",
        "- {AttributeName: cycleId, KeyType: HASH}",
        "- {AttributeName: organizationId, KeyType: HASH}",
    );
    load(&ws)
}

fn config(env: &DesiredEnv, seed: u64) -> SimConfig {
    SimConfig {
        seed,
        latency: sim::latencies(env, &SERVICE_MINUTES),
        ..SimConfig::default()
    }
}

async fn pass(cloud: &Retrying<SimCloud>, env: &DesiredEnv) -> Report {
    apply::reconcile(
        cloud,
        env,
        &Semaphore::new(apply::DEFAULT_MAX_PARALLEL),
        &Options {
            depth: Depth::Full,
            progress: None,
            // Seeded jitter: a history replays exactly.
            jitter_seed: Some(0),
            ..Options::default()
        },
    )
    .await
    .expect("the pass observes")
}

fn result<'r>(r: &'r Report, key: &str) -> &'r StackResult {
    &r.stacks
        .iter()
        .find(|s| s.is(key))
        .unwrap_or_else(|| panic!("{key} reported"))
        .result
}

fn name(env: &DesiredEnv, key: &str) -> String {
    env.stacks[key].name.clone()
}

fn calls(cloud: &Retrying<SimCloud>, op: &str) -> u64 {
    cloud.calls().get(op).copied().unwrap_or(0)
}

#[tokio::test(start_paused = true)]
async fn creating_dev_follows_the_graph_and_a_second_pass_writes_nothing() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 1)));
    let started = tokio::time::Instant::now();
    let r = pass(&cloud, &env).await;
    let took = started.elapsed();
    assert_eq!(r.verdict(), Verdict::InSync, "{r:#?}");
    for key in ALL {
        assert_eq!(result(&r, key), &StackResult::Created, "{key}");
    }
    // Every stack was executed after all its upstream stacks.
    let order: Vec<String> = cloud.executed().into_iter().map(|(s, _)| s).collect();
    let at = |key: &str| order.iter().position(|s| *s == name(&env, key)).unwrap();
    for s in env.stacks.values() {
        for d in &s.depends_on {
            assert!(at(d) < at(&s.key), "{} executed before {d}", s.key);
        }
    }
    // Independent stacks overlap: the pass takes the critical path
    // (network 4 + msk 25 + iam 1 + alb 4 + service 6 = 40 min, plus change
    // sets), not the sum of all stacks (56 min).
    let sum: u64 = SERVICE_MINUTES.iter().map(|(_, m)| m * 60).sum();
    println!(
        "simulated create of dev: {:.1} min (sequential sum {} min)",
        took.as_secs_f64() / 60.0,
        sum / 60
    );
    assert!(took < Duration::from_secs(sum), "{took:?}");
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());

    let writes = cloud.write_calls();
    let before = cloud.total_calls();
    let again = pass(&cloud, &env).await;
    assert_eq!(again.verdict(), Verdict::InSync);
    assert_eq!(
        cloud.write_calls(),
        writes,
        "a steady-state pass writes nothing"
    );
    println!("steady-state pass: {} calls", cloud.total_calls() - before);
}

#[tokio::test(start_paused = true)]
async fn someone_elses_operation_is_waited_for_and_never_doubled() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 2)));
    pass(&cloud, &env).await;
    let network = name(&env, "network");
    cloud.start_foreign_update(&network, Duration::from_secs(600));
    cloud.edit_parameter(&network, "FlowLogRetentionDays", "30");
    let r = pass(&cloud, &env).await;
    assert_eq!(result(&r, "network"), &StackResult::Updated, "{r:#?}");
    assert_eq!(r.verdict(), Verdict::InSync);
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());
}

#[tokio::test(start_paused = true)]
async fn waiting_on_someone_else_past_the_timeout_is_a_difference_not_a_failure() {
    let ws = Workspace::new();
    ws.edit(
        "desired-state/dev.yaml",
        "  network:\n    template: ../templates/network.yaml",
        "  network:\n    template: ../templates/network.yaml\n    timeout: 10m",
    );
    let env = load(&ws);
    let cloud = Retrying::new(SimCloud::new(config(&env, 3)));
    pass(&cloud, &env).await;
    let network = name(&env, "network");
    cloud.start_foreign_update(&network, Duration::from_secs(3600));
    let r = pass(&cloud, &env).await;
    assert!(
        matches!(
            result(&r, "network"),
            StackResult::TimedOut { ours: false, .. }
        ),
        "{r:#?}"
    );
    assert_eq!(r.verdict(), Verdict::Differences);
}

#[tokio::test(start_paused = true)]
async fn our_own_stuck_operation_times_out_fails_the_pass_and_stops_dependents() {
    let ws = Workspace::new();
    ws.edit(
        "desired-state/dev.yaml",
        "  network:\n    template: ../templates/network.yaml",
        "  network:\n    template: ../templates/network.yaml\n    timeout: 15m",
    );
    let env = load(&ws);
    let cloud = Retrying::new(SimCloud::new(config(&env, 4)));
    cloud.stick(&name(&env, "network"));
    let r = pass(&cloud, &env).await;
    assert!(
        matches!(
            result(&r, "network"),
            StackResult::TimedOut { ours: true, .. }
        ),
        "{r:#?}"
    );
    assert_eq!(result(&r, "dynamodb"), &StackResult::Created);
    assert_eq!(
        result(&r, "msk"),
        &StackResult::Skipped {
            upstream: "network".into()
        }
    );
    assert_eq!(r.verdict(), Verdict::Failed);
}

#[tokio::test(start_paused = true)]
async fn a_failed_create_stops_its_dependents_names_the_cause_and_is_not_retried() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 5)));
    cloud.fail_next_operation(&name(&env, "network"));
    let r = pass(&cloud, &env).await;
    let StackResult::Failed { reason } = result(&r, "network") else {
        panic!("{r:#?}");
    };
    assert!(
        reason.contains("ROLLBACK_COMPLETE") && reason.contains("simulated failure"),
        "{reason}"
    );
    // An unrelated branch goes on; dependents are not touched.
    assert_eq!(result(&r, "dynamodb"), &StackResult::Created);
    for key in ["msk", "elasticache", "ecs-cluster", "iam", "alb", "service"] {
        assert!(
            matches!(result(&r, key), StackResult::Skipped { .. }),
            "{key}: {:?}",
            result(&r, key)
        );
        assert!(cloud.stack(&name(&env, key)).is_none(), "{key} was created");
    }
    assert_eq!(r.verdict(), Verdict::Failed);

    // Same revision: blocked, no retry loop against production.
    let executed = calls(&cloud, "ExecuteChangeSet");
    let again = pass(&cloud, &env).await;
    let StackResult::Blocked {
        by: BlockedBy::FailedRevision,
        reason,
    } = result(&again, "network")
    else {
        panic!("{again:#?}");
    };
    assert!(reason.contains("creation"), "{reason}");
    assert_eq!(calls(&cloud, "ExecuteChangeSet"), executed);
    assert_eq!(again.verdict(), Verdict::Failed);
    assert!(cloud.deleted().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_failed_create_is_recreated_only_when_allowed_and_for_a_new_revision() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 6)));
    // iam holds no stateful resource (network holds a log group).
    cloud.fail_next_operation(&name(&env, "iam"));
    pass(&cloud, &env).await;

    let mut fixed = dev_new_revision();
    let r = pass(&cloud, &fixed).await;
    assert!(
        matches!(result(&r, "iam"), StackResult::Blocked { by: BlockedBy::FailedState, reason } if reason.contains("recreate_failed")),
        "{r:#?}"
    );
    assert!(cloud.deleted().is_empty());

    fixed.policy.recreate_failed = true;
    let r = pass(&cloud, &fixed).await;
    assert_eq!(result(&r, "iam"), &StackResult::Created, "{r:#?}");
    assert_eq!(cloud.deleted(), vec![name(&env, "iam")]);
    assert_eq!(r.verdict(), Verdict::InSync, "{r:#?}");
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());
}

#[tokio::test(start_paused = true)]
async fn a_failed_create_of_a_stack_holding_protected_resources_is_never_recreated() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 7)));
    cloud.fail_next_operation(&name(&env, "dynamodb"));
    pass(&cloud, &env).await;
    let mut fixed = dev_new_revision();
    fixed.policy.recreate_failed = true;
    let r = pass(&cloud, &fixed).await;
    assert!(
        matches!(result(&r, "dynamodb"), StackResult::Blocked { by: BlockedBy::FailedState, reason } if reason.contains("protected")),
        "{r:#?}"
    );
    assert!(cloud.deleted().is_empty());
    assert_eq!(r.verdict(), Verdict::Failed);
}

#[tokio::test(start_paused = true)]
async fn update_rollback_failed_is_continued_only_when_the_policy_says() {
    let mut env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 8)));
    pass(&cloud, &env).await;
    let network = name(&env, "network");
    cloud.force_status(
        &network,
        "UPDATE_ROLLBACK_FAILED",
        "Resource Vpc failed to roll back",
    );
    let r = pass(&cloud, &env).await;
    assert!(
        matches!(result(&r, "network"), StackResult::Blocked { by: BlockedBy::FailedState, reason } if reason.contains("rollback failed")),
        "{r:#?}"
    );
    assert_eq!(calls(&cloud, "ContinueUpdateRollback"), 0);
    assert_eq!(r.verdict(), Verdict::Failed);
    assert!(matches!(result(&r, "msk"), StackResult::Skipped { .. }));

    env.policy.continue_rollback = true;
    let r = pass(&cloud, &env).await;
    assert_eq!(result(&r, "network"), &StackResult::RollbackContinued);
    assert_eq!(calls(&cloud, "ContinueUpdateRollback"), 1);
    assert_eq!(
        cloud.stack(&network).unwrap().status.as_str(),
        "UPDATE_ROLLBACK_COMPLETE"
    );
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());
}

#[tokio::test(start_paused = true)]
async fn a_rolled_back_update_is_not_retried_until_the_revision_changes() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 9)));
    pass(&cloud, &env).await;
    let ws = Workspace::new();
    ws.edit(
        "desired-state/dev.yaml",
        "FlowLogRetentionDays: 14",
        "FlowLogRetentionDays: 30",
    );
    let changed = load(&ws);
    cloud.fail_next_operation(&name(&env, "network"));
    let r = pass(&cloud, &changed).await;
    assert!(
        matches!(result(&r, "network"), StackResult::Failed { reason } if reason.contains("UPDATE_ROLLBACK_COMPLETE")),
        "{r:#?}"
    );
    assert_eq!(r.verdict(), Verdict::Failed);

    let executed = calls(&cloud, "ExecuteChangeSet");
    let again = pass(&cloud, &changed).await;
    assert!(
        matches!(result(&again, "network"), StackResult::Blocked { by: BlockedBy::FailedRevision, reason } if reason.contains("rolled back")),
        "{again:#?}"
    );
    let network = again
        .final_plan
        .stacks
        .iter()
        .find(|s| s.is("network"))
        .unwrap();
    assert_eq!(network.health, Health::Failed);
    assert_eq!(calls(&cloud, "ExecuteChangeSet"), executed, "no retry loop");
    assert_eq!(again.verdict(), Verdict::Failed);

    ws.edit(
        "desired-state/dev.yaml",
        "FlowLogRetentionDays: 30",
        "FlowLogRetentionDays: 60",
    );
    let r = pass(&cloud, &load(&ws)).await;
    assert_eq!(result(&r, "network"), &StackResult::Updated, "{r:#?}");
    assert_eq!(r.verdict(), Verdict::InSync);
}

#[tokio::test(start_paused = true)]
async fn a_pass_that_crashed_before_executing_reuses_its_change_set_and_cleans_stale_ones() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 10)));
    let network = name(&env, "network");
    // A stale change set from an older revision, left on an unexecuted stack.
    let mut stale = ChangeSetRequest {
        stack_name: network.clone(),
        change_set_name: "stackwarden-000000000000".into(),
        kind: ChangeSetKind::Create,
        template_body: env.stacks["network"].template_body.clone(),
        template_url: None,
        artifacts: vec![],
        parameters: BTreeMap::new(),
        tags: BTreeMap::new(),
        description: String::new(),
        include_nested_stacks: false,
        revert_drift: false,
    };
    cloud.create_change_set(&stale).await.unwrap();
    // Made well before this pass: no concurrent run can be using it.
    tokio::time::advance(apply::CONCURRENT_RUN_WINDOW * 2).await;
    // The crash: the pass is dropped while its change sets are computed.
    let crashed = tokio::time::timeout(Duration::from_secs(1), pass(&cloud, &env)).await;
    assert!(crashed.is_err(), "the pass was cut short");
    assert_eq!(
        cloud.stack(&network).unwrap().status.as_str(),
        "REVIEW_IN_PROGRESS"
    );
    let created = calls(&cloud, "CreateChangeSet");

    let r = pass(&cloud, &env).await;
    assert_eq!(r.verdict(), Verdict::InSync, "{r:#?}");
    // network and dynamodb reused theirs; the six others made one each.
    assert_eq!(calls(&cloud, "CreateChangeSet") - created, 6);
    stale.change_set_name = env.stacks["network"].change_set_name();
    assert_eq!(
        cloud.change_set_names(&network),
        vec![stale.change_set_name]
    );
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());
}

#[tokio::test(start_paused = true)]
async fn a_change_that_replaces_a_protected_table_is_blocked_and_left_for_review() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 11)));
    pass(&cloud, &env).await;
    let replacing = dev_replacing_the_table();
    let r = pass(&cloud, &replacing).await;
    let StackResult::Blocked {
        by: BlockedBy::Policy,
        reason,
    } = result(&r, "dynamodb")
    else {
        panic!("{r:#?}");
    };
    assert!(
        reason.contains("ReviewCyclesTable") && reason.contains("replaced"),
        "{reason}"
    );
    // One outcome per object, read alike by alerts, metrics and /status.
    let outcomes = stackwarden::outcome::outcomes(&r);
    let of = |object: &str| {
        outcomes
            .iter()
            .find(|o| o.object == object)
            .unwrap_or_else(|| panic!("{object}: {outcomes:#?}"))
    };
    assert_eq!(
        of("stack:dynamodb").condition,
        Condition::Blocked(BlockedBy::Policy)
    );
    let blocked = outcomes
        .iter()
        .filter(|o| matches!(o.condition, Condition::Blocked(_)))
        .count() as u64;
    assert_eq!(
        stackwarden::metrics::PassMetrics::from_report(&r, 0).stacks_blocked,
        blocked
    );
    let findings = stackwarden::notify::findings(&r);
    assert!(
        findings
            .iter()
            .any(|f| f.object == "stack:dynamodb" && f.kind == stackwarden::notify::Kind::Blocked),
        "{findings:#?}"
    );
    // Its dependents wait; unrelated stacks are untouched.
    assert!(matches!(result(&r, "iam"), StackResult::Skipped { .. }));
    assert_eq!(result(&r, "network"), &StackResult::InSync);
    assert_eq!(r.verdict(), Verdict::Differences);
    let dynamodb = name(&env, "dynamodb");
    assert_eq!(
        cloud.change_set_names(&dynamodb),
        vec![
            env.stacks["dynamodb"].change_set_name(),
            replacing.stacks["dynamodb"].change_set_name()
        ]
        .into_iter()
        .filter(|n| n != &env.stacks["dynamodb"].change_set_name())
        .collect::<Vec<_>>(),
        "the blocked change set is left for review"
    );
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());

    // Back to the old desired state: the review change set is cleaned up.
    let r = pass(&cloud, &env).await;
    assert_eq!(r.verdict(), Verdict::InSync, "{r:#?}");

    // Explicitly allowed: it runs.
    let mut allowed = replacing.clone();
    allowed
        .policy
        .allow_replacement
        .insert(("dynamodb".into(), "ReviewCyclesTable".into()));
    cloud.allow_replacement(&dynamodb, "ReviewCyclesTable");
    let r = pass(&cloud, &allowed).await;
    assert_eq!(result(&r, "dynamodb"), &StackResult::Updated, "{r:#?}");
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());
}

#[tokio::test(start_paused = true)]
async fn a_change_set_silent_about_replacement_is_treated_as_one() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(SimConfig {
        hide_replacement: true,
        ..config(&env, 12)
    }));
    pass(&cloud, &env).await;
    let r = pass(&cloud, &dev_replacing_the_table()).await;
    assert!(
        matches!(result(&r, "dynamodb"), StackResult::Blocked { by: BlockedBy::Policy, reason } if reason.contains("ReviewCyclesTable")),
        "{r:#?}"
    );
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());
}

/// The simulated cloud knows replacements from AWS's resource schemas, not
/// from the policy's tables: renaming a log group (a stateful type) and
/// narrowing the MSK brokers' client subnets (a nested create-only path)
/// are replacements, blocked whether the change set says so or is silent.
#[tokio::test(start_paused = true)]
async fn replacements_the_resource_schemas_publish_are_blocked() {
    for hide_replacement in [false, true] {
        let env = dev();
        let cloud = Retrying::new(SimCloud::new(SimConfig {
            hide_replacement,
            ..config(&env, 13)
        }));
        pass(&cloud, &env).await;
        let ws = Workspace::new();
        ws.edit(
            "templates/ecs-cluster.yaml",
            "/ecs/${Environment}-performance-mgmt",
            "/ecs/${Environment}-pms",
        );
        ws.edit(
            "templates/msk.yaml",
            "ClientSubnets: !Ref MskSubnetIds",
            "ClientSubnets: [!Select [0, !Ref MskSubnetIds]]",
        );
        let r = pass(&cloud, &load(&ws)).await;
        for (key, id) in [("ecs-cluster", "TaskLogGroup"), ("msk", "KafkaCluster")] {
            let StackResult::Blocked {
                by: BlockedBy::Policy,
                reason,
            } = result(&r, key)
            else {
                panic!("{key} (hidden: {hide_replacement}): {r:#?}");
            };
            assert!(reason.contains(id), "{key}: {reason}");
        }
        assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());
    }
}

#[tokio::test(start_paused = true)]
async fn observe_mode_plans_and_reports_but_writes_nothing() {
    let mut env = dev();
    env.policy.mode = Mode::Observe;
    let cloud = Retrying::new(SimCloud::new(config(&env, 13)));
    let r = pass(&cloud, &env).await;
    assert_eq!(cloud.write_calls(), 0, "{:?}", cloud.calls());
    assert_eq!(r.verdict(), Verdict::Differences);
    assert!(matches!(result(&r, "network"), StackResult::Blocked { .. }));
}

#[tokio::test(start_paused = true)]
async fn the_wrong_account_is_refused_before_any_write() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(SimConfig {
        account: "999999999999".into(),
        ..config(&env, 14)
    }));
    let r = pass(&cloud, &env).await;
    assert_eq!(cloud.write_calls(), 0, "{:?}", cloud.calls());
    let StackResult::Failed { reason } = result(&r, "network") else {
        panic!("{r:#?}");
    };
    assert!(reason.contains("999999999999") && reason.contains("123456789012"));
    assert_eq!(r.verdict(), Verdict::Failed);
}

#[tokio::test(start_paused = true)]
async fn ecs_drift_is_converged_and_a_failed_rollout_is_degraded() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 15)));
    pass(&cloud, &env).await;
    let svc = &pass(&cloud, &env).await.services[0];
    let (cluster, service) = (svc.cluster.clone().unwrap(), svc.service.clone().unwrap());
    cloud.edit_desired_count(&cluster, &service, 7);
    let r = pass(&cloud, &env).await;
    assert_eq!(
        r.services[0].result,
        ServiceResult::Scaled { from: 7, to: 2 }
    );
    assert_eq!(r.verdict(), Verdict::InSync);

    cloud.fail_rollout(&cluster, &service, "tasks failed to start");
    let r = pass(&cloud, &env).await;
    assert_eq!(r.final_plan.services[0].health, Health::Degraded);
    assert!(
        r.final_plan.services[0]
            .reason
            .contains("tasks failed to start"),
        "{:?}",
        r.final_plan.services[0]
    );
    assert_eq!(r.verdict(), Verdict::Differences);
}

#[tokio::test(start_paused = true)]
async fn throttling_is_answered_by_backing_off_never_by_failing() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(SimConfig {
        throttle_rate: 0.3,
        ..config(&env, 16)
    }));
    let r = pass(&cloud, &env).await;
    assert_eq!(r.verdict(), Verdict::InSync, "{r:#?}");
    assert!(cloud.violations().is_empty());
}

/// The three desired states of the random histories, loaded once.
fn variants() -> &'static (DesiredEnv, DesiredEnv, DesiredEnv) {
    static V: std::sync::OnceLock<(DesiredEnv, DesiredEnv, DesiredEnv)> =
        std::sync::OnceLock::new();
    V.get_or_init(|| (dev(), dev_new_revision(), dev_replacing_the_table()))
}

/// One random history: faults, maybe a crash, out-of-band edits, maybe a
/// dangerous desired-state change; then the faults stop and the operator
/// pushes a new revision. Returns a description of the failure, if any.
async fn random_history(seed: u64) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (base, new_revision, replacing) = variants();
    let mut env = base.clone();
    env.policy.recreate_failed = rng.gen_bool(0.5);
    env.policy.continue_rollback = rng.gen_bool(0.5);
    let mut cfg = config(&env, seed);
    cfg.throttle_rate = [0.0, 0.05, 0.2][rng.gen_range(0..3)];
    cfg.hide_replacement = rng.gen_bool(0.3);
    for l in cfg.latency.values_mut() {
        *l = l.mul_f64(rng.gen_range(0.2..1.5));
    }
    let cloud = Retrying::new(SimCloud::new(cfg));
    for key in ALL {
        if rng.gen_bool(0.12) {
            cloud.fail_next_operation(&name(&env, key));
        }
    }
    if rng.gen_bool(0.1) {
        cloud.stick(&name(&env, ALL[rng.gen_range(0..ALL.len())]));
    }
    let check = |r: &Report, phase: &str| -> Result<(), String> {
        let v = cloud.violations();
        if !v.is_empty() {
            return Err(format!("{phase}: violations {v:?}"));
        }
        for s in &r.stacks {
            if !s.result.ready()
                && let Some(key) = &s.key
            {
                for d in env.dependents_of(key) {
                    let dr = &r.stacks.iter().find(|x| x.is(&d)).unwrap().result;
                    if !matches!(dr, StackResult::Skipped { .. }) {
                        return Err(format!(
                            "{phase}: {d} was {dr:?} although upstream {key} was {:?}",
                            s.result
                        ));
                    }
                }
            }
        }
        for d in cloud.deleted() {
            let key = ALL.iter().find(|k| name(&env, k) == d).unwrap();
            let protected =
                stackwarden::policy::holds_protected(&env.stacks[*key].template, &env.policy);
            if !env.policy.recreate_failed || protected {
                return Err(format!("{phase}: {d} was deleted"));
            }
        }
        Ok(())
    };
    // Every pass must end: a generous bound on simulated time.
    let bounded = |label: &'static str, fut| async move {
        tokio::time::timeout(Duration::from_secs(48 * 3600), fut)
            .await
            .map_err(|_| format!("{label}: the pass did not end"))
    };

    // Phase 1: faults.
    if rng.gen_bool(0.3) {
        let cut = Duration::from_secs(rng.gen_range(0..3600));
        let _ = tokio::time::timeout(cut, pass(&cloud, &env)).await; // a crash
    } else {
        let r = bounded("first", pass(&cloud, &env)).await?;
        check(&r, "first")?;
    }
    for key in ALL {
        let n = name(&env, key);
        let Some(s) = cloud.stack(&n) else { continue };
        if s.in_progress() {
            continue;
        }
        if key == "network" && rng.gen_bool(0.3) {
            cloud.edit_parameter(&n, "FlowLogRetentionDays", "30");
        }
        if rng.gen_bool(0.1) {
            cloud.start_foreign_update(&n, Duration::from_secs(rng.gen_range(60..1800)));
        }
    }
    // A dangerous desired-state change, on a table that exists (one that a
    // pass would create from scratch has nothing to replace).
    let table_exists = cloud.stack(&name(&env, "dynamodb")).is_some_and(|s| {
        s.status != StackStatus::RollbackComplete && s.status != StackStatus::ReviewInProgress
    });
    let second = if table_exists && rng.gen_bool(0.2) {
        replacing.clone()
    } else {
        env.clone()
    };
    let r = bounded("second", pass(&cloud, &second)).await?;
    check(&r, "second")?;

    // Phase 2: the faults stop; the operator deletes what cannot be
    // recreated automatically and pushes a new revision.
    cloud.clear_faults();
    tokio::time::advance(Duration::from_secs(2 * 3600)).await;
    let mut fixed = new_revision.clone();
    fixed.policy = env.policy.clone();
    for key in ALL {
        let n = name(&env, key);
        if cloud
            .stack(&n)
            .is_some_and(|s| s.status == StackStatus::RollbackComplete)
            && (!env.policy.recreate_failed
                || stackwarden::policy::holds_protected(&env.stacks[key].template, &env.policy))
        {
            cloud.delete_out_of_band(&n);
        }
    }
    let r = bounded("converge", pass(&cloud, &fixed)).await?;
    check(&r, "converge")?;
    if r.verdict() != Verdict::InSync {
        return Err(format!("did not converge once faults stopped: {r:#?}"));
    }
    let writes = cloud.write_calls();
    let r = bounded("steady", pass(&cloud, &fixed)).await?;
    check(&r, "steady")?;
    if r.verdict() != Verdict::InSync || cloud.write_calls() != writes {
        return Err(format!(
            "the pass after convergence changed something: {:?}",
            cloud.calls()
        ));
    }
    Ok(())
}

#[test]
fn invariants_hold_over_many_seeded_histories() {
    // STACKWARDEN_SEED=N replays one history; STACKWARDEN_SEEDS=N runs 0..N.
    let var = |k: &str| std::env::var(k).ok().and_then(|s| s.parse::<u64>().ok());
    let seeds = match (var("STACKWARDEN_SEED"), var("STACKWARDEN_SEEDS")) {
        (Some(one), _) => one..one + 1,
        (None, n) => 0..n.unwrap_or(500),
    };
    let mut failures = Vec::new();
    for seed in seeds {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        if let Err(e) = rt.block_on(random_history(seed)) {
            eprintln!("seed {seed} failed: {e}");
            failures.push(seed);
        }
    }
    assert!(
        failures.is_empty(),
        "invariants broken for seeds {failures:?} (replay one with STACKWARDEN_SEED=N)"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_final_observation_keeps_the_report_of_what_was_done() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 3)));
    cloud.lose_network_once_stable(ALL.len());
    let r = pass(&cloud, &env).await;
    for key in ALL {
        assert_eq!(result(&r, key), &StackResult::Created, "{key}");
    }
    let e = r
        .final_observation_error
        .as_deref()
        .expect("the failure is reported");
    assert!(
        e.contains("cannot observe after applying") && e.contains("connection refused"),
        "{e}"
    );
    assert_eq!(r.verdict(), Verdict::Failed);
    assert!(!r.services.is_empty());
    for s in &r.services {
        assert!(
            matches!(&s.result, ServiceResult::Failed { reason } if reason.contains("connection refused")),
            "{s:?}"
        );
    }
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["stacks"].as_array().map(Vec::len), Some(ALL.len()));
    assert!(json["final_observation_error"].is_string());
}

#[tokio::test(start_paused = true)]
async fn two_passes_at_once_execute_every_stack_once_and_never_fail_each_other() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 21)));
    let (a, b) = tokio::join!(pass(&cloud, &env), pass(&cloud, &env));
    for r in [&a, &b] {
        assert_ne!(r.verdict(), Verdict::Failed, "{r:#?}");
    }
    let executed = cloud.executed();
    for key in ALL {
        let n = executed
            .iter()
            .filter(|(s, _)| *s == name(&env, key))
            .count();
        assert_eq!(n, 1, "{key} executed {n} times");
    }
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());
    let again = pass(&cloud, &env).await;
    assert_eq!(again.verdict(), Verdict::InSync, "{again:#?}");
}

#[tokio::test(start_paused = true)]
async fn another_runs_fresh_change_set_is_left_alone_until_it_is_stale() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 22)));
    pass(&cloud, &env).await;
    // Another run (another checkout, another revision) has just made its
    // change set on the network stack.
    let network = name(&env, "network");
    let theirs = ChangeSetRequest {
        stack_name: network.clone(),
        change_set_name: "stackwarden-0123456789ab".into(),
        kind: ChangeSetKind::Update,
        template_body: env.stacks["network"].template_body.clone(),
        template_url: None,
        artifacts: vec![],
        parameters: BTreeMap::new(),
        tags: BTreeMap::new(),
        description: String::new(),
        include_nested_stacks: false,
        revert_drift: false,
    };
    cloud.create_change_set(&theirs).await.unwrap();
    let ws = Workspace::new();
    ws.edit(
        "desired-state/dev.yaml",
        "FlowLogRetentionDays: 14",
        "FlowLogRetentionDays: 30",
    );
    let changed = load(&ws);
    let r = pass(&cloud, &changed).await;
    assert!(
        matches!(result(&r, "network"), StackResult::Blocked { by: BlockedBy::AnotherRun, reason } if reason.contains("another run") && reason.contains("stackwarden-0123456789ab")),
        "{r:#?}"
    );
    assert_eq!(r.verdict(), Verdict::Differences);
    assert!(
        cloud
            .change_set_names(&network)
            .contains(&theirs.change_set_name)
    );

    // Abandoned: once older than the window it is stale, deleted, and ours runs.
    tokio::time::advance(apply::CONCURRENT_RUN_WINDOW * 2).await;
    let r = pass(&cloud, &changed).await;
    assert_eq!(result(&r, "network"), &StackResult::Updated, "{r:#?}");
    assert!(
        !cloud
            .change_set_names(&network)
            .contains(&theirs.change_set_name)
    );
}

#[tokio::test(start_paused = true)]
async fn create_failed_and_update_failed_are_failures_that_stop_dependents() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 23)));
    pass(&cloud, &env).await;
    for (status, op) in [("UPDATE_FAILED", "update"), ("CREATE_FAILED", "creation")] {
        // An operation someone ran with rollback disabled ("preserve
        // successfully provisioned resources") failed; the revision tag
        // still matches.
        cloud.force_status(
            &name(&env, "network"),
            status,
            "Resource Vpc failed: rate exceeded",
        );
        let writes = cloud.write_calls();
        let r = pass(&cloud, &env).await;
        assert!(
            matches!(result(&r, "network"), StackResult::Blocked { by: BlockedBy::FailedState, reason } if reason.contains(&format!("{op} failed with rollback disabled"))),
            "{r:#?}"
        );
        assert!(
            matches!(result(&r, "msk"), StackResult::Skipped { .. }),
            "{r:#?}"
        );
        assert_eq!(r.verdict(), Verdict::Failed);
        let network = r
            .final_plan
            .stacks
            .iter()
            .find(|s| s.is("network"))
            .unwrap();
        assert_eq!(network.health, Health::Failed);
        assert!(
            network
                .reason
                .contains("stackwarden rollback -e dev --stack network"),
            "{}",
            network.reason
        );
        assert_eq!(cloud.write_calls(), writes, "nothing is written");
    }
}

/// Makes a stack outside the desired state, with these tags, as another
/// deployment (or an older revision of this one) would have.
async fn foreign_stack(cloud: &Retrying<SimCloud>, name: &str, body: &str, tags: &[(&str, &str)]) {
    let request = ChangeSetRequest {
        stack_name: name.into(),
        change_set_name: "made-elsewhere".into(),
        kind: ChangeSetKind::Create,
        template_body: body.into(),
        template_url: None,
        artifacts: vec![],
        parameters: BTreeMap::new(),
        tags: tags
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        description: String::new(),
        include_nested_stacks: false,
        revert_drift: false,
    };
    cloud.create_change_set(&request).await.unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    cloud
        .execute_change_set(name, "made-elsewhere", None)
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert!(
        cloud
            .stack(name)
            .unwrap()
            .status
            .as_str()
            .ends_with("_COMPLETE")
    );
}

#[tokio::test(start_paused = true)]
async fn prune_deletes_only_proven_orphans_without_protected_resources() {
    const TOPIC: &str = "Resources:\n  T: {Type: AWS::SNS::Topic}\n";
    const TABLE: &str = "Resources:\n  T:\n    Type: AWS::DynamoDB::Table\n    Properties:\n      KeySchema: [{AttributeName: id, KeyType: HASH}]\n      AttributeDefinitions: [{AttributeName: id, AttributeType: S}]\n      BillingMode: PAY_PER_REQUEST\n";
    let mut env = dev();
    env.policy.prune = true;
    let owner = env.owner.clone().expect("the shipped files have an owner");
    let cloud = Retrying::new(SimCloud::new(config(&env, 24)));
    pass(&cloud, &env).await;
    let env_tag = ("stackwarden:environment", "dev");
    foreign_stack(
        &cloud,
        "dev-old-topic",
        TOPIC,
        &[env_tag, ("stackwarden:owner", &owner)],
    )
    .await;
    foreign_stack(
        &cloud,
        "dev-old-table",
        TABLE,
        &[env_tag, ("stackwarden:owner", &owner)],
    )
    .await;
    foreign_stack(
        &cloud,
        "dev-other-team",
        TOPIC,
        &[env_tag, ("stackwarden:owner", "another-team")],
    )
    .await;
    foreign_stack(&cloud, "dev-legacy", TOPIC, &[env_tag]).await;

    let r = pass(&cloud, &env).await;
    let orphan = |r: &Report, name: &str| {
        r.stacks
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.result.clone())
    };
    assert_eq!(
        orphan(&r, "dev-old-topic"),
        Some(StackResult::Pruned),
        "{r:#?}"
    );
    assert!(
        matches!(orphan(&r, "dev-old-table"), Some(StackResult::Blocked { by: BlockedBy::DeletionRefused, reason }) if reason.contains("protected") && reason.contains("AWS::DynamoDB::Table")),
        "{r:#?}"
    );
    assert!(
        matches!(orphan(&r, "dev-legacy"), Some(StackResult::Blocked { by: BlockedBy::DeletionRefused, reason }) if reason.contains("not proven ours")),
        "{r:#?}"
    );
    // Another owner's stack is not ours to report, count or touch.
    assert_eq!(orphan(&r, "dev-other-team"), None, "{r:#?}");
    assert!(
        !r.final_plan
            .stacks
            .iter()
            .any(|s| s.name == "dev-other-team")
    );
    assert_eq!(cloud.deleted(), vec!["dev-old-topic".to_owned()]);

    // Explicitly allowed, the table's stack goes too.
    env.policy.allow_prune.insert("dev-old-table".into());
    let r = pass(&cloud, &env).await;
    assert_eq!(
        orphan(&r, "dev-old-table"),
        Some(StackResult::Pruned),
        "{r:#?}"
    );
    assert!(cloud.stack("dev-other-team").is_some());
    assert!(cloud.stack("dev-legacy").is_some());
}

#[tokio::test(start_paused = true)]
async fn an_update_still_cleaning_up_is_a_success_not_an_operation_to_time_out_on() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(SimConfig {
        // Deleting what the update replaced takes longer than the timeout.
        cleanup_latency: Duration::from_secs(3 * 3600),
        ..config(&env, 25)
    }));
    pass(&cloud, &env).await;
    let ws = Workspace::new();
    ws.edit(
        "desired-state/dev.yaml",
        "FlowLogRetentionDays: 14",
        "FlowLogRetentionDays: 30",
    );
    let changed = load(&ws);
    let started = tokio::time::Instant::now();
    let r = pass(&cloud, &changed).await;
    assert_eq!(result(&r, "network"), &StackResult::Updated, "{r:#?}");
    assert!(
        started.elapsed() < env.stacks["network"].timeout,
        "waited on the cleanup"
    );
    assert_eq!(
        cloud.stack(&name(&env, "network")).unwrap().status.as_str(),
        "UPDATE_COMPLETE_CLEANUP_IN_PROGRESS"
    );
    // Its dependents were not held back by the cleanup.
    for key in ["msk", "elasticache", "ecs-cluster", "alb", "service"] {
        assert!(result(&r, key).ready(), "{key}: {r:#?}");
    }
    assert_ne!(r.verdict(), Verdict::Failed, "{r:#?}");
}

#[tokio::test(start_paused = true)]
async fn a_change_set_made_for_other_values_is_never_executed_but_made_anew() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 26)));
    pass(&cloud, &env).await;
    let network = name(&env, "network");
    // Drift to correct, and a change set of this very revision left behind
    // (a crash, or left for review) with values that are no longer right.
    cloud.edit_parameter(&network, "FlowLogRetentionDays", "30");
    let d = &env.stacks["network"];
    let mut parameters: BTreeMap<String, String> = d
        .parameters
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect();
    parameters.insert("FlowLogRetentionDays".into(), "90".into());
    // (The creation's executed change set of this revision goes first.)
    cloud
        .delete_change_set(&network, &d.change_set_name())
        .await
        .unwrap();
    cloud
        .create_change_set(&ChangeSetRequest {
            stack_name: network.clone(),
            change_set_name: d.change_set_name(),
            kind: ChangeSetKind::Update,
            template_body: d.template_body.clone(),
            template_url: None,
            artifacts: vec![],
            parameters,
            tags: d.tags_with_ownership(&env.name),
            description: String::new(),
            include_nested_stacks: false,
            revert_drift: false,
        })
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(3 * 24 * 3600)).await;

    let r = pass(&cloud, &env).await;
    assert_eq!(result(&r, "network"), &StackResult::Updated, "{r:#?}");
    assert_eq!(
        cloud.stack(&network).unwrap().parameters["FlowLogRetentionDays"],
        "14",
        "the stale change set was executed"
    );
    assert_eq!(r.verdict(), Verdict::InSync, "{r:#?}");
}

async fn pass_with(cloud: &Retrying<SimCloud>, env: &DesiredEnv, options: &Options) -> Report {
    apply::reconcile(
        cloud,
        env,
        &Semaphore::new(apply::DEFAULT_MAX_PARALLEL),
        options,
    )
    .await
    .expect("the pass observes")
}

#[tokio::test(start_paused = true)]
async fn a_redeploy_the_circuit_breaker_rolled_back_is_not_retried_until_the_desired_state_changes()
{
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 27)));
    // One controller's memory, shared by its passes.
    let options = Options::default();
    let r = pass_with(&cloud, &env, &options).await;
    let svc = &r.services[0];
    let (cluster, service) = (svc.cluster.clone().unwrap(), svc.service.clone().unwrap());
    let declared = r.final_plan.services[0].clone();
    assert_eq!(declared.action, apply_none());
    // Someone deploys another task definition; the stack's own is broken:
    // its tasks never start, and the circuit breaker rolls back.
    let stack_td = cloud
        .stack(&name(&env, "service"))
        .unwrap()
        .outputs
        .values()
        .find(|v| v.contains(":task-definition/"))
        .cloned()
        .expect("the stack's task definition");
    cloud.deploy_out_of_band(
        &cluster,
        &service,
        "arn:aws:ecs:sim:task-definition/hotfix:9",
    );
    cloud.break_task_definition(&stack_td);

    let r = pass_with(&cloud, &env, &options).await;
    assert!(
        matches!(&r.services[0].result, ServiceResult::Failed { reason } if reason.contains("rolled back to arn:aws:ecs:sim:task-definition/hotfix:9")),
        "{:#?}",
        r.services
    );
    assert_eq!(calls(&cloud, "UpdateService"), 1);

    // Every later pass leaves it alone, and says why: also a restarted
    // controller (no memory of its own), which reads ECS's deployment
    // history.
    for restarted in [false, true, true, false, true] {
        let fresh = Options::default();
        let r = pass_with(&cloud, &env, if restarted { &fresh } else { &options }).await;
        assert!(
            matches!(&r.services[0].result, ServiceResult::Blocked { by: BlockedBy::FailedRevision, reason } if reason.contains("rolled back")),
            "{:#?}",
            r.services
        );
        assert_eq!(r.final_plan.services[0].health, Health::Degraded);
    }
    assert_eq!(
        calls(&cloud, "UpdateService"),
        1,
        "the redeploy was retried"
    );

    // A new revision is a new decision: no longer held back (the history
    // before the stack's update to it does not count).
    let changed = dev_new_revision();
    let r = pass_with(&cloud, &changed, &Options::default()).await;
    assert!(
        !matches!(&r.services[0].result, ServiceResult::Blocked { .. }),
        "{:#?}",
        r.services
    );
}

fn apply_none() -> stackwarden::plan::ServiceAction {
    stackwarden::plan::ServiceAction::None
}

#[tokio::test(start_paused = true)]
async fn a_service_with_a_deployment_in_progress_is_never_acted_on() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(SimConfig {
        rollout_latency: Duration::from_secs(3 * 3600),
        ..config(&env, 28)
    }));
    let r = pass(&cloud, &env).await;
    let svc = &r.services[0];
    let (cluster, service) = (svc.cluster.clone().unwrap(), svc.service.clone().unwrap());
    // Another pipeline starts a deployment that takes hours.
    cloud
        .update_service(
            &cluster,
            &service,
            None,
            Some("arn:aws:ecs:sim:task-definition/other:3"),
        )
        .await
        .unwrap();
    let before = calls(&cloud, "UpdateService");
    let r = pass(&cloud, &env).await;
    assert!(
        matches!(&r.services[0].result, ServiceResult::Skipped { reason } if reason.contains("deployment is in progress")),
        "{:#?}",
        r.services
    );
    assert_eq!(
        calls(&cloud, "UpdateService"),
        before,
        "acted during a deployment"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stuck_rollback_is_continued_once_per_episode_then_only_with_skips() {
    let mut env = dev();
    env.policy.continue_rollback = true;
    let cloud = Retrying::new(SimCloud::new(config(&env, 29)));
    pass(&cloud, &env).await;
    let network = name(&env, "network");
    cloud.fail_update_rollback(&network, &["FlowLogGroup"]);

    // Continued once; it fails again on the same resource.
    let r = pass(&cloud, &env).await;
    assert!(
        matches!(result(&r, "network"), StackResult::Failed { reason } if reason.contains("UPDATE_ROLLBACK_FAILED")),
        "{r:#?}"
    );
    assert_eq!(calls(&cloud, "ContinueUpdateRollback"), 1);

    // Not again in this episode: blocked, naming the resource and the way out.
    for _ in 0..3 {
        let r = pass(&cloud, &env).await;
        assert!(
            matches!(result(&r, "network"), StackResult::Blocked { by: BlockedBy::RollbackFailedAgain, reason } if reason.contains("failed again on FlowLogGroup")),
            "{r:#?}"
        );
        let plan = r
            .final_plan
            .stacks
            .iter()
            .find(|s| s.is("network"))
            .unwrap();
        assert!(
            plan.reason.contains("policy.rollback_skip"),
            "{}",
            plan.reason
        );
    }
    assert_eq!(
        calls(&cloud, "ContinueUpdateRollback"),
        1,
        "retried in a loop"
    );

    // The desired state skips it: continued, skipping it, and done.
    env.policy
        .rollback_skip
        .insert(("network".into(), "FlowLogGroup".into()));
    let r = pass(&cloud, &env).await;
    assert_eq!(
        result(&r, "network"),
        &StackResult::RollbackContinued,
        "{r:#?}"
    );
    assert_eq!(calls(&cloud, "ContinueUpdateRollback"), 2);
    assert_eq!(
        cloud.stack(&network).unwrap().status.as_str(),
        "UPDATE_ROLLBACK_COMPLETE"
    );
}

#[tokio::test(start_paused = true)]
async fn a_new_revision_does_not_reset_a_service_autoscaling_scaled() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 30)));
    let r = pass(&cloud, &env).await;
    let svc = &r.services[0];
    let (cluster, service) = (svc.cluster.clone().unwrap(), svc.service.clone().unwrap());
    // Autoscaling scaled out, within the declared range.
    cloud.edit_desired_count(&cluster, &service, 2);
    // Every stack gets a new revision (a tags-only update for most).
    let r = pass(&cloud, &dev_new_revision()).await;
    assert_eq!(result(&r, "service"), &StackResult::Updated, "{r:#?}");
    assert_eq!(r.services[0].result, ServiceResult::InSync, "{r:#?}");
    assert_eq!(
        r.final_plan.services[0].desired,
        Some(2),
        "the update reset the count"
    );
}

#[tokio::test(start_paused = true)]
async fn an_execution_whose_answer_was_lost_is_retried_as_the_same_request() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 31)));
    // AWS carries out the first ExecuteChangeSet, but its answer is lost.
    cloud.lose_next_answer("ExecuteChangeSet");
    let r = pass(&cloud, &env).await;
    assert_eq!(r.verdict(), Verdict::InSync, "{r:#?}");
    for key in ALL {
        assert_eq!(result(&r, key), &StackResult::Created, "{key}");
        let n = cloud
            .executed()
            .iter()
            .filter(|(s, _)| *s == name(&env, key))
            .count();
        assert_eq!(n, 1, "{key} executed {n} times");
    }
    // The retry carried the same ClientRequestToken: AWS answered it as
    // the request it had already done, not as a second execution.
    assert_eq!(calls(&cloud, "ExecuteChangeSet"), ALL.len() as u64 + 1);
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());
}

fn table_replacement(logical_id: &str) -> stackwarden::cloud::ResourceChange {
    stackwarden::cloud::ResourceChange {
        action: stackwarden::cloud::ChangeAction::Modify,
        logical_id: logical_id.into(),
        resource_type: "AWS::DynamoDB::Table".into(),
        replacement: Some(stackwarden::cloud::Replacement::True),
        scope: vec!["Properties".into()],
        nested_change_set: None,
        drift: None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_protected_resource_replaced_inside_a_nested_stack_is_blocked() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 32)));
    pass(&cloud, &env).await;
    let dynamodb = name(&env, "dynamodb");
    // The stack's nested stack `Inner` would replace its table.
    cloud.nest(&dynamodb, "Inner", Some(vec![table_replacement("Archive")]));
    let mut changed = dev_new_revision();
    let r = pass(&cloud, &changed).await;
    assert!(
        matches!(result(&r, "dynamodb"), StackResult::Blocked { by: BlockedBy::Policy, reason } if reason.contains("Inner.Archive") && reason.contains("AWS::DynamoDB::Table")),
        "{r:#?}"
    );
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());

    // Explicitly allowed (`stack.Nested.LogicalId`), it runs.
    cloud.allow_replacement(&dynamodb, "Inner.Archive");
    changed
        .policy
        .allow_replacement
        .insert(("dynamodb".into(), "Inner.Archive".into()));
    let r = pass(&cloud, &changed).await;
    assert_eq!(result(&r, "dynamodb"), &StackResult::Updated, "{r:#?}");
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());
}

#[tokio::test(start_paused = true)]
async fn a_parent_whose_nested_change_set_cannot_be_read_is_not_executed() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 33)));
    pass(&cloud, &env).await;
    let dynamodb = name(&env, "dynamodb");
    cloud.nest(&dynamodb, "Inner", None);
    let executed = cloud.executed().len();
    let r = pass(&cloud, &dev_new_revision()).await;
    assert!(
        matches!(result(&r, "dynamodb"), StackResult::Blocked { by: BlockedBy::Uninspectable, reason } if reason.contains("nested stacks") && reason.contains("Inner")),
        "{r:#?}"
    );
    assert!(
        !cloud.executed()[executed..]
            .iter()
            .any(|(s, _)| *s == dynamodb),
        "the parent was executed"
    );
}

#[test]
fn a_seeded_history_replays_exactly_retry_jitter_included() {
    let run = || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        rt.block_on(async {
            let env = dev();
            // Throttling makes every pass wait on retry backoff and polls.
            let cloud = Retrying::new(SimCloud::new(SimConfig {
                throttle_rate: 0.3,
                ..config(&env, 34)
            }));
            let started = tokio::time::Instant::now();
            let r = pass(&cloud, &env).await;
            (cloud.calls(), started.elapsed(), r.verdict())
        })
    };
    let (a, b) = (run(), run());
    assert_eq!(a, b, "the same seeds gave two histories");
}

#[tokio::test(start_paused = true)]
async fn a_stale_read_after_a_redeploy_is_not_taken_for_a_rollback() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 35)));
    let options = Options::default();
    let r = pass_with(&cloud, &env, &options).await;
    let svc = &r.services[0];
    let (cluster, service) = (svc.cluster.clone().unwrap(), svc.service.clone().unwrap());
    cloud.deploy_out_of_band(
        &cluster,
        &service,
        "arn:aws:ecs:sim:task-definition/hotfix:9",
    );
    // The first reads after UpdateService still show the hotfix, settled.
    cloud.stale_reads_after_update(2);
    let r = pass_with(&cloud, &env, &options).await;
    assert!(
        matches!(&r.services[0].result, ServiceResult::Redeployed { .. }),
        "{:#?}",
        r.services
    );
    assert!(options.failed_redeploys.lock().unwrap().is_empty());
}

fn at(rfc3339: &str) -> std::time::SystemTime {
    std::time::SystemTime::from(rfc3339.parse::<jiff::Timestamp>().expect("a timestamp"))
}

/// A window that closes while a pass creates the environment: the stacks
/// already started finish, no new one starts, and the rest is held with
/// the window's reason. A pass outside the window writes nothing; one with
/// the override (`--ignore-windows`) converges and says it was ignored.
#[tokio::test(start_paused = true)]
async fn a_window_that_closes_mid_pass_stops_the_next_write_and_the_override_writes_anyway() {
    let ws = Workspace::new();
    // Open 2 minutes a day from midnight UTC; the simulation starts then.
    ws.dev_sync_window("{kind: allow, schedule: \"0 0 * * *\", duration: 2m}");
    let env = load(&ws);
    let cloud = Retrying::new(SimCloud::new(SimConfig {
        wall_clock_start: at("2026-01-01T00:00:00Z"),
        latency: sim::latencies(&env, &SERVICE_MINUTES),
        ..SimConfig::default()
    }));
    let first = pass(&cloud, &env).await;
    let created: Vec<&str> = first
        .stacks
        .iter()
        .filter(|s| s.result == StackResult::Created)
        .map(|s| s.id())
        .collect();
    assert!(
        !created.is_empty() && created.len() < ALL.len(),
        "{first:#?}"
    );
    let held: Vec<&str> = first
        .stacks
        .iter()
        .filter(|s| {
            matches!(&s.result, StackResult::Blocked { by: BlockedBy::SyncWindow, reason }
                if reason == "outside sync window")
        })
        .map(|s| s.id())
        .collect();
    assert!(!held.is_empty(), "{first:#?}");
    // Every stack is created, held, or waits on one that is.
    assert!(
        first.stacks.iter().all(|s| matches!(
            s.result,
            StackResult::Created | StackResult::Blocked { .. } | StackResult::Skipped { .. }
        )),
        "{first:#?}"
    );
    let w = first.final_plan.sync_window.as_ref().expect("reported");
    assert!(!w.open && !w.ignored, "{w:?}");
    assert_eq!(
        w.describe(),
        "outside sync window (opens at 2026-01-02 00:00 UTC)"
    );

    // Closed: a pass plans, and writes nothing.
    let writes = cloud.write_calls();
    let closed = pass(&cloud, &env).await;
    assert_eq!(cloud.write_calls(), writes);
    assert_eq!(closed.verdict(), Verdict::Differences);
    assert!(
        closed.final_plan.stacks.iter().any(|s| matches!(
            &s.action,
            stackwarden::plan::StackAction::Blocked {
                by: BlockedBy::SyncWindow,
                ..
            }
        )),
        "{:#?}",
        closed.final_plan
    );

    // The override converges, and says the window was ignored.
    let forced = apply::reconcile(
        &cloud,
        &env,
        &Semaphore::new(apply::DEFAULT_MAX_PARALLEL),
        &Options {
            depth: Depth::Full,
            jitter_seed: Some(0),
            ignore_windows: true,
            ..Options::default()
        },
    )
    .await
    .expect("the pass observes");
    assert_eq!(forced.verdict(), Verdict::InSync, "{forced:#?}");
    assert!(forced.window_overridden && !first.window_overridden);
    let w = forced.final_plan.sync_window.as_ref().expect("reported");
    assert!(!w.open && w.ignored, "{w:?}");
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());
}
