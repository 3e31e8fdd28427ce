//! Creating the dev environment from scratch on the simulated cloud with
//! realistic per-stack latencies: how long `reconcile --once` takes (in
//! simulated time) against a sequential deploy (the sum of all stacks, what
//! `deploy.sh` did) and against the dependency graph's critical path (the
//! lower bound), with the API calls it made. Then a steady-state pass.
//!
//! Run: `cargo bench --bench apply`. It reports; it asserts nothing.

use std::time::Duration;

use stackwarden::apply::{self, Options};
use stackwarden::cloud::Retrying;
use stackwarden::cloud::sim::{self, SimCloud, SimConfig};
use stackwarden::observe::Depth;
use stackwarden::spec;
use tokio::sync::Semaphore;

mod common;
use common::critical_and_sum;

fn main() {
    let env = spec::load(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("desired-state/dev.yaml"),
    )
    .expect("dev loads");
    let latency = sim::latencies(&env, &sim::SERVICE_MINUTES);
    let change_set = SimConfig::default().change_set_latency;

    let (critical, sequential) = critical_and_sum(&env, &latency, change_set);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    let cloud = Retrying::new(SimCloud::new(SimConfig {
        latency,
        ..SimConfig::default()
    }));
    let options = Options {
        depth: Depth::Full,
        progress: None,
        ..Options::default()
    };
    let limit = Semaphore::new(apply::DEFAULT_MAX_PARALLEL);
    let cpu = cpu_time();
    let (took, report) = rt.block_on(async {
        let start = tokio::time::Instant::now();
        let r = apply::reconcile(&cloud, &env, &limit, &options)
            .await
            .expect("pass");
        (start.elapsed(), r)
    });
    let cpu_create = cpu_time() - cpu;
    let create_calls = cloud.total_calls();
    let by_op = cloud.calls();
    let calls_before = cloud.total_calls();
    let cpu = cpu_time();
    let steady = rt.block_on(apply::reconcile(&cloud, &env, &limit, &options));
    let cpu_steady = cpu_time() - cpu;
    let steady_calls = cloud.total_calls() - calls_before;

    let min = |d: Duration| d.as_secs_f64() / 60.0;
    println!("dev from scratch on the simulated cloud (realistic latencies)");
    println!("  verdict                         {:?}", report.verdict());
    println!(
        "  stackwarden reconcile --once    {:>6.1} min simulated",
        min(took)
    );
    println!(
        "  critical path (lower bound)     {:>6.1} min",
        min(critical)
    );
    println!(
        "  sequential deploy (sum)         {:>6.1} min",
        min(sequential)
    );
    println!(
        "  ratio to sequential             {:>6.2}",
        took.as_secs_f64() / sequential.as_secs_f64()
    );
    println!("  API calls                       {create_calls:>6}");
    let ops = env.stacks.len() as f64;
    let per = |op: &str| by_op.get(op).copied().unwrap_or(0) as f64 / ops;
    println!(
        "  calls per stack operation       {:>6.1} (DescribeStacks {:.1}, DescribeStackEvents {:.1}, change sets {:.1})",
        create_calls as f64 / ops,
        per("DescribeStacks"),
        per("DescribeStackEvents"),
        per("CreateChangeSet")
            + per("DescribeChangeSet")
            + per("ListChangeSets")
            + per("ExecuteChangeSet")
            + per("DeleteChangeSet"),
    );
    println!(
        "  real time of the pass           {:>6.1} ms",
        cpu_create * 1e3
    );
    println!(
        "steady state: {:?}, {steady_calls} API calls, {:.1} ms real time",
        steady.map(|r| r.verdict()).expect("pass"),
        cpu_steady * 1e3
    );
}

/// Wall time of real work, in seconds. The simulated passes run on tokio's
/// paused clock, which does not move while stackwarden computes, so this
/// measure needs the real clock.
#[allow(clippy::disallowed_types)]
fn cpu_time() -> f64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs_f64()
}
