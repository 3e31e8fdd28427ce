//! The narrow interface to AWS: the few operations stackwarden needs, in its
//! own types. [`aws`] implements it with the AWS SDK; [`sim`] is an
//! in-memory simulated AWS for tests and benchmarks.
//!
//! Errors are typed once, here at the boundary ([`CloudError`]), so the rest
//! of the code never inspects SDK error strings.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::SystemTime;

pub mod aws;
mod fenced;
mod retrying;
pub mod sim;
mod sim_truth;

pub use fenced::Fenced;
pub use retrying::Retrying;

/// An error from the cloud, classified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudError {
    #[error("not found: {0}")]
    NotFound(String),
    /// "No updates are to be performed" / "didn't contain changes".
    #[error("no changes")]
    NoChanges,
    #[error("throttled: {0}")]
    Throttled(String),
    /// Another operation is in progress on the resource.
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("access denied: {0}")]
    AccessDenied(String),
    /// The session's credentials expired: the provider refreshes them, so
    /// a retry is worth it (unlike access denied).
    #[error("credentials expired: {0}")]
    ExpiredCredentials(String),
    #[error("invalid request: {0}")]
    Validation(String),
    /// The SDK's credential chain found no credentials: no retry helps.
    #[error("no AWS credentials found: {0}")]
    NoCredentials(String),
    /// No connection could be made (refused, unknown host, connect
    /// timeout): retried briefly, then reported with where it tried.
    #[error("cannot reach {0}")]
    Unreachable(String),
    #[error("transport: {0}")]
    Transport(String),
    /// An HTTP 5xx answer (InternalFailure, ServiceUnavailable, ...): AWS's
    /// side failed, not the request.
    #[error("AWS service error: {0}")]
    Server(String),
    /// This replica's lease on the environment is not valid: the write
    /// was not sent (see `lease`).
    #[error("lease lost: {0}")]
    LeaseLost(String),
}

impl CloudError {
    /// Worth retrying after a pause.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            CloudError::Throttled(_)
                | CloudError::Transport(_)
                | CloudError::Unreachable(_)
                | CloudError::Server(_)
                | CloudError::ExpiredCredentials(_)
        )
    }
}

pub type CloudResult<T> = Result<T, CloudError>;

/// CloudFormation's `StackStatus`, every value the API reference lists,
/// typed once here at the boundary. A value AWS adds later is kept as
/// [`StackStatus::Other`]: an `*_IN_PROGRESS` one is waited on, any other
/// is treated as a failure needing a person (never as healthy).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StackStatus {
    CreateInProgress,
    CreateFailed,
    CreateComplete,
    RollbackInProgress,
    RollbackFailed,
    RollbackComplete,
    DeleteInProgress,
    DeleteFailed,
    DeleteComplete,
    UpdateInProgress,
    UpdateCompleteCleanupInProgress,
    UpdateComplete,
    UpdateFailed,
    UpdateRollbackInProgress,
    UpdateRollbackFailed,
    UpdateRollbackCompleteCleanupInProgress,
    UpdateRollbackComplete,
    ReviewInProgress,
    ImportInProgress,
    ImportComplete,
    ImportRollbackInProgress,
    ImportRollbackFailed,
    ImportRollbackComplete,
    Other(String),
}

const STACK_STATUSES: &[(StackStatus, &str)] = &[
    (StackStatus::CreateInProgress, "CREATE_IN_PROGRESS"),
    (StackStatus::CreateFailed, "CREATE_FAILED"),
    (StackStatus::CreateComplete, "CREATE_COMPLETE"),
    (StackStatus::RollbackInProgress, "ROLLBACK_IN_PROGRESS"),
    (StackStatus::RollbackFailed, "ROLLBACK_FAILED"),
    (StackStatus::RollbackComplete, "ROLLBACK_COMPLETE"),
    (StackStatus::DeleteInProgress, "DELETE_IN_PROGRESS"),
    (StackStatus::DeleteFailed, "DELETE_FAILED"),
    (StackStatus::DeleteComplete, "DELETE_COMPLETE"),
    (StackStatus::UpdateInProgress, "UPDATE_IN_PROGRESS"),
    (
        StackStatus::UpdateCompleteCleanupInProgress,
        "UPDATE_COMPLETE_CLEANUP_IN_PROGRESS",
    ),
    (StackStatus::UpdateComplete, "UPDATE_COMPLETE"),
    (StackStatus::UpdateFailed, "UPDATE_FAILED"),
    (
        StackStatus::UpdateRollbackInProgress,
        "UPDATE_ROLLBACK_IN_PROGRESS",
    ),
    (StackStatus::UpdateRollbackFailed, "UPDATE_ROLLBACK_FAILED"),
    (
        StackStatus::UpdateRollbackCompleteCleanupInProgress,
        "UPDATE_ROLLBACK_COMPLETE_CLEANUP_IN_PROGRESS",
    ),
    (
        StackStatus::UpdateRollbackComplete,
        "UPDATE_ROLLBACK_COMPLETE",
    ),
    (StackStatus::ReviewInProgress, "REVIEW_IN_PROGRESS"),
    (StackStatus::ImportInProgress, "IMPORT_IN_PROGRESS"),
    (StackStatus::ImportComplete, "IMPORT_COMPLETE"),
    (
        StackStatus::ImportRollbackInProgress,
        "IMPORT_ROLLBACK_IN_PROGRESS",
    ),
    (StackStatus::ImportRollbackFailed, "IMPORT_ROLLBACK_FAILED"),
    (
        StackStatus::ImportRollbackComplete,
        "IMPORT_ROLLBACK_COMPLETE",
    ),
];

impl StackStatus {
    pub fn as_str(&self) -> &str {
        match self {
            StackStatus::Other(s) => s,
            known => STACK_STATUSES
                .iter()
                .find(|(k, _)| k == known)
                .map_or("", |(_, s)| s),
        }
    }

    /// An operation is in flight (REVIEW_IN_PROGRESS is not one: it is a
    /// stack that only has an unexecuted CREATE change set).
    pub fn in_progress(&self) -> bool {
        self.as_str().ends_with("_IN_PROGRESS") && *self != StackStatus::ReviewInProgress
    }
}

impl From<&str> for StackStatus {
    fn from(s: &str) -> StackStatus {
        STACK_STATUSES
            .iter()
            .find(|(_, text)| *text == s)
            .map_or_else(|| StackStatus::Other(s.to_owned()), |(k, _)| k.clone())
    }
}

impl std::fmt::Display for StackStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for StackStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A stack as DescribeStacks reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Stack {
    pub name: String,
    pub id: String,
    pub status: StackStatus,
    pub status_reason: Option<String>,
    /// As AWS echoes them: NoEcho values are `****`.
    pub parameters: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    pub outputs: BTreeMap<String, String>,
    pub termination_protection: bool,
    #[serde(skip)]
    pub last_updated: Option<SystemTime>,
    /// DriftInformation: the outcome of the stack's latest drift detection,
    /// free with every DescribeStacks.
    pub drift: StackDrift,
}

/// A stack's drift as DescribeStacks reports it (`DriftInformation`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StackDrift {
    pub status: DriftStatus,
    /// When its drift was last detected (absent until a detection ended).
    #[serde(skip)]
    pub last_check: Option<SystemTime>,
}

/// `StackDriftStatus`: DRIFTED, IN_SYNC, NOT_CHECKED; `UNKNOWN` (reserved)
/// and values AWS adds later are [`DriftStatus::Unknown`], never in sync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DriftStatus {
    Drifted,
    InSync,
    #[default]
    NotChecked,
    Unknown,
}

impl DriftStatus {
    pub fn parse(s: &str) -> DriftStatus {
        match s {
            "DRIFTED" => DriftStatus::Drifted,
            "IN_SYNC" => DriftStatus::InSync,
            "NOT_CHECKED" | "" => DriftStatus::NotChecked,
            _ => DriftStatus::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DriftStatus::Drifted => "DRIFTED",
            DriftStatus::InSync => "IN_SYNC",
            DriftStatus::NotChecked => "NOT_CHECKED",
            DriftStatus::Unknown => "UNKNOWN",
        }
    }
}

/// The stack statuses DetectStackDrift accepts (AWS API reference).
pub const DRIFT_DETECTABLE: &[&str] = &[
    "CREATE_COMPLETE",
    "UPDATE_COMPLETE",
    "UPDATE_ROLLBACK_COMPLETE",
    "UPDATE_ROLLBACK_FAILED",
];

/// Where a drift detection stands (DescribeStackDriftDetectionStatus).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetectionStatus {
    InProgress,
    Complete,
    /// DETECTION_FAILED, with its DetectionStatusReason: the resources it
    /// could check are reported, the others are not.
    Failed(String),
}

/// A drift detection, as DescribeStackDriftDetectionStatus reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    pub status: DetectionStatus,
    /// Set once the detection ended.
    pub stack_drift: DriftStatus,
    pub drifted_resources: Option<i32>,
}

/// `StackResourceDriftStatus` (and a change set's `ResourceDriftStatus`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ResourceDriftStatus {
    InSync,
    Modified,
    Deleted,
    /// Not checked: a type without drift support, a resource skipped by a
    /// continued rollback, or a detection that failed before reaching it.
    NotChecked,
    /// UNKNOWN, UNSUPPORTED, or a value AWS adds later.
    #[serde(untagged)]
    Other(String),
}

impl ResourceDriftStatus {
    pub fn parse(s: &str) -> ResourceDriftStatus {
        match s {
            "IN_SYNC" => ResourceDriftStatus::InSync,
            "MODIFIED" => ResourceDriftStatus::Modified,
            "DELETED" => ResourceDriftStatus::Deleted,
            "NOT_CHECKED" => ResourceDriftStatus::NotChecked,
            other => ResourceDriftStatus::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            ResourceDriftStatus::InSync => "IN_SYNC",
            ResourceDriftStatus::Modified => "MODIFIED",
            ResourceDriftStatus::Deleted => "DELETED",
            ResourceDriftStatus::NotChecked => "NOT_CHECKED",
            ResourceDriftStatus::Other(s) => s,
        }
    }

    /// The resource differs from its template (changed or deleted).
    pub fn drifted(&self) -> bool {
        matches!(
            self,
            ResourceDriftStatus::Modified | ResourceDriftStatus::Deleted
        )
    }
}

/// `DifferenceType` of a property difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DifferenceKind {
    /// A value (an item of a list) was added out of band.
    Add,
    Remove,
    NotEqual,
}

/// One `PropertyDifference` of a drifted resource.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct PropertyDifference {
    /// As AWS writes it: `/VisibilityTimeout`, `/SecurityGroupIngress/1`.
    pub path: String,
    pub expected: Option<String>,
    pub actual: Option<String>,
    pub kind: DifferenceKind,
}

/// One `StackResourceDrift` of DescribeStackResourceDrifts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ResourceDrift {
    pub logical_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub physical_id: Option<String>,
    pub resource_type: String,
    pub status: ResourceDriftStatus,
    pub differences: Vec<PropertyDifference>,
    /// When the detection checked it (`Timestamp`).
    #[serde(skip)]
    pub checked: Option<SystemTime>,
}

impl Stack {
    /// An operation is in flight (see [`StackStatus::in_progress`]).
    pub fn in_progress(&self) -> bool {
        self.status.in_progress()
    }
}

/// A ClientRequestToken derived from what identifies one logical request
/// (a change set's id; a stuck stack's episode and attempt): a retry sends
/// the same token, a new request a new one. AWS allows letters, digits and
/// hyphens, up to 128.
pub fn client_token(parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(parts.join("\0").as_bytes());
    format!("stackwarden-{}", &hex::encode(digest)[..40])
}

/// Whether a stack event is the stack-level event that begins an operation.
pub fn begins_operation(stack: &str, e: &StackEvent) -> bool {
    e.is_stack_level(stack)
        && matches!(
            e.status.as_str(),
            "CREATE_IN_PROGRESS"
                | "UPDATE_IN_PROGRESS"
                | "DELETE_IN_PROGRESS"
                | "IMPORT_IN_PROGRESS"
        )
}

/// Whether a change set creates a stack or updates one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ChangeSetKind {
    Create,
    Update,
}

/// Everything needed to create a change set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeSetRequest {
    pub stack_name: String,
    pub change_set_name: String,
    pub kind: ChangeSetKind,
    pub template_body: String,
    /// The template's S3 URL, sent instead of the body when set (a template
    /// too large to send inline, or an environment that uploads them all).
    pub template_url: Option<String>,
    /// What must be in the artifact bucket before the change set is made:
    /// the template itself when sent by URL, and its local nested templates.
    pub artifacts: Vec<crate::artifacts::Artifact>,
    pub parameters: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    pub description: String,
    /// The template has nested stacks: the change set is made with
    /// IncludeNestedStacks, so what changes inside them can be inspected
    /// (and gated) before anything is executed.
    pub include_nested_stacks: bool,
    /// A drift-aware change set (`DeploymentMode: REVERT_DRIFT`): it
    /// compares the template with the resources' actual state, so drifted
    /// properties are written back. UPDATE only, no nested stacks.
    pub revert_drift: bool,
}

/// Lifecycle of a change set.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum ChangeSetStatus {
    /// Still being computed.
    Pending,
    /// Computed and executable.
    Ready,
    /// Computed, and it changes nothing.
    NoChanges,
    /// Could not be computed.
    Failed(String),
    /// Being executed, or executed.
    Executing,
    Executed,
    /// Computed, but not executable now (execution status `UNAVAILABLE`):
    /// the stack has an operation in flight, so the caller re-plans.
    Unavailable,
    /// Being deleted or deleted (status `DELETE_PENDING`, `DELETE_IN_PROGRESS`,
    /// `DELETE_COMPLETE`, `DELETE_FAILED`): not ours to use any more.
    Deleted,
}

/// A finished ECS service deployment whose target is not what runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedDeployment {
    /// `ROLLBACK_SUCCESSFUL` or `ROLLBACK_FAILED`.
    pub status: String,
    pub reason: Option<String>,
    /// The task definition the deployment was to run.
    pub task_definition: String,
}

/// The service deployment statuses of a deployment that failed: it was
/// rolled back (the circuit breaker's or the alarms' rollback, or a failed
/// one). `STOPPED` is not one: a deployment stopped by hand or superseded
/// by a newer one says nothing against its task definition.
pub const FAILED_DEPLOYMENT_STATUSES: &[&str] = &["ROLLBACK_SUCCESSFUL", "ROLLBACK_FAILED"];

/// A change set as ListChangeSets summarizes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeSetSummary {
    pub name: String,
    /// When AWS created it (on AWS's clock).
    pub created: Option<SystemTime>,
    /// Its execution status is `EXECUTE_IN_PROGRESS`: the stack's running
    /// operation is this change set's.
    pub executing: bool,
}

/// What a change does to one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum ChangeAction {
    Add,
    Modify,
    Remove,
    Import,
    Dynamic,
    /// Drift-aware change sets only: the resource is not changed, only
    /// CloudFormation's record of it (the template now matches reality).
    SyncWithActual,
}

/// Whether a modification replaces the resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Replacement {
    True,
    False,
    Conditional,
}

/// One resource-level change of a change set.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ResourceChange {
    pub action: ChangeAction,
    pub logical_id: String,
    pub resource_type: String,
    /// `None` when AWS does not say (the emulator never does).
    pub replacement: Option<Replacement>,
    /// Which parts change (Properties, Tags, ...).
    pub scope: Vec<String>,
    /// For a nested stack (`AWS::CloudFormation::Stack`), the id (ARN) of
    /// its own change set, made when the parent was created with nested
    /// change sets included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nested_change_set: Option<String>,
    /// Drift-aware change sets: the resource's drift status when the change
    /// set was made (a non-empty drift-aware change set proves no drift:
    /// AWS reports phantom changes on stacks in sync).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drift: Option<ResourceDriftStatus>,
}

/// Resource types that are stacks of their own: a change to one is a
/// change set of its own, to be inspected like the parent's.
pub const NESTED_STACK_TYPES: &[&str] =
    &["AWS::CloudFormation::Stack", "AWS::Serverless::Application"];

/// A described change set.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChangeSet {
    pub name: String,
    pub id: String,
    pub status: ChangeSetStatus,
    pub changes: Vec<ResourceChange>,
    /// The parameters it was made with, as AWS echoes them (NoEcho `****`).
    pub parameters: BTreeMap<String, String>,
    /// The stack tags it was made with.
    pub tags: BTreeMap<String, String>,
    /// Made with `DeploymentMode: REVERT_DRIFT`.
    pub revert_drift: bool,
}

/// One entry of a stack's event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackEvent {
    pub id: String,
    pub timestamp: SystemTime,
    pub logical_id: String,
    pub resource_type: String,
    pub status: String,
    pub reason: Option<String>,
}

impl StackEvent {
    /// Whether this is an event of the stack `stack` itself, not of one of
    /// its resources.
    pub fn is_stack_level(&self, stack: &str) -> bool {
        self.resource_type == "AWS::CloudFormation::Stack" && self.logical_id == stack
    }
}

/// An ECS deployment of a service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Deployment {
    /// PRIMARY, ACTIVE or INACTIVE.
    pub status: String,
    /// COMPLETED, IN_PROGRESS or FAILED (None on older services).
    pub rollout_state: Option<String>,
    pub rollout_reason: Option<String>,
    pub task_definition: String,
    pub desired: i32,
    pub running: i32,
    pub failed_tasks: i32,
}

/// An ECS service as DescribeServices reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Service {
    pub cluster: String,
    pub name: String,
    pub arn: String,
    pub status: String,
    pub desired: i32,
    pub running: i32,
    pub pending: i32,
    pub task_definition: String,
    pub deployments: Vec<Deployment>,
    /// Most recent service events, newest first.
    pub events: Vec<String>,
}

impl Service {
    pub fn primary(&self) -> Option<&Deployment> {
        self.deployments.iter().find(|d| d.status == "PRIMARY")
    }

    /// A deployment is in flight: more than one deployment, or the primary
    /// still `IN_PROGRESS`. Nothing acts on such a service.
    pub fn deploying(&self) -> bool {
        self.deployments.len() > 1
            || self
                .primary()
                .and_then(|d| d.rollout_state.as_deref())
                .is_some_and(|s| s == "IN_PROGRESS")
    }
}

/// The operations stackwarden needs from AWS, per account and region.
///
/// Every method is one logical AWS operation (pagination included) and
/// makes one attempt per request: retrying is the [`Retrying`] layer's, put
/// around a client where it is built, so the code above reads as
/// orchestration and each logical call has one retry budget.
pub trait Cloud: Send + Sync {
    /// Describes the named stacks that exist (names absent from the result
    /// do not exist), and every other stack tagged with `owner_tag` =
    /// `owner`, so orphans are found in the same read. Its cost must not
    /// grow with the region's other stacks (see the AWS implementation).
    fn describe_stacks(
        &self,
        names: &BTreeSet<String>,
        owner: (&str, &str),
    ) -> impl Future<Output = CloudResult<BTreeMap<String, Stack>>> + Send;

    /// One stack by name (one DescribeStacks call, for polling); `None`
    /// when it does not exist.
    fn describe_stack(&self, name: &str)
    -> impl Future<Output = CloudResult<Option<Stack>>> + Send;

    /// The stack's current template body.
    fn get_template(&self, stack: &str) -> impl Future<Output = CloudResult<String>> + Send;

    fn create_change_set(
        &self,
        request: &ChangeSetRequest,
    ) -> impl Future<Output = CloudResult<()>> + Send;

    fn describe_change_set(
        &self,
        stack: &str,
        name: &str,
    ) -> impl Future<Output = CloudResult<ChangeSet>> + Send;

    /// The stack's change sets, with when they were made.
    fn list_change_sets(
        &self,
        stack: &str,
    ) -> impl Future<Output = CloudResult<Vec<ChangeSetSummary>>> + Send;

    /// ExecuteChangeSet. `token` (ClientRequestToken) makes a retry of a
    /// call whose answer was lost recognisable to AWS as the same request.
    fn execute_change_set(
        &self,
        stack: &str,
        name: &str,
        token: Option<&str>,
    ) -> impl Future<Output = CloudResult<()>> + Send;

    fn delete_change_set(
        &self,
        stack: &str,
        name: &str,
    ) -> impl Future<Output = CloudResult<()>> + Send;

    /// Events newer than `after` (an event id), oldest first; all when None.
    fn stack_events(
        &self,
        stack: &str,
        after: Option<&str>,
    ) -> impl Future<Output = CloudResult<Vec<StackEvent>>> + Send;

    /// The events of the stack's latest operation, oldest first: read back
    /// (page after page) to the stack-level event that began it, so the
    /// root cause of a failure is found however many events followed it.
    fn operation_events(
        &self,
        stack: &str,
    ) -> impl Future<Output = CloudResult<Vec<StackEvent>>> + Send;

    /// ContinueUpdateRollback, skipping `skip` (logical ids of resources
    /// in UPDATE_FAILED, as AWS requires): they are marked rolled back
    /// without being touched.
    fn continue_update_rollback(
        &self,
        stack: &str,
        skip: &[String],
        token: Option<&str>,
    ) -> impl Future<Output = CloudResult<()>> + Send;

    /// RollbackStack: a stack in CREATE_FAILED or UPDATE_FAILED (an
    /// operation made with rollback disabled) goes back to its last stable
    /// state; one that never had one (a failed creation) is deleted.
    fn rollback_stack(
        &self,
        stack: &str,
        token: Option<&str>,
    ) -> impl Future<Output = CloudResult<()>> + Send;

    /// CancelUpdateStack: an update in UPDATE_IN_PROGRESS is stopped and
    /// rolled back to the previous configuration.
    fn cancel_update_stack(
        &self,
        stack: &str,
        token: Option<&str>,
    ) -> impl Future<Output = CloudResult<()>> + Send;

    fn delete_stack(&self, stack: &str) -> impl Future<Output = CloudResult<()>> + Send;

    /// DetectStackDrift: starts a detection of the whole stack and returns
    /// its id. AWS runs one detection per stack at a time and accepts only
    /// the statuses in [`DRIFT_DETECTABLE`].
    fn detect_stack_drift(&self, stack: &str) -> impl Future<Output = CloudResult<String>> + Send;

    /// DescribeStackDriftDetectionStatus.
    fn drift_detection(&self, id: &str) -> impl Future<Output = CloudResult<Detection>> + Send;

    /// DescribeStackResourceDrifts, every page: the resources of the
    /// stack's latest detection, whatever their status.
    fn resource_drifts(
        &self,
        stack: &str,
    ) -> impl Future<Output = CloudResult<Vec<ResourceDrift>>> + Send;

    /// UpdateTerminationProtection.
    fn set_termination_protection(
        &self,
        stack: &str,
        enabled: bool,
    ) -> impl Future<Output = CloudResult<()>> + Send;

    /// Describes services of one cluster (batches of 10 per call).
    fn describe_services(
        &self,
        cluster: &str,
        names: &[String],
    ) -> impl Future<Output = CloudResult<Vec<Service>>> + Send;

    fn update_service(
        &self,
        cluster: &str,
        service: &str,
        desired: Option<i32>,
        task_definition: Option<&str>,
    ) -> impl Future<Output = CloudResult<()>> + Send;

    /// The service's deployments created after `since` that finished
    /// without leaving their target running (ECS's own deployment history:
    /// ListServiceDeployments, then DescribeServiceRevisions for the task
    /// definitions they targeted). What tells a restarted controller that
    /// its last redeploy rolled back.
    fn failed_deployments(
        &self,
        cluster: &str,
        service: &str,
        since: SystemTime,
    ) -> impl Future<Output = CloudResult<Vec<FailedDeployment>>> + Send;

    /// The region an S3 bucket is in (GetBucketLocation; its empty answer
    /// is us-east-1, and its legacy `EU` is eu-west-1).
    fn bucket_region(&self, bucket: &str) -> impl Future<Output = CloudResult<String>> + Send;

    /// Puts an object unless one with that key exists (HeadObject, then a
    /// PutObject that S3 refuses if the key appeared meanwhile): artifact
    /// keys are content-addressed, so an existing object is never
    /// overwritten. Returns whether it uploaded.
    fn put_artifact(
        &self,
        bucket: &str,
        key: &str,
        body: &str,
    ) -> impl Future<Output = CloudResult<bool>> + Send;

    /// Throttling errors seen so far (after the SDK's own retries).
    fn throttles(&self) -> u64 {
        0
    }

    /// API calls made so far (pages count one each).
    fn api_calls(&self) -> u64 {
        0
    }

    /// The account the credentials belong to (STS GetCallerIdentity).
    fn caller_account(&self) -> impl Future<Output = CloudResult<String>> + Send;

    /// Now, on the clock the cloud's timestamps (a change set's creation
    /// time) are comparable with: the wall clock for AWS, the simulated
    /// clock for the simulation.
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_tokens_are_stable_per_request_and_valid_for_aws() {
        let a = client_token(&[
            "execute",
            "arn:aws:cloudformation:us-east-1:1:changeSet/x/1",
        ]);
        assert_eq!(
            a,
            client_token(&[
                "execute",
                "arn:aws:cloudformation:us-east-1:1:changeSet/x/1"
            ])
        );
        assert_ne!(
            a,
            client_token(&[
                "execute",
                "arn:aws:cloudformation:us-east-1:1:changeSet/x/2"
            ])
        );
        // [a-zA-Z0-9][-a-zA-Z0-9]*, at most 128 characters.
        assert!(a.len() <= 128 && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        assert!(a.chars().next().is_some_and(|c| c.is_ascii_alphanumeric()));
    }
}
