//! Command line: argument parsing, output formatting and exit codes. No
//! decisions are made here; commands call into the library and print.
//!
//! Exit codes (plan, reconcile --once, status): 0 everything in sync and
//! healthy; 2 differences remain and nothing failed; 1 an error or a failed
//! operation. `validate`: 0 valid, 1 invalid.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::spec::{self, DesiredEnv};

/// Keep CloudFormation stacks and their ECS services equal to git.
#[derive(Debug, Parser)]
#[command(name = "stackwarden", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr: `auto` is human on a terminal, JSON lines
    /// otherwise. Filter with RUST_LOG (default: info for the daemon, warn
    /// for the other commands).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Auto,
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check desired state offline: schema, templates, parameters, references, cycles.
    Validate(Select),
    /// Print the JSON Schema (draft 2020-12) of a desired-state file, for
    /// editors (yaml-language-server) and linters.
    Schema,
    /// Observe AWS and show what reconcile would do, in dependency order. Writes nothing
    /// (unless --change-sets).
    Plan(PlanArgs),
    /// Sync status and health of every stack and ECS service.
    Status(ObserveArgs),
    /// Detect resource drift now (DetectStackDrift) and show, per stack,
    /// each drifted resource and property. Exit 0 no drift, 2 drift, 1 error
    /// or a detection that failed.
    Drift {
        #[command(flatten)]
        select: Select,
        /// Only this stack (its key); repeatable.
        #[arg(long = "stack", value_name = "KEY")]
        stacks: Vec<String>,
        /// Detections in flight at once per account and region.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=20))]
        max_detections: u16,
        /// How long to wait for the detections.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// Bring AWS to the desired state: observe, plan, apply what the policy
    /// allows, in dependency order, and report.
    Reconcile(ReconcileArgs),
    /// Get failed stacks back to their last stable state (RollbackStack,
    /// ContinueUpdateRollback, CancelUpdateStack), or with --to converge
    /// the environment to its desired state at a git commit and suspend it.
    Rollback(RollbackArgs),
    /// Stop writing to an environment (it is still observed, planned and
    /// reported) until `resume`. Needs the state table.
    Suspend {
        #[command(flatten)]
        select: Select,
        /// Why; shown in every report while suspended.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        state: state::StateArgs,
    },
    /// Lift a suspension: the next pass converges.
    Resume {
        #[command(flatten)]
        select: Select,
        #[command(flatten)]
        state: state::StateArgs,
    },
    /// Every pass that wrote something, rollbacks, suspensions and
    /// resumptions, oldest first. Needs the state table.
    History {
        #[command(flatten)]
        select: Select,
        /// Only entries that touched this stack (its key).
        #[arg(long, value_name = "KEY")]
        stack: Option<String>,
        #[command(flatten)]
        state: state::StateArgs,
    },
    /// The state table (DynamoDB).
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Exit 0 when the daemon's endpoint answers 200 (for container health
    /// checks in images without curl).
    Healthcheck {
        /// host:port of the daemon's --listen address.
        #[arg(long, default_value = "127.0.0.1:9090")]
        addr: String,
        /// Path to ask.
        #[arg(long, default_value = "/healthz")]
        path: String,
    },
}

#[derive(Debug, Subcommand)]
enum StateCommand {
    /// Create the state table (on-demand, pk/sk strings, TTL on
    /// expires_at) and wait until it is active; an existing one is checked.
    Init {
        #[arg(long, value_name = "NAME", env = "STACKWARDEN_STATE_TABLE")]
        state_table: String,
    },
}

#[derive(Debug, Args)]
struct RollbackArgs {
    #[command(flatten)]
    select: Select,
    /// Only this stack (its key); repeatable. Default: every stack.
    #[arg(long = "stack", value_name = "KEY")]
    stacks: Vec<String>,
    /// A resource that cannot roll back, as STACK.LogicalId (a nested
    /// stack's: STACK.Nested.LogicalId): passed to ContinueUpdateRollback
    /// as ResourcesToSkip. Only resources in UPDATE_FAILED. Repeatable.
    #[arg(long, value_name = "STACK.LOGICAL_ID")]
    skip: Vec<String>,
    /// Cancel our own update in flight (CancelUpdateStack), which rolls it
    /// back.
    #[arg(long)]
    cancel: bool,
    /// Converge to the desired state at this git commit (read from git,
    /// not the working tree), then suspend the environment.
    #[arg(long, value_name = "GITREF", conflicts_with = "to_previous")]
    to: Option<String>,
    /// Like --to, with the commit of the last successful pass of another
    /// revision (from the history).
    #[arg(long)]
    to_previous: bool,
    /// Concurrent stack operations.
    #[arg(long, value_name = "N", default_value_t = crate::apply::DEFAULT_MAX_PARALLEL as u16,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    max_parallel: u16,
    /// No progress lines on stderr.
    #[arg(short, long)]
    quiet: bool,
    #[command(flatten)]
    state: state::StateArgs,
}

#[derive(Debug, Args)]
struct ReconcileArgs {
    #[command(flatten)]
    select: Select,
    /// One pass, then exit: 0 in sync, 2 differences remain, 1 failed.
    /// Without it, run as a controller until SIGTERM.
    #[arg(long)]
    once: bool,
    /// Concurrent stack operations per account and region.
    #[arg(long, value_name = "N", default_value_t = crate::apply::DEFAULT_MAX_PARALLEL as u16,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    max_parallel: u16,
    /// Trust the revision tags: fetch a stack's template only when its tag
    /// differs (the default compares every template).
    #[arg(long)]
    fast: bool,
    /// Print the number of AWS API calls made to stderr (--once).
    #[arg(long)]
    stats: bool,
    /// No progress lines on stderr (--once).
    #[arg(short, long)]
    quiet: bool,
    /// Publish alerts to each environment's SNS topic (--once; the
    /// controller always does).
    #[arg(long)]
    alerts: bool,
    /// Write although the environment's sync windows (`policy.windows`)
    /// are closed: an emergency override of one pass (--once only). It is
    /// logged, and recorded in the history with a state table.
    #[arg(long, requires = "once")]
    ignore_windows: bool,
    /// Controller: time between passes of an environment (humantime), with
    /// 10% jitter.
    /// Between 10s and 24h: a shorter interval hammers AWS's shared
    /// per-account rate limits, a longer one is not a controller.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_interval)]
    interval: std::time::Duration,
    /// Controller: address of /healthz, /readyz, /metrics, /status and
    /// the status page (`/`, `/env/<name>`).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9090")]
    listen: std::net::SocketAddr,
    /// Controller: how long a running pass may go on after SIGTERM.
    /// At most 1h.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_shutdown_grace)]
    shutdown_grace: std::time::Duration,
    /// Controller: environments reconciled at once.
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    max_envs: u16,
    /// Controller: CloudWatch namespace of the metrics.
    #[arg(long, value_name = "NAMESPACE", default_value = "Stackwarden")]
    metrics_namespace: String,
    /// Controller with a state table: how long an environment's lease lasts
    /// without renewal; another replica takes it over after seeing it
    /// unrenewed this long.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_lease)]
    lease_duration: std::time::Duration,
    /// Controller with a state table: how often leases are renewed (at most
    /// half of the lease duration minus a fifth of it).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_lease)]
    lease_renew: std::time::Duration,
    /// Controller with a state table: this replica's id in the leases
    /// (default: host name, process id and a random suffix).
    #[arg(long, value_name = "ID")]
    replica_id: Option<String>,
    #[command(flatten)]
    state: state::StateArgs,
}

fn parse_lease(s: &str) -> Result<Duration, String> {
    bounded_duration(s, (Duration::from_millis(100), Duration::from_secs(3600)))
}

/// The bounds of `--interval`.
pub const INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_secs(10), Duration::from_secs(24 * 60 * 60));
/// The bounds of `--shutdown-grace`.
pub const SHUTDOWN_GRACE_RANGE: (Duration, Duration) =
    (Duration::ZERO, Duration::from_secs(60 * 60));

fn parse_interval(s: &str) -> Result<Duration, String> {
    bounded_duration(s, INTERVAL_RANGE)
}

fn parse_shutdown_grace(s: &str) -> Result<Duration, String> {
    bounded_duration(s, SHUTDOWN_GRACE_RANGE)
}

/// A humantime duration within `[min, max]`, or a message naming the bounds.
fn bounded_duration(s: &str, (min, max): (Duration, Duration)) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < min || d > max {
        return Err(format!(
            "must be between {} and {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

#[derive(Debug, Args)]
struct ObserveArgs {
    #[command(flatten)]
    select: Select,
    /// Compare every template, even where the revision tag matches.
    #[arg(long)]
    full: bool,
    /// Print the number of AWS API calls made to stderr.
    #[arg(long)]
    stats: bool,
    #[command(flatten)]
    state: state::StateArgs,
}

#[derive(Debug, Args)]
struct PlanArgs {
    #[command(flatten)]
    observe: ObserveArgs,
    /// Create (and afterwards delete) change sets for the stacks that differ and
    /// show their resource-level changes, with replacement.
    #[arg(long)]
    change_sets: bool,
}

/// Which environments to work on.
#[derive(Debug, Args, Clone)]
struct Select {
    /// Environment to work on (file stem in the desired-state folder); repeatable.
    /// Defaults to every environment in the folder.
    #[arg(short = 'e', long = "env", value_name = "ENV")]
    envs: Vec<String>,
    /// Folder holding `<env>.yaml` files.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "desired-state",
        env = "STACKWARDEN_DESIRED_STATE"
    )]
    desired_state: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Text)]
    output: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
}

/// Exit statuses with meaning; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    InSync = 0,
    Differences = 2,
    Failed = 1,
}

impl Outcome {
    /// The worse of two outcomes: Failed > Differences > InSync.
    pub fn worst(self, other: Outcome) -> Outcome {
        let rank = |o: Outcome| match o {
            Outcome::InSync => 0,
            Outcome::Differences => 1,
            Outcome::Failed => 2,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

impl From<Outcome> for ExitCode {
    fn from(o: Outcome) -> ExitCode {
        ExitCode::from(o as u8)
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Help and version go to stdout and are not errors. Every usage
            // error exits 1: exit 2 means "differences remain", and a CI
            // recipe that accepts 2 must not pass on a mistyped flag.
            return if e.use_stderr() {
                Outcome::Failed.into()
            } else {
                Outcome::InSync.into()
            };
        }
    };
    match run(cli) {
        Ok(outcome) => outcome.into(),
        Err(e) => {
            eprintln!("error: {e:#}");
            Outcome::Failed.into()
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let daemon = matches!(&cli.command, Command::Reconcile(a) if !a.once);
    init_logging(cli.log_format, if daemon { "info" } else { "warn" });
    match cli.command {
        Command::Validate(select) => Ok(validate(&select)),
        Command::Schema => {
            let text = format!("{:#}\n", crate::spec::json_schema());
            // `stackwarden schema | head` is not an error.
            match std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(Outcome::InSync),
            }
        }
        Command::Plan(args) => runtime()?.block_on(report::plan_command(
            &args.observe.select,
            args.observe.full,
            args.observe.stats,
            args.change_sets,
            Show::Plan,
            &args.observe.state,
        )),
        Command::Status(args) => runtime()?.block_on(report::plan_command(
            &args.select,
            args.full,
            args.stats,
            false,
            Show::Status,
            &args.state,
        )),
        Command::Drift {
            select,
            stacks,
            max_detections,
            wait,
        } => runtime()?.block_on(drift::run(drift::DriftArgs {
            select: &select,
            stacks: &stacks,
            max_detections: usize::from(max_detections),
            wait,
        })),
        Command::Rollback(args) => runtime()?.block_on(rollback::run(rollback::Rollback {
            select: &args.select,
            stacks: &args.stacks,
            skip: &args.skip,
            to: args.to.as_deref(),
            to_previous: args.to_previous,
            cancel: args.cancel,
            max_parallel: usize::from(args.max_parallel),
            quiet: args.quiet,
            state: &args.state,
        })),
        Command::Suspend {
            select,
            reason,
            state,
        } => {
            let env = one_env(&select)?;
            runtime()?.block_on(state::suspend(&env, &reason, &state))
        }
        Command::Resume { select, state } => {
            let env = one_env(&select)?;
            runtime()?.block_on(state::resume(&env, &state))
        }
        Command::History {
            select,
            stack,
            state,
        } => {
            let env = one_env(&select)?;
            runtime()?.block_on(state::history(
                &env,
                stack.as_deref(),
                select.output,
                &state,
            ))
        }
        Command::State {
            command: StateCommand::Init { state_table },
        } => runtime()?.block_on(state::init(&state_table)),
        Command::Healthcheck { addr, path } => Ok(healthcheck(&addr, &path)),
        Command::Reconcile(args) if args.once => runtime()?.block_on(reconcile::once(&args)),
        Command::Reconcile(args) => {
            let settings = crate::controller::Settings {
                interval: args.interval,
                max_envs: usize::from(args.max_envs),
                max_parallel: usize::from(args.max_parallel),
                shutdown_grace: args.shutdown_grace,
                metrics_namespace: args.metrics_namespace.clone(),
                depth: if args.fast {
                    crate::observe::Depth::Fast
                } else {
                    crate::observe::Depth::Full
                },
                seed: std::process::id().into(),
                ..crate::controller::Settings::default()
            };
            let leases = crate::lease::LeaseSettings {
                duration: args.lease_duration,
                renew: args.lease_renew,
            };
            leases.check().map_err(|e| anyhow::anyhow!(e))?;
            let replica = args
                .replica_id
                .clone()
                .unwrap_or_else(crate::lease::replica_id);
            runtime()?.block_on(daemon::run(
                &args.select,
                args.listen,
                settings,
                &args.state,
                (leases, replica),
            ))
        }
    }
}

fn healthcheck(addr: &str, path: &str) -> Outcome {
    use std::io::{Read, Write};
    let answer = (|| -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })();
    match answer {
        Ok(a) if a.starts_with("HTTP/1.1 200") => Outcome::InSync,
        Ok(a) => {
            eprintln!("{}", a.lines().next().unwrap_or("no answer"));
            Outcome::Failed
        }
        Err(e) => {
            eprintln!("error: {addr}: {e}");
            Outcome::Failed
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Logs go to stderr, filtered by RUST_LOG (default: `default`), human on
/// a terminal and JSON lines otherwise (CloudWatch Logs reads them).
fn init_logging(format: LogFormat, default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().with_current_span(true).try_init()
    } else {
        builder.try_init()
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Show {
    Plan,
    Status,
}

impl From<crate::plan::Verdict> for Outcome {
    fn from(v: crate::plan::Verdict) -> Outcome {
        match v {
            crate::plan::Verdict::InSync => Outcome::InSync,
            crate::plan::Verdict::Differences => Outcome::Differences,
            crate::plan::Verdict::Failed => Outcome::Failed,
        }
    }
}

mod daemon;
mod drift;
mod reconcile;
mod report;
mod rollback;
mod state;

/// The one environment a command that works on one names (and that the
/// desired-state folder has).
fn one_env(select: &Select) -> anyhow::Result<String> {
    if select.envs.len() != 1 {
        anyhow::bail!("name one environment with -e ENV");
    }
    let files = selected_files(select)?;
    Ok(files.into_keys().next().expect("one selected"))
}

/// The environment files a selection names, in name order.
///
/// # Errors
/// The folder cannot be read, or a named environment has no file.
fn selected_files(select: &Select) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let all = spec::discover(&select.desired_state).map_err(|e| {
        anyhow::anyhow!(
            "cannot read desired-state folder {}: {e}",
            select.desired_state.display()
        )
    })?;
    if select.envs.is_empty() {
        if all.is_empty() {
            anyhow::bail!("no <env>.yaml files in {}", select.desired_state.display());
        }
        return Ok(all);
    }
    let mut out = BTreeMap::new();
    for e in &select.envs {
        match all.get(e) {
            Some(p) => {
                out.insert(e.clone(), p.clone());
            }
            None => anyhow::bail!(
                "no environment `{e}` in {} (found: {})",
                select.desired_state.display(),
                all.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        }
    }
    Ok(out)
}

/// Loads one environment file, printing its warnings or its errors to
/// stderr.
fn load_reported(path: &std::path::Path) -> Result<DesiredEnv, spec::SpecErrors> {
    let loaded = spec::load(path);
    match &loaded {
        Ok(env) => {
            for w in &env.warnings {
                eprintln!("warning: {}: {w}", env.name);
            }
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
        }
    }
    loaded
}

/// Loads every selected environment; prints each one's errors to stderr.
/// Returns the ones that loaded, and whether any failed.
fn load_selected(select: &Select) -> anyhow::Result<(Vec<DesiredEnv>, bool)> {
    let mut envs = Vec::new();
    let mut failed = false;
    for path in selected_files(select)?.values() {
        match load_reported(path) {
            Ok(env) => envs.push(env),
            Err(_) => failed = true,
        }
    }
    Ok((envs, failed))
}

fn validate(select: &Select) -> Outcome {
    let files = match selected_files(select) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Outcome::Failed;
        }
    };
    let mut envs = Vec::new();
    let mut failures = Vec::new();
    for (name, path) in &files {
        match load_reported(path) {
            Ok(env) => envs.push(env),
            Err(errors) => failures.push((name, path, errors)),
        }
    }
    let failed = !failures.is_empty();
    match select.output {
        // Every selected environment, valid or not: a JSON consumer sees
        // what failed and where.
        Format::Json => {
            let valid = envs.iter().map(|env| {
                serde_json::json!({
                    "environment": env.name,
                    "file": env.file,
                    "valid": true,
                    "revision": env.revision,
                    "region": env.region,
                    "waves": env.waves,
                    "warnings": env.warnings,
                    "stacks": env.stacks.values().map(|s| serde_json::json!({
                        "key": s.key, "name": s.name, "revision": s.revision,
                        "template": s.template_path, "depends_on": s.depends_on,
                    })).collect::<Vec<_>>(),
                })
            });
            let invalid = failures.iter().map(|(name, path, errors)| {
                serde_json::json!({
                    "environment": name,
                    "file": path,
                    "valid": false,
                    "errors": errors.0.iter().map(|e| serde_json::json!({
                        "file": e.file, "line": e.pos.line, "column": e.pos.column,
                        "path": e.path, "message": e.message,
                    })).collect::<Vec<_>>(),
                })
            });
            let mut report: Vec<serde_json::Value> = valid.chain(invalid).collect();
            report.sort_by(|a, b| a["environment"].as_str().cmp(&b["environment"].as_str()));
            println!("{}", serde_json::to_string_pretty(&report).expect("JSON"));
        }
        Format::Text => {
            for env in &envs {
                println!(
                    "{}: valid: {} stacks in {} waves, region {}, revision {}",
                    env.name,
                    env.stacks.len(),
                    env.waves.len(),
                    env.region,
                    env.revision
                );
                for (i, wave) in env.waves.iter().enumerate() {
                    let names: Vec<String> = wave
                        .iter()
                        .map(|k| {
                            let deps = &env.stacks[k].depends_on;
                            if deps.is_empty() {
                                k.clone()
                            } else {
                                format!(
                                    "{k} (after {})",
                                    deps.iter().cloned().collect::<Vec<_>>().join(", ")
                                )
                            }
                        })
                        .collect();
                    println!("  {}. {}", i + 1, names.join(", "));
                }
            }
        }
    }
    if failed {
        Outcome::Failed
    } else {
        Outcome::InSync
    }
}
