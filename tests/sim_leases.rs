//! Leases between replicas on tokio's paused clock, over one in-memory
//! state table (each replica with its own view of it, and its own faults):
//! expiry judged on the taker's clock only, renewal under throttling, an
//! outage, spreading and hand-over, the fence that stops every write, and
//! two controllers on one environment with one of them paused.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::Workspace;
use common::controller::{Recorder, SimConnect, settings};
use stackwarden::cloud::sim::{SimCloud, SimConfig};
use stackwarden::cloud::{ChangeSetKind, ChangeSetRequest, Cloud, CloudError, Fenced, Retrying};
use stackwarden::controller::{Controller, Shared};
use stackwarden::lease::{Coordinator, Fence, LeaseSettings};
use stackwarden::plan::Verdict;
use stackwarden::state::{Backend, MemoryStore, State};
use tokio::sync::{broadcast, watch};
use tokio::time::{Instant, advance};

fn replica(
    table: &MemoryStore,
    id: &str,
    envs: &[&str],
) -> (Coordinator<Backend>, MemoryStore, Arc<State<Backend>>) {
    let view = table.replica();
    let state = Arc::new(State::new(Backend::Memory(view.clone())));
    let c = Coordinator::new(
        state.clone(),
        id,
        LeaseSettings::default(),
        envs.iter().map(|e| (*e).to_owned()),
    );
    (c, view, state)
}

fn held(c: &Coordinator<Backend>, env: &str) -> bool {
    c.fence(env).holds()
}

fn count_held(c: &Coordinator<Backend>) -> usize {
    c.status().values().filter(|l| l.held).count()
}

#[tokio::test(start_paused = true)]
async fn a_lease_is_taken_over_only_after_standing_still_a_full_duration_on_the_takers_clock() {
    let table = MemoryStore::default();
    let (a, _, _) = replica(&table, "a", &["dev"]);
    let (b, _, _) = replica(&table, "b", &["dev"]);
    let start = Instant::now();
    a.tick().await;
    assert!(held(&a, "dev"));
    // A stops renewing (paused, or cut off); B looks every second.
    let mut taken_at = None;
    for _ in 0..40 {
        b.tick().await;
        assert!(
            !(held(&a, "dev") && held(&b, "dev")),
            "both hold dev at {:?}",
            start.elapsed()
        );
        if held(&b, "dev") && taken_at.is_none() {
            taken_at = Some(start.elapsed());
        }
        advance(Duration::from_secs(1)).await;
    }
    // A's validity ends at 24 s (30 s less its margin); B waits 30 s from
    // its first sight of A's last version.
    let taken_at = taken_at.expect("B took the lease");
    assert!(taken_at >= Duration::from_secs(30), "{taken_at:?}");
    assert!(taken_at <= Duration::from_secs(31), "{taken_at:?}");
    assert_eq!(b.status()["dev"].handovers, 1);

    // A replica that first sees the lease late waits a full duration from
    // then: nothing it reads (no time is stored) can make it take early,
    // whatever its or the holder's wall clock says.
    let (c, _, _) = replica(&table, "c", &["dev"]);
    advance(Duration::from_secs(25)).await; // B paused too, from now
    c.tick().await;
    let seen = Instant::now();
    while !held(&c, "dev") {
        advance(Duration::from_secs(1)).await;
        c.tick().await;
    }
    assert!(
        seen.elapsed() >= Duration::from_secs(30),
        "{:?}",
        seen.elapsed()
    );
    assert!(!held(&b, "dev"));
}

#[tokio::test(start_paused = true)]
async fn a_renewal_lost_to_throttling_is_made_at_the_next_round_and_the_lease_is_kept() {
    let table = MemoryStore::default();
    let (a, a_view, _) = replica(&table, "a", &["dev"]);
    let (b, _, _) = replica(&table, "b", &["dev"]);
    a.tick().await;
    for round in 0..30 {
        // Every other round of A loses its first calls to throttling.
        if round % 2 == 0 {
            a_view.throttle_next(3);
        }
        a.tick().await;
        for _ in 0..10 {
            b.tick().await;
            assert!(held(&a, "dev"), "A lost dev in round {round}");
            assert!(!held(&b, "dev"), "B took dev in round {round}");
            advance(Duration::from_secs(1)).await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_outage_of_the_table_ends_the_holders_writes_before_another_takes_over() {
    let table = MemoryStore::default();
    let (a, a_view, _) = replica(&table, "a", &["dev"]);
    let (b, _, _) = replica(&table, "b", &["dev"]);
    a.tick().await;
    b.tick().await;
    a_view.set_down(true);
    let start = Instant::now();
    let mut a_lost = None;
    let mut b_took = None;
    for _ in 0..40 {
        a.tick().await;
        b.tick().await;
        assert!(!(held(&a, "dev") && held(&b, "dev")));
        if !held(&a, "dev") && a_lost.is_none() {
            a_lost = Some(start.elapsed());
        }
        if held(&b, "dev") && b_took.is_none() {
            b_took = Some(start.elapsed());
        }
        advance(Duration::from_secs(1)).await;
    }
    let (a_lost, b_took) = (a_lost.unwrap(), b_took.unwrap());
    assert!(a_lost < b_took, "{a_lost:?} {b_took:?}");
    // Back: A sees it lost the lease and does not take it back.
    a_view.set_down(false);
    a.tick().await;
    assert!(!held(&a, "dev"));
    assert!(held(&b, "dev"));
}

#[tokio::test(start_paused = true)]
async fn replicas_spread_environments_and_a_stopping_replica_hands_over_at_once() {
    let envs = ["dev", "staging", "prod"];
    let table = MemoryStore::default();
    let (a, _, _) = replica(&table, "a", &envs);
    let (b, _, _) = replica(&table, "b", &envs);
    a.tick().await;
    assert_eq!(count_held(&a), 3, "alone, A takes every environment");
    b.tick().await;
    assert_eq!(count_held(&b), 0, "nothing is free yet");
    // A sees B's heartbeat: above its share (2 of 3), it lets one go.
    a.tick().await;
    b.tick().await;
    assert_eq!((count_held(&a), count_held(&b)), (2, 1));
    for _ in 0..10 {
        advance(Duration::from_secs(10)).await;
        a.tick().await;
        b.tick().await;
        assert_eq!((count_held(&a), count_held(&b)), (2, 1), "stable");
    }
    // A stops (SIGTERM): its leases are released, and B takes them at its
    // next round, not a lease duration later.
    a.shut_down(|_| {}).await;
    b.tick().await;
    assert_eq!(count_held(&b), 3);
    assert_eq!(count_held(&a), 0);
}

#[tokio::test(start_paused = true)]
async fn a_replica_restarted_under_the_same_id_takes_its_share_again() {
    let envs = ["dev", "staging"];
    let table = MemoryStore::default();
    let (a, _, _) = replica(&table, "a", &envs);
    let (b, _, _) = replica(&table, "b", &envs);
    a.tick().await;
    b.tick().await;
    a.tick().await;
    b.tick().await;
    assert_eq!((count_held(&a), count_held(&b)), (1, 1));
    // A dies (its items stay) and comes back as "a".
    drop(a);
    let (a, _, _) = replica(&table, "a", &envs);
    for _ in 0..10 {
        a.tick().await;
        b.tick().await;
        advance(Duration::from_secs(10)).await;
    }
    assert_eq!((count_held(&a), count_held(&b)), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_fence_that_fell_refuses_every_write_before_it_is_sent() {
    let cloud = SimCloud::new(SimConfig::default());
    let fence = Fence::default(); // never held
    let fenced = Fenced::new(&cloud, &fence, "dev");
    let request = ChangeSetRequest {
        stack_name: "dev-network".into(),
        change_set_name: "stackwarden-1".into(),
        kind: ChangeSetKind::Create,
        template_body: "Resources: {}".into(),
        template_url: None,
        artifacts: vec![],
        parameters: BTreeMap::new(),
        tags: BTreeMap::new(),
        description: String::new(),
        include_nested_stacks: false,
        revert_drift: false,
    };
    assert!(matches!(
        fenced.create_change_set(&request).await,
        Err(CloudError::LeaseLost(_))
    ));
    assert!(matches!(
        fenced.delete_stack("dev-network").await,
        Err(CloudError::LeaseLost(_))
    ));
    assert!(matches!(
        fenced.update_service("c", "s", Some(1), None).await,
        Err(CloudError::LeaseLost(_))
    ));
    // Reads go through.
    assert!(fenced.describe_stack("dev-network").await.is_ok());
    assert_eq!(cloud.write_calls(), 0, "{:?}", cloud.calls());
}

#[tokio::test(start_paused = true)]
async fn a_paused_replica_that_wakes_after_its_lease_was_taken_writes_nothing_more() {
    let ws = Workspace::new();
    let cloud = Retrying::new(SimCloud::new(SimConfig::default()));
    let table = MemoryStore::default();
    let files = BTreeMap::from([("dev".to_owned(), ws.path("desired-state/dev.yaml"))]);
    let (a_leases, _, a_state) = replica(&table, "a", &["dev"]);
    let (b_leases, _, b_state) = replica(&table, "b", &["dev"]);
    let (a_shared, b_shared) = (Shared::default(), Shared::default());
    let (a_rec, b_rec) = (Recorder::default(), Recorder::default());
    let connect = SimConnect(cloud.clone());
    let s = settings(60);
    let a = Controller {
        connect: &connect,
        notifier: &a_rec,
        sink: &a_rec,
        settings: &s,
        shared: &a_shared,
        state: Some(&a_state),
        caller: "arn:aws:iam::123456789012:role/a",
        leases: Some(&a_leases),
    };
    let b = Controller {
        connect: &connect,
        notifier: &b_rec,
        sink: &b_rec,
        settings: &s,
        shared: &b_shared,
        state: Some(&b_state),
        caller: "arn:aws:iam::123456789012:role/b",
        leases: Some(&b_leases),
    };
    let (a_stop, a_stopped) = watch::channel(false);
    let (b_stop, b_stopped) = watch::channel(false);
    let (hup, _) = broadcast::channel(4);
    let a_run = a.run(files.clone(), &hup, a_stopped);
    tokio::pin!(a_run);

    // A takes dev and starts creating it (stacks take 30 s each).
    let started = async {
        while cloud.calls().get("ExecuteChangeSet").copied().unwrap_or(0) == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        _ = &mut a_run => panic!("A stopped"),
        _ = started => {}
    }
    assert!(a_leases.fence("dev").holds());

    // A is paused (not polled at all) while B runs for two minutes: B
    // takes the lease after seeing it stand still for 30 s, and carries on.
    let b_run = b.run(files.clone(), &hup, b_stopped);
    tokio::pin!(b_run);
    tokio::select! {
        _ = &mut b_run => panic!("B stopped"),
        _ = tokio::time::sleep(Duration::from_secs(120)) => {}
    }
    assert!(b_leases.fence("dev").holds());
    assert!(
        !a_leases.fence("dev").holds(),
        "A's lease outlived its validity"
    );

    // A wakes: its first look at the fence ends its pass; B converges.
    let done = async {
        while !b_shared
            .env("dev")
            .is_some_and(|s| s.result == Some(Verdict::InSync))
        {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    tokio::select! {
        _ = &mut a_run => panic!("A stopped"),
        _ = &mut b_run => panic!("B stopped"),
        _ = done => {}
    }
    let a_status = a_shared.env("dev").unwrap();
    assert!(
        a_status
            .error
            .as_deref()
            .is_some_and(|e| e.contains("lease")),
        "{a_status:?}"
    );
    assert!(cloud.violations().is_empty(), "{:?}", cloud.violations());
    assert!(
        b_shared
            .metrics_text()
            .contains("stackwarden_lease_held{environment=\"dev\"} 1")
    );
    assert!(
        a_shared
            .metrics_text()
            .contains("stackwarden_lease_held{environment=\"dev\"} 0")
    );
    a_stop.send(true).unwrap();
    b_stop.send(true).unwrap();
    tokio::join!(a_run, b_run);
}
