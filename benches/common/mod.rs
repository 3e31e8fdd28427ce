//! What the benches share.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use stackwarden::spec::DesiredEnv;

/// The two yardsticks of an apply: the longest path through the graph (the
/// lower bound) and the sum of all stacks (a sequential deploy), each stack
/// costing its operation (`latency`, by stack name) plus computing its
/// change set (`cs`).
pub fn critical_and_sum(
    env: &DesiredEnv,
    latency: &BTreeMap<String, Duration>,
    cs: Duration,
) -> (Duration, Duration) {
    let mut finish: BTreeMap<&str, Duration> = BTreeMap::new();
    let mut sum = Duration::ZERO;
    for s in env.order() {
        let cost = latency[&s.name] + cs;
        let start = s
            .depends_on
            .iter()
            .map(|d| finish[d.as_str()])
            .max()
            .unwrap_or_default();
        finish.insert(&s.key, start + cost);
        sum += cost;
    }
    (finish.values().max().copied().unwrap_or_default(), sum)
}

/// CPU time of this process so far (user and system), in seconds.
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which may hold spaces) start at
    // its closing parenthesis; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    // Linux reports them in USER_HZ, 100 per second on every architecture
    // it runs userspace on.
    f.iter().sum::<f64>() / 100.0
}

/// Peak resident memory of this process so far, in MiB.
pub fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}
