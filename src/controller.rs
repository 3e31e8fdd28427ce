//! The long-running controller: every environment is a work item,
//! reconciled on its interval (with jitter), at once when its desired-state
//! file or a template it uses changes, and on SIGHUP; with exponential
//! backoff after failures. A pass is [`apply::reconcile`], the very code of
//! `reconcile --once`.
//!
//! One task per environment, so never two passes of one environment at
//! once; environments run in parallel up to a bound. A desired state that
//! stops loading is reported (status, log, alert) and the last good one
//! keeps being enforced; nothing of the broken one is applied.
//!
//! On shutdown no pass starts; a running pass gets the grace period to
//! finish, then is dropped at its next await point (every AWS call is whole
//! or not made; CloudFormation goes on server-side and the next start
//! observes and continues, reusing its change sets).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use backoff::ExponentialBackoff;
use backoff::backoff::Backoff;
use rand::{Rng, SeedableRng, rngs::StdRng};
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, broadcast, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::apply::{self, Options};
use crate::cloud::{Cloud, Fenced};
use crate::lease::{Coordinator, Fence, LeaseStatus};
use crate::metrics::{MetricsSink, PassMetrics, Registry};
use crate::notify::{Episodes, Finding, Kind, Notifier};
use crate::observe::Depth;
use crate::plan::Verdict;
use crate::spec::{self, DesiredEnv};
use crate::state::told::Told;
use crate::state::{Backend, State, Suspension};

/// How the controller schedules.
#[derive(Debug, Clone)]
pub struct Settings {
    pub interval: Duration,
    /// Each wait is the interval times a random factor in 1 ± jitter.
    pub jitter: f64,
    /// How often desired-state files are checked for changes.
    pub watch_every: Duration,
    /// Environments reconciled at once.
    pub max_envs: usize,
    /// Stack operations at once per account and region.
    pub max_parallel: usize,
    /// Drift detections in flight per account and region.
    pub max_detections: usize,
    pub shutdown_grace: Duration,
    /// First wait after a failed pass; doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub metrics_namespace: String,
    pub depth: Depth,
    /// Seeds the jitter (tests replay exactly).
    pub seed: u64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            interval: Duration::from_secs(300),
            jitter: 0.1,
            watch_every: Duration::from_secs(2),
            max_envs: 4,
            max_parallel: apply::DEFAULT_MAX_PARALLEL,
            max_detections: crate::detect::DEFAULT_MAX_DETECTIONS,
            shutdown_grace: Duration::from_secs(30),
            backoff_initial: Duration::from_secs(30),
            backoff_max: Duration::from_secs(15 * 60),
            metrics_namespace: "Stackwarden".into(),
            depth: Depth::Full,
            seed: 0,
        }
    }
}

/// How often an environment stopped by a permanent error (wrong account,
/// credentials refused) looks again without a change of its desired state:
/// credentials can change without a file changing.
pub const PERMANENT_ERROR_RECHECK: Duration = Duration::from_secs(60 * 60);

/// Makes the cloud of an environment (its region and role).
pub trait Connect: Send + std::marker::Sync {
    type Cloud: Cloud + 'static;
    fn connect(&self, env: &DesiredEnv) -> impl Future<Output = Self::Cloud> + Send;
}

/// One environment's state, for `/status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EnvStatus {
    pub file: PathBuf,
    pub revision: Option<String>,
    pub passes: u64,
    /// Seconds since the Unix epoch.
    pub last_pass_at: Option<u64>,
    pub last_pass_seconds: Option<f64>,
    pub result: Option<Verdict>,
    /// Why the last pass could not run or ended early.
    pub error: Option<String>,
    /// The desired-state file does not load; the last good one is enforced.
    pub desired_state_error: Option<String>,
    /// Set while the environment waits on a change rather than on time: a
    /// permanent error (wrong account, credentials refused) or a desired
    /// state that never loaded.
    pub waiting_for: Option<String>,
    /// Set while the environment is suspended (nothing is written).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspended: Option<Suspension>,
    /// The sync window at the last pass (with `policy.windows`): closed,
    /// nothing is written until it opens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_window: Option<crate::window::WindowState>,
    /// The environment's lease, when replicas share environments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseStatus>,
    /// Every object's outcome of the last pass.
    pub objects: Vec<crate::outcome::Outcome>,
    pub open_alerts: Vec<Finding>,
    /// By stack key: the drift of the stacks whose latest detection found
    /// some (ignored drift left out).
    pub drift: BTreeMap<String, crate::drift::StackDrift>,
}

/// What the controller shares with the HTTP endpoints.
#[derive(Debug, Default)]
pub struct Shared {
    status: Mutex<BTreeMap<String, EnvStatus>>,
    registry: Mutex<Registry>,
    /// By when each environment's loop must show progress again; past it,
    /// the loop is stalled and `/healthz` says so.
    due: Mutex<BTreeMap<String, Instant>>,
}

impl Shared {
    fn status(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, EnvStatus>> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `environment`'s loop is alive and will show progress
    /// again before `due`.
    pub fn expect_progress_by(&self, environment: &str, due: Instant) {
        self.due
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(environment.to_owned(), due);
    }

    /// Live while every environment loop shows progress when it said it
    /// would: a loop that stops passing (wedged on a call, a file, a lock)
    /// makes the process unhealthy, so an orchestrator restarts it rather
    /// than trusting a controller that answers HTTP and does nothing.
    pub fn liveness(&self) -> Result<(), String> {
        let now = Instant::now();
        let due = self.due.lock().unwrap_or_else(|p| p.into_inner());
        for (name, at) in due.iter() {
            if now > *at {
                return Err(format!(
                    "{name}: the pass loop is stalled (no progress for {} past its deadline)",
                    humantime::format_duration(Duration::from_secs((now - *at).as_secs()))
                ));
            }
        }
        Ok(())
    }

    /// Ready once every environment has had a pass and none of the last
    /// passes ended in an error of stackwarden's own (cannot load any desired
    /// state, cannot observe).
    pub fn readiness(&self) -> Result<String, String> {
        let status = self.status();
        if status.is_empty() {
            return Err("no environment".into());
        }
        // Environments another replica holds are its business.
        let mine = status
            .iter()
            .filter(|(_, s)| s.lease.as_ref().is_none_or(|l| l.held));
        for (name, s) in mine {
            if s.passes == 0 {
                return Err(format!("{name}: first pass not done"));
            }
            if let Some(e) = &s.error {
                return Err(format!("{name}: {e}"));
            }
        }
        // With leases, which environments this replica holds.
        let leased: Vec<(&String, bool)> = status
            .iter()
            .filter_map(|(n, s)| Some((n, s.lease.as_ref()?.held)))
            .collect();
        if leased.is_empty() {
            return Ok("ready".into());
        }
        let held: Vec<&str> = leased
            .iter()
            .filter(|(_, h)| *h)
            .map(|(n, _)| n.as_str())
            .collect();
        Ok(format!(
            "ready; holds the lease of {} of {} environments{}",
            held.len(),
            leased.len(),
            if held.is_empty() {
                String::new()
            } else {
                format!(": {}", held.join(", "))
            }
        ))
    }

    /// Records the leases as this replica sees them (after each round).
    pub fn set_leases(&self, leases: BTreeMap<String, LeaseStatus>) {
        self.registry().set_leases(&leases);
        let mut status = self.status();
        for (env, lease) in leases {
            status.entry(env).or_default().lease = Some(lease);
        }
    }

    pub fn status_json(&self) -> String {
        serde_json::to_string_pretty(&*self.status()).expect("JSON")
    }

    pub fn metrics_text(&self) -> String {
        self.registry().render()
    }

    /// The status page's `/`.
    pub fn page_index(&self, now: SystemTime) -> String {
        crate::status_page::index(&self.status(), now)
    }

    /// The status page of one environment, if the controller has it.
    pub fn page_env(&self, name: &str, now: SystemTime) -> Option<String> {
        let status = self.status();
        Some(crate::status_page::environment(
            name,
            status.get(name)?,
            now,
        ))
    }

    /// A copy of one environment's status.
    pub fn env(&self, name: &str) -> Option<EnvStatus> {
        self.status().get(name).cloned()
    }
}

/// The controller, with what it talks to.
pub struct Controller<'a, K, N, M> {
    pub connect: &'a K,
    pub notifier: &'a N,
    pub sink: &'a M,
    pub settings: &'a Settings,
    pub shared: &'a Shared,
    /// Suspensions, history and alert episodes; without it they live in
    /// the process (and suspensions cannot be made).
    pub state: Option<&'a Arc<State<Backend>>>,
    /// Who the controller acts as (its caller ARN), for the history.
    pub caller: &'a str,
    /// The leases shared with other replicas (with a state table): an
    /// environment is reconciled only while this replica holds its lease.
    pub leases: Option<&'a Coordinator<Backend>>,
}

impl<K: Connect, N: Notifier, M: MetricsSink> Controller<'_, K, N, M> {
    /// Runs until `shutdown` turns true; returns when every environment's
    /// loop has ended (within the grace period). `hup` reconciles every
    /// environment at once.
    pub async fn run(
        &self,
        files: BTreeMap<String, PathBuf>,
        hup: &broadcast::Sender<()>,
        shutdown: watch::Receiver<bool>,
    ) {
        let envs_limit = Semaphore::new(self.settings.max_envs.max(1));
        let limits = apply::Limits::new(self.settings.max_parallel)
            .with_detections(self.settings.max_detections);
        for (name, file) in &files {
            self.shared.status().insert(
                name.clone(),
                EnvStatus {
                    file: file.clone(),
                    ..EnvStatus::default()
                },
            );
        }
        let loops = files.iter().enumerate().map(|(i, (name, file))| {
            let ctx = EnvLoop {
                name,
                file,
                connect: self.connect,
                notifier: self.notifier,
                sink: self.sink,
                settings: self.settings,
                shared: self.shared,
                envs_limit: &envs_limit,
                limits: &limits,
                state: self.state,
                caller: self.caller,
                leases: self.leases,
            };
            ctx.run(
                hup.subscribe(),
                shutdown.clone(),
                self.settings.seed.wrapping_add(i as u64),
            )
        });
        let leases = async {
            if let Some(c) = self.leases {
                c.run(shutdown.clone(), |c| self.shared.set_leases(c.status()))
                    .await;
                self.shared.set_leases(c.status());
            }
        };
        futures::future::join(futures::future::join_all(loops), leases).await;
    }
}

struct EnvLoop<'a, K, N, M> {
    name: &'a str,
    file: &'a Path,
    connect: &'a K,
    notifier: &'a N,
    sink: &'a M,
    settings: &'a Settings,
    shared: &'a Shared,
    envs_limit: &'a Semaphore,
    limits: &'a apply::Limits,
    state: Option<&'a Arc<State<Backend>>>,
    caller: &'a str,
    leases: Option<&'a Coordinator<Backend>>,
}

/// Why a pass of an environment starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Its interval (or its backoff, or a recheck) elapsed.
    Scheduled,
    Sighup,
    /// Its desired-state file or a template it uses changed.
    DesiredStateChanged,
    /// This replica took its lease.
    LeaseTaken,
    /// A drift detection ended with a different answer than before.
    DriftDetected,
}

impl Trigger {
    pub fn label(self) -> &'static str {
        match self {
            Trigger::Scheduled => "scheduled",
            Trigger::Sighup => "SIGHUP",
            Trigger::DesiredStateChanged => "desired state changed",
            Trigger::LeaseTaken => "lease taken",
            Trigger::DriftDetected => "drift detected",
        }
    }
}

/// The pass loop's side of what it and the drift detection loop of an
/// environment tell each other.
struct DriftLink<'n> {
    /// The desired state that loaded, for detection to follow.
    envs: watch::Sender<Option<Arc<DesiredEnv>>>,
    /// A detection's answer changed: a pass reads it.
    detected: tokio::sync::mpsc::UnboundedReceiver<()>,
    /// A pass wrote: detection looks again.
    wrote: &'n tokio::sync::Notify,
}

/// Bounds of the wait between two rounds of drift detection: a stack that
/// could not be checked is looked at again after the first; the loop also
/// comes round after the second whatever the intervals.
const DRIFT_RECHECK_MIN: Duration = Duration::from_secs(60);
const DRIFT_RECHECK_MAX: Duration = Duration::from_secs(3600);

/// What an environment's loop does after a pass: the answer of
/// [`EnvLoop::reconcile`], as a kube-runtime reconciler answers an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Pass again after this long (the interval, with jitter).
    RequeueAfter(Duration),
    /// Nothing can help but a change (of the desired state, of the
    /// credentials, of the lease): wait for it, and look again after
    /// `recheck` at the latest.
    AwaitChange {
        what: String,
        recheck: Option<Duration>,
    },
    /// A failure that may pass: the next pass on the failure backoff.
    Backoff,
}

/// What a pass came to, for `/status`: recorded once per pass.
#[derive(Default)]
struct Record<'r> {
    report: Option<&'r apply::Report>,
    /// Why the pass could not run or ended early.
    error: Option<String>,
    load_error: Option<String>,
    suspension: Option<Suspension>,
    revision: Option<String>,
}

/// What an environment's loop keeps between passes.
struct Memory<C> {
    last_good: Option<DesiredEnv>,
    /// The fingerprint of the files `last_good` was loaded from.
    loaded_from: Option<Vec<u8>>,
    watched: Vec<PathBuf>,
    files: Fingerprints,
    /// The fingerprint the file watch compares with.
    seen: Vec<u8>,
    told: Option<Told>,
    /// The environment's client, by account and region.
    cloud: Option<((String, String), C)>,
    /// Redeploys that rolled back, remembered for the process's life.
    failed_redeploys: apply::FailedRedeploys,
    revert_attempted: apply::RevertAttempted,
    /// The last pass wrote something.
    wrote: bool,
    /// How long after the last pass its sync window opens or closes: the
    /// next pass comes then if sooner (it may write, or the status says
    /// what changed).
    window_changes_in: Option<Duration>,
    rng: StdRng,
}

impl<K: Connect, N: Notifier, M: MetricsSink> EnvLoop<'_, K, N, M> {
    /// Waits for a trigger, reconciles, schedules what the pass answered;
    /// until shutdown.
    async fn run(self, hup: broadcast::Receiver<()>, shutdown: watch::Receiver<bool>, seed: u64) {
        let fence = match self.leases {
            Some(c) => c.fence(self.name),
            None => Arc::new(Fence::open()),
        };
        let (env_tx, env_rx) = watch::channel(None);
        let (wake_tx, wake_rx) = tokio::sync::mpsc::unbounded_channel();
        // A pass that wrote (a revert, an update) may have changed what the
        // last detection found: detection looks at once.
        let wrote = tokio::sync::Notify::new();
        let link = DriftLink {
            envs: env_tx,
            detected: wake_rx,
            wrote: &wrote,
        };
        futures::future::join(
            self.passes(hup, shutdown.clone(), seed, &fence, link),
            self.detect_drift(shutdown, env_rx, wake_tx, &fence, &wrote),
        )
        .await;
    }

    /// Detects the drift of the environment's stacks on their own cadence
    /// (`drift.interval`), beside the passes and never delaying one: at
    /// most `max_detections` in flight per account and region, only while
    /// this replica holds the lease, skipping stacks in a status detection
    /// does not accept. A detection whose answer differs from the last
    /// wakes a pass, which reads it (alerts, reverts).
    async fn detect_drift(
        &self,
        mut shutdown: watch::Receiver<bool>,
        mut envs: watch::Receiver<Option<Arc<DesiredEnv>>>,
        wake: tokio::sync::mpsc::UnboundedSender<()>,
        fence: &Fence,
        wrote: &tokio::sync::Notify,
    ) {
        let mut cloud: Option<((String, String), K::Cloud)> = None;
        let mut last: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut takes = fence.takes();
        loop {
            let env = envs.borrow_and_update().clone();
            let mut wait = DRIFT_RECHECK_MAX;
            if let Some(env) = env.filter(|_| fence.holds()) {
                let key = env.account_region();
                if cloud.as_ref().is_none_or(|(k, _)| *k != key) {
                    cloud = Some((key, self.connect.connect(&env).await));
                }
                let (_, c) = cloud.as_ref().expect("connected above");
                let fenced = Fenced::new(c, fence, &env.name);
                let slots = self.limits.detections_of(&env);
                let round = self.drift_round(&fenced, &env, &slots, &mut last);
                let woke = tokio::select! {
                    r = round => r,
                    _ = shutdown.changed() => break,
                };
                wait = woke.1;
                if woke.0 {
                    let _ = wake.send(());
                }
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                r = envs.changed() => if r.is_err() { break },
                // Taken (again): what is due is detected now.
                Ok(()) = takes.changed() => {}
                () = wrote.notified() => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
        }
    }

    /// One round of drift detection: the stacks whose last detection is
    /// older than their interval are detected, and so are drifted stacks
    /// updated since their detection began (a revert, an update: what was
    /// found may not hold) and detections given up waiting for last round.
    /// Answers whether an answer changed, and how long until the next
    /// stack is due.
    async fn drift_round<C: Cloud>(
        &self,
        cloud: &C,
        env: &DesiredEnv,
        slots: &crate::detect::Detections,
        last: &mut BTreeMap<String, Vec<String>>,
    ) -> (bool, Duration) {
        let names = env.stacks.values().map(|s| s.name.clone()).collect();
        let live = match cloud
            .describe_stacks(&names, (spec::ENVIRONMENT_TAG, &env.name))
            .await
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(message = "Cannot read stacks for drift detection.", environment = %env.name, error = %e);
                return (false, DRIFT_RECHECK_MIN);
            }
        };
        let now = cloud.now();
        let mut next = DRIFT_RECHECK_MAX;
        let mut due = Vec::new();
        for s in env.stacks.values() {
            // A detection given up waiting for is polled whatever the stack
            // does now: it holds a slot.
            if slots.parked(&s.name) {
                due.push(s.key.clone());
                continue;
            }
            let Some(l) = live.get(&s.name) else { continue };
            if let Some(why) = crate::detect::not_detectable(Some(l)) {
                tracing::debug!(message = "Drift detection skipped.", environment = %env.name, stack = %s.key, reason = %why);
                // Busy: looked at again soon. Stopped in a failed state: it
                // waits for a person (and a pass that writes wakes this).
                next = next.min(if l.in_progress() {
                    DRIFT_RECHECK_MIN
                } else {
                    s.drift.interval
                });
                continue;
            }
            let age = l
                .drift
                .last_check
                .map_or(Duration::MAX, |t| now.duration_since(t).unwrap_or_default());
            let stale = l.drift.status == crate::cloud::DriftStatus::Drifted
                && matches!((l.last_updated, l.drift.last_check), (Some(u), Some(c)) if u > c);
            if age >= s.drift.interval || stale || slots.parked(&s.name) {
                due.push(s.key.clone());
                next = next.min(s.drift.interval);
            } else {
                next = next.min(s.drift.interval - age);
            }
        }
        let mut changed = false;
        let deadline = Instant::now() + crate::detect::DEFAULT_WAIT;
        let found = crate::detect::detect_env(cloud, env, &due, slots, deadline).await;
        for (key, d) in found {
            match &d {
                crate::detect::Detected::Done { drift } => {
                    tracing::info!(message = "Drift detected.", environment = %env.name, stack = %key, status = drift.status.as_str(), drifted = drift.each().count(), failed = ?drift.detection_failed);
                    // New drift, drift gone, or other drift: the pass tells it
                    // (and reverts it, in revert mode).
                    let lines = drift.lines();
                    let before = last.insert(key, lines.clone()).unwrap_or_default();
                    changed |= before != lines;
                    if drift.stale {
                        next = next.min(DRIFT_RECHECK_MIN);
                    }
                }
                crate::detect::Detected::Skipped { reason } => {
                    tracing::debug!(message = "Drift detection skipped.", environment = %env.name, stack = %key, %reason);
                    next = next.min(DRIFT_RECHECK_MIN);
                }
                crate::detect::Detected::Failed { reason } => {
                    tracing::warn!(message = "Drift detection failed.", environment = %env.name, stack = %key, %reason);
                    next = next.min(DRIFT_RECHECK_MIN);
                }
            }
        }
        (changed, next.max(DRIFT_RECHECK_MIN))
    }

    /// Waits for a trigger, reconciles, schedules what the pass answered;
    /// until shutdown.
    async fn passes(
        &self,
        mut hup: broadcast::Receiver<()>,
        mut shutdown: watch::Receiver<bool>,
        seed: u64,
        fence: &Fence,
        mut link: DriftLink<'_>,
    ) {
        let mut backoff = ExponentialBackoff {
            current_interval: self.settings.backoff_initial,
            initial_interval: self.settings.backoff_initial,
            multiplier: 2.0,
            randomization_factor: 0.2,
            max_interval: self.settings.backoff_max,
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        let watched = vec![self.file.to_owned()];
        let mut files = Fingerprints::default();
        let seen = files.of(&watched);
        let mut mem: Memory<K::Cloud> = Memory {
            last_good: None,
            loaded_from: None,
            watched,
            files,
            seen,
            told: None,
            cloud: None,
            failed_redeploys: apply::FailedRedeploys::default(),
            revert_attempted: apply::RevertAttempted::default(),
            wrote: false,
            window_changes_in: None,
            rng: StdRng::seed_from_u64(seed),
        };
        let mut next = Instant::now();
        let mut watch = tokio::time::interval(self.settings.watch_every);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // While idle the loop comes round at least every `watch_every`.
        let idle_bound = self.settings.watch_every * 3 + Duration::from_secs(60);
        let mut takes = fence.takes();
        loop {
            if *shutdown.borrow() {
                break;
            }
            self.shared
                .expect_progress_by(self.name, crate::retry::instant_after(idle_bound));
            let trigger = tokio::select! {
                _ = tokio::time::sleep_until(next) => Trigger::Scheduled,
                r = hup.recv() => match r {
                    Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => Trigger::Sighup,
                    Err(broadcast::error::RecvError::Closed) => Trigger::Scheduled,
                },
                _ = watch.tick() => {
                    if mem.files.of(&mem.watched) == mem.seen {
                        continue;
                    }
                    Trigger::DesiredStateChanged
                }
                // Taken (again): a pass at once, whatever was scheduled.
                Ok(()) = takes.changed() => Trigger::LeaseTaken,
                Some(()) = link.detected.recv() => Trigger::DriftDetected,
                _ = shutdown.changed() => break,
            };
            let Some(answer) = self.reconcile(trigger, &mut mem, fence, &shutdown).await else {
                break;
            };
            if std::mem::take(&mut mem.wrote) {
                link.wrote.notify_one();
            }
            // Drift detection follows the desired state that loaded.
            if let Some(env) = &mem.last_good
                && link
                    .envs
                    .borrow()
                    .as_ref()
                    .is_none_or(|e| e.revision != env.revision || e.file != env.file)
            {
                link.envs.send_replace(Some(Arc::new(env.clone())));
            }
            let window = mem.window_changes_in.take();
            let wait = match &answer {
                Next::RequeueAfter(d) => {
                    backoff.reset();
                    self.set_waiting(None);
                    window.map_or(*d, |w| w.min(*d))
                }
                Next::AwaitChange { what, recheck } => {
                    backoff.reset();
                    self.set_waiting(Some(what.clone()));
                    recheck.unwrap_or(Duration::MAX)
                }
                Next::Backoff => {
                    self.set_waiting(None);
                    let d = backoff.next_backoff().unwrap_or(self.settings.backoff_max);
                    window.map_or(d, |w| w.min(d))
                }
            };
            tracing::debug!(message = "Next pass scheduled.", next = ?answer, in_seconds = wait.as_secs_f64());
            next = crate::retry::instant_after(wait);
        }
        tracing::info!(
            message = "Environment loop stopped.",
            environment = self.name
        );
    }

    /// One environment, once: load its desired state (keeping the last
    /// good one), check the lease and the suspension, run a pass under the
    /// fence, publish metrics, alerts and history, record the outcome, and
    /// say what to do next. `None`: shutting down.
    async fn reconcile(
        &self,
        trigger: Trigger,
        mem: &mut Memory<K::Cloud>,
        fence: &Fence,
        shutdown: &watch::Receiver<bool>,
    ) -> Option<Next> {
        // Another replica holds the environment: nothing to do until this
        // one takes the lease (which starts a pass at once).
        if !fence.holds() {
            return Some(Next::AwaitChange {
                what: "the environment's lease (held by another replica, or not yet taken)".into(),
                recheck: None,
            });
        }
        let span = tracing::info_span!("pass", environment = self.name);
        tracing::info!(
            message = "Pass starting.",
            environment = self.name,
            why = trigger.label()
        );

        let load_error = self.load(mem);
        let Some(env) = &mem.last_good else {
            // Nothing to enforce until the file is fixed: the file watch
            // (or SIGHUP) brings the next pass, not a timer.
            self.record(
                Record {
                    error: load_error.clone(),
                    load_error,
                    ..Record::default()
                },
                None,
            );
            return Some(Next::AwaitChange {
                what: "a change of the desired-state file (it never loaded)".into(),
                recheck: None,
            });
        };
        if mem.told.is_none() {
            let repeat = env
                .alerts
                .as_ref()
                .map_or(Duration::from_secs(6 * 3600), |a| a.repeat_after);
            mem.told = Some(Told::load(self.state.map(|s| &**s), self.name, repeat).await);
        }
        let told = mem.told.as_mut().expect("loaded above");

        // Waiting for its turn behind other environments is not this loop
        // stalling (theirs are watched); the pass itself is bounded by every
        // wait it may do one after another: each stack's and each service's
        // timeout, and orphan prunes (an hour each; up to eight are allowed
        // for).
        self.shared
            .expect_progress_by(self.name, crate::retry::instant_after(Duration::MAX));
        let mut stop = shutdown.clone();
        let permit = tokio::select! {
            p = self.envs_limit.acquire() => p.expect("never closed"),
            _ = stop.changed() => return None,
        };
        // The lease may have gone while this environment queued.
        if !fence.holds() {
            return Some(Next::AwaitChange {
                what: "the environment's lease (held by another replica, or not yet taken)".into(),
                recheck: None,
            });
        }
        self.shared.expect_progress_by(
            self.name,
            crate::retry::instant_after(pass_bound(env).saturating_mul(2)),
        );
        let key = env.account_region();
        if mem.cloud.as_ref().is_none_or(|(k, _)| *k != key) {
            mem.cloud = Some((key.clone(), self.connect.connect(env).await));
        }
        let (_, c) = mem.cloud.as_ref().expect("connected above");
        let limit = self.limits.of(env);
        // Fail closed: a suspension that cannot be read may be there.
        let suspension = match self.state {
            None => None,
            Some(state) => match state.suspension(self.name).await {
                Ok(s) => s,
                Err(e) => {
                    let e = format!("cannot read the suspension from the state table: {e}");
                    tracing::error!(message = "Pass not run.", error = %e);
                    self.record(
                        Record {
                            error: Some(e),
                            load_error,
                            ..Record::default()
                        },
                        Some(&told.episodes),
                    );
                    return Some(Next::Backoff);
                }
            },
        };
        let options = Options {
            depth: self.settings.depth,
            progress: None,
            failed_redeploys: mem.failed_redeploys.clone(),
            revert_attempted: mem.revert_attempted.clone(),
            detections: Some(self.limits.detections_of(env)),
            // From the loop's seeded generator: a test replays exactly.
            jitter_seed: Some(mem.rng.r#gen()),
            intent: apply::Intent::Converge,
            suspension: suspension.clone(),
            gate: self.state.map(|s| {
                Arc::new(crate::state::SuspensionGate::new(s.clone(), self.name))
                    as Arc<dyn apply::Gate>
            }),
            // The daemon never overrides a window: only a person, once.
            ignore_windows: false,
        };
        let (throttles, calls) = (c.throttles(), c.api_calls());
        let started = Instant::now();
        // Every write checks the lease; the pass ends at once when the
        // lease falls (between two calls; nothing more is sent).
        let fenced = Fenced::new(c, fence, self.name);
        let pass = apply::reconcile(&fenced, env, &limit, &options).instrument(span);
        // While the pass runs, a shutdown keeps this lease (renewed) until
        // the pass ends or its grace runs out, however it ends.
        let busy = self.leases.map(|l| Busy::new(l, self.name));
        let result = tokio::select! {
            r = pass => Some(r),
            _ = fence.lost() => None,
            _ = grace_after(shutdown.clone(), self.settings.shutdown_grace) => {
                tracing::warn!(message = "Shutting down: the pass is abandoned at a safe point; the next start continues it.");
                return None;
            }
        };
        drop(busy);
        drop(permit);
        let Some(result) = result else {
            tracing::warn!(
                message = "Lease lost: the pass is abandoned; the replica that takes the lease continues it.",
                environment = self.name
            );
            self.record(
                Record {
                    error: Some("the lease was lost during the pass; it was abandoned".into()),
                    load_error,
                    ..Record::default()
                },
                Some(&told.episodes),
            );
            return Some(Next::AwaitChange {
                what: "the environment's lease (lost during a pass)".into(),
                recheck: None,
            });
        };
        let throttled = c.throttles() - throttles;
        let calls = c.api_calls() - calls;

        let (verdict, permanent) = match &result {
            Ok(report) => {
                mem.wrote = report.wrote();
                // A second past the change: then it has happened on any
                // clock. One already past is due now.
                mem.window_changes_in = report
                    .final_plan
                    .sync_window
                    .as_ref()
                    .and_then(|w| w.next_change)
                    .map(|at| {
                        at.duration_since(c.now()).unwrap_or_default() + Duration::from_secs(1)
                    });
                let mut findings = crate::notify::findings(report);
                if let Some(e) = &load_error {
                    findings.push(Finding {
                        detail: None,
                        object: "desired-state".into(),
                        kind: Kind::Failed,
                        difference: format!("does not load, the last good state is enforced: {e}"),
                    });
                }
                let m = PassMetrics {
                    api_calls: calls,
                    ..PassMetrics::from_report(report, throttled)
                };
                self.publish(env, &m, Some(report.verdict())).await;
                self.alert(env, told, &findings, &crate::notify::unknown(report))
                    .await;
                self.record_history(env, report).await;
                tracing::info!(message = "Pass done.", environment = self.name, verdict = ?report.verdict(), seconds = report.seconds, operations = report.changed());
                self.record(
                    Record {
                        report: Some(report),
                        error: report.permanent_error.clone(),
                        load_error,
                        suspension,
                        revision: Some(env.revision.clone()),
                    },
                    Some(&told.episodes),
                );
                (Some(report.verdict()), report.permanent_error.is_some())
            }
            Err(e) => {
                tracing::error!(message = "Pass failed.", environment = self.name, error = %e);
                let m = PassMetrics {
                    api_calls: calls,
                    ..PassMetrics::from_error(self.name, started.elapsed().as_secs_f64(), throttled)
                };
                self.publish(env, &m, None).await;
                let findings = vec![Finding {
                    detail: None,
                    object: "environment".into(),
                    kind: Kind::Failed,
                    difference: e.to_string(),
                }];
                let unknown = crate::notify::unknown_without_a_pass();
                self.alert(env, told, &findings, &unknown).await;
                self.record(
                    Record {
                        error: Some(e.to_string()),
                        load_error,
                        ..Record::default()
                    },
                    Some(&told.episodes),
                );
                (None, e.is_permanent())
            }
        };
        // Retrying cannot help a permanent error: it waits for the desired
        // state (the file watch) or the credentials (a slow recheck) to
        // change. Success (or a pass of the last good state while the file
        // is broken: the file watch brings the fix) waits the interval; a
        // failure backs off.
        Some(if permanent {
            Next::AwaitChange {
                what: format!(
                    "a change of the desired state or of the credentials (rechecked every {})",
                    humantime::format_duration(PERMANENT_ERROR_RECHECK)
                ),
                recheck: Some(PERMANENT_ERROR_RECHECK),
            }
        } else if verdict.is_some_and(|v| v != Verdict::Failed) {
            let f = 1.0 + self.settings.jitter * mem.rng.gen_range(-1.0..=1.0);
            Next::RequeueAfter(self.settings.interval.mul_f64(f.clamp(0.0, 2.0)))
        } else {
            Next::Backoff
        })
    }

    /// Loads the desired state, keeping the last good one on error; files
    /// unchanged since the last good load are not parsed again (the
    /// fingerprint is taken before reading, so a write during the load is
    /// seen at the next pass). Returns the load error, if any.
    fn load(&self, mem: &mut Memory<K::Cloud>) -> Option<String> {
        let before = mem.files.of(&mem.watched);
        let unchanged = mem.last_good.is_some() && mem.loaded_from.as_ref() == Some(&before);
        let error = if unchanged {
            None
        } else {
            match spec::load(self.file) {
                Ok(env) => {
                    mem.loaded_from = (env.sources == mem.watched).then_some(before);
                    mem.watched = env.sources.clone();
                    mem.last_good = Some(env);
                    None
                }
                Err(errors) => {
                    let text = errors
                        .0
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ");
                    tracing::error!(message = "Desired state does not load; the last good one stays in force.", errors = %text);
                    Some(text)
                }
            }
        };
        mem.seen = mem.files.of(&mem.watched);
        error
    }

    fn set_waiting(&self, why: Option<String>) {
        let mut status = self.shared.status();
        status.entry(self.name.to_owned()).or_default().waiting_for = why;
    }

    /// The one place a pass's outcome goes into `/status`.
    fn record(&self, r: Record<'_>, episodes: Option<&Episodes>) {
        let mut status = self.shared.status();
        let s = status.entry(self.name.to_owned()).or_default();
        s.passes += 1;
        s.last_pass_at = Some(unix_now());
        s.error = r.error;
        s.desired_state_error = r.load_error;
        match r.report {
            Some(report) => {
                s.suspended = r.suspension;
                s.sync_window = report.final_plan.sync_window.clone();
                s.revision = r.revision.or(s.revision.take());
                s.last_pass_seconds = Some(report.seconds);
                s.result = Some(report.verdict());
                s.objects = crate::outcome::outcomes(report);
                s.drift = report
                    .final_plan
                    .stacks
                    .iter()
                    .filter_map(|p| Some((p.key.clone()?, p.drift.clone()?)))
                    .filter(|(_, d)| d.drifted())
                    .collect();
            }
            None => s.result = None,
        }
        if let Some(e) = episodes {
            s.open_alerts = e.open().cloned().collect();
        }
    }

    async fn publish(&self, env: &DesiredEnv, m: &PassMetrics, verdict: Option<Verdict>) {
        self.shared.registry().record(m, verdict);
        if let Err(e) = self
            .sink
            .put(&self.settings.metrics_namespace, &env.region, m)
            .await
        {
            tracing::warn!(message = "CloudWatch metrics not sent.", error = %e);
        }
    }

    /// A pass that wrote something goes into the history.
    async fn record_history(&self, env: &DesiredEnv, report: &apply::Report) {
        let Some(state) = self.state else { return };
        if !report.wrote() {
            return;
        }
        let entry = crate::state::history::of_pass(env, report, self.caller, None);
        if let Err(e) = state.record(self.name, &entry).await {
            tracing::warn!(message = "History not written to the state table.", error = %e);
        }
    }

    async fn alert(
        &self,
        env: &DesiredEnv,
        told: &mut Told,
        findings: &[Finding],
        unknown: &[String],
    ) {
        let Some(alert) = told
            .tell(self.state.map(|s| &**s), self.name, findings, unknown)
            .await
        else {
            return;
        };
        let Some(topic) = env.alerts.as_ref().map(|a| a.sns_topic_arn.clone()) else {
            tracing::warn!(message = "Alert not sent: no alerts.sns_topic_arn.", subject = %alert.subject);
            return;
        };
        match self.notifier.publish(&topic, &alert).await {
            Ok(()) => {
                self.shared.registry().record_alert(&env.name);
                tracing::info!(message = "Alert sent.", subject = %alert.subject, event = alert.event);
            }
            Err(e) => {
                tracing::warn!(message = "Alert not sent.", subject = %alert.subject, error = %e)
            }
        }
    }
}

/// Marks an environment as in a pass for as long as it lives.
struct Busy<'c> {
    leases: &'c Coordinator<Backend>,
    env: &'c str,
}

impl<'c> Busy<'c> {
    fn new(leases: &'c Coordinator<Backend>, env: &'c str) -> Busy<'c> {
        leases.set_busy(env, true);
        Busy { leases, env }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.leases.set_busy(self.env, false);
    }
}

/// How long a pass of `env` may take at most: every wait it may do one
/// after another (each stack's and each service's timeout, and up to
/// eight orphan prunes), plus ten minutes.
fn pass_bound(env: &DesiredEnv) -> Duration {
    let services = env
        .stacks
        .values()
        .flat_map(|s| s.ecs_services.iter().map(move |_| s.timeout));
    let orphans = std::iter::repeat_n(spec::DEFAULT_OPERATION_TIMEOUT, 8);
    env.stacks
        .values()
        .map(|s| s.timeout)
        .chain(services)
        .chain(orphans)
        .fold(Duration::from_secs(600), Duration::saturating_add)
}

/// Resolves `grace` after `shutdown` turns true; never before.
async fn grace_after(mut shutdown: watch::Receiver<bool>, grace: Duration) {
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
    tokio::time::sleep(grace).await;
}

/// Hashes of the desired state's files. Contents are hashed (a missing
/// file hashes as absent), so a change is seen whatever the file system's
/// timestamp resolution. A file is read again only when its metadata (size,
/// times, inode) changed since it was hashed, or when it had been modified
/// less than [`RACY_WINDOW`] before it was hashed (git's answer to "racy"
/// timestamps: a write in the same timestamp tick as the hash would leave
/// the metadata unchanged). A daemon watching a hundred environments every
/// 2 s reads a file only after it changes.
#[derive(Default)]
struct Fingerprints {
    files: BTreeMap<PathBuf, (Stamp, [u8; 32])>,
}

/// Whether a file may have changed, from its metadata alone.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: (i64, i64),
    changed: (i64, i64),
    inode: (u64, u64),
    /// When it was hashed, the modification was already older than
    /// [`RACY_WINDOW`]: the metadata can be trusted to show the next one.
    settled: bool,
}

/// Coarser than any file system's timestamp tick stackwarden runs on.
const RACY_WINDOW: Duration = Duration::from_secs(2);

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        let settled = m
            .modified()
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age >= RACY_WINDOW);
        Some(Stamp {
            len: m.len(),
            modified: (m.mtime(), m.mtime_nsec()),
            changed: (m.ctime(), m.ctime_nsec()),
            inode: (m.dev(), m.ino()),
            settled,
        })
    }

    fn same_file_as(&self, hashed: &Stamp) -> bool {
        hashed.settled
            && (self.len, self.modified, self.changed, self.inode)
                == (hashed.len, hashed.modified, hashed.changed, hashed.inode)
    }
}

impl Fingerprints {
    /// One hash of the files' contents, in order.
    fn of(&mut self, files: &[PathBuf]) -> Vec<u8> {
        let mut h = Sha256::new();
        for f in files {
            h.update(f.as_os_str().as_encoded_bytes());
            h.update(self.file(f));
        }
        self.files.retain(|p, _| files.contains(p));
        h.finalize().to_vec()
    }

    fn file(&mut self, path: &Path) -> [u8; 32] {
        // Taken before the read: a write during the read changes it.
        let stamp = Stamp::of(path);
        if let (Some(now), Some((hashed, digest))) = (&stamp, self.files.get(path))
            && now.same_file_as(hashed)
        {
            return *digest;
        }
        let mut h = Sha256::new();
        // Bounded and non-blocking: a FIFO or /dev/zero named here must not
        // wedge the pass loop (the load then reports what is wrong).
        let limit = crate::files::MAX_TEMPLATE_BYTES.max(crate::files::MAX_DESIRED_STATE_BYTES);
        match crate::files::read_bytes(path, limit) {
            Ok(bytes) => h.update(&bytes),
            Err(e) => {
                h.update(b"\0unreadable: ");
                h.update(e.to_string().as_bytes());
            }
        }
        let digest: [u8; 32] = h.finalize().into();
        match stamp {
            Some(stamp) => {
                self.files.insert(path.to_owned(), (stamp, digest));
            }
            None => {
                self.files.remove(path);
            }
        }
        digest
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_hashed_again_only_when_it_may_have_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev.yaml");
        let files = [path.clone()];
        let mut prints = Fingerprints::default();
        std::fs::write(&path, "a: 1").unwrap();
        let first = prints.of(&files);
        // Same size, written right after the hash: never taken as unchanged.
        std::fs::write(&path, "a: 2").unwrap();
        let second = prints.of(&files);
        assert_ne!(first, second);
        // An old file's metadata is trusted, and shows the next write.
        let old = SystemTime::now() - Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(prints.of(&files), second);
        assert!(prints.files[&path].0.settled);
        assert_eq!(prints.of(&files), second);
        std::fs::write(&path, "a: 3").unwrap();
        assert_ne!(prints.of(&files), second);
        // Gone, then back with the first content.
        std::fs::remove_file(&path).unwrap();
        let gone = prints.of(&files);
        assert_ne!(gone, second);
        std::fs::write(&path, "a: 1").unwrap();
        assert_eq!(prints.of(&files), first);
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_misses_its_deadline_makes_the_process_unhealthy() {
        let shared = Shared::default();
        assert_eq!(shared.liveness(), Ok(()));
        shared.expect_progress_by("dev", Instant::now() + Duration::from_secs(60));
        shared.expect_progress_by("prod", Instant::now() + Duration::from_secs(600));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(shared.liveness(), Ok(()));
        tokio::time::advance(Duration::from_secs(2)).await;
        let why = shared.liveness().unwrap_err();
        assert!(why.starts_with("dev: the pass loop is stalled"), "{why}");
        // Progress again: healthy again.
        shared.expect_progress_by("dev", Instant::now() + Duration::from_secs(60));
        assert_eq!(shared.liveness(), Ok(()));
    }
}
