//! `stackwarden rollback`: get failed or running stacks back to their last
//! stable state, or (`--to`, `--to-previous`) converge the environment to
//! its desired state at an earlier git commit and suspend it there.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{Semaphore, mpsc};

use super::state::{StateArgs, caller_for};
use super::{Format, Outcome, Select, load_reported, selected_files};
use crate::apply::{self, Intent, Options, Report};
use crate::cloud::Retrying;
use crate::cloud::aws::AwsCloud;
use crate::observe::Depth;
use crate::spec::DesiredEnv;
use crate::state::{Backend, EntryKind, State, Suspension, history, unix};

/// What `rollback` was asked.
pub(super) struct Rollback<'a> {
    pub select: &'a Select,
    pub stacks: &'a [String],
    pub skip: &'a [String],
    pub to: Option<&'a str>,
    pub to_previous: bool,
    pub cancel: bool,
    pub max_parallel: usize,
    pub quiet: bool,
    pub state: &'a StateArgs,
}

pub(super) async fn run(args: Rollback<'_>) -> anyhow::Result<Outcome> {
    let files = selected_files(args.select)?;
    let [(name, path)] = <[_; 1]>::try_from(files.into_iter().collect::<Vec<_>>())
        .map_err(|_| anyhow::anyhow!("rollback works on one environment: pass -e ENV"))?;
    // The working tree's desired state may be what broke: `--to` does not
    // read it (`--to-previous` needs its revision).
    let current = || {
        load_reported(&path)
            .map_err(|_| anyhow::anyhow!("{name}: invalid desired state: nothing was rolled back"))
    };
    let state = args.state.open().await;
    let caller = caller_for(state.as_ref()).await;
    if args.to.is_some() || args.to_previous {
        return to_commit(&args, &name, current, state.as_ref(), &caller).await;
    }

    let current = current()?;
    for key in args.stacks {
        if !current.stacks.contains_key(key) {
            anyhow::bail!(
                "--stack {key}: no such stack in {name} (stacks: {})",
                current
                    .stacks
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let request = crate::recovery::Request {
        stacks: args.stacks.iter().cloned().collect::<BTreeSet<_>>(),
        cancel: args.cancel,
        ..Default::default()
    }
    .with_skips(&current, args.skip)
    .map_err(|e| anyhow::anyhow!(e))?;
    let options = Options {
        depth: Depth::Fast,
        intent: Intent::Recover(request),
        ..Options::default()
    };
    let (report, out) = pass(&args, &current, options).await;
    if let (Some(s), Ok(report)) = (&state, &report)
        && report.wrote()
    {
        let entry = history::of_report(
            EntryKind::Rollback,
            &current,
            report,
            &caller,
            crate::git::checkout(&current.sources),
            Some("failed stacks rolled back to their last stable state".into()),
        );
        if let Err(e) = s.record(&name, &entry).await {
            eprintln!("warning: {name}: history not written: {e}");
        }
    }
    Ok(out)
}

/// `--to GITREF` / `--to-previous`: suspend, then converge to the desired
/// state at that commit.
async fn to_commit(
    args: &Rollback<'_>,
    name: &str,
    current: impl Fn() -> anyhow::Result<DesiredEnv>,
    state: Option<&State<Backend>>,
    caller: &str,
) -> anyhow::Result<Outcome> {
    if !args.skip.is_empty() || args.cancel || !args.stacks.is_empty() {
        anyhow::bail!(
            "--to and --to-previous roll the whole environment back to a commit; --stack, --skip and --cancel are for failed stacks"
        );
    }
    let (reference, commit) = match args.to {
        Some(r) => (
            r.to_owned(),
            crate::git::resolve(&args.select.desired_state, r)?,
        ),
        None => {
            let Some(state) = state else {
                anyhow::bail!(
                    "--to-previous reads the history: pass --state-table NAME (or set STACKWARDEN_STATE_TABLE)"
                );
            };
            let found = previous_commit(state, &current()?).await?;
            // From the table: checked to be a commit of this repository.
            let commit = crate::git::resolve(&args.select.desired_state, &found)?;
            (found, commit)
        }
    };
    let export = crate::git::export(&args.select.desired_state, &commit)?;
    let Some(file) = crate::spec::discover(&export.path)
        .ok()
        .and_then(|mut files| files.remove(name))
    else {
        anyhow::bail!("{name}: no {name}.yaml in the desired state at {reference}");
    };
    let Ok(target) = load_reported(&file) else {
        anyhow::bail!("{name}: the desired state at {reference} is invalid: nothing was done");
    };
    let short: String = commit.chars().take(12).collect();
    let why = format!("rolled back to {reference} ({short})");
    // Suspended first: a daemon's pass must not roll forward while (or
    // after) this one rolls back; one in flight stops at its next write.
    match state {
        Some(s) => {
            let suspension = Suspension {
                by: caller.to_owned(),
                since: unix(SystemTime::now()),
                reason: why.clone(),
            };
            s.suspend(name, &suspension, true).await?;
            super::state::record(s, name, EntryKind::Suspend, caller, Some(why.clone())).await;
            eprintln!("{name}: {}", suspension.describe());
        }
        None => eprintln!(
            "warning: no state table (--state-table): {name} cannot be suspended, and a running daemon or the next CI run will roll it forward again"
        ),
    }
    if target.policy.prune {
        eprintln!(
            "warning: {name}: policy.prune is on at {reference}: stacks declared since then are orphans there and will be deleted (unless protected)"
        );
    }
    let options = Options {
        depth: Depth::Full,
        // A rollback is a person's own act: it does not wait for a window
        // (like the rest of `rollback`).
        ignore_windows: true,
        ..Options::default()
    };
    let (report, out) = pass(args, &target, options).await;
    if let Some(s) = state {
        let checkout = Some(crate::git::Checkout {
            commit: commit.clone(),
            dirty: false,
        });
        let entry = match &report {
            Ok(report) => history::of_report(
                EntryKind::Rollback,
                &target,
                report,
                caller,
                checkout,
                Some(why),
            ),
            Err(e) => history::of_error(
                EntryKind::Rollback,
                &target,
                caller,
                checkout,
                format!("{why}: {e}"),
            ),
        };
        if let Err(e) = s.record(name, &entry).await {
            eprintln!("warning: {name}: history not written: {e}");
        }
    }
    Ok(out)
}

/// The commit of the newest successful pass whose revision is not the
/// current one (from the history).
async fn previous_commit(state: &State<Backend>, current: &DesiredEnv) -> anyhow::Result<String> {
    let entries = state.history(&current.name).await?;
    entries
        .iter()
        .rev()
        .filter(|e| matches!(e.kind, EntryKind::Pass | EntryKind::Rollback))
        .filter(|e| e.verdict.as_deref() == Some("in_sync") && !e.dirty)
        .filter(|e| e.revision.as_ref() != Some(&current.revision))
        .find_map(|e| e.commit.clone())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--to-previous: the history of {} has no successful pass of another revision from a clean git checkout; name the commit with --to",
                current.name
            )
        })
}

/// One pass over `env` with `options`, with progress on stderr and the
/// report on stdout; returns the report and the exit status.
async fn pass(
    args: &Rollback<'_>,
    env: &DesiredEnv,
    mut options: Options,
) -> (Result<Report, apply::ApplyError>, Outcome) {
    let (tx, rx) = mpsc::unbounded_channel();
    let printer = (!args.quiet).then(|| tokio::spawn(super::reconcile::print_progress(rx)));
    options.progress = (!args.quiet).then_some(tx);
    let cloud = Retrying::new(AwsCloud::connect(&env.region, env.assume_role.as_ref()).await);
    let limit = Arc::new(Semaphore::new(args.max_parallel));
    let result = apply::reconcile(&cloud, env, &limit, &options).await;
    drop(options);
    if let Some(p) = printer {
        let _ = p.await;
    }
    let outcome = match &result {
        Ok(report) => {
            match args.select.output {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "environment": env.name,
                        "region": env.region,
                        "revision": env.revision,
                        "verdict": report.verdict(),
                        "report": report,
                    }))
                    .expect("JSON")
                ),
                Format::Text => super::reconcile::print_report(env, report),
            }
            report.verdict().into()
        }
        Err(e) => {
            eprintln!("error: {}: {e}", env.name);
            Outcome::Failed
        }
    };
    (result, outcome)
}
