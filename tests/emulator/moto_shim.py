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
     change set of the stack is refused (`AlreadyExistsException`).
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
