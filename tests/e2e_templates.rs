//! Templates beyond the shipped ones, the real binary against the emulator:
//! `AWS::LanguageExtensions` loops validated, planned and deployed (the
//! emulator expands them with cfn-lint's implementation, not ours), an
//! output a loop generates feeding another stack, and a protected resource
//! a loop created refused removal like any other; a template too large to
//! send inline and a local nested template deployed through the artifact
//! bucket.

mod common;

use std::path::Path;
use std::process::Output;

use common::{Emulator, every_stack_in_sync, run, s3_client, stack_result, stderr, stdout};

const TABLES: &str = r#"AWSTemplateFormatVersion: "2010-09-09"
Transform: AWS::LanguageExtensions
Parameters:
  Environment: {Type: String}
  Tables: {Type: CommaDelimitedList}
Conditions:
  Fn::ForEach::Big:
    - Name
    - !Ref Tables
    - Is${Name}Big: !Equals [!Ref Environment, prod]
Resources:
  Fn::ForEach::Tables:
    - Name
    - !Ref Tables
    - Table${Name}:
        Type: AWS::DynamoDB::Table
        DeletionPolicy: Delete
        Properties:
          TableName: !Sub "${Environment}-${Name}"
          BillingMode: PAY_PER_REQUEST
          AttributeDefinitions: [{AttributeName: id, AttributeType: S}]
          KeySchema: [{AttributeName: id, KeyType: HASH}]
  Fn::ForEach::Kinds:
    - Kind
    - [alerts, audit-log]
    - Fn::ForEach::PerTable:
        - Name
        - !Ref Tables
        - Topic&{Kind}${Name}:
            Type: AWS::SNS::Topic
            Properties: {TopicName: !Sub "${Environment}-${Kind}-${Name}"}
Outputs:
  Fn::ForEach::TableNames:
    - Name
    - !Ref Tables
    - Table${Name}Name:
        Value: {Ref: !Sub "Table${Name}"}
  TableCount:
    Value: !Length {Ref: Tables}
"#;

const CONSUMER: &str = r#"Parameters:
  OrdersTable: {Type: String}
Resources:
  Queue:
    Type: AWS::SQS::Queue
    Properties:
      QueueName: !Sub "${OrdersTable}-events"
Outputs:
  QueueName: {Value: !GetAtt Queue.QueueName}
"#;

fn env_file(tables: &str) -> String {
    format!(
        r#"environment: lx
region: us-east-1
account_id: "123456789012"
stack_name_prefix: lx
stacks:
  tables:
    template: ../templates/tables.yaml
    parameters:
      Environment: lx
      Tables: {tables}
  consumer:
    template: ../templates/consumer.yaml
    parameters:
      OrdersTable: {{output: tables.TableordersName}}
"#
    )
}

fn workspace(tables: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (rel, text) in [
        ("desired-state/lx.yaml", env_file(tables)),
        ("templates/tables.yaml", TABLES.to_owned()),
        ("templates/consumer.yaml", CONSUMER.to_owned()),
    ] {
        let path = dir.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}

fn stackwarden(emu: &Emulator, dir: &Path, args: &[&str]) -> Output {
    in_env(emu, dir, "lx", args)
}

fn in_env(emu: &Emulator, dir: &Path, env: &str, args: &[&str]) -> Output {
    run(emu
        .command()
        .args(args)
        .args(["-e", env, "--desired-state"])
        .arg(dir.join("desired-state")))
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&stdout(out)).unwrap_or_else(|e| {
        panic!(
            "JSON: {e}\nstdout:\n{}\nstderr:\n{}",
            stdout(out),
            stderr(out)
        )
    })
}

async fn resources(config: &aws_config::SdkConfig, stack: &str) -> Vec<String> {
    let cfn = aws_sdk_cloudformation::Client::new(config);
    let mut ids: Vec<String> = cfn
        .describe_stack_resources()
        .stack_name(stack)
        .send()
        .await
        .expect("DescribeStackResources")
        .stack_resources()
        .iter()
        .filter_map(|r| r.logical_resource_id().map(str::to_owned))
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn language_extension_loops_validate_plan_and_deploy_and_their_outputs_feed_other_stacks() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let ws = workspace("orders,invoices");

    let out = stackwarden(emu, ws.path(), &["validate", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v[0]["valid"], true, "{v}");
    assert_eq!(v[0]["warnings"], serde_json::json!([]), "{v}");
    // The output reference to a loop-generated output orders the stacks.
    assert_eq!(
        v[0]["waves"],
        serde_json::json!([["tables"], ["consumer"]]),
        "{v}"
    );

    let out = stackwarden(emu, ws.path(), &["plan"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    let out = stackwarden(emu, ws.path(), &["reconcile", "--once", "-o", "json"]);
    let v = json(&out);
    assert_eq!(out.status.code(), Some(0), "{v}\n{}", stderr(&out));
    assert_eq!(v[0]["verdict"], "in_sync", "{v}");
    assert_eq!(
        resources(&config, "lx-tables").await,
        [
            "Tableinvoices",
            "Tableorders",
            "Topicalertsinvoices",
            "Topicalertsorders",
            "Topicauditloginvoices",
            "Topicauditlogorders",
        ]
    );
    let cfn = aws_sdk_cloudformation::Client::new(&config);
    let consumer = cfn
        .describe_stacks()
        .stack_name("lx-consumer")
        .send()
        .await
        .expect("DescribeStacks");
    let queue = consumer.stacks()[0]
        .outputs()
        .iter()
        .find(|o| o.output_key() == Some("QueueName"))
        .and_then(|o| o.output_value())
        .map(str::to_owned);
    assert_eq!(queue.as_deref(), Some("lx-orders-events"));

    // Steady state: nothing to do.
    let out = stackwarden(emu, ws.path(), &["reconcile", "--once", "-o", "json"]);
    let v = json(&out);
    assert_eq!(out.status.code(), Some(0), "{v}");
    // One DescribeStacks and a GetTemplate per stack: no write.
    assert_eq!(v[0]["api_calls"], 3, "{v}");

    // Dropping a table from the loop's list would delete a table the loop
    // created: refused, and nothing is written.
    std::fs::write(ws.path().join("desired-state/lx.yaml"), env_file("orders")).unwrap();
    let out = stackwarden(emu, ws.path(), &["reconcile", "--once", "-o", "json"]);
    let v = json(&out);
    assert_eq!(out.status.code(), Some(2), "{v}\n{}", stderr(&out));
    let tables = stack_result(&v, "tables").to_string();
    assert!(
        tables.contains("Tableinvoices") && tables.contains("AWS::DynamoDB::Table"),
        "{tables}"
    );
    assert!(
        resources(&config, "lx-tables")
            .await
            .contains(&"Tableinvoices".to_owned())
    );
}

/// A template over the 51,200 bytes CloudFormation takes inline (its
/// metadata holds the runbook), with a local nested template.
fn big_template() -> String {
    let runbook = "Restart the consumers before replaying the queue. ".repeat(1_200);
    format!(
        r#"Metadata:
  Runbook: "{runbook}"
Resources:
  Queue:
    Type: AWS::SQS::Queue
    Properties: {{QueueName: art-big}}
  Child:
    Type: AWS::CloudFormation::Stack
    Properties:
      TemplateURL: nested/child.yaml
      Parameters: {{Name: art-child}}
Outputs:
  QueueName: {{Value: !GetAtt Queue.QueueName}}
"#
    )
}

const CHILD: &str = r#"Parameters:
  Name: {Type: String}
Resources:
  Topic:
    Type: AWS::SNS::Topic
    Properties: {TopicName: !Ref Name}
"#;

fn artifact_workspace(bucket: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let env = format!(
        r#"environment: art
region: us-east-1
account_id: "123456789012"
stack_name_prefix: art
artifacts:
  bucket: {bucket}
  prefix: cfn/templates
stacks:
  big:
    template: ../templates/big.yaml
"#
    );
    for (rel, text) in [
        ("desired-state/art.yaml", env),
        ("templates/big.yaml", big_template()),
        ("templates/nested/child.yaml", CHILD.to_owned()),
    ] {
        let path = dir.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}

async fn keys(s3: &aws_sdk_s3::Client, bucket: &str) -> Vec<String> {
    let out = s3
        .list_objects_v2()
        .bucket(bucket)
        .send()
        .await
        .expect("ListObjectsV2");
    let mut keys: Vec<String> = out
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn a_large_template_and_its_local_nested_template_deploy_through_the_artifact_bucket() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let s3 = s3_client(&config);
    assert!(big_template().len() > 51_200);

    // Without a bucket, validate names the limit and the remedy.
    let ws = artifact_workspace("art-artifacts");
    let file = ws.path().join("desired-state/art.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replace(
            "artifacts:\n  bucket: art-artifacts\n  prefix: cfn/templates\n",
            "",
        ),
    )
    .unwrap();
    let out = in_env(emu, ws.path(), "art", &["validate"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("at most 51200 bytes in a request") && err.contains("artifacts"),
        "{err}"
    );
    std::fs::write(&file, text).unwrap();

    s3.create_bucket()
        .bucket("art-artifacts")
        .send()
        .await
        .expect("CreateBucket");
    let out = in_env(
        emu,
        ws.path(),
        "art",
        &["reconcile", "--once", "-o", "json"],
    );
    let v = json(&out);
    assert_eq!(out.status.code(), Some(0), "{v}\n{}", stderr(&out));
    // The template and its nested template, each under its content hash.
    let stored = keys(&s3, "art-artifacts").await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert!(
        stored
            .iter()
            .all(|k| k.starts_with("cfn/templates/") && k.ends_with(".template")),
        "{stored:?}"
    );
    let cfn = aws_sdk_cloudformation::Client::new(&config);
    let described = cfn
        .describe_stacks()
        .stack_name("art-big")
        .send()
        .await
        .expect("DescribeStacks");
    assert_eq!(
        described.stacks()[0].stack_status().map(|s| s.as_str()),
        Some("CREATE_COMPLETE")
    );
    // The nested stack was made from the uploaded child template.
    let topics = aws_sdk_sns::Client::new(&config)
        .list_topics()
        .send()
        .await
        .expect("ListTopics");
    assert!(
        topics
            .topics()
            .iter()
            .any(|t| t.topic_arn().is_some_and(|a| a.ends_with(":art-child"))),
        "{topics:?}"
    );

    // In sync afterwards: reads only, nothing uploaded again.
    let out = in_env(
        emu,
        ws.path(),
        "art",
        &["reconcile", "--once", "-o", "json"],
    );
    let v = json(&out);
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert!(every_stack_in_sync(&v), "{v}");
    assert_eq!(keys(&s3, "art-artifacts").await, stored);
}

#[tokio::test]
async fn an_artifact_bucket_in_another_region_is_refused_before_any_change_set() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let s3 = s3_client(&config);
    s3.create_bucket()
        .bucket("art-elsewhere")
        .create_bucket_configuration(
            aws_sdk_s3::types::CreateBucketConfiguration::builder()
                .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::EuWest1)
                .build(),
        )
        .send()
        .await
        .expect("CreateBucket");
    let ws = artifact_workspace("art-elsewhere");
    let out = in_env(
        emu,
        ws.path(),
        "art",
        &["reconcile", "--once", "-o", "json"],
    );
    let v = json(&out);
    assert_eq!(out.status.code(), Some(1), "{v}");
    let text = v.to_string();
    assert!(
        text.contains("art-elsewhere is in eu-west-1") && text.contains("us-east-1"),
        "{text}"
    );
    assert!(keys(&s3, "art-elsewhere").await.is_empty());
    let cfn = aws_sdk_cloudformation::Client::new(&config);
    let stacks = cfn.describe_stacks().send().await.expect("DescribeStacks");
    assert!(stacks.stacks().is_empty(), "{stacks:?}");
}
