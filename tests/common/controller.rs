//! The controller's surroundings on the simulated cloud, for the tests
//! that run it: its cloud, a recorder of what would go to SNS and
//! CloudWatch, and quick settings.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use stackwarden::cloud::CloudError;
use stackwarden::cloud::Retrying;
use stackwarden::cloud::sim::SimCloud;
use stackwarden::controller::{Connect, Settings};
use stackwarden::metrics::{MetricsSink, PassMetrics};
use stackwarden::notify::{Alert, Notifier};
use stackwarden::spec::DesiredEnv;

pub struct SimConnect(pub Retrying<SimCloud>);

impl Connect for SimConnect {
    type Cloud = Retrying<SimCloud>;
    async fn connect(&self, _env: &DesiredEnv) -> Retrying<SimCloud> {
        self.0.clone()
    }
}

/// Keeps what would have gone to SNS and CloudWatch.
#[derive(Clone, Default)]
pub struct Recorder {
    pub alerts: Arc<Mutex<Vec<(String, Alert)>>>,
    pub metrics: Arc<Mutex<Vec<PassMetrics>>>,
}

impl Recorder {
    pub fn alerts(&self) -> Vec<Alert> {
        self.alerts
            .lock()
            .unwrap()
            .iter()
            .map(|(_, a)| a.clone())
            .collect()
    }
}

impl Notifier for Recorder {
    async fn publish(&self, topic: &str, alert: &Alert) -> Result<(), CloudError> {
        self.alerts
            .lock()
            .unwrap()
            .push((topic.to_owned(), alert.clone()));
        Ok(())
    }
}

impl MetricsSink for Recorder {
    async fn put(&self, _ns: &str, _region: &str, m: &PassMetrics) -> Result<(), CloudError> {
        self.metrics.lock().unwrap().push(m.clone());
        Ok(())
    }
}

pub fn settings(interval: u64) -> Settings {
    Settings {
        interval: Duration::from_secs(interval),
        jitter: 0.0,
        watch_every: Duration::from_secs(1),
        ..Settings::default()
    }
}
