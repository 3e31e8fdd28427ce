//! The controller on the simulated cloud and tokio's paused clock:
//! scheduling, file-change and SIGHUP triggers, backoff after failures,
//! one alert per episode over many passes, a broken reload, and shutdown
//! in the middle of a pass followed by a restart.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Workspace;
use common::controller::{Recorder, SimConnect, settings};
use stackwarden::cloud::sim::{SimCloud, SimConfig};
use stackwarden::cloud::{Cloud, Retrying};
use stackwarden::controller::{Controller, Settings, Shared};
use stackwarden::plan::Verdict;
use stackwarden::state::{Backend, MemoryStore, State, Suspension};
use tokio::sync::{broadcast, watch};

/// A controller over the workspace's dev, driven by `driver`, which gets
/// the shared status and the SIGHUP sender and returns when the test is
/// done; then the controller is stopped and must end.
async fn with_controller<F, Fut>(
    ws: &Workspace,
    cloud: &Retrying<SimCloud>,
    recorder: &Recorder,
    settings: &Settings,
    driver: F,
) where
    F: FnOnce(Arc<Shared>, broadcast::Sender<()>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    with_state(ws, cloud, recorder, settings, None, driver).await
}

/// [`with_controller`], with a state table.
async fn with_state<F, Fut>(
    ws: &Workspace,
    cloud: &Retrying<SimCloud>,
    recorder: &Recorder,
    settings: &Settings,
    state: Option<&Arc<State<Backend>>>,
    driver: F,
) where
    F: FnOnce(Arc<Shared>, broadcast::Sender<()>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let shared = Arc::new(Shared::default());
    let (stop, stopped) = watch::channel(false);
    let (hup, _) = broadcast::channel(4);
    let files = BTreeMap::from([("dev".to_owned(), ws.path("desired-state/dev.yaml"))]);
    let connect = SimConnect(cloud.clone());
    let controller = Controller {
        connect: &connect,
        notifier: recorder,
        sink: recorder,
        settings,
        shared: &shared,
        state,
        caller: "arn:aws:iam::123456789012:role/operator",
        leases: None,
    };
    let drive = async {
        driver(shared.clone(), hup.clone()).await;
        stop.send(true).unwrap();
    };
    tokio::join!(controller.run(files, &hup, stopped), drive);
}

/// Sleeps (simulated) until `cond` holds, checking every second.
async fn until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn passes(shared: &Shared) -> u64 {
    shared.env("dev").map_or(0, |s| s.passes)
}

fn in_sync(shared: &Shared) -> bool {
    shared
        .env("dev")
        .is_some_and(|s| s.result == Some(Verdict::InSync))
}

const KEY: &str = "- {AttributeName: cycleId, KeyType: HASH}";
const REPLACING_KEY: &str = "- {AttributeName: organizationId, KeyType: HASH}";

#[tokio::test(start_paused = true)]
async fn a_blocked_change_over_a_hundred_passes_alerts_once_then_recovers_then_alerts_again() {
    let ws = Workspace::new();
    let cloud = Retrying::new(SimCloud::new(SimConfig::default()));
    let rec = Recorder::default();
    let (ws, cloud, rec) = (&ws, &cloud, &rec);
    with_controller(ws, cloud, rec, &settings(60), |shared, _| async move {
        until("dev created", Duration::from_secs(3600), || {
            in_sync(&shared)
        })
        .await;
        assert!(rec.alerts().is_empty(), "{:?}", rec.alerts());

        // The file watch picks the change up without waiting for the interval.
        ws.edit("templates/dynamodb.yaml", KEY, REPLACING_KEY);
        until("the blocked alert", Duration::from_secs(10), || {
            rec.alerts().len() == 1
        })
        .await;
        let before = passes(&shared);
        tokio::time::sleep(Duration::from_secs(100 * 60)).await;
        assert!(passes(&shared) >= before + 99, "{}", passes(&shared));
        let alerts = rec.alerts();
        assert_eq!(alerts.len(), 1, "one alert per episode: {alerts:#?}");
        assert_eq!(alerts[0].event, "blocked");
        assert!(alerts[0].subject.starts_with("[stackwarden] dev: "));
        assert!(alerts[0].message.contains("ReviewCyclesTable"));

        ws.edit("templates/dynamodb.yaml", REPLACING_KEY, KEY);
        until("the recovery", Duration::from_secs(10), || {
            rec.alerts().len() == 2
        })
        .await;
        assert_eq!(rec.alerts()[1].event, "recovered");

        ws.edit("templates/dynamodb.yaml", KEY, REPLACING_KEY);
        until("a new episode", Duration::from_secs(10), || {
            rec.alerts().len() == 3
        })
        .await;
        assert_eq!(rec.alerts()[2].event, "blocked");
    })
    .await;
    assert!(rec.metrics.lock().unwrap().len() >= 100);
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());
}

#[tokio::test(start_paused = true)]
async fn a_broken_reload_keeps_enforcing_the_last_good_state_and_applies_nothing_of_it() {
    let ws = Workspace::new();
    let cloud = Retrying::new(SimCloud::new(SimConfig::default()));
    let rec = Recorder::default();
    let (ws, cloud, rec) = (&ws, &cloud, &rec);
    with_controller(ws, cloud, rec, &settings(60), |shared, _| async move {
        until("dev created", Duration::from_secs(3600), || {
            in_sync(&shared)
        })
        .await;
        // A broken edit that would also change a parameter.
        ws.edit(
            "desired-state/dev.yaml",
            "FlowLogRetentionDays: 14",
            "FlowLogRetentionDays: 30\n      colour: blue",
        );
        until("the error", Duration::from_secs(10), || {
            shared
                .env("dev")
                .is_some_and(|s| s.desired_state_error.is_some())
        })
        .await;
        let status = shared.env("dev").unwrap();
        assert!(
            status
                .desired_state_error
                .as_deref()
                .unwrap()
                .contains("colour"),
            "{status:?}"
        );
        let alert = rec.alerts().pop().expect("an alert");
        assert!(alert.message.contains("desired-state"), "{alert:?}");
        // Drift is still corrected, to the last good state.
        let network = "dev-performance-mgmt-network";
        cloud.edit_parameter(network, "FlowLogRetentionDays", "7");
        until("drift corrected", Duration::from_secs(300), || {
            cloud.stack(network).unwrap().parameters["FlowLogRetentionDays"] == "14"
        })
        .await;

        ws.edit(
            "desired-state/dev.yaml",
            "FlowLogRetentionDays: 30\n      colour: blue",
            "FlowLogRetentionDays: 14",
        );
        // The drift pass may still be polling its update (polls grow to
        // 30 s); the fix is looked at right after it.
        until("the fix", Duration::from_secs(60), || {
            shared
                .env("dev")
                .is_some_and(|s| s.desired_state_error.is_none())
        })
        .await;
        assert_eq!(rec.alerts().last().unwrap().event, "recovered");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn failing_passes_back_off_exponentially_instead_of_every_interval() {
    let ws = Workspace::new();
    // Every pass fails: AWS throttles every call (a transient error).
    let cloud = Retrying::new(SimCloud::new(SimConfig {
        throttle_rate: 1.0,
        ..SimConfig::default()
    }));
    let rec = Recorder::default();
    let (ws, cloud, rec) = (&ws, &cloud, &rec);
    let s = Settings {
        backoff_initial: Duration::from_secs(30),
        backoff_max: Duration::from_secs(15 * 60),
        ..settings(10)
    };
    with_controller(ws, cloud, rec, &s, |shared, _| async move {
        tokio::time::sleep(Duration::from_secs(2 * 3600)).await;
        let n = passes(&shared);
        // Every 10 s would be hundreds of passes; each pass spends the
        // call budget (2 min), then 30 s doubling to 15 min: ~10.
        assert!((6..=16).contains(&n), "{n} passes in two hours");
        let status = shared.env("dev").unwrap();
        assert!(
            status.error.as_deref().unwrap_or("").contains("throttled"),
            "{status:?}"
        );
        assert_eq!(status.waiting_for, None);
    })
    .await;
    assert_eq!(cloud.write_calls(), 0);
    // One alert for the whole failing episode.
    assert_eq!(rec.alerts().len(), 1, "{:#?}", rec.alerts());
    assert_eq!(rec.alerts()[0].severity, "critical");
}

#[tokio::test(start_paused = true)]
async fn sighup_starts_a_pass_at_once() {
    let ws = Workspace::new();
    let cloud = Retrying::new(SimCloud::new(SimConfig::default()));
    let rec = Recorder::default();
    let (ws, cloud, rec) = (&ws, &cloud, &rec);
    with_controller(ws, cloud, rec, &settings(3600), |shared, hup| async move {
        until("dev created", Duration::from_secs(3600), || {
            in_sync(&shared)
        })
        .await;
        let before = passes(&shared);
        hup.send(()).unwrap();
        until("a pass", Duration::from_secs(5), || {
            passes(&shared) > before
        })
        .await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_mid_pass_ends_within_the_grace_and_a_restart_continues_without_duplicates() {
    let ws = Workspace::new();
    let cloud = Retrying::new(SimCloud::new(SimConfig {
        default_latency: Duration::from_secs(20 * 60),
        ..SimConfig::default()
    }));
    let rec = Recorder::default();
    let (ws, cloud, rec) = (&ws, &cloud, &rec);
    let s = Settings {
        shutdown_grace: Duration::from_secs(30),
        ..settings(60)
    };
    let stopped_at = Arc::new(Mutex::new(None));
    let at = stopped_at.clone();
    let start = tokio::time::Instant::now();
    with_controller(ws, cloud, rec, &s, |_, _| async move {
        // Network and dynamodb are being created.
        tokio::time::sleep(Duration::from_secs(120)).await;
        *at.lock().unwrap() = Some(tokio::time::Instant::now());
    })
    .await;
    let stopped = stopped_at.lock().unwrap().unwrap();
    let took = tokio::time::Instant::now() - stopped;
    assert!(
        took <= Duration::from_secs(31),
        "shutdown took {took:?} (grace 30 s)"
    );
    assert!(start.elapsed() < Duration::from_secs(20 * 60));

    // A new controller (the restart) picks up where the cloud is.
    with_controller(ws, cloud, rec, &s, |shared, _| async move {
        until("dev converged", Duration::from_secs(6 * 3600), || {
            in_sync(&shared)
        })
        .await;
    })
    .await;
    assert_eq!(
        cloud.calls()["CreateChangeSet"],
        8,
        "one change set per stack"
    );
    assert_eq!(cloud.calls()["ExecuteChangeSet"], 8);
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());
}

#[tokio::test(start_paused = true)]
async fn a_permanent_error_waits_for_a_change_instead_of_backing_off() {
    let ws = Workspace::new();
    // The credentials belong to another account than the desired state's.
    let cloud = Retrying::new(SimCloud::new(SimConfig {
        account: "999999999999".into(),
        ..SimConfig::default()
    }));
    let rec = Recorder::default();
    let (ws, cloud, rec) = (&ws, &cloud, &rec);
    let s = Settings {
        backoff_initial: Duration::from_secs(30),
        backoff_max: Duration::from_secs(15 * 60),
        ..settings(60)
    };
    with_controller(ws, cloud, rec, &s, |shared, _| async move {
        tokio::time::sleep(Duration::from_secs(2 * 3600 + 60)).await;
        // The first pass, then one recheck an hour (backoff would be ~12).
        let n = passes(&shared);
        assert_eq!(n, 3, "{n} passes in two hours");
        let status = shared.env("dev").unwrap();
        assert!(
            status
                .error
                .as_deref()
                .unwrap_or("")
                .contains("999999999999")
        );
        let waiting = status.waiting_for.clone().unwrap_or_default();
        assert!(
            waiting.contains("desired state or of the credentials"),
            "{status:?}"
        );

        // The desired state changes: looked at at once, and it converges.
        ws.edit(
            "desired-state/dev.yaml",
            "account_id: \"123456789012\"",
            "account_id: \"999999999999\"",
        );
        until("converged", Duration::from_secs(3600), || in_sync(&shared)).await;
        assert_eq!(shared.env("dev").unwrap().waiting_for, None);
    })
    .await;
    assert_eq!(
        rec.alerts()
            .iter()
            .filter(|a| a.severity == "critical")
            .count(),
        1,
        "{:#?}",
        rec.alerts()
    );
}

fn operator(reason: &str) -> Suspension {
    Suspension {
        by: "arn:aws:iam::123456789012:user/oncall".into(),
        since: 1_767_225_600,
        reason: reason.into(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_suspended_environment_is_observed_and_reported_never_written_until_resumed() {
    let ws = Workspace::new();
    let cloud = Retrying::new(SimCloud::new(SimConfig::default()));
    let rec = Recorder::default();
    let state = Arc::new(State::new(Backend::Memory(MemoryStore::default())));
    let (ws, cloud, rec, state) = (&ws, &cloud, &rec, &state);
    let env = stackwarden::spec::load(&ws.path("desired-state/dev.yaml")).unwrap();
    let network = env.stacks["network"].name.clone();
    with_state(
        ws,
        cloud,
        rec,
        &settings(60),
        Some(state),
        |shared, hup| async move {
            until("dev created", Duration::from_secs(3600), || {
                in_sync(&shared)
            })
            .await;
            let created = state.history("dev").await.unwrap();
            assert_eq!(created.len(), 1, "the pass that created dev: {created:#?}");
            assert_eq!(created[0].stacks.len(), 8, "{created:#?}");

            state
                .suspend("dev", &operator("incident 42"), false)
                .await
                .unwrap();
            cloud.edit_parameter(&network, "FlowLogRetentionDays", "90");
            let writes = cloud.write_calls();
            let before = passes(&shared);
            let _ = hup.send(());
            tokio::time::sleep(Duration::from_secs(10 * 60)).await;
            assert!(passes(&shared) >= before + 10, "{}", passes(&shared));
            assert_eq!(
                cloud.write_calls(),
                writes,
                "a suspended environment is written"
            );
            let status = shared.env("dev").unwrap();
            assert_eq!(status.result, Some(Verdict::Differences));
            assert_eq!(status.suspended, Some(operator("incident 42")));
            assert!(
                shared
                    .metrics_text()
                    .contains("stackwarden_suspended{environment=\"dev\"} 1"),
                "{}",
                shared.metrics_text()
            );
            assert!(
                shared.status_json().contains("incident 42"),
                "{}",
                shared.status_json()
            );
            let drift = rec.alerts();
            assert_eq!(drift.len(), 1, "drift is alerted once: {drift:#?}");
            assert_eq!(drift[0].event, "drift");
            assert_eq!(state.history("dev").await.unwrap().len(), 1);

            assert!(state.resume("dev").await.unwrap().is_some());
            let _ = hup.send(());
            until("converged after resume", Duration::from_secs(3600), || {
                cloud.stack(&network).unwrap().parameters["FlowLogRetentionDays"] != "90"
                    && in_sync(&shared)
            })
            .await;
            assert_eq!(shared.env("dev").unwrap().suspended, None);
            assert_eq!(state.history("dev").await.unwrap().len(), 2);
        },
    )
    .await;
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());
}

#[tokio::test(start_paused = true)]
async fn a_restart_does_not_tell_again_an_episode_still_open() {
    let ws = Workspace::new();
    let cloud = Retrying::new(SimCloud::new(SimConfig::default()));
    let rec = Recorder::default();
    let state = Arc::new(State::new(Backend::Memory(MemoryStore::default())));
    let (ws, cloud, rec, state) = (&ws, &cloud, &rec, &state);
    with_state(
        ws,
        cloud,
        rec,
        &settings(60),
        Some(state),
        |shared, _| async move {
            until("dev created", Duration::from_secs(3600), || {
                in_sync(&shared)
            })
            .await;
            ws.edit("templates/dynamodb.yaml", KEY, REPLACING_KEY);
            until("the blocked alert", Duration::from_secs(10), || {
                rec.alerts().len() == 1
            })
            .await;
        },
    )
    .await;
    let (open, _) = state.episodes("dev").await.unwrap();
    assert_eq!(open.len(), 1, "{open:#?}");

    // A new process: the episode is still open, and already told.
    with_state(
        ws,
        cloud,
        rec,
        &settings(60),
        Some(state),
        |shared, _| async move {
            until("three passes", Duration::from_secs(600), || {
                passes(&shared) >= 3
            })
            .await;
        },
    )
    .await;
    assert_eq!(rec.alerts().len(), 1, "told again: {:#?}", rec.alerts());

    // Its end is told by the process that sees it.
    ws.edit("templates/dynamodb.yaml", REPLACING_KEY, KEY);
    with_state(
        ws,
        cloud,
        rec,
        &settings(60),
        Some(state),
        |shared, _| async move {
            until("the recovery", Duration::from_secs(600), || {
                rec.alerts().len() == 2 && in_sync(&shared)
            })
            .await;
        },
    )
    .await;
    assert_eq!(rec.alerts()[1].event, "recovered");
    assert!(state.episodes("dev").await.unwrap().0.is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_daemon_detects_drift_on_each_stacks_interval_within_its_bound_and_tells_it_once() {
    const CLUSTER: &str = "dev-performance-mgmt-ecs-cluster";
    let ws = Workspace::new();
    ws.edit(
        "desired-state/dev.yaml",
        "operation_timeout: 60m\n",
        "operation_timeout: 60m\ndrift: {interval: 30m}\n",
    );
    let cloud = Retrying::new(SimCloud::new(SimConfig::default()));
    let rec = Recorder::default();
    let (ws, cloud, rec) = (&ws, &cloud, &rec);
    with_controller(ws, cloud, rec, &settings(60), |shared, _| async move {
        until("dev created", Duration::from_secs(3600), || {
            in_sync(&shared)
        })
        .await;
        let sim = cloud.inner();
        sim.edit_out_of_band(CLUSTER, "TaskLogGroup", "/RetentionInDays", "3");
        let start = tokio::time::Instant::now();
        until("a drift alert", Duration::from_secs(3600), || {
            rec.alerts().iter().any(|a| a.event == "drift")
        })
        .await;
        // Found by the next round due (every stack's interval is 30m).
        assert!(start.elapsed() <= Duration::from_secs(45 * 60));
        tokio::time::sleep(Duration::from_secs(3 * 3600)).await;
        let drift: Vec<_> = rec
            .alerts()
            .into_iter()
            .filter(|a| a.event == "drift")
            .collect();
        assert_eq!(drift.len(), 1, "one alert per episode: {drift:#?}");
        assert!(
            drift[0]
                .message
                .contains("/RetentionInDays: expected 14, actual 3"),
            "{}",
            drift[0].message
        );
        // About 8 stacks every 30 minutes, never more than 2 at once.
        let detections = sim.calls().get("DetectStackDrift").copied().unwrap_or(0);
        let hours = 4 + 1;
        assert!(detections <= 8 * 2 * hours, "{detections}");
        assert!(detections >= 8 * 2 * 2, "{detections}");
        assert!(sim.max_detections_in_flight() <= 2);
        assert!(sim.max_detections_in_flight() >= 1);
        let status = shared.env("dev").unwrap();
        assert_eq!(
            status.drift["ecs-cluster"].lines(),
            ["TaskLogGroup (AWS::Logs::LogGroup) /RetentionInDays: expected 14, actual 3"]
        );
        let last = rec.metrics.lock().unwrap().last().cloned().unwrap();
        assert_eq!(last.drifted_resources["ecs-cluster"], 1);
        assert_eq!(last.drifted_resources["network"], 0);
        assert_eq!(last.drift_checked.len(), 8);
    })
    .await;
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());
}

fn at(rfc3339: &str) -> std::time::SystemTime {
    std::time::SystemTime::from(rfc3339.parse::<jiff::Timestamp>().expect("a timestamp"))
}

/// An allowed window every day 09:00 to 11:00 Berlin time. The simulation
/// starts on Saturday 28 March 2026 at 12:00 UTC, after that day's window
/// (08:00 to 10:00 UTC); in the night Berlin moves to summer time, so
/// Sunday's window opens at 07:00 UTC, an hour earlier in UTC than
/// Saturday's.
#[tokio::test(start_paused = true)]
async fn outside_its_sync_window_the_daemon_writes_nothing_and_converges_as_it_opens_across_a_dst_change()
 {
    let ws = Workspace::new();
    ws.dev_sync_window(
        "{kind: allow, schedule: \"0 9 * * *\", duration: 2h, timezone: Europe/Berlin}",
    );
    let cloud = Retrying::new(SimCloud::new(SimConfig {
        wall_clock_start: at("2026-03-28T12:00:00Z"),
        ..SimConfig::default()
    }));
    let rec = Recorder::default();
    let (ws, cloud, rec) = (&ws, &cloud, &rec);
    // A long interval: the pass at the opening comes from the window.
    let settings = Settings {
        watch_every: Duration::from_secs(600),
        ..settings(3600)
    };
    with_controller(ws, cloud, rec, &settings, |shared, _hup| async move {
        until("the first pass", Duration::from_secs(600), || {
            passes(&shared) >= 1
        })
        .await;
        let status = shared.env("dev").unwrap();
        let w = status.sync_window.clone().expect("the window is reported");
        assert!(!w.open, "{w:?}");
        assert_eq!(w.next_change, Some(at("2026-03-29T07:00:00Z")));
        assert_eq!(
            w.next_change_local.as_deref(),
            Some("2026-03-29 09:00 CEST")
        );
        assert_eq!(status.result, Some(Verdict::Differences));
        assert_eq!(
            w.describe(),
            "outside sync window (opens at 2026-03-29 09:00 CEST)"
        );
        let json = shared.status_json();
        assert!(
            json.contains("\"next_change_local\": \"2026-03-29 09:00 CEST\"")
                && json.contains("\"reason\": \"does not exist; outside sync window\""),
            "{json}"
        );
        // The stacks are missing: told once, as drift, while held.
        let alerts = rec.alerts();
        assert_eq!(alerts.len(), 1, "{alerts:#?}");
        assert_eq!(alerts[0].event, "drift");

        // Every pass until the opening writes nothing.
        let opening = at("2026-03-29T07:00:00Z");
        let a_minute_before =
            opening.duration_since(cloud.now()).unwrap() - Duration::from_secs(60);
        tokio::time::sleep(a_minute_before).await;
        assert_eq!(cloud.write_calls(), 0);
        let mut first_write = None;
        until("the first write", Duration::from_secs(24 * 3600), || {
            if cloud.write_calls() > 0 {
                first_write = Some(cloud.now());
            }
            first_write.is_some()
        })
        .await;
        let first_write = first_write.unwrap();
        assert!(first_write >= opening, "{first_write:?}");
        assert!(first_write < at("2026-03-29T07:00:10Z"), "{first_write:?}");
        assert!(
            passes(&shared) >= 19,
            "hourly passes while closed: {}",
            passes(&shared)
        );
        until("converged in the window", Duration::from_secs(3600), || {
            in_sync(&shared)
        })
        .await;
        let w = shared.env("dev").unwrap().sync_window.unwrap();
        assert!(w.open, "{w:?}");
        assert_eq!(w.next_change, Some(at("2026-03-29T09:00:00Z")));
    })
    .await;
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());
}
