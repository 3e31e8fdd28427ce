//! The status page: its weight in bytes and the time to render it, for 3
//! environments and for 100 (the shipped dev, each with the outcome of a
//! real pass on the simulated cloud, a closed sync window and two open
//! alerts), index and one environment's page.
//!
//! Run: `cargo bench --bench page`. It reports; it asserts nothing.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use stackwarden::apply::{self, Options};
use stackwarden::cloud::Retrying;
use stackwarden::cloud::sim::{self, SimCloud, SimConfig};
use stackwarden::controller::EnvStatus;
use stackwarden::notify::{Finding, Kind};
use stackwarden::observe::Depth;
use stackwarden::spec;
use stackwarden::status_page;
use tokio::sync::Semaphore;
use tokio::time::Instant;

fn main() {
    // `cargo test --all-targets` runs this too (without --bench): then a
    // few rounds only.
    let rounds = if std::env::args().any(|a| a == "--bench") {
        200
    } else {
        3
    };
    let env = spec::load(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("desired-state/dev.yaml"),
    )
    .expect("dev loads");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    let cloud = Retrying::new(SimCloud::new(SimConfig {
        latency: sim::latencies(&env, &sim::SERVICE_MINUTES),
        ..SimConfig::default()
    }));
    let report = rt
        .block_on(apply::reconcile(
            &cloud,
            &env,
            &Semaphore::new(apply::DEFAULT_MAX_PARALLEL),
            &Options {
                depth: Depth::Full,
                ..Options::default()
            },
        ))
        .expect("pass");
    let now = SystemTime::now();
    let unix = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let one = EnvStatus {
        file: "desired-state/dev.yaml".into(),
        revision: Some(env.revision.clone()),
        passes: 288,
        last_pass_at: Some(unix - 42),
        last_pass_seconds: Some(report.seconds),
        result: Some(report.verdict()),
        objects: stackwarden::outcome::outcomes(&report),
        sync_window: stackwarden::window::Windows(vec![
            stackwarden::window::SyncWindow::new(
                stackwarden::window::Kind::Allow,
                "0 8 * * 1-5",
                Duration::from_secs(10 * 3600),
                "Europe/Berlin",
            )
            .expect("a window"),
        ])
        .state(now),
        open_alerts: vec![
            Finding {
                object: "stack:network".into(),
                kind: Kind::Drift,
                difference: "parameter FlowLogRetentionDays differs".into(),
                detail: None,
            },
            Finding {
                object: "resource:dynamodb/ReviewCyclesTable/BillingMode".into(),
                kind: Kind::Drift,
                difference: "drifted".into(),
                detail: Some("expected PAY_PER_REQUEST, actual PROVISIONED".into()),
            },
        ],
        ..EnvStatus::default()
    };
    println!(
        "status page: {} objects per environment, {rounds} renders each",
        one.objects.len()
    );
    println!(
        "{:>12}  {:>12}  {:>14}  {:>14}  {:>16}",
        "environments", "index bytes", "index render", "env page bytes", "env page render"
    );
    for n in [3, 100] {
        let all: BTreeMap<String, EnvStatus> = (0..n)
            .map(|i| (format!("env-{i:03}"), one.clone()))
            .collect();
        let (index_bytes, index_time) = measure(rounds, || status_page::index(&all, now));
        let (env_bytes, env_time) = measure(rounds, || {
            status_page::environment("env-000", &all["env-000"], now)
        });
        println!(
            "{n:>12}  {index_bytes:>12}  {:>14}  {env_bytes:>14}  {:>16}",
            format!("{:.1} µs", index_time.as_secs_f64() * 1e6),
            format!("{:.1} µs", env_time.as_secs_f64() * 1e6),
        );
    }
}

/// The page's size and the median time to render it.
fn measure(rounds: usize, render: impl Fn() -> String) -> (usize, Duration) {
    let mut times: Vec<Duration> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(render());
            start.elapsed()
        })
        .collect();
    times.sort();
    (render().len(), times[times.len() / 2])
}
