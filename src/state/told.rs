//! What has been told about an environment: its alert episodes, kept in
//! the state table when there is one, so the daemon, its other replicas and
//! `reconcile --once --alerts` in CI tell an open episode once between them.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{Expect, State, StateError, Store};
use crate::notify::{Alert, Episodes, Finding};

/// One environment's alert episodes, and the stored version they were
/// read at (`None`: not read from a table, or not readable).
pub struct Told {
    pub episodes: Episodes,
    stored: Option<Expect>,
}

/// How many times a lost race on the episodes is judged again.
const RACES: usize = 4;

impl Told {
    /// The episodes of `env` as the table has them (so a restart does not
    /// tell again what was told), or none.
    pub async fn load<S: Store>(state: Option<&State<S>>, env: &str, repeat: Duration) -> Told {
        let fresh = Told {
            episodes: Episodes::new(repeat),
            stored: None,
        };
        let Some(state) = state else { return fresh };
        match state.episodes(env).await {
            Ok((stored, expect)) => Told {
                episodes: Episodes::restore(repeat, &stored, Instant::now(), SystemTime::now()),
                stored: Some(expect),
            },
            Err(e) => {
                // Alerts still go out; at worst one is told twice.
                tracing::warn!(message = "Alert episodes not read from the state table.", environment = env, error = %e);
                fresh
            }
        }
    }

    /// The alert a pass's findings make, if any. With a table the episodes
    /// are read (when not known), updated and written back conditionally,
    /// and only an alert whose write won is returned: when another writer
    /// got there first, its episodes are read and the findings judged
    /// against them, so nothing is told twice. A table that cannot be
    /// written does not silence alerts.
    pub async fn tell<S: Store>(
        &mut self,
        state: Option<&State<S>>,
        env: &str,
        findings: &[Finding],
        unknown: &[String],
    ) -> Option<Alert> {
        let Some(state) = state else {
            return self.episodes.update(env, findings, unknown, Instant::now());
        };
        for _ in 0..RACES {
            if self.stored.is_none() {
                *self = Told::load(Some(state), env, self.episodes.repeat_after()).await;
            }
            let Some(expect) = self.stored else {
                // Unreadable table: alert from memory.
                return self.episodes.update(env, findings, unknown, Instant::now());
            };
            let alert = self
                .episodes
                .update(env, findings, unknown, Instant::now())?;
            let stored = self.episodes.stored(Instant::now(), SystemTime::now());
            match state.save_episodes(env, &stored, expect).await {
                Ok(next) => {
                    self.stored = Some(next);
                    return Some(alert);
                }
                Err(StateError::Conflict(_)) => {
                    tracing::info!(
                        message = "Alert episodes changed by another writer; judging again against theirs.",
                        environment = env
                    );
                    self.stored = None;
                }
                Err(e) => {
                    tracing::warn!(message = "Alert episodes not saved; the alert is sent anyway.", environment = env, error = %e);
                    return Some(alert);
                }
            }
        }
        None
    }
}
