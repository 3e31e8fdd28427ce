//! `stackwarden reconcile --once`, the real binary against the emulator
//! through the real AWS SDK: create from empty in dependency order, a
//! steady state that writes nothing, out-of-band edits converged, a
//! dangerous change refused, observe mode, and refusals that change nothing.

mod common;

use std::collections::BTreeMap;
use std::process::Output;

use aws_sdk_cloudformation::types::{Capability, Parameter};
use common::{
    Emulator, Workspace, desired_count, every_stack_in_sync, run, stack_result, stderr, stdout,
};
use stackwarden::spec;

const SERVICE_CLUSTER: &str = "dev-performance-mgmt";

fn reconcile(emu: &Emulator, args: &[&str]) -> (Output, serde_json::Value) {
    let out = run(emu
        .command()
        .args(["reconcile", "--once", "-e", "dev", "-o", "json"])
        .args(args));
    let v = serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| {
        panic!(
            "reconcile JSON: {e}\nstdout:\n{}\nstderr:\n{}",
            stdout(&out),
            stderr(&out)
        )
    });
    (out, v)
}

fn dev() -> spec::DesiredEnv {
    spec::load(&common::repo().join("desired-state/dev.yaml")).expect("dev loads")
}

async fn live_stacks(
    config: &aws_config::SdkConfig,
) -> BTreeMap<String, aws_sdk_cloudformation::types::Stack> {
    let cfn = aws_sdk_cloudformation::Client::new(config);
    cfn.describe_stacks()
        .send()
        .await
        .expect("DescribeStacks")
        .stacks()
        .iter()
        .map(|s| (s.stack_name().unwrap().to_owned(), s.clone()))
        .collect()
}

#[tokio::test]
async fn reconcile_once_creates_every_stack_in_dependency_order_then_changes_nothing() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let env = dev();

    let (out, v) = reconcile(emu, &[]);
    assert_eq!(out.status.code(), Some(0), "{v}\n{}", stderr(&out));
    assert_eq!(v[0]["verdict"], "in_sync");
    for s in env.stacks.values() {
        assert_eq!(stack_result(&v, &s.key)["result"]["kind"], "created", "{v}");
    }
    // Progress on stderr names each stack as it starts.
    assert!(
        stderr(&out).contains("dev/network: create"),
        "{}",
        stderr(&out)
    );

    // Each stack was created after every stack it depends on completed.
    let live = live_stacks(&config).await;
    assert_eq!(live.len(), 8);
    let created = |key: &str| {
        let s = &live[&env.stacks[key].name];
        assert_eq!(
            s.stack_status().unwrap().as_str(),
            "CREATE_COMPLETE",
            "{key}"
        );
        *s.creation_time().unwrap()
    };
    for s in env.stacks.values() {
        for d in &s.depends_on {
            assert!(
                created(d) < created(&s.key),
                "{} was created before its upstream {d}",
                s.key
            );
        }
    }

    // Steady state: the reads of one observation (one DescribeStacks page,
    // eight GetTemplate, one DescribeServices batch) and nothing else.
    let (out, v) = reconcile(emu, &[]);
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert_eq!(v[0]["api_calls"], 10, "{v}");
    assert!(every_stack_in_sync(&v), "{v}");
    let (out, v) = reconcile(emu, &["--fast"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(v[0]["api_calls"], 2, "{v}");
}

#[tokio::test]
async fn out_of_band_parameter_and_desired_count_changes_are_converged() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let env = dev();
    let (out, v) = reconcile(emu, &[]);
    assert_eq!(out.status.code(), Some(0), "{v}");

    // A console edit of a parameter, and a manual scale-out.
    let cfn = aws_sdk_cloudformation::Client::new(&config);
    let network = &env.stacks["network"].name;
    let live = &live_stacks(&config).await[network];
    let params = live.parameters().iter().map(|p| {
        let key = p.parameter_key().unwrap();
        if key == "FlowLogRetentionDays" {
            Parameter::builder()
                .parameter_key(key)
                .parameter_value("30")
                .build()
        } else {
            Parameter::builder()
                .parameter_key(key)
                .use_previous_value(true)
                .build()
        }
    });
    cfn.update_stack()
        .stack_name(network)
        .use_previous_template(true)
        .set_parameters(Some(params.collect()))
        .capabilities(Capability::CapabilityNamedIam)
        .send()
        .await
        .expect("UpdateStack");
    let service = v[0]["report"]["services"][0]["service"]
        .as_str()
        .unwrap()
        .to_owned();
    aws_sdk_ecs::Client::new(&config)
        .update_service()
        .cluster(SERVICE_CLUSTER)
        .service(&service)
        .desired_count(5)
        .send()
        .await
        .expect("UpdateService");

    let plan = run(emu.command().args(["plan", "-e", "dev"]));
    assert_eq!(plan.status.code(), Some(2));
    assert!(
        stdout(&plan).contains("FlowLogRetentionDays: 30 -> 14"),
        "{}",
        stdout(&plan)
    );

    let (out, v) = reconcile(emu, &[]);
    assert_eq!(out.status.code(), Some(0), "{v}\n{}", stderr(&out));
    assert_eq!(stack_result(&v, "network")["result"]["kind"], "updated");
    assert_eq!(
        v[0]["report"]["services"][0]["result"],
        serde_json::json!({"kind": "scaled", "from": 5, "to": 2})
    );
    let live = &live_stacks(&config).await[network];
    let retention = live
        .parameters()
        .iter()
        .find(|p| p.parameter_key() == Some("FlowLogRetentionDays"))
        .and_then(|p| p.parameter_value());
    assert_eq!(retention, Some("14"));
    assert_eq!(desired_count(&config, SERVICE_CLUSTER, &service).await, 2);

    let plan = run(emu.command().args(["plan", "-e", "dev"]));
    assert_eq!(plan.status.code(), Some(0), "{}", stdout(&plan));
}

#[tokio::test]
async fn a_change_that_would_replace_a_protected_table_exits_2_and_leaves_it_untouched() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let (out, v) = reconcile(emu, &[]);
    assert_eq!(out.status.code(), Some(0), "{v}");
    let env = dev();
    let cfn = aws_sdk_cloudformation::Client::new(&config);
    let dynamodb = &env.stacks["dynamodb"].name;
    let before = cfn
        .get_template()
        .stack_name(dynamodb)
        .send()
        .await
        .unwrap()
        .template_body()
        .unwrap()
        .to_owned();

    let ws = Workspace::new();
    ws.edit(
        "templates/dynamodb.yaml",
        "- {AttributeName: cycleId, KeyType: HASH}",
        "- {AttributeName: organizationId, KeyType: HASH}",
    );
    let ds = ws.desired_state().display().to_string();
    let (out, v) = reconcile(emu, &["--desired-state", &ds]);
    assert_eq!(out.status.code(), Some(2), "{v}\n{}", stderr(&out));
    let r = stack_result(&v, "dynamodb");
    assert_eq!(r["result"]["kind"], "blocked", "{v}");
    let reason = r["result"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("ReviewCyclesTable") && reason.contains("AWS::DynamoDB::Table"),
        "{reason}"
    );
    // Its dependents wait for it.
    assert_eq!(stack_result(&v, "iam")["result"]["kind"], "skipped");

    let after = cfn
        .get_template()
        .stack_name(dynamodb)
        .send()
        .await
        .unwrap()
        .template_body()
        .unwrap()
        .to_owned();
    assert_eq!(before, after, "the table's stack was not updated");
    let live = &live_stacks(&config).await[dynamodb];
    assert_eq!(live.stack_status().unwrap().as_str(), "CREATE_COMPLETE");
}

#[tokio::test]
async fn observe_mode_exits_2_and_writes_nothing() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let ws = Workspace::new();
    ws.edit("desired-state/dev.yaml", "mode: converge", "mode: observe");
    let ds = ws.desired_state().display().to_string();
    let (out, v) = reconcile(emu, &["--desired-state", &ds]);
    assert_eq!(out.status.code(), Some(2), "{v}");
    assert_eq!(stack_result(&v, "network")["result"]["kind"], "blocked");
    assert!(live_stacks(&config).await.is_empty());
}

#[tokio::test]
async fn the_wrong_account_is_refused_and_nothing_is_created() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let ws = Workspace::new();
    ws.edit(
        "desired-state/dev.yaml",
        "account_id: \"123456789012\"",
        "account_id: \"999999999999\"",
    );
    let ds = ws.desired_state().display().to_string();
    let (out, v) = reconcile(emu, &["--desired-state", &ds]);
    assert_eq!(out.status.code(), Some(1), "{v}");
    let reason = stack_result(&v, "network")["result"]["reason"]
        .as_str()
        .unwrap();
    assert!(reason.contains("999999999999"), "{reason}");
    assert!(live_stacks(&config).await.is_empty());
}

#[tokio::test]
async fn invalid_desired_state_applies_nothing_in_any_environment() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let ws = Workspace::new();
    ws.edit(
        "desired-state/staging.yaml",
        "region:",
        "colour: blue\nregion:",
    );
    let ds = ws.desired_state().display().to_string();
    let out = run(emu
        .command()
        .args(["reconcile", "--once", "--desired-state", &ds]));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("staging.yaml") && err.contains("colour"),
        "{err}"
    );
    assert!(err.contains("nothing was applied"), "{err}");
    assert!(live_stacks(&config).await.is_empty());
}

#[tokio::test]
async fn termination_protection_is_set_after_create_and_turned_off_when_undeclared() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let env = dev();
    let network = env.stacks["network"].name.clone();
    let ws = Workspace::new();
    ws.edit(
        "desired-state/dev.yaml",
        "  network:\n    template: ../templates/network.yaml",
        "  network:\n    template: ../templates/network.yaml\n    termination_protection: true",
    );
    let ds = ws.desired_state().display().to_string();
    let (out, v) = reconcile(emu, &["--desired-state", &ds]);
    assert_eq!(out.status.code(), Some(0), "{v}\n{}", stderr(&out));
    let protected = |live: &BTreeMap<String, aws_sdk_cloudformation::types::Stack>| {
        live[&network].enable_termination_protection()
    };
    assert_eq!(protected(&live_stacks(&config).await), Some(true));
    // AWS (and the shim) refuse to delete it now.
    let refused = aws_sdk_cloudformation::Client::new(&config)
        .delete_stack()
        .stack_name(&network)
        .send()
        .await;
    assert!(refused.is_err());

    ws.edit(
        "desired-state/dev.yaml",
        "    termination_protection: true\n",
        "",
    );
    let (out, v) = reconcile(emu, &["--desired-state", &ds]);
    assert_eq!(out.status.code(), Some(0), "{v}\n{}", stderr(&out));
    assert_eq!(protected(&live_stacks(&config).await), Some(false));
}

#[tokio::test]
async fn a_tag_change_in_the_desired_state_converges() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let ws = Workspace::new();
    let ds = ws.desired_state().display().to_string();
    let (out, v) = reconcile(emu, &["--desired-state", &ds]);
    assert_eq!(out.status.code(), Some(0), "{v}");
    ws.edit(
        "desired-state/dev.yaml",
        "CostCenter: hr-platform",
        "CostCenter: people-platform",
    );
    let (out, v) = reconcile(emu, &["--desired-state", &ds]);
    assert_eq!(out.status.code(), Some(0), "{v}\n{}", stderr(&out));
    for (name, s) in live_stacks(&config).await {
        let cost = s
            .tags()
            .iter()
            .find(|t| t.key() == Some("CostCenter"))
            .and_then(|t| t.value());
        assert_eq!(cost, Some("people-platform"), "{name}");
    }
    let plan = run(emu
        .command()
        .args(["plan", "-e", "dev", "--desired-state", &ds]));
    assert_eq!(plan.status.code(), Some(0), "{}", stdout(&plan));
}

/// Creates a stack directly, as another deployment or an old revision did.
async fn create_stack_elsewhere(
    config: &aws_config::SdkConfig,
    name: &str,
    body: &str,
    tags: &[(&str, &str)],
) {
    let cfn = aws_sdk_cloudformation::Client::new(config);
    let mut req = cfn.create_stack().stack_name(name).template_body(body);
    for (k, v) in tags {
        req = req.tags(
            aws_sdk_cloudformation::types::Tag::builder()
                .key(*k)
                .value(*v)
                .build(),
        );
    }
    req.send().await.expect("CreateStack");
}

#[tokio::test]
async fn prune_never_deletes_another_owners_stack_nor_an_orphan_holding_a_protected_resource() {
    const TOPIC: &str = "Resources:\n  T: {Type: AWS::SNS::Topic}\n";
    const TABLE: &str = "Resources:\n  T:\n    Type: AWS::DynamoDB::Table\n    Properties:\n      TableName: old-orphan-table\n      KeySchema: [{AttributeName: id, KeyType: HASH}]\n      AttributeDefinitions: [{AttributeName: id, AttributeType: S}]\n      BillingMode: PAY_PER_REQUEST\n";
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let owner = dev().owner.expect("the shipped files have an owner");
    let env = ("stackwarden:environment", "dev");
    create_stack_elsewhere(
        &config,
        "dev-other-team",
        TOPIC,
        &[env, ("stackwarden:owner", "another-team")],
    )
    .await;
    create_stack_elsewhere(
        &config,
        "dev-old-table",
        TABLE,
        &[env, ("stackwarden:owner", &owner)],
    )
    .await;
    create_stack_elsewhere(
        &config,
        "dev-old-topic",
        TOPIC,
        &[env, ("stackwarden:owner", &owner)],
    )
    .await;

    let ws = Workspace::new();
    ws.edit("desired-state/dev.yaml", "prune: false", "prune: true");
    let ds = ws.desired_state().display().to_string();
    let (out, v) = reconcile(emu, &["--desired-state", &ds]);
    // The blocked orphan is a difference that remains.
    assert_eq!(out.status.code(), Some(2), "{v}\n{}", stderr(&out));
    let live = live_stacks(&config).await;
    let alive = |name: &str| {
        live.get(name)
            .is_some_and(|s| s.stack_status().map(|s| s.as_str()) != Some("DELETE_COMPLETE"))
    };
    assert!(alive("dev-other-team"), "another owner's stack was deleted");
    assert!(
        alive("dev-old-table"),
        "an orphan holding a table was deleted"
    );
    assert!(!alive("dev-old-topic"), "our plain orphan was not pruned");
    let stacks = v[0]["report"]["stacks"].as_array().unwrap();
    assert!(!stacks.iter().any(|s| s["name"] == "dev-other-team"), "{v}");
    let table = stacks
        .iter()
        .find(|s| s["name"] == "dev-old-table")
        .expect("reported");
    assert_eq!(table["result"]["kind"], "blocked", "{v}");
    assert!(
        table["result"]["reason"]
            .as_str()
            .unwrap()
            .contains("AWS::DynamoDB::Table")
    );
}

/// Someone deploys another task definition by hand: the pass redeploys the
/// stack's own, asking ECS's deployment history first (the emulator's holds
/// no rolled-back deployment), and the next pass is in sync.
#[tokio::test]
async fn an_out_of_band_task_definition_is_redeployed_back() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let (out, v) = reconcile(emu, &[]);
    assert_eq!(out.status.code(), Some(0), "{v}");
    let service = v[0]["report"]["services"][0]["service"]
        .as_str()
        .unwrap()
        .to_owned();
    let ecs = aws_sdk_ecs::Client::new(&config);
    let described = ecs
        .describe_services()
        .cluster(SERVICE_CLUSTER)
        .services(&service)
        .send()
        .await
        .expect("DescribeServices");
    let declared = described.services()[0]
        .task_definition()
        .expect("a task definition")
        .to_owned();
    let hotfix = ecs
        .register_task_definition()
        .family("hotfix")
        .container_definitions(
            aws_sdk_ecs::types::ContainerDefinition::builder()
                .name("app")
                .image("public.ecr.aws/docker/library/busybox:latest")
                .memory(128)
                .build(),
        )
        .send()
        .await
        .expect("RegisterTaskDefinition")
        .task_definition()
        .and_then(|t| t.task_definition_arn())
        .expect("an ARN")
        .to_owned();
    ecs.update_service()
        .cluster(SERVICE_CLUSTER)
        .service(&service)
        .task_definition(&hotfix)
        .send()
        .await
        .expect("UpdateService");

    let (out, v) = reconcile(emu, &[]);
    assert_eq!(out.status.code(), Some(0), "{v}\n{}", stderr(&out));
    assert_eq!(
        v[0]["report"]["services"][0]["result"],
        serde_json::json!({"kind": "redeployed", "task_definition": declared})
    );
    let (out, v) = reconcile(emu, &[]);
    assert_eq!(out.status.code(), Some(0), "{v}\n{}", stderr(&out));
    assert_eq!(v[0]["report"]["services"][0]["result"]["kind"], "in_sync");
}
