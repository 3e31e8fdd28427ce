//! The planner against the simulated cloud, on tokio's paused clock: the
//! states the emulator cannot produce (in-flight, failed, rolled back,
//! throttled) and invariants over many seeds.

use stackwarden::cloud::StackStatus;
use std::time::Duration;

use stackwarden::cloud::Retrying;
use stackwarden::cloud::sim::{self, SimCloud, SimConfig};
use stackwarden::cloud::{ChangeSetKind, Cloud};
use stackwarden::observe::{Depth, observe};
use stackwarden::plan::{
    BlockedBy, Health, Plan, StackAction, Sync, Verdict, plan, resolve_parameters,
};
use stackwarden::retry;
use stackwarden::spec::{self, DesiredEnv};

fn dev() -> DesiredEnv {
    spec::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("desired-state/dev.yaml"))
        .expect("dev loads")
}

/// Realistic per-stack latencies.
fn config(env: &DesiredEnv, seed: u64, throttle_rate: f64) -> SimConfig {
    SimConfig {
        seed,
        throttle_rate,
        latency: sim::latencies(env, &sim::SERVICE_MINUTES),
        ..SimConfig::default()
    }
}

/// Starts creating one stack through a change set (as apply will), and
/// returns once the execution has started.
async fn start_create(cloud: &Retrying<SimCloud>, env: &DesiredEnv, key: &str) {
    let observed = observe(cloud, env, Depth::Fast).await.expect("observe");
    let stack = &env.stacks[key];
    let parameters = resolve_parameters(stack, env, &observed).expect("upstream outputs exist");
    let request = stack.change_set_request(
        &env.name,
        stack.change_set_name(),
        ChangeSetKind::Create,
        parameters,
        String::new(),
    );
    retry::call(|| cloud.create_change_set(&request))
        .await
        .expect("create change set");
    tokio::time::advance(Duration::from_secs(3)).await;
    retry::call(|| cloud.execute_change_set(&stack.name, &request.change_set_name, None))
        .await
        .expect("execute");
}

/// Creates stacks one after the other, waiting for each.
async fn create_all(cloud: &Retrying<SimCloud>, env: &DesiredEnv, keys: &[&str]) {
    for key in keys {
        start_create(cloud, env, key).await;
        tokio::time::advance(Duration::from_secs(60 * 60)).await;
    }
}

async fn plan_now(cloud: &Retrying<SimCloud>, env: &DesiredEnv) -> Plan {
    plan(
        env,
        &observe(cloud, env, Depth::Fast).await.expect("observe"),
    )
}

fn stack<'p>(p: &'p Plan, key: &str) -> &'p stackwarden::plan::StackPlan {
    p.stacks.iter().find(|s| s.is(key)).expect("planned")
}

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

#[tokio::test(start_paused = true)]
async fn a_fully_created_environment_plans_clean_with_services_healthy() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 1, 0.0)));
    create_all(&cloud, &env, &ALL).await;
    let p = plan_now(&cloud, &env).await;
    assert_eq!(p.verdict(), Verdict::InSync, "{p:#?}");
    assert_eq!(p.services.len(), 1);
    assert_eq!(p.services[0].health, Health::Healthy);
    assert!(cloud.violations().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_stack_in_flight_is_waited_on_and_its_dependents_say_why() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 2, 0.0)));
    start_create(&cloud, &env, "network").await;
    tokio::time::advance(Duration::from_secs(60)).await;
    let p = plan_now(&cloud, &env).await;
    let network = stack(&p, "network");
    assert_eq!(
        network.action,
        StackAction::Wait {
            status: "CREATE_IN_PROGRESS".into()
        }
    );
    assert_eq!(network.health, Health::Progressing);
    let msk = stack(&p, "msk");
    assert_eq!(
        msk.action,
        StackAction::Skip {
            upstream: "network".into()
        }
    );
    assert!(
        msk.reason
            .contains("waiting on network: CREATE_IN_PROGRESS"),
        "{}",
        msk.reason
    );
    // Unrelated branches are not held back.
    assert_eq!(stack(&p, "dynamodb").action, StackAction::Create);
    assert_eq!(p.verdict(), Verdict::Differences);
}

#[tokio::test(start_paused = true)]
async fn a_failed_create_is_blocked_with_its_reason_and_its_dependents_skip() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 3, 0.0)));
    cloud.fail_next_operation(&env.stacks["network"].name);
    create_all(&cloud, &env, &["network"]).await;
    let p = plan_now(&cloud, &env).await;
    let network = stack(&p, "network");
    assert_eq!(network.status, Some(StackStatus::RollbackComplete));
    assert_eq!(network.health, Health::Failed);
    assert!(
        matches!(&network.action, StackAction::Blocked { reason, .. } if reason.contains("simulated failure")),
        "{network:?}"
    );
    assert!(
        network.reason.contains("policy.recreate_failed"),
        "{}",
        network.reason
    );
    for key in ["msk", "elasticache", "ecs-cluster"] {
        assert_eq!(
            stack(&p, key).action,
            StackAction::Skip {
                upstream: "network".into()
            },
            "{key}"
        );
    }
    assert_eq!(stack(&p, "dynamodb").action, StackAction::Create);
    // Regression (found by the seed test): stacks reached through a pending
    // upstream (iam waits on dynamodb too) must still stop at the failure.
    for key in ["iam", "alb", "service"] {
        assert!(
            matches!(stack(&p, key).action, StackAction::Skip { .. }),
            "{key}: {:?}",
            stack(&p, key).action
        );
    }
    assert_eq!(p.verdict(), Verdict::Failed);
}

#[tokio::test(start_paused = true)]
async fn recreate_is_planned_only_when_allowed_and_never_for_a_stack_holding_protected_resources() {
    let mut env = dev();
    env.policy.recreate_failed = true;
    let cloud = Retrying::new(SimCloud::new(config(&env, 4, 0.0)));
    // A policy that leaves log groups unprotected: network then holds no
    // protected resource.
    env.policy.protect.remove("AWS::Logs::LogGroup");
    cloud.fail_next_operation(&env.stacks["network"].name);
    create_all(&cloud, &env, &["network"]).await;
    cloud.fail_next_operation(&env.stacks["dynamodb"].name);
    create_all(&cloud, &env, &["dynamodb"]).await;
    // The revision that failed is never retried, even with recreate_failed.
    let p = plan_now(&cloud, &env).await;
    assert!(
        matches!(&stack(&p, "network").action, StackAction::Blocked { reason, .. } if reason.contains("creation of revision")),
        "{:?}",
        stack(&p, "network")
    );
    // A new revision (the operator's fix) is recreated.
    let mut fixed = env.clone();
    for s in fixed.stacks.values_mut() {
        s.revision = format!("f{}", &s.revision[1..]);
    }
    let p = plan_now(&cloud, &fixed).await;
    assert_eq!(stack(&p, "network").action, StackAction::Recreate);
    let dynamodb = stack(&p, "dynamodb");
    assert!(
        matches!(dynamodb.action, StackAction::Blocked { .. }),
        "{dynamodb:?}"
    );
    assert!(
        dynamodb.reason.contains("never recreated automatically"),
        "{}",
        dynamodb.reason
    );
}

#[tokio::test(start_paused = true)]
async fn update_rollback_failed_is_continued_only_when_the_policy_says_so() {
    let mut env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 5, 0.0)));
    create_all(&cloud, &env, &["network"]).await;
    cloud.force_status(
        &env.stacks["network"].name,
        "UPDATE_ROLLBACK_FAILED",
        "NAT gateway could not be restored",
    );
    let p = plan_now(&cloud, &env).await;
    assert!(
        matches!(&stack(&p, "network").action, StackAction::Blocked { reason, .. } if reason.contains("NAT gateway"))
    );
    env.policy.continue_rollback = true;
    let p = plan_now(&cloud, &env).await;
    assert!(
        matches!(&stack(&p, "network").action, StackAction::ContinueRollback { skip, token } if skip.is_empty() && token.starts_with("stackwarden-")),
        "{:?}",
        stack(&p, "network").action
    );
}

/// Every status is classified once: a rolled-back import is degraded like
/// a rolled-back update, the documented failed states need a person, and a
/// status AWS adds later is never taken for healthy. Observe mode blocks
/// only what would write, with the kind of block typed.
#[tokio::test(start_paused = true)]
async fn every_stack_status_is_classified_and_an_unknown_one_is_never_healthy() {
    let mut env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 8, 0.0)));
    create_all(&cloud, &env, &["network"]).await;
    let network = env.stacks["network"].name.clone();
    for (status, health, by) in [
        ("IMPORT_ROLLBACK_COMPLETE", Health::Degraded, None),
        (
            "UPDATE_FAILED",
            Health::Failed,
            Some(BlockedBy::FailedState),
        ),
        (
            "DELETE_FAILED",
            Health::Failed,
            Some(BlockedBy::FailedState),
        ),
        (
            "IMPORT_ROLLBACK_FAILED",
            Health::Failed,
            Some(BlockedBy::FailedState),
        ),
        (
            "A_STATUS_FROM_THE_FUTURE",
            Health::Failed,
            Some(BlockedBy::FailedState),
        ),
    ] {
        cloud.force_status(&network, status, "why");
        let p = plan_now(&cloud, &env).await;
        let s = stack(&p, "network");
        assert_eq!(
            (s.health, s.status.as_ref().map(StackStatus::as_str)),
            (health, Some(status))
        );
        match by {
            Some(want) => assert!(
                matches!(s.action, StackAction::Blocked { by, .. } if by == want),
                "{status}: {s:?}"
            ),
            None => assert!(
                !matches!(s.action, StackAction::Blocked { .. }),
                "{status}: {s:?}"
            ),
        }
        // Dependents never go ahead of a failed upstream.
        if health == Health::Failed {
            assert!(!stack(&p, "msk").action.mutates(), "{status}");
        }
    }
    cloud.force_status(&network, "CREATE_COMPLETE", "");
    env.policy.mode = stackwarden::spec::Mode::Observe;
    let p = plan_now(&cloud, &env).await;
    let dynamodb = stack(&p, "dynamodb");
    assert!(
        matches!(
            dynamodb.action,
            StackAction::Blocked {
                by: BlockedBy::ObserveMode,
                ..
            }
        ) && dynamodb.reason.ends_with("; observe mode"),
        "{dynamodb:?}"
    );
    assert!(
        p.stacks.iter().all(|s| !s.action.mutates())
            && p.services.iter().all(|s| !s.action.mutates()),
        "observe mode writes nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn an_out_of_band_scale_outside_the_autoscaling_range_is_planned_back() {
    let env = dev();
    let cloud = Retrying::new(SimCloud::new(config(&env, 6, 0.0)));
    create_all(&cloud, &env, &ALL).await;
    let p = plan_now(&cloud, &env).await;
    let (cluster, service) = (
        p.services[0].cluster.clone().unwrap(),
        p.services[0].service.clone().unwrap(),
    );
    cloud.edit_desired_count(&cluster, &service, 7);
    let p = plan_now(&cloud, &env).await;
    assert_eq!(
        p.services[0].action,
        stackwarden::plan::ServiceAction::Scale { from: 7, to: 2 }
    );
    // Inside the range is autoscaling's business, not drift.
    cloud.edit_desired_count(&cluster, &service, 2);
    assert_eq!(plan_now(&cloud, &env).await.verdict(), Verdict::InSync);
}

#[tokio::test(start_paused = true)]
async fn observe_mode_plans_no_mutation() {
    let mut env = dev();
    env.policy.mode = spec::Mode::Observe;
    let cloud = Retrying::new(SimCloud::new(config(&env, 7, 0.0)));
    create_all(&cloud, &env, &["network", "dynamodb"]).await;
    cloud.edit_parameter(&env.stacks["network"].name, "FlowLogRetentionDays", "90");
    let p = plan_now(&cloud, &env).await;
    assert!(p.stacks.iter().all(|s| !s.action.mutates()), "{p:#?}");
    assert_eq!(stack(&p, "network").sync, Sync::OutOfSync);
    assert_eq!(p.verdict(), Verdict::Differences);
}

/// Over many seeds: random progress through a deployment with random
/// failures, stuck stacks, out-of-band edits and throttling, the planner
/// keeps its guarantees.
#[tokio::test(start_paused = true)]
async fn planner_invariants_hold_over_100_seeds() {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let env = dev();
    for seed in 0..100u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let cloud = Retrying::new(SimCloud::new(config(&env, seed, 0.1)));
        let mut started = Vec::new();
        for wave in &env.waves {
            for key in wave {
                let ready = env.stacks[key].depends_on.iter().all(|d| {
                    cloud
                        .stack(&env.stacks[d].name)
                        .is_some_and(|s| s.status == StackStatus::CreateComplete)
                });
                if !ready || rng.gen_bool(0.2) {
                    continue;
                }
                let name = &env.stacks[key].name;
                if rng.gen_bool(0.15) {
                    cloud.fail_next_operation(name);
                }
                if rng.gen_bool(0.1) {
                    cloud.stick(name);
                }
                start_create(&cloud, &env, key).await;
                started.push(key.clone());
                tokio::time::advance(Duration::from_secs(rng.gen_range(0..3600))).await;
            }
        }
        if let Some(key) = started.first()
            && cloud
                .stack(&env.stacks[key].name)
                .is_some_and(|s| s.status == StackStatus::CreateComplete)
            && rng.gen_bool(0.5)
        {
            cloud.edit_parameter(&env.stacks[key].name, "Environment", "staging");
        }
        let observed = loop {
            if let Ok(o) = observe(&cloud, &env, Depth::Full).await {
                break o;
            }
        };
        let p = plan(&env, &observed);
        let again = plan(&env, &observed);
        assert_eq!(p, again, "seed {seed}: planning is deterministic");
        let waves: Vec<usize> = p
            .stacks
            .iter()
            .filter(|s| s.wave > 0)
            .map(|s| s.wave)
            .collect();
        assert!(
            waves.windows(2).all(|w| w[0] <= w[1]),
            "seed {seed}: wave order"
        );
        for s in &p.stacks {
            let live = observed.stacks.get(&s.name);
            let key = s.id();
            if live.is_some_and(|l| l.in_progress() && l.status != StackStatus::ReviewInProgress) {
                assert!(
                    !s.action.mutates(),
                    "seed {seed}: {} mutates while in flight",
                    key
                );
            }
            if let StackAction::Update { .. } = s.action {
                for dep in &env.stacks[key].depends_on {
                    let d = stack(&p, dep);
                    assert_eq!(
                        d.action,
                        StackAction::None,
                        "seed {seed}: {} updates before {dep}",
                        key
                    );
                }
            }
            if s.health == Health::Failed {
                for dep in env.dependents_of(key) {
                    assert!(
                        !stack(&p, &dep).action.mutates(),
                        "seed {seed}: {dep} proceeds past failed {key}"
                    );
                }
            }
        }
        assert!(
            cloud.violations().is_empty(),
            "seed {seed}: {:?}",
            cloud.violations()
        );
    }
}
