//! Lease and replica records of the state table (see [`crate::lease`] for
//! the protocol). All leases live under one partition, and all replica
//! heartbeats under another, so a replica reads each with one Query per
//! round whatever the number of environments.
//!
//! | pk | sk | body |
//! |---|---|---|
//! | `leases` | `env#<name>` | `{holder, duration_ms}` (`holder` empty: released) |
//! | `replicas` | `replica#<id>` | `{id}`; its version grows at each heartbeat |

use serde::{Deserialize, Serialize};

use super::{Expect, Item, State, StateError, Store, decode, encode};

const LEASES: &str = "leases";
const REPLICAS: &str = "replicas";

/// A lease as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The replica holding it; empty when released.
    pub holder: String,
    /// How long the holder may go without renewing (milliseconds).
    pub duration_ms: u64,
}

/// A lease with the version it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    pub value: T,
    pub version: u64,
}

impl<S: Store> State<S> {
    /// Every environment's lease, by environment name.
    pub async fn leases(
        &self,
    ) -> Result<std::collections::BTreeMap<String, Versioned<Lease>>, StateError> {
        self.store
            .query(LEASES, "env#")
            .await?
            .iter()
            .map(|i| {
                let env = i.sk.trim_start_matches("env#").to_owned();
                Ok((
                    env,
                    Versioned {
                        value: decode(i)?,
                        version: i.version,
                    },
                ))
            })
            .collect()
    }

    /// Writes `env`'s lease if it is still as read (`expect`); returns its
    /// new version. Taking, renewing and releasing are all this one
    /// conditional write.
    pub async fn put_lease(
        &self,
        env: &str,
        lease: &Lease,
        expect: Expect,
    ) -> Result<u64, StateError> {
        let version = expect.next_version();
        self.store
            .put(
                &Item {
                    pk: LEASES.into(),
                    sk: format!("env#{env}"),
                    version,
                    body: encode(lease),
                    expires_at: None,
                },
                expect,
            )
            .await?;
        Ok(version)
    }

    /// Every replica's heartbeat: (id, version).
    pub async fn replicas(&self) -> Result<Vec<(String, u64)>, StateError> {
        Ok(self
            .store
            .query(REPLICAS, "replica#")
            .await?
            .into_iter()
            .map(|i| (i.sk.trim_start_matches("replica#").to_owned(), i.version))
            .collect())
    }

    /// One heartbeat of replica `id`, at `version` (a count that changes
    /// every round; others only look for change). The item is the
    /// replica's own: written without a condition, so a write whose answer
    /// was lost, or a restart under the same id, never wedges it.
    pub async fn heartbeat(&self, id: &str, version: u64) -> Result<(), StateError> {
        self.store
            .put(
                &Item {
                    pk: REPLICAS.into(),
                    sk: format!("replica#{id}"),
                    version,
                    body: serde_json::json!({ "id": id }),
                    // Left behind by a replica that died: gone within days.
                    expires_at: Some(super::unix(std::time::SystemTime::now()) + 7 * 24 * 3600),
                },
                Expect::Any,
            )
            .await
    }

    /// Removes replica `id`'s heartbeat (at shutdown).
    pub async fn leave(&self, id: &str) -> Result<(), StateError> {
        self.store
            .delete(REPLICAS, &format!("replica#{id}"), Expect::Any)
            .await
    }
}
