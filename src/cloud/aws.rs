//! [`Cloud`] on the AWS SDK for Rust.
//!
//! Configuration is the standard chain (environment, profiles, container and
//! instance roles; `AWS_ENDPOINT_URL` for an emulator), with the region of the
//! environment and, when the environment names one, an assumed role. The SDK
//! makes one attempt per call: retries are the [`super::Retrying`] layer's
//! alone, so one logical call has one budget. Every request sent is counted by an
//! interceptor on each client (`--stats`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_cloudformation as cfn;
use aws_sdk_cloudformation::error::ProvideErrorMetadata;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_runtime_api::http::Response as HttpResponse;

use super::{
    ChangeAction, ChangeSet, ChangeSetKind, ChangeSetRequest, ChangeSetStatus, ChangeSetSummary,
    Cloud, CloudError, CloudResult, Deployment, FAILED_DEPLOYMENT_STATUSES, FailedDeployment,
    Replacement, ResourceChange, Service, Stack, StackEvent, StackStatus,
};
use crate::spec::AssumeRole;

/// Counts API calls, for `--stats` and the benchmarks.
#[derive(Debug, Default)]
pub struct CallCounter(AtomicU64);

impl CallCounter {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    fn tick(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Stacks read by name at once in a busy region.
const BY_NAME_CONCURRENCY: usize = 5;

/// Counts every request the clients send (each page, each attempt), as an
/// SDK interceptor on every client: no call can be left out of `--stats`.
/// It counts right before transmission, so a request that never left (no
/// credentials) is not a call.
#[derive(Debug, Clone)]
struct CountRequests(Arc<CallCounter>);

impl aws_smithy_runtime_api::client::interceptors::Intercept for CountRequests {
    fn name(&self) -> &'static str {
        "stackwarden::CountRequests"
    }

    fn read_before_transmit(
        &self,
        _context: &aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef<'_>,
        _components: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        _cfg: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        self.0.tick();
        Ok(())
    }
}

/// AWS clients for one account and region.
#[derive(Clone)]
pub struct AwsCloud {
    cfn: cfn::Client,
    ecs: aws_sdk_ecs::Client,
    sts: aws_sdk_sts::Client,
    s3: aws_sdk_s3::Client,
    tagging: aws_sdk_resourcegroupstagging::Client,
    /// Where calls go, for the message when no connection can be made.
    endpoint: Arc<str>,
    calls: Arc<CallCounter>,
    throttles: Arc<CallCounter>,
}

impl AwsCloud {
    /// Classifies an SDK error, counting throttling.
    fn error<E, R>(&self, err: SdkError<E, R>) -> CloudError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        let e = match classify(err) {
            CloudError::Unreachable(why) => CloudError::Unreachable(format!(
                "{} ({why}): check the network, the region and AWS_ENDPOINT_URL",
                self.endpoint
            )),
            e => e,
        };
        if matches!(e, CloudError::Throttled(_)) {
            self.throttles.tick();
        }
        e
    }

    /// Builds clients for `region`, assuming `role` when given.
    pub async fn connect(region: &str, role: Option<&AssumeRole>) -> AwsCloud {
        let base = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region.to_owned()))
            .retry_config(sdk_retry())
            .timeout_config(sdk_timeouts())
            .load()
            .await;
        let config = match role {
            None => base,
            Some(role) => {
                let mut provider = aws_config::sts::AssumeRoleProvider::builder(&role.role_arn)
                    .session_name(role.session_name.as_deref().unwrap_or("stackwarden"))
                    .configure(&base);
                if let Some(id) = &role.external_id {
                    provider = provider.external_id(id);
                }
                let provider = provider.build().await;
                base.into_builder()
                    .credentials_provider(
                        aws_credential_types::provider::SharedCredentialsProvider::new(provider),
                    )
                    .build()
            }
        };
        let endpoint: Arc<str> = match config.endpoint_url() {
            Some(url) => format!("the endpoint {url}").into(),
            None => {
                format!("AWS in {region} (https://cloudformation.{region}.amazonaws.com)").into()
            }
        };
        let calls = Arc::new(CallCounter::default());
        let count = CountRequests(calls.clone());
        // An endpoint override (an emulator, a VPC endpoint) is addressed
        // by path: `bucket.127.0.0.1` names no host.
        let path_style = config.endpoint_url().is_some();
        AwsCloud {
            endpoint,
            cfn: cfn::Client::from_conf(
                cfn::config::Builder::from(&config)
                    .interceptor(count.clone())
                    .build(),
            ),
            ecs: aws_sdk_ecs::Client::from_conf(
                aws_sdk_ecs::config::Builder::from(&config)
                    .interceptor(count.clone())
                    .build(),
            ),
            sts: aws_sdk_sts::Client::from_conf(
                aws_sdk_sts::config::Builder::from(&config)
                    .interceptor(count.clone())
                    .build(),
            ),
            tagging: aws_sdk_resourcegroupstagging::Client::from_conf(
                aws_sdk_resourcegroupstagging::config::Builder::from(&config)
                    .interceptor(count.clone())
                    .build(),
            ),
            s3: aws_sdk_s3::Client::from_conf(
                aws_sdk_s3::config::Builder::from(&config)
                    .force_path_style(path_style)
                    .interceptor(count)
                    .build(),
            ),
            calls,
            throttles: Arc::new(CallCounter::default()),
        }
    }

    /// API calls made so far (pages count one each).
    pub fn calls(&self) -> Arc<CallCounter> {
        self.calls.clone()
    }
}

/// The standard AWS configuration (environment, profiles, container and
/// instance roles; `AWS_ENDPOINT_URL`), for the clients that are not per
/// environment (SNS, CloudWatch: each call sets its region).
pub async fn shared_config() -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .retry_config(sdk_retry())
        .timeout_config(sdk_timeouts())
        .load()
        .await
}

/// The SDK does not retry: [`super::Retrying`] is the one retry layer,
/// bounded in time, visible in the logs, and without the adaptive mode's
/// client-wide rate limiter (one throttled call used to slow every other
/// call of the client).
fn sdk_retry() -> RetryConfig {
    RetryConfig::standard().with_max_attempts(1)
}

/// No call may hang: a connection that cannot be made, or an answer that
/// never comes (a dropped connection, a wedged proxy), ends the attempt as a
/// transport error, which the retry layer retries.
fn sdk_timeouts() -> aws_config::timeout::TimeoutConfig {
    aws_config::timeout::TimeoutConfig::builder()
        // With the retry layer's connect budget, a command facing an
        // endpoint that drops packets gives up within 10 s.
        .connect_timeout(std::time::Duration::from_secs(3))
        .operation_attempt_timeout(std::time::Duration::from_secs(60))
        .build()
}

/// Where a newest-first read of stack events ends.
enum EventsEnd {
    NotYet,
    /// Before this event (it is not returned).
    Before,
    /// With this event (it is returned).
    Including,
}

impl AwsCloud {
    /// Reads a stack's events newest first, page after page (at most
    /// `max_pages`), until `end` says where to stop; returns them oldest
    /// first.
    async fn read_events(
        &self,
        stack: &str,
        max_pages: usize,
        end: impl Fn(&StackEvent) -> EventsEnd,
    ) -> CloudResult<Vec<StackEvent>> {
        let mut token: Option<String> = None;
        let mut out = Vec::new();
        'pages: for _ in 0..max_pages {
            let page = self
                .cfn
                .describe_stack_events()
                .stack_name(stack)
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| self.error(e))?;
            for e in page.stack_events() {
                let event = map_event(e);
                match end(&event) {
                    EventsEnd::NotYet => out.push(event),
                    EventsEnd::Before => break 'pages,
                    EventsEnd::Including => {
                        out.push(event);
                        break 'pages;
                    }
                }
            }
            token = page.next_token().map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
        out.reverse();
        Ok(out)
    }
}

/// Maps an SDK error to a [`CloudError`] by its code and message.
pub(crate) fn classify<E, R>(err: SdkError<E, R>) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let code = err.code().unwrap_or_default().to_owned();
    let message = err.message().unwrap_or_default().to_owned();
    let text = if message.is_empty() {
        one_line(&err)
    } else {
        message.clone()
    };
    match &err {
        SdkError::DispatchFailure(d) => return dispatch_failure(&err, d.is_timeout()),
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            return CloudError::Transport(text);
        }
        _ => {}
    }
    // A 5xx is AWS failing, whatever the code says (moto and proxies
    // answer 5xx with odd or empty codes).
    let status = err
        .raw_response()
        .and_then(|r| (r as &dyn std::any::Any).downcast_ref::<HttpResponse>())
        .map(|r| r.status().as_u16());
    if status.is_some_and(|s| s >= 500) {
        let status = status.unwrap_or_default();
        return CloudError::Server(format!("HTTP {status} {code}: {text}"));
    }
    classify_code(&code, &text)
}

/// An error and its sources on one line, each said once, as a person reads
/// them (the SDK's Debug dump of its internals left out).
fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        let first = text.lines().next().unwrap_or_default().trim().to_owned();
        if !first.is_empty() && !parts.iter().any(|p| p.contains(&first)) {
            parts.push(first);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// A request that never reached AWS: no credentials, no connection, or a
/// transport failure after connecting.
fn dispatch_failure(err: &(dyn std::error::Error + 'static), connect_timeout: bool) -> CloudError {
    use aws_credential_types::provider::error::CredentialsError;
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut connect = connect_timeout;
    while let Some(e) = next {
        if let Some(c) = e.downcast_ref::<CredentialsError>() {
            return match c {
                CredentialsError::CredentialsNotLoaded(_) => CloudError::NoCredentials(
                    "looked in the environment (AWS_ACCESS_KEY_ID), the shared config and \
                     credentials files (AWS_PROFILE, ~/.aws), a web identity token, ECS container \
                     credentials and EC2 instance metadata: set AWS_PROFILE, or AWS_ACCESS_KEY_ID \
                     and AWS_SECRET_ACCESS_KEY, or run where a role is attached"
                        .into(),
                ),
                // A profile that cannot be read as written: no retry helps.
                CredentialsError::InvalidConfiguration(_) => {
                    CloudError::Validation(format!("AWS configuration: {}", one_line(c)))
                }
                // A provider that answered and refused: an assumed role
                // that may not be assumed, expired SSO.
                _ => {
                    let why = one_line(c);
                    if why.contains("AccessDenied") || why.contains("not authorized") {
                        CloudError::AccessDenied(format!("loading credentials: {why}"))
                    } else {
                        CloudError::Transport(format!("loading credentials: {why}"))
                    }
                }
            };
        }
        let text = e.to_string();
        // hyper's "client error (Connect)", a failed DNS lookup, or the
        // connect timeout: no connection was ever made.
        if text.contains("(Connect)") || text.starts_with("dns error") {
            connect = true;
        }
        next = e.source();
    }
    let why = one_line(err);
    if connect {
        CloudError::Unreachable(why)
    } else {
        CloudError::Transport(why)
    }
}

fn classify_code(code: &str, message: &str) -> CloudError {
    let m = message.to_owned();
    if message.contains("No updates are to be performed")
        || message.contains("didn't contain changes")
    {
        return CloudError::NoChanges;
    }
    match code {
        "Throttling"
        | "ThrottlingException"
        | "TooManyRequestsException"
        | "RequestLimitExceeded" => CloudError::Throttled(m),
        "AccessDenied" | "AccessDeniedException" | "UnauthorizedOperation" => {
            CloudError::AccessDenied(m)
        }
        "ExpiredToken" | "ExpiredTokenException" | "RequestExpired" => {
            CloudError::ExpiredCredentials(m)
        }
        "ChangeSetNotFound"
        | "NoSuchBucket"
        | "StackNotFoundException"
        | "ServiceNotFoundException"
        | "ClusterNotFoundException" => CloudError::NotFound(m),
        "OperationInProgressException"
        | "InvalidChangeSetStatus"
        | "InvalidChangeSetStatusException"
        | "TokenAlreadyExistsException" => CloudError::Conflict(m),
        "AlreadyExistsException" => CloudError::Conflict(m),
        "InternalFailure"
        | "InternalError"
        | "ServiceUnavailable"
        | "ServiceUnavailableException"
        | "ServerException" => CloudError::Server(format!("{code}: {m}")),
        _ if message.contains("does not exist") => CloudError::NotFound(m),
        _ if message.contains("_IN_PROGRESS state") || message.contains("in progress") => {
            CloudError::Conflict(m)
        }
        _ => CloudError::Validation(if code.is_empty() {
            m
        } else {
            format!("{code}: {m}")
        }),
    }
}

fn system_time(t: Option<&aws_smithy_types::DateTime>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(*t).ok())
}

/// Parameters as AWS echoes them (NoEcho values `****`), by key.
fn parameter_map(params: &[cfn::types::Parameter]) -> BTreeMap<String, String> {
    params
        .iter()
        .filter_map(|p| {
            Some((
                p.parameter_key()?.to_owned(),
                p.parameter_value().unwrap_or_default().to_owned(),
            ))
        })
        .collect()
}

fn tag_map(tags: &[cfn::types::Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
        .collect()
}

fn map_event(e: &cfn::types::StackEvent) -> StackEvent {
    StackEvent {
        id: e.event_id().unwrap_or_default().to_owned(),
        timestamp: system_time(e.timestamp()).unwrap_or(SystemTime::UNIX_EPOCH),
        logical_id: e.logical_resource_id().unwrap_or_default().to_owned(),
        resource_type: e.resource_type().unwrap_or_default().to_owned(),
        status: e
            .resource_status()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        reason: e.resource_status_reason().map(str::to_owned),
    }
}

fn map_stack(s: &cfn::types::Stack) -> Stack {
    Stack {
        name: s.stack_name().unwrap_or_default().to_owned(),
        id: s.stack_id().unwrap_or_default().to_owned(),
        status: s
            .stack_status()
            .map_or(StackStatus::Other(String::new()), |x| x.as_str().into()),
        status_reason: s.stack_status_reason().map(str::to_owned),
        parameters: parameter_map(s.parameters()),
        tags: tag_map(s.tags()),
        outputs: s
            .outputs()
            .iter()
            .filter_map(|o| {
                Some((
                    o.output_key()?.to_owned(),
                    o.output_value().unwrap_or_default().to_owned(),
                ))
            })
            .collect(),
        termination_protection: s.enable_termination_protection().unwrap_or(false),
        last_updated: system_time(s.last_updated_time()),
        drift: s
            .drift_information()
            .map(|d| crate::cloud::StackDrift {
                status: crate::cloud::DriftStatus::parse(
                    d.stack_drift_status().map_or("", |x| x.as_str()),
                ),
                last_check: system_time(d.last_check_timestamp()),
            })
            .unwrap_or_default(),
    }
}

impl AwsCloud {
    /// One stack by name (one DescribeStacks); `None` when it does not
    /// exist.
    async fn stack_by_name(&self, name: &str) -> CloudResult<Option<Stack>> {
        match self.cfn.describe_stacks().stack_name(name).send().await {
            Ok(out) => Ok(out
                .stacks()
                .iter()
                .map(map_stack)
                .find(|s| s.status != StackStatus::DeleteComplete)),
            Err(e) => match self.error(e) {
                CloudError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    /// The names of the region's stacks tagged `key` = `value` (Resource
    /// Groups Tagging API, paginated).
    async fn tagged_stacks(&self, (key, value): (&str, &str)) -> CloudResult<BTreeSet<String>> {
        use aws_sdk_resourcegroupstagging::types::TagFilter;
        let mut pages = self
            .tagging
            .get_resources()
            .resource_type_filters("cloudformation:stack")
            .tag_filters(TagFilter::builder().key(key).values(value).build())
            .into_paginator()
            .send();
        let mut out = BTreeSet::new();
        while let Some(page) = pages.try_next().await.map_err(|e| self.error(e))? {
            for m in page.resource_tag_mapping_list() {
                // arn:aws:cloudformation:<region>:<account>:stack/<name>/<id>
                if let Some(name) = m.resource_arn().and_then(|a| a.split('/').nth(1)) {
                    out.insert(name.to_owned());
                }
            }
        }
        Ok(out)
    }
}

impl Cloud for AwsCloud {
    fn throttles(&self) -> u64 {
        self.throttles.get()
    }

    fn api_calls(&self) -> u64 {
        self.calls.get()
    }

    /// One page of the region's stacks reads a quiet region whole, in one
    /// call. A busy region (more than a page: other teams' stacks) is not
    /// paged through, so the cost does not grow with what else lives in
    /// the account: the owner's stacks are found by their tag (Resource
    /// Groups Tagging API, one call per 100 of ours) and, with the declared
    /// ones, read by name. Without `tag:GetResources` it pages through.
    async fn describe_stacks(
        &self,
        names: &BTreeSet<String>,
        owner: (&str, &str),
    ) -> CloudResult<BTreeMap<String, Stack>> {
        let mut out = BTreeMap::new();
        let keep = |out: &mut BTreeMap<String, Stack>, page: &[cfn::types::Stack]| {
            for s in page {
                let stack = map_stack(s);
                let owned = stack.tags.get(owner.0).is_some_and(|v| v == owner.1);
                if stack.status != StackStatus::DeleteComplete
                    && (names.contains(&stack.name) || owned)
                {
                    out.insert(stack.name.clone(), stack);
                }
            }
        };
        let first = self
            .cfn
            .describe_stacks()
            .send()
            .await
            .map_err(|e| self.error(e))?;
        keep(&mut out, first.stacks());
        let Some(mut token) = first.next_token().map(str::to_owned) else {
            return Ok(out);
        };
        let tagged = match self.tagged_stacks(owner).await {
            Ok(t) => Some(t),
            Err(e @ CloudError::AccessDenied(_)) => {
                tracing::warn!(message = "Cannot find stacks by tag (tag:GetResources); listing the region's stacks instead.", error = %e);
                None
            }
            Err(e) => return Err(e),
        };
        let Some(tagged) = tagged else {
            loop {
                let page = self
                    .cfn
                    .describe_stacks()
                    .next_token(&token)
                    .send()
                    .await
                    .map_err(|e| self.error(e))?;
                keep(&mut out, page.stacks());
                match page.next_token() {
                    Some(t) => token = t.to_owned(),
                    None => return Ok(out),
                }
            }
        };
        let unread: Vec<&String> = names
            .iter()
            .chain(tagged.iter())
            .filter(|n| !out.contains_key(*n))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // A few at a time: a burst would only invite throttling.
        use futures::stream::{StreamExt, TryStreamExt};
        let unread: Vec<String> = unread.into_iter().cloned().collect();
        let read: Vec<Option<Stack>> = futures::stream::iter(unread)
            .map(|n| async move { self.stack_by_name(&n).await })
            .buffer_unordered(BY_NAME_CONCURRENCY)
            .try_collect()
            .await?;
        out.extend(read.into_iter().flatten().map(|s| (s.name.clone(), s)));
        Ok(out)
    }

    async fn describe_stack(&self, name: &str) -> CloudResult<Option<Stack>> {
        self.stack_by_name(name).await
    }
    async fn get_template(&self, stack: &str) -> CloudResult<String> {
        let out = self
            .cfn
            .get_template()
            .stack_name(stack)
            .template_stage(cfn::types::TemplateStage::Original)
            .send()
            .await
            .map_err(|e| self.error(e))?;
        Ok(out.template_body().unwrap_or_default().to_owned())
    }

    async fn create_change_set(&self, r: &ChangeSetRequest) -> CloudResult<()> {
        let parameters = r
            .parameters
            .iter()
            .map(|(k, v)| {
                cfn::types::Parameter::builder()
                    .parameter_key(k)
                    .parameter_value(v)
                    .build()
            })
            .collect();
        let tags = r
            .tags
            .iter()
            .map(|(k, v)| cfn::types::Tag::builder().key(k).value(v).build())
            .collect();
        self.cfn
            .create_change_set()
            .stack_name(&r.stack_name)
            .change_set_name(&r.change_set_name)
            .change_set_type(match r.kind {
                ChangeSetKind::Create => cfn::types::ChangeSetType::Create,
                ChangeSetKind::Update => cfn::types::ChangeSetType::Update,
            })
            .set_template_body(r.template_url.is_none().then(|| r.template_body.clone()))
            .set_template_url(r.template_url.clone())
            .set_parameters(Some(parameters))
            .set_tags(Some(tags))
            .capabilities(cfn::types::Capability::CapabilityIam)
            .capabilities(cfn::types::Capability::CapabilityNamedIam)
            .capabilities(cfn::types::Capability::CapabilityAutoExpand)
            .description(&r.description)
            .set_include_nested_stacks(r.include_nested_stacks.then_some(true))
            .set_deployment_mode(
                r.revert_drift
                    .then_some(cfn::types::DeploymentMode::RevertDrift),
            )
            .send()
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    async fn describe_change_set(&self, stack: &str, name: &str) -> CloudResult<ChangeSet> {
        let mut token: Option<String> = None;
        let mut changes = Vec::new();
        loop {
            let out = self
                .cfn
                .describe_change_set()
                // A nested change set is named by its ARN alone.
                .set_stack_name((!name.starts_with("arn:")).then(|| stack.to_owned()))
                .change_set_name(name)
                // Drift-aware change sets report each resource's drift
                // status only with the property values.
                .include_property_values(true)
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| self.error(e))?;
            for c in out.changes() {
                let Some(rc) = c.resource_change() else {
                    continue;
                };
                changes.push(ResourceChange {
                    action: match rc.action() {
                        Some(cfn::types::ChangeAction::Add) => ChangeAction::Add,
                        Some(cfn::types::ChangeAction::Remove) => ChangeAction::Remove,
                        Some(cfn::types::ChangeAction::Import) => ChangeAction::Import,
                        Some(cfn::types::ChangeAction::Dynamic) => ChangeAction::Dynamic,
                        Some(cfn::types::ChangeAction::SyncWithActual) => {
                            ChangeAction::SyncWithActual
                        }
                        _ => ChangeAction::Modify,
                    },
                    logical_id: rc.logical_resource_id().unwrap_or_default().to_owned(),
                    resource_type: rc.resource_type().unwrap_or_default().to_owned(),
                    replacement: match rc.replacement() {
                        Some(cfn::types::Replacement::True) => Some(Replacement::True),
                        Some(cfn::types::Replacement::False) => Some(Replacement::False),
                        Some(cfn::types::Replacement::Conditional) => {
                            Some(Replacement::Conditional)
                        }
                        _ => None,
                    },
                    scope: rc.scope().iter().map(|s| s.as_str().to_owned()).collect(),
                    nested_change_set: rc.change_set_id().map(str::to_owned),
                    drift: rc
                        .resource_drift_status()
                        .map(|d| crate::cloud::ResourceDriftStatus::parse(d.as_str())),
                });
            }
            let reason = out.status_reason().unwrap_or_default().to_owned();
            let status = match (
                out.status().map(|s| s.as_str()).unwrap_or_default(),
                out.execution_status()
                    .map(|s| s.as_str())
                    .unwrap_or_default(),
            ) {
                ("FAILED", _) if matches!(classify_code("", &reason), CloudError::NoChanges) => {
                    ChangeSetStatus::NoChanges
                }
                ("FAILED", _) => ChangeSetStatus::Failed(reason),
                (
                    "DELETE_PENDING" | "DELETE_IN_PROGRESS" | "DELETE_COMPLETE" | "DELETE_FAILED",
                    _,
                ) => ChangeSetStatus::Deleted,
                ("CREATE_PENDING" | "CREATE_IN_PROGRESS", _) => ChangeSetStatus::Pending,
                (_, "EXECUTE_IN_PROGRESS") => ChangeSetStatus::Executing,
                (_, "EXECUTE_COMPLETE") => ChangeSetStatus::Executed,
                (_, "EXECUTE_FAILED") => {
                    ChangeSetStatus::Failed(format!("execution failed: {reason}"))
                }
                (_, "OBSOLETE") => {
                    ChangeSetStatus::Failed("obsolete: the stack changed since".into())
                }
                ("CREATE_COMPLETE", "AVAILABLE") => ChangeSetStatus::Ready,
                ("CREATE_COMPLETE", "UNAVAILABLE") => ChangeSetStatus::Unavailable,
                _ => ChangeSetStatus::Pending,
            };
            token = out.next_token().map(str::to_owned);
            if token.is_none() {
                return Ok(ChangeSet {
                    name: out.change_set_name().unwrap_or(name).to_owned(),
                    id: out.change_set_id().unwrap_or_default().to_owned(),
                    status,
                    changes,
                    parameters: parameter_map(out.parameters()),
                    tags: tag_map(out.tags()),
                    revert_drift: out.deployment_mode()
                        == Some(&cfn::types::DeploymentMode::RevertDrift),
                });
            }
        }
    }

    async fn list_change_sets(&self, stack: &str) -> CloudResult<Vec<ChangeSetSummary>> {
        let mut token: Option<String> = None;
        let mut names = Vec::new();
        loop {
            let out = self
                .cfn
                .list_change_sets()
                .stack_name(stack)
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| self.error(e))?;
            // Filtered by stack again: the emulator answers with every
            // stack's change sets, and stale-change-set cleanup must never
            // touch another stack's.
            names.extend(
                out.summaries()
                    .iter()
                    .filter(|s| s.stack_name().is_none_or(|n| n == stack))
                    .filter_map(|s| {
                        Some(ChangeSetSummary {
                            name: s.change_set_name()?.to_owned(),
                            created: system_time(s.creation_time()),
                            executing: s.execution_status()
                                == Some(&cfn::types::ExecutionStatus::ExecuteInProgress),
                        })
                    }),
            );
            token = out.next_token().map(str::to_owned);
            if token.is_none() {
                return Ok(names);
            }
        }
    }

    async fn execute_change_set(
        &self,
        stack: &str,
        name: &str,
        token: Option<&str>,
    ) -> CloudResult<()> {
        self.cfn
            .execute_change_set()
            .stack_name(stack)
            .change_set_name(name)
            .set_client_request_token(token.map(str::to_owned))
            .send()
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    async fn delete_change_set(&self, stack: &str, name: &str) -> CloudResult<()> {
        self.cfn
            .delete_change_set()
            .stack_name(stack)
            .change_set_name(name)
            .send()
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    async fn operation_events(&self, stack: &str) -> CloudResult<Vec<StackEvent>> {
        // A bound on pages keeps a pathological history from costing
        // unbounded calls.
        const MAX_PAGES: usize = 50;
        self.read_events(stack, MAX_PAGES, |e| {
            if super::begins_operation(stack, e) {
                EventsEnd::Including
            } else {
                EventsEnd::NotYet
            }
        })
        .await
    }

    async fn stack_events(&self, stack: &str, after: Option<&str>) -> CloudResult<Vec<StackEvent>> {
        // Up to the last event already seen; with no mark, the first page
        // (the latest 100 events) is enough.
        let pages = if after.is_some() { usize::MAX } else { 1 };
        self.read_events(stack, pages, |e| {
            if Some(e.id.as_str()) == after {
                EventsEnd::Before
            } else {
                EventsEnd::NotYet
            }
        })
        .await
    }

    async fn continue_update_rollback(
        &self,
        stack: &str,
        skip: &[String],
        token: Option<&str>,
    ) -> CloudResult<()> {
        self.cfn
            .continue_update_rollback()
            .stack_name(stack)
            .set_client_request_token(token.map(str::to_owned))
            .set_resources_to_skip((!skip.is_empty()).then(|| skip.to_vec()))
            .send()
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    async fn rollback_stack(&self, stack: &str, token: Option<&str>) -> CloudResult<()> {
        // RetainExceptOnCreate stays false (AWS's default): what the failed
        // operation created is removed by its rollback, as any rollback does.
        self.cfn
            .rollback_stack()
            .stack_name(stack)
            .set_client_request_token(token.map(str::to_owned))
            .send()
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    async fn cancel_update_stack(&self, stack: &str, token: Option<&str>) -> CloudResult<()> {
        self.cfn
            .cancel_update_stack()
            .stack_name(stack)
            .set_client_request_token(token.map(str::to_owned))
            .send()
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    async fn delete_stack(&self, stack: &str) -> CloudResult<()> {
        self.cfn
            .delete_stack()
            .stack_name(stack)
            .send()
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    async fn detect_stack_drift(&self, stack: &str) -> CloudResult<String> {
        let out = self
            .cfn
            .detect_stack_drift()
            .stack_name(stack)
            .send()
            .await
            .map_err(|e| self.error(e))?;
        Ok(out
            .stack_drift_detection_id()
            .unwrap_or_default()
            .to_owned())
    }

    async fn drift_detection(&self, id: &str) -> CloudResult<crate::cloud::Detection> {
        use cfn::types::StackDriftDetectionStatus as S;
        let out = self
            .cfn
            .describe_stack_drift_detection_status()
            .stack_drift_detection_id(id)
            .send()
            .await
            .map_err(|e| self.error(e))?;
        let reason = || {
            out.detection_status_reason()
                .unwrap_or("no reason given")
                .to_owned()
        };
        Ok(crate::cloud::Detection {
            status: match out.detection_status() {
                Some(S::DetectionComplete) => crate::cloud::DetectionStatus::Complete,
                Some(S::DetectionFailed) => crate::cloud::DetectionStatus::Failed(reason()),
                Some(S::DetectionInProgress) => crate::cloud::DetectionStatus::InProgress,
                // A status added later: not an ended detection to read.
                Some(other) => crate::cloud::DetectionStatus::Failed(format!(
                    "unknown detection status {}: {}",
                    other.as_str(),
                    reason()
                )),
                None => crate::cloud::DetectionStatus::InProgress,
            },
            stack_drift: crate::cloud::DriftStatus::parse(
                out.stack_drift_status().map_or("", |x| x.as_str()),
            ),
            drifted_resources: out.drifted_stack_resource_count(),
        })
    }

    async fn resource_drifts(&self, stack: &str) -> CloudResult<Vec<crate::cloud::ResourceDrift>> {
        use crate::cloud::{
            DifferenceKind, PropertyDifference, ResourceDrift, ResourceDriftStatus,
        };
        let mut pages = self
            .cfn
            .describe_stack_resource_drifts()
            .stack_name(stack)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.try_next().await.map_err(|e| self.error(e))? {
            for d in page.stack_resource_drifts() {
                out.push(ResourceDrift {
                    logical_id: d.logical_resource_id().unwrap_or_default().to_owned(),
                    physical_id: d.physical_resource_id().map(str::to_owned),
                    resource_type: d.resource_type().unwrap_or_default().to_owned(),
                    status: ResourceDriftStatus::parse(
                        d.stack_resource_drift_status().map_or("", |x| x.as_str()),
                    ),
                    differences: d
                        .property_differences()
                        .iter()
                        .map(|p| PropertyDifference {
                            path: p.property_path().unwrap_or_default().to_owned(),
                            expected: p.expected_value().map(str::to_owned),
                            actual: p.actual_value().map(str::to_owned),
                            kind: match p.difference_type() {
                                Some(cfn::types::DifferenceType::Add) => DifferenceKind::Add,
                                Some(cfn::types::DifferenceType::Remove) => DifferenceKind::Remove,
                                _ => DifferenceKind::NotEqual,
                            },
                        })
                        .collect(),
                    checked: system_time(d.timestamp()),
                });
            }
        }
        Ok(out)
    }

    async fn set_termination_protection(&self, stack: &str, enabled: bool) -> CloudResult<()> {
        self.cfn
            .update_termination_protection()
            .stack_name(stack)
            .enable_termination_protection(enabled)
            .send()
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    async fn describe_services(
        &self,
        cluster: &str,
        names: &[String],
    ) -> CloudResult<Vec<Service>> {
        let mut out = Vec::new();
        for batch in names.chunks(10) {
            let resp = self
                .ecs
                .describe_services()
                .cluster(cluster)
                .set_services(Some(batch.to_vec()))
                .send()
                .await
                .map_err(|e| self.error(e))?;
            for s in resp.services() {
                out.push(Service {
                    cluster: cluster.to_owned(),
                    name: s.service_name().unwrap_or_default().to_owned(),
                    arn: s.service_arn().unwrap_or_default().to_owned(),
                    status: s.status().unwrap_or_default().to_owned(),
                    desired: s.desired_count(),
                    running: s.running_count(),
                    pending: s.pending_count(),
                    task_definition: s.task_definition().unwrap_or_default().to_owned(),
                    deployments: s
                        .deployments()
                        .iter()
                        .map(|d| Deployment {
                            status: d.status().unwrap_or_default().to_owned(),
                            rollout_state: d.rollout_state().map(|r| r.as_str().to_owned()),
                            rollout_reason: d.rollout_state_reason().map(str::to_owned),
                            task_definition: d.task_definition().unwrap_or_default().to_owned(),
                            desired: d.desired_count(),
                            running: d.running_count(),
                            failed_tasks: d.failed_tasks(),
                        })
                        .collect(),
                    events: s
                        .events()
                        .iter()
                        .take(5)
                        .filter_map(|e| e.message().map(str::to_owned))
                        .collect(),
                });
            }
        }
        Ok(out)
    }

    async fn failed_deployments(
        &self,
        cluster: &str,
        service: &str,
        since: SystemTime,
    ) -> CloudResult<Vec<FailedDeployment>> {
        use aws_sdk_ecs::types::{CreatedAt, ServiceDeploymentStatus};
        let mut briefs = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let resp = self
                .ecs
                .list_service_deployments()
                .cluster(cluster)
                .service(service)
                .set_status(Some(
                    FAILED_DEPLOYMENT_STATUSES
                        .iter()
                        .map(|s| ServiceDeploymentStatus::from(*s))
                        .collect(),
                ))
                .created_at(
                    CreatedAt::builder()
                        .after(aws_smithy_types::DateTime::from(since))
                        .build(),
                )
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| self.error(e))?;
            briefs.extend(resp.service_deployments().iter().cloned());
            token = resp.next_token().map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
        let arns: Vec<String> = briefs
            .iter()
            .filter_map(|b| b.target_service_revision_arn().map(str::to_owned))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut task_definitions = BTreeMap::new();
        for batch in arns.chunks(20) {
            let resp = self
                .ecs
                .describe_service_revisions()
                .set_service_revision_arns(Some(batch.to_vec()))
                .send()
                .await
                .map_err(|e| self.error(e))?;
            for r in resp.service_revisions() {
                if let (Some(arn), Some(td)) = (r.service_revision_arn(), r.task_definition()) {
                    task_definitions.insert(arn.to_owned(), td.to_owned());
                }
            }
            for f in resp.failures() {
                tracing::warn!(
                    message = "A service revision of a failed deployment cannot be described; that deployment is not counted.",
                    arn = f.arn().unwrap_or(""),
                    reason = f.reason().unwrap_or(""),
                    detail = f.detail().unwrap_or("")
                );
            }
        }
        Ok(briefs
            .iter()
            .filter_map(|b| {
                Some(FailedDeployment {
                    status: b.status()?.as_str().to_owned(),
                    reason: b.status_reason().map(str::to_owned),
                    task_definition: task_definitions
                        .get(b.target_service_revision_arn()?)?
                        .clone(),
                })
            })
            .collect())
    }

    async fn update_service(
        &self,
        cluster: &str,
        service: &str,
        desired: Option<i32>,
        task_definition: Option<&str>,
    ) -> CloudResult<()> {
        self.ecs
            .update_service()
            .cluster(cluster)
            .service(service)
            .set_desired_count(desired)
            .set_task_definition(task_definition.map(str::to_owned))
            .send()
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    async fn bucket_region(&self, bucket: &str) -> CloudResult<String> {
        let out = self
            .s3
            .get_bucket_location()
            .bucket(bucket)
            .send()
            .await
            .map_err(|e| self.error(e))?;
        // "Buckets in Region us-east-1 have a LocationConstraint of null";
        // `EU` is the legacy name of eu-west-1.
        Ok(match out.location_constraint().map(|c| c.as_str()) {
            None | Some("") => "us-east-1".to_owned(),
            Some("EU") => "eu-west-1".to_owned(),
            Some(r) => r.to_owned(),
        })
    }

    async fn put_artifact(&self, bucket: &str, key: &str, body: &str) -> CloudResult<bool> {
        match self.s3.head_object().bucket(bucket).key(key).send().await {
            Ok(_) => return Ok(false),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_not_found()) => {}
            // Without s3:ListBucket a missing key answers 403, not 404: the
            // conditional put below settles whether it exists.
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 403) => {}
            Err(e) => return Err(self.error(e)),
        }
        let put = self
            .s3
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type("text/plain; charset=utf-8")
            // Never overwrite: S3 answers 412 if the key exists by now.
            .if_none_match("*")
            .body(aws_sdk_s3::primitives::ByteStream::from(
                body.as_bytes().to_vec(),
            ))
            .send()
            .await;
        match put {
            Ok(_) => Ok(true),
            // Written meanwhile by another run: the same bytes, by its key.
            Err(e)
                if matches!(
                    e.code(),
                    Some("PreconditionFailed" | "ConditionalRequestConflict")
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.error(e)),
        }
    }

    async fn caller_account(&self) -> CloudResult<String> {
        let me = self
            .sts
            .get_caller_identity()
            .send()
            .await
            .map_err(|e| self.error(e))?;
        me.account()
            .map(str::to_owned)
            .ok_or_else(|| CloudError::Validation("GetCallerIdentity returned no account".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_that_never_reach_aws_are_told_apart_in_one_line() {
        use aws_credential_types::provider::error::CredentialsError;
        use aws_smithy_runtime_api::client::result::ConnectorError;
        let no_creds = CredentialsError::not_loaded("no credentials found in chain");
        assert!(matches!(
            dispatch_failure(&ConnectorError::other(Box::new(no_creds), None), false),
            CloudError::NoCredentials(_)
        ));
        let denied = CredentialsError::provider_error(
            "AccessDenied: not authorized to perform: sts:AssumeRole",
        );
        assert!(matches!(
            dispatch_failure(&ConnectorError::other(Box::new(denied), None), false),
            CloudError::AccessDenied(_)
        ));
        let refused =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let e = dispatch_failure(&ConnectorError::io(Box::new(refused)), true);
        assert!(
            matches!(&e, CloudError::Unreachable(m) if m.contains("Connection refused")),
            "{e}"
        );
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset");
        let e = dispatch_failure(&ConnectorError::io(Box::new(reset)), false);
        assert!(
            matches!(&e, CloudError::Transport(m) if !m.contains('\n')),
            "{e}"
        );
    }

    #[test]
    fn error_codes_and_messages_are_classified_once() {
        assert_eq!(
            classify_code("ValidationError", "No updates are to be performed."),
            CloudError::NoChanges
        );
        assert_eq!(
            classify_code(
                "",
                "The submitted information didn't contain changes. Submit different information to create a change set."
            ),
            CloudError::NoChanges
        );
        assert!(matches!(
            classify_code("Throttling", "Rate exceeded"),
            CloudError::Throttled(_)
        ));
        assert!(matches!(
            classify_code("ValidationError", "Stack with id x does not exist"),
            CloudError::NotFound(_)
        ));
        assert!(matches!(
            classify_code(
                "ValidationError",
                "Stack:arn is in UPDATE_IN_PROGRESS state and can not be updated."
            ),
            CloudError::Conflict(_)
        ));
        assert!(matches!(
            classify_code("AccessDenied", "no"),
            CloudError::AccessDenied(_)
        ));
        assert!(matches!(
            classify_code("ValidationError", "Template format error"),
            CloudError::Validation(_)
        ));
        assert!(matches!(
            classify_code("InternalFailure", "oops"),
            CloudError::Server(_)
        ));
        // An expired session is refreshed and retried, never permanent.
        let expired = classify_code(
            "ExpiredToken",
            "The security token included in the request is expired",
        );
        assert!(expired.is_transient());
        assert!(!crate::apply::ApplyError::Observe(expired).is_permanent());
    }

    #[test]
    fn any_5xx_answer_is_a_transient_service_error_not_an_invalid_request() {
        use aws_smithy_types::body::SdkBody;
        use aws_smithy_types::error::ErrorMetadata;
        use cfn::operation::describe_stacks::DescribeStacksError;
        let err = DescribeStacksError::generic(
            ErrorMetadata::builder()
                .code("ValidationError")
                .message("boom")
                .build(),
        );
        let raw = HttpResponse::new(
            aws_smithy_runtime_api::http::StatusCode::try_from(502).unwrap(),
            SdkBody::empty(),
        );
        let e = classify(SdkError::service_error(err, raw));
        assert!(matches!(&e, CloudError::Server(_)), "{e:?}");
        assert!(e.is_transient());
        assert!(!e.to_string().contains("invalid request"), "{e}");
    }
}
