//! `stackwarden reconcile` as a daemon: the real binary against the
//! emulator, with its endpoints, SNS alerts received through an SQS
//! subscription, CloudWatch metrics, SIGTERM, and a restart after kill -9.

mod common;

use std::time::Duration;

use common::daemon::{Daemon, subscribe, until};
use common::{Emulator, Workspace};

const TOPIC: &str = "stackwarden-alerts";

/// Reads the metrics back with boto3, which speaks a protocol moto serves.
fn cloudwatch_metrics(emu: &Emulator) -> serde_json::Value {
    let script = r#"
import boto3, datetime, json, sys
cw = boto3.client("cloudwatch", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
names = sorted({m["MetricName"] for m in cw.list_metrics(Namespace="Stackwarden")["Metrics"]})
now = datetime.datetime.now(datetime.timezone.utc)
stats = cw.get_metric_statistics(Namespace="Stackwarden", MetricName="StacksInSync",
    Dimensions=[{"Name": "Environment", "Value": "dev"}],
    StartTime=now - datetime.timedelta(hours=1), EndTime=now + datetime.timedelta(minutes=5),
    Period=60, Statistics=["Maximum"])["Datapoints"]
print(json.dumps({"names": names, "max": max([d["Maximum"] for d in stats] or [0])}))
"#;
    let out = std::process::Command::new(common::repo().join(".venv/bin/python"))
        .args(["-c", script, &emu.url()])
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn the_daemon_converges_alerts_once_publishes_metrics_and_stops_on_sigterm() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let queue = subscribe(&config, TOPIC).await;
    let ws = Workspace::new();
    let mut d = Daemon::start(emu, &ws);

    until("ready", Duration::from_secs(60), &d, async || {
        d.get("/readyz").0 == 200
    })
    .await;
    assert_eq!(d.get("/healthz"), (200, "ok\n".into()));
    let (_, status) = d.get("/status");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["dev"]["result"], "in_sync", "{status}");
    let (_, metrics) = d.get("/metrics");
    assert!(
        metrics.contains("stackwarden_stacks{environment=\"dev\",state=\"in_sync\"} 8"),
        "{metrics}"
    );
    assert!(
        metrics.contains("stackwarden_aws_calls_total{environment=\"dev\"}"),
        "{metrics}"
    );
    assert_eq!(d.get("/nope").0, 404);
    // The status page: every environment, and a page for each.
    let (code, page) = d.get("/");
    assert_eq!(code, 200, "{page}");
    assert!(
        page.starts_with("<!DOCTYPE html>") && page.contains("<a href=\"/env/dev\">dev</a>"),
        "{page}"
    );
    let (code, page) = d.get("/env/dev");
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("ecs-cluster") && page.contains("in sync"),
        "{page}"
    );
    assert_eq!(d.get("/env/nope").0, 404);
    assert_eq!(d.get("/env/%zz").0, 404);
    // The container health check.
    let hc = common::run(common::stackwarden().args([
        "healthcheck",
        "--addr",
        &format!("127.0.0.1:{}", d.port),
    ]));
    assert_eq!(hc.status.code(), Some(0), "{}", common::stderr(&hc));

    // An out-of-band scale-out is converged within a few ticks.
    let ecs = aws_sdk_ecs::Client::new(&config);
    let service = "dev-performance-mgmt";
    ecs.update_service()
        .cluster(service)
        .service(service)
        .desired_count(5)
        .send()
        .await
        .unwrap();
    d.signal("-HUP");
    until(
        "the scale-out undone",
        Duration::from_secs(20),
        &d,
        async || {
            let s = ecs
                .describe_services()
                .cluster(service)
                .services(service)
                .send()
                .await
                .unwrap();
            s.services()[0].desired_count() == 2
        },
    )
    .await;

    // A change the policy blocks: one alert, with filterable attributes.
    ws.edit(
        "templates/dynamodb.yaml",
        "- {AttributeName: cycleId, KeyType: HASH}",
        "- {AttributeName: organizationId, KeyType: HASH}",
    );
    let sqs = aws_sdk_sqs::Client::new(&config);
    let mut messages = Vec::new();
    until(
        "the alert on SQS",
        Duration::from_secs(20),
        &d,
        async || {
            let r = sqs
                .receive_message()
                .queue_url(&queue)
                .max_number_of_messages(10)
                .send()
                .await
                .unwrap();
            messages.extend(
                r.messages()
                    .iter()
                    .filter_map(|m| m.body().map(str::to_owned)),
            );
            !messages.is_empty()
        },
    )
    .await;
    // Several more passes: still one alert for this episode.
    let passes = |d: &Daemon| -> u64 {
        let (_, s) = d.get("/status");
        serde_json::from_str::<serde_json::Value>(&s).unwrap()["dev"]["passes"]
            .as_u64()
            .unwrap()
    };
    let seen = passes(&d);
    until(
        "three more passes",
        Duration::from_secs(20),
        &d,
        async || {
            let done = passes(&d) >= seen + 3;
            if !done {
                d.signal("-HUP");
            }
            done
        },
    )
    .await;
    let r = sqs
        .receive_message()
        .queue_url(&queue)
        .max_number_of_messages(10)
        .send()
        .await
        .unwrap();
    messages.extend(
        r.messages()
            .iter()
            .filter_map(|m| m.body().map(str::to_owned)),
    );
    assert_eq!(messages.len(), 1, "{messages:#?}");
    let envelope: serde_json::Value = serde_json::from_str(&messages[0]).unwrap();
    let subject = envelope["Subject"].as_str().unwrap();
    assert!(subject.starts_with("[stackwarden] dev: "), "{subject}");
    let attr = |k: &str| envelope["MessageAttributes"][k]["Value"].clone();
    assert_eq!(attr("environment"), "dev", "{envelope}");
    assert_eq!(attr("event"), "blocked");
    assert_eq!(attr("severity"), "warning");
    let message = envelope["Message"].as_str().unwrap();
    assert!(message.contains("ReviewCyclesTable"), "{message}");
    assert!(message.contains("\"suggested_command\""), "{message}");

    // CloudWatch has the numbers.
    let cw = cloudwatch_metrics(emu);
    for name in [
        "StacksInSync",
        "StacksBlocked",
        "PassDuration",
        "StackInSync",
        "Throttles",
    ] {
        assert!(
            cw["names"].as_array().unwrap().iter().any(|n| n == name),
            "{name} missing: {cw}"
        );
    }
    assert!(cw["max"].as_f64().unwrap() >= 7.0, "{cw}");

    d.signal("-TERM");
    let status = d
        .wait(Duration::from_secs(10))
        .expect("exits within the grace");
    assert_eq!(status.code(), Some(0), "{}", d.logs());
    assert!(d.logs().contains("Controller stopped"), "{}", d.logs());
}

#[tokio::test]
async fn a_daemon_started_after_a_kill_9_mid_apply_converges_without_duplicate_change_sets() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let ws = Workspace::new();
    let first = Daemon::start(emu, &ws);
    until(
        "the first execution",
        Duration::from_secs(60),
        &first,
        async || first.logs().contains("Change set executed"),
    )
    .await;
    first.signal("-KILL");
    drop(first);

    let second = Daemon::start(emu, &ws);
    until("converged", Duration::from_secs(60), &second, async || {
        let (_, s) = second.get("/status");
        serde_json::from_str::<serde_json::Value>(&s).is_ok_and(|v| v["dev"]["result"] == "in_sync")
    })
    .await;
    drop(second);

    let cfn = aws_sdk_cloudformation::Client::new(&config);
    let stacks = cfn.describe_stacks().send().await.unwrap();
    assert_eq!(stacks.stacks().len(), 8);
    for s in stacks.stacks() {
        let name = s.stack_name().unwrap();
        assert_eq!(
            s.stack_status().unwrap().as_str(),
            "CREATE_COMPLETE",
            "{name}"
        );
        // Filtered by stack again: the emulator lists every stack's.
        let summaries = cfn
            .list_change_sets()
            .stack_name(name)
            .send()
            .await
            .unwrap();
        let ours: Vec<_> = summaries
            .summaries()
            .iter()
            .filter(|c| c.stack_name() == Some(name))
            .filter(|c| {
                c.change_set_name()
                    .is_some_and(|n| n.starts_with("stackwarden-"))
            })
            .collect();
        assert_eq!(ours.len(), 1, "{name}: {ours:#?}");
    }
}
