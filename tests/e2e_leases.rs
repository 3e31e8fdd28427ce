//! Two daemons sharing three environments through leases in one state
//! table: the real binary against the emulator (its DynamoDB holds the
//! table). Every environment is reconciled by exactly one replica at a
//! time (counted in the emulator's request log), both replicas hold some,
//! `kill -9` of one hands its environments over within two lease
//! durations, SIGTERM within seconds.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use common::daemon::{Daemon, until};
use common::{Emulator, Workspace, desired_count, run, stderr};

const TABLE: &str = "stackwarden-state";
const ENVS: [&str; 3] = ["dev", "staging", "prod"];
/// Short, so the test is quick; the defaults are 30 s and 10 s.
const LEASE: Duration = Duration::from_secs(6);

/// The shipped staging and prod, moved into the emulator's one account.
fn workspace() -> Workspace {
    let ws = Workspace::new();
    for (env, account) in [("staging", "234567890123"), ("prod", "345678901234")] {
        let file = format!("desired-state/{env}.yaml");
        ws.edit(
            &file,
            &format!("account_id: \"{account}\""),
            "account_id: \"123456789012\"",
        );
        ws.edit(
            &file,
            &format!("arn:aws:sns:us-east-1:{account}:"),
            "arn:aws:sns:us-east-1:123456789012:",
        );
        let text = std::fs::read_to_string(ws.path(&file)).unwrap();
        let mut out = String::new();
        let mut skipping = false;
        for line in text.lines() {
            if line.starts_with("assume_role:") {
                skipping = true;
                continue;
            }
            if skipping && line.starts_with("  ") {
                continue;
            }
            skipping = false;
            out.push_str(line);
            out.push('\n');
        }
        std::fs::write(ws.path(&file), out).unwrap();
    }
    ws
}

fn start(emu: &Emulator, ws: &Workspace, id: &str) -> Daemon {
    Daemon::start_envs(
        emu,
        ws,
        &[],
        &[
            "--state-table",
            TABLE,
            "--lease-duration",
            "6s",
            "--lease-renew",
            "1s",
            "--replica-id",
            id,
        ],
    )
}

fn status(d: &Daemon) -> serde_json::Value {
    serde_json::from_str(&d.get("/status").1).unwrap_or_default()
}

/// The environments a daemon holds, by its /status.
fn holds(d: &Daemon) -> Vec<String> {
    let s = status(d);
    ENVS.iter()
        .filter(|e| s[**e]["lease"]["held"] == true)
        .map(|e| (*e).to_owned())
        .collect()
}

fn in_sync(d: &Daemon, env: &str) -> bool {
    status(d)[env]["result"] == "in_sync"
}

fn elapsed(since: SystemTime) -> Duration {
    since.elapsed().unwrap_or_default()
}

#[tokio::test]
async fn two_daemons_share_three_environments_one_replica_at_a_time_and_hand_over() {
    let emu = Emulator::get();
    let _guard = emu.lock().await;
    let config = emu.sdk_config().await;
    let ws = workspace();
    let init = run(emu
        .command()
        .args(["state", "init", "--state-table", TABLE]));
    assert_eq!(init.status.code(), Some(0), "{}", stderr(&init));

    let mut a = start(emu, &ws, "replica-a");
    let b = start(emu, &ws, "replica-b");
    until(
        "every environment converged",
        Duration::from_secs(180),
        &a,
        async || ENVS.iter().all(|e| in_sync(&a, e) || in_sync(&b, e)),
    )
    .await;
    until(
        "both replicas hold some",
        Duration::from_secs(30),
        &a,
        async || {
            let (ha, hb) = (holds(&a), holds(&b));
            !ha.is_empty() && !hb.is_empty() && ha.len() + hb.len() == 3
        },
    )
    .await;
    let ready = a.get("/readyz");
    assert_eq!(ready.0, 200, "{ready:?}");
    assert!(ready.1.contains("holds the lease of"), "{ready:?}");
    // The CLI shows the holders too.
    let status_cli = run(emu
        .command()
        .args(["status", "-e", "dev", "--state-table", TABLE])
        .args(["--desired-state", &ws.desired_state().display().to_string()]));
    assert!(
        common::stdout(&status_cli).contains("lease held by replica-"),
        "{}",
        common::stdout(&status_cli)
    );
    let metrics = a.get("/metrics").1;
    for e in holds(&a) {
        assert!(
            metrics.contains(&format!("stackwarden_lease_held{{environment=\"{e}\"}} 1")),
            "{metrics}"
        );
    }
    assert!(status(&b)[&holds(&a)[0]]["lease"]["holder"] == "replica-a");

    // kill -9 of A: B takes its environments once their leases stood still
    // for a lease duration, and converges an out-of-band change in them.
    let a_envs = holds(&a);
    let killed = SystemTime::now();
    a.signal("-KILL");
    a.wait(Duration::from_secs(10));
    let ecs = aws_sdk_ecs::Client::new(&config);
    let service = format!("{}-performance-mgmt", a_envs[0]);
    ecs.update_service()
        .cluster(&service)
        .service(&service)
        .desired_count(7)
        .send()
        .await
        .unwrap();
    until("B holds every environment", LEASE * 2, &b, async || {
        holds(&b).len() == 3
    })
    .await;
    let took_over = elapsed(killed);
    assert!(took_over <= LEASE * 2, "taken over after {took_over:?}");
    until(
        "the change in A's environment converged",
        Duration::from_secs(60),
        &b,
        async || desired_count(&config, &service, &service).await != 7,
    )
    .await;

    // SIGTERM of B, with C running: C takes everything within seconds
    // (released, not expired: sooner than a lease duration).
    let c = start(emu, &ws, "replica-c");
    until("C holds some", Duration::from_secs(30), &c, async || {
        !holds(&c).is_empty()
    })
    .await;
    let mut b = b;
    let stopping = SystemTime::now();
    b.signal("-TERM");
    until("C holds every environment", LEASE, &c, async || {
        holds(&c).len() == 3
    })
    .await;
    let handed_over = elapsed(stopping);
    // Released, not expired: C took none of them over from a holder.
    let c_status = status(&c);
    for e in ENVS {
        assert_eq!(c_status[e]["lease"]["handovers"], 0, "{c_status}");
    }
    assert_eq!(
        b.wait(Duration::from_secs(20)).and_then(|s| s.code()),
        Some(0)
    );
    until("C converged", Duration::from_secs(60), &c, async || {
        ENVS.iter().all(|e| in_sync(&c, e))
    })
    .await;

    // No stack was ever operated on twice: one execution each, all of them.
    let mut executions: BTreeMap<String, usize> = BTreeMap::new();
    for r in emu.requests() {
        if r["action"] == "ExecuteChangeSet" {
            *executions
                .entry(r["stack"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    assert_eq!(executions.len(), 24, "{executions:#?}");
    assert!(executions.values().all(|n| *n == 1), "{executions:#?}");
    eprintln!(
        "hand-over after kill -9: {:.1}s (lease {}s); after SIGTERM: {:.1}s",
        took_over.as_secs_f64(),
        LEASE.as_secs(),
        handed_over.as_secs_f64()
    );
    drop(c);
}
