//! The state table from the command line: `state init`, `suspend`,
//! `resume`, `history`, and the `--state-table` option the other commands
//! share.

use std::time::{Duration, SystemTime};

use clap::Args;

use super::{Format, Outcome};
use crate::state::dynamo::DynamoStore;
use crate::state::{
    Backend, EntryKind, HistoryEntry, State, StateError, Suspension, rfc3339, unix, unix_ms,
};

/// Where controller state is kept.
#[derive(Debug, Args, Clone)]
pub(super) struct StateArgs {
    /// DynamoDB table of suspensions, history and alert episodes (see
    /// `stackwarden state init`). Without it, suspensions and history are
    /// unavailable and alert episodes live in the process.
    #[arg(long, value_name = "NAME", env = "STACKWARDEN_STATE_TABLE")]
    state_table: Option<String>,
    /// How long history entries are kept (DynamoDB TTL), humantime.
    #[arg(long, value_name = "DURATION", default_value = "400days", value_parser = parse_ttl)]
    history_ttl: Duration,
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    super::bounded_duration(
        s,
        (
            Duration::from_secs(24 * 3600),
            Duration::from_secs(10 * 366 * 24 * 3600),
        ),
    )
}

impl StateArgs {
    /// The state table, when one is configured.
    pub(super) async fn open(&self) -> Option<State<Backend>> {
        let table = self.state_table.as_deref()?;
        let store = DynamoStore::connect(table).await;
        Some(State::new(Backend::Dynamo(store)).with_history_ttl(self.history_ttl))
    }

    /// The state table, or an error naming the flag for `what`.
    pub(super) async fn require(&self, what: &str) -> anyhow::Result<State<Backend>> {
        match self.open().await {
            Some(s) => Ok(s),
            None => anyhow::bail!(
                "{what} needs the state table: pass --state-table NAME (or set STACKWARDEN_STATE_TABLE); create it with `stackwarden state init --state-table NAME`"
            ),
        }
    }
}

/// The ARN of the credentials in use (STS GetCallerIdentity), for the
/// history and suspensions; a placeholder that says why when it cannot be
/// read.
pub(super) async fn caller_arn() -> String {
    let config = crate::cloud::aws::shared_config().await;
    match aws_sdk_sts::Client::new(&config)
        .get_caller_identity()
        .send()
        .await
    {
        Ok(out) => out.arn().unwrap_or("unknown").to_owned(),
        Err(e) => format!(
            "unknown (GetCallerIdentity: {})",
            crate::cloud::aws::classify(e)
        ),
    }
}

/// The caller's ARN where a state table will record it (history,
/// suspensions); without one nothing records it, and STS is not asked.
pub(super) async fn caller_for<T>(state: Option<&T>) -> String {
    match state {
        Some(_) => caller_arn().await,
        None => String::new(),
    }
}

pub(super) async fn init(table: &str) -> anyhow::Result<Outcome> {
    let store = DynamoStore::connect(table).await;
    let created = store.create_table().await?;
    println!(
        "{table}: {} (pk/sk strings, on-demand, TTL on {})",
        if created {
            "created"
        } else {
            "exists; key schema checked"
        },
        crate::state::dynamo::TTL_ATTRIBUTE
    );
    Ok(Outcome::InSync)
}

pub(super) async fn suspend(env: &str, reason: &str, state: &StateArgs) -> anyhow::Result<Outcome> {
    let state = state.require("suspend").await?;
    let caller = caller_arn().await;
    let suspension = Suspension {
        by: caller.clone(),
        since: unix(SystemTime::now()),
        reason: reason.to_owned(),
    };
    if let Some(existing) = state.suspend(env, &suspension, false).await? {
        eprintln!(
            "error: {env} is already {}; `stackwarden resume -e {env}` first",
            existing.describe()
        );
        return Ok(Outcome::Failed);
    }
    record(
        &state,
        env,
        EntryKind::Suspend,
        &caller,
        Some(reason.to_owned()),
    )
    .await;
    println!("{env}: {}", suspension.describe());
    Ok(Outcome::InSync)
}

pub(super) async fn resume(env: &str, state: &StateArgs) -> anyhow::Result<Outcome> {
    let state = state.require("resume").await?;
    let caller = caller_arn().await;
    match state.resume(env).await? {
        Some(was) => {
            record(
                &state,
                env,
                EntryKind::Resume,
                &caller,
                Some(format!("was {}", was.describe())),
            )
            .await;
            println!(
                "{env}: resumed (was {}); the next pass converges",
                was.describe()
            );
            Ok(Outcome::InSync)
        }
        None => {
            println!("{env}: not suspended");
            Ok(Outcome::InSync)
        }
    }
}

/// Writes a history entry without a pass (a suspension, a resumption);
/// a failure is a warning, the act itself is done.
pub(super) async fn record(
    state: &State<Backend>,
    env: &str,
    kind: EntryKind,
    caller: &str,
    note: Option<String>,
) {
    let entry = HistoryEntry {
        at_ms: unix_ms(SystemTime::now()),
        kind,
        caller: caller.to_owned(),
        revision: None,
        commit: None,
        dirty: false,
        verdict: None,
        stacks: vec![],
        note,
    };
    if let Err(e) = state.record(env, &entry).await {
        eprintln!("warning: {env}: history not written: {e}");
    }
}

pub(super) async fn history(
    env: &str,
    stack: Option<&str>,
    output: Format,
    state: &StateArgs,
) -> anyhow::Result<Outcome> {
    let state = state.require("history").await?;
    let mut entries = state.history(env).await?;
    if let Some(key) = stack {
        entries.retain(|e| e.stacks.iter().any(|s| s.stack == key));
        for e in &mut entries {
            e.stacks.retain(|s| s.stack == key);
        }
    }
    match output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&entries)?),
        Format::Text => {
            if entries.is_empty() {
                println!("{env}: no history");
            }
            for e in &entries {
                print_entry(e);
            }
        }
    }
    Ok(Outcome::InSync)
}

fn print_entry(e: &HistoryEntry) {
    let kind = match e.kind {
        EntryKind::Pass => "pass",
        EntryKind::Rollback => "rollback",
        EntryKind::Suspend => "suspend",
        EntryKind::Resume => "resume",
    };
    let mut head = format!("{} {kind:<8}", rfc3339(e.at_ms / 1000));
    if let Some(v) = &e.verdict {
        head.push_str(&format!(" {v}"));
    }
    if let Some(r) = &e.revision {
        head.push_str(&format!(" revision {r}"));
    }
    if let Some(c) = &e.commit {
        let short: String = c.chars().take(12).collect();
        head.push_str(&format!(
            " commit {short}{}",
            if e.dirty { " (dirty)" } else { "" }
        ));
    }
    head.push_str(&format!(" by {}", e.caller));
    println!("{head}");
    if let Some(n) = &e.note {
        println!("    {n}");
    }
    for s in &e.stacks {
        println!(
            "    {:<14} revision {} {} {}",
            s.stack,
            s.revision,
            s.change_set.as_deref().unwrap_or("-"),
            s.result
        );
    }
}

/// The suspension of `env`, for commands that only read: an unreadable
/// table is a warning there (they write nothing).
pub(super) async fn read_suspension(
    state: Option<&State<Backend>>,
    env: &str,
) -> Result<Option<Suspension>, StateError> {
    match state {
        Some(s) => s.suspension(env).await,
        None => Ok(None),
    }
}
