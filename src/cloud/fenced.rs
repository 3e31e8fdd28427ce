//! The fencing layer: a [`Cloud`] that refuses every write once this
//! replica's lease on the environment is no longer valid ([`Fence`]), so a
//! replica that lost its lease (paused, partitioned from the state table,
//! rebalanced away) sends nothing more to AWS for that environment. Reads
//! pass through. The controller also abandons the pass when the fence
//! falls; this layer makes sure no write slips through before it does.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use super::{
    ChangeSet, ChangeSetRequest, ChangeSetSummary, Cloud, CloudError, CloudResult,
    FailedDeployment, Service, Stack, StackEvent,
};
use crate::lease::Fence;

/// `C`, writing only while `fence` holds.
pub struct Fenced<'a, C> {
    inner: &'a C,
    fence: &'a Fence,
    environment: &'a str,
}

impl<'a, C: Cloud> Fenced<'a, C> {
    pub fn new(inner: &'a C, fence: &'a Fence, environment: &'a str) -> Fenced<'a, C> {
        Fenced {
            inner,
            fence,
            environment,
        }
    }

    fn check(&self, call: &str) -> CloudResult<()> {
        if self.fence.holds() {
            Ok(())
        } else {
            Err(CloudError::LeaseLost(format!(
                "{call} refused: this replica's lease on {} is not valid",
                self.environment
            )))
        }
    }
}

impl<C: Cloud> Cloud for Fenced<'_, C> {
    async fn describe_stacks(
        &self,
        names: &BTreeSet<String>,
        owner: (&str, &str),
    ) -> CloudResult<BTreeMap<String, Stack>> {
        self.inner.describe_stacks(names, owner).await
    }

    async fn describe_stack(&self, name: &str) -> CloudResult<Option<Stack>> {
        self.inner.describe_stack(name).await
    }

    async fn get_template(&self, stack: &str) -> CloudResult<String> {
        self.inner.get_template(stack).await
    }

    async fn create_change_set(&self, request: &ChangeSetRequest) -> CloudResult<()> {
        self.check("create_change_set")?;
        self.inner.create_change_set(request).await
    }

    async fn describe_change_set(&self, stack: &str, name: &str) -> CloudResult<ChangeSet> {
        self.inner.describe_change_set(stack, name).await
    }

    async fn list_change_sets(&self, stack: &str) -> CloudResult<Vec<ChangeSetSummary>> {
        self.inner.list_change_sets(stack).await
    }

    async fn execute_change_set(
        &self,
        stack: &str,
        name: &str,
        token: Option<&str>,
    ) -> CloudResult<()> {
        self.check("execute_change_set")?;
        self.inner.execute_change_set(stack, name, token).await
    }

    async fn delete_change_set(&self, stack: &str, name: &str) -> CloudResult<()> {
        self.check("delete_change_set")?;
        self.inner.delete_change_set(stack, name).await
    }

    async fn stack_events(&self, stack: &str, after: Option<&str>) -> CloudResult<Vec<StackEvent>> {
        self.inner.stack_events(stack, after).await
    }

    async fn operation_events(&self, stack: &str) -> CloudResult<Vec<StackEvent>> {
        self.inner.operation_events(stack).await
    }

    async fn continue_update_rollback(
        &self,
        stack: &str,
        skip: &[String],
        token: Option<&str>,
    ) -> CloudResult<()> {
        self.check("continue_update_rollback")?;
        self.inner
            .continue_update_rollback(stack, skip, token)
            .await
    }

    async fn rollback_stack(&self, stack: &str, token: Option<&str>) -> CloudResult<()> {
        self.check("rollback_stack")?;
        self.inner.rollback_stack(stack, token).await
    }

    async fn cancel_update_stack(&self, stack: &str, token: Option<&str>) -> CloudResult<()> {
        self.check("cancel_update_stack")?;
        self.inner.cancel_update_stack(stack, token).await
    }

    async fn delete_stack(&self, stack: &str) -> CloudResult<()> {
        self.check("delete_stack")?;
        self.inner.delete_stack(stack).await
    }

    /// Not a write to the stack, but an operation AWS runs one of per stack
    /// at a time: only the lease holder starts one.
    async fn detect_stack_drift(&self, stack: &str) -> CloudResult<String> {
        self.check("detect_stack_drift")?;
        self.inner.detect_stack_drift(stack).await
    }

    async fn drift_detection(&self, id: &str) -> CloudResult<super::Detection> {
        self.inner.drift_detection(id).await
    }

    async fn resource_drifts(&self, stack: &str) -> CloudResult<Vec<super::ResourceDrift>> {
        self.inner.resource_drifts(stack).await
    }

    async fn set_termination_protection(&self, stack: &str, enabled: bool) -> CloudResult<()> {
        self.check("set_termination_protection")?;
        self.inner.set_termination_protection(stack, enabled).await
    }

    async fn describe_services(
        &self,
        cluster: &str,
        names: &[String],
    ) -> CloudResult<Vec<Service>> {
        self.inner.describe_services(cluster, names).await
    }

    async fn update_service(
        &self,
        cluster: &str,
        service: &str,
        desired: Option<i32>,
        task_definition: Option<&str>,
    ) -> CloudResult<()> {
        self.check("update_service")?;
        self.inner
            .update_service(cluster, service, desired, task_definition)
            .await
    }

    async fn failed_deployments(
        &self,
        cluster: &str,
        service: &str,
        since: SystemTime,
    ) -> CloudResult<Vec<FailedDeployment>> {
        self.inner.failed_deployments(cluster, service, since).await
    }

    async fn bucket_region(&self, bucket: &str) -> CloudResult<String> {
        self.inner.bucket_region(bucket).await
    }

    async fn put_artifact(&self, bucket: &str, key: &str, body: &str) -> CloudResult<bool> {
        self.check("put_artifact")?;
        self.inner.put_artifact(bucket, key, body).await
    }

    fn throttles(&self) -> u64 {
        self.inner.throttles()
    }

    fn api_calls(&self) -> u64 {
        self.inner.api_calls()
    }

    async fn caller_account(&self) -> CloudResult<String> {
        self.inner.caller_account().await
    }

    fn now(&self) -> SystemTime {
        self.inner.now()
    }
}
