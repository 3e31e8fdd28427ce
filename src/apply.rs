//! Applying a plan: the one code path of `reconcile --once` and of every
//! daemon pass.
//!
//! [`reconcile`] observes, plans, executes what the plan and the policy
//! allow, re-observes and reports. Stacks run as their dependency graph
//! allows: a stack starts when every stack it depends on has finished and is
//! ready, independent stacks run concurrently (bounded by a semaphore shared
//! per account and region), and a failure stops only the failed stack's
//! dependents.
//!
//! Each stack re-observes and re-plans just before it acts (outputs of the
//! stacks it depends on are read fresh), so a pass is level-triggered all the
//! way down: it is always safe to kill it and run it again. Change sets are
//! named from the desired revision, so a restarted pass finds and reuses its
//! own.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{OnceCell, Semaphore, mpsc};
use tokio::time::Instant;
use tracing::Instrument;

use crate::changeset::{self, LiveSide};
use crate::cloud::{
    ChangeSet, ChangeSetKind, ChangeSetStatus, Cloud, CloudError, Stack, StackEvent, StackStatus,
};
use crate::diff::TemplateDiff;
use crate::observe::{self, Depth, observe};
use crate::plan::{
    BlockedBy, Observed, Plan, ServiceAction, StackAction, StackPlan, Verdict, plan,
    resolve_parameters,
};
use crate::retry;
use crate::spec::{CHANGE_SET_PREFIX, DesiredEnv, DesiredStack};
use crate::template::Template;

/// Default bound on concurrent stack operations per account and region.
pub const DEFAULT_MAX_PARALLEL: usize = 4;

/// How many times one stack may be re-planned within a pass (after waiting
/// on someone else, after a recreate's delete). Bounds the work of a pass.
const MAX_STEPS: usize = 4;

/// An error that ends an environment's pass before or instead of applying.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error(
        "refusing to change anything: the credentials belong to account {actual}, the desired state declares {expected}"
    )]
    AccountMismatch { expected: String, actual: String },
    #[error("cannot check the caller's account (STS GetCallerIdentity): {0}")]
    AccountCheck(CloudError),
    #[error("cannot observe: {0}")]
    Observe(CloudError),
    /// The environment was suspended during the pass.
    #[error("{0}")]
    Suspended(String),
    /// The environment's sync window closed during the pass.
    #[error("{0}")]
    OutsideWindow(String),
    /// Whether the environment may be written cannot be known (the state
    /// table cannot be read): nothing is written.
    #[error("cannot read the suspension from the state table: {0}")]
    GateUnknown(String),
}

/// Asked before every stack and service operation of a pass, and again
/// right before a change set is executed: whether the environment may
/// still be written. The controller's and `reconcile --once`'s read the
/// suspension again, so one made while a pass runs (`suspend`, `rollback
/// --to`) stops it at its next write, not at its next pass.
pub trait Gate: Send + std::marker::Sync {
    /// `Ok(Some(why))` when suspended.
    fn check(&self) -> futures::future::BoxFuture<'_, Result<Option<String>, String>>;
}

/// What a refused write makes of a stack's result: a suspension is a
/// block, anything else a failure.
fn refused(e: ApplyError) -> StackResult {
    match e.held() {
        Some((by, reason)) => StackResult::Blocked { by, reason },
        None => failed(e.to_string()),
    }
}

impl Options {
    fn failed_redeploys(&self) -> std::collections::BTreeSet<(String, String)> {
        self.failed_redeploys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The drift reverts tried so far (see [`Options::revert_attempted`]).
    fn reverts_tried(&self) -> std::collections::BTreeSet<(String, String, String)> {
        self.revert_attempted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Adds to an observation of the cloud what the pass knows from
    /// elsewhere: redeploys that failed, and the suspension (which a
    /// rollback, an operator's own act, does not heed).
    fn annotate(&self, env: &DesiredEnv, now: std::time::SystemTime, o: &mut Observed) {
        o.failed_redeploys.extend(self.failed_redeploys());
        o.revert_attempted.extend(self.reverts_tried());
        if self.intent == Intent::Converge {
            o.suspension = self.suspension.clone();
        }
        o.sync_window = self.sync_window(env, now);
    }

    /// The environment's sync window at `now`, for a pass that converges
    /// (a rollback is a person's own act, like a suspension it does not
    /// heed).
    fn sync_window(
        &self,
        env: &DesiredEnv,
        now: std::time::SystemTime,
    ) -> Option<crate::window::WindowState> {
        if self.intent != Intent::Converge {
            return None;
        }
        let mut w = env.policy.windows.state(now)?;
        w.ignored = self.ignore_windows && !w.open;
        Some(w)
    }

    /// The plan of a whole environment for this pass's intent.
    fn plan(&self, env: &DesiredEnv, o: &Observed) -> Plan {
        let mut p = plan(env, o);
        if let Intent::Recover(request) = &self.intent {
            for sp in &mut p.stacks {
                match sp.key.clone() {
                    Some(key) => {
                        let planned = sp.clone();
                        *sp = crate::recovery::recover_one(
                            env,
                            &env.stacks[&key],
                            o,
                            request,
                            planned,
                        );
                    }
                    // A rollback never prunes.
                    None if sp.action.mutates() => {
                        sp.action = StackAction::None;
                        sp.reason = format!("{}; not part of a rollback", sp.reason);
                    }
                    None => {}
                }
            }
        }
        p
    }
}

/// How [`Pass::recover`] gets a stack back to a stable state.
#[derive(Debug, Clone, Copy)]
enum Recovery<'a> {
    Continue { skip: &'a [String], token: &'a str },
    RollBack { token: &'a str },
    Cancel { token: &'a str },
}

/// For `rollback`: which selected stacks in UPDATE_IN_PROGRESS
/// run a change set's execution, and whose (one ListChangeSets each).
async fn read_executing<C: Cloud>(
    cloud: &C,
    env: &DesiredEnv,
    request: &crate::recovery::Request,
    observed: &mut Observed,
) -> Result<(), CloudError> {
    for stack in env.stacks.values() {
        let updating = observed
            .stacks
            .get(&stack.name)
            .is_some_and(|s| s.status == StackStatus::UpdateInProgress);
        if !updating || !request.selects(&stack.key) {
            continue;
        }
        if let Some(cs) = cloud
            .list_change_sets(&stack.name)
            .await?
            .into_iter()
            .find(|c| c.executing)
        {
            observed.executing.insert(stack.name.clone(), cs.name);
        }
    }
    Ok(())
}

/// What a pass is for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Intent {
    /// Bring the environment to its desired state (reconcile).
    #[default]
    Converge,
    /// Get failed or running stacks back to their last stable state
    /// (`stackwarden rollback`); services are left alone.
    Recover(crate::recovery::Request),
}

impl ApplyError {
    /// A refusal that holds a write back (a block, not a failure).
    fn held(&self) -> Option<(BlockedBy, String)> {
        match self {
            ApplyError::Suspended(why) => Some((BlockedBy::Suspended, why.clone())),
            ApplyError::OutsideWindow(why) => Some((BlockedBy::SyncWindow, why.clone())),
            _ => None,
        }
    }

    /// An error no retry cures: the wrong account, or credentials AWS
    /// refuses. It waits for the desired state or the credentials to
    /// change, not on the failure backoff.
    pub fn is_permanent(&self) -> bool {
        match self {
            ApplyError::AccountMismatch { .. } => true,
            ApplyError::Suspended(_)
            | ApplyError::OutsideWindow(_)
            | ApplyError::GateUnknown(_) => false,
            ApplyError::AccountCheck(e) | ApplyError::Observe(e) => {
                // No credentials is not among them: the instance or
                // container credentials may simply not be ready yet.
                matches!(e, CloudError::AccessDenied(_))
            }
        }
    }
}

/// Something worth showing while a pass runs (the terminal progress view
/// and the logs are fed from it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Started {
        environment: String,
        stack: String,
        action: String,
    },
    Event {
        environment: String,
        stack: String,
        event: StackEvent,
    },
    Finished {
        environment: String,
        stack: String,
        result: StackResult,
        elapsed: Duration,
    },
}

/// Knobs of a pass.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// How thoroughly the first observation compares templates.
    pub depth: Depth,
    /// Where progress goes, if anywhere.
    pub progress: Option<mpsc::UnboundedSender<Progress>>,
    /// Seeds the retry and poll jitter of the pass (simulations replay
    /// exactly); `None` draws from the thread's random numbers.
    pub jitter_seed: Option<u64>,
    /// ECS redeploys that rolled back, as (stack revision, task
    /// definition): not retried until the desired state changes. Share one
    /// between the passes of an environment (the controller keeps it for
    /// its lifetime).
    pub failed_redeploys: FailedRedeploys,
    pub intent: Intent,
    /// The environment's suspension (from the state table): the pass plans
    /// and reports, and writes nothing.
    pub suspension: Option<crate::state::Suspension>,
    /// Asked before every write (see [`Gate`]).
    pub gate: Option<std::sync::Arc<dyn Gate>>,
    /// Write outside the environment's sync windows (`reconcile --once
    /// --ignore-windows`, an emergency override).
    pub ignore_windows: bool,
    /// Drift a drift-aware change set of this process reverted and a
    /// detection afterwards still found, as (stack name, logical id,
    /// property path): never tried again. Share one between the passes of
    /// an environment, like `failed_redeploys`.
    pub revert_attempted: RevertAttempted,
    /// The drift detection slots of the account and region (for the
    /// re-check after a revert); `None`: slots of this pass's own.
    pub detections: Option<crate::detect::Detections>,
}

pub type RevertAttempted =
    std::sync::Arc<Mutex<std::collections::BTreeSet<(String, String, String)>>>;

impl std::fmt::Debug for dyn Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gate")
    }
}

/// Stack operations at once per account and region, shared by the
/// environments in it: the one bound of the controller and of `reconcile
/// --once` (AWS's API rate limits are per account and region).
/// Also the drift detections in flight there (see [`crate::detect`]).
#[derive(Debug)]
pub struct Limits {
    max: usize,
    per: Mutex<std::collections::BTreeMap<(String, String), std::sync::Arc<Semaphore>>>,
    max_detections: usize,
    detections: Mutex<std::collections::BTreeMap<(String, String), crate::detect::Detections>>,
}

impl Limits {
    pub fn new(max: usize) -> Limits {
        Limits {
            max: max.max(1),
            per: Mutex::default(),
            max_detections: crate::detect::DEFAULT_MAX_DETECTIONS,
            detections: Mutex::default(),
        }
    }

    /// With at most `max` drift detections in flight per account and region.
    pub fn with_detections(self, max: usize) -> Limits {
        Limits {
            max_detections: max.max(1),
            ..self
        }
    }

    /// The drift detection slots of `env`'s account (role) and region.
    pub fn detections_of(&self, env: &DesiredEnv) -> crate::detect::Detections {
        self.detections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(env.account_region())
            .or_insert_with(|| crate::detect::Detections::new(self.max_detections))
            .clone()
    }

    /// The bound of `env`'s account (role) and region.
    pub fn of(&self, env: &DesiredEnv) -> std::sync::Arc<Semaphore> {
        self.per
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(env.account_region())
            .or_insert_with(|| std::sync::Arc::new(Semaphore::new(self.max)))
            .clone()
    }
}

/// (stack revision, task definition) pairs whose redeploy rolled back.
pub type FailedRedeploys = std::sync::Arc<Mutex<std::collections::BTreeSet<(String, String)>>>;

/// What happened to one stack in a pass.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StackResult {
    /// Nothing to do.
    InSync,
    Created,
    Updated,
    /// The change set had no changes: in sync after all.
    NoChanges,
    /// UPDATE_ROLLBACK_FAILED continued to UPDATE_ROLLBACK_COMPLETE.
    RollbackContinued,
    /// CREATE_FAILED or UPDATE_FAILED rolled back (RollbackStack); a
    /// failed creation's stack is gone.
    RolledBack,
    /// Our update in flight was cancelled and rolled back.
    UpdateCancelled,
    /// Orphan deleted (policy.prune).
    Pruned,
    /// A change is needed and may not run.
    Blocked {
        by: BlockedBy,
        reason: String,
    },
    /// An upstream stack is not ready.
    Skipped {
        upstream: String,
    },
    /// Waited on an operation past the stack's timeout. `ours` tells
    /// whether the operation was stackwarden's (a failure) or someone
    /// else's (a difference that remains).
    TimedOut {
        status: StackStatus,
        ours: bool,
    },
    /// An operation failed or rolled back, or AWS refused a call.
    Failed {
        reason: String,
    },
}

impl std::fmt::Display for StackResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.detail() {
            Some(d) => write!(f, "{}: {d}", self.label()),
            None => f.write_str(self.label()),
        }
    }
}

impl StackResult {
    /// Whether dependents may go ahead: the stack is at its desired state.
    pub fn ready(&self) -> bool {
        matches!(
            self,
            StackResult::InSync
                | StackResult::Created
                | StackResult::Updated
                | StackResult::NoChanges
        )
    }

    /// Whether the pass failed because of this stack.
    pub fn failed(&self) -> bool {
        matches!(
            self,
            StackResult::Failed { .. } | StackResult::TimedOut { ours: true, .. }
        )
    }

    pub fn label(&self) -> &'static str {
        match self {
            StackResult::InSync => "in-sync",
            StackResult::Created => "created",
            StackResult::Updated => "updated",
            StackResult::NoChanges => "no-changes",
            StackResult::RollbackContinued => "rollback-continued",
            StackResult::RolledBack => "rolled-back",
            StackResult::UpdateCancelled => "update-cancelled",
            StackResult::Pruned => "pruned",
            StackResult::Blocked { .. } => "blocked",
            StackResult::Skipped { .. } => "skipped",
            StackResult::TimedOut { .. } => "timed-out",
            StackResult::Failed { .. } => "failed",
        }
    }

    /// The reason, for results that have one.
    pub fn detail(&self) -> Option<String> {
        match self {
            StackResult::Blocked { reason, .. } | StackResult::Failed { reason } => {
                Some(reason.clone())
            }
            StackResult::Skipped { upstream } => Some(format!("upstream {upstream} is not ready")),
            StackResult::TimedOut { status, ours } => Some(format!(
                "still {status} at the timeout ({})",
                if *ours {
                    "our operation; not cancelled"
                } else {
                    "someone else's operation"
                }
            )),
            _ => None,
        }
    }
}

/// One stack's part of a pass.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StackReport {
    /// The stack's key; `None` for an orphan.
    pub key: Option<String>,
    pub name: String,
    /// The action planned at the start of the pass.
    pub planned: String,
    pub result: StackResult,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change_set: Option<String>,
    pub seconds: f64,
    /// Status after the pass (None: does not exist).
    pub final_status: Option<StackStatus>,
    /// After a drift-aware change set: the detection that followed it (what
    /// drift stayed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drift_after: Option<crate::detect::Detected>,
    /// After a drift-aware change set: the drifted properties the detection
    /// after it no longer finds.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drift_reverted: Vec<String>,
}

impl StackReport {
    /// How to name the stack to people: its key, or an orphan's name.
    pub fn id(&self) -> &str {
        self.key.as_deref().unwrap_or(&self.name)
    }

    /// Whether this is the report of the declared stack `key`.
    pub fn is(&self, key: &str) -> bool {
        self.key.as_deref() == Some(key)
    }

    /// Whether an operation was started on the stack (or may have been:
    /// a planned operation that failed or timed out).
    pub fn wrote(&self) -> bool {
        let operated = matches!(
            self.result,
            StackResult::Created
                | StackResult::Updated
                | StackResult::RollbackContinued
                | StackResult::RolledBack
                | StackResult::UpdateCancelled
                | StackResult::Pruned
        );
        let attempted = self.result.failed()
            && matches!(
                self.planned.as_str(),
                "create"
                    | "update"
                    | "continue-rollback"
                    | "recreate"
                    | "rollback"
                    | "cancel-update"
                    | "prune"
            );
        operated || attempted
    }
}

/// What happened to one ECS service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ServiceResult {
    InSync,
    Scaled {
        from: i32,
        to: i32,
    },
    Redeployed {
        task_definition: String,
    },
    /// Its stack is not ready, or its names are not known.
    Skipped {
        reason: String,
    },
    Blocked {
        by: BlockedBy,
        reason: String,
    },
    /// The rollout did not settle within the stack's timeout.
    TimedOut,
    Failed {
        reason: String,
    },
}

impl ServiceResult {
    pub fn failed(&self) -> bool {
        matches!(self, ServiceResult::Failed { .. })
    }

    /// One line for people: the report's and the history's.
    pub fn describe(&self) -> String {
        match self {
            ServiceResult::InSync => "in sync".into(),
            ServiceResult::Scaled { from, to } => format!("scaled {from} -> {to}"),
            ServiceResult::Redeployed { task_definition } => {
                format!("redeployed {task_definition}")
            }
            ServiceResult::Skipped { reason } => format!("skipped: {reason}"),
            ServiceResult::Blocked { reason, .. } => format!("blocked: {reason}"),
            ServiceResult::TimedOut => "timed out waiting for the rollout".into(),
            ServiceResult::Failed { reason } => format!("failed: {reason}"),
        }
    }
}

impl ServiceReport {
    /// Whether an UpdateService was sent for it.
    pub fn wrote(&self) -> bool {
        matches!(
            self.result,
            ServiceResult::Scaled { .. }
                | ServiceResult::Redeployed { .. }
                | ServiceResult::TimedOut
        )
    }
}

/// One ECS service's part of a pass.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ServiceReport {
    pub stack: String,
    pub cluster: Option<String>,
    pub service: Option<String>,
    pub result: ServiceResult,
    pub seconds: f64,
}

/// A whole pass over one environment.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub environment: String,
    pub revision: String,
    pub stacks: Vec<StackReport>,
    pub services: Vec<ServiceReport>,
    /// The plan from the observation after applying: the truth at the end.
    #[serde(rename = "final")]
    pub final_plan: Plan,
    /// Why the observation after applying failed, if it did. The report
    /// still tells what was done; `final` is then the plan the pass started
    /// from, and the verdict is `Failed` (the end state is unknown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_observation_error: Option<String>,
    /// An error no retry cures that stopped this pass's writes (the wrong
    /// account, credentials refused): a controller waits for a change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permanent_error: Option<String>,
    /// A write went through a closed sync window on the override
    /// (`--ignore-windows`): what the history records.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub window_overridden: bool,
    pub seconds: f64,
}

impl Report {
    /// `Failed` when an operation failed (or ours timed out) or the final
    /// state holds a failed object; otherwise the final plan's verdict.
    pub fn verdict(&self) -> Verdict {
        let failed = self.final_observation_error.is_some()
            || self.stacks.iter().any(|s| s.result.failed())
            || self.services.iter().any(|s| s.result.failed());
        if failed {
            Verdict::Failed
        } else {
            self.final_plan.verdict()
        }
    }

    /// Whether the pass wrote anything to AWS (a stack operation, even one
    /// that failed, or a service update): what goes into the history.
    pub fn wrote(&self) -> bool {
        self.stacks.iter().any(StackReport::wrote) || self.services.iter().any(ServiceReport::wrote)
    }

    /// Stacks that an operation was started on in this pass.
    pub fn changed(&self) -> usize {
        self.stacks
            .iter()
            .filter(|s| {
                matches!(
                    s.result,
                    StackResult::Created
                        | StackResult::Updated
                        | StackResult::RollbackContinued
                        | StackResult::RolledBack
                        | StackResult::UpdateCancelled
                        | StackResult::Pruned
                ) || matches!(s.result, StackResult::Failed { .. }) && s.change_set.is_some()
            })
            .count()
    }
}

/// One pass over an environment: observe, plan, apply what policy allows,
/// wait, re-observe, report.
///
/// `limit` bounds concurrent stack operations; share one per account and
/// region between environments.
///
/// # Guarantees
/// Never starts an operation on a stack that has one in flight; never
/// executes a change set the policy forbids; never deletes a stack unless it
/// is an orphan with `policy.prune` and no termination protection, or a
/// failed create with `policy.recreate_failed` holding nothing protected;
/// writes nothing in observe mode or before the caller's account matches.
/// Every wait is bounded by the stack's timeout, so the pass ends.
///
/// # Errors
/// The environment cannot be observed, or the account check fails. Errors
/// of single stacks are reported in the [`Report`], not here.
pub async fn reconcile<C: Cloud>(
    cloud: &C,
    env: &DesiredEnv,
    limit: &Semaphore,
    options: &Options,
) -> Result<Report, ApplyError> {
    retry::with_jitter_seed(
        options.jitter_seed,
        reconcile_pass(cloud, env, limit, options),
    )
    .await
}

async fn reconcile_pass<C: Cloud>(
    cloud: &C,
    env: &DesiredEnv,
    limit: &Semaphore,
    options: &Options,
) -> Result<Report, ApplyError> {
    let started = Instant::now();
    let started_at = cloud.now();
    let mut observed = observe(cloud, env, options.depth)
        .await
        .map_err(ApplyError::Observe)?;
    options.annotate(env, cloud.now(), &mut observed);
    if let Intent::Recover(request) = &options.intent {
        read_executing(cloud, env, request, &mut observed)
            .await
            .map_err(ApplyError::Observe)?;
    }
    let initial = options.plan(env, &observed);
    let pass = Pass {
        cloud,
        env,
        limit,
        options,
        account: OnceCell::new(),
        templates: Mutex::new(observed.templates.clone()),
        keys: env
            .stacks
            .values()
            .map(|s| (s.name.as_str(), s.key.as_str()))
            .collect(),
        view: Mutex::new(View {
            stacks: observed.stacks.clone(),
            plans: initial
                .stacks
                .iter()
                .filter_map(|p| Some((p.key.clone()?, p.clone())))
                .collect(),
        }),
        first: &observed,
        initial: &initial,
        touched: AtomicBool::new(false),
        overrode_window: AtomicBool::new(false),
        started_at,
    };
    let mut stacks = pass.run_stacks().await?;
    redetect(cloud, env, options, &initial, &mut stacks).await;
    // A rollback is about stacks: services are left as they are.
    let services = match options.intent {
        Intent::Converge => pass.run_services(&stacks).await?,
        Intent::Recover(_) => Vec::new(),
    };
    let window_overridden = pass.overrode_window.load(Ordering::Relaxed);
    let permanent_error = match pass.account.get() {
        Some(Err(e)) if e.is_permanent() => Some(e.to_string()),
        _ => None,
    };

    // Nothing written and nothing waited on: the first observation is
    // still the truth, and a steady-state pass costs one observation.
    // A failed final observation does not lose the report of what was
    // done: it becomes part of the report.
    let (final_observed, final_plan, final_observation_error) = if pass.touched() {
        match observe(cloud, env, Depth::Fast).await {
            Ok(mut o) => {
                options.annotate(env, cloud.now(), &mut o);
                let p = plan(env, &o);
                (Some(o), p, None)
            }
            Err(e) => {
                tracing::error!(message = "Final observation failed.", environment = %env.name, error = %e);
                (
                    None,
                    initial.clone(),
                    Some(format!("cannot observe after applying: {e}")),
                )
            }
        }
    } else {
        (Some(observed), initial.clone(), None)
    };
    let stacks = stacks
        .into_iter()
        .map(|mut r| {
            r.final_status = final_observed
                .as_ref()
                .and_then(|o| o.stacks.get(&r.name))
                .map(|s| s.status.clone());
            r
        })
        .collect();
    forget_reverted(options, &final_plan);
    Ok(Report {
        environment: env.name.clone(),
        revision: env.revision.clone(),
        stacks,
        services,
        final_plan,
        final_observation_error,
        permanent_error,
        window_overridden,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Detects again the drift of every stack a drift-aware change set of this
/// pass updated, so the report says what was reverted and what stayed
/// (create-only properties, types the revert fell back on an ordinary
/// comparison for).
async fn redetect<C: Cloud>(
    cloud: &C,
    env: &DesiredEnv,
    options: &Options,
    initial: &Plan,
    stacks: &mut [StackReport],
) {
    let before: BTreeMap<String, &crate::drift::StackDrift> = stacks
        .iter()
        .filter(|r| r.result == StackResult::Updated)
        .filter_map(|r| {
            let key = r.key.clone()?;
            let p = initial.stacks.iter().find(|p| p.is(&key))?;
            let reverting = matches!(
                p.action,
                StackAction::Update {
                    revert_drift: true,
                    ..
                }
            );
            Some((key, p.drift.as_ref().filter(|_| reverting)?))
        })
        .collect();
    if before.is_empty() {
        return;
    }
    let keys: Vec<String> = before.keys().cloned().collect();
    let detections = options
        .detections
        .clone()
        .unwrap_or_else(|| crate::detect::Detections::new(crate::detect::DEFAULT_MAX_DETECTIONS));
    let deadline = Instant::now() + crate::detect::DEFAULT_WAIT;
    let found = crate::detect::detect_env(cloud, env, &keys, &detections, deadline).await;
    for r in stacks.iter_mut() {
        let (Some(d), Some(was)) = (
            r.key.as_ref().and_then(|k| found.get(k)),
            r.key.as_ref().and_then(|k| before.get(k)),
        ) else {
            continue;
        };
        if let crate::detect::Detected::Done { drift } = d {
            let stayed: std::collections::BTreeSet<(&str, &str)> = drift
                .each()
                .map(|(res, diff)| (res.logical_id.as_str(), diff.path.as_str()))
                .collect();
            r.drift_reverted = was
                .revertible()
                .filter(|(res, diff)| {
                    !stayed.contains(&(res.logical_id.as_str(), diff.path.as_str()))
                })
                .map(|(res, diff)| format!("{} {}", res.logical_id, diff.describe()))
                .collect();
        }
        r.drift_after = Some(d.clone());
    }
}

/// Keeps of the reverts tried only those whose drift the latest
/// detection still finds: drift that went away and comes back later is a
/// new episode, reverted again.
fn forget_reverted(options: &Options, plan: &Plan) {
    let mut attempted = options
        .revert_attempted
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    for p in &plan.stacks {
        // Only a complete, current answer ends what it does not find.
        let Some(d) = p.drift.as_ref().filter(|d| {
            d.checked.is_some()
                && !d.stale
                && d.detection_failed.is_none()
                && d.status != crate::cloud::DriftStatus::Unknown
        }) else {
            continue;
        };
        let current: std::collections::BTreeSet<(&str, &str)> = d
            .each()
            .map(|(res, diff)| (res.logical_id.as_str(), diff.path.as_str()))
            .collect();
        attempted.retain(|(stack, logical, path)| {
            *stack != p.name
                || current.contains(&(logical.as_str(), path.as_str()))
                || d.not_checked.contains(logical)
        });
    }
}

struct Pass<'a, C> {
    cloud: &'a C,
    env: &'a DesiredEnv,
    limit: &'a Semaphore,
    options: &'a Options,
    /// The account check, done once, before the first write.
    account: OnceCell<Result<(), ApplyError>>,
    /// Live templates read by the first observation. A stack brought to its
    /// desired revision drops its entry: its template is the desired one.
    templates: Mutex<BTreeMap<String, Template>>,
    /// Stack keys by stack name.
    keys: BTreeMap<&'a str, &'a str>,
    /// What the pass knows now: see [`View`].
    view: Mutex<View>,
    /// The first observation, and the plan made from it.
    first: &'a Observed,
    initial: &'a Plan,
    /// Set by every write and every wait: the first observation is stale.
    touched: AtomicBool,
    /// When the pass began, on the cloud's clock.
    started_at: std::time::SystemTime,
    /// Set by the first write the override let through a closed sync
    /// window (see [`Report::window_overridden`]).
    overrode_window: AtomicBool,
}

/// What a pass knows of the environment now: the first observation of its
/// stacks, updated by every read of one stack since, and every declared
/// stack's latest plan. A stack re-reads itself alone before acting and
/// re-plans itself alone against its upstreams as they ended: the work of a
/// pass grows with its stacks, not with their square.
struct View {
    /// By stack name.
    stacks: BTreeMap<String, Stack>,
    /// By stack key.
    plans: BTreeMap<String, StackPlan>,
}

/// How far back from a pass's start a change set of another name counts as
/// possibly in use by a concurrent run (it also absorbs clock skew between
/// this machine and AWS). Older ones are stale and deleted.
pub const CONCURRENT_RUN_WINDOW: Duration = Duration::from_secs(5 * 60);

/// Whether a change set was made with exactly the parameters and tags of
/// `request` (its template is the revision its name carries). A NoEcho
/// value comes back masked and cannot be compared: such a change set is
/// never taken as equal.
fn same_request(
    cs: &ChangeSet,
    request: &crate::cloud::ChangeSetRequest,
    secrets: &std::collections::BTreeSet<String>,
) -> bool {
    cs.tags == request.tags
        && cs.revert_drift == request.revert_drift
        && request
            .parameters
            .iter()
            .all(|(k, v)| !secrets.contains(k) && cs.parameters.get(k) == Some(v))
}

/// How long an executed CREATE change set's stack may still read
/// REVIEW_IN_PROGRESS (AWS is eventually consistent) before that is taken
/// as the answer: the execution did not start.
const REVIEW_GRACE: Duration = Duration::from_secs(60);

/// What a wait on a stack is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaiting {
    /// Any operation to end.
    Any,
    /// An executed change set's operation, which may not have begun yet.
    Execution,
}

/// What a stack's change sets hold of this revision's own.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Existing {
    None,
    /// Ready or being computed: reuse it.
    Reusable,
    /// Being executed, or executed since shortly before this pass (by a
    /// concurrent run, or a retry whose answer was lost): follow it.
    Executing,
    /// Executed, but made after the observation the plan rests on: look
    /// again before deciding anything.
    Unseen,
    /// Another run's change set, made since shortly before this pass.
    OtherRun {
        change_set: String,
        age: Duration,
    },
}

/// How one step of a stack ends: done, or re-plan and go again.
enum Step {
    Done(StackResult),
    Replan,
}

impl<'a, C: Cloud> Pass<'a, C> {
    fn touch(&self) {
        self.touched.store(true, Ordering::Relaxed);
    }

    fn touched(&self) -> bool {
        self.touched.load(Ordering::Relaxed)
    }

    fn emit(&self, p: Progress) {
        if let Some(tx) = &self.options.progress {
            let _ = tx.send(p);
        }
    }

    /// Runs every declared stack as the graph allows, then the orphans.
    ///
    /// A stack starts once all its upstreams have finished; it runs only if
    /// they are ready, else it is skipped naming the first that is not.
    /// Each stack is its own future, woken only by its own events: a pass
    /// over thousands of stacks polls each as often as it waits, never once
    /// per event elsewhere in the graph.
    async fn run_stacks(&self) -> Result<Vec<StackReport>, ApplyError> {
        use futures::stream::{FuturesUnordered, StreamExt};
        let mut waiting_on: BTreeMap<&str, usize> = BTreeMap::new();
        let mut dependents: BTreeMap<&str, Vec<&DesiredStack>> = BTreeMap::new();
        for stack in self.env.order() {
            waiting_on.insert(&stack.key, stack.depends_on.len());
            for dep in &stack.depends_on {
                dependents.entry(dep.as_str()).or_default().push(stack);
            }
        }
        let mut done: BTreeMap<String, StackReport> = BTreeMap::new();
        let mut running = FuturesUnordered::new();
        for stack in self.env.order().filter(|s| s.depends_on.is_empty()) {
            running.push(self.start_stack(stack, &done));
        }
        while let Some(report) = running.next().await {
            let key = report.key.clone().expect("a declared stack");
            done.insert(key.clone(), report);
            for stack in dependents.get(key.as_str()).into_iter().flatten() {
                let left = waiting_on.get_mut(stack.key.as_str()).expect("declared");
                *left -= 1;
                if *left == 0 {
                    running.push(self.start_stack(stack, &done));
                }
            }
        }
        let mut reports: Vec<StackReport> = self
            .env
            .order()
            .map(|s| done.remove(&s.key).expect("every declared stack ran"))
            .collect();
        for orphan in self.initial.stacks.iter().filter(|p| p.key.is_none()) {
            reports.push(self.run_orphan(orphan).await);
        }
        Ok(reports)
    }

    /// One declared stack's turn, its upstreams all finished (`done`).
    fn start_stack(
        &self,
        stack: &'a DesiredStack,
        done: &BTreeMap<String, StackReport>,
    ) -> BoxFuture<'_, StackReport> {
        let mut upstream = None;
        let mut upstream_changed = false;
        for dep in &stack.depends_on {
            let r = &done[dep].result;
            upstream_changed |= *r != StackResult::InSync;
            // A rollback gets each stack back on its own: an upstream that
            // is not ready holds nothing up.
            let recovering = matches!(self.options.intent, Intent::Recover(_));
            if !r.ready() && upstream.is_none() && !recovering {
                upstream = Some(dep.clone());
            }
        }
        let planned = self
            .lock_view()
            .plans
            .get(&stack.key)
            .map(|p| p.action.label().to_owned())
            .unwrap_or_default();
        async move {
            let start = Instant::now();
            let (result, change_set) = match upstream {
                Some(upstream) => (StackResult::Skipped { upstream }, None),
                None => self.run_stack(stack, upstream_changed).await,
            };
            self.finish(
                Some(&stack.key),
                &stack.name,
                planned,
                result,
                change_set,
                start,
            )
        }
        .instrument(tracing::info_span!("stack", stack = %stack.key))
        .boxed()
    }

    fn finish(
        &self,
        key: Option<&str>,
        name: &str,
        planned: String,
        result: StackResult,
        change_set: Option<String>,
        start: Instant,
    ) -> StackReport {
        let elapsed = start.elapsed();
        let id = key.unwrap_or(name);
        if result.ready() && result != StackResult::InSync {
            // Its live template is now the desired one.
            self.lock_templates().remove(name);
        }
        // Its dependents plan against what it ended as.
        if let Some(stack) = key.and_then(|k| self.env.stacks.get(k))
            && result.ready()
        {
            let observed = self.local(stack, self.first.stacks_read_at);
            self.plan_stack(stack, &observed);
        }
        match &result {
            StackResult::Failed { reason } => {
                tracing::error!(message = "Stack failed.", environment = %self.env.name, stack = id, %reason)
            }
            StackResult::Blocked { by, reason } => {
                tracing::warn!(message = "Stack blocked.", environment = %self.env.name, stack = id, ?by, %reason)
            }
            other => {
                tracing::info!(message = "Stack done.", environment = %self.env.name, stack = id, result = other.label(), seconds = elapsed.as_secs_f64())
            }
        }
        self.emit(Progress::Finished {
            environment: self.env.name.clone(),
            stack: id.to_owned(),
            result: result.clone(),
            elapsed,
        });
        StackReport {
            key: key.map(str::to_owned),
            name: name.to_owned(),
            planned,
            result,
            change_set,
            seconds: elapsed.as_secs_f64(),
            final_status: None,
            drift_after: None,
            drift_reverted: Vec::new(),
        }
    }

    fn lock_templates(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Template>> {
        self.templates.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks the caller's account once, before the first write, and asks
    /// the gate before every one.
    async fn guard(&self) -> Result<(), ApplyError> {
        self.account_guard().await?;
        if let Some(gate) = &self.options.gate {
            match gate.check().await {
                Ok(None) => {}
                Ok(Some(why)) => return Err(ApplyError::Suspended(why)),
                Err(e) => return Err(ApplyError::GateUnknown(e)),
            }
        }
        // A window that closed since the pass began stops its next write;
        // an operation already running finishes.
        if self.options.intent == Intent::Converge
            && !self.env.policy.windows.is_open(self.cloud.now())
        {
            if !self.options.ignore_windows {
                return Err(ApplyError::OutsideWindow(crate::window::HELD.to_owned()));
            }
            if !self.overrode_window.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    message = "Sync window ignored: this pass writes outside it (an override of this pass).",
                    environment = %self.env.name,
                );
            }
        }
        Ok(())
    }

    async fn account_guard(&self) -> Result<(), ApplyError> {
        self.touch();
        self.account
            .get_or_init(|| async {
                let Some(expected) = &self.env.account_id else {
                    return Ok(());
                };
                let actual = self
                    .cloud
                    .caller_account()
                    .await
                    .map_err(ApplyError::AccountCheck)?;
                if &actual == expected {
                    Ok(())
                } else {
                    Err(ApplyError::AccountMismatch {
                        expected: expected.clone(),
                        actual,
                    })
                }
            })
            .await
            .clone()
    }

    fn lock_view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps what a read of one stack said, for the plans that follow.
    fn record(&self, name: &str, live: Option<&Stack>) {
        let mut view = self.lock_view();
        match live {
            Some(s) => view.stacks.insert(name.to_owned(), s.clone()),
            None => view.stacks.remove(name),
        };
    }

    /// An observation of what one stack's plan reads, from what the pass
    /// knows: the stack and its upstreams, its live template, and the
    /// first observation's findings about its failures.
    fn local(&self, stack: &DesiredStack, read_at: Option<std::time::SystemTime>) -> Observed {
        let stacks = {
            let view = self.lock_view();
            std::iter::once(&stack.name)
                .chain(stack.depends_on.iter().map(|k| &self.env.stacks[k].name))
                .filter_map(|n| Some((n.clone(), view.stacks.get(n)?.clone())))
                .collect()
        };
        let templates = self
            .lock_templates()
            .get(&stack.name)
            .map(|t| (stack.name.clone(), t.clone()))
            .into_iter()
            .collect();
        // The first observation's entry of this stack, if any.
        fn own<V: Clone>(map: &BTreeMap<String, V>, name: &str) -> BTreeMap<String, V> {
            map.get_key_value(name)
                .map(|(k, v)| (k.clone(), v.clone()))
                .into_iter()
                .collect()
        }
        let (first, name) = (self.first, stack.name.as_str());
        Observed {
            stacks,
            templates,
            stacks_read_at: read_at,
            failed_revisions: own(&first.failed_revisions, name),
            rollback_episodes: own(&first.rollback_episodes, name),
            failed_redeploys: self.options.failed_redeploys(),
            services: BTreeMap::new(),
            suspension: first.suspension.clone(),
            sync_window: first.sync_window.clone(),
            executing: own(&first.executing, name),
            resource_drifts: own(&first.resource_drifts, name),
            drift_errors: own(&first.drift_errors, name),
            // What this pass tried so far counts too (the first
            // observation's are among them).
            revert_attempted: self.options.reverts_tried(),
        }
    }

    /// Plans one stack against its upstreams' latest plans, and keeps it.
    fn plan_stack(&self, stack: &DesiredStack, observed: &Observed) -> StackPlan {
        let upstreams: BTreeMap<String, StackPlan> = {
            let view = self.lock_view();
            stack
                .depends_on
                .iter()
                .filter_map(|k| Some((k.clone(), view.plans.get(k)?.clone())))
                .collect()
        };
        let mut p = crate::plan::plan_one(self.env, stack, observed, &upstreams);
        if let Intent::Recover(request) = &self.options.intent {
            p = crate::recovery::recover_one(self.env, stack, observed, request, p);
        }
        self.lock_view().plans.insert(stack.key.clone(), p.clone());
        p
    }

    /// Re-reads the stack (one DescribeStacks by name, and what its failed
    /// state needs) and re-plans it: its upstreams are as they ended, each
    /// read when it settled.
    async fn replan(&self, stack: &DesiredStack) -> Result<(Observed, StackPlan), CloudError> {
        let read_at = self.cloud.now();
        let live = self.cloud.describe_stack(&stack.name).await?;
        self.record(&stack.name, live.as_ref());
        let mut observed = self.local(stack, Some(read_at));
        observe::read_failures(self.cloud, stack, &mut observed).await?;
        let p = self.plan_stack(stack, &observed);
        Ok((observed, p))
    }

    /// Brings one stack to its desired state, as far as this pass may.
    ///
    /// A stack with nothing to do whose upstream did nothing either keeps
    /// the first plan's verdict without a new read; anything else re-reads.
    async fn run_stack(
        &self,
        stack: &DesiredStack,
        upstream_changed: bool,
    ) -> (StackResult, Option<String>) {
        // The timeout counts from when the stack gets its turn, not while it
        // queues behind the concurrency bound.
        let mut deadline: Option<Instant> = None;
        let mut change_set = None;
        let mut recreated = false;
        let first = self.lock_view().plans[&stack.key].clone();
        if !upstream_changed
            && matches!(
                first.action,
                StackAction::None | StackAction::Blocked { .. } | StackAction::Skip { .. }
            )
        {
            return (self.settled(&first), None);
        }
        // Held from the first action that needs it to the end of the stack.
        let mut permit = None;
        let mut steps = 0;
        // The pass's first observation is fresh enough for a stack whose
        // upstream did nothing, until it has waited or acted.
        let mut fresh = !upstream_changed;
        loop {
            let (observed, sp) = if std::mem::take(&mut fresh) {
                (self.local(stack, self.first.stacks_read_at), first.clone())
            } else {
                match self.replan(stack).await {
                    Ok(x) => x,
                    Err(e) => return (failed(format!("cannot observe: {e}")), change_set),
                }
            };
            let sp = &sp;
            let acts = sp.action.mutates() || matches!(sp.action, StackAction::Wait { .. });
            // Concurrency is bounded for everything that operates or waits.
            // A stack that had to queue for its turn looks again first: the
            // plan it queued with may be stale.
            if acts && permit.is_none() {
                let queued = Instant::now();
                permit = Some(self.limit.acquire().await.expect("never closed"));
                if queued.elapsed() > Duration::ZERO {
                    continue;
                }
            }
            if acts {
                self.emit(Progress::Started {
                    environment: self.env.name.clone(),
                    stack: stack.key.clone(),
                    action: sp.action.label().to_owned(),
                });
            }
            let deadline = *deadline.get_or_insert_with(|| retry::instant_after(stack.timeout));
            let step = match &sp.action {
                StackAction::None | StackAction::Blocked { .. } | StackAction::Skip { .. } => {
                    Step::Done(self.settled(sp))
                }
                StackAction::Wait { .. } => match self.wait_stable(stack, deadline).await {
                    Ok(_) => Step::Replan,
                    Err(Waited::TimedOut(status)) => Step::Done(StackResult::TimedOut {
                        status,
                        ours: false,
                    }),
                    Err(Waited::Error(e)) => Step::Done(failed(e.to_string())),
                },
                StackAction::Create | StackAction::Update { .. } => {
                    change_set = Some(change_set_for(stack, sp).0);
                    self.converge(stack, sp, &observed, deadline).await
                }
                StackAction::ContinueRollback { skip, token } => {
                    self.recover(stack, Recovery::Continue { skip, token }, deadline)
                        .await
                }
                StackAction::RollBack { token } => {
                    self.recover(stack, Recovery::RollBack { token }, deadline)
                        .await
                }
                StackAction::CancelUpdate { token } => {
                    self.recover(stack, Recovery::Cancel { token }, deadline)
                        .await
                }
                StackAction::Recreate if recreated => Step::Done(failed(
                    "the recreated stack failed again in this pass".into(),
                )),
                StackAction::Recreate => {
                    recreated = true;
                    self.delete(stack.name.as_str(), sp, deadline).await
                }
                // Orphans are not in the graph.
                StackAction::Prune => Step::Done(StackResult::InSync),
            };
            match step {
                Step::Done(r) => return (r, change_set),
                Step::Replan if steps + 1 < MAX_STEPS => steps += 1,
                Step::Replan => {
                    return (
                        StackResult::Blocked {
                            by: BlockedBy::Unsettled,
                            reason: format!(
                                "still changing after {MAX_STEPS} steps; the next pass continues"
                            ),
                        },
                        change_set,
                    );
                }
            }
        }
    }

    /// The result of a plan that asks nothing of this pass.
    fn settled(&self, sp: &StackPlan) -> StackResult {
        match &sp.action {
            StackAction::Blocked { by, reason } => StackResult::Blocked {
                by: *by,
                reason: blocked_reason(sp, reason),
            },
            StackAction::Skip { upstream } => StackResult::Skipped {
                upstream: upstream.clone(),
            },
            _ => StackResult::InSync,
        }
    }

    /// The change-set lifecycle of one stack: reuse or create, wait, check
    /// policy, execute, wait for the stack.
    async fn converge(
        &self,
        stack: &DesiredStack,
        sp: &StackPlan,
        observed: &Observed,
        deadline: Instant,
    ) -> Step {
        if let Err(e) = self.guard().await {
            return Step::Done(refused(e));
        }
        // Only the protection differs: one call, no change set.
        if let Some(d) = &sp.diff
            && d.template != TemplateDiff::Changed
            && d.parameters.is_empty()
            && d.tags.is_empty()
            && d.termination_protection.is_some()
        {
            return Step::Done(match self.protect_termination(stack, None).await {
                Ok(()) => StackResult::Updated,
                Err(r) => r,
            });
        }
        let parameters = match resolve_parameters(stack, self.env, observed) {
            Ok(p) => p,
            Err((_, why)) => {
                return Step::Done(failed(format!("cannot resolve parameters: {why}")));
            }
        };
        let live = observed.stacks.get(&stack.name);
        let exists = live.is_some_and(|s| s.status != StackStatus::ReviewInProgress);
        let kind = if exists {
            ChangeSetKind::Update
        } else {
            ChangeSetKind::Create
        };
        let (name, revert_drift) = change_set_for(stack, sp);
        let reused = if live.is_some() {
            match self
                .clean_change_sets(stack, &name, observed.stacks_read_at)
                .await
            {
                // A drift-aware change set describes the drift as it was
                // when made: never taken up again, made anew.
                Ok(Existing::Reusable) if revert_drift => {
                    return match self.cloud.delete_change_set(&stack.name, &name).await {
                        Ok(()) | Err(CloudError::NotFound(_)) => Step::Replan,
                        Err(e) => Step::Done(failed(format!("DeleteChangeSet: {e}"))),
                    };
                }
                Ok(Existing::Reusable) => true,
                Ok(Existing::None) => false,
                // A concurrent run of this revision got there first: its
                // operation is ours to follow, never to start again.
                Ok(Existing::Executing) => return self.follow(stack, kind, None, deadline).await,
                Ok(Existing::Unseen) => {
                    settle_pause(deadline).await;
                    return Step::Replan;
                }
                Ok(Existing::OtherRun { change_set, age }) => {
                    return Step::Done(StackResult::Blocked {
                        by: BlockedBy::AnotherRun,
                        reason: format!(
                            "another run is acting on this stack (its change set {change_set} is {} old); left to it, the next pass continues",
                            humantime::format_duration(Duration::from_secs(age.as_secs()))
                        ),
                    });
                }
                Err(e) => return Step::Done(failed(format!("change sets: {e}"))),
            }
        } else {
            false
        };
        let mut request = stack.change_set_request(
            &self.env.name,
            name.clone(),
            kind,
            parameters.clone(),
            format!("stackwarden revision {}", stack.revision),
        );
        request.revert_drift = revert_drift;
        // A change set this step did not make itself is checked against
        // what would be sent now before it is used.
        let mut made_here = false;
        if !reused {
            // CloudFormation reads the template and its nested templates
            // from the bucket when it makes the change set.
            if let Err(e) = crate::artifacts::publish(self.cloud, &request.artifacts).await {
                return Step::Done(failed(format!("artifact bucket: {e}")));
            }
            match self.cloud.create_change_set(&request).await {
                Ok(()) => made_here = true,
                // Made by a pass that crashed between create and our list.
                Err(CloudError::Conflict(_)) => {}
                // Some endpoints refuse an empty change set outright.
                Err(CloudError::NoChanges) => {
                    if revert_drift {
                        self.tried_revert(stack, sp);
                    }
                    return Step::Done(match self.protect_termination(stack, None).await {
                        Ok(()) => StackResult::NoChanges,
                        Err(r) => r,
                    });
                }
                Err(e) => return Step::Done(failed(format!("CreateChangeSet: {e}"))),
            }
        }
        let cs = match changeset::computed(self.cloud, &stack.name, &name, deadline).await {
            Ok(Some(cs)) => cs,
            Ok(None) => {
                return Step::Done(StackResult::TimedOut {
                    status: "change set CREATE_PENDING".into(),
                    ours: true,
                });
            }
            // Refused as existing, yet not there: the stack was made (or the
            // change set deleted) by someone else since we looked.
            Err(CloudError::NotFound(_)) => return Step::Replan,
            Err(e) => return Step::Done(failed(format!("change set: {e}"))),
        };
        if revert_drift
            && matches!(
                cs.status,
                ChangeSetStatus::NoChanges | ChangeSetStatus::Failed(_)
            )
        {
            // Nothing to revert after all (or AWS refused the mode): the
            // next pass does not try it again for this drift.
            self.tried_revert(stack, sp);
        }
        match &cs.status {
            ChangeSetStatus::NoChanges => {
                let _ = self.cloud.delete_change_set(&stack.name, &name).await;
                return Step::Done(match self.protect_termination(stack, None).await {
                    Ok(()) => StackResult::NoChanges,
                    Err(r) => r,
                });
            }
            ChangeSetStatus::Failed(why) => {
                // Deleted so the next pass (or a new revision) can make a fresh one.
                let _ = self.cloud.delete_change_set(&stack.name, &name).await;
                return Step::Done(failed(format!("change set {name} failed: {why}")));
            }
            ChangeSetStatus::Ready | ChangeSetStatus::Pending
                if !made_here && !same_request(&cs, &request, &stack.secret_parameters()) =>
            {
                // Its name hashes the revision, not the upstream outputs it
                // resolved nor the tags: made for other values (days ago,
                // left for review). Never executed; made anew.
                tracing::info!(message = "Change set made for other values; making it anew.", stack = %stack.key, change_set = %name);
                return match self.cloud.delete_change_set(&stack.name, &name).await {
                    Ok(()) | Err(CloudError::NotFound(_)) => Step::Replan,
                    Err(e) => Step::Done(failed(format!("DeleteChangeSet: {e}"))),
                };
            }
            // Someone executed it already: follow the stack.
            ChangeSetStatus::Executing | ChangeSetStatus::Executed => {
                return self.follow(stack, kind, None, deadline).await;
            }
            // The stack got busy, or the change set was deleted under us:
            // look again (a busy stack is waited for, a gone change set
            // made anew).
            ChangeSetStatus::Unavailable | ChangeSetStatus::Deleted => {
                settle_pause(deadline).await;
                return Step::Replan;
            }
            ChangeSetStatus::Ready | ChangeSetStatus::Pending => {}
        }

        // What changes inside nested stacks is gated like the parent's own
        // changes; a parent whose nested changes cannot be read is not
        // executed.
        let nested = match changeset::nested_changes(self.cloud, &stack.name, &cs, deadline).await {
            Ok(n) => n,
            // One we did not make here may predate IncludeNestedStacks:
            // made anew once before judging.
            Err(_) if !made_here => {
                return match self.cloud.delete_change_set(&stack.name, &name).await {
                    Ok(()) | Err(CloudError::NotFound(_)) => Step::Replan,
                    Err(e) => Step::Done(failed(format!("DeleteChangeSet: {e}"))),
                };
            }
            Err(why) => {
                return Step::Done(StackResult::Blocked {
                    by: BlockedBy::Uninspectable,
                    reason: format!(
                        "nested stacks: {why}; change set {name} left unexecuted until they can be inspected"
                    ),
                });
            }
        };
        // The live template was read with the first observation: it is the
        // live one only if the stack was not updated since (by someone
        // else, mid-pass). Otherwise nothing is proven from it.
        let unchanged_since_read = live.is_some_and(|l| {
            self.first
                .stacks
                .get(&stack.name)
                .is_some_and(|f| f.last_updated == l.last_updated && f.status == l.status)
        });
        let live_template = self
            .lock_templates()
            .get(&stack.name)
            .cloned()
            .filter(|_| unchanged_since_read);
        let violations = changeset::gate(
            stack,
            &self.env.policy,
            &cs.changes,
            &nested,
            live.filter(|_| exists).map(|l| LiveSide {
                template: live_template.as_ref(),
                parameters: &l.parameters,
            }),
            &parameters,
        );
        // A drift-aware change set writes back every drifted property of
        // the stack, ignored ones too: one that would touch a resource with
        // ignored drift is left for review.
        if revert_drift
            && let Some(c) = cs.changes.iter().find(|c| {
                c.drift
                    .as_ref()
                    .is_some_and(crate::cloud::ResourceDriftStatus::drifted)
                    && stack
                        .drift
                        .ignore
                        .iter()
                        .any(|i| i.logical_id == c.logical_id)
            })
        {
            self.tried_revert(stack, sp);
            return Step::Done(StackResult::Blocked {
                by: BlockedBy::Policy,
                reason: format!(
                    "drift-aware change set {name} would also revert {}, whose drift is ignored (drift.ignore); left for review",
                    c.logical_id
                ),
            });
        }
        if !violations.is_empty() {
            let list: Vec<String> = violations.iter().map(ToString::to_string).collect();
            return Step::Done(StackResult::Blocked {
                by: BlockedBy::Policy,
                reason: format!(
                    "policy: {}; change set {name} left for review (allow with policy.allow_replacement)",
                    list.join("; ")
                ),
            });
        }

        // The change set took a while: ask again before executing it (a
        // suspension made meanwhile leaves it for review).
        if let Err(e) = self.guard().await {
            return Step::Done(refused(e));
        }
        let mark = self.event_mark(&stack.name).await;
        let token = crate::cloud::client_token(&["execute", &cs.id]);
        if revert_drift {
            self.tried_revert(stack, sp);
        }
        match self
            .cloud
            .execute_change_set(&stack.name, &name, Some(&token))
            .await
        {
            Ok(()) => {}
            // Refused: either this very change set is already executing (a
            // retry of ours whose first answer was lost, or a concurrent run
            // of the same revision), which is ours to follow; or someone
            // started another operation, or deleted the change set: re-plan.
            Err(CloudError::Conflict(_) | CloudError::NotFound(_)) => {
                match self.cloud.describe_change_set(&stack.name, &name).await {
                    Ok(cs)
                        if matches!(
                            cs.status,
                            ChangeSetStatus::Executing | ChangeSetStatus::Executed
                        ) =>
                    {
                        tracing::info!(message = "Change set already executing; following it.", environment = %self.env.name, stack = %stack.key, change_set = %name);
                        return self.follow(stack, kind, mark, deadline).await;
                    }
                    _ => return Step::Replan,
                }
            }
            Err(e) => return Step::Done(failed(format!("ExecuteChangeSet: {e}"))),
        }
        tracing::info!(message = "Change set executed.", environment = %self.env.name, stack = %stack.key, change_set = %name, what = %sp.reason);
        self.follow(stack, kind, mark, deadline).await
    }

    /// Remembers that the drift `sp` planned to revert was tried: whatever
    /// a detection still finds of it afterwards is not tried again.
    fn tried_revert(&self, stack: &DesiredStack, sp: &StackPlan) {
        let Some(d) = &sp.drift else { return };
        let mut attempted = self
            .options
            .revert_attempted
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (res, diff) in d.revertible() {
            attempted.insert((
                stack.name.clone(),
                res.logical_id.clone(),
                diff.path.clone(),
            ));
        }
    }

    /// Waits for our operation on a stack to end and judges the outcome.
    async fn follow(
        &self,
        stack: &DesiredStack,
        kind: ChangeSetKind,
        mark: Option<String>,
        deadline: Instant,
    ) -> Step {
        let mut mark = mark;
        let end = match self
            .wait_settled(&stack.name, deadline, &mut mark, Awaiting::Execution)
            .await
        {
            Ok(end) => end,
            Err(Waited::TimedOut(status)) => {
                return Step::Done(StackResult::TimedOut { status, ours: true });
            }
            Err(Waited::Error(e)) => return Step::Done(failed(e.to_string())),
        };
        let Some(end) = end else {
            return Step::Done(failed("the stack disappeared during the operation".into()));
        };
        match end.status.as_str() {
            "CREATE_COMPLETE" | "UPDATE_COMPLETE" | "UPDATE_COMPLETE_CLEANUP_IN_PROGRESS" => {
                if let Err(r) = self.protect_termination(stack, Some(&end)).await {
                    return Step::Done(r);
                }
                Step::Done(if kind == ChangeSetKind::Create {
                    StackResult::Created
                } else {
                    StackResult::Updated
                })
            }
            status => {
                let reason = self
                    .failure_reason(&stack.name)
                    .await
                    .or(end.status_reason.clone())
                    .unwrap_or_else(|| "no reason given".into());
                Step::Done(failed(format!("{status}: {reason}")))
            }
        }
    }

    /// Deletes stale `stackwarden-*` change sets of a stack and tells
    /// what of this revision's own exists. A change set of another name made
    /// since shortly before this pass began may be in use by a concurrent
    /// run: it is not stale, and the stack is left to that run.
    async fn clean_change_sets(
        &self,
        stack: &DesiredStack,
        ours: &str,
        read_at: Option<std::time::SystemTime>,
    ) -> Result<Existing, CloudError> {
        let sets = self.cloud.list_change_sets(&stack.name).await?;
        let young_since = self
            .started_at
            .checked_sub(CONCURRENT_RUN_WINDOW)
            .unwrap_or(std::time::UNIX_EPOCH);
        let mut existing = Existing::None;
        if let Some(summary) = sets.iter().find(|cs| cs.name == ours) {
            let cs = self.cloud.describe_change_set(&stack.name, ours).await?;
            // Made after the observation this decision rests on: a
            // concurrent run of this revision may have done the work.
            let unseen = matches!((summary.created, read_at), (Some(c), Some(r)) if c > r);
            existing = match cs.status {
                ChangeSetStatus::Ready | ChangeSetStatus::Pending => Existing::Reusable,
                ChangeSetStatus::Executing => return Ok(Existing::Executing),
                ChangeSetStatus::Executed if unseen => return Ok(Existing::Unseen),
                // An executed one the observation already reflects is
                // history: a new change set of the same name corrects
                // drift since.
                _ => Existing::None,
            };
        }
        for cs in &sets {
            if !cs.name.starts_with(CHANGE_SET_PREFIX) || cs.name == ours {
                continue;
            }
            // Young, and in a state a run uses (computed or being computed,
            // or executing); a failed or executed one is done with.
            if let Some(created) = cs.created
                && created >= young_since
                && matches!(
                    self.cloud
                        .describe_change_set(&stack.name, &cs.name)
                        .await
                        .map(|d| d.status),
                    Ok(ChangeSetStatus::Pending
                        | ChangeSetStatus::Ready
                        | ChangeSetStatus::Executing)
                )
            {
                let age = self.cloud.now().duration_since(created).unwrap_or_default();
                return Ok(Existing::OtherRun {
                    change_set: cs.name.clone(),
                    age,
                });
            }
        }
        for cs in &sets {
            let n = &cs.name;
            let stale =
                n.starts_with(CHANGE_SET_PREFIX) && (n != ours || existing != Existing::Reusable);
            if stale {
                tracing::info!(message = "Deleting a stale change set.", stack = %stack.key, change_set = %n);
                match self.cloud.delete_change_set(&stack.name, n).await {
                    Ok(()) | Err(CloudError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(existing)
    }

    /// Sets termination protection when the live stack differs from desired.
    /// `known`: the stack as just read, when the caller has it (saves a call).
    /// `Err` is the stack's result: the call failed, or the gate (a
    /// suspension, a sync window closed meanwhile) held it back.
    async fn protect_termination(
        &self,
        stack: &DesiredStack,
        known: Option<&Stack>,
    ) -> Result<(), StackResult> {
        let cloud_failed = |e: CloudError| failed(format!("UpdateTerminationProtection: {e}"));
        let live = match known {
            Some(s) => Some(s.clone()),
            None => self
                .cloud
                .describe_stack(&stack.name)
                .await
                .map_err(cloud_failed)?,
        };
        let Some(mut live) = live else {
            self.record(&stack.name, None);
            return Ok(());
        };
        if live.termination_protection != stack.termination_protection {
            // A write like any other: it may come long after the last one.
            self.guard().await.map_err(refused)?;
            self.cloud
                .set_termination_protection(&stack.name, stack.termination_protection)
                .await
                .map_err(cloud_failed)?;
            live.termination_protection = stack.termination_protection;
        }
        self.record(&stack.name, Some(&live));
        Ok(())
    }

    /// Gets a stack out of a failed or running operation with the call its
    /// state takes, and waits for the rollback to end.
    async fn recover(&self, stack: &DesiredStack, how: Recovery<'_>, deadline: Instant) -> Step {
        if let Err(e) = self.guard().await {
            return Step::Done(refused(e));
        }
        let mut mark = self.event_mark(&stack.name).await;
        let (call, sent) = match how {
            Recovery::Continue { skip, token } => (
                "ContinueUpdateRollback",
                self.cloud
                    .continue_update_rollback(&stack.name, skip, Some(token))
                    .await,
            ),
            Recovery::RollBack { token } => (
                "RollbackStack",
                self.cloud.rollback_stack(&stack.name, Some(token)).await,
            ),
            Recovery::Cancel { token } => (
                "CancelUpdateStack",
                self.cloud
                    .cancel_update_stack(&stack.name, Some(token))
                    .await,
            ),
        };
        if let Err(e) = sent {
            return Step::Done(failed(format!("{call}: {e}")));
        }
        let done = match how {
            Recovery::Continue { .. } => StackResult::RollbackContinued,
            Recovery::RollBack { .. } => StackResult::RolledBack,
            Recovery::Cancel { .. } => StackResult::UpdateCancelled,
        };
        match self
            .wait_settled(&stack.name, deadline, &mut mark, Awaiting::Any)
            .await
        {
            // A rollback ends at the last stable state: UPDATE_ROLLBACK_COMPLETE
            // (ROLLBACK_COMPLETE or no stack at all for a failed creation).
            Ok(Some(s))
                if matches!(
                    s.status,
                    StackStatus::UpdateRollbackComplete | StackStatus::RollbackComplete
                ) =>
            {
                Step::Done(done)
            }
            Ok(None) if matches!(how, Recovery::RollBack { .. }) => Step::Done(done),
            Ok(Some(s)) => Step::Done(failed(format!(
                "{call} ended in {}: {}",
                s.status,
                s.status_reason.unwrap_or_default()
            ))),
            Ok(None) => Step::Done(failed("the stack disappeared during the rollback".into())),
            Err(Waited::TimedOut(status)) => {
                Step::Done(StackResult::TimedOut { status, ours: true })
            }
            Err(Waited::Error(e)) => Step::Done(failed(e.to_string())),
        }
    }

    /// Deletes a stack (a failed create to recreate, or a pruned orphan),
    /// re-checking the safety conditions against a fresh read first.
    async fn delete(&self, name: &str, sp: &StackPlan, deadline: Instant) -> Step {
        if let Err(e) = self.guard().await {
            return Step::Done(refused(e));
        }
        let live = match self.cloud.describe_stack(name).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                self.record(name, None);
                return Step::Replan;
            }
            Err(e) => return Step::Done(failed(format!("DescribeStacks: {e}"))),
        };
        if live.termination_protection || live.in_progress() {
            return Step::Done(StackResult::Blocked {
                by: BlockedBy::DeletionRefused,
                reason: format!(
                    "not deleted: {}",
                    if live.termination_protection {
                        "termination protection is on".to_owned()
                    } else {
                        format!("{} in flight", live.status)
                    }
                ),
            });
        }
        tracing::warn!(message = "Deleting a stack.", environment = %self.env.name, stack = name, why = %sp.reason);
        if let Err(e) = self.cloud.delete_stack(name).await {
            return Step::Done(failed(format!("DeleteStack: {e}")));
        }
        let mut mark = None;
        match self
            .wait_settled(name, deadline, &mut mark, Awaiting::Any)
            .await
        {
            Ok(None) => Step::Replan,
            Ok(Some(s)) => Step::Done(failed(format!(
                "deletion ended in {}: {}",
                s.status,
                s.status_reason.unwrap_or_default()
            ))),
            Err(Waited::TimedOut(status)) => {
                Step::Done(StackResult::TimedOut { status, ours: true })
            }
            Err(Waited::Error(e)) => Step::Done(failed(e.to_string())),
        }
    }

    async fn run_orphan(&self, sp: &StackPlan) -> StackReport {
        let start = Instant::now();
        let result = match &sp.action {
            StackAction::Prune => {
                let _permit = self.limit.acquire().await.expect("never closed");
                let deadline = retry::instant_after(crate::spec::DEFAULT_OPERATION_TIMEOUT);
                match self.delete(&sp.name, sp, deadline).await {
                    Step::Replan => StackResult::Pruned,
                    Step::Done(r) => r,
                }
            }
            StackAction::Blocked { by, reason } => StackResult::Blocked {
                by: *by,
                reason: reason.clone(),
            },
            _ => StackResult::InSync,
        };
        self.finish(
            None,
            &sp.name,
            sp.action.label().to_owned(),
            result,
            None,
            start,
        )
    }

    /// Waits until no operation is in flight on the stack.
    async fn wait_stable(
        &self,
        stack: &DesiredStack,
        deadline: Instant,
    ) -> Result<Option<Stack>, Waited> {
        let mut mark = self.event_mark(&stack.name).await;
        self.wait_settled(&stack.name, deadline, &mut mark, Awaiting::Any)
            .await
    }

    /// Polls a stack until it is stable (or gone), streaming its events.
    /// Transient errors (throttling) are answered by polling later.
    ///
    /// A poll reads the stack's new events (one call: what progress shows);
    /// the stack itself is read (DescribeStacks) first, when a stack-level
    /// event says its status moved, and at least every
    /// [`retry::DESCRIBE_EVERY`] in case events lag. One call per poll
    /// instead of two lets polls come twice as often for the same calls, so
    /// an operation's end is seen sooner.
    async fn wait_settled(
        &self,
        name: &str,
        deadline: Instant,
        mark: &mut Option<String>,
        awaiting: Awaiting,
    ) -> Result<Option<Stack>, Waited> {
        self.touch();
        let mut backoff = retry::stack_poll_backoff();
        let mut last_status = StackStatus::Other("unknown".into());
        let mut in_review: Option<Instant> = None;
        let mut described: Option<Instant> = None;
        loop {
            let moved = self.stream_events(name, mark).await;
            let due = described.is_none_or(|t| t.elapsed() >= retry::DESCRIBE_EVERY);
            if moved || due {
                described = Some(Instant::now());
                match self.cloud.describe_stack(name).await {
                    Ok(s) => {
                        self.record(name, s.as_ref());
                        match s {
                            // Our update is done once only the old resources
                            // are being deleted (and a rollback once it rolled
                            // back): the cleanup is not ours to time out on.
                            Some(s)
                                if awaiting == Awaiting::Execution
                                    && matches!(
                                        s.status,
                                        StackStatus::UpdateCompleteCleanupInProgress
                                            | StackStatus::UpdateRollbackCompleteCleanupInProgress
                                    ) =>
                            {
                                return Ok(Some(s));
                            }
                            Some(s) if s.in_progress() => last_status = s.status,
                            // A change set that is executing (maybe by a
                            // concurrent run) has not moved the stack out of
                            // review yet: not an end.
                            Some(s)
                                if awaiting == Awaiting::Execution
                                    && s.status == StackStatus::ReviewInProgress
                                    && in_review.get_or_insert_with(Instant::now).elapsed()
                                        < REVIEW_GRACE =>
                            {
                                last_status = s.status
                            }
                            other => return Ok(other),
                        }
                    }
                    Err(e) if e.is_transient() => {}
                    Err(e) => return Err(Waited::Error(e)),
                }
            }
            retry::pause(&mut backoff, deadline)
                .await
                .map_err(|()| Waited::TimedOut(last_status.clone()))?;
        }
    }

    /// The id of the newest event, so only later ones are streamed.
    async fn event_mark(&self, stack: &str) -> Option<String> {
        match self.cloud.stack_events(stack, None).await {
            Ok(events) => events.last().map(|e| e.id.clone()),
            Err(_) => None,
        }
    }

    /// Logs and shows events newer than `mark`, and moves the mark. Tells
    /// whether the stack's status may have moved: a stack-level event that
    /// ends a phase (not `*_IN_PROGRESS`, or a cleanup, which ends our
    /// part), or events that could not be read.
    async fn stream_events(&self, stack: &str, mark: &mut Option<String>) -> bool {
        let Ok(events) = self.cloud.stack_events(stack, mark.as_deref()).await else {
            return true; // best effort: the stack is read instead
        };
        let mut moved = false;
        for e in events {
            tracing::info!(
                message = "Stack event.",
                environment = %self.env.name,
                stack,
                resource = %e.logical_id,
                resource_type = %e.resource_type,
                status = %e.status,
                reason = e.reason.as_deref().unwrap_or(""),
            );
            moved |= e.is_stack_level(stack)
                && (!e.status.ends_with("_IN_PROGRESS")
                    || e.status.ends_with("CLEANUP_IN_PROGRESS"));
            *mark = Some(e.id.clone());
            self.emit(Progress::Event {
                environment: self.env.name.clone(),
                stack: self.key_of(stack),
                event: e,
            });
        }
        moved
    }

    fn key_of(&self, name: &str) -> String {
        self.keys
            .get(name)
            .map_or_else(|| name.to_owned(), |k| (*k).to_owned())
    }

    /// The root cause of the latest operation's failure: its oldest
    /// failure event with a reason.
    async fn failure_reason(&self, stack: &str) -> Option<String> {
        let events = self.cloud.operation_events(stack).await.ok()?;
        events
            .iter()
            .find(|e| e.status.ends_with("_FAILED") && e.reason.is_some())
            .map(|e| {
                format!(
                    "{} {}: {}",
                    e.logical_id,
                    e.status,
                    e.reason.clone().unwrap_or_default()
                )
            })
    }

    /// Converges the ECS services whose stacks are ready, then waits for
    /// their rollouts to settle.
    async fn run_services(&self, stacks: &[StackReport]) -> Result<Vec<ServiceReport>, ApplyError> {
        if self.env.stacks.values().all(|s| s.ecs_services.is_empty()) {
            return Ok(vec![]);
        }
        let start = Instant::now();
        let p = if self.touched() {
            match observe(self.cloud, self.env, Depth::Fast).await {
                Ok(mut o) => {
                    self.options.annotate(self.env, self.cloud.now(), &mut o);
                    plan(self.env, &o)
                }
                // What the stacks did stays reported; each service says why
                // it was not converged.
                Err(e) => {
                    let reason = format!("cannot observe before converging: {e}");
                    tracing::error!(message = "Service observation failed.", environment = %self.env.name, %reason);
                    return Ok(self
                        .initial
                        .services
                        .iter()
                        .map(|sp| ServiceReport {
                            stack: sp.stack.clone(),
                            cluster: sp.cluster.clone(),
                            service: sp.service.clone(),
                            result: ServiceResult::Failed {
                                reason: reason.clone(),
                            },
                            seconds: start.elapsed().as_secs_f64(),
                        })
                        .collect());
                }
            }
        } else {
            self.initial.clone()
        };
        let mut out = Vec::new();
        for sp in &p.services {
            let ready = stacks
                .iter()
                .find(|s| s.is(&sp.stack))
                .is_some_and(|s| s.result.ready());
            let result = if !ready {
                ServiceResult::Skipped {
                    reason: format!("stack {} is not ready", sp.stack),
                }
            } else {
                self.converge_service(sp).await
            };
            if let ServiceResult::Failed { reason } = &result {
                tracing::error!(message = "Service failed.", environment = %self.env.name, service = ?sp.service, %reason);
            }
            out.push(ServiceReport {
                stack: sp.stack.clone(),
                cluster: sp.cluster.clone(),
                service: sp.service.clone(),
                result,
                seconds: start.elapsed().as_secs_f64(),
            });
        }
        Ok(out)
    }

    /// Remembers that redeploying `task_definition` for the service's stack
    /// revision failed, so no later pass retries it.
    fn redeploy_failed(&self, sp: &crate::plan::ServicePlan, task_definition: Option<&str>) {
        let (Some(td), Some(stack)) = (task_definition, self.env.stacks.get(&sp.stack)) else {
            return;
        };
        self.options
            .failed_redeploys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((stack.revision.clone(), td.to_owned()));
    }

    async fn converge_service(&self, sp: &crate::plan::ServicePlan) -> ServiceResult {
        let (Some(cluster), Some(service)) = (&sp.cluster, &sp.service) else {
            return ServiceResult::Skipped {
                reason: sp.reason.clone(),
            };
        };
        let (desired, task_definition, result) = match &sp.action {
            ServiceAction::None => return ServiceResult::InSync,
            ServiceAction::Wait { reason } => {
                return ServiceResult::Skipped {
                    reason: reason.clone(),
                };
            }
            ServiceAction::Blocked { by, reason } => {
                return ServiceResult::Blocked {
                    by: *by,
                    reason: reason.clone(),
                };
            }
            ServiceAction::Scale { from, to } => (
                Some(*to),
                None,
                ServiceResult::Scaled {
                    from: *from,
                    to: *to,
                },
            ),
            ServiceAction::Redeploy { task_definition } => (
                None,
                Some(task_definition.as_str()),
                ServiceResult::Redeployed {
                    task_definition: task_definition.clone(),
                },
            ),
        };
        if let Err(e) = self.guard().await {
            return match e.held() {
                Some((by, reason)) => ServiceResult::Blocked { by, reason },
                None => ServiceResult::Failed {
                    reason: e.to_string(),
                },
            };
        }
        tracing::info!(message = "Updating an ECS service.", environment = %self.env.name, cluster, service, why = %sp.reason);
        if let Err(e) = self
            .cloud
            .update_service(cluster, service, desired, task_definition)
            .await
        {
            return ServiceResult::Failed {
                reason: format!("UpdateService: {e}"),
            };
        }
        let timeout = self
            .env
            .stacks
            .get(&sp.stack)
            .map_or(crate::spec::DEFAULT_OPERATION_TIMEOUT, |s| s.timeout);
        let deadline = retry::instant_after(timeout);
        let mut backoff = retry::poll_backoff();
        // ECS is eventually consistent: the first reads after UpdateService
        // may still show the old deployment, settled. A rollback is only
        // concluded after the requested deployment was seen.
        let mut seen_ours = task_definition.is_none();
        loop {
            match self
                .cloud
                .describe_services(cluster, std::slice::from_ref(service))
                .await
            {
                Ok(found) => {
                    let Some(s) = found.into_iter().next() else {
                        return ServiceResult::Failed {
                            reason: "the service disappeared".into(),
                        };
                    };
                    let primary = s.primary().cloned();
                    seen_ours |= task_definition
                        .is_some_and(|td| s.deployments.iter().any(|d| d.task_definition == td));
                    let settled = match primary.as_ref().and_then(|d| d.rollout_state.as_deref()) {
                        Some("FAILED") => {
                            self.redeploy_failed(sp, task_definition);
                            return ServiceResult::Failed {
                                reason: format!(
                                    "rollout failed: {}",
                                    primary
                                        .and_then(|d| d.rollout_reason)
                                        .unwrap_or_else(|| "no reason given".into())
                                ),
                            };
                        }
                        Some("COMPLETED") => s.deployments.len() == 1,
                        None => s.deployments.len() <= 1 && s.running == s.desired,
                        _ => false,
                    };
                    if settled {
                        // Done means the primary deployment runs what was
                        // asked for: a circuit breaker that rolled back
                        // also ends COMPLETED, on the old task definition.
                        let running = primary.map(|d| d.task_definition).unwrap_or_default();
                        return match task_definition {
                            // Not seen yet: a stale read; look again.
                            Some(td) if running != td && !seen_ours => {
                                if retry::pause(&mut backoff, deadline).await.is_err() {
                                    return ServiceResult::TimedOut;
                                }
                                continue;
                            }
                            Some(td) if running != td => {
                                self.redeploy_failed(sp, task_definition);
                                ServiceResult::Failed {
                                    reason: format!(
                                        "the deployment of {td} rolled back to {running}{}; not retried until the desired state changes",
                                        s.events
                                            .first()
                                            .map(|e| format!(" ({e})"))
                                            .unwrap_or_default()
                                    ),
                                }
                            }
                            _ => result,
                        };
                    }
                }
                Err(e) if e.is_transient() => {}
                Err(e) => {
                    return ServiceResult::Failed {
                        reason: format!("DescribeServices: {e}"),
                    };
                }
            }
            if retry::pause(&mut backoff, deadline).await.is_err() {
                return ServiceResult::TimedOut;
            }
        }
    }
}

/// Why a wait ended early.
enum Waited {
    TimedOut(StackStatus),
    Error(CloudError),
}

/// A pause before looking again at something that is settling (a busy
/// stack, a change set just executed elsewhere), so a re-plan does not
/// churn; never past the deadline.
async fn settle_pause(deadline: Instant) {
    let wait = retry::jittered(Duration::from_secs(15), retry::POLL_JITTER);
    tokio::time::sleep(wait.min(deadline.saturating_duration_since(Instant::now()))).await;
}

/// The change set a Create or Update plan makes, and whether it is a
/// drift-aware one. A drift-aware change set has a name of its own: the
/// revision's ordinary one may exist, and is another request.
fn change_set_for(stack: &DesiredStack, sp: &StackPlan) -> (String, bool) {
    match sp.action {
        StackAction::Update {
            revert_drift: true, ..
        } => (format!("{}-revert-drift", stack.change_set_name()), true),
        _ => (stack.change_set_name(), false),
    }
}

fn failed(reason: String) -> StackResult {
    StackResult::Failed { reason }
}

/// The reason a blocked stack gives: the plan's full explanation when it
/// says more than the short one.
fn blocked_reason(sp: &StackPlan, short: &str) -> String {
    if sp.reason.contains(short) {
        sp.reason.clone()
    } else {
        format!("{short}: {}", sp.reason)
    }
}
