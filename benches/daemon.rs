//! The daemon at scale on the simulated cloud: 100 environments of 8
//! stacks each (the shipped dev environment, renamed), spread over 10
//! accounts, reconciled every 5 minutes for 24 simulated hours by one
//! controller with its default settings (file watch every 2 s, 4
//! environments at once). The environments are created first; the day is
//! what a controller that watches them costs: API calls per hour per
//! account, CPU per pass, peak memory.
//!
//! Run: `cargo bench --bench daemon` (or `-- --envs 10 --hours 2`). It
//! reports; it asserts nothing.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use stackwarden::apply::{self, Options};
use stackwarden::cloud::CloudError;
use stackwarden::cloud::Retrying;
use stackwarden::cloud::sim::{SimCloud, SimConfig};
use stackwarden::controller::{Connect, Controller, Settings, Shared};
use stackwarden::metrics::{MetricsSink, PassMetrics};
use stackwarden::notify::{Alert, Notifier};
use stackwarden::observe::Depth;
use stackwarden::plan::Verdict;
use stackwarden::spec::{self, DesiredEnv};
use tokio::sync::{Semaphore, broadcast, watch};

mod common;
use common::{cpu_seconds, peak_rss_mib};

/// One simulated account per account id.
struct Accounts(BTreeMap<String, Retrying<SimCloud>>);

impl Connect for Accounts {
    type Cloud = Retrying<SimCloud>;
    async fn connect(&self, env: &DesiredEnv) -> Retrying<SimCloud> {
        self.0[env.account_id.as_deref().expect("an account")].clone()
    }
}

/// Counts what would have gone to SNS and CloudWatch.
#[derive(Default)]
struct Counter {
    alerts: AtomicU64,
    metrics: AtomicU64,
}

impl Notifier for Counter {
    async fn publish(&self, _topic: &str, _alert: &Alert) -> Result<(), CloudError> {
        self.alerts.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl MetricsSink for Counter {
    async fn put(&self, _ns: &str, _region: &str, _m: &PassMetrics) -> Result<(), CloudError> {
        self.metrics.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .map_or(default, |i| args[i + 1].parse().expect("a number"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --all-targets` runs this too, without --bench: a smoke
    // run of 2 environments for an hour.
    let full = args.iter().any(|a| a == "--bench");
    let envs = arg(&args, "--envs", if full { 100 } else { 2 }) as usize;
    let hours = arg(&args, "--hours", if full { 24 } else { 1 });
    let accounts = 10.min(envs);

    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&repo.join("templates"), &dir.path().join("templates"));
    std::fs::create_dir_all(dir.path().join("desired-state")).unwrap();
    let dev = std::fs::read_to_string(repo.join("desired-state/dev.yaml")).unwrap();
    let mut files = BTreeMap::new();
    let mut clouds = BTreeMap::new();
    for i in 0..envs {
        let name = format!("e{i:03}");
        let account = format!("{:012}", 100_000_000_000u64 + (i % accounts) as u64);
        let text = dev
            .replacen("environment: dev", &format!("environment: {name}"), 1)
            .replacen(
                "account_id: \"123456789012\"",
                &format!("account_id: \"{account}\""),
                1,
            )
            .replacen(
                "stack_name_prefix: dev-performance-mgmt",
                &format!("stack_name_prefix: {name}-performance-mgmt"),
                1,
            );
        let file = dir.path().join(format!("desired-state/{name}.yaml"));
        std::fs::write(&file, text).unwrap();
        files.insert(name, file);
        clouds.entry(account.clone()).or_insert_with(|| {
            Retrying::new(SimCloud::new(SimConfig {
                account,
                ..SimConfig::default()
            }))
        });
    }
    let connect = Accounts(clouds);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();

    // Create every environment first.
    rt.block_on(async {
        let limit = Semaphore::new(apply::DEFAULT_MAX_PARALLEL);
        for file in files.values() {
            let env = spec::load(file).unwrap_or_else(|e| panic!("{e}"));
            let cloud = connect.connect(&env).await;
            let options = Options {
                depth: Depth::Fast,
                ..Options::default()
            };
            let r = apply::reconcile(&cloud, &env, &limit, &options)
                .await
                .unwrap();
            assert_eq!(
                r.verdict(),
                Verdict::InSync,
                "{} not created: {r:#?}",
                env.name
            );
        }
    });
    let calls_before: BTreeMap<String, u64> = connect
        .0
        .iter()
        .map(|(a, c)| (a.clone(), c.total_calls()))
        .collect();

    let settings = Settings::default();
    let shared = Arc::new(Shared::default());
    let counter = Counter::default();
    let cpu = cpu_seconds();
    rt.block_on(async {
        let (stop, stopped) = watch::channel(false);
        let (hup, _) = broadcast::channel(4);
        let controller = Controller {
            connect: &connect,
            notifier: &counter,
            sink: &counter,
            settings: &settings,
            shared: &shared,
            state: None,
            caller: "arn:aws:iam::123456789012:role/stackwarden",
            leases: None,
        };
        let day = async {
            tokio::time::sleep(Duration::from_secs(hours * 3600)).await;
            stop.send(true).unwrap();
        };
        tokio::join!(controller.run(files.clone(), &hup, stopped), day);
    });
    let cpu = cpu_seconds() - cpu;

    let passes: u64 = files
        .keys()
        .map(|n| shared.env(n).map_or(0, |s| s.passes))
        .sum();
    let in_sync = files
        .keys()
        .filter(|n| {
            shared
                .env(n)
                .is_some_and(|s| s.result == Some(Verdict::InSync))
        })
        .count();
    let per_account: Vec<f64> = connect
        .0
        .iter()
        .map(|(a, c)| (c.total_calls() - calls_before[a]) as f64 / hours as f64)
        .collect();
    let mean = per_account.iter().sum::<f64>() / per_account.len() as f64;
    let max = per_account.iter().copied().fold(0.0, f64::max);
    println!(
        "{envs} environments of 8 stacks over {accounts} accounts, {hours} simulated hours, a pass every {}",
        humantime::format_duration(settings.interval)
    );
    println!("  passes                          {passes:>8}");
    println!("  environments in sync at the end {in_sync:>8}");
    println!("  API calls per hour per account  {mean:>8.1} (max {max:.1})");
    println!(
        "  CPU per pass                    {:>8.2} ms (file watching included)",
        cpu * 1e3 / passes.max(1) as f64
    );
    println!("  CPU for the day                 {cpu:>8.1} s");
    println!(
        "  peak memory                     {:>8.1} MiB",
        peak_rss_mib()
    );
    println!(
        "  alerts, metric batches          {:>8}, {}",
        counter.alerts.load(Ordering::Relaxed),
        counter.metrics.load(Ordering::Relaxed)
    );
}
