//! Resource drift through the real binary against the emulator (its shim
//! detects drift and makes drift-aware change sets, patches 19 and 20): a
//! queue's visibility timeout changed with the SQS API is found by `drift`,
//! told once by the daemon in alert mode, and reverted by `reconcile
//! --once` in revert mode.

mod common;

use std::process::Output;
use std::time::Duration;

use common::daemon::{Daemon, drain, subscribe, until};
use common::{Emulator, Workspace, run, stderr, stdout};

const TEMPLATE: &str = "\
AWSTemplateFormatVersion: '2010-09-09'
Resources:
  Jobs:
    Type: AWS::SQS::Queue
    Properties:
      QueueName: qa-jobs
      VisibilityTimeout: 30
      MessageRetentionPeriod: 345600
Outputs:
  JobsUrl:
    Value: !Ref Jobs
";

fn desired(mode: &str) -> String {
    format!(
        "\
environment: qa
region: us-east-1
account_id: \"123456789012\"
stack_name_prefix: qa
alerts:
  sns_topic_arn: arn:aws:sns:us-east-1:123456789012:stackwarden-alerts
drift:
  mode: {mode}
  interval: 1h
stacks:
  queues:
    template: ../templates/queues.yaml
"
    )
}

fn sw(emu: &Emulator, ws: &Workspace, args: &[&str]) -> Output {
    run(emu
        .command()
        .args(args)
        .args(["-e", "qa"])
        .args(["--desired-state", &ws.desired_state().display().to_string()]))
}

fn explain(out: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", stdout(out), stderr(out))
}

async fn visibility_timeout(sqs: &aws_sdk_sqs::Client, url: &str) -> String {
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout)
        .send()
        .await
        .expect("GetQueueAttributes");
    attrs
        .attributes()
        .and_then(|a| a.get(&aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout))
        .cloned()
        .unwrap_or_default()
}

/// Alert messages on the queue now that are about drift (each received once).
async fn drift_alerts(sqs: &aws_sdk_sqs::Client, queue: &str) -> Vec<String> {
    let mut all = drain(sqs, queue).await;
    all.retain(|m| m.contains("resource drift"));
    all
}

fn passes(d: &Daemon) -> u64 {
    let (_, body) = d.get("/status");
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["qa"]["passes"].as_u64())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_queue_changed_out_of_band_is_found_told_once_and_reverted() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let sqs = aws_sdk_sqs::Client::new(&config);
    let alerts = subscribe(&config, "stackwarden-alerts").await;
    let ws = Workspace::new();
    std::fs::write(ws.path("templates/queues.yaml"), TEMPLATE).unwrap();
    std::fs::write(ws.path("desired-state/qa.yaml"), desired("alert")).unwrap();

    let out = sw(emu, &ws, &["reconcile", "--once"]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let url = sqs
        .get_queue_url()
        .queue_name("qa-jobs")
        .send()
        .await
        .expect("the stack made the queue")
        .queue_url()
        .unwrap()
        .to_owned();
    let out = sw(emu, &ws, &["drift"]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    assert!(
        stdout(&out).contains("queues: IN_SYNC"),
        "{}",
        explain(&out)
    );

    // During an incident, someone raises the timeout by hand.
    sqs.set_queue_attributes()
        .queue_url(&url)
        .attributes(
            aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout,
            "120",
        )
        .send()
        .await
        .unwrap();
    let out = sw(emu, &ws, &["drift"]);
    assert_eq!(out.status.code(), Some(2), "{}", explain(&out));
    let text = stdout(&out);
    assert!(text.contains("queues: DRIFTED (mode alert)"), "{text}");
    assert!(text.contains("Jobs (AWS::SQS::Queue): MODIFIED"), "{text}");
    assert!(
        text.contains("/VisibilityTimeout: expected 30, actual 120"),
        "{text}"
    );
    let json = sw(emu, &ws, &["drift", "-o", "json"]);
    assert_eq!(json.status.code(), Some(2), "{}", explain(&json));
    let v: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    let d = &v[0]["stacks"][0]["detection"]["drift"];
    assert_eq!(d["status"], "DRIFTED");
    assert_eq!(d["resources"][0]["logical_id"], "Jobs");
    assert_eq!(
        d["resources"][0]["differences"][0]["path"],
        "/VisibilityTimeout"
    );
    assert_eq!(d["resources"][0]["differences"][0]["expected"], "30");
    assert_eq!(d["resources"][0]["differences"][0]["actual"], "120");

    // plan shows the last detection at no extra detection, and exits 2.
    let plan = sw(emu, &ws, &["plan"]);
    assert_eq!(plan.status.code(), Some(2), "{}", explain(&plan));
    assert!(
        stdout(&plan).contains("drifted (1 property)"),
        "{}",
        explain(&plan)
    );

    // Alert mode: the daemon tells the episode once, not once per pass.
    drift_alerts(&sqs, &alerts).await;
    let mut daemon = Daemon::start_envs(emu, &ws, &["-e", "qa"], &[]);
    let mut told = Vec::new();
    until(
        "a drift alert",
        Duration::from_secs(60),
        &daemon,
        async || {
            told.extend(drift_alerts(&sqs, &alerts).await);
            !told.is_empty()
        },
    )
    .await;
    assert_eq!(told.len(), 1, "{told:?}");
    assert!(told[0].contains("/VisibilityTimeout"), "{}", told[0]);
    assert!(told[0].contains("expected 30, actual 120"), "{}", told[0]);
    let note: serde_json::Value = serde_json::from_str(&told[0]).unwrap();
    assert_eq!(
        note["MessageAttributes"]["event"]["Value"], "drift",
        "{note}"
    );
    let seen = passes(&daemon);
    for _ in 0..2 {
        let before = passes(&daemon);
        daemon.signal("-HUP");
        until(
            "another pass",
            Duration::from_secs(60),
            &daemon,
            async || passes(&daemon) > before,
        )
        .await;
    }
    assert!(passes(&daemon) >= seen + 2);
    assert_eq!(drift_alerts(&sqs, &alerts).await, Vec::<String>::new());
    let (_, status) = daemon.get("/status");
    assert!(status.contains("/VisibilityTimeout"), "{status}");
    daemon.signal("-TERM");
    assert!(daemon.wait(Duration::from_secs(30)).is_some());

    // Revert mode: the next pass writes the template's value back with a
    // drift-aware change set, detects again, and is in sync.
    std::fs::write(ws.path("desired-state/qa.yaml"), desired("revert")).unwrap();
    // The preview is the drift-aware change set the pass would make.
    let plan = sw(emu, &ws, &["plan", "--change-sets", "-o", "json"]);
    assert_eq!(plan.status.code(), Some(2), "{}", explain(&plan));
    let v: serde_json::Value = serde_json::from_str(&stdout(&plan)).unwrap();
    let preview = &v[0]["change_sets"][0];
    assert_eq!(preview["stack"], "queues", "{v}");
    assert_eq!(preview["changes"][0]["logical_id"], "Jobs", "{v}");
    assert_eq!(preview["changes"][0]["drift"], "MODIFIED", "{v}");
    assert_eq!(
        visibility_timeout(&sqs, &url).await,
        "120",
        "a preview changes nothing"
    );
    let out = sw(emu, &ws, &["reconcile", "--once", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let stack = &report[0]["report"]["stacks"][0];
    assert!(
        stack["change_set"]
            .as_str()
            .unwrap()
            .ends_with("-revert-drift"),
        "{stack}"
    );
    assert_eq!(
        stack["drift_after"]["drift"]["status"], "IN_SYNC",
        "{stack}"
    );
    assert_eq!(visibility_timeout(&sqs, &url).await, "30");
    let out = sw(emu, &ws, &["drift"]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let out = sw(emu, &ws, &["reconcile", "--once"]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
}
