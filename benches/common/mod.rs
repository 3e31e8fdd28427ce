//! What the benches share.

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
