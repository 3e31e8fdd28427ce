//! `reconcile` without `--once`: the controller, its endpoints and its
//! signals.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{broadcast, watch};

use super::{Outcome, Select, selected_files};
use crate::cloud::aws::AwsCloud;
use crate::controller::{Connect, Controller, Settings, Shared};
use crate::metrics::CloudWatchSink;
use crate::notify::SnsNotifier;
use crate::spec::DesiredEnv;

/// AWS clients per environment: its region, and its role when it has one.
struct AwsConnect;

impl Connect for AwsConnect {
    type Cloud = AwsCloud;
    async fn connect(&self, env: &DesiredEnv) -> AwsCloud {
        AwsCloud::connect(&env.region, env.assume_role.as_ref()).await
    }
}

/// Runs until SIGTERM or SIGINT, then exits 0 once the running passes have
/// ended (or the grace period is over).
pub(super) async fn run(
    select: &Select,
    listen: SocketAddr,
    settings: Settings,
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
    let notifier = SnsNotifier::connect().await;
    let sink = CloudWatchSink::connect().await;
    Controller {
        connect: &AwsConnect,
        notifier: &notifier,
        sink: &sink,
        settings: &settings,
        shared: &shared,
    }
    .run(files, &hup, stopped)
    .await;
    signals.abort();
    server.abort();
    tracing::info!(message = "Controller stopped.");
    Ok(Outcome::InSync)
}
