//! An in-memory simulated AWS implementing [`Cloud`], for tests, the
//! benchmarks and anything the emulator cannot do: failed and rolled-back
//! stacks, slow operations, throttling, stuck stacks, out-of-band edits.
//!
//! Time is tokio's clock, so tests on a paused clock run hours of simulated
//! operations instantly. State advances lazily: every call first completes
//! the operations whose time has come. One seed drives every random choice
//! (throttling), so a seed replays exactly.
//!
//! The simulation also watches stackwarden: starting a second operation on a
//! stack that is busy, or executing a change set that replaces a resource of
//! a protected type, is recorded in [`SimCloud::violations`] (and refused as
//! AWS refuses the first).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::Value as Json;
use tokio::time::Instant;

use super::{
    ChangeAction, ChangeSet, ChangeSetKind, ChangeSetRequest, ChangeSetStatus, ChangeSetSummary,
    Cloud, CloudError, CloudResult, Deployment, Detection, DetectionStatus, DifferenceKind,
    DriftStatus, FailedDeployment, PropertyDifference, Replacement, ResourceChange, ResourceDrift,
    ResourceDriftStatus, Service, Stack, StackEvent, StackStatus,
};
use crate::template::{Template, references_parameter};

pub use super::sim_truth::cfnlint_data_dir;

/// Realistic operation times of the service's stacks, in minutes (creating
/// an MSK cluster takes 25): for simulations that should feel like AWS.
pub const SERVICE_MINUTES: [(&str, u64); 8] = [
    ("network", 4),
    ("dynamodb", 2),
    ("msk", 25),
    ("elasticache", 12),
    ("iam", 1),
    ("alb", 4),
    ("ecs-cluster", 2),
    ("service", 6),
];

/// Per stack name, the latency of each `(stack key, minutes)` of `minutes`
/// for the stacks of `env` (as [`SimConfig::latency`] wants it).
pub fn latencies(
    env: &crate::spec::DesiredEnv,
    minutes: &[(&str, u64)],
) -> BTreeMap<String, Duration> {
    minutes
        .iter()
        .filter_map(|(k, m)| {
            Some((
                env.stacks.get(*k)?.name.clone(),
                Duration::from_secs(m * 60),
            ))
        })
        .collect()
}

/// Knobs of the simulation. Latencies are per stack name; unlisted stacks
/// take `default_latency`.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub account: String,
    pub default_latency: Duration,
    pub latency: BTreeMap<String, Duration>,
    pub change_set_latency: Duration,
    /// Probability that any call is throttled.
    pub throttle_rate: f64,
    /// Change sets give no replacement information (as the emulator), so
    /// safety must come from policy's own forecast.
    pub hide_replacement: bool,
    /// How long an ECS deployment of a new task definition takes to finish
    /// (or to trip the circuit breaker and roll back).
    pub rollout_latency: Duration,
    /// After a successful update, the stack spends this long in
    /// UPDATE_COMPLETE_CLEANUP_IN_PROGRESS (deleting replaced resources)
    /// before UPDATE_COMPLETE, as on AWS.
    pub cleanup_latency: Duration,
    /// How long a drift detection runs before it ends (DetectStackDrift
    /// "can take up to several minutes").
    pub drift_detection_latency: Duration,
    /// The simulated wall clock at the simulation's start (then tokio's
    /// pace): tests of dates (sync windows across a daylight-saving change)
    /// start where they need.
    pub wall_clock_start: SystemTime,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            seed: 0,
            account: "123456789012".into(),
            default_latency: Duration::from_secs(30),
            latency: BTreeMap::new(),
            change_set_latency: Duration::from_secs(2),
            throttle_rate: 0.0,
            hide_replacement: false,
            cleanup_latency: Duration::ZERO,
            rollout_latency: Duration::from_secs(120),
            drift_detection_latency: Duration::from_secs(90),
            // 2026-01-01T00:00:00Z.
            wall_clock_start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600),
        }
    }
}

/// An ECS deployment of a new task definition, until it settles.
#[derive(Debug, Clone)]
struct Rollout {
    task_definition: String,
    /// What the service ran before: the circuit breaker rolls back to it.
    previous: String,
    done_at: Instant,
    /// When the deployment was created, on the simulated wall clock.
    created: SystemTime,
}

#[derive(Debug, Clone)]
struct Operation {
    /// The status to reach when the operation ends (CREATE_COMPLETE, ...).
    target: &'static str,
    done_at: Instant,
    /// Applied when the operation succeeds.
    apply: Option<Applied>,
}

#[derive(Debug, Clone)]
struct Applied {
    /// The change set whose execution this is.
    change_set: String,
    template_body: String,
    parameters: BTreeMap<String, String>,
    tags: BTreeMap<String, String>,
    /// A drift-aware change set: drifted properties are written back.
    revert_drift: bool,
}

/// A drift detection of one stack.
#[derive(Debug, Clone)]
struct SimDetection {
    stack: String,
    done_at: Instant,
    /// Ends DETECTION_FAILED with this reason, having checked only the
    /// first half of the resources.
    fail: Option<String>,
    /// Set when it ended.
    result: Option<(DriftStatus, i32)>,
}

#[derive(Debug, Clone)]
struct SimStack {
    stack: Stack,
    template_body: String,
    operation: Option<Operation>,
    events: Vec<StackEvent>,
    change_sets: BTreeMap<String, SimChangeSet>,
}

#[derive(Debug, Clone)]
struct SimChangeSet {
    request: ChangeSetRequest,
    ready_at: Instant,
    changes: Vec<ResourceChange>,
    executed: bool,
    /// On the simulation's clock ([`SimCloud::now`]).
    created: SystemTime,
    /// Unique per creation, as AWS's change-set ARNs are: a change set made
    /// anew under the same name is another change set.
    id: String,
}

#[derive(Debug, Default)]
struct State {
    stacks: BTreeMap<String, SimStack>,
    /// No stack operation ends before this (`None`: not known, look). Every
    /// call advances the simulation; with thousands of stacks, scanning
    /// them all on each call made the simulation, not stackwarden, the
    /// cost of a large pass. Forgotten by every call that may start one.
    next_due: Option<Instant>,
    services: BTreeMap<(String, String), Service>,
    fail_next: BTreeSet<String>,
    stuck: BTreeSet<String>,
    calls: BTreeMap<&'static str, u64>,
    violations: Vec<String>,
    executed: Vec<(String, Vec<ResourceChange>)>,
    deleted: Vec<String>,
    next_id: u64,
    throttle_rate: f64,
    throttled: u64,
    /// (stack name, logical id) the test's desired state allows to replace.
    allowed: BTreeSet<(String, String)>,
    /// See [`SimConfig::cleanup_latency`].
    cleanup_latency: Duration,
    /// See [`SimConfig::rollout_latency`].
    rollout_latency: Duration,
    /// By (stack, nested stack's logical id): what changes inside that
    /// nested stack in every change set of the stack (`None`: its nested
    /// change set cannot be described).
    nested_plans: BTreeMap<(String, String), Option<Vec<ResourceChange>>>,
    /// Nested change sets by id, with their changes.
    nested_sets: BTreeMap<String, Vec<ResourceChange>>,
    /// After an UpdateService, this many DescribeServices still answer with
    /// the service as it was (see [`SimCloud::stale_reads_after_update`]).
    stale_reads: usize,
    stale_services: BTreeMap<(String, String), (usize, Service)>,
    /// ExecuteChangeSet tokens seen, with the change set they executed.
    execute_tokens: BTreeMap<String, (String, String)>,
    /// Operations whose next call acts and then loses its answer.
    lost_answers: BTreeSet<&'static str>,
    /// By stack: resources that fail to roll back (see
    /// [`SimCloud::fail_update_rollback`]).
    rollback_blockers: BTreeMap<String, Vec<String>>,
    /// By stack: the resources the rollback in flight will fail on.
    rollback_failing: BTreeMap<String, Vec<String>>,
    /// ECS deployments in flight, by (cluster, service).
    rollouts: BTreeMap<(String, String), Rollout>,
    /// Task definitions whose tasks never start: a deployment of one trips
    /// the circuit breaker.
    broken_task_definitions: BTreeSet<String>,
    /// Listing stacks fails from the moment this many stacks exist with
    /// no operation in flight (the network goes away after the work).
    outage_once_stable: Option<usize>,
    /// When the simulation began (see [`SimCloud::now`]); set at creation.
    epoch: Option<Instant>,
    /// The wall clock at `epoch` (see [`SimConfig::wall_clock_start`]).
    wall_clock_start: Option<SystemTime>,
    /// ECS's service deployment history, by (cluster, service).
    deployment_history: BTreeMap<(String, String), Vec<PastDeployment>>,
    /// S3 buckets (name to region) and their objects, by (bucket, key).
    buckets: BTreeMap<String, String>,
    objects: BTreeMap<(String, String), String>,
    /// Out-of-band edits by (stack, logical id): property path (as drift
    /// detection writes it, `/VisibilityTimeout`) to the live value.
    edits: BTreeMap<(String, String), BTreeMap<String, String>>,
    /// Drift detections by id.
    detections: BTreeMap<String, SimDetection>,
    /// By stack: the resources of its latest ended detection.
    resource_drifts: BTreeMap<String, Vec<ResourceDrift>>,
    /// By stack: its next detection fails with this reason.
    fail_detection: BTreeMap<String, String>,
    /// The most detections ever running at once.
    detections_in_flight_max: usize,
}

/// A finished ECS service deployment: when it was created, how it ended
/// (`SUCCESSFUL`, `ROLLBACK_SUCCESSFUL`), the task definition it was to run.
type PastDeployment = (SystemTime, &'static str, String);

/// The simulated wall clock: `SimConfig::wall_clock_start` at the
/// simulation's start, then tokio's pace, so paused-clock tests age things.
fn wall_clock(st: &State, now: Instant) -> SystemTime {
    let start = st.epoch.unwrap_or(now);
    st.wall_clock_start.unwrap_or(SystemTime::UNIX_EPOCH) + now.saturating_duration_since(start)
}

/// The simulated cloud. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct SimCloud {
    config: Arc<SimConfig>,
    state: Arc<Mutex<State>>,
    rng: Arc<Mutex<StdRng>>,
}

impl SimCloud {
    pub fn new(config: SimConfig) -> SimCloud {
        SimCloud {
            rng: Arc::new(Mutex::new(StdRng::seed_from_u64(config.seed))),
            state: Arc::new(Mutex::new(State {
                next_due: None,
                throttle_rate: config.throttle_rate,
                cleanup_latency: config.cleanup_latency,
                rollout_latency: config.rollout_latency,
                epoch: Some(Instant::now()),
                wall_clock_start: Some(config.wall_clock_start),
                ..State::default()
            })),
            config: Arc::new(config),
        }
    }

    /// Tells the watcher that the desired state allows replacing this
    /// resource, so executing such a change is not a violation.
    pub fn allow_replacement(&self, stack: &str, logical_id: &str) {
        self.lock()
            .allowed
            .insert((stack.to_owned(), logical_id.to_owned()));
    }

    /// Makes an S3 bucket in `region`, for artifact uploads.
    pub fn create_bucket(&self, name: &str, region: &str) {
        self.lock()
            .buckets
            .insert(name.to_owned(), region.to_owned());
    }

    /// An object of a bucket, as uploaded.
    pub fn object(&self, bucket: &str, key: &str) -> Option<String> {
        self.lock()
            .objects
            .get(&(bucket.to_owned(), key.to_owned()))
            .cloned()
    }

    /// Changes the probability that a call is throttled (0 stops throttling).
    pub fn set_throttle_rate(&self, rate: f64) {
        self.lock().throttle_rate = rate;
    }

    /// From the moment `stacks` stacks exist and none has an operation in
    /// flight, every DescribeStacks listing fails as a lost connection:
    /// the observation after a pass's work fails, the work itself does not.
    pub fn lose_network_once_stable(&self, stacks: usize) {
        self.lock().outage_once_stable = Some(stacks);
    }

    /// Forgets pending failures and unsticks every stack: the faults stop.
    pub fn clear_faults(&self) {
        let mut st = self.lock();
        st.fail_next.clear();
        st.stuck.clear();
        st.throttle_rate = 0.0;
        st.outage_once_stable = None;
    }

    /// Someone else starts an update of `stack` (a console or CLI user); it
    /// ends after `takes`, changing nothing stackwarden manages.
    pub fn start_foreign_update(&self, stack: &str, takes: Duration) {
        let now = Instant::now();
        let mut st = self.lock();
        advance(&mut st, now);
        st.next_due = None;
        let s = st.stacks.get_mut(stack).expect("unknown stack");
        // Only a stable, updatable stack can be updated (AWS refuses the rest).
        let updatable = matches!(
            s.stack.status.as_str(),
            "CREATE_COMPLETE" | "UPDATE_COMPLETE" | "UPDATE_ROLLBACK_COMPLETE"
        );
        if s.operation.is_some() || !updatable {
            return;
        }
        s.stack.status = StackStatus::UpdateInProgress;
        s.operation = Some(Operation {
            target: "UPDATE_COMPLETE",
            done_at: now + takes,
            apply: None,
        });
    }

    /// An operator deletes a stack by hand (no termination-protection check:
    /// they would have turned it off first).
    pub fn delete_out_of_band(&self, stack: &str) {
        self.lock().stacks.remove(stack);
    }

    /// The primary deployment of a service fails (the ECS circuit breaker
    /// rolled it back).
    pub fn fail_rollout(&self, cluster: &str, service: &str, reason: &str) {
        let mut st = self.lock();
        let s = st
            .services
            .get_mut(&(cluster.to_owned(), service.to_owned()))
            .expect("unknown service");
        s.running = 0;
        for d in &mut s.deployments {
            d.rollout_state = Some("FAILED".into());
            d.rollout_reason = Some(reason.to_owned());
            d.running = 0;
        }
    }

    /// From now on, every change set of `stack` changes its nested stack
    /// `logical_id` (an `AWS::CloudFormation::Stack`), and the nested
    /// change set AWS makes for it (IncludeNestedStacks) holds `changes`;
    /// with `None`, the nested change set cannot be described.
    pub fn nest(&self, stack: &str, logical_id: &str, changes: Option<Vec<ResourceChange>>) {
        self.lock()
            .nested_plans
            .insert((stack.to_owned(), logical_id.to_owned()), changes);
    }

    /// ECS is eventually consistent: after each UpdateService, the next `n`
    /// DescribeServices of that service still show it as it was.
    pub fn stale_reads_after_update(&self, n: usize) {
        self.lock().stale_reads = n;
    }

    /// The next call of `op` (only ExecuteChangeSet is modelled) acts, and
    /// its answer is lost on the way back: the caller sees a transport
    /// error for a request AWS carried out.
    pub fn lose_next_answer(&self, op: &'static str) {
        self.lock().lost_answers.insert(op);
    }

    /// Someone changes a property of a stack's resource out of band (the
    /// console, the service's API): `path` as drift detection writes it
    /// (`/VisibilityTimeout`), `actual` the live value now. Detection
    /// reports it; a drift-aware change set writes the template's value
    /// back unless the property is create-only.
    pub fn edit_out_of_band(&self, stack: &str, logical_id: &str, path: &str, actual: &str) {
        self.lock()
            .edits
            .entry((stack.to_owned(), logical_id.to_owned()))
            .or_default()
            .insert(path.to_owned(), actual.to_owned());
    }

    /// The most drift detections that ever ran at once.
    pub fn max_detections_in_flight(&self) -> usize {
        self.lock().detections_in_flight_max
    }

    /// Someone puts a resource back as its template has it.
    pub fn clear_edits(&self, stack: &str, logical_id: &str) {
        self.lock()
            .edits
            .remove(&(stack.to_owned(), logical_id.to_owned()));
    }

    /// The out-of-band values still live on a resource, by property path.
    pub fn live_edits(&self, stack: &str, logical_id: &str) -> BTreeMap<String, String> {
        self.lock()
            .edits
            .get(&(stack.to_owned(), logical_id.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    /// The stack's next drift detection ends DETECTION_FAILED (as when
    /// reading a resource was throttled), having checked half the resources.
    pub fn fail_next_detection(&self, stack: &str, reason: &str) {
        self.lock()
            .fail_detection
            .insert(stack.to_owned(), reason.to_owned());
    }

    /// An update of `stack` fails and its rollback fails too, on
    /// `resources` (logical ids) that cannot be rolled back: the stack ends
    /// UPDATE_ROLLBACK_FAILED with the events AWS writes. A
    /// ContinueUpdateRollback fails again on them unless they are skipped.
    pub fn fail_update_rollback(&self, stack: &str, resources: &[&str]) {
        let mut st = self.lock();
        let ids: Vec<String> = resources.iter().map(|r| (*r).to_owned()).collect();
        push_event(
            &mut st,
            stack,
            stack,
            "AWS::CloudFormation::Stack",
            "UPDATE_IN_PROGRESS",
            Some("User Initiated".into()),
        );
        push_event(
            &mut st,
            stack,
            &ids[0],
            "AWS::EC2::Resource",
            "UPDATE_FAILED",
            Some("Resource handler returned message: update failed".into()),
        );
        push_event(
            &mut st,
            stack,
            stack,
            "AWS::CloudFormation::Stack",
            "UPDATE_ROLLBACK_IN_PROGRESS",
            Some("The following resource(s) failed to update".into()),
        );
        for id in &ids {
            push_event(
                &mut st,
                stack,
                id,
                "AWS::EC2::Resource",
                "UPDATE_FAILED",
                Some("Resource handler returned message: cannot roll back".into()),
            );
        }
        push_event(
            &mut st,
            stack,
            stack,
            "AWS::CloudFormation::Stack",
            "UPDATE_ROLLBACK_FAILED",
            Some("The following resource(s) failed to update".into()),
        );
        let s = st.stacks.get_mut(stack).expect("unknown stack");
        s.stack.status = StackStatus::UpdateRollbackFailed;
        s.stack.status_reason = Some("The following resource(s) failed to update".into());
        s.operation = None;
        st.rollback_blockers.insert(stack.to_owned(), ids);
    }

    /// Tasks of this task definition never start: a deployment of it trips
    /// the deployment circuit breaker, which (with `Rollback: true`, as the
    /// shipped service sets) rolls the service back to the task definition
    /// it ran before.
    pub fn break_task_definition(&self, task_definition: &str) {
        self.lock()
            .broken_task_definitions
            .insert(task_definition.to_owned());
    }

    /// Someone deploys `task_definition` to the service out of band (the
    /// console, another pipeline); it succeeds at once.
    pub fn deploy_out_of_band(&self, cluster: &str, service: &str, task_definition: &str) {
        let mut st = self.lock();
        let s = st
            .services
            .get_mut(&(cluster.to_owned(), service.to_owned()))
            .expect("unknown service");
        s.task_definition = task_definition.to_owned();
        for d in &mut s.deployments {
            d.task_definition = task_definition.to_owned();
        }
    }

    /// Names of a stack's change sets, as ListChangeSets would give them
    /// (not counted as a call).
    pub fn change_set_names(&self, stack: &str) -> Vec<String> {
        self.lock()
            .stacks
            .get(stack)
            .map(|s| s.change_sets.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The next update (or create) of `stack` fails and rolls back.
    pub fn fail_next_operation(&self, stack: &str) {
        self.lock().fail_next.insert(stack.to_owned());
    }

    /// Operations on `stack` never finish (until [`SimCloud::unstick`]).
    pub fn stick(&self, stack: &str) {
        self.lock().stuck.insert(stack.to_owned());
    }

    pub fn unstick(&self, stack: &str) {
        let mut st = self.lock();
        st.stuck.remove(stack);
        st.next_due = None;
    }

    /// Someone changes a parameter outside stackwarden (as a console edit).
    pub fn edit_parameter(&self, stack: &str, key: &str, value: &str) {
        let mut st = self.lock();
        let s = st.stacks.get_mut(stack).expect("edit of an unknown stack");
        s.stack.parameters.insert(key.to_owned(), value.to_owned());
    }

    /// Someone scales a service outside stackwarden.
    pub fn edit_desired_count(&self, cluster: &str, service: &str, desired: i32) {
        let mut st = self.lock();
        let s = st
            .services
            .get_mut(&(cluster.to_owned(), service.to_owned()))
            .expect("edit of an unknown service");
        s.desired = desired;
        s.running = desired;
    }

    /// Puts a stack in a status directly (for failure scenarios).
    pub fn force_status(&self, stack: &str, status: &str, reason: &str) {
        let mut st = self.lock();
        let s = st.stacks.get_mut(stack).expect("unknown stack");
        s.stack.status = status.into();
        s.stack.status_reason = Some(reason.to_owned());
        s.operation = None;
    }

    /// Calls per operation name.
    pub fn calls(&self) -> BTreeMap<&'static str, u64> {
        self.lock().calls.clone()
    }

    pub fn total_calls(&self) -> u64 {
        self.lock().calls.values().sum()
    }

    /// Write calls (anything but Describe/Get/List).
    /// Calls that change something (a drift detection changes nothing: it
    /// reads the resources, as a suspended environment is still read).
    pub fn write_calls(&self) -> u64 {
        self.lock()
            .calls
            .iter()
            .filter(|(k, _)| {
                !(k.starts_with("Describe")
                    || k.starts_with("Get")
                    || k.starts_with("List")
                    || **k == "DetectStackDrift")
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Invariant violations seen so far (empty when stackwarden behaved).
    pub fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }

    /// Executed change sets, in order, with their changes.
    pub fn executed(&self) -> Vec<(String, Vec<ResourceChange>)> {
        self.lock().executed.clone()
    }

    pub fn deleted(&self) -> Vec<String> {
        self.lock().deleted.clone()
    }

    /// A stack's current view, as DescribeStacks would show it.
    pub fn stack(&self, name: &str) -> Option<Stack> {
        let now = Instant::now();
        let mut st = self.lock();
        advance(&mut st, now);
        st.stacks.get(name).map(|s| s.stack.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts the call, maybe throttles it, and advances time-driven state.
    fn enter(&self, op: &'static str) -> CloudResult<std::sync::MutexGuard<'_, State>> {
        let rate = self.lock().throttle_rate;
        let throttled = rate > 0.0
            && self
                .rng
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .gen_bool(rate);
        let mut st = self.lock();
        *st.calls.entry(op).or_default() += 1;

        if throttled {
            st.throttled += 1;
            return Err(CloudError::Throttled(format!("{op}: Rate exceeded")));
        }
        advance(&mut st, Instant::now());
        // What the call does next may start an operation.
        if !["Describe", "List", "Get"]
            .iter()
            .any(|r| op.starts_with(r))
        {
            st.next_due = None;
        }
        Ok(st)
    }

    fn latency(&self, stack: &str) -> Duration {
        self.config
            .latency
            .get(stack)
            .copied()
            .unwrap_or(self.config.default_latency)
    }
}

/// The object an S3 https URL names (virtual-hosted or path style).
fn s3_object(st: &State, url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let (host, path) = rest.split_once('/')?;
    let (bucket, key) = match host.split_once(".s3.") {
        Some((bucket, _)) => (bucket, path),
        None => path.split_once('/')?,
    };
    st.objects
        .get(&(bucket.to_owned(), key.to_owned()))
        .cloned()
}

/// A template parsed once per distinct body: the simulation parses the
/// same few templates thousands of times over a many-seed test.
fn parsed(body: &str) -> Option<Arc<Template>> {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    static CACHE: OnceLock<Mutex<HashMap<String, Option<Arc<Template>>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(t) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(body) {
        return t.clone();
    }
    let t = Template::parse(body).ok().map(Arc::new);
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(body.to_owned(), t.clone());
    t
}

/// Appends an event to a stack's log (ids are global and increasing).
fn push_event(
    st: &mut State,
    stack: &str,
    logical_id: &str,
    kind: &str,
    status: &str,
    reason: Option<String>,
) {
    st.next_id += 1;
    let id = format!("ev-{}", st.next_id);
    let timestamp = wall_clock(st, Instant::now());
    if let Some(s) = st.stacks.get_mut(stack) {
        s.events.push(StackEvent {
            id,
            timestamp,
            logical_id: logical_id.to_owned(),
            resource_type: kind.to_owned(),
            status: status.to_owned(),
            reason,
        });
    }
}

/// Starts a rollback of `stack` (continued, asked for, or a cancelled
/// update): `status` now, `target` after `takes`, with the stack-level
/// event AWS writes.
fn roll_back(
    st: &mut State,
    stack: &str,
    status: &str,
    target: &'static str,
    takes: Duration,
    reason: &str,
) {
    if let Some(s) = st.stacks.get_mut(stack) {
        s.stack.status = status.into();
        s.operation = Some(Operation {
            target,
            done_at: Instant::now() + takes,
            apply: None,
        });
    }
    push_event(
        st,
        stack,
        stack,
        "AWS::CloudFormation::Stack",
        status,
        Some(reason.to_owned()),
    );
}

/// Completes every operation and ECS deployment whose time has come.
fn advance(st: &mut State, now: Instant) {
    advance_stacks(st, now);
    advance_rollouts(st, now);
    advance_detections(st, now);
}

/// Ends every drift detection whose time has come: compares each resource's
/// template properties with its out-of-band edits, as CloudFormation
/// compares the template with the live resource (only properties the
/// template sets; types without drift support are NOT_CHECKED).
fn advance_detections(st: &mut State, now: Instant) {
    let wall = wall_clock(st, now);
    let due: Vec<String> = st
        .detections
        .iter()
        .filter(|(_, d)| d.result.is_none() && d.done_at <= now)
        .map(|(id, _)| id.clone())
        .collect();
    for id in due {
        let d = st.detections[&id].clone();
        let Some(s) = st.stacks.get(&d.stack) else {
            continue;
        };
        let mut resources = Vec::new();
        if let Some(t) = parsed(&s.template_body) {
            let checkable = if d.fail.is_some() {
                t.resources.len() / 2
            } else {
                t.resources.len()
            };
            for (i, (logical, r)) in t.resources.iter().enumerate() {
                let edits = st.edits.get(&(d.stack.clone(), logical.clone()));
                let (status, differences) =
                    if i >= checkable || !super::sim_truth::drift_supported(&r.kind) {
                        (ResourceDriftStatus::NotChecked, vec![])
                    } else {
                        let differences: Vec<PropertyDifference> = edits
                            .into_iter()
                            .flatten()
                            .map(|(path, actual)| PropertyDifference {
                                path: path.clone(),
                                expected: template_value(&r.properties, path, &s.stack.parameters),
                                actual: Some(actual.clone()),
                                kind: DifferenceKind::NotEqual,
                            })
                            .collect();
                        if differences.is_empty() {
                            (ResourceDriftStatus::InSync, differences)
                        } else {
                            (ResourceDriftStatus::Modified, differences)
                        }
                    };
                resources.push(ResourceDrift {
                    logical_id: logical.clone(),
                    physical_id: Some(format!("{}-{logical}", d.stack)),
                    resource_type: r.kind.clone(),
                    status,
                    differences,
                    checked: Some(wall),
                });
            }
        }
        let drifted = resources.iter().filter(|r| r.status.drifted()).count();
        let status = if drifted > 0 {
            DriftStatus::Drifted
        } else {
            DriftStatus::InSync
        };
        st.detections.get_mut(&id).expect("listed").result = Some((status, drifted as i32));
        if let Some(s) = st.stacks.get_mut(&d.stack) {
            // A failed detection leaves the stack's drift status as it was.
            if d.fail.is_none() {
                s.stack.drift.status = status;
            }
        }
        st.resource_drifts.insert(d.stack.clone(), resources);
    }
}

/// The value a template gives the property at a drift path, as text
/// (`Ref` of a parameter resolved; anything else as JSON).
fn template_value(
    properties: &serde_json::Value,
    path: &str,
    parameters: &BTreeMap<String, String>,
) -> Option<String> {
    let mut v = properties;
    for seg in path.trim_start_matches('/').split('/') {
        v = match v {
            serde_json::Value::Array(items) => items.get(seg.parse::<usize>().ok()?)?,
            other => other.get(seg)?,
        };
    }
    Some(match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(m) if m.len() == 1 && m.contains_key("Ref") => {
            let name = m["Ref"].as_str().unwrap_or_default();
            parameters
                .get(name)
                .cloned()
                .unwrap_or_else(|| v.to_string())
        }
        other => other.to_string(),
    })
}

/// Settles ECS deployments: the new task definition runs, or its tasks
/// never start and the circuit breaker rolls the service back.
fn advance_rollouts(st: &mut State, now: Instant) {
    let due: Vec<(String, String)> = st
        .rollouts
        .iter()
        .filter(|(_, r)| r.done_at <= now)
        .map(|(k, _)| k.clone())
        .collect();
    for key in due {
        let r = st.rollouts.remove(&key).expect("listed");
        let broken = st.broken_task_definitions.contains(&r.task_definition);
        let status = if broken {
            "ROLLBACK_SUCCESSFUL"
        } else {
            "SUCCESSFUL"
        };
        st.deployment_history.entry(key.clone()).or_default().push((
            r.created,
            status,
            r.task_definition.clone(),
        ));
        let Some(s) = st.services.get_mut(&key) else {
            continue;
        };
        let (td, reason) = if broken {
            s.events.insert(
                0,
                format!(
                    "(service {}) deployment failed: tasks failed to start; rolling back",
                    key.1
                ),
            );
            (
                r.previous,
                "ECS deployment circuit breaker: rolled back to the previous deployment".to_owned(),
            )
        } else {
            (r.task_definition, "ECS deployment completed.".to_owned())
        };
        s.task_definition = td.clone();
        s.running = s.desired;
        s.deployments = vec![Deployment {
            status: "PRIMARY".into(),
            rollout_state: Some("COMPLETED".into()),
            rollout_reason: Some(reason),
            task_definition: td,
            desired: s.desired,
            running: s.desired,
            failed_tasks: if broken { s.desired } else { 0 },
        }];
    }
}

/// Completes every stack operation whose time has come.
fn advance_stacks(st: &mut State, now: Instant) {
    if st.next_due.is_some_and(|t| now < t) {
        return;
    }
    let wall = wall_clock(st, now);
    let due: Vec<String> = st
        .stacks
        .iter()
        .filter(|(name, s)| {
            s.operation.as_ref().is_some_and(|op| op.done_at <= now) && !st.stuck.contains(*name)
        })
        .map(|(name, _)| name.clone())
        .collect();
    for name in due {
        let fail = st.fail_next.contains(&name);
        let s = st.stacks.get_mut(&name).expect("listed");
        let op = s.operation.take().expect("due");
        let cleanup = st.cleanup_latency;
        let s = st.stacks.get_mut(&name).expect("listed");
        let first_resource = op
            .apply
            .as_ref()
            .and_then(|a| parsed(&a.template_body))
            .and_then(|t| {
                t.resources
                    .iter()
                    .next()
                    .map(|(id, r)| (id.clone(), r.kind.clone()))
            })
            .unwrap_or_else(|| {
                (
                    "Resource".into(),
                    "AWS::CloudFormation::WaitCondition".into(),
                )
            });
        if op.target == "DELETE_COMPLETE" {
            st.stacks.remove(&name);
            st.deleted.push(name);
            continue;
        }
        let (status, reason) = if fail && op.apply.is_some() {
            let failed = if op.target == "CREATE_COMPLETE" {
                "ROLLBACK_COMPLETE"
            } else {
                "UPDATE_ROLLBACK_COMPLETE"
            };
            (
                failed,
                Some("Resource handler returned message: simulated failure".to_owned()),
            )
        } else {
            let applied = op.apply.is_some();
            if let Some(a) = op.apply {
                // AWS echoes every parameter, defaults included, NoEcho masked.
                s.stack.parameters = match parsed(&a.template_body) {
                    Some(t) => t
                        .effective_parameters(&a.parameters)
                        .into_iter()
                        .map(|(k, v)| {
                            let masked = t.parameters.get(&k).is_some_and(|p| p.no_echo);
                            (k, if masked { "****".to_owned() } else { v })
                        })
                        .collect(),
                    None => a.parameters,
                };
                s.template_body = a.template_body;
                s.stack.tags = a.tags;
                if a.revert_drift {
                    revert_edits(&mut st.edits, &name, &s.template_body);
                }
                s.stack.outputs = outputs_of(&name, &s.template_body, &s.stack.parameters);
                if op.target == "UPDATE_COMPLETE" {
                    s.stack.last_updated = Some(wall);
                }
            }
            if op.target == "UPDATE_COMPLETE" && applied && !cleanup.is_zero() {
                // The update is done; old resources are still being deleted.
                s.operation = Some(Operation {
                    target: "UPDATE_COMPLETE",
                    done_at: now + cleanup,
                    apply: None,
                });
                ("UPDATE_COMPLETE_CLEANUP_IN_PROGRESS", None)
            } else {
                (op.target, None)
            }
        };
        s.stack.status = status.into();
        s.stack.status_reason = reason.clone();
        if let Some(why) = &reason {
            // The root cause is a resource's failure, before the rollback.
            let first = first_resource.clone();
            let verb = if status == "ROLLBACK_COMPLETE" {
                "CREATE_FAILED"
            } else {
                "UPDATE_FAILED"
            };
            push_event(st, &name, &first.0, &first.1, verb, Some(why.clone()));
        }
        if status == "UPDATE_ROLLBACK_FAILED" {
            for id in st.rollback_failing.remove(&name).unwrap_or_default() {
                push_event(
                    st,
                    &name,
                    &id,
                    "AWS::EC2::Resource",
                    "UPDATE_FAILED",
                    Some("Resource handler returned message: cannot roll back".into()),
                );
            }
        }
        push_event(
            st,
            &name,
            &name,
            "AWS::CloudFormation::Stack",
            status,
            reason,
        );
        if fail {
            st.fail_next.remove(&name);
        } else {
            sync_services(st, &name);
        }
    }
    // Nothing that runs ends before the earliest of what is left (with
    // nothing running, not before a call starts something).
    let stuck = &st.stuck;
    let next = st
        .stacks
        .iter()
        .filter(|(name, _)| !stuck.contains(*name))
        .filter_map(|(_, s)| s.operation.as_ref().map(|op| op.done_at))
        .min();
    st.next_due = Some(next.unwrap_or_else(|| now + Duration::from_secs(86_400 * 365)));
}

/// Evaluates outputs well enough for dependents: `Ref` of a parameter is its
/// value, anything else a deterministic physical-looking id.
fn outputs_of(
    stack: &str,
    body: &str,
    params: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let Some(t) = parsed(body) else {
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    let Some(Json::Object(outputs)) = t.canonical.get("Outputs") else {
        return out;
    };
    for (key, o) in outputs {
        let value = match o.get("Value") {
            Some(Json::Object(f))
                if f.get("Ref")
                    .and_then(Json::as_str)
                    .is_some_and(|r| params.contains_key(r)) =>
            {
                params[f["Ref"].as_str().expect("checked")].clone()
            }
            Some(Json::Object(f)) if f.get("Fn::GetAtt").is_some() => {
                let parts = &f["Fn::GetAtt"];
                let res = parts.get(0).and_then(Json::as_str).unwrap_or("x");
                if is_service(&t, res) {
                    service_name(stack, res)
                } else {
                    format!(
                        "{stack}-{res}-{}",
                        parts.get(1).and_then(Json::as_str).unwrap_or("")
                    )
                }
            }
            Some(Json::Object(f))
                if f.get("Ref")
                    .and_then(Json::as_str)
                    .is_some_and(|r| is_task_definition(&t, r)) =>
            {
                let r = f["Ref"].as_str().expect("checked");
                format!(
                    "arn:aws:ecs:sim:task-definition/{stack}-{r}:{}",
                    revision_of(params)
                )
            }
            Some(Json::Object(f)) if f.get("Ref").is_some() => {
                format!("{stack}-{}", f["Ref"].as_str().unwrap_or("x"))
            }
            _ => format!("{stack}.{key}"),
        };
        out.insert(key.clone(), value);
    }
    out
}

fn is_service(t: &Template, logical: &str) -> bool {
    t.resources
        .get(logical)
        .is_some_and(|r| r.kind == "AWS::ECS::Service")
}

fn is_task_definition(t: &Template, logical: &str) -> bool {
    t.resources
        .get(logical)
        .is_some_and(|r| r.kind == "AWS::ECS::TaskDefinition")
}

fn service_name(stack: &str, logical: &str) -> String {
    format!("{stack}-{logical}")
}

/// A task definition revision that changes whenever the parameters do.
fn revision_of(params: &BTreeMap<String, String>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    params.hash(&mut h);
    h.finish() % 1000
}

/// Creates or updates the ECS services a stack declares, as CloudFormation
/// would: cluster and desired count from the parameters they reference.
fn sync_services(st: &mut State, stack: &str) {
    let s = &st.stacks[stack];
    let Some(t) = parsed(&s.template_body) else {
        return;
    };
    let params = s.stack.parameters.clone();
    let outputs = s.stack.outputs.clone();
    for (logical, r) in &t.resources {
        if r.kind != "AWS::ECS::Service" {
            continue;
        }
        let by_ref = |prop: &str| {
            r.properties
                .get(prop)
                .and_then(|v| v.get("Ref"))
                .and_then(Json::as_str)
                .and_then(|p| params.get(p).cloned())
        };
        let cluster = by_ref("Cluster").unwrap_or_else(|| "default".into());
        let name = service_name(stack, logical);
        // As AWS::ECS::Service documents: a DesiredCount in the template is
        // applied on every update (resetting a scaled service); without
        // one, a new service starts with 1 and an existing one keeps its
        // count.
        let existing = st
            .services
            .get(&(cluster.clone(), name.clone()))
            .map(|s| s.desired);
        let desired: i32 = match r.properties.get("DesiredCount") {
            Some(_) => by_ref("DesiredCount")
                .and_then(|d| d.parse().ok())
                .unwrap_or(1),
            None => existing.unwrap_or(1),
        };
        let task_definition = outputs
            .values()
            .find(|v| v.contains(":task-definition/"))
            .cloned()
            .unwrap_or_default();
        let svc = Service {
            cluster: cluster.clone(),
            name: name.clone(),
            arn: format!("arn:aws:ecs:sim:service/{cluster}/{name}"),
            status: "ACTIVE".into(),
            desired,
            running: desired,
            pending: 0,
            task_definition: task_definition.clone(),
            deployments: vec![Deployment {
                status: "PRIMARY".into(),
                rollout_state: Some("COMPLETED".into()),
                rollout_reason: None,
                task_definition,
                desired,
                running: desired,
                failed_tasks: 0,
            }],
            events: vec![],
        };
        st.services.insert((cluster, name), svc);
    }
}

/// Resource-level changes between two templates with their parameters.
fn diff_templates(
    old: Option<(&str, &BTreeMap<String, String>)>,
    new_body: &str,
    new_params: &BTreeMap<String, String>,
) -> Vec<ResourceChange> {
    let Some(new) = parsed(new_body) else {
        return vec![];
    };
    let old = old.and_then(|(b, p)| parsed(b).map(|t| (t, p)));
    let mut changes = Vec::new();
    for (id, r) in &new.resources {
        let before = old.as_ref().and_then(|(t, _)| t.resources.get(id));
        match before {
            None => changes.push(ResourceChange {
                action: ChangeAction::Add,
                logical_id: id.clone(),
                resource_type: r.kind.clone(),
                replacement: None,
                scope: vec![],
                nested_change_set: None,
                drift: None,
            }),
            Some(b) => {
                let old_params = old.as_ref().map(|(_, p)| *p).expect("old exists");
                let changed_params: BTreeSet<&str> = new_params
                    .iter()
                    .filter(|(k, v)| old_params.get(*k) != Some(*v))
                    .map(|(k, _)| k.as_str())
                    .collect();
                let props_changed = b.properties != r.properties || b.kind != r.kind;
                let uses_changed = changed_params
                    .iter()
                    .any(|p| references_parameter(&r.properties, p));
                if props_changed || uses_changed {
                    let replaces = b.kind != r.kind
                        || super::sim_truth::replaces(&r.kind, &b.properties, &r.properties, |v| {
                            changed_params.iter().any(|p| references_parameter(v, p))
                        });
                    changes.push(ResourceChange {
                        action: ChangeAction::Modify,
                        logical_id: id.clone(),
                        resource_type: r.kind.clone(),
                        replacement: Some(if replaces {
                            Replacement::True
                        } else {
                            Replacement::False
                        }),
                        scope: vec!["Properties".into()],
                        nested_change_set: None,
                        drift: None,
                    });
                }
            }
        }
    }
    if let Some((t, _)) = &old {
        for (id, r) in &t.resources {
            if !new.resources.contains_key(id) {
                changes.push(ResourceChange {
                    action: ChangeAction::Remove,
                    logical_id: id.clone(),
                    resource_type: r.kind.clone(),
                    replacement: None,
                    scope: vec![],
                    nested_change_set: None,
                    drift: None,
                });
            }
        }
    }
    changes
}

/// What a drift-aware change set adds for the stack's out-of-band edits:
/// a Modify (ResourceDriftStatus MODIFIED) for each resource with drift
/// outside create-only properties, which AWS does not reconcile.
fn revert_changes(st: &State, r: &ChangeSetRequest, changes: &mut Vec<ResourceChange>) {
    let Some(t) = parsed(&r.template_body) else {
        return;
    };
    for ((stack, logical), edits) in &st.edits {
        let Some(res) = t.resources.get(logical) else {
            continue;
        };
        if *stack != r.stack_name
            || !super::sim_truth::drift_supported(&res.kind)
            || edits
                .keys()
                .all(|p| super::sim_truth::create_only_path(&res.kind, p))
        {
            continue;
        }
        match changes.iter_mut().find(|c| c.logical_id == *logical) {
            Some(c) => c.drift = Some(ResourceDriftStatus::Modified),
            None => changes.push(ResourceChange {
                action: ChangeAction::Modify,
                logical_id: logical.clone(),
                resource_type: res.kind.clone(),
                replacement: Some(Replacement::False),
                scope: vec!["Properties".into()],
                nested_change_set: None,
                drift: Some(ResourceDriftStatus::Modified),
            }),
        }
    }
}

/// A drift-aware change set executed: every drifted property of the
/// stack's resources has the template's value again, except create-only
/// ones (still drifted) and types without drift support.
fn revert_edits(
    edits: &mut BTreeMap<(String, String), BTreeMap<String, String>>,
    stack: &str,
    template_body: &str,
) {
    let Some(t) = parsed(template_body) else {
        return;
    };
    for ((s, logical), props) in edits.iter_mut() {
        if s != stack {
            continue;
        }
        if let Some(r) = t.resources.get(logical)
            && super::sim_truth::drift_supported(&r.kind)
        {
            props.retain(|path, _| super::sim_truth::create_only_path(&r.kind, path));
        }
    }
    edits.retain(|_, props| !props.is_empty());
}

impl Cloud for SimCloud {
    fn throttles(&self) -> u64 {
        self.lock().throttled
    }

    fn api_calls(&self) -> u64 {
        self.total_calls()
    }

    async fn describe_stacks(
        &self,
        names: &BTreeSet<String>,
        owner: (&str, &str),
    ) -> CloudResult<BTreeMap<String, Stack>> {
        let st = self.enter("DescribeStacks")?;
        if let Some(n) = st.outage_once_stable
            && st.stacks.len() >= n
            && st.stacks.values().all(|s| s.operation.is_none())
        {
            return Err(CloudError::Transport("connection refused".into()));
        }
        Ok(st
            .stacks
            .values()
            .filter(|s| {
                s.stack.status != StackStatus::ReviewInProgress || names.contains(&s.stack.name)
            })
            .filter(|s| {
                names.contains(&s.stack.name)
                    || s.stack.tags.get(owner.0).is_some_and(|v| v == owner.1)
            })
            .map(|s| (s.stack.name.clone(), s.stack.clone()))
            .collect())
    }

    async fn describe_stack(&self, name: &str) -> CloudResult<Option<Stack>> {
        let st = self.enter("DescribeStacks")?;
        Ok(st
            .stacks
            .get(name)
            .map(|s| s.stack.clone())
            .filter(|s| s.status != StackStatus::DeleteComplete))
    }

    async fn get_template(&self, stack: &str) -> CloudResult<String> {
        let st = self.enter("GetTemplate")?;
        st.stacks
            .get(stack)
            .map(|s| s.template_body.clone())
            .ok_or_else(|| CloudError::NotFound(format!("Stack with id {stack} does not exist")))
    }

    async fn create_change_set(&self, r: &ChangeSetRequest) -> CloudResult<()> {
        let ready_at = Instant::now() + self.config.change_set_latency;
        let mut st = self.enter("CreateChangeSet")?;
        // CloudFormation reads a TemplateURL from S3 itself: what the bucket
        // holds is the template, whatever the request carries besides.
        let mut fetched;
        let r = match &r.template_url {
            None => r,
            Some(url) => {
                let body = s3_object(&st, url).ok_or_else(|| {
                    CloudError::Validation(format!(
                        "S3 error: The specified key does not exist ({url})"
                    ))
                })?;
                fetched = r.clone();
                fetched.template_body = body;
                &fetched
            }
        };
        st.next_id += 1;
        let id = st.next_id;
        let existing = st.stacks.get(&r.stack_name);
        match (r.kind, existing) {
            (ChangeSetKind::Create, Some(s)) if s.stack.status != StackStatus::ReviewInProgress => {
                return Err(CloudError::Conflict(format!(
                    "Stack [{}] already exists",
                    r.stack_name
                )));
            }
            (ChangeSetKind::Update, None) => {
                return Err(CloudError::NotFound(format!(
                    "Stack [{}] does not exist",
                    r.stack_name
                )));
            }
            (_, Some(s)) if s.change_sets.contains_key(&r.change_set_name) => {
                return Err(CloudError::Conflict(format!(
                    "ChangeSet {} already exists",
                    r.change_set_name
                )));
            }
            _ => {}
        }
        let old = existing
            .filter(|s| s.stack.status != StackStatus::ReviewInProgress)
            .map(|s| {
                (
                    s.template_body.clone(),
                    s.stack.parameters.clone(),
                    s.stack.tags.clone(),
                )
            });
        let changes = diff_templates(
            old.as_ref().map(|(b, p, _)| (b.as_str(), p)),
            &r.template_body,
            &r.parameters,
        );
        let tags_changed = old.as_ref().is_some_and(|(_, _, t)| t != &r.tags);
        let mut changes = changes;
        if r.revert_drift {
            // AWS: drift-aware change sets are UPDATE change sets of stacks
            // without nested stacks.
            if r.kind != ChangeSetKind::Update || r.include_nested_stacks {
                return Err(CloudError::Validation(
                    "DeploymentMode REVERT_DRIFT is supported only for UPDATE change sets without nested stacks".into(),
                ));
            }
            revert_changes(&st, r, &mut changes);
        }
        let nested: Vec<(String, Option<Vec<ResourceChange>>)> = st
            .nested_plans
            .iter()
            .filter(|((s, _), _)| *s == r.stack_name)
            .map(|((_, l), c)| (l.clone(), c.clone()))
            .collect();
        for (logical, inner) in nested {
            st.next_id += 1;
            let nested_id = format!(
                "arn:aws:cloudformation:sim:changeSet/{}-{logical}-nested/{}",
                r.stack_name, st.next_id
            );
            if let Some(inner) = inner {
                st.nested_sets.insert(nested_id.clone(), inner);
            }
            changes.push(ResourceChange {
                action: ChangeAction::Modify,
                logical_id: logical,
                resource_type: "AWS::CloudFormation::Stack".into(),
                replacement: Some(Replacement::False),
                scope: vec!["Properties".into()],
                nested_change_set: Some(nested_id),
                drift: None,
            });
        }
        let cs = SimChangeSet {
            request: r.clone(),
            ready_at,
            changes: if changes.is_empty() && tags_changed {
                // A tag-only update touches every resource's Tags.
                vec![]
            } else {
                changes
            },
            executed: false,
            created: wall_clock(&st, Instant::now()),
            id: String::new(),
        };
        let entry = st
            .stacks
            .entry(r.stack_name.clone())
            .or_insert_with(|| SimStack {
                stack: Stack {
                    name: r.stack_name.clone(),
                    id: format!("arn:aws:cloudformation:sim:stack/{}/{id}", r.stack_name),
                    status: "REVIEW_IN_PROGRESS".into(),
                    status_reason: None,
                    parameters: BTreeMap::new(),
                    tags: BTreeMap::new(),
                    outputs: BTreeMap::new(),
                    termination_protection: false,
                    last_updated: None,
                    drift: Default::default(),
                },
                template_body: String::new(),
                operation: None,
                events: vec![],
                change_sets: BTreeMap::new(),
            });
        let mut cs = cs;
        cs.id = format!("{}:changeSet/{}/{}", entry.stack.id, r.change_set_name, id);
        entry.change_sets.insert(r.change_set_name.clone(), cs);
        Ok(())
    }

    async fn describe_change_set(&self, stack: &str, name: &str) -> CloudResult<ChangeSet> {
        let st = self.enter("DescribeChangeSet")?;
        if name.starts_with("arn:") && name.contains("-nested/") {
            let changes = st.nested_sets.get(name).cloned().ok_or_else(|| {
                CloudError::NotFound(format!("ChangeSet [{name}] does not exist"))
            })?;
            return Ok(ChangeSet {
                name: name.to_owned(),
                id: name.to_owned(),
                status: ChangeSetStatus::Ready,
                changes,
                parameters: BTreeMap::new(),
                tags: BTreeMap::new(),
                revert_drift: false,
            });
        }
        let s = st
            .stacks
            .get(stack)
            .ok_or_else(|| CloudError::NotFound(format!("Stack [{stack}] does not exist")))?;
        let cs = s
            .change_sets
            .get(name)
            .ok_or_else(|| CloudError::NotFound(format!("ChangeSet [{name}] does not exist")))?;
        let same_tags = s.stack.tags == cs.request.tags;
        let busy = s.operation.is_some();
        let status = if cs.executed && busy {
            ChangeSetStatus::Executing
        } else if cs.executed {
            ChangeSetStatus::Executed
        } else if Instant::now() < cs.ready_at {
            ChangeSetStatus::Pending
        } else if cs.changes.is_empty() && cs.request.kind == ChangeSetKind::Update && same_tags {
            ChangeSetStatus::NoChanges
        } else if busy {
            // As AWS: computed, but UNAVAILABLE while the stack is busy.
            ChangeSetStatus::Unavailable
        } else {
            ChangeSetStatus::Ready
        };
        let mut changes = cs.changes.clone();
        if self.config.hide_replacement {
            for c in &mut changes {
                c.replacement = None;
            }
        }
        let masked = parsed(&cs.request.template_body);
        Ok(ChangeSet {
            name: name.to_owned(),
            id: cs.id.clone(),
            status,
            changes,
            parameters: cs
                .request
                .parameters
                .iter()
                .map(|(k, v)| {
                    let secret = masked
                        .as_ref()
                        .and_then(|t| t.parameters.get(k))
                        .is_some_and(|p| p.no_echo);
                    (k.clone(), if secret { "****".into() } else { v.clone() })
                })
                .collect(),
            tags: cs.request.tags.clone(),
            revert_drift: cs.request.revert_drift,
        })
    }

    async fn list_change_sets(&self, stack: &str) -> CloudResult<Vec<ChangeSetSummary>> {
        let st = self.enter("ListChangeSets")?;
        Ok(st
            .stacks
            .get(stack)
            .map(|s| {
                s.change_sets
                    .iter()
                    .map(|(name, cs)| ChangeSetSummary {
                        name: name.clone(),
                        created: Some(cs.created),
                        executing: s
                            .operation
                            .as_ref()
                            .and_then(|op| op.apply.as_ref())
                            .is_some_and(|a| a.change_set == *name),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    fn now(&self) -> SystemTime {
        wall_clock(&self.lock(), Instant::now())
    }

    async fn execute_change_set(
        &self,
        stack: &str,
        name: &str,
        token: Option<&str>,
    ) -> CloudResult<()> {
        let latency = self.latency(stack);
        let mut st = self.enter("ExecuteChangeSet")?;
        // As AWS: a request with a token already seen for this change set
        // is the same request, retried; it succeeds without acting again.
        if let Some(t) = token
            && st.execute_tokens.get(t) == Some(&(stack.to_owned(), name.to_owned()))
        {
            return Ok(());
        }
        let s = st
            .stacks
            .get(stack)
            .ok_or_else(|| CloudError::NotFound(format!("Stack [{stack}] does not exist")))?;
        // AWS refuses a second execution of one change set, harmlessly.
        if let Some(cs) = s.change_sets.get(name)
            && cs.executed
        {
            let state = if s.operation.is_some() {
                "EXECUTE_IN_PROGRESS"
            } else {
                "EXECUTE_COMPLETE"
            };
            return Err(CloudError::Conflict(format!(
                "ChangeSet [{name}] cannot be executed in its current status of [{state}]"
            )));
        }
        if s.operation.is_some()
            || s.stack.in_progress() && s.stack.status != StackStatus::ReviewInProgress
        {
            let msg = format!("ExecuteChangeSet on {stack} while it is {}", s.stack.status);
            st.violations.push(msg.clone());
            return Err(CloudError::Conflict(msg));
        }
        let cs =
            s.change_sets.get(name).cloned().ok_or_else(|| {
                CloudError::NotFound(format!("ChangeSet [{name}] does not exist"))
            })?;
        if Instant::now() < cs.ready_at {
            return Err(CloudError::Conflict(format!(
                "ChangeSet [{name}] is not ready"
            )));
        }
        // The watcher sees inside nested stacks too: their changes count as
        // the parent's, named `Nested.LogicalId`.
        let mut all: Vec<ResourceChange> = cs.changes.clone();
        for c in &cs.changes {
            if let Some(inner) = c
                .nested_change_set
                .as_ref()
                .and_then(|id| st.nested_sets.get(id))
            {
                all.extend(inner.iter().map(|n| ResourceChange {
                    logical_id: format!("{}.{}", c.logical_id, n.logical_id),
                    ..n.clone()
                }));
            }
        }
        for c in &all {
            let destructive =
                c.action == ChangeAction::Remove || c.replacement == Some(Replacement::True);
            let allowed = st
                .allowed
                .contains(&(stack.to_owned(), c.logical_id.clone()));
            if destructive && !allowed && super::sim_truth::is_stateful(&c.resource_type) {
                st.violations.push(format!(
                    "executed change set {name} on {stack} that replaces or removes protected {} {}",
                    c.resource_type, c.logical_id
                ));
            }
        }
        let create = cs.request.kind == ChangeSetKind::Create;
        let now = Instant::now();
        let s = st.stacks.get_mut(stack).expect("checked");
        s.stack.status = if create {
            "CREATE_IN_PROGRESS"
        } else {
            "UPDATE_IN_PROGRESS"
        }
        .into();
        s.operation = Some(Operation {
            target: if create {
                "CREATE_COMPLETE"
            } else {
                "UPDATE_COMPLETE"
            },
            done_at: now + latency,
            apply: Some(Applied {
                change_set: name.to_owned(),
                template_body: cs.request.template_body.clone(),
                parameters: cs.request.parameters.clone(),
                tags: cs.request.tags.clone(),
                revert_drift: cs.request.revert_drift,
            }),
        });
        // AWS deletes every other change set of the stack on execution.
        s.change_sets.retain(|k, _| k == name);
        s.change_sets.get_mut(name).expect("kept").executed = true;
        st.executed.push((stack.to_owned(), cs.changes));
        if let Some(t) = token {
            st.execute_tokens
                .insert(t.to_owned(), (stack.to_owned(), name.to_owned()));
        }
        let status = st.stacks[stack].stack.status.clone();
        push_event(
            &mut st,
            stack,
            stack,
            "AWS::CloudFormation::Stack",
            status.as_str(),
            Some("User Initiated".into()),
        );
        if st.lost_answers.remove("ExecuteChangeSet") {
            return Err(CloudError::Transport(
                "connection reset after the request was sent".into(),
            ));
        }
        Ok(())
    }

    async fn delete_change_set(&self, stack: &str, name: &str) -> CloudResult<()> {
        let mut st = self.enter("DeleteChangeSet")?;
        let s = st
            .stacks
            .get_mut(stack)
            .ok_or_else(|| CloudError::NotFound(format!("Stack [{stack}] does not exist")))?;
        s.change_sets
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| CloudError::NotFound(format!("ChangeSet [{name}] does not exist")))?;
        // Deleting the only change set of a never-executed stack removes it, as AWS does.
        if s.stack.status == StackStatus::ReviewInProgress && s.change_sets.is_empty() {
            st.stacks.remove(stack);
        }
        Ok(())
    }

    async fn stack_events(&self, stack: &str, after: Option<&str>) -> CloudResult<Vec<StackEvent>> {
        let st = self.enter("DescribeStackEvents")?;
        let s = st
            .stacks
            .get(stack)
            .ok_or_else(|| CloudError::NotFound(format!("Stack [{stack}] does not exist")))?;
        let start = after
            .and_then(|a| s.events.iter().position(|e| e.id == a).map(|i| i + 1))
            .unwrap_or(0);
        Ok(s.events[start..].to_vec())
    }

    async fn operation_events(&self, stack: &str) -> CloudResult<Vec<StackEvent>> {
        let st = self.enter("DescribeStackEvents")?;
        let s = st
            .stacks
            .get(stack)
            .ok_or_else(|| CloudError::NotFound(format!("Stack [{stack}] does not exist")))?;
        let start = s
            .events
            .iter()
            .rposition(|e| super::begins_operation(stack, e))
            .unwrap_or(0);
        Ok(s.events[start..].to_vec())
    }

    async fn continue_update_rollback(
        &self,
        stack: &str,
        skip: &[String],
        _token: Option<&str>,
    ) -> CloudResult<()> {
        let latency = self.latency(stack);
        let mut st = self.enter("ContinueUpdateRollback")?;
        // Resources that cannot roll back fail it again, unless skipped.
        let failing: Vec<String> = st
            .rollback_blockers
            .get(stack)
            .map(|b| b.iter().filter(|id| !skip.contains(id)).cloned().collect())
            .unwrap_or_default();
        let known = st.rollback_blockers.get(stack).cloned().unwrap_or_default();
        if let Some(bad) = skip.iter().find(|id| !known.contains(id)) {
            // As AWS: only resources in UPDATE_FAILED may be skipped.
            return Err(CloudError::Validation(format!(
                "ResourcesToSkip: {bad} is not in UPDATE_FAILED"
            )));
        }
        st.rollback_failing
            .insert(stack.to_owned(), failing.clone());
        if failing.is_empty() {
            st.rollback_blockers.remove(stack);
        }
        let s = st
            .stacks
            .get_mut(stack)
            .ok_or_else(|| CloudError::NotFound(format!("Stack [{stack}] does not exist")))?;
        if s.stack.status != StackStatus::UpdateRollbackFailed {
            return Err(CloudError::Validation(format!(
                "{stack} is {}, not UPDATE_ROLLBACK_FAILED",
                s.stack.status
            )));
        }
        let target = if failing.is_empty() {
            "UPDATE_ROLLBACK_COMPLETE"
        } else {
            "UPDATE_ROLLBACK_FAILED"
        };
        roll_back(
            &mut st,
            stack,
            "UPDATE_ROLLBACK_IN_PROGRESS",
            target,
            latency / 2,
            "User Initiated",
        );
        Ok(())
    }

    async fn rollback_stack(&self, stack: &str, _token: Option<&str>) -> CloudResult<()> {
        let latency = self.latency(stack);
        let mut st = self.enter("RollbackStack")?;
        let s = st
            .stacks
            .get_mut(stack)
            .ok_or_else(|| CloudError::NotFound(format!("Stack [{stack}] does not exist")))?;
        // As AWS documents: from CREATE_FAILED or UPDATE_FAILED only; a
        // stack with no last stable state (a failed creation) is deleted.
        let (status, target) = match s.stack.status {
            StackStatus::CreateFailed => ("ROLLBACK_IN_PROGRESS", "DELETE_COMPLETE"),
            StackStatus::UpdateFailed => {
                ("UPDATE_ROLLBACK_IN_PROGRESS", "UPDATE_ROLLBACK_COMPLETE")
            }
            ref other => {
                return Err(CloudError::Validation(format!(
                    "Stack:{stack} is in {other} state and can not be rolled back"
                )));
            }
        };
        s.stack.status_reason = Some("User Initiated".into());
        roll_back(
            &mut st,
            stack,
            status,
            target,
            latency / 2,
            "User Initiated",
        );
        Ok(())
    }

    async fn cancel_update_stack(&self, stack: &str, _token: Option<&str>) -> CloudResult<()> {
        let latency = self.latency(stack);
        let mut st = self.enter("CancelUpdateStack")?;
        let s = st
            .stacks
            .get_mut(stack)
            .ok_or_else(|| CloudError::NotFound(format!("Stack [{stack}] does not exist")))?;
        if s.stack.status != StackStatus::UpdateInProgress {
            return Err(CloudError::Validation(format!(
                "CancelUpdateStack cannot be called from current stack status {}",
                s.stack.status
            )));
        }
        // The update stops where it is and rolls back: nothing of it is
        // applied, and the stack is left as before it.
        s.stack.status_reason = Some("User Initiated".into());
        st.stuck.remove(stack);
        roll_back(
            &mut st,
            stack,
            "UPDATE_ROLLBACK_IN_PROGRESS",
            "UPDATE_ROLLBACK_COMPLETE",
            latency / 2,
            "Stack update cancelled",
        );
        Ok(())
    }

    async fn delete_stack(&self, stack: &str) -> CloudResult<()> {
        let latency = self.latency(stack);
        let mut st = self.enter("DeleteStack")?;
        let Some(s) = st.stacks.get(stack) else {
            return Ok(());
        };
        if s.stack.termination_protection {
            st.violations
                .push(format!("DeleteStack on termination-protected {stack}"));
            return Err(CloudError::Validation(format!(
                "Stack [{stack}] cannot be deleted while TerminationProtection is enabled"
            )));
        }
        if s.operation.is_some() {
            let msg = format!("DeleteStack on {stack} while it is {}", s.stack.status);
            st.violations.push(msg.clone());
            return Err(CloudError::Conflict(msg));
        }
        let s = st.stacks.get_mut(stack).expect("checked");
        s.stack.status = StackStatus::DeleteInProgress;
        s.operation = Some(Operation {
            target: "DELETE_COMPLETE",
            done_at: Instant::now() + latency / 2,
            apply: None,
        });
        Ok(())
    }

    async fn detect_stack_drift(&self, stack: &str) -> CloudResult<String> {
        let done_at = Instant::now() + self.config.drift_detection_latency;
        let mut st = self.enter("DetectStackDrift")?;
        let s = st
            .stacks
            .get(stack)
            .ok_or_else(|| CloudError::NotFound(format!("Stack [{stack}] does not exist")))?;
        if !crate::cloud::DRIFT_DETECTABLE.contains(&s.stack.status.as_str()) {
            return Err(CloudError::Validation(format!(
                "Stack [{stack}] is in {} state and can not be checked for drift",
                s.stack.status
            )));
        }
        if st
            .detections
            .values()
            .any(|d| d.stack == stack && d.result.is_none())
        {
            st.violations
                .push(format!("DetectStackDrift on {stack} while one runs"));
            return Err(CloudError::Validation(format!(
                "Drift detection is already in progress for stack [{stack}]"
            )));
        }
        st.next_id += 1;
        let id = format!("sim-detection-{}", st.next_id);
        let fail = st.fail_detection.remove(stack);
        // AWS's LastCheckTimestamp is "the most recent time a drift
        // detection operation was initiated on the stack".
        let started = wall_clock(&st, Instant::now());
        if let Some(s) = st.stacks.get_mut(stack) {
            s.stack.drift.last_check = Some(started);
        }
        st.detections.insert(
            id.clone(),
            SimDetection {
                stack: stack.to_owned(),
                done_at,
                fail,
                result: None,
            },
        );
        let running = st
            .detections
            .values()
            .filter(|d| d.result.is_none())
            .count();
        st.detections_in_flight_max = st.detections_in_flight_max.max(running);
        Ok(id)
    }

    async fn drift_detection(&self, id: &str) -> CloudResult<Detection> {
        let st = self.enter("DescribeStackDriftDetectionStatus")?;
        let d = st
            .detections
            .get(id)
            .ok_or_else(|| CloudError::Validation(format!("Drift detection [{id}] not found")))?;
        Ok(match (&d.result, &d.fail) {
            (None, _) => Detection {
                status: DetectionStatus::InProgress,
                stack_drift: DriftStatus::NotChecked,
                drifted_resources: None,
            },
            (Some((status, n)), fail) => Detection {
                status: match fail {
                    Some(why) => DetectionStatus::Failed(why.clone()),
                    None => DetectionStatus::Complete,
                },
                stack_drift: *status,
                drifted_resources: Some(*n),
            },
        })
    }

    async fn resource_drifts(&self, stack: &str) -> CloudResult<Vec<ResourceDrift>> {
        let st = self.enter("DescribeStackResourceDrifts")?;
        if !st.stacks.contains_key(stack) {
            return Err(CloudError::NotFound(format!(
                "Stack [{stack}] does not exist"
            )));
        }
        Ok(st.resource_drifts.get(stack).cloned().unwrap_or_default())
    }

    async fn set_termination_protection(&self, stack: &str, enabled: bool) -> CloudResult<()> {
        let mut st = self.enter("UpdateTerminationProtection")?;
        let s = st
            .stacks
            .get_mut(stack)
            .ok_or_else(|| CloudError::NotFound(format!("Stack [{stack}] does not exist")))?;
        s.stack.termination_protection = enabled;
        Ok(())
    }

    async fn describe_services(
        &self,
        cluster: &str,
        names: &[String],
    ) -> CloudResult<Vec<Service>> {
        let mut out = Vec::new();
        for batch in names.chunks(10) {
            let mut st = self.enter("DescribeServices")?;
            for n in batch {
                let key = (cluster.to_owned(), n.clone());
                // Eventual consistency: the view from before the update.
                if let Some((left, old)) = st.stale_services.get_mut(&key)
                    && *left > 0
                {
                    *left -= 1;
                    out.push(old.clone());
                    continue;
                }
                out.extend(st.services.get(&key).cloned());
            }
        }
        Ok(out)
    }

    async fn update_service(
        &self,
        cluster: &str,
        service: &str,
        desired: Option<i32>,
        task_definition: Option<&str>,
    ) -> CloudResult<()> {
        let mut st = self.enter("UpdateService")?;
        let key = (cluster.to_owned(), service.to_owned());
        if st.stale_reads > 0
            && let Some(before) = st.services.get(&key).cloned()
        {
            let n = st.stale_reads;
            st.stale_services.insert(key, (n, before));
        }
        let s = st
            .services
            .get_mut(&(cluster.to_owned(), service.to_owned()))
            .ok_or_else(|| CloudError::NotFound(format!("service {service} not found")))?;
        if let Some(d) = desired {
            s.desired = d;
            s.running = d;
        }
        let key = (cluster.to_owned(), service.to_owned());
        match task_definition {
            // A new task definition is a deployment: the new one becomes
            // PRIMARY and IN_PROGRESS beside the old ACTIVE one, until it
            // completes or the circuit breaker rolls it back.
            Some(td) if td != s.task_definition => {
                let previous = std::mem::replace(&mut s.task_definition, td.to_owned());
                let desired = s.desired;
                s.deployments = vec![
                    Deployment {
                        status: "PRIMARY".into(),
                        rollout_state: Some("IN_PROGRESS".into()),
                        rollout_reason: Some("ECS deployment in progress.".into()),
                        task_definition: td.to_owned(),
                        desired,
                        running: 0,
                        failed_tasks: 0,
                    },
                    Deployment {
                        status: "ACTIVE".into(),
                        rollout_state: Some("COMPLETED".into()),
                        rollout_reason: None,
                        task_definition: previous.clone(),
                        desired,
                        running: desired,
                        failed_tasks: 0,
                    },
                ];
                let done_at = Instant::now() + st.rollout_latency;
                let created = wall_clock(&st, Instant::now());
                st.rollouts.insert(
                    key,
                    Rollout {
                        task_definition: td.to_owned(),
                        previous,
                        done_at,
                        created,
                    },
                );
            }
            _ => {
                for d in &mut s.deployments {
                    d.desired = s.desired;
                    d.running = s.running;
                }
            }
        }
        advance(&mut st, Instant::now());
        Ok(())
    }

    async fn failed_deployments(
        &self,
        cluster: &str,
        service: &str,
        since: SystemTime,
    ) -> CloudResult<Vec<FailedDeployment>> {
        let st = self.enter("ListServiceDeployments")?;
        Ok(st
            .deployment_history
            .get(&(cluster.to_owned(), service.to_owned()))
            .into_iter()
            .flatten()
            .filter(|(created, status, _)| {
                *created >= since && crate::cloud::FAILED_DEPLOYMENT_STATUSES.contains(status)
            })
            .map(|(_, status, td)| FailedDeployment {
                status: (*status).to_owned(),
                reason: Some("ECS deployment circuit breaker: tasks failed to start".into()),
                task_definition: td.clone(),
            })
            .collect())
    }

    async fn bucket_region(&self, bucket: &str) -> CloudResult<String> {
        let st = self.enter("GetBucketLocation")?;
        st.buckets
            .get(bucket)
            .cloned()
            .ok_or_else(|| CloudError::NotFound(format!("NoSuchBucket: {bucket}")))
    }

    async fn put_artifact(&self, bucket: &str, key: &str, body: &str) -> CloudResult<bool> {
        let mut st = self.enter("PutObject")?;
        if !st.buckets.contains_key(bucket) {
            return Err(CloudError::NotFound(format!("NoSuchBucket: {bucket}")));
        }
        let k = (bucket.to_owned(), key.to_owned());
        if st.objects.contains_key(&k) {
            return Ok(false);
        }
        st.objects.insert(k, body.to_owned());
        Ok(true)
    }

    async fn caller_account(&self) -> CloudResult<String> {
        let _st = self.enter("GetCallerIdentity")?;
        Ok(self.config.account.clone())
    }
}
