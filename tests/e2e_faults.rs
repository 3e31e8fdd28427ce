//! The real binary against the emulator with faults switched on in its shim
//! (tests/emulator/moto_shim.py, patch 11): throttling, 5xx answers and
//! connections dropped before or after the action, with the shim answering
//! as strictly as AWS (a second ExecuteChangeSet of one change set and a
//! duplicate change-set name are refused). A fault never makes a run fail
//! falsely, act twice, or leave the environment unconverged; two runs at
//! once do not fight.

mod common;

use std::collections::BTreeMap;
use std::process::{Output, Stdio};

use common::{Emulator, every_stack_in_sync, run, stderr, stdout};
use serde_json::json;
use stackwarden::spec;

fn dev() -> spec::DesiredEnv {
    spec::load(&common::repo().join("desired-state/dev.yaml")).expect("dev loads")
}

/// How many operations each stack has had started on it: CloudFormation
/// writes one stack-level `*_IN_PROGRESS` event per create or update.
async fn operations(config: &aws_config::SdkConfig) -> BTreeMap<String, usize> {
    let cfn = aws_sdk_cloudformation::Client::new(config);
    let mut out = BTreeMap::new();
    for s in dev().stacks.values() {
        let events = cfn
            .describe_stack_events()
            .stack_name(&s.name)
            .send()
            .await
            .expect("DescribeStackEvents");
        let n = events
            .stack_events()
            .iter()
            .filter(|e| {
                e.logical_resource_id() == Some(s.name.as_str())
                    && e.resource_status().is_some_and(|st| {
                        matches!(st.as_str(), "CREATE_IN_PROGRESS" | "UPDATE_IN_PROGRESS")
                    })
            })
            .count();
        out.insert(s.key.clone(), n);
    }
    out
}

fn reconcile(emu: &Emulator) -> Output {
    run(emu
        .command()
        .args(["reconcile", "--once", "-e", "dev", "-o", "json"]))
}

#[tokio::test]
async fn faults_of_every_kind_converge_without_false_failures_or_double_execution() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    emu.faults(json!({
        "throttle_rate": 0.15,
        "error_rate": 0.1,
        "drop_before_rate": 0.05,
        "drop_after_rate": 0.05,
        "strict": true,
        "seed": 7,
    }));
    let out = reconcile(emu);
    let injected = emu.faults(json!({"strict": true}));
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{err}\ninjected: {injected}",
        stdout(&out)
    );
    let counts = injected["injected"].as_object().expect("counts");
    for kind in ["throttle:", "error:", "drop_before:", "drop_after:"] {
        assert!(
            counts.keys().any(|k| k.starts_with(kind)),
            "no {kind} fault was injected: {injected}"
        );
    }
    // Throttling and 5xx are reported as they happen, each for what it is.
    assert!(
        err.contains("retrying") && err.contains("Rate exceeded"),
        "{err}"
    );
    assert!(err.contains("AWS service error"), "{err}");
    assert!(!err.contains("invalid request"), "{err}");

    let config = emu.sdk_config().await;
    for (stack, n) in operations(&config).await {
        assert_eq!(n, 1, "{stack} had {n} operations started");
    }
    // Converged: a second run without faults has nothing to do.
    let again = reconcile(emu);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    let v: serde_json::Value = serde_json::from_str(&stdout(&again)).expect("JSON");
    assert!(every_stack_in_sync(&v), "{v}");
}

#[tokio::test]
async fn two_runs_started_together_converge_once_without_failing_each_other() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    emu.faults(json!({"strict": true, "latency_ms": 5}));
    let spawn = || {
        emu.command()
            .args(["reconcile", "--once", "-e", "dev"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    for o in [&a, &b] {
        // In sync, or told that the other run is acting (2); never failed.
        assert!(
            matches!(o.status.code(), Some(0 | 2)),
            "exit {:?}\n{}\n{}",
            o.status.code(),
            stdout(o),
            stderr(o)
        );
    }
    let config = emu.sdk_config().await;
    for (stack, n) in operations(&config).await {
        assert_eq!(
            n,
            1,
            "{stack} had {n} operations started\n{}\n{}\n{}\n{}",
            stdout(&a),
            stderr(&a),
            stdout(&b),
            stderr(&b)
        );
    }
    emu.faults(json!({}));
    let again = reconcile(emu);
    assert_eq!(
        again.status.code(),
        Some(0),
        "{}\n{}",
        stdout(&again),
        stderr(&again)
    );
}

#[tokio::test]
async fn throttling_slows_a_run_down_but_does_not_stop_it() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    emu.faults(json!({"throttle_rate": 0.6, "actions": ["DescribeStacks"], "seed": 3}));
    let out = run(emu.command().args(["plan", "-e", "dev"]));
    emu.faults(json!({}));
    let err = stderr(&out);
    // Nothing exists yet: differences, not an error.
    assert_eq!(out.status.code(), Some(2), "{}\n{err}", stdout(&out));
    assert!(
        err.contains("throttled: ") && err.contains("retrying"),
        "{err}"
    );
}

/// Runs `plan -e dev` as a new user might, with only `env` set (no
/// credentials or profile inherited from this machine); returns its exit
/// code, its stderr and how long it took.
fn first_contact(env: &[(&str, &str)]) -> (Option<i32>, String, std::time::Duration) {
    let home = tempfile::tempdir().expect("tempdir");
    let mut cmd = common::stackwarden();
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .env("NO_COLOR", "1")
        // Not an EC2 instance: the instance metadata service is not asked.
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(env.iter().copied())
        .args(["plan", "-e", "dev"]);
    let started = tokio::time::Instant::now();
    let out = run(&mut cmd);
    (out.status.code(), stderr(&out), started.elapsed())
}

/// One line, an error, and none of the SDK's Debug dump.
fn assert_one_line(err: &str) {
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    for dump in [
        "DispatchFailure(",
        "ConnectorError",
        "ProviderChainError",
        "CredentialsNotLoaded(",
    ] {
        assert!(!err.contains(dump), "{err}");
    }
}

#[test]
fn no_credentials_are_said_in_one_line_with_where_it_looked() {
    let (code, err, took) = first_contact(&[("AWS_REGION", "us-east-1")]);
    assert_eq!(code, Some(1), "{err}");
    assert_one_line(&err);
    assert!(
        err.contains("no AWS credentials found")
            && err.contains("AWS_PROFILE")
            && err.contains("AWS_ACCESS_KEY_ID"),
        "{err}"
    );
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
}

#[test]
fn an_endpoint_that_refuses_connections_is_named_within_ten_seconds() {
    let url = format!("http://127.0.0.1:{}", common::free_port());
    let (code, err, took) = first_contact(&[
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_ENDPOINT_URL", &url),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert_one_line(&err);
    assert!(
        err.contains(&format!("cannot reach the endpoint {url}"))
            && err.contains("Connection refused"),
        "{err}"
    );
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
}

#[tokio::test]
async fn access_denied_names_the_action_and_the_role_and_is_not_retried() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    emu.faults(json!({"deny_rate": 1.0, "actions": ["DescribeStacks"]}));
    let url = emu.url();
    let (code, err, _) = first_contact(&[
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_ENDPOINT_URL", &url),
    ]);
    let injected = emu.faults(json!({}));
    assert_eq!(code, Some(1), "{err}");
    assert_one_line(&err);
    assert!(
        err.contains("access denied")
            && err.contains("cloudformation:DescribeStacks")
            && err.contains("assumed-role/stackwarden-operator"),
        "{err}"
    );
    assert_eq!(injected["injected"]["deny:DescribeStacks"], 1, "{injected}");
}
