//! The retry layer: a [`Cloud`] around a [`Cloud`] that retries each
//! logical call's transient failures (throttling, transport, 5xx) under one
//! budget and backoff ([`retry::call`]), in the spirit of tower's layers.
//!
//! It is composed once, where a client is built (`Retrying::new(client)`),
//! so observation, planning and apply read as orchestration with no retry
//! wrappers, and no call is retried twice: the SDK's own retries are off
//! (one attempt per SDK call, see `cloud::aws`), so one logical call costs
//! at most the layer's attempts, and each throttled attempt is counted once,
//! by the client beneath.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use super::{
    ChangeSet, ChangeSetRequest, ChangeSetSummary, Cloud, CloudResult, FailedDeployment, Service,
    Stack, StackEvent,
};
use crate::retry;

/// `C` with every call retried by [`retry::call`]. Derefs to `C`, so what
/// is particular to a client (the simulation's knobs) stays reachable.
#[derive(Debug, Clone)]
pub struct Retrying<C>(C);

impl<C: Cloud> Retrying<C> {
    pub fn new(inner: C) -> Retrying<C> {
        Retrying(inner)
    }

    /// The client beneath, for a caller that answers failures itself.
    pub fn inner(&self) -> &C {
        &self.0
    }
}

impl<C> std::ops::Deref for Retrying<C> {
    type Target = C;

    fn deref(&self) -> &C {
        &self.0
    }
}

impl<C: Cloud> Cloud for Retrying<C> {
    async fn describe_stacks(
        &self,
        names: &BTreeSet<String>,
        owner: (&str, &str),
    ) -> CloudResult<BTreeMap<String, Stack>> {
        retry::call(|| self.0.describe_stacks(names, owner)).await
    }

    async fn describe_stack(&self, name: &str) -> CloudResult<Option<Stack>> {
        retry::call(|| self.0.describe_stack(name)).await
    }

    async fn get_template(&self, stack: &str) -> CloudResult<String> {
        retry::call(|| self.0.get_template(stack)).await
    }

    async fn create_change_set(&self, request: &ChangeSetRequest) -> CloudResult<()> {
        retry::call(|| self.0.create_change_set(request)).await
    }

    async fn describe_change_set(&self, stack: &str, name: &str) -> CloudResult<ChangeSet> {
        retry::call(|| self.0.describe_change_set(stack, name)).await
    }

    async fn list_change_sets(&self, stack: &str) -> CloudResult<Vec<ChangeSetSummary>> {
        retry::call(|| self.0.list_change_sets(stack)).await
    }

    async fn execute_change_set(
        &self,
        stack: &str,
        name: &str,
        token: Option<&str>,
    ) -> CloudResult<()> {
        retry::call(|| self.0.execute_change_set(stack, name, token)).await
    }

    async fn delete_change_set(&self, stack: &str, name: &str) -> CloudResult<()> {
        retry::call(|| self.0.delete_change_set(stack, name)).await
    }

    async fn stack_events(&self, stack: &str, after: Option<&str>) -> CloudResult<Vec<StackEvent>> {
        retry::call(|| self.0.stack_events(stack, after)).await
    }

    async fn operation_events(&self, stack: &str) -> CloudResult<Vec<StackEvent>> {
        retry::call(|| self.0.operation_events(stack)).await
    }

    async fn continue_update_rollback(
        &self,
        stack: &str,
        skip: &[String],
        token: Option<&str>,
    ) -> CloudResult<()> {
        retry::call(|| self.0.continue_update_rollback(stack, skip, token)).await
    }

    async fn rollback_stack(&self, stack: &str, token: Option<&str>) -> CloudResult<()> {
        retry::call(|| self.0.rollback_stack(stack, token)).await
    }

    async fn cancel_update_stack(&self, stack: &str, token: Option<&str>) -> CloudResult<()> {
        retry::call(|| self.0.cancel_update_stack(stack, token)).await
    }

    async fn delete_stack(&self, stack: &str) -> CloudResult<()> {
        retry::call(|| self.0.delete_stack(stack)).await
    }

    async fn detect_stack_drift(&self, stack: &str) -> CloudResult<String> {
        retry::call(|| self.0.detect_stack_drift(stack)).await
    }

    async fn drift_detection(&self, id: &str) -> CloudResult<super::Detection> {
        retry::call(|| self.0.drift_detection(id)).await
    }

    async fn resource_drifts(&self, stack: &str) -> CloudResult<Vec<super::ResourceDrift>> {
        retry::call(|| self.0.resource_drifts(stack)).await
    }

    async fn set_termination_protection(&self, stack: &str, enabled: bool) -> CloudResult<()> {
        retry::call(|| self.0.set_termination_protection(stack, enabled)).await
    }

    async fn describe_services(
        &self,
        cluster: &str,
        names: &[String],
    ) -> CloudResult<Vec<Service>> {
        retry::call(|| self.0.describe_services(cluster, names)).await
    }

    async fn update_service(
        &self,
        cluster: &str,
        service: &str,
        desired: Option<i32>,
        task_definition: Option<&str>,
    ) -> CloudResult<()> {
        retry::call(|| {
            self.0
                .update_service(cluster, service, desired, task_definition)
        })
        .await
    }

    async fn failed_deployments(
        &self,
        cluster: &str,
        service: &str,
        since: SystemTime,
    ) -> CloudResult<Vec<FailedDeployment>> {
        retry::call(|| self.0.failed_deployments(cluster, service, since)).await
    }

    async fn bucket_region(&self, bucket: &str) -> CloudResult<String> {
        retry::call(|| self.0.bucket_region(bucket)).await
    }

    async fn put_artifact(&self, bucket: &str, key: &str, body: &str) -> CloudResult<bool> {
        retry::call(|| self.0.put_artifact(bucket, key, body)).await
    }

    fn throttles(&self) -> u64 {
        self.0.throttles()
    }

    fn api_calls(&self) -> u64 {
        self.0.api_calls()
    }

    async fn caller_account(&self) -> CloudResult<String> {
        retry::call(|| self.0.caller_account()).await
    }

    fn now(&self) -> SystemTime {
        self.0.now()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cloud::CloudError;
    use crate::cloud::sim::{SimCloud, SimConfig};

    /// One logical call is retried under one budget, each attempt one
    /// request, each throttled attempt counted once.
    #[tokio::test(start_paused = true)]
    async fn a_throttled_call_is_retried_within_one_budget_and_each_attempt_counted_once() {
        let cloud = Retrying::new(SimCloud::new(SimConfig {
            throttle_rate: 1.0,
            ..SimConfig::default()
        }));
        let start = tokio::time::Instant::now();
        let r = cloud.describe_stack("any").await;
        assert!(matches!(r, Err(CloudError::Throttled(_))), "{r:?}");
        let took = start.elapsed();
        assert!(
            took >= retry::CALL_BUDGET && took < retry::CALL_BUDGET + Duration::from_secs(1),
            "{took:?}"
        );
        let attempts = cloud.total_calls();
        // 500 ms doubling (jittered by half) to 20 s pauses fill 120 s in
        // about a dozen attempts, never in one nor in hundreds.
        assert!((5..=20).contains(&attempts), "{attempts} attempts");
        assert_eq!(cloud.throttles(), attempts);
        assert_eq!(cloud.inner().total_calls(), attempts);
    }
}
