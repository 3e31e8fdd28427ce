//! `rollback --to`, `suspend`/`resume`, `history` and the state table: the
//! real binary against the emulator (its DynamoDB holds the state table),
//! in a temporary git repository.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::daemon::{Daemon, drain, subscribe, until};
use common::{Emulator, Workspace, desired_count, run, stderr, stdout};
use stackwarden::state::dynamo::DynamoStore;
use stackwarden::state::{Backend, State};

const TABLE: &str = "stackwarden-state";
const SERVICE: &str = "dev-performance-mgmt";

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn commit(ws: &Workspace, message: &str) -> String {
    git(ws.dir.path(), &["add", "-A"]);
    git(ws.dir.path(), &["commit", "-q", "-m", message]);
    git(ws.dir.path(), &["rev-parse", "HEAD"])
}

/// `stackwarden ARGS -e dev --desired-state WS --state-table TABLE`.
fn sw(emu: &Emulator, ws: &Workspace, args: &[&str]) -> Output {
    run(emu
        .command()
        .args(args)
        .args(["-e", "dev", "--state-table", TABLE])
        .args(["--desired-state", &ws.desired_state().display().to_string()]))
}

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

fn explain(out: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", stdout(out), stderr(out))
}

async fn retention(config: &aws_config::SdkConfig) -> String {
    let cfn = aws_sdk_cloudformation::Client::new(config);
    let out = cfn
        .describe_stacks()
        .stack_name("dev-performance-mgmt-network")
        .send()
        .await
        .expect("DescribeStacks");
    out.stacks()[0]
        .parameters()
        .iter()
        .find(|p| p.parameter_key() == Some("FlowLogRetentionDays"))
        .and_then(|p| p.parameter_value())
        .unwrap_or_default()
        .to_owned()
}

fn passes(d: &Daemon) -> u64 {
    let (_, body) = d.get("/status");
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["dev"]["passes"].as_u64())
        .unwrap_or(0)
}

#[tokio::test]
async fn rollback_to_a_commit_suspends_there_until_resume_and_history_tells_it_all() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let sqs = aws_sdk_sqs::Client::new(&config);
    let queue = subscribe(&config, "stackwarden-alerts").await;

    // Without a table, the commands that need one say which flag.
    let ws = Workspace::new();
    let out = run(emu
        .command()
        .args(["suspend", "-e", "dev", "--reason", "x"])
        .args(["--desired-state", &ws.desired_state().display().to_string()]));
    assert_eq!(code(&out), Some(1));
    assert!(stderr(&out).contains("--state-table"), "{}", explain(&out));

    let init = run(emu
        .command()
        .args(["state", "init", "--state-table", TABLE]));
    assert_eq!(code(&init), Some(0), "{}", explain(&init));
    assert!(stdout(&init).contains("created"), "{}", explain(&init));
    let again = run(emu
        .command()
        .args(["state", "init", "--state-table", TABLE]));
    assert_eq!(code(&again), Some(0), "{}", explain(&again));
    assert!(stdout(&again).contains("exists"), "{}", explain(&again));

    // Commit A, reconciled; commit B (a parameter change), reconciled.
    git(ws.dir.path(), &["init", "-q"]);
    let a = commit(&ws, "A");
    let out = sw(emu, &ws, &["reconcile", "--once"]);
    assert_eq!(code(&out), Some(0), "{}", explain(&out));
    ws.edit(
        "desired-state/dev.yaml",
        "FlowLogRetentionDays: 14",
        "FlowLogRetentionDays: 30",
    );
    let b = commit(&ws, "B");
    let out = sw(emu, &ws, &["reconcile", "--once"]);
    assert_eq!(code(&out), Some(0), "{}", explain(&out));
    assert_eq!(retention(&config).await, "30");

    // Back to A, read from git whatever the working tree holds.
    let out = sw(emu, &ws, &["rollback", "--to", &a[..10]]);
    assert_eq!(code(&out), Some(0), "{}", explain(&out));
    assert_eq!(retention(&config).await, "14");
    assert!(
        stderr(&out).contains("suspended by") && stderr(&out).contains("rolled back to"),
        "{}",
        explain(&out)
    );

    // Suspended: an out-of-band change is reported, not converged.
    let ecs = aws_sdk_ecs::Client::new(&config);
    ecs.update_service()
        .cluster(SERVICE)
        .service(SERVICE)
        .desired_count(5)
        .send()
        .await
        .unwrap();
    let out = sw(emu, &ws, &["reconcile", "--once", "--stats"]);
    assert_eq!(code(&out), Some(2), "{}", explain(&out));
    assert!(
        stdout(&out).contains("suspended by") && stdout(&out).contains("stackwarden resume"),
        "{}",
        explain(&out)
    );
    assert_eq!(desired_count(&config, SERVICE, SERVICE).await, 5);
    assert_eq!(retention(&config).await, "14");
    let plan = sw(emu, &ws, &["plan", "-o", "json"]);
    assert_eq!(code(&plan), Some(2), "{}", explain(&plan));
    let plan: serde_json::Value = serde_json::from_str(&stdout(&plan)).unwrap();
    assert!(
        plan[0]["suspended"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("rolled back to"),
        "{plan}"
    );

    // The daemon too: it observes and alerts once, and a restart does not
    // tell the open episode again.
    let extra = ["--state-table", TABLE];
    let d = Daemon::start_with(emu, &ws, &extra);
    until("the drift alert", Duration::from_secs(60), &d, async || {
        passes(&d) >= 1
    })
    .await;
    let (_, status) = d.get("/status");
    assert!(status.contains("rolled back to"), "{status}");
    let first = drain(&sqs, &queue).await;
    assert_eq!(first.len(), 1, "{first:#?}\n{}", d.logs());
    assert!(first[0].contains("drift"), "{}", first[0]);
    // A clean stop releases the lease: the next daemon takes it at once.
    let mut d = d;
    d.signal("-TERM");
    let stopped = d.wait(Duration::from_secs(20));
    assert_eq!(stopped.and_then(|s| s.code()), Some(0), "{}", d.logs());
    drop(d);
    let d = Daemon::start_with(emu, &ws, &extra);
    until("two passes", Duration::from_secs(60), &d, async || {
        passes(&d) >= 1
    })
    .await;
    d.signal("-HUP");
    until("two passes", Duration::from_secs(60), &d, async || {
        passes(&d) >= 2
    })
    .await;
    assert_eq!(
        desired_count(&config, SERVICE, SERVICE).await,
        5,
        "{}",
        d.logs()
    );
    let second = drain(&sqs, &queue).await;
    assert!(second.is_empty(), "told again: {second:#?}");
    drop(d);

    // Resumed: the next pass converges to B.
    let out = sw(emu, &ws, &["resume"]);
    assert_eq!(code(&out), Some(0), "{}", explain(&out));
    let out = sw(emu, &ws, &["reconcile", "--once"]);
    assert_eq!(code(&out), Some(0), "{}", explain(&out));
    assert_eq!(retention(&config).await, "30");
    assert_eq!(desired_count(&config, SERVICE, SERVICE).await, 2);

    // The history: every pass that wrote, the rollback, the resumption.
    let out = sw(emu, &ws, &["history", "-o", "json"]);
    assert_eq!(code(&out), Some(0), "{}", explain(&out));
    let h: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let kinds: Vec<&str> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["pass", "pass", "suspend", "rollback", "resume", "pass"],
        "{h:#}"
    );
    let commits: Vec<Option<&str>> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["commit"].as_str())
        .collect();
    assert_eq!(
        commits,
        [
            Some(&a[..]),
            Some(&b[..]),
            None,
            Some(&a[..]),
            None,
            Some(&b[..])
        ],
        "{h:#}"
    );
    assert!(h[3]["stacks"].as_array().unwrap().iter().any(|s| {
        s["stack"] == "network"
            && s["change_set"]
                .as_str()
                .is_some_and(|c| c.starts_with("stackwarden-"))
    }));
    let text = sw(emu, &ws, &["history", "--stack", "network"]);
    assert!(stdout(&text).contains("rollback"), "{}", explain(&text));

    // --to-previous: the last successful pass of another revision (A's).
    let out = sw(emu, &ws, &["rollback", "--to-previous", "-q"]);
    assert_eq!(code(&out), Some(0), "{}", explain(&out));
    assert_eq!(retention(&config).await, "14");
    let out = sw(emu, &ws, &["resume"]);
    assert_eq!(code(&out), Some(0), "{}", explain(&out));

    // Outside a git repository, --to says so and changes nothing.
    let plain = Workspace::new();
    let out = run(emu
        .command()
        .args(["rollback", "-e", "dev", "--to", "HEAD"])
        .args([
            "--desired-state",
            &plain.desired_state().display().to_string(),
        ]));
    assert_eq!(code(&out), Some(1), "{}", explain(&out));
    assert!(
        stderr(&out).contains("not inside a git repository"),
        "{}",
        explain(&out)
    );
    assert_eq!(retention(&config).await, "14");
}

#[tokio::test]
async fn two_writers_racing_on_the_state_table_lose_no_update() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let store = DynamoStore::new(&config, TABLE);
    store.create_table().await.expect("state init");
    let state = State::new(Backend::Dynamo(store));
    let state = &state;

    common::races::one_suspension_of_ten_is_made(state).await;
    common::races::no_episode_of_eight_writers_is_lost(state).await;
}

/// A deny window that fires every minute for two minutes is always
/// active, whatever the wall clock says: outside the sync window, on the
/// real binary.
#[tokio::test]
async fn outside_the_sync_window_once_exits_2_and_writes_nothing_until_overridden_on_the_record() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let ws = Workspace::new();
    ws.dev_sync_window(
        "{kind: deny, schedule: \"* * * * *\", duration: 2m, timezone: Europe/Paris}",
    );
    let init = run(emu
        .command()
        .args(["state", "init", "--state-table", TABLE]));
    assert_eq!(code(&init), Some(0), "{}", explain(&init));
    git(ws.dir.path(), &["init", "-q"]);
    let a = commit(&ws, "A, with a deny window");

    let out = sw(emu, &ws, &["reconcile", "--once"]);
    assert_eq!(code(&out), Some(2), "{}", explain(&out));
    assert!(
        stdout(&out).contains("outside sync window (its next opening was not found)")
            && stdout(&out).contains("--ignore-windows"),
        "{}",
        explain(&out)
    );
    let cfn = aws_sdk_cloudformation::Client::new(&config);
    let live = cfn.list_stacks().send().await.unwrap();
    assert!(
        live.stack_summaries().is_empty(),
        "nothing is created outside the window: {live:?}"
    );
    let plan = sw(emu, &ws, &["plan", "-o", "json"]);
    assert_eq!(code(&plan), Some(2), "{}", explain(&plan));
    let plan: serde_json::Value = serde_json::from_str(&stdout(&plan)).unwrap();
    assert_eq!(plan[0]["sync_window"]["open"], false, "{plan}");
    assert_eq!(
        plan[0]["stacks"][0]["action"]["by"], "sync_window",
        "{plan}"
    );
    // --ignore-windows is for one pass, not for the daemon (a usage
    // error exits 1: 2 means differences).
    let daemon = sw(emu, &ws, &["reconcile", "--ignore-windows"]);
    assert_eq!(code(&daemon), Some(1), "{}", explain(&daemon));
    assert!(stderr(&daemon).contains("--once"), "{}", explain(&daemon));

    let out = sw(emu, &ws, &["reconcile", "--once", "--ignore-windows"]);
    assert_eq!(code(&out), Some(0), "{}", explain(&out));
    assert!(
        stderr(&out).contains("Sync window ignored"),
        "the override is logged: {}",
        explain(&out)
    );
    let history = sw(emu, &ws, &["history"]);
    assert_eq!(code(&history), Some(0), "{}", explain(&history));
    assert!(
        stdout(&history).contains("--ignore-windows: written outside the sync window"),
        "{}",
        explain(&history)
    );
    // In sync, the window still closed: nothing to do, and still held.
    let out = sw(emu, &ws, &["reconcile", "--once"]);
    assert_eq!(code(&out), Some(2), "{}", explain(&out));

    // A rollback is a person's act: it does not wait for the window.
    ws.edit(
        "desired-state/dev.yaml",
        "FlowLogRetentionDays: 14",
        "FlowLogRetentionDays: 30",
    );
    commit(&ws, "B");
    let out = sw(emu, &ws, &["reconcile", "--once", "--ignore-windows"]);
    assert_eq!(code(&out), Some(0), "{}", explain(&out));
    assert_eq!(retention(&config).await, "30");
    let out = sw(emu, &ws, &["rollback", "--to", &a[..10]]);
    assert_eq!(code(&out), Some(0), "{}", explain(&out));
    assert_eq!(retention(&config).await, "14");
}
