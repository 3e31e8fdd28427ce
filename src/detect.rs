//! Drift detection against the cloud: starting detections (bounded per
//! account and region), waiting for them (bounded in time), and reading
//! the results of the latest one. What the results mean is `drift`'s.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::cloud::{Cloud, CloudError, DRIFT_DETECTABLE, DetectionStatus, DriftStatus, Stack};
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

/// A stack's detection as this process knows it.
enum Slot {
    /// Someone here is waiting on it (or starting it).
    Running,
    /// Given up waiting for while AWS still ran it: the next attempt polls
    /// it instead of starting another (AWS runs one per stack at a time).
    /// It keeps its permit: it is still in flight.
    Parked {
        id: String,
        permit: OwnedSemaphorePermit,
        since: Instant,
    },
}

/// How long a parked detection keeps its slot when nobody polls it (its
/// stack left the desired state, its environment's loop stopped): longer
/// than any detection runs, so the slot is not held for ever.
const PARKED_MAX: Duration = Duration::from_secs(30 * 60);

/// The detection slots of an account and region, shared by everything in
/// the process that detects there: at most `limit` detections in flight,
/// and at most one per stack.
#[derive(Clone)]
pub struct Detections {
    limit: Arc<Semaphore>,
    stacks: Arc<Mutex<BTreeMap<String, Slot>>>,
}

impl std::fmt::Debug for Detections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detections")
            .field("available", &self.limit.available_permits())
            .finish()
    }
}

impl Detections {
    pub fn new(max: usize) -> Detections {
        Detections {
            limit: Arc::new(Semaphore::new(max.max(1))),
            stacks: Arc::default(),
        }
    }

    /// Whether a detection of `stack` was given up waiting for and may have
    /// ended since: worth polling at once.
    pub fn parked(&self, stack: &str) -> bool {
        matches!(self.lock().get(stack), Some(Slot::Parked { .. }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Slot>> {
        self.stacks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims the stack: `None` when a detection of it is running here;
    /// else the claim, with the parked detection to poll, if any.
    #[allow(clippy::type_complexity)]
    fn claim(&self, stack: &str) -> Option<(Claim<'_>, Option<(String, OwnedSemaphorePermit)>)> {
        let mut map = self.lock();
        map.retain(|_, s| !matches!(s, Slot::Parked { since, .. } if since.elapsed() > PARKED_MAX));
        let parked = match map.remove(stack) {
            Some(Slot::Running) => {
                map.insert(stack.to_owned(), Slot::Running);
                return None;
            }
            Some(Slot::Parked { id, permit, .. }) => Some((id, permit)),
            None => None,
        };
        map.insert(stack.to_owned(), Slot::Running);
        Some((
            Claim {
                detections: self,
                stack: stack.to_owned(),
                running: None,
            },
            parked,
        ))
    }
}

/// A stack claimed for detection. When it ends (also when the detection's
/// future is cancelled, or a poll fails) while AWS still runs the
/// detection it started, that detection is parked with its slot, never
/// forgotten: the next attempt polls it.
struct Claim<'a> {
    detections: &'a Detections,
    stack: String,
    running: Option<(String, OwnedSemaphorePermit)>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut map = self.detections.lock();
        match self.running.take() {
            Some((id, permit)) => {
                map.insert(
                    self.stack.clone(),
                    Slot::Parked {
                        id,
                        permit,
                        since: Instant::now(),
                    },
                );
            }
            None => {
                map.remove(&self.stack);
            }
        }
    }
}

/// Detects the drift of one stack: starts a detection once a slot is free
/// (or polls the one parked for it), polls it until it ends or `deadline`,
/// and judges the resources it reports.
pub async fn detect_stack<C: Cloud>(
    cloud: &C,
    stack: &DesiredStack,
    detections: &Detections,
    deadline: Instant,
) -> Detected {
    let failed = |e: CloudError| Detected::Failed {
        reason: e.to_string(),
    };
    let Some((mut claim, parked)) = detections.claim(&stack.name) else {
        return Detected::Skipped {
            reason: "a detection of this stack is already running".into(),
        };
    };
    let mut resumed = parked.is_some();
    claim.running = parked;
    loop {
        if claim.running.is_none() {
            let live = match cloud.describe_stack(&stack.name).await {
                Ok(l) => l,
                Err(e) => return failed(e),
            };
            if let Some(reason) = not_detectable(live.as_ref()) {
                return Detected::Skipped { reason };
            }
            let permit = tokio::select! {
                biased;
                () = tokio::time::sleep_until(deadline) => {
                    return Detected::Failed { reason: "no detection slot free in time (see --max-detections)".into() };
                }
                p = detections.limit.clone().acquire_owned() => p.expect("never closed"),
            };
            match cloud.detect_stack_drift(&stack.name).await {
                Ok(id) => {
                    tracing::info!(message = "Drift detection started.", stack = %stack.key, detection = %id);
                    claim.running = Some((id, permit));
                }
                Err(e) => return failed(e),
            }
        }
        let id = claim.running.as_ref().expect("started above").0.clone();
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
                return Detected::Failed {
                    reason: format!("detection {id} still in progress; polled again next time"),
                };
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_MAX);
        };
        // It ended: its slot is free.
        claim.running = None;
        let drifts = match cloud.resource_drifts(&stack.name).await {
            Ok(d) => d,
            Err(e) => return failed(e),
        };
        let live = match cloud.describe_stack(&stack.name).await {
            Ok(l) => l,
            Err(e) => return failed(e),
        };
        // When the detection began, as DescribeStacks tells it.
        let began = live.as_ref().and_then(|l| l.drift.last_check);
        let stale = live
            .as_ref()
            .is_some_and(|l| crate::drift::outdated(l, &drifts, began));
        // A detection parked before the stack's last update (a revert since)
        // says nothing of it now: detect again.
        if resumed && stale {
            resumed = false;
            continue;
        }
        let mut drift = assess(
            stack,
            &stack.drift,
            began.or_else(|| Some(cloud.now())),
            detection_failed,
            &drifts,
        );
        drift.stale = stale;
        return Detected::Done { drift };
    }
}

/// Detects the drift of the given stacks of an environment at once, all
/// by `deadline`.
pub async fn detect_env<C: Cloud>(
    cloud: &C,
    env: &DesiredEnv,
    keys: &[String],
    detections: &Detections,
    deadline: Instant,
) -> BTreeMap<String, Detected> {
    let runs = keys.iter().map(|k| async move {
        (
            k.clone(),
            detect_stack(cloud, &env.stacks[k], detections, deadline).await,
        )
    });
    futures::future::join_all(runs).await.into_iter().collect()
}

/// Adds to an observation the results of each declared stack's latest
/// detection that found drift (DescribeStacks already says which did, at
/// no cost): one DescribeStackResourceDrifts per drifted stack. Not
/// cached: AWS's LastCheckTimestamp is when a detection *began*, so it
/// does not name one detection's results. A stack whose results cannot be
/// read gets its error in `drift_errors` instead.
pub async fn read_latest<C: Cloud>(cloud: &C, env: &DesiredEnv, observed: &mut Observed) {
    for stack in env.stacks.values() {
        let Some(live) = observed.stacks.get(&stack.name) else {
            continue;
        };
        if live.drift.status != DriftStatus::Drifted {
            continue;
        }
        match cloud.resource_drifts(&live.name).await {
            Ok(drifts) => {
                observed.resource_drifts.insert(stack.name.clone(), drifts);
            }
            // Drift unknown is no reason not to converge (a role without
            // DescribeStackResourceDrifts, throttling that outlasted the
            // retries): the stack's drift shows as unknown.
            Err(e) => {
                tracing::warn!(message = "Cannot read the stack's drift.", stack = %stack.key, error = %e);
                observed
                    .drift_errors
                    .insert(stack.name.clone(), e.to_string());
            }
        }
    }
}
