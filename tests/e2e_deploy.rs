//! stackwarden's own stack: deploy/environment-role.yaml created on the
//! emulator, and deploy/stackwarden.yaml deployed and upgraded by
//! stackwarden itself from deploy/management.example.yaml (the real binary,
//! the emulator's CloudFormation, ECS and DynamoDB).

mod common;

use std::path::Path;

use aws_sdk_cloudformation::types::{Capability, Parameter, StackStatus};
use common::{Emulator, desired_count, repo, run, stderr, stdout};

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn parameter(k: &str, v: &str) -> Parameter {
    Parameter::builder()
        .parameter_key(k)
        .parameter_value(v)
        .build()
}

async fn image_of_service(config: &aws_config::SdkConfig) -> String {
    let ecs = aws_sdk_ecs::Client::new(config);
    let svc = ecs
        .describe_services()
        .cluster("stackwarden")
        .services("stackwarden")
        .send()
        .await
        .unwrap();
    let td = svc.services()[0].task_definition().unwrap().to_owned();
    let td = ecs
        .describe_task_definition()
        .task_definition(td)
        .send()
        .await
        .unwrap();
    td.task_definition().unwrap().container_definitions()[0]
        .image()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn the_operators_stack_deploys_and_upgrades_through_stackwarden_itself() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let cfn = aws_sdk_cloudformation::Client::new(&config);

    // The environment role, as an environment account's admin creates it.
    let role = std::fs::read_to_string(repo().join("deploy/environment-role.yaml")).unwrap();
    cfn.create_stack()
        .stack_name("stackwarden-environment-role")
        .template_body(role)
        .capabilities(Capability::CapabilityNamedIam)
        .parameters(parameter("ManagementAccountId", "123456789012"))
        .parameters(parameter(
            "ControllerRoleArn",
            "arn:aws:iam::123456789012:role/stackwarden-task",
        ))
        .parameters(parameter("ExternalId", "stackwarden-staging"))
        .send()
        .await
        .expect("CreateStack");
    let out = cfn
        .describe_stacks()
        .stack_name("stackwarden-environment-role")
        .send()
        .await
        .unwrap();
    assert_eq!(
        out.stacks()[0].stack_status(),
        Some(&StackStatus::CreateComplete),
        "{out:?}"
    );

    // The management account's own desired state.
    let dir = tempfile::tempdir().unwrap();
    copy(&repo().join("deploy"), &dir.path().join("deploy"));
    std::fs::create_dir_all(dir.path().join("desired-state")).unwrap();
    let file = dir.path().join("desired-state/management.yaml");
    std::fs::copy(repo().join("deploy/management.example.yaml"), &file).unwrap();
    let folder = dir.path().join("desired-state").display().to_string();
    // One pass, which must end in sync (exit 0); its JSON report.
    let reconcile = || -> serde_json::Value {
        let out = run(emu
            .command()
            .args(["reconcile", "--once", "-e", "management", "-o", "json"])
            .args(["--desired-state", &folder]));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}\n{}",
            stdout(&out),
            stderr(&out)
        );
        serde_json::from_str(&stdout(&out)).unwrap()
    };
    let v = reconcile();
    assert_eq!(
        v[0]["report"]["stacks"][0]["result"]["kind"], "created",
        "{v}"
    );
    assert_eq!(
        desired_count(&config, "stackwarden", "stackwarden").await,
        2
    );
    assert!(image_of_service(&config).await.ends_with(":1.4.0"));

    // Its state table is the one stackwarden uses.
    let ddb = aws_sdk_dynamodb::Client::new(&config);
    let table = ddb
        .describe_table()
        .table_name("stackwarden-state")
        .send()
        .await
        .expect("the state table");
    let keys: Vec<&str> = table
        .table()
        .unwrap()
        .key_schema()
        .iter()
        .map(|k| k.attribute_name())
        .collect();
    assert_eq!(keys, ["pk", "sk"]);
    let init = run(emu
        .command()
        .args(["state", "init", "--state-table", "stackwarden-state"]));
    assert_eq!(init.status.code(), Some(0), "{}", stderr(&init));
    assert!(stdout(&init).contains("exists"), "{}", stdout(&init));

    // An upgrade is a new image tag in git: an ordinary change set.
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replace("stackwarden:1.4.0", "stackwarden:1.5.0"),
    )
    .unwrap();
    let v = reconcile();
    assert_eq!(
        v[0]["report"]["stacks"][0]["result"]["kind"], "updated",
        "{v}"
    );
    assert!(image_of_service(&config).await.ends_with(":1.5.0"));
    // And then nothing to do.
    let v = reconcile();
    assert_eq!(
        v[0]["report"]["stacks"][0]["result"]["kind"], "in_sync",
        "{v}"
    );
}
