//! `stackwarden plan` and `status`, the real binary against the emulator
//! through the real AWS SDK (configured by AWS_ENDPOINT_URL, as a user would).

mod common;

use std::collections::BTreeMap;

use aws_sdk_cloudformation::types::{Capability, Parameter, Tag};
use common::{Emulator, Workspace, run, stderr, stdout};
use stackwarden::spec;

/// Creates every stack of `env` the way the old deploy scripts did (plain
/// CreateStack, in dependency order), with the parameters and tags the
/// desired state declares, so stackwarden finds them in sync.
async fn deploy_like_the_old_scripts(config: &aws_config::SdkConfig, env: &spec::DesiredEnv) {
    let cfn = aws_sdk_cloudformation::Client::new(config);
    let mut outputs: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for stack in env.order() {
        let params = stack.parameters.iter().map(|(k, v)| {
            let value = match v {
                spec::Value::Literal(s) => s.clone(),
                spec::Value::Output { stack, output } => outputs[stack][output].clone(),
            };
            Parameter::builder()
                .parameter_key(k)
                .parameter_value(value)
                .build()
        });
        let tags = stack
            .tags_with_ownership(&env.name)
            .into_iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build());
        cfn.create_stack()
            .stack_name(&stack.name)
            .template_body(&stack.template_body)
            .set_parameters(Some(params.collect()))
            .set_tags(Some(tags.collect()))
            .capabilities(Capability::CapabilityNamedIam)
            .send()
            .await
            .expect("CreateStack");
        let described = cfn
            .describe_stacks()
            .stack_name(&stack.name)
            .send()
            .await
            .expect("DescribeStacks");
        let s = &described.stacks()[0];
        assert_eq!(
            s.stack_status().map(|s| s.as_str()),
            Some("CREATE_COMPLETE"),
            "{}",
            stack.name
        );
        outputs.insert(
            stack.key.clone(),
            s.outputs()
                .iter()
                .map(|o| {
                    (
                        o.output_key().unwrap().to_owned(),
                        o.output_value().unwrap().to_owned(),
                    )
                })
                .collect(),
        );
    }
}

fn plan_json(emu: &Emulator, args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let out = run(emu
        .command()
        .args(["plan", "-e", "dev", "-o", "json"])
        .args(args));
    let v = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("plan JSON: {e}\n{}\n{}", stdout(&out), stderr(&out)));
    (out.status.code(), v, stderr(&out))
}

#[tokio::test]
async fn plan_on_an_empty_account_creates_every_stack_in_dependency_order() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let out = run(emu.command().args(["plan", "-e", "dev"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let text = stdout(&out);
    let order: Vec<&str> = text
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1))
        .take(8)
        .collect();
    assert_eq!(
        order,
        [
            "dynamodb",
            "network",
            "ecs-cluster",
            "elasticache",
            "msk",
            "iam",
            "alb",
            "service"
        ],
        "{text}"
    );
    assert!(text.contains("created once network complete"), "{text}");

    let (code, v, _) = plan_json(emu, &[]);
    assert_eq!(code, Some(2));
    let stacks = v[0]["stacks"].as_array().unwrap();
    assert_eq!(stacks.len(), 8);
    assert!(
        stacks
            .iter()
            .all(|s| s["action"]["kind"] == "create" && s["sync"] == "Missing"),
        "{v}"
    );
    assert_eq!(v[0]["verdict"], "differences");
}

#[tokio::test]
async fn plan_is_clean_after_the_stacks_exist_and_names_an_out_of_band_change() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let env = spec::load(&common::repo().join("desired-state/dev.yaml")).expect("dev loads");
    deploy_like_the_old_scripts(&config, &env).await;

    let out = run(emu.command().args(["plan", "-e", "dev", "--stats"]));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    // Steady state: one DescribeStacks page and one DescribeServices batch.
    assert!(
        stderr(&out).contains("dev: 2 AWS API calls"),
        "{}",
        stderr(&out)
    );

    // A full comparison fetches every template and still finds them equal.
    let (code, _, _) = plan_json(emu, &["--full"]);
    assert_eq!(code, Some(0));

    // Someone changes a parameter by hand.
    let cfn = aws_sdk_cloudformation::Client::new(&config);
    let name = "dev-performance-mgmt-elasticache";
    let body = cfn
        .get_template()
        .stack_name(name)
        .send()
        .await
        .unwrap()
        .template_body()
        .unwrap()
        .to_owned();
    let live = cfn.describe_stacks().stack_name(name).send().await.unwrap();
    let params = live.stacks()[0].parameters().iter().map(|p| {
        let value = if p.parameter_key() == Some("SnapshotRetentionDays") {
            "5"
        } else {
            p.parameter_value().unwrap()
        };
        Parameter::builder()
            .parameter_key(p.parameter_key().unwrap())
            .parameter_value(value)
            .build()
    });
    cfn.update_stack()
        .stack_name(name)
        .template_body(body)
        .set_parameters(Some(params.collect()))
        .send()
        .await
        .expect("UpdateStack");

    let out = run(emu.command().args(["plan", "-e", "dev"]));
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(
        text.contains("parameter SnapshotRetentionDays: 5 -> 1"),
        "{text}"
    );
    let (_, v, _) = plan_json(emu, &[]);
    let ec = v[0]["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["key"] == "elasticache")
        .unwrap();
    assert_eq!(ec["action"]["kind"], "update");
    assert_eq!(ec["diff"]["parameters"][0]["key"], "SnapshotRetentionDays");

    // status agrees and exits the same way.
    let out = run(emu.command().args(["status", "-e", "dev"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stdout(&out).contains("OutOfSync"), "{}", stdout(&out));
}

#[tokio::test]
async fn plan_change_sets_shows_resource_changes_and_leaves_nothing_behind() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let env = spec::load(&common::repo().join("desired-state/dev.yaml")).expect("dev loads");
    deploy_like_the_old_scripts(&config, &env).await;

    // The desired state changes the ReviewCycles table's key schema.
    let ws = Workspace::new();
    ws.edit("templates/dynamodb.yaml", "        - {AttributeName: cycleId, KeyType: HASH}\n", "        - {AttributeName: organizationId, KeyType: HASH}\n        - {AttributeName: cycleId, KeyType: RANGE}\n");
    let out = run(emu
        .command()
        .args(["plan", "-e", "dev", "--change-sets", "--desired-state"])
        .arg(ws.desired_state()));
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(2), "{text}\n{}", stderr(&out));
    assert!(text.contains("change set for dynamodb:"), "{text}");
    assert!(
        text.lines().any(|l| l.contains("ReviewCyclesTable")
            && l.contains("AWS::DynamoDB::Table")
            && l.contains("Modify")),
        "{text}"
    );
    // The preview is judged as a pass would judge it: reconcile would
    // refuse this change set.
    let verdict = text
        .split("reconcile would not execute it")
        .nth(1)
        .unwrap_or_else(|| panic!("no policy verdict: {text}"));
    assert!(
        verdict.contains("ReviewCyclesTable (AWS::DynamoDB::Table)")
            && verdict.contains("replaced"),
        "{text}"
    );

    let cfn = aws_sdk_cloudformation::Client::new(&config);
    for stack in env.stacks.values() {
        let sets = cfn
            .list_change_sets()
            .stack_name(&stack.name)
            .send()
            .await
            .unwrap();
        assert!(
            sets.summaries().is_empty(),
            "{} kept a change set",
            stack.name
        );
    }
}

#[tokio::test]
async fn plan_without_change_sets_makes_no_write_call() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let out = run(emu.command().args(["plan", "-e", "dev"]));
    assert_eq!(out.status.code(), Some(2));
    let config = emu.sdk_config().await;
    let cfn = aws_sdk_cloudformation::Client::new(&config);
    assert!(
        cfn.describe_stacks()
            .send()
            .await
            .unwrap()
            .stacks()
            .is_empty(),
        "plan created something"
    );
}

#[tokio::test]
async fn plan_change_sets_on_an_empty_account_leaves_no_stack_and_no_change_set() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let out = run(emu.command().args(["plan", "-e", "dev", "--change-sets"]));
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(2), "{text}\n{}", stderr(&out));
    // The stacks without upstream outputs were previewed as creations.
    assert!(text.contains("change set for network:"), "{text}");
    assert!(text.contains("change set for dynamodb:"), "{text}");

    let config = emu.sdk_config().await;
    let cfn = aws_sdk_cloudformation::Client::new(&config);
    let live: Vec<String> = cfn
        .describe_stacks()
        .send()
        .await
        .unwrap()
        .stacks()
        .iter()
        .filter(|s| s.stack_status().map(|st| st.as_str()) != Some("DELETE_COMPLETE"))
        .map(|s| format!("{} {:?}", s.stack_name().unwrap_or("?"), s.stack_status()))
        .collect();
    assert!(live.is_empty(), "the preview left stacks behind: {live:?}");
    let sets = cfn
        .list_change_sets()
        .stack_name("dev-performance-mgmt-network")
        .send()
        .await;
    let left = sets.map(|s| s.summaries().len()).unwrap_or(0);
    assert_eq!(left, 0, "the preview left change sets behind");
}

/// Other teams' stacks in the same region: a steady-state plan costs the
/// same handful of calls whether the region holds a page of stacks or many
/// (it finds ours by name and by tag instead of paging through theirs), and
/// still finds an orphan of ours among them.
#[tokio::test]
async fn a_busy_region_costs_a_steady_plan_no_more_calls_and_hides_no_orphan() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let cfn = aws_sdk_cloudformation::Client::new(&config);
    // Theirs first, so ours are not on the region's first page.
    const FOREIGN: usize = 120;
    let topic = "Resources:\n  T: {Type: 'AWS::SNS::Topic'}\n";
    futures::future::join_all((0..FOREIGN).map(|i| {
        cfn.create_stack()
            .stack_name(format!("other-team-{i:03}"))
            .template_body(topic)
            .tags(Tag::builder().key("Team").value("other").build())
            .send()
    }))
    .await
    .into_iter()
    .for_each(|r| {
        r.expect("CreateStack");
    });
    let env = spec::load(&common::repo().join("desired-state/dev.yaml")).expect("dev loads");
    deploy_like_the_old_scripts(&config, &env).await;
    // A stack of ours the desired state no longer declares.
    cfn.create_stack()
        .stack_name("dev-performance-mgmt-retired")
        .template_body(topic)
        .tags(
            Tag::builder()
                .key(spec::ENVIRONMENT_TAG)
                .value("dev")
                .build(),
        )
        .send()
        .await
        .expect("CreateStack");

    let out = run(emu.command().args(["plan", "-e", "dev", "--stats"]));
    let err = stderr(&out);
    // One page of the region, one tag lookup, the 8 declared stacks by
    // name, the orphan by name, one DescribeServices batch.
    let calls: u64 = err
        .split("dev: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no call count in: {err}"));
    assert!(calls <= 12, "{calls} calls\n{err}");
    let text = stdout(&out);
    assert!(
        text.contains("dev-performance-mgmt-retired"),
        "{text}\n{err}"
    );
    assert!(!text.contains("other-team-"), "{text}");
    let (_, v, _) = plan_json(emu, &[]);
    let declared_in_sync = v[0]["stacks"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .filter(|s| !s["key"].is_null())
        .all(|s| s["action"]["kind"] == "none");
    assert!(declared_in_sync, "{v}");
}
