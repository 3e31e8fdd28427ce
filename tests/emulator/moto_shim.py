"""moto server for stackwarden's tests, with the few patches they need.

Run as `python moto_shim.py --port N` (scripts/emulator does). Pinned to the
moto version in tests/emulator/requirements.txt; every patch below names the
moto behaviour it corrects, checked against that version's source.

Patches
1. ExecuteChangeSet leaves the stack half-updated: moto applies the resources
   but keeps the stack's old parsed template, so it builds no Outputs and no
   Exports, never applies the change set's tags, and sets no LastUpdatedTime.
   stackwarden reads Outputs to feed dependent stacks and tags to know its
   revision, so after moto's own execute we re-parse the template, rebuild the
   outputs and exports, copy the tags and stamp LastUpdatedTime (UPDATE only,
   as AWS does).
2. NoEcho parameters are masked by comparing the parameter's *value* with the
   NoEcho key list; AWS masks by key. We mask by key, so tests see `****`
   exactly where AWS would show it.
3. Resource types moto has no CloudFormation model for (MSK, ElastiCache,
   Secrets Manager, Backup, CloudWatch alarms, Application Auto Scaling, Cloud
   Map, S3 bucket policies) are skipped by moto, and a Ref or GetAtt to them
   then breaks the stack. We register a placeholder model for each: it has a
   physical id and deterministic attributes (an ARN, an endpoint), and owns no
   behaviour. stackwarden never reads these resources directly.
4. ECS services report runningCount = MOTO_ECS_SERVICE_RUNNING (default 0)
   at creation, so every new service would look degraded forever. With
   STACKWARDEN_ECS_RUNNING=desired (the default here) a service starts with
   running = desired and its primary deployment COMPLETED, as a healthy
   Fargate service does once its tasks pass health checks. UpdateService in
   moto already sets running = desired.
5. Fn::Cidr and 6. ACM certificates: see their sections below.
7. UpdateTerminationProtection is not implemented (moto stores the flag at
   CreateStack but has no action to change it), and DeleteStack ignores the
   flag. We add the action and make DeleteStack refuse a protected stack
   with AWS's message, so termination protection is tested end to end.
8. An UPDATE change set whose only difference is the stack's tags is refused
   ("No updates are to be performed") or marked FAILED ("didn't contain
   changes"); on AWS the new tags propagate to the stack's taggable
   resources, so the change set has changes and executes. We let such a
   change set be created and executed, so a tag change converges.
9. CloudWatch: the AWS SDK for Rust speaks Smithy RPC v2 CBOR to CloudWatch
   (POST /service/GraniteServiceVersion20100801/operation/<Op>), which moto
   does not route (getmoto/moto#9195). We decode PutMetricData from CBOR and
   hand it to moto's CloudWatch backend, so the metrics stackwarden puts are
   readable with any client that speaks moto's protocols (boto3 in tests).
10. UpdateStack (or an UPDATE change set) with the same template and the
   same parameter values is an update in moto whenever the stack has
   parameters left to their defaults (moto compares the given values with
   all stored ones); AWS answers "No updates are to be performed". We
   compare the given values, so the old scripts' steady-state check and
   stackwarden's no-change detection behave as on AWS.
13. DescribeChangeSet answers Tags as an empty list (moto keeps them as a
   dict it does not serialize); AWS answers the change set's tags, which
   stackwarden compares before it reuses a change set.
14. A CREATE change set for a stack name whose REVIEW_IN_PROGRESS placeholder
   holds no change set any more makes moto keep the placeholder beside a
   new stack object of the same name, and DescribeStacks answers with the
   stale one; AWS has one stack. The empty placeholder is dropped first.
12. A service created without DesiredCount starts with 1 task, as AWS
   documents (moto: 0). The shipped service template leaves the count to
   autoscaling.
16. Templates with `Transform: AWS::LanguageExtensions` (Fn::ForEach,
   Fn::Length, intrinsic DeletionPolicy) are not processed by moto, which
   then fails on a `Fn::ForEach::Name` key. We expand the transform with
   cfn-lint's implementation before moto parses the resources, using the
   stack's parameter values, as CloudFormation does. moto also reads a
   short-form function over a mapping (`!Length {Ref: Names}`) as raw YAML
   nodes; we read the mapping.
15. ListServiceDeployments and DescribeServiceRevisions (ECS's deployment
   history, which stackwarden reads to remember a redeploy that rolled
   back) are not implemented. moto completes every deployment at once and
   never rolls one back, so its history holds no deployment that ended
   rolled back or stopped: we answer the filtered list AWS would, an empty
   one, and no revisions.
11. Faults, switched per test (POST /stackwarden/faults with a JSON body;
   every key optional, all off by default and after /moto-api/reset):
   - `latency_ms`: every AWS call answers this much later;
   - `throttle_rate`: this fraction of calls answers as AWS throttles
     (HTTP 400 `Throttling` / `ThrottlingException`, "Rate exceeded");
   - `error_rate`: this fraction answers HTTP 503 (`ServiceUnavailable`);
   - `drop_before_rate`: this fraction of connections is closed before the
     action runs (the action does not happen);
   - `drop_after_rate`: this fraction is closed after the action ran, with
     no answer (the action happened; the client cannot know);
   - `deny_rate`: this fraction answers as IAM does when no policy allows
     the action (HTTP 403 `AccessDenied` / `AccessDeniedException`, "User:
     ... is not authorized to perform: <service>:<Action> ...");
   - `actions`: limit the faults to these actions (e.g. `["ExecuteChangeSet"]`);
   - `seed`: the random choices replay;
   - `strict`: answer as AWS where moto is laxer: a second ExecuteChangeSet
     of one change set is refused (`InvalidChangeSetStatus`, its status is
     EXECUTE_COMPLETE), and CreateChangeSet with the name of an existing
     change set of the stack is refused (`AlreadyExistsException`);
   - `drift_delay_ms`: a drift detection (19) stays DETECTION_IN_PROGRESS
     this long, and is computed when it completes;
   - `drift_fail`: a drift detection ends DETECTION_FAILED (with a
     DetectionStatusReason naming the resources): `true` fails the last
     resource of a type 19 checks, a list (or one logical id) fails those;
     the other resources' results are kept, as AWS keeps partial results.
     Both apply to detections started while set, whatever `actions` says.
   The answer holds the settings and the counts of faults injected (by
   kind and action) under the previous settings (GET: so far, unchanged).
   In strict mode a CREATE change set for a stack that exists is refused
   too (`AlreadyExistsException`), as on AWS. CloudWatch's CBOR route is
   never faulted.
18. An update of an AWS::ECS::TaskDefinition through CloudFormation
   registers a broken revision in moto: its update path passes the
   template's PascalCase container definitions to the backend unconverted
   (its create path converts them), so the new revision has no image and the
   service keeps the old one. A new image tag is how stackwarden upgrades
   itself (deploy/stackwarden.yaml), so the update registers the revision
   the way creation does, as AWS does (a task definition is immutable: a
   change is a new revision), and deregisters the old one. moto also
   updates a resource only when its own template text changed, so a
   service whose `TaskDefinition: !Ref ...` now resolves to the new
   revision is never updated; AWS updates it. Services that ran the old
   revision are moved to the new one, as that update would.
17. A request log, for tests that count what several clients did (two
   daemons sharing environments must never both operate on a stack): GET
   /stackwarden/requests answers every CloudFormation request that reached
   moto since the last reset, in order, as `{action, stack, change_set}`
   (from the query-protocol form). Not a moto behaviour: a test probe.
19. Drift detection is not implemented at all (no DetectStackDrift,
   DescribeStackDriftDetectionStatus, DescribeStackResourceDrifts, and no
   DriftInformation in DescribeStacks). We add them as the API reference
   describes: a detection compares, per resource, the properties the
   template sets explicitly (resolved as moto resolved them at creation:
   parameters, Refs, GetAtts) with the live resource in moto's backends:
   AWS::SQS::Queue VisibilityTimeout, MessageRetentionPeriod, DelaySeconds,
   MaximumMessageSize, ReceiveMessageWaitTimeSeconds (QueueName, FifoQueue
   create-only); AWS::SNS::Topic DisplayName (TopicName create-only);
   AWS::Logs::LogGroup RetentionInDays (LogGroupName create-only);
   AWS::DynamoDB::Table BillingMode, ProvisionedThroughput (TableName,
   KeySchema create-only); AWS::EC2::SecurityGroup SecurityGroupIngress as
   a set of rules (protocol, ports, CidrIp/CidrIpv6/SourceSecurityGroupId/
   SourcePrefixListId; an extra rule is ADD, a missing one REMOVE),
   GroupDescription create-only; AWS::ECS::Service DesiredCount. Other
   properties of these types are not compared; other types are
   NOT_CHECKED; a resource gone from its backend is DELETED. A detection
   completes at once unless faulted (11: `drift_delay_ms`, `drift_fail`);
   a second one on a stack whose detection is in progress is refused
   (ValidationError). DescribeStackResourceDrifts answers each resource's
   latest result (in template order, paginated by MaxResults/NextToken);
   DescribeStacks (and ListStacks) carry NOT_CHECKED until a detection
   completed, then its status; LastCheckTimestamp is when the latest
   detection began, as AWS documents (a failed detection leaves the
   status).
20. CreateChangeSet's DeploymentMode is ignored. With REVERT_DRIFT (UPDATE
   only; CREATE, IMPORT or IncludeNestedStacks are refused) the change set
   also reverts the drift found as 19 finds it at creation: a Modify per
   drifted resource (Add for a deleted one) with ResourceDriftStatus,
   Replacement False, Scope Properties, and a detail per drifted property
   (BeforeValue the actual value from ACTUAL_STATE, AfterValue the
   template's, Drift with both); DescribeChangeSet answers DeploymentMode
   and StackDriftStatus. Create-only properties are not reverted. Drift
   alone is a change: with the template and parameters unchanged the
   change set is CREATE_COMPLETE (not 10's "No updates", nor moto's
   "didn't contain changes") when something drifted. ExecuteChangeSet runs
   the ordinary execution (1), creates deleted resources again and writes
   the template's values back to the drifted properties (SQS attributes,
   SNS DisplayName, log retention, DynamoDB billing mode and throughput,
   security group ingress, ECS desired count). DriftInformation keeps the
   last detection's status until the next detection, as AWS documents.
21. moto serves requests on threads and its CloudFormation backend has no
   locking, and ExecuteChangeSet (moto's, then 1) sets the stack's
   CREATE_COMPLETE before 1 has built its Outputs: a DescribeStacks
   answered in between shows a complete stack without outputs, which AWS
   never does (a stack's outputs are there when it is complete). Each
   CloudFormation request is handled (and its answer serialized) whole,
   one at a time, so a reader sees a change set executed entirely or not
   at all. Injected latency (11) is outside the lock.
"""

import argparse
import hashlib
import ipaddress
import re
import os
import sys

from moto.cloudformation import models as cfn_models
from moto.cloudformation import parsing as cfn_parsing
from moto.core.common_models import CloudFormationModel
from moto.core.utils import utcnow
from moto.ecs import models as ecs_models
from moto.elbv2 import models as elbv2_models


# --- 1. ExecuteChangeSet -------------------------------------------------------
_original_execute = cfn_models.CloudFormationBackend.execute_change_set


def _execute_change_set(self, change_set_name, stack_name=None):
    change_set = self.describe_change_set(change_set_name)
    _original_execute(self, change_set_name, stack_name)
    stack = self.stacks[change_set.stack_id]
    # The stack's template now expands with the parameters it was given (16).
    stack._lx_parameters = change_set.parameters
    stack._parse_template()
    stack.description = stack.template_dict.get("Description")
    for export in stack.exports:
        self.exports.pop(export.name, None)
    stack.output_map = stack._create_output_map()
    for export in stack.exports:
        self.exports[export.name] = export
    if change_set.tags is not None:
        stack.tags = change_set.tags
    if change_set.change_set_type == "UPDATE":
        stack.last_updated_time = utcnow()


cfn_models.CloudFormationBackend.execute_change_set = _execute_change_set


# --- 2. NoEcho masking by key --------------------------------------------------
def _parameter_list(self):
    masked = set(self.resource_map.no_echo_parameter_keys)
    return [
        {
            "ParameterKey": key,
            "ParameterValue": "****" if key in masked else _render(value),
        }
        for key, value in self.resource_map.resolved_parameters.items()
    ]


def _render(value):
    # moto keeps list parameters as Python lists; AWS echoes the input string.
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value


cfn_models.Stack.parameter_list = property(_parameter_list)


# --- 3. Placeholder models ------------------------------------------------------
PLACEHOLDER_TYPES = {
    "AWS::MSK::Cluster": "kafka",
    "AWS::MSK::Configuration": "kafka",
    "AWS::ElastiCache::ReplicationGroup": "elasticache",
    "AWS::ElastiCache::SubnetGroup": "elasticache",
    "AWS::ElastiCache::ParameterGroup": "elasticache",
    "AWS::SecretsManager::Secret": "secretsmanager",
    "AWS::Backup::BackupVault": "backup",
    "AWS::Backup::BackupPlan": "backup",
    "AWS::Backup::BackupSelection": "backup",
    "AWS::CloudWatch::Alarm": "cloudwatch",
    "AWS::ApplicationAutoScaling::ScalableTarget": "application-autoscaling",
    "AWS::ApplicationAutoScaling::ScalingPolicy": "application-autoscaling",
    "AWS::ServiceDiscovery::PrivateDnsNamespace": "servicediscovery",
    "AWS::S3::BucketPolicy": "s3",
}

# Types whose Ref is an ARN on AWS (the rest return a name or id).
REF_IS_ARN = {
    "AWS::MSK::Cluster",
    "AWS::SecretsManager::Secret",
    "AWS::ApplicationAutoScaling::ScalingPolicy",
}


class _PlaceholderBehaviour:
    cfn_type = ""
    service = ""

    def __init__(self, name, account_id, region_name, properties):
        self.name = name
        self.account_id = account_id
        self.region_name = region_name
        self.properties = properties
        digest = hashlib.sha256(f"{self.cfn_type}/{name}".encode()).hexdigest()
        self.short_id = digest[:12]

    @property
    def arn(self):
        kind = self.cfn_type.split("::")[-1].lower()
        return (
            f"arn:aws:{self.service}:{self.region_name}:{self.account_id}:"
            f"{kind}/{self.name}/{self.short_id}"
        )

    @property
    def physical_resource_id(self):
        if self.cfn_type in REF_IS_ARN:
            return self.arn
        return f"{self.name}-{self.short_id}"

    @classmethod
    def has_cfn_attr(cls, attr):
        return True

    def get_cfn_attribute(self, attribute_name):
        if attribute_name.endswith("Arn") or attribute_name == "Arn":
            return self.arn
        if attribute_name.endswith(".Address"):
            return f"{self.name}.{self.short_id}.cache.amazonaws.com"
        if attribute_name.endswith(".Port"):
            return "6379"
        return f"{self.name}-{attribute_name}"

    @classmethod
    def create_from_cloudformation_json(
        cls, resource_name, cloudformation_json, account_id, region_name, **kwargs
    ):
        return cls(resource_name, account_id, region_name, cloudformation_json.get("Properties", {}))

    @classmethod
    def update_from_cloudformation_json(
        cls, original_resource, new_resource_name, cloudformation_json, account_id, region_name
    ):
        return cls.create_from_cloudformation_json(
            new_resource_name, cloudformation_json, account_id, region_name
        )

    @classmethod
    def delete_from_cloudformation_json(
        cls, resource_name, cloudformation_json, account_id, region_name
    ):
        return None


def _register_placeholders():
    existing = cfn_parsing.get_model_map()
    for cfn_type, service in PLACEHOLDER_TYPES.items():
        if cfn_type in existing:
            continue  # a newer moto models it: use the real thing
        name = "Placeholder" + cfn_type.replace("::", "")
        # A direct subclass of CloudFormationModel: moto finds models through
        # CloudFormationModel.__subclasses__().
        type(
            name,
            (_PlaceholderBehaviour, CloudFormationModel),
            {
                "cfn_type": cfn_type,
                "service": service,
                "cloudformation_type": staticmethod(lambda t=cfn_type: t),
                "cloudformation_name_type": staticmethod(lambda: "Name"),
            },
        )
    cfn_parsing.get_model_list.cache_clear()
    cfn_parsing.get_model_map.cache_clear()
    cfn_parsing.get_name_type_map.cache_clear()


_register_placeholders()


# --- 4. ECS services start healthy ----------------------------------------------
_original_service_init = ecs_models.Service.__init__


def _service_init(self, *args, **kwargs):
    _original_service_init(self, *args, **kwargs)
    if os.environ.get("STACKWARDEN_ECS_RUNNING", "desired") != "desired":
        return
    self.running_count = self.desired_count
    self.pending_count = 0
    for deployment in self.deployments:
        deployment["runningCount"] = self.desired_count
        deployment["pendingCount"] = 0
        deployment["rolloutState"] = "COMPLETED"
        deployment["rolloutStateReason"] = f"ECS deployment {deployment['id']} completed."


ecs_models.Service.__init__ = _service_init


# --- 12. A service created without DesiredCount ---------------------------------------
# AWS::ECS::Service: "For new services, if a desired count is not specified, a
# default value of 1 is used" (0 is not the default; DAEMON services need none);
# moto creates it with 0. The shipped service template leaves DesiredCount to
# autoscaling, so the emulator must start it as AWS does.
_original_service_cfn_create = ecs_models.Service.create_from_cloudformation_json.__func__


@classmethod
def _service_cfn_create(cls, resource_name, cloudformation_json, account_id, region_name, **kwargs):
    props = cloudformation_json.setdefault("Properties", {})
    if props.get("DesiredCount") is None and props.get("SchedulingStrategy", "REPLICA") != "DAEMON":
        props["DesiredCount"] = 1
    return _original_service_cfn_create(
        cls, resource_name, cloudformation_json, account_id, region_name, **kwargs
    )


ecs_models.Service.create_from_cloudformation_json = _service_cfn_create


# --- 18. A TaskDefinition updated through CloudFormation ----------------------
def _task_definition_cfn_update(cls, original_resource, new_resource_name, cloudformation_json, account_id, region_name):
    from moto.core.utils import pascal_to_camelcase, remap_nested_keys

    properties = cloudformation_json["Properties"]
    wanted = remap_nested_keys(properties.get("ContainerDefinitions", []), pascal_to_camelcase)
    volumes = remap_nested_keys(properties.get("Volumes", []), pascal_to_camelcase)
    unchanged = (
        original_resource.family == properties.get("Family", original_resource.family)
        and original_resource.container_definitions == wanted
        and (original_resource.volumes or []) == volumes
    )
    if unchanged:
        return original_resource
    backend = ecs_models.ecs_backends[account_id][region_name]
    backend.deregister_task_definition(original_resource.arn)
    new = ecs_models.TaskDefinition.create_from_cloudformation_json(
        new_resource_name, cloudformation_json, account_id, region_name
    )
    for service in list(backend.services.values()):
        if service.task_definition == original_resource.arn:
            backend.update_service(
                {"cluster": service.cluster_name, "service": service.name, "task_definition": new.arn}
            )
    return new


ecs_models.TaskDefinition.update_from_cloudformation_json = classmethod(_task_definition_cfn_update)


# --- 5. Fn::Cidr ---------------------------------------------------------------------
_original_clean_json = cfn_parsing.clean_json


def _clean_json(resource_json, resources_map):
    if isinstance(resource_json, dict) and "Fn::Cidr" in resource_json:
        block, count, bits = (
            _original_clean_json(arg, resources_map) for arg in resource_json["Fn::Cidr"]
        )
        network = ipaddress.ip_network(block, strict=False)
        prefix = network.max_prefixlen - int(bits)
        subnets = network.subnets(new_prefix=prefix)
        return [str(next(subnets)) for _ in range(int(count))]
    return _original_clean_json(resource_json, resources_map)


# clean_json recurses through the module global, so nested uses see this too.
cfn_parsing.clean_json = _clean_json


# --- 6. ACM certificates -----------------------------------------------------------
_ACM_ARN = re.compile(r"^arn:aws[a-z-]*:acm:[a-z0-9-]+:\d{12}:certificate/.+$")
_original_certificate_exists = elbv2_models.ELBv2Backend._certificate_exists


def _certificate_exists(self, certificate_arn):
    return bool(_ACM_ARN.match(certificate_arn)) or _original_certificate_exists(
        self, certificate_arn
    )


elbv2_models.ELBv2Backend._certificate_exists = _certificate_exists
_original_register_certificate = elbv2_models.register_certificate


def _register_certificate(account_id, region, arn_certificate, arn_user):
    if _ACM_ARN.match(arn_certificate):
        try:
            _original_register_certificate(account_id, region, arn_certificate, arn_user)
        except Exception:  # moto's ACM has no such certificate: accepted, see 6.
            pass
        return
    _original_register_certificate(account_id, region, arn_certificate, arn_user)


elbv2_models.register_certificate = _register_certificate


# --- 7. Termination protection -----------------------------------------------------
from moto.cloudformation import responses as cfn_responses  # noqa: E402
from moto.cloudformation.exceptions import ValidationError  # noqa: E402
from moto.core.responses import ActionResult  # noqa: E402


def _update_termination_protection(self):
    stack = self.cloudformation_backend.get_stack(self._get_param("StackName"))
    enabled = self._get_param("EnableTerminationProtection")
    stack.enable_termination_protection = enabled in (True, "true", "True")
    return ActionResult({"StackId": stack.stack_id})


cfn_responses.CloudFormationResponse.update_termination_protection = (
    _update_termination_protection
)
_original_delete_stack = cfn_models.CloudFormationBackend.delete_stack


def _delete_stack(self, name_or_stack_id):
    stack = next(
        (s for s in self.stacks.values() if name_or_stack_id in (s.name, s.stack_id)),
        None,
    )
    if stack is not None and stack.enable_termination_protection:
        raise ValidationError(
            message=f"Stack [{stack.name}] cannot be deleted while TerminationProtection is enabled"
        )
    return _original_delete_stack(self, name_or_stack_id)


cfn_models.CloudFormationBackend.delete_stack = _delete_stack


# --- 8. Tags-only change sets -------------------------------------------------------
_original_create_change_set = cfn_models.CloudFormationBackend.create_change_set


def _create_change_set(self, *args, **kwargs):
    if kwargs.get("change_set_type") == "CREATE":
        # Patch 14: AWS adds a CREATE change set to the REVIEW_IN_PROGRESS
        # stack of that name; moto makes a second stack object, and
        # DescribeStacks then answers with the stale placeholder. Drop
        # placeholders that hold no change set before moto makes its own.
        name = kwargs.get("stack_name")
        held = {cs.stack_id for cs in self.change_sets.values()}
        for sid, st in list(self.stacks.items()):
            if st.name == name and st.status == "REVIEW_IN_PROGRESS" and sid not in held:
                del self.stacks[sid]
    change_set_id, stack_id = _original_create_change_set(self, *args, **kwargs)
    change_set = self.change_sets[change_set_id]
    tags = change_set.tags or {}
    if change_set.status == "FAILED" and tags != (change_set.stack.tags or {}):
        change_set.status = "CREATE_COMPLETE"
        change_set.execution_status = "AVAILABLE"
        change_set.status_reason = None
    return change_set_id, stack_id


cfn_models.CloudFormationBackend.create_change_set = _create_change_set
_original_validate_different_update = (
    cfn_responses.CloudFormationResponse._validate_different_update
)


def _validate_different_update(self, incoming_params, stack_body, old_stack):
    tags = {t["Key"]: t["Value"] for t in self._get_param("Tags", [])}
    # A tags-only update is an update on AWS (UpdateStack too).
    if tags and tags != (old_stack.tags or {}):
        return
    # See 10: the same template with the same given values is no update.
    if incoming_params and stack_body and old_stack.template == stack_body:
        given = self._get_param_values(incoming_params, old_stack.stack_parameters)
        old = old_stack.stack_parameters
        if all(k in old and str(_render(old[k])) == str(_render(v)) for k, v in given.items()):
            raise ValidationError(old_stack.name, message="No updates are to be performed.")
    _original_validate_different_update(self, incoming_params, stack_body, old_stack)


cfn_responses.CloudFormationResponse._validate_different_update = (
    _validate_different_update
)


# --- 13. DescribeChangeSet Tags -------------------------------------------------------
# AWS answers DescribeChangeSet with the Tags the change set was made with;
# moto keeps them as a dict and serializes them as an empty list.
cfn_responses.CloudFormationResponse.RESPONSE_KEY_PATH_TO_TRANSFORMER[
    "DescribeChangeSetOutput.Tags"
] = lambda tags: cfn_responses.transform_dict(tags or {})


# --- 16. The AWS::LanguageExtensions transform ----------------------------------------
# moto does not process transforms: a template with `Fn::ForEach` loops
# reaches its resource parser with a `Fn::ForEach::Name` key where resources
# are, and fails. CloudFormation expands the transform before anything else.
# We expand it with cfn-lint's implementation (AWS's own linter, pinned in
# tests/emulator/requirements.txt), which is independent of stackwarden's:
# loops in Conditions, Outputs and Resources, then `Fn::Length` and
# intrinsic `DeletionPolicy`/`UpdateReplacePolicy`, which cfn-lint leaves.
# A loop over a list parameter takes the stack's value for it (cfn-lint
# reads the parameter's Default, so the value is written there first).
import copy  # noqa: E402

from cfnlint.template.transforms import _language_extensions as _lx  # noqa: E402

_LX = "AWS::LanguageExtensions"


def _list_value(value, parameters, declared):
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and list(value) == ["Ref"]:
        name = value["Ref"]
        if name in parameters and "List" in str(declared.get(name, {}).get("Type", "")):
            return [x.strip() for x in str(parameters[name]).split(",")]
    return None


def _resolve_length(value, parameters, declared):
    if isinstance(value, dict):
        if list(value) == ["Fn::Length"]:
            arg = _resolve_length(value["Fn::Length"], parameters, declared)
            items = _list_value(arg, parameters, declared)
            if items is not None:
                return len(items)
        return {k: _resolve_length(v, parameters, declared) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_length(v, parameters, declared) for v in value]
    return value


def _expand_language_extensions(template_dict, parameters, region):
    if not isinstance(template_dict, dict):
        return template_dict
    declared_transforms = template_dict.get("Transform")
    names = declared_transforms if isinstance(declared_transforms, list) else [declared_transforms]
    if _LX not in names:
        return template_dict
    template = copy.deepcopy(template_dict)
    declared = template.get("Parameters") or {}
    values = {k: declared[k].get("Default") for k in declared if "Default" in declared[k]}
    values.update(parameters or {})
    for name, value in values.items():
        if name in declared:
            declared[name]["Default"] = value

    class _Cfn:
        pass

    cfn = _Cfn()
    cfn.template = template
    cfn.regions = [region]
    try:
        expanded = _lx._Transform()._walk(template, {}, cfn)
    except (_lx._ValueError, _lx._TypeError, _lx._ResolveError) as e:
        # CloudFormation refuses such a template at CreateChangeSet.
        raise ValidationError(message=f"Template format error: {e}") from e
    expanded = _resolve_length(expanded, values, declared)
    for resource in (expanded.get("Resources") or {}).values():
        for attr in ("DeletionPolicy", "UpdateReplacePolicy"):
            policy = resource.get(attr) if isinstance(resource, dict) else None
            if isinstance(policy, dict) and list(policy) == ["Ref"] and policy["Ref"] in values:
                resource[attr] = values[policy["Ref"]]
    rest = [n for n in names if n != _LX]
    if rest:
        expanded["Transform"] = rest
    else:
        expanded.pop("Transform", None)
    return expanded


import yaml as _yaml  # noqa: E402

_original_tag_constructor = cfn_models.yaml_tag_constructor


def _yaml_tag_constructor(loader, tag, node):
    # moto builds a short-form function over a mapping (`!Length {Ref: L}`)
    # from the raw YAML nodes; CloudFormation reads the mapping.
    if isinstance(node, _yaml.MappingNode):
        key = {"!Ref": "Ref", "!Condition": "Condition"}.get(tag, f"Fn::{tag[1:]}")
        return {key: loader.construct_mapping(node, deep=True)}
    return _original_tag_constructor(loader, tag, node)


cfn_models.yaml_tag_constructor = _yaml_tag_constructor
cfn_responses.yaml_tag_constructor = _yaml_tag_constructor

_original_stack_init = cfn_models.Stack.__init__
_original_stack_parse = cfn_models.Stack._parse_template
_original_change_set_parse = cfn_models.ChangeSet._parse_template


def _stack_init(self, stack_id, name, template, parameters, account_id, region_name, *a, **kw):
    self._lx_parameters = parameters
    self._lx_region = region_name
    _original_stack_init(self, stack_id, name, template, parameters, account_id, region_name, *a, **kw)


def _stack_parse(self):
    _original_stack_parse(self)
    self.template_dict = _expand_language_extensions(
        self.template_dict, getattr(self, "_lx_parameters", None), getattr(self, "_lx_region", "us-east-1")
    )


def _change_set_parse(self):
    _original_change_set_parse(self)
    self.template_dict = _expand_language_extensions(
        self.template_dict, self.parameters, self.stack.region_name
    )


cfn_models.Stack.__init__ = _stack_init
cfn_models.Stack._parse_template = _stack_parse
cfn_models.ChangeSet._parse_template = _change_set_parse


# --- 9. CloudWatch over Smithy RPC v2 CBOR ------------------------------------------
from moto.moto_server import werkzeug_app  # noqa: E402

_CBOR_PREFIX = "/service/GraniteServiceVersion20100801/operation/"
_original_dispatch = werkzeug_app.DomainDispatcherApplication.__call__


def _cbor_response(start_response, status, body):
    import cbor2

    payload = cbor2.dumps(body)
    start_response(
        status,
        [
            ("Content-Type", "application/cbor"),
            ("smithy-protocol", "rpc-v2-cbor"),
            ("Content-Length", str(len(payload))),
        ],
    )
    return [payload]


def _dispatch(self, environ, start_response):
    path = environ.get("PATH_INFO", "")
    if not path.startswith(_CBOR_PREFIX):
        return _original_dispatch(self, environ, start_response)
    import cbor2
    from moto.cloudwatch.models import cloudwatch_backends
    from moto.core import DEFAULT_ACCOUNT_ID

    operation = path[len(_CBOR_PREFIX):]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = cbor2.loads(environ["wsgi.input"].read(length)) if length else {}
    auth = environ.get("HTTP_AUTHORIZATION", "")
    match = re.search(r"Credential=[^/]+/[^/]+/([^/]+)/", auth)
    region = match.group(1) if match else "us-east-1"
    backend = cloudwatch_backends[DEFAULT_ACCOUNT_ID][region]
    if operation == "PutMetricData":
        data = [
            {k: v for k, v in m.items() if k != "Timestamp"}
            for m in body.get("MetricData", [])
        ]
        backend.put_metric_data(body["Namespace"], data)
        return _cbor_response(start_response, "200 OK", {})
    return _cbor_response(
        start_response,
        "400 Bad Request",
        {"__type": "UnknownOperationException", "message": f"shim: {operation} not translated"},
    )


werkzeug_app.DomainDispatcherApplication.__call__ = _dispatch


# --- 11. Faults -----------------------------------------------------------------------
import io  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402

from moto.cloudformation.exceptions import AlreadyExistsException  # noqa: E402
from moto.cloudformation.exceptions import CloudFormationError  # noqa: E402

_FAULT_KEYS = {
    "latency_ms": 0,
    "throttle_rate": 0.0,
    "error_rate": 0.0,
    "drop_before_rate": 0.0,
    "drop_after_rate": 0.0,
    "deny_rate": 0.0,
    "actions": [],
    "seed": 0,
    "strict": False,
    # Drift detection (19): how long a detection stays in progress, and
    # whether it ends DETECTION_FAILED (true, or the logical ids that fail).
    "drift_delay_ms": 0,
    "drift_fail": False,
}
_faults_lock = threading.Lock()
_faults = dict(_FAULT_KEYS)
_fault_counts = {}
_fault_rng = random.Random(0)


class InvalidChangeSetStatus(CloudFormationError):
    code = "InvalidChangeSetStatus"


def _set_faults(settings):
    """Replaces the settings; returns the counts injected under the old ones."""
    global _fault_rng
    unknown = set(settings) - set(_FAULT_KEYS)
    if unknown:
        raise ValueError(f"unknown fault settings: {sorted(unknown)}")
    with _faults_lock:
        _faults.clear()
        _faults.update(_FAULT_KEYS)
        _faults.update(settings)
        before = dict(_fault_counts)
        _fault_counts.clear()
        _fault_rng = random.Random(_faults["seed"])
        return before


def _count(kind):
    _fault_counts[kind] = _fault_counts.get(kind, 0) + 1


_requests = []


def _log_request(body):
    form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
    action = (form.get("Action") or [""])[0]
    if action:
        with _faults_lock:
            _requests.append({
                "action": action,
                "stack": (form.get("StackName") or [None])[0],
                "change_set": (form.get("ChangeSetName") or [None])[0],
            })


def _action(environ, body):
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    if target:
        return target.rsplit(".", 1)[-1], "json"
    form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
    return (form.get("Action") or [""])[0], "query"


def _error(start_response, protocol, status, code, message):
    if protocol == "json":
        payload = json.dumps({"__type": code, "message": message}).encode()
        ctype = "application/x-amz-json-1.1"
    else:
        payload = (
            "<ErrorResponse><Error><Type>Sender</Type>"
            f"<Code>{code}</Code><Message>{message}</Message></Error>"
            "<RequestId>stackwarden-fault</RequestId></ErrorResponse>"
        ).encode()
        ctype = "text/xml"
    start_response(
        status,
        [
            ("Content-Type", ctype),
            ("Content-Length", str(len(payload))),
            ("x-amzn-ErrorType", code),
        ],
    )
    return [payload]


def _drop(environ):
    sock = environ.get("werkzeug.socket")
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    # werkzeug treats a ConnectionError as the client having gone away.
    raise ConnectionResetError("stackwarden fault: connection dropped")


_inner_dispatch = werkzeug_app.DomainDispatcherApplication.__call__


def _faulty_dispatch(self, environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/stackwarden/faults":
        with _faults_lock:
            injected = dict(_fault_counts)
        if environ.get("REQUEST_METHOD") == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            try:
                injected = _set_faults(json.loads(environ["wsgi.input"].read(length) or b"{}"))
            except (ValueError, TypeError) as e:
                start_response("400 Bad Request", [("Content-Type", "text/plain")])
                return [str(e).encode()]
        with _faults_lock:
            body = json.dumps({"settings": _faults, "injected": injected}).encode()
        start_response(
            "200 OK",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        return [body]
    if path == "/stackwarden/requests":
        with _faults_lock:
            body = json.dumps(_requests).encode()
        start_response(
            "200 OK",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        return [body]
    if path.startswith("/moto-api/reset"):
        _set_faults({})
        with _faults_lock:
            _requests.clear()
    if path.startswith("/moto-api") or path.startswith(_CBOR_PREFIX):
        return _inner_dispatch(self, environ, start_response)

    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    environ["wsgi.input"] = io.BytesIO(body)
    action, protocol = _action(environ, body)
    with _faults_lock:
        f = dict(_faults)
        applies = not f["actions"] or action in f["actions"]
        roll = [_fault_rng.random() for _ in range(4)]
        kind = None
        if applies:
            # Drawn only when asked for, so seeded sequences of the other
            # faults replay as before.
            if f["deny_rate"] and _fault_rng.random() < f["deny_rate"]:
                kind = "deny"
            elif roll[0] < f["throttle_rate"]:
                kind = "throttle"
            elif roll[1] < f["error_rate"]:
                kind = "error"
            elif roll[2] < f["drop_before_rate"]:
                kind = "drop_before"
            elif roll[3] < f["drop_after_rate"]:
                kind = "drop_after"
            if kind:
                _count(f"{kind}:{action}")
    if applies and f["latency_ms"]:
        time.sleep(f["latency_ms"] / 1000.0)
    if kind == "deny":
        # IAM's answer when no policy allows the action, as AWS words it;
        # the service is the one the request was signed for.
        scope = re.search(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/", environ.get("HTTP_AUTHORIZATION", ""))
        service = scope.group(1) if scope else "aws"
        denied = f"{service}:{action}"
        message = (
            "User: arn:aws:sts::123456789012:assumed-role/stackwarden-operator/stackwarden "
            f"is not authorized to perform: {denied} because no identity-based policy allows the {denied} action"
        )
        code = "AccessDeniedException" if protocol == "json" else "AccessDenied"
        return _error(start_response, protocol, "403 Forbidden", code, message)
    if kind == "throttle":
        code = "ThrottlingException" if protocol == "json" else "Throttling"
        return _error(start_response, protocol, "400 Bad Request", code, "Rate exceeded")
    if kind == "error":
        code = "ServerException" if protocol == "json" else "ServiceUnavailable"
        return _error(start_response, protocol, "503 Service Unavailable", code, "Service unavailable")
    if kind == "drop_before":
        _drop(environ)
    if protocol == "query":
        _log_request(body)
    if kind == "drop_after":
        # Run the action to its end, then drop the answer.
        for _ in _inner_dispatch(self, environ, lambda *a, **k: None):
            pass
        _drop(environ)
    return _inner_dispatch(self, environ, start_response)


werkzeug_app.DomainDispatcherApplication.__call__ = _faulty_dispatch


def _strict():
    with _faults_lock:
        return bool(_faults["strict"])


# moto serves requests on threads and its backend has no locking: two
# ExecuteChangeSet (or CreateChangeSet) calls at once would both pass the
# checks below. AWS decides them one after the other; so does strict mode.
_strict_lock = threading.RLock()


_lax_execute = cfn_models.CloudFormationBackend.execute_change_set


def _strict_execute_change_set(self, change_set_name, stack_name=None):
    if not _strict():
        return _lax_execute(self, change_set_name, stack_name)
    with _strict_lock:
        cs = self.describe_change_set(change_set_name)
        if cs is not None and cs.execution_status == "EXECUTE_COMPLETE":
            raise InvalidChangeSetStatus(
                f"ChangeSet [{cs.change_set_id}] cannot be executed in its current "
                "status of [EXECUTE_COMPLETE]"
            )
        return _lax_execute(self, change_set_name, stack_name)


cfn_models.CloudFormationBackend.execute_change_set = _strict_execute_change_set

_lax_create_change_set = cfn_models.CloudFormationBackend.create_change_set


def _strict_create_change_set(self, stack_name, change_set_name, *args, **kwargs):
    if not _strict():
        return _lax_create_change_set(self, stack_name, change_set_name, *args, **kwargs)
    with _strict_lock:
        change_set_type = kwargs.get("change_set_type", args[5] if len(args) > 5 else None)
        for live in self.stacks.values():
            if (
                change_set_type == "CREATE"
                and live.name == stack_name
                and live.status not in ("REVIEW_IN_PROGRESS", "DELETE_COMPLETE")
            ):
                raise AlreadyExistsException(f"Stack [{stack_name}] already exists")
        for cs in self.change_sets.values():
            live = self.stacks.get(cs.stack_id)
            if cs.change_set_name == change_set_name and live is not None and live.name == stack_name:
                raise AlreadyExistsException(f"ChangeSet [{change_set_name}] already exists")
        return _lax_create_change_set(self, stack_name, change_set_name, *args, **kwargs)


cfn_models.CloudFormationBackend.create_change_set = _strict_create_change_set


from moto.ecs import responses as ecs_responses  # noqa: E402


def _list_service_deployments(self):
    return ActionResult({"serviceDeployments": []})


def _describe_service_revisions(self):
    arns = self._get_param("serviceRevisionArns", [])
    return ActionResult(
        {
            "serviceRevisions": [],
            "failures": [{"arn": a, "reason": "MISSING"} for a in arns],
        }
    )


ecs_responses.EC2ContainerServiceResponse.list_service_deployments = (
    _list_service_deployments
)
ecs_responses.EC2ContainerServiceResponse.describe_service_revisions = (
    _describe_service_revisions
)


# --- 19. Drift detection ----------------------------------------------------------------
# moto has no drift detection at all: DetectStackDrift and friends are not
# implemented and DescribeStacks carries no DriftInformation. CloudFormation
# compares, per resource, the properties the template sets explicitly
# (resolved with the stack's parameters and its resources' ids) with the
# live resource. We do that for the types and properties stackwarden's
# stacks drift in (_DRIFT_TYPES); every other type is NOT_CHECKED, as
# CloudFormation answers for a type without drift support.
import uuid  # noqa: E402
import base64  # noqa: E402

from moto.core.utils import camelcase_to_underscores  # noqa: E402
from moto.dynamodb.models import dynamodb_backends  # noqa: E402
from moto.ec2.models import ec2_backends  # noqa: E402
from moto.logs.models import logs_backends  # noqa: E402
from moto.sns.models import sns_backends  # noqa: E402
from moto.sqs.models import sqs_backends  # noqa: E402

# Stack statuses DetectStackDrift accepts (API reference, DetectStackDrift).
_DRIFT_STACK_STATUSES = (
    "CREATE_COMPLETE",
    "UPDATE_COMPLETE",
    "UPDATE_ROLLBACK_COMPLETE",
    "UPDATE_ROLLBACK_FAILED",
)
_drift_lock = threading.RLock()


class _Prop:
    """How one template property is read from the live resource and written
    back to it. kind: `scalar` (compared as text: 30 == "30"), `object`
    (each key the template sets is a leaf: /ProvisionedThroughput/ReadCapacityUnits),
    `json` (compared whole), `rules` (a set of security group rules: added
    and removed rules are ADD and REMOVE). A create-only property is compared
    but never reverted (CloudFormation cannot change it in place)."""

    def __init__(self, read, kind="scalar", write=None, create_only=False):
        self.read = read
        self.kind = kind
        self.write = write
        self.create_only = create_only


def _sqs_backend(stack):
    return sqs_backends[stack.account_id][stack.region_name]


def _sqs_live(stack, physical_id):
    # The physical id is the queue URL; moto keys queues by name.
    return _sqs_backend(stack).queues.get(str(physical_id).rsplit("/", 1)[-1])


def _sqs_attribute(name):
    def write(stack, queue, value):
        _sqs_backend(stack).set_queue_attributes(queue.name, {name: str(value)})

    attribute = camelcase_to_underscores(name)
    return _Prop(lambda q: getattr(q, attribute, None), write=write)


def _sns_live(stack, physical_id):
    return sns_backends[stack.account_id][stack.region_name].topics.get(physical_id)


def _sns_set_display_name(stack, topic, value):
    topic.display_name = str(value)


def _logs_backend(stack):
    return logs_backends[stack.account_id][stack.region_name]


def _logs_live(stack, physical_id):
    return _logs_backend(stack).groups.get(physical_id)


def _logs_put_retention(stack, group, value):
    _logs_backend(stack).put_retention_policy(group.name, int(value))


def _ddb_backend(stack):
    return dynamodb_backends[stack.account_id][stack.region_name]


def _ddb_live(stack, physical_id):
    return _ddb_backend(stack).tables.get(physical_id)


def _ddb_throughput(table):
    t = table.throughput or {}
    return {k: t.get(k) for k in ("ReadCapacityUnits", "WriteCapacityUnits") if k in t}


def _ddb_update(stack, table, billing_mode=None, throughput=None):
    _ddb_backend(stack).update_table(
        name=table.name,
        attr_definitions=None,
        global_index=None,
        throughput=throughput,
        billing_mode=billing_mode,
        stream_spec=None,
        deletion_protection_enabled=None,
        warm_throughput=None,
    )


def _ddb_set_billing_mode(stack, table, value):
    _ddb_update(stack, table, billing_mode=str(value))


def _ddb_set_throughput(stack, table, value):
    merged = dict(table.throughput or {})
    merged.update({k: int(v) for k, v in (value or {}).items()})
    _ddb_update(stack, table, throughput=merged)


def _ec2_backend(stack):
    return ec2_backends[stack.account_id][stack.region_name]


def _sg_live(stack, physical_id):
    return _ec2_backend(stack).get_security_group_from_id(physical_id)


_PROTOCOLS = {"6": "tcp", "17": "udp", "1": "icmp", "all": "-1", "58": "icmpv6"}


def _sg_rule(protocol, from_port, to_port, target):
    """One ingress rule as the template writes it, reduced to what is
    compared: protocol, ports (none for all protocols) and one target."""
    proto = str(protocol).lower()
    proto = _PROTOCOLS.get(proto, proto)
    rule = {"IpProtocol": proto}
    if proto != "-1":
        if from_port is not None:
            rule["FromPort"] = int(from_port)
        if to_port is not None:
            rule["ToPort"] = int(to_port)
    rule.update(target)
    return rule


def _sg_template_rules(rules):
    out = []
    for r in rules or []:
        target = {
            k: r[k]
            for k in ("CidrIp", "CidrIpv6", "SourceSecurityGroupId", "SourcePrefixListId")
            if r.get(k) is not None
        }
        out.append(_sg_rule(r.get("IpProtocol"), r.get("FromPort"), r.get("ToPort"), target))
    return out


def _sg_live_rule(rule):
    target = {}
    if rule.ip_range.get("CidrIp"):
        target["CidrIp"] = rule.ip_range["CidrIp"]
    if rule.ip_range.get("CidrIpv6"):
        target["CidrIpv6"] = rule.ip_range["CidrIpv6"]
    if rule.source_group.get("GroupId"):
        target["SourceSecurityGroupId"] = rule.source_group["GroupId"]
    if rule.prefix_list_id:
        target["SourcePrefixListId"] = rule.prefix_list_id
    return _sg_rule(rule.ip_protocol, rule.from_port, rule.to_port, target)


def _sg_set_ingress(stack, group, value):
    """Revoke the live rules the template lacks, authorize the template's
    rules the group lacks (AWS reverts SecurityGroupIngress as a whole)."""
    backend = _ec2_backend(stack)
    wanted = [_rule_key(r) for r in _sg_template_rules(value)]
    extra = [rule.id for rule in group.ingress_rules if _rule_key(_sg_live_rule(rule)) not in wanted]
    if extra:
        backend.revoke_security_group_ingress(
            group.id, None, None, None, [], security_rule_ids=extra, vpc_id=group.vpc_id
        )
    have = [_rule_key(_sg_live_rule(rule)) for rule in group.ingress_rules]
    for rule in _sg_template_rules(value):
        if _rule_key(rule) in have:
            continue
        ip_ranges = [{k: rule[k]} for k in ("CidrIp", "CidrIpv6") if k in rule]
        sources = [{"GroupId": rule["SourceSecurityGroupId"]}] if "SourceSecurityGroupId" in rule else []
        prefixes = [{"PrefixListId": rule["SourcePrefixListId"]}] if "SourcePrefixListId" in rule else []
        backend.authorize_security_group_ingress(
            group.id,
            rule["IpProtocol"],
            rule.get("FromPort"),
            rule.get("ToPort"),
            ip_ranges,
            source_groups=sources,
            prefix_list_ids=prefixes,
            vpc_id=group.vpc_id,
        )


def _rule_key(rule):
    return json.dumps(rule, sort_keys=True)


def _ecs_live(stack, physical_id):
    backend = ecs_models.ecs_backends[stack.account_id][stack.region_name]
    for service in backend.services.values():
        if service.arn == physical_id and service.status == "ACTIVE":
            return service
    return None


def _ecs_set_desired_count(stack, service, value):
    backend = ecs_models.ecs_backends[stack.account_id][stack.region_name]
    backend.update_service(
        {"cluster": service.cluster_name, "service": service.name, "desired_count": int(value)}
    )


# Resource type -> (how to find the live resource from its physical id,
# the properties compared). Only properties the template sets are compared.
_DRIFT_TYPES = {
    "AWS::SQS::Queue": (
        _sqs_live,
        {
            "VisibilityTimeout": _sqs_attribute("VisibilityTimeout"),
            "MessageRetentionPeriod": _sqs_attribute("MessageRetentionPeriod"),
            "DelaySeconds": _sqs_attribute("DelaySeconds"),
            "MaximumMessageSize": _sqs_attribute("MaximumMessageSize"),
            "ReceiveMessageWaitTimeSeconds": _sqs_attribute("ReceiveMessageWaitTimeSeconds"),
            "QueueName": _Prop(lambda q: q.name, create_only=True),
            "FifoQueue": _Prop(lambda q: bool(q.fifo_queue), create_only=True),
        },
    ),
    "AWS::SNS::Topic": (
        _sns_live,
        {
            "DisplayName": _Prop(lambda t: t.display_name, write=_sns_set_display_name),
            "TopicName": _Prop(lambda t: t.name, create_only=True),
        },
    ),
    "AWS::Logs::LogGroup": (
        _logs_live,
        {
            "RetentionInDays": _Prop(lambda g: g.retention_in_days, write=_logs_put_retention),
            "LogGroupName": _Prop(lambda g: g.name, create_only=True),
        },
    ),
    "AWS::DynamoDB::Table": (
        _ddb_live,
        {
            "BillingMode": _Prop(lambda t: t.billing_mode, write=_ddb_set_billing_mode),
            "ProvisionedThroughput": _Prop(_ddb_throughput, kind="object", write=_ddb_set_throughput),
            "TableName": _Prop(lambda t: t.name, create_only=True),
            "KeySchema": _Prop(lambda t: t.schema, kind="json", create_only=True),
        },
    ),
    "AWS::EC2::SecurityGroup": (
        _sg_live,
        {
            "SecurityGroupIngress": _Prop(
                lambda g: [_sg_live_rule(r) for r in g.ingress_rules], kind="rules", write=_sg_set_ingress
            ),
            "GroupDescription": _Prop(lambda g: g.description, create_only=True),
        },
    ),
    "AWS::ECS::Service": (
        _ecs_live,
        {"DesiredCount": _Prop(lambda s: s.desired_count, write=_ecs_set_desired_count)},
    ),
}

_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def _canonical(value):
    """Text to compare scalars by: the template's 30 and SQS's "30" match,
    as do true and "true"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        f = float(value)
        return str(int(f)) if f.is_integer() else repr(f)
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("true", "false"):
            return text.lower()
        if _NUMBER.match(text):
            return _canonical(float(text))
        return value
    return json.dumps(value, sort_keys=True)


def _same(a, b):
    return _canonical(a) == _canonical(b)


def _text(value):
    """A value as PropertyDifference and ResourceTargetDefinition carry it:
    scalars as text, objects and lists as JSON, an absent value as null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def _like(expected, actual):
    # ActualProperties in the template's types: an SQS attribute "60" is 60.
    if isinstance(expected, int) and not isinstance(expected, bool) and isinstance(actual, str):
        if _NUMBER.match(actual.strip()) and float(actual).is_integer():
            return int(float(actual))
    return actual


def _compare(props_spec, expected, live):
    """(differences, actual properties) of one live resource against the
    resolved template properties. Each difference also names its top-level
    property, which patch 20 reverts."""
    diffs = []
    actual = copy.deepcopy(expected)
    for name, prop in props_spec.items():
        if name not in expected:
            continue  # only explicitly set properties are checked
        want = expected[name]
        have = prop.read(live)
        base = {"prop": name, "create_only": prop.create_only}
        if prop.kind == "object":
            have = have or {}
            actual[name] = {}
            for key, leaf in (want or {}).items():
                path = f"/{name}/{key}"
                if have.get(key) is None:
                    diffs.append(dict(base, path=path, expected=leaf, actual=None, type="REMOVE"))
                    continue
                actual[name][key] = _like(leaf, have[key])
                if not _same(leaf, have[key]):
                    diffs.append(dict(base, path=path, expected=leaf, actual=actual[name][key], type="NOT_EQUAL"))
        elif prop.kind == "rules":
            wanted = _sg_template_rules(want)
            wanted_keys = [_rule_key(r) for r in wanted]
            have_keys = [_rule_key(r) for r in have]
            for i, rule in enumerate(wanted):
                if wanted_keys[i] not in have_keys:
                    diffs.append(dict(base, path=f"/{name}/{i}", expected=rule, actual=None, type="REMOVE"))
            for i, rule in enumerate(have):
                if have_keys[i] not in wanted_keys:
                    diffs.append(dict(base, path=f"/{name}/{i}", expected=None, actual=rule, type="ADD"))
            actual[name] = have
        elif prop.kind == "json":
            if json.dumps(want, sort_keys=True) != json.dumps(have, sort_keys=True):
                diffs.append(dict(base, path=f"/{name}", expected=want, actual=have, type="NOT_EQUAL"))
            actual[name] = have
        else:
            if have is None:
                diffs.append(dict(base, path=f"/{name}", expected=want, actual=None, type="REMOVE"))
                actual.pop(name, None)
            elif not _same(want, have):
                actual[name] = _like(want, have)
                diffs.append(dict(base, path=f"/{name}", expected=want, actual=actual[name], type="NOT_EQUAL"))
    return diffs, actual


def _template_resources(stack):
    """(logical id, resource json) of the stack's resources, in template
    order, leaving out those whose Condition is false (not in the stack)."""
    rm = stack.resource_map
    for lid, res in rm._resource_json_map.items():
        cond = res.get("Condition") if isinstance(res, dict) else None
        if cond is not None:
            try:
                if not rm.lazy_condition_map[cond]:
                    continue
            except Exception:
                pass
        yield lid, res


def _resolve(stack, res_json):
    # moto keeps no resolved copy of a resource's properties; it resolves
    # them with clean_json against the stack's resource map at creation.
    # Resolving again against the same map (parameters, created resources'
    # ids and attributes) gives the values it created the resource with.
    props = copy.deepcopy(res_json.get("Properties") or {})
    return cfn_parsing.clean_json(props, stack.resource_map)


def _physical_id(stack, lid):
    model = stack.resource_map._parsed_resources.get(lid)
    return getattr(model, "physical_resource_id", None) if model is not None else None


def _check_resource(stack, lid, res_json, now):
    """One StackResourceDrift (dict, serialized as is) plus the internal
    differences under `_diffs` (never serialized: not a shape member)."""
    rtype = res_json.get("Type", "")
    record = {
        "StackId": stack.stack_id,
        "LogicalResourceId": lid,
        "PhysicalResourceId": _physical_id(stack, lid),
        "ResourceType": rtype,
        "Timestamp": now,
        "_diffs": [],
    }
    if rtype not in _DRIFT_TYPES or record["PhysicalResourceId"] is None:
        record["StackResourceDriftStatus"] = "NOT_CHECKED"
        return record
    find, props_spec = _DRIFT_TYPES[rtype]
    try:
        expected = _resolve(stack, res_json)
    except Exception as e:  # CloudFormation: "could not run drift detection"
        record["StackResourceDriftStatus"] = "UNKNOWN"
        record["DriftStatusReason"] = f"Failed to resolve the resource's properties: {e}"
        return record
    record["ExpectedProperties"] = json.dumps(expected, sort_keys=True, separators=(",", ":"))
    record["_expected"] = expected
    live = find(stack, record["PhysicalResourceId"])
    if live is None:
        record["StackResourceDriftStatus"] = "DELETED"
        return record
    diffs, actual = _compare(props_spec, expected, live)
    record["ActualProperties"] = json.dumps(actual, sort_keys=True, separators=(",", ":"))
    record["_actual"] = actual
    record["_diffs"] = diffs
    record["PropertyDifferences"] = [
        {
            "PropertyPath": d["path"],
            "ExpectedValue": _text(d["expected"]),
            "ActualValue": _text(d["actual"]),
            "DifferenceType": d["type"],
        }
        for d in diffs
    ]
    record["StackResourceDriftStatus"] = "MODIFIED" if diffs else "IN_SYNC"
    return record


def _check_stack(stack, logical_ids=None, fail=None):
    """Checks the stack's resources (all, or those named). `fail` (the
    drift_fail fault) makes some resources fail: true fails the last one of
    a checked type, a list fails the logical ids listed. Returns
    (records of the resources checked, logical ids that failed)."""
    now = utcnow()
    resources = [(lid, res) for lid, res in _template_resources(stack) if not logical_ids or lid in logical_ids]
    if isinstance(fail, str):
        fail = [fail]
    failing = set()
    if fail is True:
        checkable = [lid for lid, res in resources if res.get("Type") in _DRIFT_TYPES]
        failing = set((checkable or [lid for lid, _ in resources])[-1:])
    elif isinstance(fail, (list, tuple)):
        failing = {lid for lid, _ in resources if lid in fail}
    records = [_check_resource(stack, lid, res, now) for lid, res in resources if lid not in failing]
    return records, [lid for lid, _ in resources if lid in failing]


def _drift_detections(backend):
    # Kept on the backend, so /moto-api/reset forgets them with the stacks.
    return backend.__dict__.setdefault("_stackwarden_drift_detections", {})


def _finish_detection(detection):
    """Computes a detection's results (at once, or when its delay is over)
    and records them on the stack."""
    with _drift_lock:
        if detection["DetectionStatus"] != "DETECTION_IN_PROGRESS":
            return
        stack = detection["_stack"]
        records, failed = _check_stack(stack, detection["_logical_ids"], detection["_fail"])
        drifted = [r for r in records if r["StackResourceDriftStatus"] in ("MODIFIED", "DELETED")]
        detection["StackDriftStatus"] = "DRIFTED" if drifted else "IN_SYNC"
        detection["DriftedStackResourceCount"] = len(drifted)
        # Resources that were checked keep their latest result, whatever
        # the detection's outcome (AWS: results are available for the
        # resources it completed; unchecked resources are not listed).
        latest = stack.__dict__.setdefault("_stackwarden_resource_drifts", {})
        for record in records:
            latest[record["LogicalResourceId"]] = record
        if failed:
            detection["DetectionStatus"] = "DETECTION_FAILED"
            detection["DetectionStatusReason"] = (
                f"Failed to detect drift on resources [{', '.join(str(f) for f in failed)}]: "
                "stackwarden fault (drift_fail)"
            )
        else:
            detection["DetectionStatus"] = "DETECTION_COMPLETE"
            detection.pop("DetectionStatusReason", None)
            # DescribeStacks reports the latest detection that completed.
            stack._stackwarden_drift_information = {
                "StackDriftStatus": detection["StackDriftStatus"],
                "LastCheckTimestamp": detection["Timestamp"],
            }


def _settle(detection):
    # A delayed detection completes on its timer; a reader arriving first
    # completes it (the timer thread may not have run yet).
    if detection["DetectionStatus"] == "DETECTION_IN_PROGRESS" and time.monotonic() >= detection["_due"]:
        _finish_detection(detection)
    return detection


def _settle_stack(backend, stack):
    for detection in list(_drift_detections(backend).values()):
        if detection["_stack"] is stack:
            _settle(detection)


def _detect_stack_drift(self):
    backend = self.cloudformation_backend
    stack = backend.get_stack(self._get_param("StackName"))
    if stack.status not in _DRIFT_STACK_STATUSES:
        raise ValidationError(
            message=(
                f"Stack [{stack.name}] is in status [{stack.status}]: drift detection is "
                f"supported for stacks in {', '.join(_DRIFT_STACK_STATUSES)} only"
            )
        )
    logical_ids = self._get_param("LogicalResourceIds") or []
    known = {lid for lid, _ in _template_resources(stack)}
    for lid in logical_ids:
        if lid not in known:
            raise ValidationError(message=f"Resource [{lid}] does not exist in stack [{stack.name}]")
    with _drift_lock:
        _settle_stack(backend, stack)
        for other in _drift_detections(backend).values():
            if other["_stack"] is stack and other["DetectionStatus"] == "DETECTION_IN_PROGRESS":
                raise ValidationError(
                    message=(
                        f"Drift detection is already in progress for stack [{stack.name}] "
                        f"(StackDriftDetectionId {other['StackDriftDetectionId']})"
                    )
                )
        with _faults_lock:
            delay_ms = float(_faults.get("drift_delay_ms") or 0)
            fail = _faults.get("drift_fail") or None
        detection = {
            "StackId": stack.stack_id,
            "StackDriftDetectionId": str(uuid.uuid4()),
            "DetectionStatus": "DETECTION_IN_PROGRESS",
            "DetectionStatusReason": "User Initiated",
            "Timestamp": utcnow(),
            "_stack": stack,
            "_logical_ids": set(logical_ids),
            "_fail": fail,
            "_due": time.monotonic() + delay_ms / 1000.0,
        }
        _drift_detections(backend)[detection["StackDriftDetectionId"]] = detection
        # AWS: LastCheckTimestamp is "the most recent time when a drift
        # detection operation was initiated on the stack"; the status stays
        # the last completed detection's until this one completes.
        previous = getattr(stack, "_stackwarden_drift_information", None) or {
            "StackDriftStatus": "NOT_CHECKED"
        }
        stack._stackwarden_drift_information = {
            "StackDriftStatus": previous["StackDriftStatus"],
            "LastCheckTimestamp": detection["Timestamp"],
        }
    if delay_ms > 0:
        timer = threading.Timer(delay_ms / 1000.0, _finish_detection, args=(detection,))
        timer.daemon = True
        timer.start()
    else:
        _finish_detection(detection)
    return ActionResult({"StackDriftDetectionId": detection["StackDriftDetectionId"]})


def _describe_stack_drift_detection_status(self):
    detection_id = self._get_param("StackDriftDetectionId")
    detection = _drift_detections(self.cloudformation_backend).get(detection_id)
    if detection is None:
        raise ValidationError(message=f"Drift detection [{detection_id}] does not exist")
    with _drift_lock:
        _settle(detection)
        answer = {k: v for k, v in detection.items() if not k.startswith("_")}
    return ActionResult(answer)


_DRIFTS_PAGE = 100


def _describe_stack_resource_drifts(self):
    backend = self.cloudformation_backend
    stack = backend.get_stack(self._get_param("StackName"))
    filters = set(self._get_param("StackResourceDriftStatusFilters") or [])
    max_results = self._get_param("MaxResults")
    max_results = int(max_results) if max_results not in (None, "") else _DRIFTS_PAGE
    if not 1 <= max_results <= 100:
        raise ValidationError(
            message="1 validation error detected: Value at 'maxResults' failed to satisfy "
            "constraint: Member must have value less than or equal to 100"
            if max_results > 100
            else "1 validation error detected: Value at 'maxResults' failed to satisfy "
            "constraint: Member must have value greater than or equal to 1"
        )
    with _drift_lock:
        _settle_stack(backend, stack)
        latest = dict(getattr(stack, "_stackwarden_resource_drifts", {}))
    # In template order; a resource no longer in the template is left out.
    order = [lid for lid, _ in _template_resources(stack)]
    records = [latest[lid] for lid in order if lid in latest]
    if filters:
        records = [r for r in records if r["StackResourceDriftStatus"] in filters]
    start = 0
    token = self._get_param("NextToken")
    if token:
        try:
            sid, offset = base64.urlsafe_b64decode(token.encode()).decode().rsplit("|", 1)
            start = int(offset)
            if sid != stack.stack_id or start < 0:
                raise ValueError(token)
        except Exception:
            raise ValidationError(message="Invalid NextToken")
    page = records[start : start + max_results]
    answer = {
        "StackResourceDrifts": [{k: v for k, v in r.items() if not k.startswith("_")} for r in page]
    }
    if start + max_results < len(records):
        answer["NextToken"] = base64.urlsafe_b64encode(
            f"{stack.stack_id}|{start + max_results}".encode()
        ).decode()
    return ActionResult(answer)


cfn_responses.CloudFormationResponse.detect_stack_drift = _detect_stack_drift
cfn_responses.CloudFormationResponse.describe_stack_drift_detection_status = (
    _describe_stack_drift_detection_status
)
cfn_responses.CloudFormationResponse.describe_stack_resource_drifts = _describe_stack_resource_drifts


def _stack_drift_information(self):
    # DescribeStacks' DriftInformation: NOT_CHECKED until a detection
    # completed, then that detection's status and when it was initiated.
    # An update does not reset it (AWS keeps it until the next detection).
    backend = cfn_models.cloudformation_backends[self.account_id][self.region_name]
    with _drift_lock:
        _settle_stack(backend, self)
    return getattr(self, "_stackwarden_drift_information", None) or {"StackDriftStatus": "NOT_CHECKED"}


cfn_models.Stack.drift_information = property(_stack_drift_information)


# --- 20. Drift-aware (REVERT_DRIFT) change sets ---------------------------------------
# moto ignores CreateChangeSet's DeploymentMode. With REVERT_DRIFT,
# CloudFormation compares the live resources with the template (as 19) and
# the change set also brings every drifted property back to the template:
# a Modify per drifted resource (Add for a deleted one) whose details carry
# the actual value (BeforeValue, from ACTUAL_STATE), the template's
# (AfterValue) and the drift. Create-only properties are not reverted.
# Such a change set has changes even when the template and parameters are
# unchanged, so neither patch 10's "No updates" nor moto's "didn't contain
# changes" applies then.
_revert_local = threading.local()
cfn_models.ChangeSet.deployment_mode = None
cfn_models.ChangeSet.stack_drift_status = None


def _revert_targets(records):
    """The drift a REVERT_DRIFT change set reverts: per resource, the
    differences of properties that are not create-only (or the resource's
    deletion)."""
    targets = []
    for r in records:
        status = r["StackResourceDriftStatus"]
        if status == "DELETED":
            targets.append((r, []))
        elif status == "MODIFIED":
            diffs = [d for d in r["_diffs"] if not d["create_only"]]
            if diffs:
                targets.append((r, diffs))
    return targets


_original_create_change_set_response = cfn_responses.CloudFormationResponse.create_change_set


def _create_change_set_response(self):
    mode = self._get_param("DeploymentMode")
    if not mode:
        return _original_create_change_set_response(self)
    if mode != "REVERT_DRIFT":
        raise ValidationError(message=f"Invalid DeploymentMode [{mode}]")
    kind = self._get_param("ChangeSetType", "CREATE")
    if kind in ("CREATE", "IMPORT"):
        raise ValidationError(
            message=f"DeploymentMode REVERT_DRIFT is not supported for ChangeSetType {kind}"
        )
    if self._get_bool_param("IncludeNestedStacks", False):
        raise ValidationError(
            message="DeploymentMode REVERT_DRIFT is not supported with IncludeNestedStacks"
        )
    stack = self.cloudformation_backend.get_stack(self._get_param("StackName"))
    # The drift as it is now (CloudFormation detects it for the change set).
    records, _ = _check_stack(stack)
    _revert_local.ctx = {"records": records, "targets": _revert_targets(records), "at": utcnow()}
    try:
        return _original_create_change_set_response(self)
    finally:
        _revert_local.ctx = None


cfn_responses.CloudFormationResponse.create_change_set = _create_change_set_response
_pre_revert_validate = cfn_responses.CloudFormationResponse._validate_different_update


def _validate_different_update_revert(self, incoming_params, stack_body, old_stack):
    ctx = getattr(_revert_local, "ctx", None)
    if ctx is not None and ctx["targets"]:
        return  # drift to revert is a change (see 20)
    _pre_revert_validate(self, incoming_params, stack_body, old_stack)


cfn_responses.CloudFormationResponse._validate_different_update = _validate_different_update_revert


def _value_at(props, path):
    value = props
    for part in path.strip("/").split("/"):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def _revert_details(record, diffs, after_props, at):
    """ResourceChangeDetail members for one drifted resource: one per
    differing leaf; a rule set (SecurityGroupIngress) as a whole."""
    details = []
    seen = set()
    for d in diffs:
        rules = _DRIFT_TYPES[record["ResourceType"]][1][d["prop"]].kind == "rules"
        path = f"/{d['prop']}" if rules else d["path"]
        if path in seen:
            continue
        seen.add(path)
        if rules:
            before = record["_actual"].get(d["prop"])
            previous = _sg_template_rules(record["_expected"].get(d["prop"]))
            after = _sg_template_rules(after_props.get(d["prop"]))
            if _rule_key(sorted(map(_rule_key, before or []))) == _rule_key(sorted(map(_rule_key, after))):
                continue
        else:
            before = d["actual"]
            previous = d["expected"]
            after = _value_at(after_props, path)
            if after is not None and before is not None and _same(after, before):
                continue  # the new template asks for what the resource has
        details.append(
            {
                "Target": {
                    "Attribute": "Properties",
                    "Name": d["prop"],
                    "Path": "/Properties" + path,
                    "RequiresRecreation": "Never",
                    "BeforeValue": _text(before),
                    "AfterValue": _text(after),
                    "BeforeValueFrom": "ACTUAL_STATE",
                    "AfterValueFrom": "TEMPLATE",
                    "AttributeChangeType": "Modify",
                    "Drift": {
                        "PreviousValue": _text(previous),
                        "ActualValue": _text(before),
                        "DriftDetectionTimestamp": at,
                    },
                },
                "Evaluation": "Static",
                "ChangeSource": "DirectModification",
            }
        )
    return details


def _add_drift_changes(backend, change_set, ctx):
    stack = change_set.stack
    new_resources = (change_set.template_dict or {}).get("Resources") or {}
    old_resources = stack.resource_map._resource_json_map
    by_id = {c.logical_resource_id: c for c in change_set.changes}
    reverts = []
    for record, diffs in ctx["targets"]:
        lid = record["LogicalResourceId"]
        if lid not in new_resources:
            continue  # the change set removes it
        change = by_id.get(lid)
        if record["StackResourceDriftStatus"] == "DELETED":
            if change is None:
                change = cfn_models.Change("Add", lid, record["ResourceType"])
                change_set.changes.append(change)
            change.action = "Add"
            change.resource_drift_status = "DELETED"
            change.physical_resource_id = record["PhysicalResourceId"]
            reverts.append((lid, None))
            continue
        after = record["_expected"]
        if new_resources[lid] != old_resources.get(lid):
            try:  # the template changes it too: revert to the new values
                after = _resolve(stack, new_resources[lid])
            except Exception:
                pass
        details = _revert_details(record, diffs, after, ctx["at"])
        if not details:
            continue
        if change is None:
            change = cfn_models.Change("Modify", lid, record["ResourceType"])
            change_set.changes.append(change)
        change.physical_resource_id = record["PhysicalResourceId"]
        change.replacement = getattr(change, "replacement", None) or "False"
        change.scope = sorted(set(getattr(change, "scope", None) or []) | {"Properties"})
        change.resource_drift_status = "MODIFIED"
        change.details = (getattr(change, "details", None) or []) + details
        change.before_context = json.dumps({"Properties": record["_actual"]}, sort_keys=True)
        change.after_context = json.dumps({"Properties": after}, sort_keys=True)
        reverts.extend(dict.fromkeys((lid, d["Target"]["Name"]) for d in details))
    # Every other resource's change (from the template) reports its drift
    # status too, as a drift-aware change set does.
    status = {r["LogicalResourceId"]: r["StackResourceDriftStatus"] for r in ctx["records"]}
    for change in change_set.changes:
        if getattr(change, "resource_drift_status", None) is None and change.logical_resource_id in status:
            change.resource_drift_status = status[change.logical_resource_id]
    return reverts


_pre_revert_create_change_set = cfn_models.CloudFormationBackend.create_change_set


def _create_change_set_revert(self, *args, **kwargs):
    change_set_id, stack_id = _pre_revert_create_change_set(self, *args, **kwargs)
    ctx = getattr(_revert_local, "ctx", None)
    if ctx is None:
        return change_set_id, stack_id
    change_set = self.change_sets[change_set_id]
    change_set.deployment_mode = "REVERT_DRIFT"
    drifted = any(r["StackResourceDriftStatus"] in ("MODIFIED", "DELETED") for r in ctx["records"])
    change_set.stack_drift_status = "DRIFTED" if drifted else "IN_SYNC"
    change_set._stackwarden_reverts = _add_drift_changes(self, change_set, ctx)
    if change_set._stackwarden_reverts and change_set.status == "FAILED":
        # Unchanged template, drifted resources: the change set has changes.
        change_set.status = "CREATE_COMPLETE"
        change_set.execution_status = "AVAILABLE"
        change_set.status_reason = None
    return change_set_id, stack_id


cfn_models.CloudFormationBackend.create_change_set = _create_change_set_revert
_pre_revert_execute = cfn_models.CloudFormationBackend.execute_change_set


def _revert_drift(stack, reverts):
    """Writes the template's values back to the drifted properties, after
    the change set's own changes (the template is the change set's now)."""
    rm = stack.resource_map
    for lid, prop in reverts:
        res = rm._resource_json_map.get(lid)
        if prop is None or res is None:
            continue
        find, props_spec = _DRIFT_TYPES[res["Type"]]
        spec = props_spec.get(prop)
        live = find(stack, _physical_id(stack, lid))
        if spec is None or spec.write is None or live is None:
            continue
        expected = _resolve(stack, res)
        if prop in expected:
            spec.write(stack, live, expected[prop])


def _execute_change_set_revert(self, change_set_name, stack_name=None):
    change_set = self.describe_change_set(change_set_name)
    reverts = getattr(change_set, "_stackwarden_reverts", None)
    if change_set.deployment_mode != "REVERT_DRIFT" or change_set.execution_status != "AVAILABLE":
        return _pre_revert_execute(self, change_set_name, stack_name)
    stack = self.stacks[change_set.stack_id]
    # A deleted resource is created again (Action Add) before moto applies
    # the template, so a template change to it applies to the new one.
    for lid, prop in reverts or []:
        if prop is None and lid in stack.resource_map._resource_json_map:
            stack.resource_map._parsed_resources.pop(lid, None)
            stack.resource_map[lid]
    _pre_revert_execute(self, change_set_name, stack_name)
    _revert_drift(stack, reverts or [])


cfn_models.CloudFormationBackend.execute_change_set = _execute_change_set_revert


# --- 21. One CloudFormation request at a time ------------------------------------------
_cfn_request_lock = threading.RLock()
_cfn_call_action = cfn_responses.CloudFormationResponse.call_action


def _call_action_whole(self):
    with _cfn_request_lock:
        return _cfn_call_action(self)


cfn_responses.CloudFormationResponse.call_action = _call_action_whole


def _exit_when_stdin_closes():
    """With --watch-stdin, the emulator lives exactly as long as whoever
    holds the other end of its stdin: a test binary that panics or is killed
    closes it, and no emulator is left behind."""
    sys.stdin.read()
    os._exit(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--watch-stdin", action="store_true")
    args = parser.parse_args()
    from moto.server import main as moto_main

    if args.watch_stdin:
        import threading

        threading.Thread(target=_exit_when_stdin_closes, daemon=True).start()

    sys.stdout.flush()
    moto_main(["-H", args.host, "-p", str(args.port)])


if __name__ == "__main__":
    main()
