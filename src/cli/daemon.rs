//! `reconcile` without `--once`: the controller, its endpoints and its
//! signals.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{broadcast, watch};

use super::{Outcome, Select, selected_files};
use crate::cloud::Retrying;
use crate::cloud::aws::AwsCloud;
use crate::controller::{Connect, Controller, Settings, Shared};
use crate::metrics::CloudWatchSink;
use crate::notify::SnsNotifier;
use crate::spec::DesiredEnv;

/// How long past the shutdown grace period a wedged process is given
/// before it is ended without further ado.
const HARD_EXIT_AFTER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// AWS clients per environment: its region, and its role when it has one.
struct AwsConnect;

impl Connect for AwsConnect {
    type Cloud = Retrying<AwsCloud>;
    async fn connect(&self, env: &DesiredEnv) -> Retrying<AwsCloud> {
        Retrying::new(AwsCloud::connect(&env.region, env.assume_role.as_ref()).await)
    }
}

/// Runs until SIGTERM or SIGINT, then exits 0 once the running passes have
/// ended (or the grace period is over).
pub(super) async fn run(
    select: &Select,
    listen: SocketAddr,
    settings: Settings,
    state: &super::state::StateArgs,
    (leases, replica): (crate::lease::LeaseSettings, String),
) -> anyhow::Result<Outcome> {
    let files = selected_files(select)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let shared = Arc::new(Shared::default());
    let (stop, stopped) = watch::channel(false);
    let (hup, _) = broadcast::channel(4);

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let grace = settings.shutdown_grace;
    let signals = {
        let hup = hup.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    _ = hangup.recv() => {
                        tracing::info!(message = "SIGHUP: reconciling every environment now.");
                        let _ = hup.send(());
                    }
                }
            }
            tracing::info!(message = "Shutting down.");
            let _ = stop.send(true);
            // The last resort: whatever is wedged (a blocking call cannot be
            // cancelled at an await point), the process ends shortly after
            // the grace period.
            std::thread::spawn(move || {
                std::thread::sleep(grace.saturating_add(HARD_EXIT_AFTER_GRACE));
                eprintln!("error: still running after the shutdown grace period; exiting");
                std::process::exit(1);
            });
        })
    };
    let server = tokio::spawn(crate::endpoints::serve(
        listener,
        shared.clone(),
        stopped.clone(),
    ));
    tracing::info!(
        message = "Controller started.",
        environments = ?files.keys().collect::<Vec<_>>(),
        interval = %humantime::format_duration(settings.interval),
        %listen,
    );
    let state = state.open().await.map(Arc::new);
    let caller = super::state::caller_for(state.as_ref()).await;
    // With a state table, replicas share the environments through leases.
    let coordinator = state.as_ref().map(|s| {
        crate::lease::Coordinator::new(s.clone(), &replica, leases, files.keys().cloned())
    });
    match &coordinator {
        None => tracing::warn!(
            message = "No state table (--state-table): one replica only; suspensions are not seen, no history is kept, and alert episodes are forgotten on restart."
        ),
        Some(c) => tracing::info!(
            message = "Sharing environments through leases.",
            replica = c.me(),
            lease = %humantime::format_duration(leases.duration),
            renew = %humantime::format_duration(leases.renew)
        ),
    }
    let notifier = SnsNotifier::connect().await;
    let sink = CloudWatchSink::connect().await;
    Controller {
        connect: &AwsConnect,
        notifier: &notifier,
        sink: &sink,
        settings: &settings,
        shared: &shared,
        state: state.as_ref(),
        caller: &caller,
        leases: coordinator.as_ref(),
    }
    .run(files, &hup, stopped)
    .await;
    signals.abort();
    server.abort();
    tracing::info!(message = "Controller stopped.");
    Ok(Outcome::InSync)
}
