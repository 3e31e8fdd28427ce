//! Leases: which replica reconciles which environment.
//!
//! Each environment has one lease in the state table (`holder`, a version
//! that grows on every write, the duration). A replica takes a lease that
//! is absent, released, or expired, and renews the ones it holds every
//! `renew`; every take, renewal and release is one conditional write, so
//! two replicas never both succeed. A lease is expired only when a replica
//! has seen its version unchanged for a full `duration` on its own
//! monotonic clock (the Kinesis Client Library's rule): no two machines'
//! wall clocks need agree, only their clocks' rates.
//!
//! The holder's side of the same rule is the [`Fence`]: a lease is valid
//! for `duration - margin` after the renewal's request was *sent*. Any
//! replica that later takes it over first saw that renewal's version (or a
//! newer one) after it was written, and then waited a full `duration`, so
//! the holder's validity ends before anyone else's begins. Every write to
//! AWS checks the fence first, and a pass is abandoned when it falls.
//!
//! Replicas spread environments: each heartbeats in the table, and none
//! holds more than its share (the environments divided by the live
//! replicas, rounded up); a replica above its share releases leases it is
//! not using, which the others take.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::state::lease::Lease;
use crate::state::{Expect, State, StateError, Store};

/// How long leases last and how often they are renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSettings {
    pub duration: Duration,
    pub renew: Duration,
}

impl Default for LeaseSettings {
    fn default() -> LeaseSettings {
        LeaseSettings {
            duration: Duration::from_secs(30),
            renew: Duration::from_secs(10),
        }
    }
}

impl LeaseSettings {
    /// What the holder keeps of a lease's duration for the writes already
    /// on their way when its validity ends.
    pub fn margin(&self) -> Duration {
        self.duration / 5
    }

    /// A renewal interval must leave room for a failed renewal and a retry
    /// before the lease's validity (duration minus the margin) runs out.
    ///
    /// # Errors
    /// The renewal is not at most half of the duration minus the margin.
    pub fn check(&self) -> Result<(), String> {
        if self.renew.is_zero() || self.renew * 2 > self.duration - self.margin() {
            return Err(format!(
                "--lease-renew ({}) must be at most half of --lease-duration ({}) minus a fifth of it",
                humantime::format_duration(self.renew),
                humantime::format_duration(self.duration)
            ));
        }
        Ok(())
    }
}

/// Whether this replica may write to one environment now.
#[derive(Debug)]
pub struct Fence {
    until: watch::Sender<Option<Instant>>,
    /// Counts the times the lease was taken (not renewed).
    takes: watch::Sender<u64>,
}

impl Default for Fence {
    fn default() -> Fence {
        Fence {
            until: watch::channel(None).0,
            takes: watch::channel(0).0,
        }
    }
}

impl Fence {
    /// A fence that always holds (a single replica without a state table).
    pub fn open() -> Fence {
        Fence {
            until: watch::channel(Some(crate::retry::instant_after(Duration::MAX))).0,
            takes: watch::channel(0).0,
        }
    }

    /// The lease is held and valid now.
    pub fn holds(&self) -> bool {
        self.until.borrow().is_some_and(|t| Instant::now() < t)
    }

    /// Resolves once the lease is no longer valid (at once if it is not).
    pub async fn lost(&self) {
        let mut rx = self.until.subscribe();
        loop {
            let until = *rx.borrow_and_update();
            match until {
                Some(t) if Instant::now() < t => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(t) => {}
                        r = rx.changed() => if r.is_err() { return },
                    }
                }
                _ => return,
            }
        }
    }

    /// Changes each time this replica takes the lease: a loop waiting on
    /// it starts a pass then, whatever it was waiting for.
    pub fn takes(&self) -> watch::Receiver<u64> {
        self.takes.subscribe()
    }

    fn set(&self, until: Option<Instant>) {
        self.until.send_replace(until);
    }

    fn took(&self) {
        self.takes.send_modify(|n| *n += 1);
    }
}

/// One environment's lease as this replica sees it, for `/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LeaseStatus {
    /// The replica holding it (this one or another), if any.
    pub holder: Option<String>,
    /// This replica holds it and may write.
    pub held: bool,
    /// Seconds since this replica took it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_for_seconds: Option<u64>,
    /// Times this replica took it over from another holder.
    pub handovers: u64,
}

/// A version seen, and since when (on this replica's clock).
#[derive(Debug, Clone, Copy)]
struct Seen {
    version: u64,
    since: Instant,
}

#[derive(Debug)]
struct Held {
    version: u64,
    acquired: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    held: BTreeMap<String, Held>,
    /// Versions of leases this replica does not hold.
    seen: BTreeMap<String, Seen>,
    /// Other replicas' heartbeats.
    replicas: BTreeMap<String, Seen>,
    heartbeat: Option<u64>,
    /// Environments in a pass: not released to rebalance.
    busy: BTreeSet<String>,
    holders: BTreeMap<String, String>,
    handovers: BTreeMap<String, u64>,
    /// Released leases, since when this replica sees them free.
    free_since: BTreeMap<String, Instant>,
}

/// This replica's side of the leases on a set of environments.
pub struct Coordinator<S> {
    state: Arc<State<S>>,
    me: String,
    settings: LeaseSettings,
    fences: BTreeMap<String, Arc<Fence>>,
    inner: Mutex<Inner>,
}

impl<S: Store> Coordinator<S> {
    pub fn new(
        state: Arc<State<S>>,
        me: &str,
        settings: LeaseSettings,
        envs: impl IntoIterator<Item = String>,
    ) -> Coordinator<S> {
        Coordinator {
            state,
            me: me.to_owned(),
            settings,
            fences: envs
                .into_iter()
                .map(|e| (e, Arc::new(Fence::default())))
                .collect(),
            inner: Mutex::default(),
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fence of `env` (one of the environments given at creation).
    pub fn fence(&self, env: &str) -> Arc<Fence> {
        self.fences.get(env).cloned().unwrap_or_default()
    }

    /// Marks `env` as in a pass (or not): a busy lease is not released to
    /// rebalance.
    pub fn set_busy(&self, env: &str, busy: bool) {
        let mut inner = self.inner();
        if busy {
            inner.busy.insert(env.to_owned());
        } else {
            inner.busy.remove(env);
        }
    }

    /// Every environment's lease as this replica sees it.
    pub fn status(&self) -> BTreeMap<String, LeaseStatus> {
        let inner = self.inner();
        let now = Instant::now();
        self.fences
            .iter()
            .map(|(env, fence)| {
                let held = inner.held.get(env);
                (
                    env.clone(),
                    LeaseStatus {
                        holder: inner.holders.get(env).filter(|h| !h.is_empty()).cloned(),
                        held: held.is_some() && fence.holds(),
                        held_for_seconds: held.map(|h| (now - h.acquired).as_secs()),
                        handovers: inner.handovers.get(env).copied().unwrap_or(0),
                    },
                )
            })
            .collect()
    }

    /// Renews, releases and takes leases until `shutdown`; then releases
    /// every lease held (so another replica takes over at once) and
    /// removes this replica's heartbeat.
    /// `after_round` is told after each round (to publish the status).
    pub async fn run(
        &self,
        mut shutdown: watch::Receiver<bool>,
        after_round: impl Fn(&Coordinator<S>),
    ) {
        // Rounds at a fixed rate: a slow round does not push the next
        // renewal later.
        let mut rounds = tokio::time::interval(self.settings.renew);
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *shutdown.borrow() {
                break;
            }
            tokio::select! {
                _ = rounds.tick() => {}
                _ = shutdown.changed() => break,
            }
            tokio::select! {
                _ = self.tick() => {}
                _ = shutdown.changed() => break,
            }
            after_round(self);
        }
        self.shut_down(after_round).await;
    }

    /// Leaves: idle leases go at once; one whose pass is finishing (within
    /// the shutdown grace) stays held and renewed until that environment's
    /// loop lets it go; then the heartbeat is removed, so the others count
    /// this replica gone.
    pub async fn shut_down(&self, after_round: impl Fn(&Coordinator<S>)) {
        let mut last_renewal = Instant::now();
        loop {
            self.release_idle("shutting down").await;
            if self.inner().held.is_empty() {
                break;
            }
            if last_renewal.elapsed() >= self.settings.renew {
                last_renewal = Instant::now();
                self.renew_held().await;
            }
            after_round(self);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.leave().await;
        after_round(self);
    }

    /// One round: renew what is held (first, so a slow table delays it
    /// least), heartbeat, read the leases, release above the share, take up
    /// to it.
    pub async fn tick(&self) {
        self.renew_held().await;
        let beat = self.inner().heartbeat.map_or(1, |v| v + 1);
        match self.state.heartbeat(&self.me, beat).await {
            Ok(()) => self.inner().heartbeat = Some(beat),
            Err(e) => tracing::warn!(message = "Heartbeat not written.", error = %e),
        }
        let (leases, replicas) = match (self.state.leases().await, self.state.replicas().await) {
            (Ok(l), Ok(r)) => (l, r),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(message = "Leases not read; none is taken this round.", error = %e);
                return;
            }
        };
        let now = Instant::now();
        let live = {
            let mut inner = self.inner();
            let others: BTreeMap<String, Seen> = replicas
                .into_iter()
                .filter(|(id, _)| *id != self.me)
                .map(|(id, version)| {
                    let seen = match inner.replicas.get(&id) {
                        Some(s) if s.version == version => *s,
                        _ => Seen {
                            version,
                            since: now,
                        },
                    };
                    (id, seen)
                })
                .collect();
            inner.replicas = others;
            1 + inner
                .replicas
                .values()
                .filter(|s| now.duration_since(s.since) < self.settings.duration)
                .count()
        };
        // A lease we hold that another replica now holds was lost.
        let lost: Vec<String> = {
            let inner = self.inner();
            inner
                .held
                .iter()
                .filter(|(env, h)| {
                    leases
                        .get(*env)
                        .is_some_and(|l| l.version > h.version || l.value.holder != self.me)
                })
                .map(|(env, _)| env.clone())
                .collect()
        };
        for env in lost {
            self.lose(&env, "taken by another replica");
        }

        // Others' leases: when their version last moved.
        {
            let mut inner = self.inner();
            for (env, l) in &leases {
                inner.holders.insert(env.clone(), l.value.holder.clone());
                if l.value.holder.is_empty() {
                    inner.free_since.entry(env.clone()).or_insert(now);
                } else {
                    inner.free_since.remove(env);
                }
                if inner.held.contains_key(env) {
                    inner.seen.remove(env);
                    continue;
                }
                let moved = inner.seen.get(env).is_none_or(|s| s.version != l.version);
                if moved {
                    inner.seen.insert(
                        env.clone(),
                        Seen {
                            version: l.version,
                            since: now,
                        },
                    );
                }
            }
        }

        let total = self.fences.len();
        let share = total.div_ceil(live.max(1));
        self.rebalance(share).await;
        self.take(share, &leases, now).await;
    }

    /// The leases held whose environment `keep` accepts, with their versions.
    fn held_where(&self, keep: impl Fn(&Inner, &str) -> bool) -> Vec<(String, u64)> {
        let inner = self.inner();
        inner
            .held
            .iter()
            .filter(|(e, _)| keep(&inner, e.as_str()))
            .map(|(e, h)| (e.clone(), h.version))
            .collect()
    }

    /// Renews every lease held. A renewal refused may have landed all the
    /// same (an answer lost, a retried request): the lease is read again
    /// and kept when it is ours at the next version.
    async fn renew_held(&self) {
        for (env, version) in self.held_where(|_, _| true) {
            let sent = Instant::now();
            let written = match self
                .state
                .put_lease(&env, &self.lease(), Expect::Version(version))
                .await
            {
                Ok(v) => Some(v),
                Err(StateError::Conflict(_)) => self.own_at(&env, version + 1).await,
                Err(e) => {
                    tracing::warn!(message = "Lease not renewed; it lapses unless the next renewal succeeds.", environment = %env, error = %e);
                    continue;
                }
            };
            match written {
                Some(v) => {
                    if let Some(h) = self.inner().held.get_mut(&env) {
                        h.version = v;
                    }
                    self.fence(&env).set(Some(self.valid_from(sent)));
                }
                None => self.lose(&env, "renewal refused"),
            }
        }
    }

    /// `Some(version)` when the lease of `env` is this replica's at
    /// `version` (a write of ours whose answer said otherwise).
    async fn own_at(&self, env: &str, version: u64) -> Option<u64> {
        let leases = self.state.leases().await.ok()?;
        let l = leases.get(env)?;
        (l.value.holder == self.me && l.version == version).then_some(version)
    }

    /// Releases the leases held whose environment is not in a pass.
    async fn release_idle(&self, why: &str) {
        for (env, version) in self.held_where(|inner, e| !inner.busy.contains(e)) {
            self.release(&env, version, why).await;
        }
    }

    /// Removes this replica's heartbeat, so the others count it gone.
    async fn leave(&self) {
        if self.inner().heartbeat.take().is_some()
            && let Err(e) = self.state.leave(&self.me).await
        {
            tracing::warn!(message = "Heartbeat not removed.", error = %e);
        }
    }

    /// Releases leases above the share, those not in a pass first.
    async fn rebalance(&self, share: usize) {
        let above = self.inner().held.len().saturating_sub(share);
        let idle = self.held_where(|inner, e| !inner.busy.contains(e));
        for (env, version) in idle.into_iter().take(above) {
            self.release(&env, version, "above this replica's share")
                .await;
        }
    }

    /// Takes free or expired leases, up to the share; beyond it, a lease
    /// left free for two rounds (no replica below its share wanted it: the
    /// others may be dead ones whose heartbeats have not aged out yet).
    async fn take(
        &self,
        share: usize,
        leases: &BTreeMap<String, crate::state::lease::Versioned<Lease>>,
        now: Instant,
    ) {
        // Each replica tries the environments in its own order, so two
        // starting together rarely race for the same one.
        let mut candidates: Vec<&String> = self.fences.keys().collect();
        candidates.sort_by_key(|e| Sha256::digest(format!("{}\0{e}", self.me)).to_vec());
        for env in candidates {
            if self.inner().held.contains_key(env) {
                continue;
            }
            if self.inner().held.len() >= share {
                let unwanted = self
                    .inner()
                    .free_since
                    .get(env)
                    .is_some_and(|t| now.duration_since(*t) >= self.settings.renew * 2);
                if !unwanted {
                    continue;
                }
            }
            let (expect, from) = match leases.get(env) {
                None => (Expect::Absent, None),
                Some(l) if l.value.holder.is_empty() => (Expect::Version(l.version), None),
                Some(l) => {
                    let seen = self.inner().seen.get(env).copied();
                    let expired = seen.is_some_and(|s| {
                        s.version == l.version
                            && now.duration_since(s.since) >= self.settings.duration
                    });
                    if !expired {
                        continue;
                    }
                    (Expect::Version(l.version), Some(l.value.holder.clone()))
                }
            };
            let sent = Instant::now();
            let next = expect.next_version();
            let written = match self.state.put_lease(env, &self.lease(), expect).await {
                Err(StateError::Conflict(_)) => match self.own_at(env, next).await {
                    Some(v) => Ok(v),
                    None => Err(StateError::Conflict(env.clone())),
                },
                other => other,
            };
            match written {
                Ok(version) => {
                    let mut inner = self.inner();
                    inner.held.insert(
                        env.clone(),
                        Held {
                            version,
                            acquired: sent,
                        },
                    );
                    inner.seen.remove(env);
                    inner.holders.insert(env.clone(), self.me.clone());
                    if from.is_some() {
                        *inner.handovers.entry(env.clone()).or_default() += 1;
                    }
                    drop(inner);
                    self.fence(env).set(Some(self.valid_from(sent)));
                    self.fence(env).took();
                    tracing::info!(message = "Lease taken.", environment = %env, replica = %self.me, from = from.as_deref().unwrap_or("nobody"));
                }
                Err(StateError::Conflict(_)) => {}
                Err(e) => {
                    tracing::warn!(message = "Lease not taken.", environment = %env, error = %e)
                }
            }
        }
    }

    fn lease(&self) -> Lease {
        Lease {
            holder: self.me.clone(),
            duration_ms: self.settings.duration.as_millis() as u64,
        }
    }

    /// Until when a lease written by a request sent at `sent` is valid.
    fn valid_from(&self, sent: Instant) -> Instant {
        sent + (self.settings.duration - self.settings.margin())
    }

    fn lose(&self, env: &str, why: &str) {
        // The fence first: nothing is written past this point.
        self.fence(env).set(None);
        if self.inner().held.remove(env).is_some() {
            tracing::warn!(message = "Lease lost.", environment = %env, why);
        }
    }

    async fn release(&self, env: &str, version: u64, why: &str) {
        self.fence(env).set(None);
        self.inner().held.remove(env);
        let released = Lease {
            holder: String::new(),
            duration_ms: self.settings.duration.as_millis() as u64,
        };
        match self
            .state
            .put_lease(env, &released, Expect::Version(version))
            .await
        {
            Ok(_) => tracing::info!(message = "Lease released.", environment = %env, why),
            Err(e) => {
                tracing::warn!(message = "Lease not released; it lapses.", environment = %env, error = %e)
            }
        }
    }
}

/// A replica id: the host name, the process id and a random suffix, so a
/// restarted process is a new replica.
pub fn replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "stackwarden".into());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}
