//! Drift detection against the cloud: starting detections (bounded per
//! account and region), waiting for them (bounded in time), and reading
//! the results of the latest one. What the results mean is `drift`'s.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::cloud::{
    Cloud, CloudError, CloudResult, DRIFT_DETECTABLE, DetectionStatus, DriftStatus, ResourceDrift,
    Stack,
};
use crate::drift::{StackDrift, assess};
use crate::plan::Observed;
use crate::spec::{DesiredEnv, DesiredStack};

/// How long `drift` waits for its detections by default (AWS: a detection
/// "can take up to several minutes").
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);

/// Detections in flight per account and region by default: each reads
/// every resource of its stack through the services' APIs, which throttle.
pub const DEFAULT_MAX_DETECTIONS: usize = 2;

/// Polls of a detection's status: from 1 s, doubling, to this.
const POLL_MAX: Duration = Duration::from_secs(15);

/// What a detection of one stack came to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Detected {
    /// It ended (complete, or failed with partial results: see
    /// [`StackDrift::detection_failed`]).
    Done { drift: StackDrift },
    /// Not started: the stack does not exist or is not in a status
    /// detection accepts.
    Skipped { reason: String },
    /// It could not be started or read, or did not end in time.
    Failed { reason: String },
}

impl Detected {
    /// The detection did not give a complete answer.
    pub fn failed(&self) -> bool {
        match self {
            Detected::Done { drift } => drift.detection_failed.is_some(),
            Detected::Skipped { .. } => false,
            Detected::Failed { .. } => true,
        }
    }
}

/// Why a stack's drift cannot be detected now, if it cannot.
pub fn not_detectable(live: Option<&Stack>) -> Option<String> {
    match live {
        None => Some("the stack does not exist".into()),
        Some(s) if !DRIFT_DETECTABLE.contains(&s.status.as_str()) => Some(format!(
            "{}: drift is detected only on stacks in {}",
            s.status,
            DRIFT_DETECTABLE.join(", ")
        )),
        Some(_) => None,
    }
}

/// Detections given up waiting for, by stack name: AWS runs one per stack
/// at a time, so the next attempt waits on that one instead of starting
/// another.
pub type Pending = Mutex<BTreeMap<String, String>>;

/// Detects the drift of one stack: starts a detection once a `limit`
/// permit is free (or takes up the one `pending` holds for it), polls it
/// until it ends or `deadline`, and judges the resources it reports.
pub async fn detect_stack<C: Cloud>(
    cloud: &C,
    stack: &DesiredStack,
    limit: &Semaphore,
    deadline: Instant,
    pending: &Pending,
) -> Detected {
    let failed = |e: CloudError| Detected::Failed {
        reason: e.to_string(),
    };
    let live = match cloud.describe_stack(&stack.name).await {
        Ok(l) => l,
        Err(e) => return failed(e),
    };
    if let Some(reason) = not_detectable(live.as_ref()) {
        return Detected::Skipped { reason };
    }
    let permit = tokio::select! {
        p = limit.acquire() => p.expect("never closed"),
        () = tokio::time::sleep_until(deadline) => {
            return Detected::Failed { reason: "no detection slot free in time (see --max-detections)".into() };
        }
    };
    let earlier = pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&stack.name);
    let id = match earlier {
        Some(id) => id,
        None => match cloud.detect_stack_drift(&stack.name).await {
            Ok(id) => {
                tracing::info!(message = "Drift detection started.", stack = %stack.key, detection = %id);
                id
            }
            Err(e) => return failed(e),
        },
    };
    let mut pause = Duration::from_secs(1);
    let detection_failed = loop {
        match cloud.drift_detection(&id).await {
            Ok(d) => match d.status {
                DetectionStatus::Complete => break None,
                DetectionStatus::Failed(why) => break Some(why),
                DetectionStatus::InProgress => {}
            },
            Err(e) => return failed(e),
        }
        if Instant::now() + pause > deadline {
            pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(stack.name.clone(), id.clone());
            return Detected::Failed {
                reason: format!(
                    "detection {id} still in progress after {}",
                    humantime::format_duration(Duration::from_secs(
                        deadline.saturating_duration_since(Instant::now()).as_secs()
                    ))
                ),
            };
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(POLL_MAX);
    };
    drop(permit);
    let checked = cloud.now();
    match cloud.resource_drifts(&stack.name).await {
        Ok(drifts) => Detected::Done {
            drift: assess(
                stack,
                &stack.drift,
                Some(checked),
                detection_failed,
                &drifts,
            ),
        },
        Err(e) => failed(e),
    }
}

/// Detects the drift of the given stacks of an environment at once, each
/// waiting for a `limit` permit, all bounded by `wait`.
pub async fn detect_env<C: Cloud>(
    cloud: &C,
    env: &DesiredEnv,
    keys: &[String],
    limit: &Semaphore,
    wait: Duration,
    pending: &Pending,
) -> BTreeMap<String, Detected> {
    let deadline = Instant::now() + wait;
    let runs = keys.iter().map(|k| async move {
        (
            k.clone(),
            detect_stack(cloud, &env.stacks[k], limit, deadline, pending).await,
        )
    });
    futures::future::join_all(runs).await.into_iter().collect()
}

/// The resources of a stack's latest detection. Cached by stack id and
/// detection time: a detection's results never change, so a daemon reads
/// them once per detection, not once per pass.
async fn latest_drifts<C: Cloud>(cloud: &C, live: &Stack) -> CloudResult<Vec<ResourceDrift>> {
    type Cache = Mutex<HashMap<(String, SystemTime), Vec<ResourceDrift>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = live.drift.last_check.map(|t| (live.id.clone(), t));
    if let Some(k) = &key
        && let Some(hit) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(k)
    {
        return Ok(hit.clone());
    }
    let drifts = cloud.resource_drifts(&live.name).await?;
    if let Some(k) = key {
        let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
        // Old detections are never asked for again; bound the memory.
        if c.len() > 10_000 {
            c.clear();
        }
        c.insert(k, drifts.clone());
    }
    Ok(drifts)
}

/// Adds to an observation the results of each declared stack's latest
/// detection that found drift (DescribeStacks already says which did, at
/// no cost): one DescribeStackResourceDrifts per drifted stack and
/// detection.
///
/// # Errors
/// A cloud error that persisted through retries.
pub async fn read_latest<C: Cloud>(
    cloud: &C,
    env: &DesiredEnv,
    observed: &mut Observed,
) -> Result<(), CloudError> {
    for stack in env.stacks.values() {
        let Some(live) = observed.stacks.get(&stack.name) else {
            continue;
        };
        if live.drift.status != DriftStatus::Drifted {
            continue;
        }
        let drifts = latest_drifts(cloud, live).await?;
        observed.resource_drifts.insert(stack.name.clone(), drifts);
    }
    Ok(())
}
