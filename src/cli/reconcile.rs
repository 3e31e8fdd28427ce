//! `reconcile --once`: one pass over each selected environment, with
//! progress on stderr and a report on stdout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::state::caller_arn;
use super::{Format, Outcome, ReconcileArgs, load_selected};
use crate::apply::{self, Options, Progress, Report, StackResult};
use crate::cloud::Retrying;
use crate::cloud::StackStatus;
use crate::cloud::aws::AwsCloud;
use crate::observe::Depth;
use crate::spec::DesiredEnv;
use crate::state::{Backend, State, history};

/// How often the progress view repeats what is still running.
const HEARTBEAT: Duration = Duration::from_secs(15);

pub(super) async fn once(args: &ReconcileArgs) -> anyhow::Result<Outcome> {
    let (select, state_args, quiet, stats) = (&args.select, &args.state, args.quiet, args.stats);
    let (envs, load_failed) = load_selected(select)?;
    if load_failed {
        // Bad input changes nothing, in any environment.
        eprintln!("error: invalid desired state: nothing was applied");
        return Ok(Outcome::Failed);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let printer = (!quiet).then(|| tokio::spawn(print_progress(rx)));
    let options = Options {
        depth: if args.fast { Depth::Fast } else { Depth::Full },
        progress: (!quiet).then_some(tx),
        ignore_windows: args.ignore_windows,
        ..Options::default()
    };

    // One bound per account (role) and region, shared by its environments.
    let limits = apply::Limits::new(usize::from(args.max_parallel));
    let state = state_args.open().await.map(Arc::new);
    let runs = envs.iter().map(|env| {
        let limit = limits.of(env);
        let mut options = options.clone();
        options.detections = Some(limits.detections_of(env));
        let state = state.as_ref();
        async move {
            // Fail closed: a suspension that cannot be read may be there.
            match super::state::read_suspension(state.map(|s| &**s), &env.name).await {
                Ok(s) => options.suspension = s,
                Err(e) => {
                    let e = format!("cannot read the suspension from the state table: {e}");
                    return (env, Err(e), 0);
                }
            }
            options.gate = state.map(|s| {
                Arc::new(crate::state::SuspensionGate::new(s.clone(), &env.name))
                    as Arc<dyn apply::Gate>
            });
            let cloud =
                Retrying::new(AwsCloud::connect(&env.region, env.assume_role.as_ref()).await);
            let result = apply::reconcile(&cloud, env, &limit, &options)
                .await
                .map_err(|e| e.to_string());
            (env, result, cloud.calls().get())
        }
    });
    let results = futures::future::join_all(runs).await;
    drop(options);
    if let Some(state) = &state {
        // Who acted, asked only when something was written.
        let mut caller = None;
        for (env, result, _) in &results {
            let overridden = result.as_ref().ok().and_then(window_overridden);
            if let Ok(report) = result
                && (report.wrote() || overridden.is_some())
            {
                if caller.is_none() {
                    caller = Some(caller_arn().await);
                }
                let caller = caller.as_deref().unwrap_or_default();
                let entry = history::of_pass(env, report, caller, overridden);
                if let Err(e) = state.record(&env.name, &entry).await {
                    eprintln!("warning: {}: history not written: {e}", env.name);
                }
            }
        }
    }
    if args.alerts {
        send_alerts(&results, state.as_deref()).await;
    }
    if let Some(p) = printer {
        let _ = p.await;
    }

    let mut outcome = Outcome::InSync;
    let mut json = Vec::new();
    for (env, result, calls) in results {
        match result {
            Ok(report) => {
                outcome = outcome.worst(report.verdict().into());
                // Held by a closed window: not converged, whatever it found.
                if report
                    .final_plan
                    .sync_window
                    .as_ref()
                    .is_some_and(|w| !w.open && !w.ignored)
                {
                    outcome = outcome.worst(Outcome::Differences);
                }
                match select.output {
                    Format::Json => json.push(serde_json::json!({
                        "environment": env.name,
                        "region": env.region,
                        "revision": env.revision,
                        "verdict": report.verdict(),
                        "api_calls": calls,
                        "report": report,
                    })),
                    Format::Text => print_report(env, &report),
                }
            }
            Err(e) => {
                outcome = Outcome::Failed;
                eprintln!("error: {}: {e}", env.name);
                if select.output == Format::Json {
                    json.push(serde_json::json!({
                        "environment": env.name,
                        "region": env.region,
                        "revision": env.revision,
                        "verdict": "failed",
                        "error": e.to_string(),
                        "api_calls": calls,
                    }));
                }
            }
        }
        if stats {
            eprintln!("{}: {calls} AWS API calls", env.name);
        }
    }
    if select.output == Format::Json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    }
    Ok(outcome)
}

/// The history note of a pass that wrote outside its sync window on
/// `--ignore-windows`.
fn window_overridden(report: &Report) -> Option<String> {
    if !report.window_overridden {
        return None;
    }
    let opens = report
        .final_plan
        .sync_window
        .as_ref()
        .filter(|w| !w.open)
        .and_then(|w| w.next_change_local.as_ref());
    Some(format!(
        "--ignore-windows: written outside the sync window{}",
        opens
            .map(|at| format!(" (it opens at {at})"))
            .unwrap_or_default()
    ))
}

/// One alert per environment with new findings. With a state table, the
/// episodes are the daemon's (and every other run's): what is open and
/// told is not told again. Without one, a run has no memory of earlier
/// episodes, and CI decides how often it runs.
async fn send_alerts(
    results: &[(&DesiredEnv, Result<Report, String>, u64)],
    state: Option<&State<Backend>>,
) {
    use crate::notify::{Finding, Kind, Notifier, SnsNotifier};
    use crate::state::told::Told;
    let notifier = SnsNotifier::connect().await;
    for (env, result, _) in results {
        let Some(topic) = env.alerts.as_ref().map(|a| &a.sns_topic_arn) else {
            continue;
        };
        let (findings, unknown) = match result {
            Ok(report) => (
                crate::notify::findings(report),
                crate::notify::unknown(report),
            ),
            Err(e) => (
                vec![Finding {
                    detail: None,
                    object: "environment".into(),
                    kind: Kind::Failed,
                    difference: e.clone(),
                }],
                crate::notify::unknown_without_a_pass(),
            ),
        };
        let repeat = env
            .alerts
            .as_ref()
            .map_or(Duration::MAX, |a| a.repeat_after);
        let mut told = Told::load(state, &env.name, repeat).await;
        let Some(alert) = told.tell(state, &env.name, &findings, &unknown).await else {
            continue;
        };
        if let Err(e) = notifier.publish(topic, &alert).await {
            eprintln!("warning: {}: alert not sent: {e}", env.name);
        }
    }
}

/// Prints progress lines to stderr until every sender is gone: each
/// stack's start, its events and its end, and every few seconds what is
/// still running and for how long.
pub(super) async fn print_progress(mut rx: mpsc::UnboundedReceiver<Progress>) {
    let start = Instant::now();
    let mut running: BTreeMap<(String, String), Instant> = BTreeMap::new();
    let mut heartbeat = tokio::time::interval_at(start + HEARTBEAT, HEARTBEAT);
    let stamp = |at: Instant| format!("[{:>7.1}s]", at.duration_since(start).as_secs_f64());
    loop {
        tokio::select! {
            p = rx.recv() => {
                let Some(p) = p else { return };
                let now = Instant::now();
                match p {
                    Progress::Started { environment, stack, action } => {
                        eprintln!("{} {environment}/{stack}: {action}", stamp(now));
                        running.insert((environment, stack), now);
                    }
                    Progress::Event { environment, stack, event } => {
                        let reason = event.reason.map(|r| format!(" ({r})")).unwrap_or_default();
                        eprintln!(
                            "{}   {environment}/{stack}: {} {} {}{reason}",
                            stamp(now), event.logical_id, event.resource_type, event.status
                        );
                    }
                    Progress::Finished { environment, stack, result, elapsed } => {
                        if running.remove(&(environment.clone(), stack.clone())).is_some()
                            || result != StackResult::InSync
                        {
                            eprintln!(
                                "{} {environment}/{stack}: {result} ({})",
                                stamp(now),
                                humantime::format_duration(round(elapsed))
                            );
                        }
                    }
                }
            }
            _ = heartbeat.tick() => {
                if !running.is_empty() {
                    let now = Instant::now();
                    let list: Vec<String> = running
                        .iter()
                        .map(|((e, s), t)| format!("{e}/{s} {}", humantime::format_duration(round(now - *t))))
                        .collect();
                    eprintln!("{} running: {}", stamp(now), list.join(", "));
                }
            }
        }
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64 / 100 * 100)
}

pub(super) fn print_report(env: &DesiredEnv, report: &Report) {
    println!(
        "{} ({}, revision {}): {:?} after {:.1}s; {} stack operation(s)",
        env.name,
        env.region,
        env.revision,
        report.verdict(),
        report.seconds,
        report.changed()
    );
    if let Some(s) = &report.final_plan.suspended {
        println!(
            "  {}: nothing is written until `stackwarden resume -e {}`",
            s.describe(),
            env.name
        );
    }
    if let Some(line) = super::report::window_line(&report.final_plan) {
        println!("  {line}");
    }
    let w = report
        .stacks
        .iter()
        .map(|s| s.id().len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "  {:<w$}  {:<17} {:<18} {:>8}  {:<26} DETAIL",
        "STACK", "PLANNED", "RESULT", "TIME", "STATUS"
    );
    for s in &report.stacks {
        println!(
            "  {:<w$}  {:<17} {:<18} {:>7.1}s  {:<26} {}",
            s.id(),
            s.planned,
            s.result.label(),
            s.seconds,
            s.final_status.as_ref().map_or("-", StackStatus::as_str),
            s.result.detail().unwrap_or_default()
        );
    }
    for s in &report.services {
        let what = s.result.describe();
        println!("  ecs:{}  {what}", s.service.as_deref().unwrap_or("?"),);
    }
    if let Some(e) = &report.final_observation_error {
        println!("  final state unknown: {e}");
    }
    let remaining: Vec<String> = report
        .final_plan
        .stacks
        .iter()
        .filter(|s| {
            s.action != crate::plan::StackAction::None || s.sync != crate::plan::Sync::InSync
        })
        .map(|s| format!("{} ({})", s.id(), s.reason))
        .chain(
            report
                .final_plan
                .services
                .iter()
                .filter(|s| s.action != crate::plan::ServiceAction::None)
                .map(|s| format!("ecs:{} ({})", s.service.as_deref().unwrap_or("?"), s.reason)),
        )
        .collect();
    if !remaining.is_empty() {
        println!("  remaining differences:");
        for r in remaining {
            println!("    {r}");
        }
    }
}
