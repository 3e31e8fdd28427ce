//! The plan: what to do about each stack and ECS service, in dependency
//! order, and why. Computed purely from desired state, observed state and
//! policy: no IO, no clock, so it is exhaustively testable and prints the
//! same way every time.

use std::collections::BTreeMap;

use crate::cloud::{Service, Stack, StackStatus};
use crate::diff::{StackDiff, diff_stack};
use crate::policy;
use crate::spec::{DesiredEnv, DesiredStack, ENVIRONMENT_TAG, Mode, OWNER_TAG, Value};
use crate::template::Template;

/// What AWS says now, for one environment.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// By stack name: the environment's stacks that exist, and any other
    /// stack tagged as belonging to the environment.
    pub stacks: BTreeMap<String, Stack>,
    /// Live templates, by stack name, for the stacks whose template was fetched.
    pub templates: BTreeMap<String, Template>,
    /// By (cluster, service name).
    pub services: BTreeMap<(String, String), Service>,
    /// By stack name: the desired revision whose operation stackwarden
    /// executed and that failed (the stack is in ROLLBACK_COMPLETE or
    /// UPDATE_ROLLBACK_COMPLETE and its executed change set is
    /// `stackwarden-<revision>`). Read from the cloud, so a restart knows it
    /// too; such a revision is never retried.
    pub failed_revisions: BTreeMap<String, String>,
    /// When the stacks were read, on the cloud's clock: a change set made
    /// after it is not known to this observation.
    pub stacks_read_at: Option<std::time::SystemTime>,
    /// (stack revision, task definition) pairs whose ECS redeploy rolled
    /// back or failed: not retried until the desired state changes.
    pub failed_redeploys: std::collections::BTreeSet<(String, String)>,
    /// By stack name, for stacks in UPDATE_ROLLBACK_FAILED: what their
    /// events say of the stuck episode.
    pub rollback_episodes: BTreeMap<String, RollbackEpisode>,
    /// The environment's suspension, read from the state table: while
    /// there is one, nothing is written.
    pub suspension: Option<crate::state::Suspension>,
    /// The environment's sync window when the observation was made (none
    /// without `policy.windows`): while closed, nothing is written.
    pub sync_window: Option<crate::window::WindowState>,
    /// By stack name: the change set whose execution is the stack's
    /// running operation (read only by `rollback`, for stacks in
    /// UPDATE_IN_PROGRESS).
    pub executing: BTreeMap<String, String>,
    /// By stack name, for stacks whose latest drift detection found drift:
    /// the resources it reported.
    pub resource_drifts: BTreeMap<String, Vec<crate::cloud::ResourceDrift>>,
    /// By stack name: why its drift results could not be read.
    pub drift_errors: BTreeMap<String, String>,
    /// (stack name, logical id, property path) of drift a drift-aware
    /// change set of this process already tried to revert: not tried again
    /// until a complete detection no longer finds it.
    pub revert_attempted: std::collections::BTreeSet<(String, String, String)>,
}

/// A stack's stuck rollback, as its latest operation's events tell it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RollbackEpisode {
    /// How many times the rollback failed in this operation: 1 is the
    /// original failure; more means a ContinueUpdateRollback failed again.
    pub failures: usize,
    /// Logical ids of the resources that failed in the latest attempt.
    pub failing: Vec<String>,
    /// The id of the event that began the operation: names the episode.
    pub began_with: String,
}

/// Whether an object matches its desired state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Sync {
    InSync,
    OutOfSync,
    Missing,
    /// Tagged as ours, absent from desired state.
    Orphaned,
    /// Cannot be known yet (an operation is in flight, or upstream is not ready).
    Unknown,
}

/// How an object is doing, whatever its sync status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Health {
    Healthy,
    /// An operation is in flight.
    Progressing,
    /// Working on an older state: a rolled-back update, a failed rollout,
    /// fewer tasks running than desired.
    Degraded,
    /// Stuck: needs a decision (failed create, failed rollback).
    Failed,
    /// Does not exist.
    Absent,
}

/// Why a needed change may not run: what a person has to do differs by
/// kind, and alerts, metrics and exit codes read the kind, never the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockedBy {
    /// `policy.mode: observe`: nothing is written.
    ObserveMode,
    /// `stackwarden suspend` (or a rollback): nothing is written until
    /// `stackwarden resume`.
    Suspended,
    /// Outside the environment's sync windows (`policy.windows`): nothing
    /// is written until one opens.
    SyncWindow,
    /// The change replaces or removes a protected resource.
    Policy,
    /// The stack stopped in a failed state that needs a decision.
    FailedState,
    /// This revision's own operation (or redeploy) already failed: only a
    /// new desired state retries.
    FailedRevision,
    /// Continuing a stuck rollback failed again.
    RollbackFailedAgain,
    /// A stack that may not be deleted (an orphan not proven ours, holding
    /// protected resources, termination protection, ...).
    DeletionRefused,
    /// Another run's change set is acting on the stack.
    AnotherRun,
    /// Nested change sets cannot be inspected (yet).
    Uninspectable,
    /// The stack kept changing under the pass.
    Unsettled,
    /// An operation is in flight that only a person may interrupt.
    InFlight,
    /// The ECS service is not in its cluster.
    ServiceMissing,
}

/// What to do about one stack.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StackAction {
    /// Nothing: in sync.
    None,
    Create,
    Update {
        what: Vec<String>,
        /// With a drift-aware change set (`DeploymentMode: REVERT_DRIFT`):
        /// drifted properties get the template's values back.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        revert_drift: bool,
    },
    /// Someone else's operation is in flight: wait, never start a second one.
    Wait {
        status: StackStatus,
    },
    /// UPDATE_ROLLBACK_FAILED, and the policy allows continuing the
    /// rollback: once per stuck episode, skipping the resources listed.
    ContinueRollback {
        skip: Vec<String>,
        /// ClientRequestToken of this attempt: the same for a retry of the
        /// call, new for the next episode or attempt.
        token: String,
    },
    /// Failed create, and the policy allows deleting and recreating.
    Recreate,
    /// `stackwarden rollback` of a stack in CREATE_FAILED or UPDATE_FAILED:
    /// RollbackStack.
    RollBack {
        token: String,
    },
    /// `stackwarden rollback --cancel` of our own update in flight:
    /// CancelUpdateStack.
    CancelUpdate {
        token: String,
    },
    /// A change is needed and may not run.
    Blocked {
        by: BlockedBy,
        reason: String,
    },
    /// A change may be needed, but an upstream stack is not ready.
    Skip {
        upstream: String,
    },
    /// Orphaned and policy allows deleting it.
    Prune,
}

impl StackAction {
    /// Whether this action writes to AWS.
    pub fn mutates(&self) -> bool {
        matches!(
            self,
            StackAction::Create
                | StackAction::Update { .. }
                | StackAction::ContinueRollback { .. }
                | StackAction::Recreate
                | StackAction::RollBack { .. }
                | StackAction::CancelUpdate { .. }
                | StackAction::Prune
        )
    }

    pub fn label(&self) -> &'static str {
        match self {
            StackAction::None => "none",
            StackAction::Create => "create",
            StackAction::Update { .. } => "update",
            StackAction::Wait { .. } => "wait",
            StackAction::ContinueRollback { .. } => "continue-rollback",
            StackAction::Recreate => "recreate",
            StackAction::RollBack { .. } => "rollback",
            StackAction::CancelUpdate { .. } => "cancel-update",
            StackAction::Blocked { .. } => "blocked",
            StackAction::Skip { .. } => "skip",
            StackAction::Prune => "prune",
        }
    }
}

/// The plan for one stack.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StackPlan {
    /// The stack's key in the desired state; `None` for an orphan (live,
    /// tagged for the environment, declared nowhere).
    pub key: Option<String>,
    pub name: String,
    /// 1-based wave of the dependency graph (0 for orphans).
    pub wave: usize,
    pub status: Option<StackStatus>,
    pub sync: Sync,
    pub health: Health,
    pub action: StackAction,
    /// One line: why this action.
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<StackDiff>,
    /// Resource drift from the latest detection (absent until one ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drift: Option<crate::drift::StackDrift>,
}

impl StackPlan {
    /// How to name the stack to people: its key, or its name for an orphan
    /// (which has no key).
    pub fn id(&self) -> &str {
        self.key.as_deref().unwrap_or(&self.name)
    }

    /// Whether this is the plan of the declared stack `key`.
    pub fn is(&self, key: &str) -> bool {
        self.key.as_deref() == Some(key)
    }
}

/// What to do about one ECS service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ServiceAction {
    None,
    Scale {
        from: i32,
        to: i32,
    },
    Redeploy {
        task_definition: String,
    },
    /// Its stack changes first, or its names are not known yet.
    Wait {
        reason: String,
    },
    Blocked {
        by: BlockedBy,
        reason: String,
    },
}

impl ServiceAction {
    /// Whether this action writes to AWS.
    pub fn mutates(&self) -> bool {
        matches!(
            self,
            ServiceAction::Scale { .. } | ServiceAction::Redeploy { .. }
        )
    }

    pub fn label(&self) -> &'static str {
        match self {
            ServiceAction::None => "none",
            ServiceAction::Scale { .. } => "scale",
            ServiceAction::Redeploy { .. } => "redeploy",
            ServiceAction::Wait { .. } => "wait",
            ServiceAction::Blocked { .. } => "blocked",
        }
    }
}

/// The plan for one ECS service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServicePlan {
    pub stack: String,
    pub cluster: Option<String>,
    pub service: Option<String>,
    pub sync: Sync,
    pub health: Health,
    pub action: ServiceAction,
    pub reason: String,
    pub running: Option<i32>,
    pub desired: Option<i32>,
}

/// The plan of one environment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    pub environment: String,
    pub revision: String,
    pub mode: Mode,
    /// Set while the environment is suspended: the plan is what would be
    /// done, and nothing of it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspended: Option<crate::state::Suspension>,
    /// The sync window (`policy.windows`) when planned: closed, the plan
    /// is what would be done, and nothing of it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_window: Option<crate::window::WindowState>,
    /// In dependency order; orphans last.
    pub stacks: Vec<StackPlan>,
    pub services: Vec<ServicePlan>,
}

/// How a plan ends, for exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    InSync,
    Differences,
    Failed,
}

impl Plan {
    /// `Failed` when a stack or service is failed; `Differences` when
    /// anything is out of sync, missing, orphaned, in flight, or unhealthy;
    /// `InSync` otherwise.
    pub fn verdict(&self) -> Verdict {
        let failed = self.stacks.iter().any(|s| s.health == Health::Failed)
            || self.services.iter().any(|s| s.health == Health::Failed);
        if failed {
            return Verdict::Failed;
        }
        // Resource drift counts too, even where it is only reported.
        let clean = self.stacks.iter().all(|s| {
            s.sync == Sync::InSync
                && s.health == Health::Healthy
                && s.action == StackAction::None
                && !s
                    .drift
                    .as_ref()
                    .is_some_and(crate::drift::StackDrift::drifted)
        }) && self.services.iter().all(|s| {
            s.sync == Sync::InSync && s.health == Health::Healthy && s.action == ServiceAction::None
        });
        if clean {
            Verdict::InSync
        } else {
            Verdict::Differences
        }
    }
}

/// Resolves a value from observed outputs; `Err` names what is missing.
pub fn resolve(value: &Value, env: &DesiredEnv, observed: &Observed) -> Result<String, String> {
    match value {
        Value::Literal(s) => Ok(s.clone()),
        Value::Output { stack, output } => {
            let name = &env.stacks[stack].name;
            match observed.stacks.get(name) {
                None => Err(format!("{stack} does not exist yet")),
                Some(s) => s
                    .outputs
                    .get(output)
                    .cloned()
                    .ok_or_else(|| format!("{stack} has no output {output} yet ({})", s.status)),
            }
        }
    }
}

/// Resolved parameters of a stack, or the first unresolved reference.
pub fn resolve_parameters(
    stack: &DesiredStack,
    env: &DesiredEnv,
    observed: &Observed,
) -> Result<BTreeMap<String, String>, (String, String)> {
    stack
        .parameters
        .iter()
        .map(|(k, v)| {
            resolve(v, env, observed)
                .map(|r| (k.clone(), r))
                .map_err(|why| match v {
                    Value::Output { stack, .. } => (stack.clone(), why),
                    Value::Literal(_) => (String::new(), why),
                })
        })
        .collect()
}

/// Whether and how to continue a stuck rollback: once per episode; again
/// only when the desired state skips every resource that failed.
fn continue_rollback(
    env: &DesiredEnv,
    stack: &DesiredStack,
    episode: Option<&RollbackEpisode>,
    why: &str,
) -> (StackAction, String) {
    let episode = episode.cloned().unwrap_or_default();
    let listed: Vec<String> = env
        .policy
        .rollback_skip
        .iter()
        .filter(|(k, _)| *k == stack.key)
        .map(|(_, id)| id.clone())
        .collect();
    // AWS takes only resources in UPDATE_FAILED.
    let skip: Vec<String> = episode
        .failing
        .iter()
        .filter(|id| listed.contains(id))
        .cloned()
        .collect();
    let all_skipped = !episode.failing.is_empty() && skip.len() == episode.failing.len();
    if episode.failures <= 1 || all_skipped {
        let also = if skip.is_empty() {
            String::new()
        } else {
            format!(", skipping {}", skip.join(", "))
        };
        let attempt = episode.failures.to_string();
        let token = crate::cloud::client_token(&[
            "continue-rollback",
            &stack.name,
            &episode.began_with,
            &attempt,
        ]);
        return (
            StackAction::ContinueRollback { skip, token },
            format!("rollback failed ({why}); policy.continue_rollback: continue it{also}"),
        );
    }
    let failing = if episode.failing.is_empty() {
        "no resource named".to_owned()
    } else {
        episode.failing.join(", ")
    };
    (
        StackAction::Blocked {
            by: BlockedBy::RollbackFailedAgain,
            reason: format!("continuing the rollback failed again on {failing}"),
        },
        format!(
            "rollback failed, and continuing it failed again ({failing}); not retried: list the resources in policy.rollback_skip as {}.<LogicalId> to skip them, run `stackwarden rollback -e {} --stack {} --skip {}.<LogicalId>`, or fix them by hand",
            stack.key, env.name, stack.key, stack.key
        ),
    )
}

/// Whose an undeclared stack tagged for this environment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Tagged with this environment and this desired state's owner.
    Ours,
    /// Tagged with this environment, without an owner tag: from before
    /// `owner` was set, or another deployment's; never pruned.
    Unproven,
    /// Another owner's.
    Foreign,
}

/// The claim this environment has on a live stack it does not declare;
/// `None` when the stack is not tagged for this environment at all.
pub fn claim(env: &DesiredEnv, stack: &crate::cloud::Stack) -> Option<Claim> {
    if stack.tags.get(ENVIRONMENT_TAG) != Some(&env.name) {
        return None;
    }
    Some(match (stack.tags.get(OWNER_TAG), &env.owner) {
        (Some(theirs), Some(ours)) if theirs == ours => Claim::Ours,
        (Some(_), _) => Claim::Foreign,
        (None, _) => Claim::Unproven,
    })
}

/// Computes the plan of an environment.
///
/// # Guarantees
/// Stacks appear in wave order (sorted within a wave). No stack gets a
/// mutating action while another operation is in flight on it, while an
/// upstream stack is not ready, or in observe mode.
pub fn plan(env: &DesiredEnv, observed: &Observed) -> Plan {
    let mut stacks: Vec<StackPlan> = Vec::new();
    let mut by_key: BTreeMap<String, StackPlan> = BTreeMap::new();
    for (i, wave) in env.waves.iter().enumerate() {
        for key in wave {
            let p = plan_stack(env, &env.stacks[key], i + 1, observed, &by_key);
            by_key.insert(key.clone(), p.clone());
            stacks.push(p);
        }
    }
    // Orphans: tagged with this environment and owner, not declared.
    let declared: std::collections::BTreeSet<&String> =
        env.stacks.values().map(|s| &s.name).collect();
    for (name, s) in &observed.stacks {
        if declared.contains(name) {
            continue;
        }
        let claim = match claim(env, s) {
            // Not this deployment's: not reported, not counted.
            None | Some(Claim::Foreign) => continue,
            Some(c) => c,
        };
        let refused = |reason: String, why: String| {
            (
                StackAction::Blocked {
                    by: BlockedBy::DeletionRefused,
                    reason,
                },
                why,
            )
        };
        let (action, reason) = if !env.policy.prune {
            (
                StackAction::None,
                "tagged for this environment but not declared; policy.prune is off, kept"
                    .to_owned(),
            )
        } else if claim == Claim::Unproven {
            refused(
                format!("no {OWNER_TAG} tag of this owner: not proven ours"),
                format!(
                    "tagged for this environment but not with {OWNER_TAG}: may be another deployment's; never pruned (delete it by hand if it is yours)"
                ),
            )
        } else if s.termination_protection {
            refused(
                "termination protection is on".into(),
                "orphaned, but termination protection is on: never deleted".to_owned(),
            )
        } else {
            match observed.templates.get(name) {
                None => refused(
                    "its template could not be read".into(),
                    "orphaned, but its live template could not be read: never pruned unchecked"
                        .to_owned(),
                ),
                Some(t) => {
                    let protected = policy::protected_resources(t, &env.policy);
                    if !protected.is_empty() && !env.policy.allow_prune.contains(name) {
                        refused(
                            format!("holds protected resources: {}", protected.join(", ")),
                            format!(
                                "orphaned, but holds protected resources ({}): never pruned unless policy.allow_prune lists {name}",
                                protected.join(", ")
                            ),
                        )
                    } else {
                        (
                            StackAction::Prune,
                            "orphaned: not declared any more, policy.prune is on".to_owned(),
                        )
                    }
                }
            }
        };
        stacks.push(StackPlan {
            key: None,
            name: name.clone(),
            wave: 0,
            status: Some(s.status.clone()),
            sync: Sync::Orphaned,
            health: Health::Healthy,
            action,
            reason,
            diff: None,
            drift: None,
        });
    }
    let services = env
        .order()
        .flat_map(|s| s.ecs_services.iter().map(move |svc| (s, svc)))
        .map(|(s, svc)| plan_service(env, s, svc, observed, &by_key[&s.key]))
        .collect();
    let plan = Plan {
        environment: env.name.clone(),
        revision: env.revision.clone(),
        mode: env.policy.mode,
        suspended: observed.suspension.clone(),
        sync_window: observed.sync_window.clone(),
        stacks,
        services,
    };
    match hold(env, observed) {
        None => plan,
        Some((by, why)) => held(plan, by, &why),
    }
}

/// Why nothing may be written to the environment, if so: observe mode, or
/// a suspension.
fn hold(env: &DesiredEnv, observed: &Observed) -> Option<(BlockedBy, String)> {
    if let Some(s) = &observed.suspension {
        return Some((BlockedBy::Suspended, s.describe()));
    }
    if let Some(w) = &observed.sync_window
        && !w.open
        && !w.ignored
    {
        return Some((BlockedBy::SyncWindow, crate::window::HELD.to_owned()));
    }
    (env.policy.mode == Mode::Observe).then(|| (BlockedBy::ObserveMode, "observe mode".into()))
}

/// A hold applied once to the plan converge mode would make: every action
/// that writes becomes blocked, its reason kept.
fn held(mut plan: Plan, by: BlockedBy, why: &str) -> Plan {
    for s in &mut plan.stacks {
        hold_stack(s, by, why);
    }
    for s in plan.services.iter_mut().filter(|s| s.action.mutates()) {
        s.reason = format!("{}; {why}", s.reason);
        s.action = ServiceAction::Blocked {
            by,
            reason: why.to_owned(),
        };
    }
    plan
}

fn hold_stack(s: &mut StackPlan, by: BlockedBy, why: &str) {
    if s.action.mutates() {
        s.reason = format!("{}; {why}", s.reason);
        s.action = StackAction::Blocked {
            by,
            reason: why.to_owned(),
        };
    }
}

/// One declared stack's plan, as [`plan`] makes it, from an observation
/// that holds at least the stack and its upstreams, and its upstreams'
/// plans (by key). A pass re-plans a stack before acting this way: the work
/// is the stack's, not the environment's.
pub fn plan_one(
    env: &DesiredEnv,
    stack: &DesiredStack,
    observed: &Observed,
    upstreams: &BTreeMap<String, StackPlan>,
) -> StackPlan {
    let wave = env
        .wave_of(&stack.key)
        .expect("every declared stack is in a wave");
    let mut p = plan_stack(env, stack, wave, observed, upstreams);
    if let Some((by, why)) = hold(env, observed) {
        hold_stack(&mut p, by, &why);
    }
    p
}

/// The upstream stacks that are not ready for their dependents, and why.
fn upstream_not_ready(
    stack: &DesiredStack,
    done: &BTreeMap<String, StackPlan>,
) -> Vec<(String, String)> {
    stack
        .depends_on
        .iter()
        .filter_map(|dep| {
            let p = &done[dep];
            let ready = p.health == Health::Healthy || p.health == Health::Degraded;
            if ready && p.action == StackAction::None {
                return None;
            }
            let why = match &p.action {
                StackAction::Create => format!("{dep} will be created first"),
                StackAction::Update { .. } => format!("{dep} will be updated first"),
                StackAction::Wait { status } => format!("waiting on {dep}: {status}"),
                StackAction::None => format!(
                    "{dep} is not ready ({})",
                    p.status
                        .as_ref()
                        .map(StackStatus::as_str)
                        .unwrap_or("missing")
                ),
                other => format!("{dep} is {} ({})", other.label(), p.reason),
            };
            Some((dep.clone(), why))
        })
        .collect()
}

/// A live stack, classified once from its status: the one place that
/// knows what each CloudFormation status means for a decision.
#[derive(Debug, Clone, Copy)]
enum Live<'a> {
    /// No stack (or a deleted one), or a REVIEW_IN_PROGRESS placeholder
    /// that only holds an unexecuted CREATE change set.
    Missing(Option<&'a Stack>),
    /// Someone's operation is in flight.
    InFlight(&'a Stack),
    /// Stopped in a failed state.
    Failed(&'a Stack, Failure),
    /// Stable: its outputs are final. `cleaning`: an update completed and
    /// is deleting what it replaced. `rolled_back`: the last update (or
    /// import) rolled back to the previous state.
    Stable {
        stack: &'a Stack,
        cleaning: bool,
        rolled_back: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// ROLLBACK_COMPLETE: the creation failed and was rolled back.
    CreateRolledBack,
    /// ROLLBACK_FAILED: the creation failed and so did its rollback.
    CreateRollbackFailed,
    /// CREATE_FAILED or UPDATE_FAILED: an operation with rollback disabled
    /// ("preserve successfully provisioned resources") failed.
    NoRollback { creation: bool },
    /// UPDATE_ROLLBACK_FAILED.
    UpdateRollbackFailed,
    /// DELETE_FAILED, IMPORT_ROLLBACK_FAILED, or a status AWS added after
    /// this was written: a person looks at it, it is never called healthy.
    Other,
}

fn classify(live: Option<&Stack>) -> Live<'_> {
    use StackStatus as S;
    let Some(s) = live else {
        return Live::Missing(None);
    };
    let stable = |cleaning, rolled_back| Live::Stable {
        stack: s,
        cleaning,
        rolled_back,
    };
    match &s.status {
        S::DeleteComplete => Live::Missing(None),
        S::ReviewInProgress => Live::Missing(Some(s)),
        S::UpdateCompleteCleanupInProgress => stable(true, false),
        status if status.in_progress() => Live::InFlight(s),
        S::CreateComplete | S::UpdateComplete | S::ImportComplete => stable(false, false),
        S::UpdateRollbackComplete | S::ImportRollbackComplete => stable(false, true),
        S::RollbackComplete => Live::Failed(s, Failure::CreateRolledBack),
        S::RollbackFailed => Live::Failed(s, Failure::CreateRollbackFailed),
        S::CreateFailed => Live::Failed(s, Failure::NoRollback { creation: true }),
        S::UpdateFailed => Live::Failed(s, Failure::NoRollback { creation: false }),
        S::UpdateRollbackFailed => Live::Failed(s, Failure::UpdateRollbackFailed),
        _ => Live::Failed(s, Failure::Other),
    }
}

fn plan_stack(
    env: &DesiredEnv,
    stack: &DesiredStack,
    wave: usize,
    observed: &Observed,
    done: &BTreeMap<String, StackPlan>,
) -> StackPlan {
    let mut p = StackPlan {
        key: Some(stack.key.clone()),
        name: stack.name.clone(),
        wave,
        status: None,
        sync: Sync::Unknown,
        health: Health::Absent,
        action: StackAction::None,
        reason: String::new(),
        diff: None,
        drift: None,
    };
    let not_ready = upstream_not_ready(stack, done);
    // An upstream that will not change in this pass (failed, blocked, in
    // someone else's hands) stops this stack; one that is about to be
    // created or updated only orders it.
    let blocked_upstream = not_ready.iter().find(|(dep, _)| {
        !matches!(
            done[dep].action,
            StackAction::Create | StackAction::Update { .. }
        )
    });
    let upstream = not_ready.first();
    let failed_here = observed.failed_revisions.get(&stack.name) == Some(&stack.revision);

    // What the last detection found holds whatever the stack is doing now.
    p.drift = observed
        .stacks
        .get(&stack.name)
        .and_then(|live| stack_drift(stack, live, observed));
    let (live, cleaning, rolled_back) = match classify(observed.stacks.get(&stack.name)) {
        Live::Missing(placeholder) => {
            p.sync = Sync::Missing;
            p.status = placeholder.map(|s| s.status.clone());
            (p.action, p.reason) = if let Some((dep, why)) = blocked_upstream {
                (
                    StackAction::Skip {
                        upstream: dep.clone(),
                    },
                    format!("does not exist; {why}"),
                )
            } else if upstream.is_some() {
                let pending: Vec<&str> = not_ready.iter().map(|(d, _)| d.as_str()).collect();
                (
                    StackAction::Create,
                    format!(
                        "does not exist; created once {} complete",
                        pending.join(", ")
                    ),
                )
            } else {
                (StackAction::Create, "does not exist".into())
            };
            return p;
        }
        Live::InFlight(live) => {
            p.status = Some(live.status.clone());
            p.health = Health::Progressing;
            p.action = StackAction::Wait {
                status: live.status.clone(),
            };
            p.reason = format!("{} in flight; never start a second operation", live.status);
            return p;
        }
        Live::Failed(live, failure) => {
            p.status = Some(live.status.clone());
            p.health = Health::Failed;
            p.sync = Sync::OutOfSync;
            (p.action, p.reason) = plan_failed(env, stack, live, failure, failed_here, observed);
            return p;
        }
        Live::Stable {
            stack: live,
            cleaning,
            rolled_back,
        } => (live, cleaning, rolled_back),
    };
    p.status = Some(live.status.clone());

    // Degraded when the last update rolled back; failed when it was
    // stackwarden's update to this very revision (it needs a decision: a new
    // revision, and its dependents wait for it).
    p.health = match (rolled_back, failed_here) {
        (false, _) => Health::Healthy,
        (true, true) => Health::Failed,
        (true, false) => Health::Degraded,
    };
    let parameters = match resolve_parameters(stack, env, observed) {
        Ok(r) => r,
        Err((dep, why)) => {
            p.sync = Sync::Unknown;
            p.action = StackAction::Skip { upstream: dep };
            p.reason = format!("cannot resolve parameters: {why}");
            return p;
        }
    };
    let revert = revert_drift(
        stack,
        p.drift.as_ref(),
        observed,
        rolled_back && failed_here,
    );
    let tags = stack.tags_with_ownership(&env.name);
    let diff = diff_stack(
        stack,
        &parameters,
        &tags,
        live,
        observed.templates.get(&stack.name),
    );
    if diff.is_empty() {
        let drift = p.drift.as_ref().filter(|d| d.drifted());
        match (&revert, drift) {
            (Ok(lines), Some(_)) if upstream.is_none() && !cleaning => {
                p.sync = Sync::OutOfSync;
                p.action = StackAction::Update {
                    what: vec!["resource drift".into()],
                    revert_drift: true,
                };
                p.reason = format!(
                    "resource drift, reverted with a drift-aware change set: {}",
                    lines.join("; ")
                );
            }
            (_, Some(d)) => {
                let why = match &revert {
                    Err(Some(w)) => format!("; {w}"),
                    Err(None) => String::new(),
                    Ok(_) => match &upstream {
                        Some((_, up)) => format!("; reverted once {up}"),
                        None => "; reverted once the last update's cleanup ends".into(),
                    },
                };
                p.sync = Sync::InSync;
                p.reason = format!(
                    "in sync, but resources drifted ({}){why}",
                    d.lines().join("; ")
                );
            }
            _ => {
                p.sync = Sync::InSync;
                p.reason = if p.health == Health::Degraded {
                    "in sync, but the last update rolled back".into()
                } else {
                    "in sync".into()
                };
            }
        }
        return p;
    }
    p.sync = Sync::OutOfSync;
    let what = diff.summary();
    let summary = what.join(", ");
    p.diff = Some(diff);
    (p.action, p.reason) = if cleaning {
        // Its outputs are final and dependents may go on, but it takes no
        // new operation until the cleanup ends.
        (
            StackAction::Wait {
                status: live.status.clone(),
            },
            format!("differs: {summary}; the last update is still cleaning up"),
        )
    } else if rolled_back && failed_here {
        (
            StackAction::Blocked {
                by: BlockedBy::FailedRevision,
                reason: format!(
                    "update to revision {} failed and rolled back",
                    stack.revision
                ),
            },
            format!(
                "differs: {summary}; the update to this revision rolled back: change the desired state to retry"
            ),
        )
    } else if let Some((dep, why)) = &upstream {
        (
            StackAction::Skip {
                upstream: dep.clone(),
            },
            format!("differs: {summary}; {why}"),
        )
    } else {
        let revert_drift = revert.is_ok();
        let mut what = what;
        if revert_drift {
            what.push("resource drift".into());
        }
        (
            StackAction::Update { what, revert_drift },
            format!("differs: {summary}"),
        )
    };
    p
}

/// The stack's drift from its latest detection, judged by its settings;
/// `None` while it was never checked.
fn stack_drift(
    stack: &DesiredStack,
    live: &Stack,
    observed: &Observed,
) -> Option<crate::drift::StackDrift> {
    use crate::cloud::DriftStatus;
    let checked = live.drift.last_check?;
    let drifts = observed
        .resource_drifts
        .get(&stack.name)
        .map_or(&[][..], Vec::as_slice);
    let mut d = crate::drift::assess(stack, &stack.drift, Some(checked), None, drifts);
    d.stale = crate::drift::outdated(live, drifts, Some(checked));
    if let Some(e) = observed.drift_errors.get(&stack.name) {
        d.status = DriftStatus::Unknown;
        d.detection_failed = Some(format!("cannot read the detection's results: {e}"));
    } else if live.drift.status == DriftStatus::Unknown {
        d.status = DriftStatus::Unknown;
    }
    Some(d)
}

/// Whether the stack's drift is to be reverted, with what (one line per
/// property); `Err` with why not, when there is drift that stays
/// (`Err(None)`: alert mode, nothing to say).
fn revert_drift(
    stack: &DesiredStack,
    drift: Option<&crate::drift::StackDrift>,
    observed: &Observed,
    failed_here: bool,
) -> Result<Vec<String>, Option<String>> {
    let Some(drift) = drift.filter(|d| d.drifted()) else {
        return Err(None);
    };
    if stack.drift.mode != crate::drift::DriftMode::Revert {
        return Err(None);
    }
    if stack
        .template
        .resources
        .values()
        .any(|r| crate::cloud::NESTED_STACK_TYPES.contains(&r.kind.as_str()))
    {
        return Err(Some(
            "not reverted: drift-aware change sets do not support nested stacks".into(),
        ));
    }
    if failed_here {
        return Err(Some(
            "not reverted: the update to this revision rolled back".into(),
        ));
    }
    if drift.stale {
        return Err(Some(
            "not reverted yet: the stack changed since the detection began; the next detection tells"
                .into(),
        ));
    }
    // A drift-aware change set writes back every drifted property of the
    // stack: ignored drift would be reverted with the rest.
    if !drift.ignored.is_empty() {
        return Err(Some(format!(
            "not reverted: a drift-aware change set would also revert ignored drift ({})",
            drift.ignored.join(", ")
        )));
    }
    let lines: Vec<String> = drift
        .revertible()
        .filter(|(r, d)| {
            !observed.revert_attempted.contains(&(
                stack.name.clone(),
                r.logical_id.clone(),
                d.path.clone(),
            ))
        })
        .map(|(r, d)| format!("{} {}", r.logical_id, d.describe()))
        .collect();
    if lines.is_empty() {
        let tried = drift.revertible().count();
        return Err(Some(if tried > 0 {
            "a revert already ran and a detection since still finds it: not tried again".into()
        } else {
            "nothing revertible (create-only properties are not reverted by CloudFormation)".into()
        }));
    }
    Ok(lines)
}

/// What to do about a stack stopped in a failed state, and why.
fn plan_failed(
    env: &DesiredEnv,
    stack: &DesiredStack,
    live: &Stack,
    failure: Failure,
    failed_here: bool,
    observed: &Observed,
) -> (StackAction, String) {
    let why = live
        .status_reason
        .clone()
        .unwrap_or_else(|| "no reason given".into());
    let blocked =
        |by, reason: String, explained: String| (StackAction::Blocked { by, reason }, explained);
    let protected = policy::holds_protected(&stack.template, &env.policy);
    match failure {
        Failure::CreateRolledBack if failed_here => blocked(
            BlockedBy::FailedRevision,
            format!("creation of revision {} failed: {why}", stack.revision),
            format!(
                "creation of this revision failed: {why}; not retried: push a new revision (with policy.recreate_failed) or delete the stack"
            ),
        ),
        Failure::CreateRolledBack
            if env.policy.recreate_failed && !protected && !live.termination_protection =>
        {
            (
                StackAction::Recreate,
                format!("creation failed ({why}); policy.recreate_failed: delete and create again"),
            )
        }
        Failure::CreateRolledBack | Failure::CreateRollbackFailed => blocked(
            BlockedBy::FailedState,
            format!("creation failed: {why}"),
            if protected {
                format!(
                    "creation failed: {why}; holds protected resources, never recreated automatically"
                )
            } else {
                format!("creation failed: {why}; set policy.recreate_failed or delete the stack")
            },
        ),
        Failure::NoRollback { creation } => {
            let op = if creation { "creation" } else { "update" };
            blocked(
                BlockedBy::FailedState,
                format!("{op} failed with rollback disabled: {why}"),
                format!(
                    "{op} failed with rollback disabled (resources that succeeded are kept): {why}; \
                     roll it back (`stackwarden rollback -e {} --stack {}`) or fix forward \
                     (correct the cause, then update the stack)",
                    env.name, stack.key
                ),
            )
        }
        Failure::UpdateRollbackFailed if env.policy.continue_rollback => continue_rollback(
            env,
            stack,
            observed.rollback_episodes.get(&stack.name),
            &why,
        ),
        Failure::UpdateRollbackFailed => blocked(
            BlockedBy::FailedState,
            format!("rollback failed: {why}"),
            format!(
                "rollback failed: {why}; set policy.continue_rollback or run `stackwarden rollback -e {} --stack {}` (with `--skip {}.<LogicalId>` for a resource that cannot roll back)",
                env.name, stack.key, stack.key
            ),
        ),
        Failure::Other => blocked(
            BlockedBy::FailedState,
            format!("{}: {why}", live.status),
            format!("{}: {why}; needs a person", live.status),
        ),
    }
}

fn plan_service(
    env: &DesiredEnv,
    stack: &DesiredStack,
    spec: &crate::spec::EcsServiceSpec,
    observed: &Observed,
    stack_plan: &StackPlan,
) -> ServicePlan {
    let cluster = resolve(&spec.cluster, env, observed).ok();
    let service = resolve(&spec.service, env, observed).ok();
    let mut p = ServicePlan {
        stack: stack.key.clone(),
        cluster: cluster.clone(),
        service: service.clone(),
        sync: Sync::Unknown,
        health: Health::Absent,
        action: ServiceAction::None,
        reason: String::new(),
        running: None,
        desired: None,
    };
    if stack_plan.action != StackAction::None {
        p.action = ServiceAction::Wait {
            reason: format!("stack {} first ({})", stack.key, stack_plan.action.label()),
        };
        p.reason = "converged after its stack".into();
        if let (Some(c), Some(s)) = (&cluster, &service)
            && let Some(live) = observed.services.get(&(c.clone(), s.clone()))
        {
            p.health = service_health(live);
            p.running = Some(live.running);
            p.desired = Some(live.desired);
        }
        return p;
    }
    let (Some(c), Some(s)) = (cluster, service) else {
        p.action = ServiceAction::Wait {
            reason: "names not known yet".into(),
        };
        p.reason = "its stack has no outputs naming it yet".into();
        return p;
    };
    let Some(live) = observed.services.get(&(c, s)) else {
        p.sync = Sync::Missing;
        p.health = Health::Absent;
        p.reason = "service not found in its cluster".into();
        p.action = ServiceAction::Blocked {
            by: BlockedBy::ServiceMissing,
            reason: "service not found; its stack should own it".into(),
        };
        return p;
    };
    p.running = Some(live.running);
    p.desired = Some(live.desired);
    p.health = service_health(live);
    let target = match (spec.autoscaling, spec.desired_count) {
        (Some(a), _) => {
            let (min, max) = (a.min as i32, a.max as i32);
            (live.desired < min || live.desired > max).then(|| live.desired.clamp(min, max))
        }
        (None, Some(d)) => (live.desired != d as i32).then_some(d as i32),
        (None, None) => None,
    };
    let expected_td = redeploy_target(spec, env, observed, live);
    if target.is_none() && expected_td.is_none() {
        p.sync = Sync::InSync;
        p.reason = health_reason(live);
        return p;
    }
    // Never a second deployment on top of one in flight (ours, a stack
    // update's, or someone else's): look again when it has settled.
    if live.deploying() {
        p.sync = Sync::OutOfSync;
        p.action = ServiceAction::Wait {
            reason: "a deployment is in progress".into(),
        };
        p.reason =
            "differs, but a deployment is in progress; looked at again once it settles".into();
        return p;
    }
    // A redeploy of this task definition for this revision rolled back
    // (the circuit breaker returned to the last good one): retrying would
    // loop forever against production.
    if target.is_none()
        && let Some(td) = &expected_td
        && observed
            .failed_redeploys
            .contains(&(stack.revision.clone(), td.clone()))
    {
        p.sync = Sync::OutOfSync;
        p.health = Health::Degraded;
        p.action = ServiceAction::Blocked {
            by: BlockedBy::FailedRevision,
            reason: format!("the redeploy of {td} rolled back"),
        };
        p.reason = format!(
            "runs {}; the redeploy of {td} for revision {} rolled back; not retried until the desired state changes",
            live.task_definition, stack.revision
        );
        return p;
    }
    (p.sync, p.action, p.reason) = match (target, expected_td) {
        (None, None) => (Sync::InSync, ServiceAction::None, health_reason(live)),
        (Some(to), _) => (
            Sync::OutOfSync,
            ServiceAction::Scale {
                from: live.desired,
                to,
            },
            match spec.autoscaling {
                Some(a) => format!(
                    "desired count {} outside autoscaling range {}..={}",
                    live.desired, a.min, a.max
                ),
                None => format!("desired count {} -> {to}", live.desired),
            },
        ),
        (None, Some(td)) => (
            Sync::OutOfSync,
            ServiceAction::Redeploy {
                task_definition: td.clone(),
            },
            format!("runs {}, its stack declares {td}", live.task_definition),
        ),
    };
    p
}

/// The task definition the service's stack declares, when the service
/// runs another one: what a redeploy would deploy.
pub fn redeploy_target(
    spec: &crate::spec::EcsServiceSpec,
    env: &DesiredEnv,
    observed: &Observed,
    live: &Service,
) -> Option<String> {
    spec.task_definition
        .as_ref()
        .and_then(|v| resolve(v, env, observed).ok())
        .filter(|td| !td.is_empty() && *td != live.task_definition)
}

fn service_health(s: &Service) -> Health {
    match s.primary().and_then(|d| d.rollout_state.as_deref()) {
        Some("FAILED") => Health::Degraded,
        Some("IN_PROGRESS") => Health::Progressing,
        _ if s.deployments.len() > 1 => Health::Progressing,
        _ if s.running < s.desired => Health::Degraded,
        _ => Health::Healthy,
    }
}

fn health_reason(s: &Service) -> String {
    match service_health(s) {
        Health::Healthy => format!("in sync; {}/{} tasks running", s.running, s.desired),
        Health::Progressing => format!(
            "deployment in progress; {}/{} running",
            s.running, s.desired
        ),
        _ => match s.primary().and_then(|d| d.rollout_reason.clone()) {
            Some(r) if s.primary().and_then(|d| d.rollout_state.as_deref()) == Some("FAILED") => {
                format!("rollout failed: {r}")
            }
            _ => format!("only {}/{} tasks running", s.running, s.desired),
        },
    }
}
