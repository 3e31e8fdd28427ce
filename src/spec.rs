//! Desired state: the model of `desired-state/<env>.yaml`, its loading and
//! validation, the stack dependency graph and the revision hash.
//!
//! Loading is strict: unknown keys are errors, every error names the file,
//! line, column and field, and all errors of a file are reported together.
//! A [`DesiredEnv`] is immutable once loaded; nothing in it touches AWS.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::artifacts::{Artifact, ArtifactStore};
use crate::template::Template;
use crate::yaml::{Document, Pos, YamlError};

/// Tag carrying the desired revision a stack was last converged to.
pub const REVISION_TAG: &str = "stackwarden:revision";
/// Tag naming the environment that owns a stack (used to find orphans).
pub const ENVIRONMENT_TAG: &str = "stackwarden:environment";
/// Tag naming the deployment that owns a stack (the desired state's
/// top-level `owner`): environment names repeat across teams and checkouts
/// in one account, owners must not.
pub const OWNER_TAG: &str = "stackwarden:owner";
/// Change sets stackwarden makes are named `stackwarden-<revision>`; any
/// other of this prefix on a stack is stale and deleted.
pub const CHANGE_SET_PREFIX: &str = "stackwarden-";

/// How long one stack operation may take unless the desired state says.
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// Bounds of `operation_timeout` and a stack's `timeout`. The longest
/// CloudFormation operations (a large RDS or MSK cluster) take hours, not
/// days; a longer timeout only hides a stuck stack.
pub const OPERATION_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_secs(60), Duration::from_secs(72 * 60 * 60));
const DEFAULT_ALERT_REPEAT: Duration = Duration::from_secs(6 * 60 * 60);
/// Bounds of `alerts.repeat_after`: a reminder more often than every
/// minute is noise, one rarer than every 30 days is silence.
pub const ALERT_REPEAT_RANGE: (Duration, Duration) = (
    Duration::from_secs(60),
    Duration::from_secs(30 * 24 * 60 * 60),
);

/// One problem in a desired-state file (or a template it names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub file: PathBuf,
    pub pos: Pos,
    /// Dotted path of the field at fault; empty for whole-file problems.
    pub path: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: ",
            self.file.display(),
            self.pos.line,
            self.pos.column
        )?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in one desired-state file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Whether stackwarden may change anything.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Plan and apply what policy allows.
    #[default]
    Converge,
    /// Plan and report only; never write.
    Observe,
}

/// A parameter value: a literal, or the value of another stack's output.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(untagged)]
pub enum Value {
    Literal(String),
    Output { stack: String, output: String },
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Literal(s) => f.write_str(s),
            Value::Output { stack, output } => write!(f, "{{output: {stack}.{output}}}"),
        }
    }
}

impl TryFrom<serde_yaml::Value> for Value {
    type Error = String;

    fn try_from(v: serde_yaml::Value) -> Result<Self, String> {
        use serde_yaml::Value as Y;
        const EXPECTED: &str = "expected a scalar or {output: <stack>.<Output>}";
        match v {
            Y::String(s) => Ok(Value::Literal(s)),
            Y::Number(n) => Ok(Value::Literal(n.to_string())),
            Y::Bool(b) => Ok(Value::Literal(b.to_string())),
            Y::Mapping(m) if m.len() == 1 => {
                let (k, v) = m.into_iter().next().expect("one entry");
                match (k.as_str(), v) {
                    (Some("output"), Y::String(r)) => match r.split_once('.') {
                        Some((stack, output)) if !stack.is_empty() && !output.is_empty() => {
                            Ok(Value::Output {
                                stack: stack.to_owned(),
                                output: output.to_owned(),
                            })
                        }
                        _ => Err(format!(
                            "output reference `{r}` must be <stack>.<OutputName>"
                        )),
                    },
                    _ => Err(EXPECTED.to_owned()),
                }
            }
            _ => Err(EXPECTED.to_owned()),
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = serde_yaml::Value::deserialize(d)?;
        Value::try_from(raw).map_err(serde::de::Error::custom)
    }
}

/// A duration written the humantime way (`90s`, `5m`, `1h 30m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HumanDuration(Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration `{s}`: {e}")))
    }
}

impl schemars::JsonSchema for HumanDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration: a number and a unit, repeated (`90s`, `5m`, `1h 30m`, `1.5h`, `2days`).",
            // It starts with a number; the loader (humantime) judges the rest.
            "pattern": "^\\s*[0-9]",
        })
    }
}

impl schemars::JsonSchema for Value {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ParameterValue".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A literal (a string, number or boolean), or another stack's output: `{output: <stack>.<OutputName>}`.",
            "oneOf": [
                {"type": ["string", "number", "boolean"]},
                {
                    "type": "object",
                    "properties": {
                        "output": {
                            "type": "string",
                            "description": "`<stack>.<OutputName>`: the output of another stack of this environment (which then deploys first).",
                            "pattern": "^[^.]+\\..+$",
                        }
                    },
                    "required": ["output"],
                    "additionalProperties": false,
                },
            ],
        })
    }
}

/// The JSON Schema (draft 2020-12) of a desired-state file, generated from
/// the types the loader reads it with: an editor validates what the
/// loader will accept in shape (the loader checks more: templates,
/// references, cycles).
pub fn json_schema() -> serde_json::Value {
    let generator = schemars::generate::SchemaSettings::draft2020_12().into_generator();
    let mut schema = generator.into_root_schema_for::<RawEnv>();
    schema.insert(
        "$id".into(),
        "https://stackwarden.dev/schema/desired-state.json".into(),
    );
    schema.into()
}

/// An environment: `desired-state/<environment>.yaml`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "stackwarden desired state")]
struct RawEnv {
    /// The environment's name; the file is `desired-state/<environment>.yaml`.
    environment: String,
    /// The AWS region of its stacks.
    region: String,
    /// The AWS account the stacks must be in: checked (STS) before the
    /// first write, so credentials of another account change nothing.
    #[serde(default)]
    account_id: Option<String>,
    /// Who owns the stacks (tagged `stackwarden:owner`): only stacks with
    /// this owner are ever pruned. Required with `policy.prune`.
    #[serde(default)]
    owner: Option<String>,
    /// The role assumed to act on the environment's account.
    #[serde(default)]
    assume_role: Option<AssumeRole>,
    /// Prefix of every stack's name: `<prefix>-<stack key>` unless the
    /// stack sets `name`.
    stack_name_prefix: String,
    /// Tags of every stack (a stack's own `tags` add to them).
    #[serde(default)]
    tags: BTreeMap<String, String>,
    /// Where drift and failure alerts go.
    #[serde(default)]
    alerts: Option<RawAlerts>,
    /// What stackwarden may do in the environment, and when.
    #[serde(default)]
    policy: RawPolicy,
    /// How long one stack operation may take (default 60m, 1m to 72h).
    #[serde(default)]
    operation_timeout: Option<HumanDuration>,
    /// Templates must resolve (symlinks included) inside the repository
    /// holding the desired-state folder unless this is set.
    #[serde(default)]
    allow_templates_outside_repository: bool,
    /// The S3 bucket templates are uploaded to (needed for templates over
    /// CloudFormation's 51,200-byte inline limit).
    #[serde(default)]
    artifacts: Option<RawArtifacts>,
    /// Resource drift detection of every stack (a stack's own `drift`
    /// overrides it).
    #[serde(default)]
    drift: Option<RawDrift>,
    /// The stacks, by key (at least one).
    #[schemars(with = "BTreeMap<String, RawStack>", extend("minProperties" = 1))]
    stacks: serde_yaml::Mapping,
}

/// `drift:` of an environment (ignore entries `stack.LogicalId[.Path]`)
/// or of a stack (entries `LogicalId[.Path]`; mode and interval override
/// the environment's, ignore entries add to them).
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Drift")]
struct RawDrift {
    /// `alert` (default): report and alert; `revert`: also write the
    /// template's values back with a drift-aware change set.
    #[serde(default)]
    mode: Option<crate::drift::DriftMode>,
    /// How often drift is detected (default 1h).
    #[serde(default)]
    interval: Option<HumanDuration>,
    /// Drift never reported nor reverted: `stack.LogicalId[.Property.Path]`
    /// at environment level, `LogicalId[.Property.Path]` in a stack.
    #[serde(default)]
    ignore: Vec<String>,
}

/// `artifacts:`: the S3 bucket templates are uploaded to.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Artifacts")]
struct RawArtifacts {
    /// The bucket's name (in the environment's region).
    bucket: String,
    /// Key prefix of the uploaded templates.
    #[serde(default)]
    prefix: String,
    /// `large` (default): only what cannot be sent inline; `always`.
    #[serde(default)]
    upload: Upload,
}

/// Which templates are uploaded.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
enum Upload {
    /// Only templates too large to send inline.
    #[default]
    Large,
    /// Every template.
    Always,
}

/// The role stackwarden assumes to operate on the environment's account.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AssumeRole {
    /// The role's ARN.
    pub role_arn: String,
    /// The external id the role's trust policy requires, if any.
    #[serde(default)]
    pub external_id: Option<String>,
    /// The session name (default `stackwarden`), seen in CloudTrail.
    #[serde(default)]
    pub session_name: Option<String>,
}

/// `alerts:`: drift and failure alerts, once per episode.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Alerts")]
struct RawAlerts {
    /// The SNS topic alerts are published to.
    sns_topic_arn: String,
    /// Tell an episode still open again after this long (default 6h, 1m
    /// to 30 days).
    #[serde(default)]
    repeat_after: Option<HumanDuration>,
}

/// `policy:`: what stackwarden may do in the environment, and when.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Policy")]
struct RawPolicy {
    /// `converge` (default): plan and apply what the policy allows;
    /// `observe`: plan and report only.
    #[serde(default)]
    mode: Mode,
    /// Delete stacks tagged with this environment and owner that are no
    /// longer declared.
    #[serde(default)]
    prune: bool,
    /// Resource types never replaced or removed without an
    /// `allow_replacement` entry (default: the stateful types).
    #[serde(default)]
    protect: Option<Vec<String>>,
    /// `stack.LogicalId` resources that may be replaced or removed although
    /// their type is protected.
    #[serde(default)]
    allow_replacement: Vec<String>,
    /// Names of orphaned stacks that may be pruned although their template
    /// holds protected resources.
    #[serde(default)]
    allow_prune: Vec<String>,
    /// `stack.LogicalId` resources a continued rollback may skip when they
    /// fail to roll back.
    #[serde(default)]
    rollback_skip: Vec<String>,
    /// Delete and recreate a stack whose creation failed (ROLLBACK_COMPLETE).
    #[serde(default)]
    recreate_failed: bool,
    /// Continue a rollback stuck in UPDATE_ROLLBACK_FAILED.
    #[serde(default)]
    continue_rollback: bool,
    /// Sync windows: when passes may write. An active `deny` window closes
    /// the environment; with `allow` windows it is open only while one is
    /// active. None: always open.
    #[serde(default)]
    windows: Vec<RawWindow>,
}

/// One of `policy.windows`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "SyncWindow")]
struct RawWindow {
    /// `allow`: writes only while an allow window is active; `deny`: no
    /// writes while this one is.
    kind: crate::window::Kind,
    /// When the window opens: a cron expression of 5 fields (minute hour
    /// day-of-month month day-of-week), in `timezone`.
    schedule: String,
    /// How long it stays open from each start.
    duration: HumanDuration,
    /// The IANA time zone of `schedule` (default UTC).
    #[serde(default = "utc")]
    timezone: String,
}

fn utc() -> String {
    "UTC".into()
}

/// One stack of the environment.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Stack")]
struct RawStack {
    /// Its CloudFormation template, relative to the desired-state file.
    template: String,
    /// The stack's name (default `<stack_name_prefix>-<key>`).
    #[serde(default)]
    name: Option<String>,
    /// The template's parameters: literals or other stacks' outputs.
    #[serde(default)]
    parameters: BTreeMap<String, Value>,
    /// Keys of the stacks deployed before this one (besides those whose
    /// outputs it reads).
    #[serde(default)]
    depends_on: Vec<String>,
    /// The stack's own tags, added to the environment's.
    #[serde(default)]
    tags: BTreeMap<String, String>,
    /// Turn on the stack's termination protection.
    #[serde(default)]
    termination_protection: bool,
    /// How long one operation of this stack may take (default:
    /// `operation_timeout`).
    #[serde(default)]
    timeout: Option<HumanDuration>,
    /// The ECS services of the stack to watch (counts, task definition,
    /// rollout).
    #[serde(default)]
    ecs_services: Vec<RawEcsService>,
    /// The stack's drift settings, over the environment's.
    #[serde(default)]
    drift: Option<RawDrift>,
}

/// An ECS service stackwarden watches.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "EcsService")]
struct RawEcsService {
    /// Its cluster's name.
    cluster: Value,
    /// The service's name.
    service: Value,
    /// The number of tasks it should run (unless autoscaling owns it).
    #[serde(default)]
    desired_count: Option<u32>,
    /// The range autoscaling moves its desired count in: a count inside it
    /// is not drift.
    #[serde(default)]
    autoscaling: Option<Autoscaling>,
    /// The task definition it should run.
    #[serde(default)]
    task_definition: Option<Value>,
}

/// The range autoscaling may move a service's desired count in.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct Autoscaling {
    /// The fewest tasks.
    pub min: u32,
    /// The most tasks.
    pub max: u32,
}

/// Alerting configuration of an environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alerts {
    pub sns_topic_arn: String,
    pub repeat_after: Duration,
}

/// What stackwarden may do in an environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// Delete orphaned stacks (tagged as ours, absent from desired state).
    pub prune: bool,
    /// Resource types whose replacement or removal is blocked.
    pub protect: BTreeSet<String>,
    /// `stack.LogicalId` resources that may be replaced or removed anyway.
    pub allow_replacement: BTreeSet<(String, String)>,
    /// Names of orphaned stacks that may be pruned although their template
    /// holds protected resources.
    pub allow_prune: BTreeSet<String>,
    /// `stack.LogicalId` resources a continued rollback may skip
    /// (ResourcesToSkip) when they fail to roll back.
    pub rollback_skip: BTreeSet<(String, String)>,
    /// Delete and recreate a stack whose creation failed (ROLLBACK_COMPLETE).
    pub recreate_failed: bool,
    /// Continue a rollback stuck in UPDATE_ROLLBACK_FAILED.
    pub continue_rollback: bool,
    /// When passes may write (see [`crate::window`]).
    pub windows: crate::window::Windows,
}

/// An ECS service a stack owns, to observe and keep converged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcsServiceSpec {
    pub cluster: Value,
    pub service: Value,
    /// Desired count to hold, when not managed by autoscaling.
    pub desired_count: Option<u32>,
    pub autoscaling: Option<Autoscaling>,
    /// Expected task definition (usually the owning stack's output).
    pub task_definition: Option<Value>,
}

/// One stack of an environment, validated.
#[derive(Debug, Clone)]
pub struct DesiredStack {
    /// The key under `stacks:`; how other stacks refer to it.
    pub key: String,
    /// The CloudFormation stack name.
    pub name: String,
    pub template_path: PathBuf,
    /// The template as sent: as written, or packaged (local nested
    /// templates replaced by their artifact URLs, as JSON).
    pub template_body: String,
    /// Where the template is read from when it is not sent inline.
    pub template_url: Option<String>,
    /// What must be in the artifact bucket before a change set is made.
    pub artifacts: Vec<Artifact>,
    /// The files of its local nested templates.
    pub nested_templates: Vec<PathBuf>,
    pub template: Template,
    pub parameters: BTreeMap<String, Value>,
    /// Explicit `depends_on` plus every stack an output reference names.
    pub depends_on: BTreeSet<String>,
    /// Environment tags overlaid with the stack's own (stackwarden's tags excluded).
    pub tags: BTreeMap<String, String>,
    pub termination_protection: bool,
    pub timeout: Duration,
    pub ecs_services: Vec<EcsServiceSpec>,
    /// Resource drift: detection cadence, alert or revert, what to ignore.
    pub drift: crate::drift::DriftSettings,
    /// Content hash of everything that defines this stack.
    pub revision: String,
    /// The environment's `owner`, tagged on the stack.
    pub owner: Option<String>,
}

impl DesiredStack {
    /// Tags to put on the stack: the declared ones plus stackwarden's own.
    pub fn tags_with_ownership(&self, environment: &str) -> BTreeMap<String, String> {
        let mut tags = self.tags.clone();
        tags.insert(REVISION_TAG.to_owned(), self.revision.clone());
        tags.insert(ENVIRONMENT_TAG.to_owned(), environment.to_owned());
        if let Some(owner) = &self.owner {
            tags.insert(OWNER_TAG.to_owned(), owner.clone());
        }
        tags
    }

    /// The name of this revision's change set: a restart finds and reuses it.
    pub fn change_set_name(&self) -> String {
        format!("{CHANGE_SET_PREFIX}{}", &self.revision[..12])
    }

    /// The request for a change set `name` of this stack: its template, the
    /// resolved `parameters`, and its tags with stackwarden's own.
    pub fn change_set_request(
        &self,
        environment: &str,
        name: String,
        kind: crate::cloud::ChangeSetKind,
        parameters: BTreeMap<String, String>,
        description: String,
    ) -> crate::cloud::ChangeSetRequest {
        crate::cloud::ChangeSetRequest {
            stack_name: self.name.clone(),
            change_set_name: name,
            kind,
            template_body: self.template_body.clone(),
            template_url: self.template_url.clone(),
            artifacts: self.artifacts.clone(),
            parameters,
            tags: self.tags_with_ownership(environment),
            description,
            include_nested_stacks: self
                .template
                .resources
                .values()
                .any(|r| crate::cloud::NESTED_STACK_TYPES.contains(&r.kind.as_str())),
            revert_drift: false,
        }
    }

    /// Parameters whose values must never be shown.
    pub fn secret_parameters(&self) -> BTreeSet<String> {
        self.template
            .parameters
            .iter()
            .filter(|(_, p)| p.no_echo)
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// One environment, validated: immutable once loaded.
#[derive(Debug, Clone)]
pub struct DesiredEnv {
    pub name: String,
    pub file: PathBuf,
    pub region: String,
    pub account_id: Option<String>,
    /// Who this deployment is: tagged on every stack as `stackwarden:owner`;
    /// only stacks carrying it can be this deployment's orphans.
    pub owner: Option<String>,
    pub assume_role: Option<AssumeRole>,
    pub stack_name_prefix: String,
    pub alerts: Option<Alerts>,
    pub policy: Policy,
    pub stacks: BTreeMap<String, DesiredStack>,
    /// Stack keys in topological waves: every stack's dependencies are in
    /// earlier waves; keys within a wave are sorted.
    pub waves: Vec<Vec<String>>,
    /// Content hash of the whole environment.
    pub revision: String,
    /// Every file this environment was loaded from (itself and its templates).
    pub sources: Vec<PathBuf>,
    /// What could not be checked before deploy time (see
    /// [`Template::unchecked`]), one sentence each, naming the stack.
    pub warnings: Vec<String>,
}

impl DesiredEnv {
    /// Who and where stackwarden acts for this environment: the role it
    /// assumes (`default` for the caller's own credentials) and the region.
    /// Environments with the same key share clients and one concurrency bound.
    pub fn account_region(&self) -> (String, String) {
        (
            self.assume_role
                .as_ref()
                .map_or_else(|| "default".to_owned(), |r| r.role_arn.clone()),
            self.region.clone(),
        )
    }

    /// The wave (from 1) a declared stack is in.
    pub fn wave_of(&self, key: &str) -> Option<usize> {
        self.waves
            .iter()
            .position(|w| w.binary_search_by(|k| k.as_str().cmp(key)).is_ok())
            .map(|i| i + 1)
    }

    /// Stack keys in dependency order.
    pub fn order(&self) -> impl Iterator<Item = &DesiredStack> {
        self.waves.iter().flatten().map(|k| &self.stacks[k])
    }

    /// Stacks that depend on `key`, directly or not.
    pub fn dependents_of(&self, key: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut frontier = vec![key.to_owned()];
        while let Some(k) = frontier.pop() {
            for s in self.stacks.values() {
                if s.depends_on.contains(&k) && out.insert(s.key.clone()) {
                    frontier.push(s.key.clone());
                }
            }
        }
        out
    }
}

/// The desired-state files of a folder, by environment name (file stem).
///
/// # Errors
/// The folder cannot be read.
pub fn discover(dir: &Path) -> std::io::Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        if is_yaml && let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
            out.insert(stem.to_owned(), path);
        }
    }
    Ok(out)
}

/// Loads and validates one desired-state file.
///
/// # Errors
/// Every problem found, each with file, line, column and field.
pub fn load(file: &Path) -> Result<DesiredEnv, SpecErrors> {
    let text =
        crate::files::read_text(file, crate::files::MAX_DESIRED_STATE_BYTES).map_err(|e| {
            SpecErrors(vec![SpecError {
                file: file.to_owned(),
                pos: Pos { line: 1, column: 1 },
                path: String::new(),
                message: format!("cannot read: {e}"),
            }])
        })?;
    Loader::new(file).load(&text)
}

struct Loader {
    file: PathBuf,
    dir: PathBuf,
    errors: Vec<SpecError>,
    /// Every stack key of the file, loaded or not.
    declared: BTreeSet<String>,
    /// Where templates must resolve to; `None` when the file opts out.
    template_root: Option<PathBuf>,
    /// The artifact bucket, when the file has a valid one.
    artifacts: Option<ArtifactStore>,
    region: String,
    /// Stack key to what its template needs in the artifact bucket.
    packages: BTreeMap<String, Package>,
    /// Said by `validate`, never refused (see [`DesiredEnv::warnings`]).
    warnings: Vec<String>,
}

/// What a stack's template needs in the artifact bucket.
#[derive(Debug, Default)]
struct Package {
    template_url: Option<String>,
    artifacts: Vec<Artifact>,
    /// The nested templates' files.
    sources: Vec<PathBuf>,
}

/// How deep local nested templates are followed (AWS: stacks nest at
/// most five levels below the root).
const MAX_NESTED_DEPTH: usize = 5;

impl Loader {
    fn new(file: &Path) -> Loader {
        Loader {
            file: file.to_owned(),
            dir: file.parent().unwrap_or(Path::new(".")).to_owned(),
            errors: Vec::new(),
            declared: BTreeSet::new(),
            template_root: None,
            artifacts: None,
            region: String::new(),
            packages: BTreeMap::new(),
            warnings: Vec::new(),
        }
    }

    fn yaml_error(&mut self, e: YamlError) {
        self.errors.push(SpecError {
            file: self.file.clone(),
            pos: e.pos,
            path: e.path,
            message: e.message,
        });
    }

    fn error_at(&mut self, doc: &Document, path: &str, message: impl Into<String>) {
        self.errors.push(SpecError {
            file: self.file.clone(),
            pos: doc.positions.find_dotted(path),
            path: path.to_owned(),
            message: message.into(),
        });
    }

    fn load(mut self, text: &str) -> Result<DesiredEnv, SpecErrors> {
        let doc = match Document::parse(text) {
            Ok(d) => d,
            Err(e) => {
                self.yaml_error(e);
                return Err(SpecErrors(self.errors));
            }
        };
        let raw: RawEnv = match doc.deserialize(&doc.value, &[]) {
            Ok(r) => r,
            Err(e) => {
                self.yaml_error(e);
                return Err(SpecErrors(self.errors));
            }
        };
        self.check_environment(&doc, &raw);
        if !raw.allow_templates_outside_repository {
            match crate::files::repository_root(&self.dir) {
                Ok(root) => self.template_root = Some(root),
                Err(e) => {
                    let msg = format!("cannot resolve the folder {}: {e}", self.dir.display());
                    self.error_at(&doc, "", msg);
                    return Err(SpecErrors(self.errors));
                }
            }
        }
        self.declared = raw
            .stacks
            .keys()
            .filter_map(|k| k.as_str().map(str::to_owned))
            .collect();
        self.region = raw.region.clone();
        if let Some(a) = &raw.artifacts {
            // S3's characters safe in a URL (letters, digits, `!-_.*'()`)
            // and `/`, no empty or dot segments: the key is the URL's path.
            let prefix_ok = a.prefix.len() <= 512
                && a.prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/!-_.*'()".contains(c))
                && (a.prefix.is_empty()
                    || a.prefix
                        .trim_end_matches('/')
                        .split('/')
                        .all(|seg| !(seg.is_empty() || seg == "." || seg == "..")));
            match crate::artifacts::check_bucket_name(&a.bucket) {
                Err(e) => self.error_at(&doc, "artifacts.bucket", e),
                Ok(()) if !prefix_ok => self.error_at(
                    &doc,
                    "artifacts.prefix",
                    "a key prefix is letters, digits and !-_.*'() in segments separated by `/`, none empty, `.` or `..` (at most 512 bytes)",
                ),
                Ok(()) => {
                    let mut prefix = a.prefix.clone();
                    if !prefix.is_empty() && !prefix.ends_with('/') {
                        prefix.push('/');
                    }
                    self.artifacts = Some(ArtifactStore {
                        bucket: a.bucket.clone(),
                        prefix,
                        always: a.upload == Upload::Always,
                    });
                }
            }
        }

        // Each stack is deserialized on its own so that problems in several
        // stacks are all reported at once.
        let mut raw_stacks = BTreeMap::new();
        for (key, value) in &raw.stacks {
            let Some(key) = key.as_str() else {
                self.error_at(&doc, "stacks", "stack keys must be strings");
                continue;
            };
            let base = vec!["stacks".to_owned(), key.to_owned()];
            match doc.deserialize::<RawStack>(value, &base) {
                Ok(s) => {
                    raw_stacks.insert(key.to_owned(), s);
                }
                Err(e) => self.yaml_error(e),
            }
        }
        if raw.stacks.is_empty() {
            self.error_at(&doc, "stacks", "an environment needs at least one stack");
        }

        let mut templates = BTreeMap::new();
        for (key, s) in &raw_stacks {
            // Values known before deploy time expand loops over parameters;
            // another stack's output is not known yet (and its default does
            // not stand in for it).
            let literals: BTreeMap<String, Option<String>> = s
                .parameters
                .iter()
                .map(|(k, v)| match v {
                    Value::Literal(l) => (k.clone(), Some(l.clone())),
                    Value::Output { .. } => (k.clone(), None),
                })
                .collect();
            if let Some(t) = self.load_template(&doc, key, &s.template, &literals) {
                templates.insert(key.clone(), t);
            }
        }
        let policy = self.check_policy(&doc, &raw.policy, &raw_stacks, &templates);
        let mut drift = self.check_drift(&doc, raw.drift.as_ref(), &raw_stacks, &templates);
        if let Some(d) = raw.operation_timeout {
            self.check_duration(&doc, "operation_timeout", d.0, OPERATION_TIMEOUT_RANGE);
        }
        if let Some(d) = raw.alerts.as_ref().and_then(|a| a.repeat_after) {
            self.check_duration(&doc, "alerts.repeat_after", d.0, ALERT_REPEAT_RANGE);
        }
        for (key, s) in &raw_stacks {
            if let Some(d) = s.timeout {
                let path = format!("stacks.{key}.timeout");
                self.check_duration(&doc, &path, d.0, OPERATION_TIMEOUT_RANGE);
            }
        }
        let env_timeout = raw
            .operation_timeout
            .map_or(DEFAULT_OPERATION_TIMEOUT, |d| d.0);

        let mut stacks = BTreeMap::new();
        let mut names: BTreeMap<String, String> = BTreeMap::new();
        for (key, s) in raw_stacks {
            let name = s
                .name
                .clone()
                .unwrap_or_else(|| format!("{}-{key}", raw.stack_name_prefix));
            let name_path = if s.name.is_some() {
                format!("stacks.{key}.name")
            } else {
                format!("stacks.{key}")
            };
            if !valid_stack_name(&name) {
                self.error_at(
                    &doc,
                    &name_path,
                    format!(
                        "stack name `{name}` is not a valid CloudFormation name (a letter, then letters, digits and hyphens, at most 128)"
                    ),
                );
            }
            if let Some(other) = names.insert(name.clone(), key.clone()) {
                self.error_at(
                    &doc,
                    &name_path,
                    format!("stack name `{name}` is also used by stack `{other}`"),
                );
            }
            let mut depends_on = BTreeSet::new();
            for (i, dep) in s.depends_on.iter().enumerate() {
                if dep == &key {
                    self.error_at(
                        &doc,
                        &format!("stacks.{key}.depends_on.{i}"),
                        "a stack cannot depend on itself",
                    );
                } else if !self.declared.contains(dep) {
                    self.error_at(
                        &doc,
                        &format!("stacks.{key}.depends_on.{i}"),
                        format!("unknown stack `{dep}`"),
                    );
                } else {
                    depends_on.insert(dep.clone());
                }
            }
            let Some((template_path, body, template)) = templates.get(&key).cloned() else {
                continue;
            };
            self.check_parameters(
                &doc,
                &key,
                &s.parameters,
                &template,
                &templates,
                &mut depends_on,
            );
            for (i, svc) in s.ecs_services.iter().enumerate() {
                let base = format!("stacks.{key}.ecs_services.{i}");
                for (field, v) in [
                    ("cluster", Some(&svc.cluster)),
                    ("service", Some(&svc.service)),
                    ("task_definition", svc.task_definition.as_ref()),
                ] {
                    if let Some(v) = v {
                        self.check_reference(
                            &doc,
                            &format!("{base}.{field}"),
                            v,
                            &key,
                            &templates,
                            &mut depends_on,
                        );
                    }
                }
                if let Some(a) = svc.autoscaling
                    && a.min > a.max
                {
                    self.error_at(
                        &doc,
                        &format!("{base}.autoscaling"),
                        format!("min {} is greater than max {}", a.min, a.max),
                    );
                }
                // The declared range is what Application Auto Scaling is
                // told: it must equal the stack's scalable target, or
                // stackwarden would fight the scaling the stack set up.
                if let Some(a) = svc.autoscaling {
                    for (field, declared, property) in
                        [("min", a.min, "MinCapacity"), ("max", a.max, "MaxCapacity")]
                    {
                        if let Some((actual, from)) =
                            scalable_capacity(&template, &s.parameters, property)
                            && actual != f64::from(declared)
                        {
                            self.error_at(
                                &doc,
                                &format!("{base}.autoscaling"),
                                format!(
                                    "{field} {declared} differs from the stack's scalable target: {property} is {actual}{from}"
                                ),
                            );
                        }
                    }
                }
            }
            // The stack itself owns its services: a reference to its own
            // outputs is not a dependency edge.
            depends_on.remove(&key);
            let mut tags = raw.tags.clone();
            tags.extend(s.tags.clone());
            for (t, v) in &tags {
                let field = if s.tags.contains_key(t) {
                    format!("stacks.{key}.tags.{t}")
                } else {
                    format!("tags.{t}")
                };
                if t.starts_with("stackwarden:") || t.starts_with("aws:") {
                    self.error_at(
                        &doc,
                        &format!("stacks.{key}.tags"),
                        format!("tag `{t}` is reserved"),
                    );
                } else if t.is_empty() || t.chars().count() > limits::TAG_KEY_CHARS {
                    self.error_at(
                        &doc,
                        &field,
                        format!(
                            "tag key `{t}` must be 1 to {} characters (CloudFormation's limit)",
                            limits::TAG_KEY_CHARS
                        ),
                    );
                } else if v.chars().count() > limits::TAG_VALUE_CHARS {
                    self.error_at(
                        &doc,
                        &field,
                        format!(
                            "the value of tag `{t}` is over {} characters (CloudFormation's limit)",
                            limits::TAG_VALUE_CHARS
                        ),
                    );
                }
            }
            // stackwarden's own tags count against AWS's limit too.
            let own = 2 + usize::from(raw.owner.is_some());
            if tags.len() + own > limits::STACK_TAGS {
                self.error_at(
                    &doc,
                    &format!("stacks.{key}"),
                    format!(
                        "{} tags plus stackwarden's {own} exceed CloudFormation's limit of {} tags per stack",
                        tags.len(),
                        limits::STACK_TAGS
                    ),
                );
            }
            let timeout = s.timeout.map_or(env_timeout, |d| d.0);
            let ecs_services = s
                .ecs_services
                .into_iter()
                .map(|r| EcsServiceSpec {
                    cluster: r.cluster,
                    service: r.service,
                    desired_count: r.desired_count,
                    autoscaling: r.autoscaling,
                    task_definition: r.task_definition,
                })
                .collect::<Vec<_>>();
            let revision = stack_revision(&template, &s.parameters, &tags);
            let package = self.packages.remove(&key).unwrap_or_default();
            let drift_settings = drift.remove(&key).unwrap_or_default();
            stacks.insert(
                key.clone(),
                DesiredStack {
                    key,
                    name,
                    template_path,
                    template_body: body,
                    template_url: package.template_url,
                    artifacts: package.artifacts,
                    nested_templates: package.sources,
                    template,
                    parameters: s.parameters,
                    depends_on,
                    tags,
                    termination_protection: s.termination_protection,
                    timeout,
                    ecs_services,
                    drift: drift_settings,
                    revision,
                    owner: raw.owner.clone(),
                },
            );
        }

        let waves = match waves(&stacks) {
            Ok(w) => w,
            Err(cycle) => {
                let first = cycle[0].clone();
                self.error_at(
                    &doc,
                    &format!("stacks.{first}"),
                    format!("dependency cycle: {}", cycle.join(" -> ")),
                );
                Vec::new()
            }
        };

        if !self.errors.is_empty() {
            self.errors
                .sort_by(|a, b| (&a.file, a.pos).cmp(&(&b.file, b.pos)));
            self.errors.dedup();
            return Err(SpecErrors(self.errors));
        }
        let revision = {
            let mut h = Sha256::new();
            for s in stacks.values() {
                h.update(s.key.as_bytes());
                h.update(s.revision.as_bytes());
            }
            hex::encode(h.finalize())[..16].to_owned()
        };
        let mut sources = vec![self.file.clone()];
        sources.extend(stacks.values().map(|s| s.template_path.clone()));
        sources.extend(
            stacks
                .values()
                .flat_map(|s| s.nested_templates.iter().cloned()),
        );
        sources.sort();
        sources.dedup();
        let mut warnings: Vec<String> = std::mem::take(&mut self.warnings);
        warnings.extend(stacks.values().flat_map(|s| {
            s.template.unchecked.iter().map(move |u| {
                format!(
                    "stack `{}` (template {}): {u}",
                    s.key,
                    s.template_path.display()
                )
            })
        }));
        Ok(DesiredEnv {
            name: raw.environment,
            file: self.file,
            region: raw.region,
            account_id: raw.account_id,
            owner: raw.owner,
            assume_role: raw.assume_role,
            stack_name_prefix: raw.stack_name_prefix,
            alerts: raw.alerts.map(|a| Alerts {
                sns_topic_arn: a.sns_topic_arn,
                repeat_after: a.repeat_after.map_or(DEFAULT_ALERT_REPEAT, |d| d.0),
            }),
            policy,
            stacks,
            waves,
            revision,
            sources,
            warnings,
        })
    }

    /// Every duration is bounded at load time, so that nothing downstream
    /// (deadlines, sleeps, backoff) can overflow on a value that validated.
    fn check_duration(
        &mut self,
        doc: &Document,
        path: &str,
        d: Duration,
        (min, max): (Duration, Duration),
    ) {
        if d < min || d > max {
            self.error_at(
                doc,
                path,
                format!(
                    "{} is out of range: must be between {} and {}",
                    humantime::format_duration(d),
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ),
            );
        }
    }

    fn check_environment(&mut self, doc: &Document, raw: &RawEnv) {
        let stem = self.file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if raw.environment != stem {
            self.error_at(
                doc,
                "environment",
                format!(
                    "environment `{}` must match the file name `{stem}`",
                    raw.environment
                ),
            );
        }
        let region_ok = raw.region.split('-').count() >= 3
            && raw
                .region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !region_ok {
            self.error_at(
                doc,
                "region",
                format!("`{}` is not an AWS region", raw.region),
            );
        }
        if let Some(a) = &raw.account_id
            && (a.len() != 12 || !a.chars().all(|c| c.is_ascii_digit()))
        {
            self.error_at(
                doc,
                "account_id",
                format!("`{a}` is not a 12-digit AWS account id (quote it in YAML)"),
            );
        }
        if let Some(r) = &raw.assume_role
            && !r.role_arn.starts_with("arn:aws")
        {
            self.error_at(
                doc,
                "assume_role.role_arn",
                format!("`{}` is not a role ARN", r.role_arn),
            );
        }
        if let Some(o) = &raw.owner {
            let ok = !o.trim().is_empty()
                && o.chars().count() <= 256
                && o.chars()
                    .all(|c| c.is_alphanumeric() || c == ' ' || "_.:/=+-@".contains(c));
            if !ok {
                self.error_at(
                    doc,
                    "owner",
                    format!("`{o}` is not a valid tag value (1 to 256 letters, digits, spaces and _.:/=+-@)"),
                );
            }
        }
        if raw.policy.prune && raw.owner.is_none() {
            self.error_at(
                doc,
                "policy.prune",
                "prune needs a top-level `owner:` (a name no other deployment in the account uses): \
                 the environment tag alone is shared by every checkout with this environment name",
            );
        }
        if let Some(a) = &raw.alerts
            && !a.sns_topic_arn.starts_with("arn:aws")
        {
            self.error_at(
                doc,
                "alerts.sns_topic_arn",
                format!("`{}` is not an SNS topic ARN", a.sns_topic_arn),
            );
        }
    }

    fn load_template(
        &mut self,
        doc: &Document,
        key: &str,
        rel: &str,
        literals: &BTreeMap<String, Option<String>>,
    ) -> Option<(PathBuf, String, Template)> {
        let path = normalize(&self.dir.join(rel));
        let field = format!("stacks.{key}.template");
        let body = self.read_template(doc, &field, &path)?;
        let t = self.parse_template(key, &path, &body, literals)?;
        let mut package = Package::default();
        let (body, t) =
            self.package(doc, &field, key, &path, body, t, literals, 0, &mut package)?;
        self.check_template_limits(doc, &field, &path, &body, &t);
        if let Some(store) = &self.artifacts
            && (store.always || body.len() > limits::TEMPLATE_BODY_BYTES)
        {
            let a = store.artifact(&self.region, path.clone(), body.clone());
            package.template_url = Some(a.url.clone());
            package.artifacts.push(a);
        }
        self.packages.insert(key.to_owned(), package);
        Some((path, body, t))
    }

    /// Reads a template file that must resolve inside the repository;
    /// errors are reported at `field` of the desired-state file.
    fn read_template(&mut self, doc: &Document, field: &str, path: &Path) -> Option<String> {
        let resolved = match std::fs::canonicalize(path) {
            Ok(p) => p,
            Err(e) => {
                let msg = format!("cannot read template {}: {e}", path.display());
                self.error_at(doc, field, msg);
                return None;
            }
        };
        if let Some(root) = &self.template_root
            && !resolved.starts_with(root)
        {
            let msg = format!(
                "template {} resolves to {}, outside the repository {}; set \
                 `allow_templates_outside_repository: true` to allow it",
                path.display(),
                resolved.display(),
                root.display()
            );
            self.error_at(doc, field, msg);
            return None;
        }
        // The resolved path is read, so a symlink swapped after the check
        // cannot point the read elsewhere.
        match crate::files::read_text(&resolved, crate::files::MAX_TEMPLATE_BYTES) {
            Ok(b) => Some(b),
            Err(e) => {
                let msg = format!("cannot read template {}: {e}", path.display());
                self.error_at(doc, field, msg);
                None
            }
        }
    }

    /// Parses a template; errors are reported in the template's own file.
    fn parse_template(
        &mut self,
        key: &str,
        path: &Path,
        body: &str,
        literals: &BTreeMap<String, Option<String>>,
    ) -> Option<Template> {
        match Template::parse_with(body, literals) {
            Ok(t) => Some(t),
            Err(e) => {
                self.errors.push(SpecError {
                    file: path.to_owned(),
                    pos: if e.pos.line == 0 {
                        Pos { line: 1, column: 1 }
                    } else {
                        e.pos
                    },
                    path: e.path,
                    message: format!("template of stack `{key}`: {}", e.message),
                });
                None
            }
        }
    }

    /// Packages the local nested templates of `t` (read from `path`), as
    /// `aws cloudformation package` does: each is read, packaged in turn,
    /// and put in the artifact bucket under its content hash, and its
    /// `TemplateURL` is replaced by the object's URL. The template sent is
    /// then the rewritten one (as JSON); its revision covers the nested
    /// templates through their URLs. Without nested local templates the
    /// template is sent as written.
    #[allow(clippy::too_many_arguments)]
    fn package(
        &mut self,
        doc: &Document,
        field: &str,
        key: &str,
        path: &Path,
        body: String,
        t: Template,
        literals: &BTreeMap<String, Option<String>>,
        depth: usize,
        package: &mut Package,
    ) -> Option<(String, Template)> {
        let nested = crate::artifacts::local_nested(&t.canonical);
        if nested.is_empty() {
            return Some((body, t));
        }
        let Some(store) = self.artifacts.clone() else {
            let (id, url) = &nested[0];
            self.error_at(
                doc,
                field,
                format!(
                    "template {}: nested stack `{id}` has the local TemplateURL `{url}`; CloudFormation reads nested templates from S3: set `artifacts: {{bucket: ...}}` so stackwarden uploads it (as aws cloudformation package does)",
                    path.display()
                ),
            );
            // Its other faults (its size) are still worth reporting.
            return Some((body, t));
        };
        if depth >= MAX_NESTED_DEPTH {
            self.error_at(
                doc,
                field,
                format!(
                    "template {}: local nested templates go deeper than {MAX_NESTED_DEPTH} levels",
                    path.display()
                ),
            );
            return None;
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let mut urls = BTreeMap::new();
        for (id, rel) in nested {
            let child_path = normalize(&base.join(&rel));
            let child = self.read_template(doc, field, &child_path)?;
            // A nested template's parameters come from its parent's
            // `Parameters` property, not from the desired state.
            let child_t = self.parse_template(key, &child_path, &child, &BTreeMap::new())?;
            let (child, child_t) = self.package(
                doc,
                field,
                key,
                &child_path,
                child,
                child_t,
                &BTreeMap::new(),
                depth + 1,
                package,
            )?;
            self.check_template_limits(doc, field, &child_path, &child, &child_t);
            let a = store.artifact(&self.region, child_path.clone(), child);
            urls.insert(id, a.url.clone());
            package.sources.push(child_path);
            if !package.artifacts.iter().any(|x| x.key == a.key) {
                package.artifacts.push(a);
            }
        }
        let rewritten = crate::artifacts::rewrite(&t.canonical, &urls);
        let body = serde_json::to_string_pretty(&rewritten).expect("JSON values serialize");
        let t = self.parse_template(key, path, &body, literals)?;
        Some((body, t))
    }

    /// What CloudFormation refuses of a template, refused here first, with
    /// the limit named: otherwise every pass would fail at CreateChangeSet.
    fn check_template_limits(
        &mut self,
        doc: &Document,
        field: &str,
        path: &Path,
        body: &str,
        t: &Template,
    ) {
        let shown = path.display().to_string();
        if body.len() > limits::TEMPLATE_BODY_BYTES && self.artifacts.is_none() {
            self.error_at(
                doc,
                field,
                format!(
                    "template {shown} is {} bytes; CloudFormation takes at most {} bytes in a request (TemplateBody): set `artifacts: {{bucket: ...}}` so stackwarden uploads it to S3 and passes its URL (up to {} bytes), or split it into nested stacks",
                    body.len(),
                    limits::TEMPLATE_BODY_BYTES,
                    limits::TEMPLATE_URL_BYTES
                ),
            );
        } else if body.len() > limits::TEMPLATE_URL_BYTES {
            self.error_at(
                doc,
                field,
                format!(
                    "template {shown} is {} bytes; CloudFormation reads at most {} bytes from S3 (TemplateURL): split it into nested stacks",
                    body.len(),
                    limits::TEMPLATE_URL_BYTES
                ),
            );
        } else if body.len() > limits::TEMPLATE_BODY_BYTES * 4 / 5 && self.artifacts.is_none() {
            self.warnings.push(format!(
                "template {shown} is {} bytes, near the {}-byte limit of a template sent in the request: set `artifacts: {{bucket: ...}}` before it grows past it",
                body.len(),
                limits::TEMPLATE_BODY_BYTES
            ));
        }
        for (what, count, limit) in [
            ("resources", t.resources.len(), limits::RESOURCES),
            ("parameters", t.parameters.len(), limits::PARAMETERS),
            ("outputs", t.outputs.len(), limits::OUTPUTS),
        ] {
            if count > limit {
                self.error_at(
                    doc,
                    field,
                    format!(
                        "template {shown} declares {count} {what}; CloudFormation allows at most {limit}"
                    ),
                );
            }
        }
    }

    fn check_parameters(
        &mut self,
        doc: &Document,
        key: &str,
        given: &BTreeMap<String, Value>,
        template: &Template,
        templates: &BTreeMap<String, (PathBuf, String, Template)>,
        depends_on: &mut BTreeSet<String>,
    ) {
        for (name, value) in given {
            let path = format!("stacks.{key}.parameters.{name}");
            if !template.parameters.contains_key(name) {
                let declared: Vec<&str> = template.parameters.keys().map(String::as_str).collect();
                self.error_at(
                    doc,
                    &path,
                    format!(
                        "parameter `{name}` is not declared by the template (declared: {})",
                        declared.join(", ")
                    ),
                );
                continue;
            }
            self.check_reference(doc, &path, value, key, templates, depends_on);
            // Values from outputs are known only at apply time; literals are
            // checked now, as CloudFormation would check them.
            if let Value::Literal(v) = value
                && let Err(e) = template.parameters[name].check(v)
            {
                self.error_at(doc, &path, e);
            }
        }
        for (name, p) in &template.parameters {
            if let (false, Some(d)) = (given.contains_key(name), &p.default)
                && let Err(e) = p.check(d)
            {
                let msg = format!("the template's default of parameter `{name}`: {e}");
                self.error_at(doc, &format!("stacks.{key}"), msg);
            }
        }
        let missing: Vec<&str> = template
            .parameters
            .iter()
            .filter(|(n, p)| p.default.is_none() && !given.contains_key(*n))
            .map(|(n, _)| n.as_str())
            .collect();
        if !missing.is_empty() {
            let path = if given.is_empty() {
                format!("stacks.{key}")
            } else {
                format!("stacks.{key}.parameters")
            };
            self.error_at(
                doc,
                &path,
                format!(
                    "template parameter{} without a default not given: {}",
                    if missing.len() > 1 { "s" } else { "" },
                    missing.join(", ")
                ),
            );
        }
    }

    fn check_reference(
        &mut self,
        doc: &Document,
        path: &str,
        value: &Value,
        key: &str,
        templates: &BTreeMap<String, (PathBuf, String, Template)>,
        depends_on: &mut BTreeSet<String>,
    ) {
        let Value::Output { stack, output } = value else {
            return;
        };
        match templates.get(stack) {
            // The stack exists but did not load: its own error says why.
            None if self.declared.contains(stack) => {}
            None => self.error_at(
                doc,
                path,
                format!("output reference names unknown stack `{stack}`"),
            ),
            // Outputs a transform generates are known to CloudFormation
            // only: the template's notes say the check was skipped.
            Some((tpath, _, t)) if !t.outputs.contains(output) && t.fully_known() => self.error_at(
                doc,
                path,
                format!(
                    "stack `{stack}` has no output `{output}` (its template {} declares: {})",
                    tpath.display(),
                    t.outputs
                        .iter()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            Some(_) => {
                if stack != key {
                    depends_on.insert(stack.clone());
                }
            }
        }
    }

    /// Each stack's drift settings: the environment's, overridden by the
    /// stack's own. Every ignore entry must name a declared stack and a
    /// resource of its template.
    fn check_drift(
        &mut self,
        doc: &Document,
        env: Option<&RawDrift>,
        stacks: &BTreeMap<String, RawStack>,
        templates: &BTreeMap<String, (PathBuf, String, Template)>,
    ) -> BTreeMap<String, crate::drift::DriftSettings> {
        use crate::drift::{DriftSettings, INTERVAL_RANGE, Ignore};
        let mut out: BTreeMap<String, DriftSettings> = BTreeMap::new();
        let ignore_in = |this: &mut Loader, key: &str, text: &str, path: &str| -> Option<Ignore> {
            let known = templates.get(key).map(|(_, _, t)| t);
            match Ignore::parse(text) {
                Err(e) => this.error_at(doc, path, e),
                Ok(i)
                    if known.is_some_and(|t| {
                        t.fully_known() && !t.resources.contains_key(&i.logical_id)
                    }) =>
                {
                    this.error_at(
                        doc,
                        path,
                        format!("stack `{key}` has no resource `{}`", i.logical_id),
                    );
                }
                Ok(i) => return Some(i),
            }
            None
        };
        let env_mode = env.and_then(|d| d.mode).unwrap_or_default();
        let env_interval = env
            .and_then(|d| d.interval)
            .map_or(crate::drift::DEFAULT_INTERVAL, |d| d.0);
        if let Some(d) = env.and_then(|d| d.interval) {
            self.check_duration(doc, "drift.interval", d.0, INTERVAL_RANGE);
        }
        for (i, entry) in env
            .map(|d| d.ignore.as_slice())
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let path = format!("drift.ignore.{i}");
            match entry.split_once('.') {
                Some((stack, rest)) if stacks.contains_key(stack) => {
                    if let Some(i) = ignore_in(self, stack, rest, &path) {
                        out.entry(stack.to_owned()).or_default().ignore.push(i);
                    }
                }
                Some((stack, _)) => self.error_at(doc, &path, format!("unknown stack `{stack}`")),
                None => self.error_at(
                    doc,
                    &path,
                    format!("`{entry}` must be <stack>.<LogicalId>[.<Property>...]"),
                ),
            }
        }
        for (key, s) in stacks {
            let own = s.drift.as_ref();
            if let Some(d) = own.and_then(|d| d.interval) {
                let path = format!("stacks.{key}.drift.interval");
                self.check_duration(doc, &path, d.0, INTERVAL_RANGE);
            }
            for (i, entry) in own
                .map(|d| d.ignore.as_slice())
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                let path = format!("stacks.{key}.drift.ignore.{i}");
                if let Some(i) = ignore_in(self, key, entry, &path) {
                    out.entry(key.clone()).or_default().ignore.push(i);
                }
            }
            let settings = out.entry(key.clone()).or_default();
            settings.mode = own.and_then(|d| d.mode).unwrap_or(env_mode);
            settings.interval = own.and_then(|d| d.interval).map_or(env_interval, |d| d.0);
            if settings.mode == crate::drift::DriftMode::Revert && !settings.ignore.is_empty() {
                self.warnings.push(format!(
                    "stack `{key}`: drift mode revert with ignore rules: while any of its drift is ignored, none of it is reverted (a drift-aware change set writes back every drifted property, ignored ones too)"
                ));
            }
        }
        out
    }

    fn check_policy(
        &mut self,
        doc: &Document,
        raw: &RawPolicy,
        stacks: &BTreeMap<String, RawStack>,
        templates: &BTreeMap<String, (PathBuf, String, Template)>,
    ) -> Policy {
        let protect: BTreeSet<String> = match &raw.protect {
            Some(list) => list.clone().into_iter().collect(),
            None => crate::resource_types::default_protected_types()
                .map(str::to_owned)
                .collect(),
        };
        if let Some(list) = &raw.protect {
            for (i, t) in list.iter().enumerate() {
                if t.split("::").count() != 3 || !t.starts_with("AWS::") {
                    self.error_at(
                        doc,
                        &format!("policy.protect.{i}"),
                        format!("`{t}` is not a resource type like AWS::DynamoDB::Table"),
                    );
                }
            }
        }
        let mut allow = BTreeSet::new();
        for (i, entry) in raw.allow_replacement.iter().enumerate() {
            let path = format!("policy.allow_replacement.{i}");
            let Some((stack, logical)) = entry.split_once('.') else {
                self.error_at(
                    doc,
                    &path,
                    format!("`{entry}` must be <stack>.<LogicalResourceId>"),
                );
                continue;
            };
            if !stacks.contains_key(stack) {
                self.error_at(doc, &path, format!("unknown stack `{stack}`"));
            } else if let Some((_, _, t)) = templates.get(stack)
                && t.fully_known()
                && !t.resources.contains_key(logical)
                // `Nested.LogicalId` names a resource inside a nested stack.
                && !logical.split_once('.').is_some_and(|(outer, _)| {
                    t.resources.get(outer).is_some_and(|r| {
                        crate::cloud::NESTED_STACK_TYPES.contains(&r.kind.as_str())
                    })
                })
            {
                self.error_at(
                    doc,
                    &path,
                    format!("stack `{stack}` has no resource `{logical}`"),
                );
            }
            allow.insert((stack.to_owned(), logical.to_owned()));
        }
        let mut rollback_skip = BTreeSet::new();
        for (i, entry) in raw.rollback_skip.iter().enumerate() {
            let path = format!("policy.rollback_skip.{i}");
            match entry.split_once('.') {
                Some((stack, logical)) if stacks.contains_key(stack) && !logical.is_empty() => {
                    rollback_skip.insert((stack.to_owned(), logical.to_owned()));
                }
                Some((stack, _)) if !stacks.contains_key(stack) => {
                    self.error_at(doc, &path, format!("unknown stack `{stack}`"));
                }
                _ => self.error_at(
                    doc,
                    &path,
                    format!("`{entry}` must be <stack>.<LogicalResourceId>"),
                ),
            }
        }
        let mut windows = Vec::new();
        for (i, w) in raw.windows.iter().enumerate() {
            match crate::window::SyncWindow::new(w.kind, &w.schedule, w.duration.0, &w.timezone) {
                Ok(w) => windows.push(w),
                Err(e) => {
                    let key = match e {
                        crate::window::WindowError::Schedule { .. }
                        | crate::window::WindowError::NeverFires(_) => "schedule",
                        crate::window::WindowError::TimeZone(_) => "timezone",
                        crate::window::WindowError::Duration => "duration",
                    };
                    self.error_at(doc, &format!("policy.windows.{i}.{key}"), e.to_string());
                }
            }
        }
        Policy {
            windows: crate::window::Windows(windows),
            mode: raw.mode,
            prune: raw.prune,
            protect,
            allow_replacement: allow,
            allow_prune: raw.allow_prune.iter().cloned().collect(),
            rollback_skip,
            recreate_failed: raw.recreate_failed,
            continue_rollback: raw.continue_rollback,
        }
    }
}

/// The value of `property` (MinCapacity, MaxCapacity) of the template's
/// ECS scalable target, when it is known at load time: a literal, or a
/// parameter given as a literal or defaulted. Also says where it came from.
fn scalable_capacity(
    template: &Template,
    given: &BTreeMap<String, Value>,
    property: &str,
) -> Option<(f64, String)> {
    use serde_json::Value as Json;
    let target = template.resources.values().find(|r| {
        r.kind == "AWS::ApplicationAutoScaling::ScalableTarget"
            && r.properties.get("ScalableDimension").and_then(Json::as_str)
                == Some("ecs:service:DesiredCount")
    })?;
    let number = |v: &str| v.trim().parse::<f64>().ok();
    match target.properties.get(property)? {
        Json::Number(n) => Some((n.as_f64()?, String::new())),
        Json::String(v) => Some((number(v)?, String::new())),
        Json::Object(m) => {
            let p = m.get("Ref")?.as_str()?;
            let value = match given.get(p) {
                Some(Value::Literal(v)) => v.clone(),
                Some(Value::Output { .. }) => return None,
                None => template.parameters.get(p)?.default.clone()?,
            };
            Some((number(&value)?, format!(" (parameter {p})")))
        }
        _ => None,
    }
}

/// Resolves `.` and `..` lexically, so messages name `templates/x.yaml`
/// rather than `desired-state/../templates/x.yaml`.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// CloudFormation's quotas that a desired state can exceed, as its
/// documentation states them ("CloudFormation quotas" in the User Guide;
/// the Tag data type of the API reference).
pub mod limits {
    /// A template passed in the request (TemplateBody), in bytes.
    pub const TEMPLATE_BODY_BYTES: usize = 51_200;
    /// A template read from S3 (TemplateURL), in bytes (1 MB).
    pub const TEMPLATE_URL_BYTES: usize = 1_048_576;
    /// Resources declared in one template.
    pub const RESOURCES: usize = 500;
    /// Parameters declared in one template.
    pub const PARAMETERS: usize = 200;
    /// Outputs declared in one template.
    pub const OUTPUTS: usize = 200;
    /// Tags on one stack.
    pub const STACK_TAGS: usize = 50;
    /// A tag key, in characters.
    pub const TAG_KEY_CHARS: usize = 128;
    /// A tag value, in characters.
    pub const TAG_VALUE_CHARS: usize = 256;
}

fn valid_stack_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 128
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Hash of everything that defines a stack: the template's meaning (not its
/// formatting), parameters as declared, tags, termination protection.
/// What a change set deploys: template, parameters and tags. Termination
/// protection is not part of it: it is a stack setting changed by its own
/// API call, and folding it in would turn a protection toggle into a
/// tags-only change set, which AWS rejects as empty for stacks without
/// taggable resources.
fn stack_revision(
    template: &Template,
    parameters: &BTreeMap<String, Value>,
    tags: &BTreeMap<String, String>,
) -> String {
    let material = serde_json::json!({
        "template": template.canonical,
        "parameters": parameters,
        "tags": tags,
    });
    // serde_json maps are sorted (no preserve_order feature): stable bytes.
    let bytes = serde_json::to_vec(&material).expect("JSON values serialize");
    hex::encode(Sha256::digest(&bytes))[..16].to_owned()
}

/// Topological waves of the stack graph, or the nodes of a cycle.
fn waves(stacks: &BTreeMap<String, DesiredStack>) -> Result<Vec<Vec<String>>, Vec<String>> {
    let mut remaining: BTreeMap<&str, BTreeSet<&str>> = stacks
        .iter()
        .map(|(k, s)| {
            (
                k.as_str(),
                s.depends_on
                    .iter()
                    .map(String::as_str)
                    .filter(|d| stacks.contains_key(*d))
                    .collect(),
            )
        })
        .collect();
    let mut out = Vec::new();
    while !remaining.is_empty() {
        let ready: Vec<&str> = remaining
            .iter()
            .filter(|(_, deps)| deps.is_empty())
            .map(|(k, _)| *k)
            .collect();
        if ready.is_empty() {
            return Err(find_cycle(&remaining));
        }
        for k in &ready {
            remaining.remove(k);
        }
        for deps in remaining.values_mut() {
            for k in &ready {
                deps.remove(k);
            }
        }
        out.push(ready.into_iter().map(str::to_owned).collect());
    }
    Ok(out)
}

fn find_cycle(graph: &BTreeMap<&str, BTreeSet<&str>>) -> Vec<String> {
    // Every remaining node has an unresolved dependency, so walking first
    // dependencies must revisit a node; the loop from there is a cycle.
    let mut path: Vec<&str> = vec![graph.keys().next().copied().expect("non-empty")];
    loop {
        let last = *path.last().expect("non-empty");
        let next = *graph[last]
            .iter()
            .next()
            .expect("every node has a dependency");
        if let Some(i) = path.iter().position(|n| *n == next) {
            let mut cycle: Vec<String> = path[i..].iter().map(|s| (*s).to_owned()).collect();
            cycle.push(next.to_owned());
            return cycle;
        }
        path.push(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
    }

    const TEMPLATE_A: &str = "Parameters:\n  Env: {Type: String}\n  Size: {Type: Number, Default: 1}\nResources:\n  T: {Type: 'AWS::DynamoDB::Table'}\nOutputs:\n  TableName: {Value: !Ref T}\n";
    const TEMPLATE_B: &str = "Parameters:\n  Table: {Type: String}\nResources:\n  Q: {Type: 'AWS::SQS::Queue'}\nOutputs:\n  QueueUrl: {Value: !Ref Q}\n";

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("templates")).unwrap();
            std::fs::create_dir(dir.path().join("desired-state")).unwrap();
            std::fs::write(dir.path().join("templates/a.yaml"), TEMPLATE_A).unwrap();
            std::fs::write(dir.path().join("templates/b.yaml"), TEMPLATE_B).unwrap();
            Fixture { dir }
        }

        fn load(&self, env: &str, text: &str) -> Result<DesiredEnv, SpecErrors> {
            let path = self.dir.path().join(format!("desired-state/{env}.yaml"));
            std::fs::write(&path, text).unwrap();
            load(&path)
        }

        /// Writes `templates/<name>`.
        fn template(&self, name: &str, body: &str) {
            std::fs::write(self.dir.path().join("templates").join(name), body).unwrap();
        }

        /// Errors rendered with the fixture folder stripped, one per line.
        fn errors(&self, env: &str, text: &str) -> Vec<String> {
            let errs = self.load(env, text).expect_err("should be refused");
            let root = format!("{}/", self.dir.path().display());
            errs.0
                .iter()
                .map(|e| e.to_string().replace(&root, ""))
                .collect()
        }
    }

    const GOOD: &str = "\
environment: dev
region: us-east-1
account_id: \"123456789012\"
stack_name_prefix: dev-app
tags: {Team: platform}
stacks:
  data:
    template: ../templates/a.yaml
    parameters: {Env: dev}
  queue:
    template: ../templates/b.yaml
    parameters:
      Table: {output: data.TableName}
";

    #[test]
    fn durations_are_bounded_at_load_time() {
        let text = GOOD.replace(
            "tags: {Team: platform}\n",
            "tags: {Team: platform}\noperation_timeout: 500000000000y\n",
        );
        let errs = Fixture::new().errors("dev", &text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("desired-state/dev.yaml:6:1: operation_timeout:")
                && errs[0].contains("must be between 1m and 3days"),
            "{errs:?}"
        );
        let text = GOOD.replace(
            "parameters: {Env: dev}",
            "parameters: {Env: dev}\n    timeout: 0s",
        );
        let errs = Fixture::new().errors("dev", &text);
        assert!(
            errs[0].contains("stacks.data.timeout: 0s is out of range"),
            "{errs:?}"
        );
    }

    #[test]
    fn prune_needs_an_owner_and_the_owner_is_tagged() {
        let pruning = GOOD.replace(
            "tags: {Team: platform}\n",
            "tags: {Team: platform}\npolicy: {prune: true}\n",
        );
        let errs = Fixture::new().errors("dev", &pruning);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("desired-state/dev.yaml:6:")
                && errs[0].contains("policy.prune: prune needs a top-level `owner:`"),
            "{errs:?}"
        );
        let owned = pruning.replace("region:", "owner: team-a/app\nregion:");
        let env = Fixture::new().load("dev", &owned).unwrap();
        assert_eq!(env.owner.as_deref(), Some("team-a/app"));
        let tags = env.stacks["data"].tags_with_ownership(&env.name);
        assert_eq!(tags[OWNER_TAG], "team-a/app");
        let bad = owned.replace("owner: team-a/app", "owner: '<team>'");
        let errs = Fixture::new().errors("dev", &bad);
        assert!(
            errs[0].contains("owner: `<team>` is not a valid tag value"),
            "{errs:?}"
        );
    }

    #[test]
    fn rollback_skip_names_a_declared_stack_and_a_resource() {
        let text = GOOD.replace(
            "tags: {Team: platform}\n",
            "tags: {Team: platform}\npolicy: {rollback_skip: [data.T, nowhere.X, data]}\n",
        );
        let errs = Fixture::new().errors("dev", &text);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].contains("policy.rollback_skip.1: unknown stack `nowhere`"),
            "{errs:?}"
        );
        assert!(
            errs[1].contains("policy.rollback_skip.2: `data` must be <stack>.<LogicalResourceId>"),
            "{errs:?}"
        );
    }

    #[test]
    fn change_sets_of_templates_with_nested_stacks_include_them() {
        let f = Fixture::new();
        let nested = "Resources:\n  Inner:\n    Type: AWS::CloudFormation::Stack\n    Properties: {TemplateURL: https://example.com/t.yaml}\n";
        f.template("n.yaml", nested);
        let text = "environment: dev\nregion: us-east-1\nstack_name_prefix: dev\nstacks:\n  outer: {template: ../templates/n.yaml}\n  plain: {template: ../templates/b.yaml, parameters: {Table: t}}\n";
        let env = f.load("dev", text).unwrap();
        let request = |key: &str| {
            env.stacks[key].change_set_request(
                "dev",
                "cs".into(),
                crate::cloud::ChangeSetKind::Create,
                BTreeMap::new(),
                String::new(),
            )
        };
        assert!(request("outer").include_nested_stacks);
        assert!(!request("plain").include_nested_stacks);
    }

    #[test]
    fn a_byte_order_mark_is_accepted() {
        let env = Fixture::new()
            .load("dev", &format!("\u{feff}{GOOD}"))
            .unwrap();
        assert_eq!(env.stacks.len(), 2);
    }

    #[test]
    fn duplicate_keys_and_second_documents_are_reported_where_they_are() {
        let text = GOOD.replace(
            "region: us-east-1\n",
            "region: us-east-1\nregion: eu-west-1\n",
        );
        let errs = Fixture::new().errors("dev", &text);
        assert!(
            errs[0].starts_with("desired-state/dev.yaml:3:1: region:"),
            "{errs:?}"
        );
        let errs = Fixture::new().errors("dev", &format!("{GOOD}---\nx: 1\n"));
        assert!(
            errs[0].starts_with("desired-state/dev.yaml:14:1:"),
            "{errs:?}"
        );
        let bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n\
                    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n\
                    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n\
                    g: [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n";
        let errs = Fixture::new().errors("dev", bomb);
        assert!(
            errs[0].starts_with("desired-state/dev.yaml:2:8:"),
            "{errs:?}"
        );
    }

    #[test]
    fn special_and_oversized_files_are_refused_with_the_limit_named() {
        let f = Fixture::new();
        let c = std::ffi::CString::new(
            f.dir
                .path()
                .join("templates/pipe.yaml")
                .as_os_str()
                .as_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let errs = f.errors(
            "dev",
            &GOOD.replace("templates/a.yaml", "templates/pipe.yaml"),
        );
        assert!(errs[0].contains("not a regular file (a FIFO)"), "{errs:?}");
        let big = format!("{TEMPLATE_A}# {}\n", "x".repeat(1024 * 1024));
        f.template("big.yaml", &big);
        let errs = f.errors(
            "dev",
            &GOOD.replace("templates/a.yaml", "templates/big.yaml"),
        );
        assert!(
            errs[0].contains("larger than the limit of 1048576 bytes"),
            "{errs:?}"
        );
    }

    #[test]
    fn what_cloudformation_would_refuse_is_refused_with_the_limit_named() {
        let f = Fixture::new();
        // Over 51,200 bytes: every CreateChangeSet would be refused.
        let padded = format!(
            "{TEMPLATE_A}# {}\n",
            "x".repeat(limits::TEMPLATE_BODY_BYTES)
        );
        f.template("padded.yaml", &padded);
        let errs = f.errors(
            "dev",
            &GOOD.replace("templates/a.yaml", "templates/padded.yaml"),
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("stacks.data.template") && e.contains("at most 51200 bytes")),
            "{errs:?}"
        );
        // 501 resources, 201 parameters, 201 outputs.
        let mut t = String::from("Parameters:\n  Env: {Type: String}\n");
        for i in 0..200 {
            t.push_str(&format!("  P{i}: {{Type: String, Default: x}}\n"));
        }
        t.push_str("Resources:\n");
        for i in 0..501 {
            t.push_str(&format!("  T{i}: {{Type: 'AWS::SNS::Topic'}}\n"));
        }
        t.push_str("Outputs:\n  TableName: {Value: x}\n");
        for i in 0..200 {
            t.push_str(&format!("  O{i}: {{Value: x}}\n"));
        }
        f.template("many.yaml", &t);
        let errs = f
            .errors(
                "dev",
                &GOOD.replace("templates/a.yaml", "templates/many.yaml"),
            )
            .join("\n");
        for want in [
            "declares 501 resources; CloudFormation allows at most 500",
            "declares 201 parameters; CloudFormation allows at most 200",
            "declares 201 outputs; CloudFormation allows at most 200",
        ] {
            assert!(errs.contains(want), "{want}: {errs}");
        }
        // Tags: 49 declared plus stackwarden's own (revision, environment).
        let tags: Vec<String> = (0..49).map(|i| format!("T{i}: v")).collect();
        let errs = f
            .errors(
                "dev",
                &GOOD.replace(
                    "tags: {Team: platform}",
                    &format!("tags: {{{}}}", tags.join(", ")),
                ),
            )
            .join("\n");
        assert!(
            errs.contains("49 tags plus stackwarden's 2 exceed CloudFormation's limit of 50 tags"),
            "{errs}"
        );
        let long = "k".repeat(129);
        let errs = f
            .errors(
                "dev",
                &GOOD.replace("tags: {Team: platform}", &format!("tags: {{{long}: v}}")),
            )
            .join("\n");
        assert!(errs.contains("must be 1 to 128 characters"), "{errs}");
    }

    #[test]
    fn template_errors_name_their_line_column_and_node() {
        let f = Fixture::new();
        let cases = [
            (
                "Resources:\n  Q:\n    Type: {Ref: X}\n",
                "3:5: Resources.Q.Type: template of stack `data`: the Type of resource `Q` must be a string such as AWS::SQS::Queue, not the function Ref",
            ),
            (
                "Resources:\n  Q:\n    Properties: {}\n",
                "2:3: Resources.Q: template of stack `data`: resource `Q` has no Type",
            ),
            (
                "Parameters:\n  Env: {Default: x}\nResources:\n  Q: {Type: 'AWS::SQS::Queue'}\n",
                "2:3: Parameters.Env: template of stack `data`: parameter `Env` has no Type",
            ),
            (
                "Resources:\n  Q:\n    Type: AWS::SQS::Queue\n    Properties:\n      QueueName: !Module x\n",
                "5:7: Resources.Q.Properties.QueueName: template of stack `data`: unknown tag !Module",
            ),
            (
                "Transform: AWS::LanguageExtensions\nResources:\n  Q1: {Type: 'AWS::SQS::Queue'}\n  Fn::ForEach::Q:\n    - N\n    - ['1']\n    - Q${N}: {Type: 'AWS::SQS::Queue'}\n",
                "4:3: Resources.Fn::ForEach::Q: template of stack `data`: the loop generates `Q1`, which is already declared",
            ),
            (
                "Transform: AWS::LanguageExtensions\nResources:\n  Fn::ForEach::Q:\n    - N\n    - [a]\n    - Fixed: {Type: 'AWS::SQS::Queue'}\n",
                "6:7: Resources.Fn::ForEach::Q.2.Fixed: template of stack `data`: output key `Fixed` must contain ${N} or &{N}",
            ),
            (
                "Resources:\n  Fn::ForEach::Q: [N, [a], {'Q${N}': {Type: 'AWS::SQS::Queue'}}]\n",
                "2:3: Resources.Fn::ForEach::Q: template of stack `data`: `Fn::ForEach::Q` needs `Transform: AWS::LanguageExtensions` in the template",
            ),
        ];
        for (template, want) in cases {
            f.template("bad.yaml", template);
            let errs = f.errors(
                "dev",
                &GOOD.replace("templates/a.yaml", "templates/bad.yaml"),
            );
            assert!(
                errs.iter()
                    .any(|e| e.starts_with(&format!("templates/bad.yaml:{want}"))),
                "{want}\n{errs:#?}"
            );
        }
    }

    #[test]
    fn transforms_stackwarden_does_not_expand_pass_with_the_checks_they_skip_named() {
        let f = Fixture::new();
        f.template("sam.yaml", "Transform: AWS::Serverless-2016-10-31\nParameters:\n  Env: {Type: String}\nResources:\n  Fn:\n    Type: AWS::Serverless::Function\n    Properties: {Runtime: python3.12, Handler: i.h, InlineCode: x}\n  Fn::Transform:\n    Name: AWS::Include\n    Parameters: {Location: 's3://bucket/more.yaml'}\n");
        // `data.TableName` is not declared: what the transforms generate may
        // declare it, so the reference is not refused.
        let env = f
            .load(
                "dev",
                &GOOD.replace("templates/a.yaml", "templates/sam.yaml"),
            )
            .unwrap();
        let warnings = env.warnings.join("\n");
        assert!(
            warnings.contains("stack `data`")
                && warnings.contains(
                    "transform AWS::Serverless-2016-10-31 is processed by CloudFormation"
                )
                && warnings.contains("Resources.Fn::Transform is processed by CloudFormation"),
            "{warnings}"
        );
        assert_eq!(
            env.stacks["data"]
                .template
                .resources
                .keys()
                .collect::<Vec<_>>(),
            ["Fn"]
        );
    }

    #[test]
    fn a_loop_over_a_parameter_expands_with_the_given_value() {
        let f = Fixture::new();
        f.template("loop.yaml", "Transform: AWS::LanguageExtensions\nParameters:\n  Env: {Type: CommaDelimitedList}\nResources:\n  Fn::ForEach::T:\n    - E\n    - !Ref Env\n    - Table${E}: {Type: 'AWS::DynamoDB::Table'}\nOutputs:\n  Fn::ForEach::O:\n    - E\n    - !Ref Env\n    - TableName: {Value: x}\n");
        // Two values would generate `TableName` twice.
        let errs = f.errors(
            "dev",
            &GOOD
                .replace("templates/a.yaml", "templates/loop.yaml")
                .replace("{Env: dev}", "{Env: 'dev,prod'}"),
        );
        assert!(
            errs.iter().any(|e| e.contains("must contain ${E} or &{E}")),
            "{errs:#?}"
        );
        f.template("loop.yaml", "Transform: AWS::LanguageExtensions\nParameters:\n  Env: {Type: CommaDelimitedList}\nResources:\n  Fn::ForEach::T:\n    - E\n    - !Ref Env\n    - Table${E}: {Type: 'AWS::DynamoDB::Table'}\nOutputs:\n  Fn::ForEach::O:\n    - E\n    - !Ref Env\n    - ${E}TableName: {Value: x}\n");
        let text = GOOD
            .replace("templates/a.yaml", "templates/loop.yaml")
            .replace("{Env: dev}", "{Env: 'dev,prod'}");
        // `data.TableName` is not generated (devTableName, prodTableName are).
        let errs = f.errors("dev", &text);
        assert!(
            errs.iter().any(|e| e.contains(
                "stack `data` has no output `TableName` (its template templates/loop.yaml declares: devTableName, prodTableName)"
            )),
            "{errs:#?}"
        );
        let env = f
            .load("dev", &text.replace("data.TableName", "data.prodTableName"))
            .unwrap();
        assert_eq!(
            env.stacks["data"]
                .template
                .resources
                .keys()
                .collect::<Vec<_>>(),
            ["Tabledev", "Tableprod"]
        );
        assert!(env.warnings.is_empty(), "{:?}", env.warnings);
    }

    #[test]
    fn a_loop_over_another_stacks_output_waits_for_its_value_not_the_default() {
        let f = Fixture::new();
        f.template("b.yaml", "Transform: AWS::LanguageExtensions\nParameters:\n  Table: {Type: CommaDelimitedList, Default: fallback}\nResources:\n  Fn::ForEach::Q:\n    - T\n    - !Ref Table\n    - Queue${T}: {Type: 'AWS::SQS::Queue'}\n");
        let env = f.load("dev", GOOD).unwrap();
        let queue = &env.stacks["queue"].template;
        assert!(queue.resources.is_empty(), "{:?}", queue.resources);
        assert!(!queue.fully_known());
        assert!(
            env.warnings
                .iter()
                .any(|w| w.contains("stack `queue`") && w.contains("Table")),
            "{:?}",
            env.warnings
        );
    }

    #[test]
    fn templates_must_stay_inside_the_repository() {
        let f = Fixture::new();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("t.yaml"), TEMPLATE_A).unwrap();
        let link = f.dir.path().join("templates/link.yaml");
        std::os::unix::fs::symlink(outside.path().join("t.yaml"), &link).unwrap();
        for rel in ["templates/link.yaml", "../../../../../../../etc/passwd"] {
            let text = GOOD.replace("../templates/a.yaml", &format!("../{rel}"));
            let errs = f.errors("dev", &text);
            assert!(
                errs[0].contains("stacks.data.template:")
                    && errs[0].contains("outside the repository"),
                "{errs:?}"
            );
        }
        let text = GOOD.replace(
            "tags: {Team: platform}\n",
            "tags: {Team: platform}\nallow_templates_outside_repository: true\n",
        );
        let text = text.replace("../templates/a.yaml", "../templates/link.yaml");
        assert!(f.load("dev", &text).is_ok());
    }

    #[test]
    fn parameter_values_are_checked_against_the_template() {
        let text = GOOD.replace(
            "parameters: {Env: dev}",
            "parameters: {Env: dev, Size: forty-five}",
        );
        let errs = Fixture::new().errors("dev", &text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("desired-state/dev.yaml:9:")
                && errs[0].contains("stacks.data.parameters.Size: `forty-five` is not a Number"),
            "{errs:?}"
        );
        let text = GOOD.replace(
            "parameters: {Env: dev}",
            "parameters: {Env: dev, Size: 1e400}",
        );
        assert!(Fixture::new().errors("dev", &text)[0].contains("is not a Number"));
    }

    #[test]
    fn a_good_file_loads_with_implicit_edges_and_waves() {
        let f = Fixture::new();
        let env = f.load("dev", GOOD).unwrap();
        assert_eq!(
            env.waves,
            vec![vec!["data".to_owned()], vec!["queue".to_owned()]]
        );
        assert_eq!(
            env.stacks["queue"].depends_on,
            BTreeSet::from(["data".to_owned()])
        );
        assert_eq!(env.stacks["data"].name, "dev-app-data");
        assert_eq!(env.stacks["data"].tags["Team"], "platform");
        assert_eq!(env.policy.mode, Mode::Converge);
        assert!(env.policy.protect.contains("AWS::DynamoDB::Table"));
        assert_eq!(env.stacks["data"].timeout, DEFAULT_OPERATION_TIMEOUT);
    }

    #[test]
    fn revision_is_stable_and_ignores_template_formatting() {
        let f = Fixture::new();
        let r1 = f.load("dev", GOOD).unwrap().revision;
        assert_eq!(r1, f.load("dev", GOOD).unwrap().revision);
        let reformatted = format!(
            "# a comment\n{}",
            TEMPLATE_A.replace("{Type: String}", "\n    Type: String")
        );
        f.template("a.yaml", &reformatted);
        assert_eq!(r1, f.load("dev", GOOD).unwrap().revision);
        let changed = f
            .load("dev", &GOOD.replace("{Env: dev}", "{Env: dev, Size: 2}"))
            .unwrap();
        assert_ne!(r1, changed.revision);
    }

    #[test]
    fn unknown_key_is_an_error_with_its_line() {
        let f = Fixture::new();
        let text = GOOD.replace(
            "    parameters: {Env: dev}\n",
            "    parameters: {Env: dev}\n    colour: blue\n",
        );
        assert_eq!(
            f.errors("dev", &text),
            vec![
                "desired-state/dev.yaml:10:5: stacks.data.colour: unknown field `colour`, expected one of `template`, `name`, `parameters`, `depends_on`, `tags`, `termination_protection`, `timeout`, `ecs_services`, `drift`"
            ]
        );
    }

    #[test]
    fn unknown_top_level_key_is_an_error() {
        let f = Fixture::new();
        let errs = f.errors("dev", &format!("{GOOD}extra: 1\n"));
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with("desired-state/dev.yaml:14:1: extra: unknown field `extra`"),
            "{errs:?}"
        );
    }

    #[test]
    fn missing_template_file_is_reported_at_the_template_key() {
        let f = Fixture::new();
        let errs = f.errors(
            "dev",
            &GOOD.replace("../templates/a.yaml", "../templates/nope.yaml"),
        );
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with(
                "desired-state/dev.yaml:8:5: stacks.data.template: cannot read template"
            ),
            "{errs:?}"
        );
    }

    #[test]
    fn undeclared_parameter_is_reported_at_the_parameter() {
        let f = Fixture::new();
        let errs = f.errors(
            "dev",
            &GOOD.replace("{Env: dev}", "{Env: dev, Colour: red}"),
        );
        assert_eq!(
            errs,
            vec![
                "desired-state/dev.yaml:9:28: stacks.data.parameters.Colour: parameter `Colour` is not declared by the template (declared: Env, Size)"
            ]
        );
    }

    #[test]
    fn missing_required_parameter_is_reported() {
        let f = Fixture::new();
        let errs = f.errors("dev", &GOOD.replace("    parameters: {Env: dev}\n", ""));
        assert_eq!(
            errs,
            vec![
                "desired-state/dev.yaml:7:3: stacks.data: template parameter without a default not given: Env"
            ]
        );
    }

    #[test]
    fn reference_to_a_missing_output_is_reported() {
        let f = Fixture::new();
        let errs = f.errors("dev", &GOOD.replace("data.TableName", "data.TableArn"));
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with("desired-state/dev.yaml:13:7: stacks.queue.parameters.Table: stack `data` has no output `TableArn`"),
            "{errs:?}"
        );
    }

    #[test]
    fn reference_to_an_unknown_stack_is_reported() {
        let f = Fixture::new();
        let errs = f.errors("dev", &GOOD.replace("data.TableName", "nope.TableName"));
        assert_eq!(
            errs,
            vec![
                "desired-state/dev.yaml:13:7: stacks.queue.parameters.Table: output reference names unknown stack `nope`"
            ]
        );
    }

    #[test]
    fn a_cycle_is_reported_with_its_path() {
        let f = Fixture::new();
        let text = GOOD.replace(
            "    parameters: {Env: dev}\n",
            "    parameters: {Env: dev}\n    depends_on: [queue]\n",
        );
        assert_eq!(
            f.errors("dev", &text),
            vec![
                "desired-state/dev.yaml:7:3: stacks.data: dependency cycle: data -> queue -> data"
            ]
        );
    }

    #[test]
    fn all_errors_of_a_file_are_reported_together() {
        let f = Fixture::new();
        let text = GOOD
            .replace("{Env: dev}", "{Env: dev, Colour: red}")
            .replace("data.TableName", "data.Nope")
            .replace("region: us-east-1", "region: moon");
        let errs = f.errors("dev", &text);
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].contains(":2:1: region:"), "{errs:?}");
        assert!(
            errs[1].contains("stacks.data.parameters.Colour"),
            "{errs:?}"
        );
        assert!(
            errs[2].contains("stacks.queue.parameters.Table"),
            "{errs:?}"
        );
    }

    #[test]
    fn a_bad_parameter_value_shape_is_reported() {
        let f = Fixture::new();
        let errs = f.errors("dev", &GOOD.replace("{Env: dev}", "{Env: [a, b]}"));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].contains(
                "stacks.data.parameters.Env: expected a scalar or {output: <stack>.<Output>}"
            ),
            "{errs:?}"
        );
    }

    #[test]
    fn environment_must_match_its_file_name() {
        let f = Fixture::new();
        let errs = f.errors("prod", GOOD);
        assert_eq!(
            errs,
            vec![
                "desired-state/prod.yaml:1:1: environment: environment `dev` must match the file name `prod`"
            ]
        );
    }

    #[test]
    fn invalid_and_duplicate_stack_names_are_reported() {
        let f = Fixture::new();
        let text = GOOD.replace("  queue:\n", "  queue:\n    name: dev-app-data\n");
        let errs = f.errors("dev", &text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].contains("is also used by stack"), "{errs:?}");
        let errs = f.errors("dev", &GOOD.replace("dev-app", "1bad_name"));
        assert_eq!(errs.len(), 2, "{errs:?}");
    }

    #[test]
    fn drift_settings_resolve_per_stack_and_name_real_resources() {
        let f = Fixture::new();
        let text = format!(
            "{GOOD}drift: {{mode: revert, interval: 2h, ignore: [data.T.ProvisionedThroughput]}}\n"
        )
        .replace(
            "    parameters: {Env: dev}\n",
            "    parameters: {Env: dev}\n    drift: {mode: alert, ignore: [T.BillingMode]}\n",
        );
        let env = f.load("dev", &text).unwrap();
        let data = &env.stacks["data"].drift;
        assert_eq!(data.mode, crate::drift::DriftMode::Alert);
        assert_eq!(data.interval, Duration::from_secs(7200));
        let ignored: Vec<String> = data.ignore.iter().map(ToString::to_string).collect();
        assert_eq!(ignored, ["T.ProvisionedThroughput", "T.BillingMode"]);
        let queue = &env.stacks["queue"].drift;
        assert_eq!(queue.mode, crate::drift::DriftMode::Revert);
        assert!(queue.ignore.is_empty());
        assert!(env.warnings.is_empty(), "{:?}", env.warnings);
        // Revert and ignore on one stack: said, since the ignore rule then
        // holds back every revert of the stack.
        let env = f
            .load(
                "dev",
                &text.replace("drift: {mode: alert,", "drift: {mode: revert,"),
            )
            .unwrap();
        assert!(
            env.warnings
                .iter()
                .any(|w| w.starts_with("stack `data`: drift mode revert with ignore rules")),
            "{:?}",
            env.warnings
        );

        let bad = format!("{GOOD}drift:\n  mode: sometimes\n");
        let errs = f.errors("dev", &bad);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("desired-state/dev.yaml:15:"),
            "{errs:?}"
        );
        assert!(errs[0].contains("sometimes"), "{errs:?}");
        let bad = format!(
            "{GOOD}drift:\n  interval: 1s\n  ignore: [data.Missing, nowhere.X, data]\n  every: 1h\n"
        );
        let errs = f.errors("dev", &bad);
        assert_eq!(errs.len(), 1, "unknown key first: {errs:?}");
        assert!(errs[0].contains("every"), "{errs:?}");
        let bad =
            format!("{GOOD}drift:\n  interval: 1s\n  ignore: [data.Missing, nowhere.X, data]\n");
        let errs = f.errors("dev", &bad);
        assert_eq!(
            errs,
            vec![
                "desired-state/dev.yaml:15:3: drift.interval: 1s is out of range: must be between 5m and 7days",
                "desired-state/dev.yaml:16:12: drift.ignore.0: stack `data` has no resource `Missing`",
                "desired-state/dev.yaml:16:26: drift.ignore.1: unknown stack `nowhere`",
                "desired-state/dev.yaml:16:37: drift.ignore.2: `data` must be <stack>.<LogicalId>[.<Property>...]",
            ]
        );
    }

    #[test]
    fn sync_windows_are_checked_where_they_are_written() {
        let f = Fixture::new();
        let text = format!(
            "{GOOD}policy:\n  windows:\n    - {{kind: allow, schedule: \"0 8 * * 1-5\", duration: 10h, timezone: Europe/Berlin}}\n    - {{kind: deny, schedule: \"0 8 * *\", duration: 1h}}\n    - {{kind: deny, schedule: \"0 8 * * *\", duration: 1h, timezone: Europe/Bxl}}\n    - {{kind: maybe, schedule: \"0 8 * * *\", duration: 1h}}\n"
        );
        let errs = f.errors("dev", &text);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].starts_with(
                "desired-state/dev.yaml:19:8: policy.windows.3.kind: unknown variant `maybe`"
            ),
            "{errs:#?}"
        );
        let text = text.replace("kind: maybe", "kind: deny");
        let errs = f.errors("dev", &text);
        assert_eq!(
            errs,
            vec![
                "desired-state/dev.yaml:17:20: policy.windows.1.schedule: invalid cron schedule `0 8 * *`: Invalid pattern: Pattern must have 5 fields when seconds are disallowed. (5 fields: minute hour day-of-month month day-of-week)",
                "desired-state/dev.yaml:18:57: policy.windows.2.timezone: unknown time zone `Europe/Bxl` (an IANA name such as Europe/Berlin or UTC)",
            ]
        );
        let good = text
            .replace("\"0 8 * *\"", "\"0 8 * * *\"")
            .replace("Europe/Bxl", "UTC");
        let env = f.load("dev", &good).expect("loads");
        assert_eq!(env.policy.windows.0.len(), 4);
        assert_eq!(env.policy.windows.0[1].timezone, "UTC");
        assert_eq!(
            env.policy.windows.0[0].describe(),
            "allow `0 8 * * 1-5` for 10h (Europe/Berlin)"
        );
    }

    #[test]
    fn allow_replacement_must_name_a_real_resource() {
        let f = Fixture::new();
        let text = format!("{GOOD}policy:\n  allow_replacement: [data.T, data.Missing]\n");
        let errs = f.errors("dev", &text);
        assert_eq!(
            errs,
            vec![
                "desired-state/dev.yaml:15:31: policy.allow_replacement.1: stack `data` has no resource `Missing`"
            ]
        );
    }

    #[test]
    fn a_syntax_error_names_its_line() {
        let f = Fixture::new();
        let errs = f.errors("dev", "environment: dev\nstacks: [\n");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].starts_with("desired-state/dev.yaml:3:"), "{errs:?}");
    }

    #[test]
    fn a_broken_template_names_the_template_file() {
        let f = Fixture::new();
        f.template("b.yaml", "Resources:\n  Q: [\n");
        let errs = f.errors("dev", GOOD);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].starts_with("templates/b.yaml:3:"), "{errs:?}");
    }

    #[test]
    fn dependents_are_transitive() {
        let f = Fixture::new();
        let env = f.load("dev", GOOD).unwrap();
        assert_eq!(
            env.dependents_of("data"),
            BTreeSet::from(["queue".to_owned()])
        );
        assert!(env.dependents_of("queue").is_empty());
    }
}
