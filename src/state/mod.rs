//! Controller state that must outlive a process and be shared by every
//! replica and by CI: suspensions, the history of what was written, and
//! the alert episodes that are open.
//!
//! It lives in one DynamoDB table (single-table design, string keys `pk`
//! and `sk`; [`dynamo`]). Every write is conditional on what the writer
//! read ([`Expect`]), so two writers racing never lose an update: the
//! loser is told ([`StateError::Conflict`]) and reads again.
//!
//! | pk | sk | holds |
//! |---|---|---|
//! | `env#<name>` | `suspension` | [`Suspension`] |
//! | `env#<name>` | `episodes` | the open alert episodes ([`StoredEpisode`]s) |
//! | `env#<name>` | `history#<unix ms, 16 digits>#<8 hex>` | a [`HistoryEntry`], expiring (`expires_at`) |
//!
//! Every item has `version` (a number that grows by one on each write) and
//! `body` (the record as JSON).

use std::future::Future;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub mod dynamo;
pub mod history;
pub mod lease;
pub mod told;

/// How long history is kept by default (the TTL of its items).
pub const DEFAULT_HISTORY_TTL: Duration = Duration::from_secs(400 * 24 * 3600);

/// An error of the state store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The item changed (or appeared, or went) since it was read.
    #[error("changed concurrently by another writer: {0}")]
    Conflict(String),
    #[error(
        "state table {0} does not exist: create it with `stackwarden state init --state-table {0}`"
    )]
    NoTable(String),
    #[error("state table: {0}")]
    Other(String),
    #[error("state table: a stored item does not parse: {0}")]
    Corrupt(String),
}

/// What a write expects of the item it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// There is none.
    Absent,
    /// It is at this version.
    Version(u64),
    /// Whatever it is (an item only its writer writes).
    Any,
}

impl Expect {
    /// The version of an item written over what this expects.
    pub fn next_version(self) -> u64 {
        match self {
            Expect::Absent | Expect::Any => 1,
            Expect::Version(v) => v + 1,
        }
    }
}

/// One item of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub pk: String,
    pub sk: String,
    pub version: u64,
    pub body: serde_json::Value,
    /// Unix seconds after which DynamoDB's TTL may delete it.
    pub expires_at: Option<u64>,
}

/// The table's few operations. [`dynamo::DynamoStore`] is DynamoDB;
/// [`MemoryStore`] is the same semantics in memory, for simulations.
pub trait Store: Send + Sync {
    fn get(
        &self,
        pk: &str,
        sk: &str,
    ) -> impl Future<Output = Result<Option<Item>, StateError>> + Send;

    /// Writes `item` if the stored one is as `expect` says.
    fn put(
        &self,
        item: &Item,
        expect: Expect,
    ) -> impl Future<Output = Result<(), StateError>> + Send;

    /// Deletes the item if it is as `expect` says.
    fn delete(
        &self,
        pk: &str,
        sk: &str,
        expect: Expect,
    ) -> impl Future<Output = Result<(), StateError>> + Send;

    /// Every item of `pk` whose sort key starts with `prefix`, in sort-key
    /// order.
    fn query(
        &self,
        pk: &str,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<Item>, StateError>> + Send;
}

/// The store stackwarden runs on: DynamoDB, or memory for simulations.
#[derive(Clone)]
pub enum Backend {
    Dynamo(dynamo::DynamoStore),
    Memory(MemoryStore),
}

impl Store for Backend {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, StateError> {
        match self {
            Backend::Dynamo(s) => s.get(pk, sk).await,
            Backend::Memory(s) => s.get(pk, sk).await,
        }
    }

    async fn put(&self, item: &Item, expect: Expect) -> Result<(), StateError> {
        match self {
            Backend::Dynamo(s) => s.put(item, expect).await,
            Backend::Memory(s) => s.put(item, expect).await,
        }
    }

    async fn delete(&self, pk: &str, sk: &str, expect: Expect) -> Result<(), StateError> {
        match self {
            Backend::Dynamo(s) => s.delete(pk, sk, expect).await,
            Backend::Memory(s) => s.delete(pk, sk, expect).await,
        }
    }

    async fn query(&self, pk: &str, prefix: &str) -> Result<Vec<Item>, StateError> {
        match self {
            Backend::Dynamo(s) => s.query(pk, prefix).await,
            Backend::Memory(s) => s.query(pk, prefix).await,
        }
    }
}

/// Why an environment is not written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspension {
    /// The caller's ARN.
    pub by: String,
    /// Unix seconds.
    pub since: u64,
    pub reason: String,
}

impl Suspension {
    /// "suspended by ARN since TIME: REASON", for reports.
    pub fn describe(&self) -> String {
        format!(
            "suspended by {} since {}: {}",
            self.by,
            rfc3339(self.since),
            self.reason
        )
    }
}

/// What a history entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A reconcile pass that wrote something.
    Pass,
    /// `stackwarden rollback`.
    Rollback,
    Suspend,
    Resume,
}

/// One stack's part of a history entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackRecord {
    pub stack: String,
    pub revision: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_set: Option<String>,
    pub result: String,
}

/// One thing stackwarden (or a person through it) did to an environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Unix milliseconds.
    pub at_ms: u64,
    pub kind: EntryKind,
    /// The caller's ARN.
    pub caller: String,
    /// The environment's desired revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The git commit the desired state was read from, when it is a git
    /// checkout; `dirty` when the files differ from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(default)]
    pub dirty: bool,
    /// `in_sync`, `differences` or `failed` for passes and rollbacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stacks: Vec<StackRecord>,
    /// Free text: a suspension's reason, a rollback's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// An open alert episode: the finding and when it was last told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEpisode {
    pub finding: crate::notify::Finding,
    /// Unix seconds.
    pub last_alert: u64,
}

/// The typed state of environments, on a [`Store`].
pub struct State<S> {
    store: S,
    history_ttl: Duration,
}

/// How many times a read-modify-write is retried after losing a race.
const CONFLICT_RETRIES: usize = 8;

fn env_key(env: &str) -> String {
    format!("env#{env}")
}

fn decode<T: serde::de::DeserializeOwned>(item: &Item) -> Result<T, StateError> {
    serde_json::from_value(item.body.clone())
        .map_err(|e| StateError::Corrupt(format!("{} {}: {e}", item.pk, item.sk)))
}

fn encode<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect("state records serialize")
}

impl<S: Store> State<S> {
    pub fn new(store: S) -> State<S> {
        State {
            store,
            history_ttl: DEFAULT_HISTORY_TTL,
        }
    }

    pub fn with_history_ttl(mut self, ttl: Duration) -> State<S> {
        self.history_ttl = ttl;
        self
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub async fn suspension(&self, env: &str) -> Result<Option<Suspension>, StateError> {
        match self.store.get(&env_key(env), "suspension").await? {
            Some(item) => decode(&item),
            None => Ok(None),
        }
    }

    /// Suspends `env`. With `replace`, a suspension in place is replaced
    /// (a rollback re-suspends with its own reason); without, it is
    /// returned as the error's subject and left alone.
    pub async fn suspend(
        &self,
        env: &str,
        suspension: &Suspension,
        replace: bool,
    ) -> Result<Option<Suspension>, StateError> {
        let pk = env_key(env);
        for _ in 0..CONFLICT_RETRIES {
            let current = self.store.get(&pk, "suspension").await?;
            if let Some(item) = &current
                && !replace
                && let Some(active) = decode::<Option<Suspension>>(item)?
            {
                return Ok(Some(active));
            }
            let expect = current
                .as_ref()
                .map_or(Expect::Absent, |i| Expect::Version(i.version));
            let item = Item {
                pk: pk.clone(),
                sk: "suspension".into(),
                version: expect.next_version(),
                body: encode(suspension),
                expires_at: None,
            };
            match self.store.put(&item, expect).await {
                Ok(()) => return Ok(None),
                Err(StateError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StateError::Conflict(format!("{pk} suspension")))
    }

    /// Lifts the suspension of `env`; returns it, or `None` when there was
    /// none. The item stays, emptied (a tombstone), so its version keeps
    /// growing: a writer holding an old version can never mistake a later
    /// suspension for the one it read. A suspension that changed since it
    /// was read is not lifted: the caller is told to look again.
    pub async fn resume(&self, env: &str) -> Result<Option<Suspension>, StateError> {
        let pk = env_key(env);
        let Some(item) = self.store.get(&pk, "suspension").await? else {
            return Ok(None);
        };
        let Some(active) = decode::<Option<Suspension>>(&item)? else {
            return Ok(None);
        };
        let lifted = Item {
            version: item.version + 1,
            body: serde_json::Value::Null,
            ..item.clone()
        };
        match self.store.put(&lifted, Expect::Version(item.version)).await {
            Ok(()) => Ok(Some(active)),
            Err(StateError::Conflict(_)) => Err(StateError::Conflict(format!(
                "the suspension of {env} changed while it was being lifted; look at it again (`stackwarden status -e {env}`) and resume again"
            ))),
            Err(e) => Err(e),
        }
    }

    /// Appends to the history of `env`. Entries never collide: the sort
    /// key has the time and a random suffix, and the write requires that
    /// no item has it.
    pub async fn record(&self, env: &str, entry: &HistoryEntry) -> Result<(), StateError> {
        let expires = SystemTime::now()
            .checked_add(self.history_ttl)
            .map_or(u64::MAX, unix);
        for _ in 0..CONFLICT_RETRIES {
            let item = Item {
                pk: env_key(env),
                sk: format!("history#{:016}#{:08x}", entry.at_ms, rand::random::<u32>()),
                version: 1,
                body: encode(entry),
                expires_at: Some(expires),
            };
            match self.store.put(&item, Expect::Absent).await {
                Err(StateError::Conflict(_)) => continue,
                other => return other,
            }
        }
        Err(StateError::Conflict("history".into()))
    }

    /// The history of `env`, oldest first (expired items DynamoDB has not
    /// removed yet are left out).
    pub async fn history(&self, env: &str) -> Result<Vec<HistoryEntry>, StateError> {
        let now = unix(SystemTime::now());
        self.store
            .query(&env_key(env), "history#")
            .await?
            .iter()
            .filter(|i| i.expires_at.is_none_or(|t| t > now))
            .map(decode)
            .collect()
    }

    /// The open alert episodes of `env`, with the version to write back.
    pub async fn episodes(&self, env: &str) -> Result<(Vec<StoredEpisode>, Expect), StateError> {
        match self.store.get(&env_key(env), "episodes").await? {
            Some(item) => Ok((decode(&item)?, Expect::Version(item.version))),
            None => Ok((Vec::new(), Expect::Absent)),
        }
    }

    /// Writes the open episodes of `env` if nobody did since `expect`;
    /// returns the version to expect next.
    pub async fn save_episodes(
        &self,
        env: &str,
        episodes: &[StoredEpisode],
        expect: Expect,
    ) -> Result<Expect, StateError> {
        let version = expect.next_version();
        let item = Item {
            pk: env_key(env),
            sk: "episodes".into(),
            version,
            body: encode(&episodes),
            expires_at: None,
        };
        self.store.put(&item, expect).await?;
        Ok(Expect::Version(version))
    }
}

/// The [`crate::apply::Gate`] of an environment: its suspension, read
/// again (one consistent GetItem) before each write of a pass.
pub struct SuspensionGate<S> {
    state: std::sync::Arc<State<S>>,
    env: String,
}

impl<S> SuspensionGate<S> {
    pub fn new(state: std::sync::Arc<State<S>>, env: &str) -> SuspensionGate<S> {
        SuspensionGate {
            state,
            env: env.to_owned(),
        }
    }
}

impl<S: Store> crate::apply::Gate for SuspensionGate<S> {
    fn check(&self) -> futures::future::BoxFuture<'_, Result<Option<String>, String>> {
        Box::pin(async move {
            match self.state.suspension(&self.env).await {
                Ok(s) => Ok(s.map(|s| s.describe())),
                Err(e) => Err(e.to_string()),
            }
        })
    }
}

/// Unix seconds of a time (0 before the epoch).
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Unix milliseconds of a time.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// RFC 3339 (UTC, seconds) of unix seconds.
pub fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        .to_string()
}

/// The table in memory, with DynamoDB's conditional semantics. Clones
/// share the table; [`MemoryStore::replica`] gives another process's view
/// of it, with its own faults (an outage, throttled calls).
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    items: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<(String, String), Item>>>,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    failing: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl MemoryStore {
    /// The same table seen from another process: its faults are its own.
    pub fn replica(&self) -> MemoryStore {
        MemoryStore {
            items: self.items.clone(),
            ..MemoryStore::default()
        }
    }

    /// Every call of this view fails (the table is unreachable) while set.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    /// The next `n` calls of this view are throttled.
    pub fn throttle_next(&self, n: usize) {
        self.failing.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    fn fault(&self) -> Result<(), StateError> {
        use std::sync::atomic::Ordering;
        if self.down.load(Ordering::SeqCst) {
            return Err(StateError::Other(
                "cannot reach DynamoDB (simulated outage)".into(),
            ));
        }
        let throttled = self
            .failing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if throttled {
            return Err(StateError::Other(
                "ThrottlingException: Rate exceeded (simulated)".into(),
            ));
        }
        Ok(())
    }

    fn items(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<(String, String), Item>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for MemoryStore {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, StateError> {
        tokio::task::yield_now().await;
        self.fault()?;
        Ok(self.items().get(&(pk.to_owned(), sk.to_owned())).cloned())
    }

    async fn put(&self, item: &Item, expect: Expect) -> Result<(), StateError> {
        tokio::task::yield_now().await;
        self.fault()?;
        let mut items = self.items();
        let key = (item.pk.clone(), item.sk.clone());
        let ok = match (items.get(&key), expect) {
            (_, Expect::Any) | (None, Expect::Absent) => true,
            (Some(i), Expect::Version(v)) => i.version == v,
            _ => false,
        };
        if !ok {
            return Err(StateError::Conflict(format!("{} {}", item.pk, item.sk)));
        }
        items.insert(key, item.clone());
        Ok(())
    }

    async fn delete(&self, pk: &str, sk: &str, expect: Expect) -> Result<(), StateError> {
        tokio::task::yield_now().await;
        self.fault()?;
        let mut items = self.items();
        let key = (pk.to_owned(), sk.to_owned());
        let ok = match (items.get(&key), expect) {
            (_, Expect::Any) | (None, Expect::Absent) => true,
            (Some(i), Expect::Version(v)) => i.version == v,
            _ => false,
        };
        if !ok {
            return Err(StateError::Conflict(format!("{pk} {sk}")));
        }
        items.remove(&key);
        Ok(())
    }

    async fn query(&self, pk: &str, prefix: &str) -> Result<Vec<Item>, StateError> {
        tokio::task::yield_now().await;
        self.fault()?;
        Ok(self
            .items()
            .values()
            .filter(|i| i.pk == pk && i.sk.starts_with(prefix))
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suspension(reason: &str) -> Suspension {
        Suspension {
            by: "arn:aws:iam::1:user/a".into(),
            since: 1,
            reason: reason.into(),
        }
    }

    #[tokio::test]
    async fn a_suspension_is_kept_until_resumed_and_not_overwritten_unless_asked() {
        let state = State::new(MemoryStore::default());
        assert_eq!(state.suspension("dev").await.unwrap(), None);
        assert_eq!(
            state.suspend("dev", &suspension("a"), false).await.unwrap(),
            None
        );
        // A second suspension is refused, naming the first.
        assert_eq!(
            state.suspend("dev", &suspension("b"), false).await.unwrap(),
            Some(suspension("a"))
        );
        state.suspend("dev", &suspension("c"), true).await.unwrap();
        assert_eq!(
            state.suspension("dev").await.unwrap(),
            Some(suspension("c"))
        );
        assert_eq!(state.resume("dev").await.unwrap(), Some(suspension("c")));
        assert_eq!(state.resume("dev").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_resumed_suspension_keeps_its_version_growing() {
        let state = State::new(MemoryStore::default());
        state.suspend("dev", &suspension("a"), false).await.unwrap();
        // Resumed, then suspended again: the version goes on growing.
        state.resume("dev").await.unwrap();
        state
            .suspend("dev", &suspension("again"), false)
            .await
            .unwrap();
        let item = state
            .store
            .get("env#dev", "suspension")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(item.version, 3);
    }

    #[tokio::test]
    async fn a_stale_episode_write_loses() {
        let state = State::new(MemoryStore::default());
        let (open, expect) = state.episodes("dev").await.unwrap();
        assert!(open.is_empty());
        let next = state.save_episodes("dev", &[], expect).await.unwrap();
        // A second writer that read before the first wrote is refused.
        assert!(matches!(
            state.save_episodes("dev", &[], expect).await,
            Err(StateError::Conflict(_))
        ));
        state.save_episodes("dev", &[], next).await.unwrap();
    }
}
