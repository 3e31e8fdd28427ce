//! stackwarden at scale on the simulated cloud: synthetic environments of
//! 10, 100, 1000 and 5000 stacks (random DAGs, seeded) with random operation
//! latencies of 1 to 10 minutes. For each size, in a child process of its
//! own (so peak memory is that size's): CPU time of planning, peak memory,
//! simulated wall time of a full apply against the critical path (the lower
//! bound) and the sequential sum, the apply's CPU time (the simulated cloud's
//! included), and API calls of a steady-state pass.
//!
//! Run: `cargo bench --bench scale` (or `-- --sizes 10,100`). It reports;
//! it asserts nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};
use stackwarden::apply::{self, Options};
use stackwarden::cloud::Retrying;
use stackwarden::cloud::sim::{SimCloud, SimConfig};
use stackwarden::observe::{Depth, observe};
use stackwarden::plan::plan;
use stackwarden::spec::{self, DesiredEnv};
use tokio::sync::Semaphore;

mod common;
use common::{cpu_seconds, critical_and_sum, peak_rss_mib};

const TEMPLATE: &str = r#"Parameters:
  Name: {Type: String}
  Up0: {Type: String, Default: ""}
  Up1: {Type: String, Default: ""}
  Up2: {Type: String, Default: ""}
Resources:
  Queue:
    Type: AWS::SQS::Queue
    Properties:
      QueueName: !Sub "${Name}-queue"
      Tags:
        - {Key: Up, Value: !Join [",", [!Ref Up0, !Ref Up1, !Ref Up2]]}
Outputs:
  Id:
    Value: !Ref Name
"#;

/// Writes a random environment of `n` stacks: each stack takes up to three
/// earlier stacks' outputs (mostly recent ones, so the graph has depth).
fn synthetic(
    n: usize,
    seed: u64,
    dir: &std::path::Path,
) -> (DesiredEnv, BTreeMap<String, Duration>) {
    let mut rng = StdRng::seed_from_u64(seed);
    std::fs::write(dir.join("t.yaml"), TEMPLATE).unwrap();
    let mut yaml = String::from(
        "environment: scale\nregion: us-east-1\naccount_id: \"123456789012\"\nstack_name_prefix: scale\nstacks:\n",
    );
    let mut latency = BTreeMap::new();
    for i in 0..n {
        let key = format!("s{i:04}");
        let _ = write!(
            yaml,
            "  {key}:\n    template: t.yaml\n    parameters:\n      Name: {key}\n"
        );
        if i > 0 {
            let deps = rng.gen_range(0..=3usize.min(i));
            let mut chosen = std::collections::BTreeSet::new();
            for _ in 0..deps {
                let back = rng.gen_range(1..=i.min(20));
                chosen.insert(i - back);
            }
            for (slot, d) in chosen.into_iter().enumerate() {
                let _ = writeln!(yaml, "      Up{slot}: {{output: s{d:04}.Id}}");
            }
        }
        latency.insert(
            format!("scale-{key}"),
            Duration::from_secs(rng.gen_range(60..=600)),
        );
    }
    let file = dir.join("scale.yaml");
    std::fs::write(&file, yaml).unwrap();
    let env = spec::load(&file).unwrap_or_else(|e| panic!("{e}"));
    (env, latency)
}

/// Real elapsed time: the simulated passes run on a paused clock.
#[allow(clippy::disallowed_types)]
fn now() -> std::time::Instant {
    std::time::Instant::now()
}

fn one(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (env, latency) = synthetic(n, 7, dir.path());
    let config = SimConfig {
        latency: latency.clone(),
        ..SimConfig::default()
    };
    let (critical, sum) = critical_and_sum(&env, &latency, config.change_set_latency);
    let cloud = Retrying::new(SimCloud::new(config));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();

    // Planning alone, on the empty account (the pure core).
    let observed = rt.block_on(observe(&cloud, &env, Depth::Fast)).unwrap();
    let rounds = (2000 / n).max(3);
    let t = now();
    for _ in 0..rounds {
        std::hint::black_box(plan(&env, &observed));
    }
    let plan_ms = t.elapsed().as_secs_f64() * 1e3 / rounds as f64;

    let limit = Semaphore::new(apply::DEFAULT_MAX_PARALLEL);
    let options = Options {
        depth: Depth::Fast,
        progress: None,
        ..Options::default()
    };
    let cpu = cpu_seconds();
    let (simulated, verdict) = rt.block_on(async {
        let start = tokio::time::Instant::now();
        let r = apply::reconcile(&cloud, &env, &limit, &options)
            .await
            .unwrap();
        (start.elapsed(), r.verdict())
    });
    let apply_cpu = cpu_seconds() - cpu;
    let before = cloud.total_calls();
    let steady = rt
        .block_on(apply::reconcile(&cloud, &env, &limit, &options))
        .unwrap();
    let steady_calls = cloud.total_calls() - before;
    let min = |d: Duration| d.as_secs_f64() / 60.0;
    println!(
        "{n:>5}  {plan_ms:>9.2}  {:>8.1}  {:>9.1}  {:>8.1}  {:>8.1}  {:>6.2}  {:>8.2}  {:>6}  {:?}/{:?}",
        peak_rss_mib(),
        min(simulated),
        min(critical),
        min(sum),
        simulated.as_secs_f64() / critical.as_secs_f64(),
        apply_cpu,
        steady_calls,
        verdict,
        steady.verdict(),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--one") {
        one(args[i + 1].parse().expect("a size"));
        return;
    }
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this
    // too, without it: then a quick smoke run of the smallest size.
    let full = args.iter().any(|a| a == "--bench");
    let sizes: Vec<usize> = args
        .iter()
        .position(|a| a == "--sizes")
        .map(|i| {
            args[i + 1]
                .split(',')
                .map(|s| s.parse().expect("a size"))
                .collect()
        })
        .unwrap_or_else(|| {
            if full {
                vec![10, 100, 1000, 5000]
            } else {
                vec![10]
            }
        });
    println!(
        "stacks  plan (ms)  peak MiB  apply min  critical    sum min  ratio  apply     steady  verdicts"
    );
    println!("                              simulated  path min                    CPU (s)  calls");
    for n in sizes {
        // A child per size: its peak memory is its own.
        let status = std::process::Command::new(&args[0])
            .args(["--one", &n.to_string()])
            .status()
            .expect("run a size");
        assert!(status.success(), "size {n} failed");
    }
    println!(
        "(apply with --max-parallel {}: large graphs are bounded by it, not by the critical path)",
        apply::DEFAULT_MAX_PARALLEL
    );
}
