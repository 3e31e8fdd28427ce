//! A CloudFormation template as stackwarden needs to know it: its declared
//! parameters (type, default, NoEcho), its outputs, its resources, and a
//! canonical JSON form for semantic comparison.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value as Json;

use crate::language_extensions;
use crate::yaml::{self, YamlError};

/// A declared template parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateParameter {
    pub kind: String,
    /// The default, rendered as AWS echoes it back (lists comma-joined).
    pub default: Option<String>,
    /// NoEcho parameters are never printed and come back from AWS as `****`.
    pub no_echo: bool,
    /// What CloudFormation checks a value against before any change.
    pub constraints: Constraints,
}

/// A parameter's declared constraints (`AllowedValues`, `AllowedPattern`,
/// `MinLength`, `MaxLength`, `MinValue`, `MaxValue`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Constraints {
    pub allowed_values: Option<Vec<String>>,
    pub allowed_pattern: Option<String>,
    pub min_length: Option<f64>,
    pub max_length: Option<f64>,
    pub min_value: Option<f64>,
    pub max_value: Option<f64>,
    pub description: Option<String>,
}

impl Eq for Constraints {}

/// The ids of the AWS-specific parameter types CloudFormation checks the
/// shape of (the prefix every id of the type carries).
const ID_PREFIXES: &[(&str, &str)] = &[
    ("AWS::EC2::Image::Id", "ami-"),
    ("AWS::EC2::Instance::Id", "i-"),
    ("AWS::EC2::SecurityGroup::Id", "sg-"),
    ("AWS::EC2::Subnet::Id", "subnet-"),
    ("AWS::EC2::Volume::Id", "vol-"),
    ("AWS::EC2::VPC::Id", "vpc-"),
];

impl TemplateParameter {
    /// Checks `value` as CloudFormation checks a parameter value before it
    /// creates a change set: its type's shape, then every constraint (for
    /// list types, each element). The message never repeats a NoEcho value.
    ///
    /// # Errors
    /// What is wrong with the value.
    pub fn check(&self, value: &str) -> Result<(), String> {
        let shown = |v: &str| {
            if self.no_echo {
                "the (NoEcho) value".to_owned()
            } else {
                format!("`{v}`")
            }
        };
        let fail = |what: String| {
            Err(match &self.constraints.description {
                Some(d) => format!("{what} ({d})"),
                None => what,
            })
        };
        let kind = self
            .kind
            .strip_prefix("AWS::SSM::Parameter::Value<")
            .map_or(self.kind.as_str(), |_| "AWS::SSM::Parameter::Name");
        let (list, element) = match kind {
            "CommaDelimitedList" => (true, "String"),
            k => match k.strip_prefix("List<").and_then(|r| r.strip_suffix('>')) {
                Some(e) => (true, e),
                None => (false, k),
            },
        };
        let items: Vec<&str> = if list {
            value.split(',').map(str::trim).collect()
        } else {
            vec![value]
        };
        for item in &items {
            match element {
                "Number" => {
                    if !is_number(item) {
                        return fail(format!("{} is not a Number", shown(item)));
                    }
                }
                "AWS::SSM::Parameter::Name" => {
                    if item.is_empty() || item.len() > 2048 {
                        return fail(format!("{} is not an SSM parameter name", shown(item)));
                    }
                }
                k => {
                    if let Some((_, prefix)) = ID_PREFIXES.iter().find(|(t, _)| *t == k) {
                        let rest = item.strip_prefix(prefix).unwrap_or("");
                        if rest.is_empty() || !rest.chars().all(|c| c.is_ascii_hexdigit()) {
                            return fail(format!(
                                "{} is not an {k} (expected {prefix}<hex>)",
                                shown(item)
                            ));
                        }
                    }
                }
            }
            let c = &self.constraints;
            if let Some(allowed) = &c.allowed_values
                && !allowed.iter().any(|a| a == item)
            {
                let listed = if self.no_echo {
                    String::new()
                } else {
                    format!(": {}", allowed.join(", "))
                };
                return fail(format!(
                    "{} is not one of the AllowedValues{listed}",
                    shown(item)
                ));
            }
            if let Some(p) = &c.allowed_pattern
                // A pattern Rust's regex cannot read (CloudFormation uses
                // Java's syntax) is left to CloudFormation to check.
                && let Ok(re) = regex::Regex::new(&format!("^(?:{p})$"))
                && !re.is_match(item)
            {
                return fail(format!(
                    "{} does not match the AllowedPattern `{p}`",
                    shown(item)
                ));
            }
            if element == "Number" {
                let n: f64 = item.parse().unwrap_or(f64::NAN);
                if c.min_value.is_some_and(|m| n < m) || c.max_value.is_some_and(|m| n > m) {
                    return fail(format!(
                        "{} is outside MinValue..MaxValue ({}..{})",
                        shown(item),
                        c.min_value.map_or("".into(), |m| m.to_string()),
                        c.max_value.map_or("".into(), |m| m.to_string())
                    ));
                }
            }
        }
        if !list {
            let len = value.chars().count() as f64;
            let c = &self.constraints;
            if c.min_length.is_some_and(|m| len < m) || c.max_length.is_some_and(|m| len > m) {
                return fail(format!(
                    "the value's length {len} is outside MinLength..MaxLength ({}..{})",
                    c.min_length.map_or("".into(), |m| m.to_string()),
                    c.max_length.map_or("".into(), |m| m.to_string())
                ));
            }
        }
        Ok(())
    }
}

/// A finite decimal number, as CloudFormation's `Number` type takes it.
fn is_number(s: &str) -> bool {
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (body, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |x: &str| x.chars().all(|c| c.is_ascii_digit());
    let mantissa_ok = (!int.is_empty() || !frac.is_empty()) && digits(int) && digits(frac);
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    mantissa_ok && exponent_ok && s.parse::<f64>().is_ok_and(f64::is_finite)
}

/// A declared resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub kind: String,
    pub properties: Json,
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub parameters: BTreeMap<String, TemplateParameter>,
    pub outputs: BTreeSet<String>,
    pub resources: BTreeMap<String, Resource>,
    /// The whole template as long-form JSON: the unit of semantic comparison
    /// (comments, key order, quoting and short/long tag forms do not count).
    pub canonical: Json,
    /// The transforms the template declares, in order.
    pub transforms: Vec<String>,
    /// What stackwarden could not see before CloudFormation processes the
    /// template (a transform it does not expand, a loop over a value known
    /// only at deploy time), one sentence each: `resources` and `outputs`
    /// may then be incomplete, and the checks that read them are skipped.
    pub unchecked: Vec<String>,
}

/// A JSON value's kind, for error messages (an intrinsic by its name).
fn describe(v: &Json) -> String {
    match v {
        Json::Object(m) if m.len() == 1 => {
            format!("the function {}", m.keys().next().expect("one key"))
        }
        Json::Object(_) => "a mapping".into(),
        Json::Array(_) => "a list".into(),
        Json::Null => "nothing".into(),
        Json::Bool(_) => "a boolean".into(),
        Json::Number(_) => "a number".into(),
        Json::String(_) => "a string".into(),
    }
}

/// Whether a template value references parameter `p`, by `Ref` or as
/// `${p}` in an `Fn::Sub`: a change of `p` changes this value.
pub fn references_parameter(v: &Json, p: &str) -> bool {
    fn sub_mentions(v: &Json, p: &str) -> bool {
        match v {
            Json::String(s) => s.contains(&format!("${{{p}}}")),
            Json::Array(a) => a.iter().any(|x| sub_mentions(x, p)),
            _ => false,
        }
    }
    match v {
        Json::Object(m) => {
            m.get("Ref").and_then(Json::as_str) == Some(p)
                || m.get("Fn::Sub").is_some_and(|s| sub_mentions(s, p))
                || m.values().any(|x| references_parameter(x, p))
        }
        Json::Array(a) => a.iter().any(|x| references_parameter(x, p)),
        _ => false,
    }
}

impl Template {
    /// Parses a template body (YAML or JSON), with parameter defaults as the
    /// only values known.
    ///
    /// # Errors
    /// A syntax error, or a document that is not a template (no `Resources`
    /// mapping, a parameter without `Type`, a malformed loop).
    pub fn parse(body: &str) -> Result<Template, YamlError> {
        Template::parse_with(body, &BTreeMap::new())
    }

    /// Parses a template body with the parameter values given for the stack
    /// (over defaults): `AWS::LanguageExtensions` loops over a parameter
    /// expand with its value, as CloudFormation expands them. A parameter
    /// given as `None` has a value not known yet (another stack's output, a
    /// masked NoEcho value): its default does not stand in for it, and the
    /// loops over it are left to CloudFormation (see [`Template::unchecked`]).
    ///
    /// # Errors
    /// As [`Template::parse`].
    pub fn parse_with(
        body: &str,
        given: &BTreeMap<String, Option<String>>,
    ) -> Result<Template, YamlError> {
        let canonical = yaml::parse_template(body)?;
        // Errors name the node at fault; its line and column are found in
        // the text only when there is an error.
        let invalid = |path: String, message: String| {
            yaml::locate(
                body,
                YamlError {
                    pos: Default::default(),
                    path,
                    message,
                },
            )
        };
        let type_of = |section: &str, what: &str, id: &str, node: &Json| match node.get("Type") {
            Some(Json::String(t)) => Ok(t.clone()),
            None => Err(invalid(
                format!("{section}.{id}"),
                format!("{what} `{id}` has no Type"),
            )),
            Some(other) => Err(invalid(
                format!("{section}.{id}.Type"),
                format!(
                    "the Type of {what} `{id}` must be a string such as {}, not {}",
                    if what == "resource" {
                        "AWS::SQS::Queue"
                    } else {
                        "String"
                    },
                    describe(other)
                ),
            )),
        };
        let root = canonical
            .as_object()
            .ok_or_else(|| invalid(String::new(), "a template must be a mapping".into()))?;
        if !matches!(root.get("Resources"), Some(Json::Object(map)) if !map.is_empty()) {
            return Err(invalid(
                "Resources".into(),
                "a template needs a non-empty Resources mapping".into(),
            ));
        }
        let mut parameters = BTreeMap::new();
        if let Some(Json::Object(params)) = root.get("Parameters") {
            for (name, p) in params {
                let kind = type_of("Parameters", "parameter", name, p)?;
                parameters.insert(
                    name.clone(),
                    TemplateParameter {
                        kind,
                        default: p.get("Default").map(render_scalar),
                        no_echo: p.get("NoEcho").is_some_and(|v| {
                            v.as_bool() == Some(true) || v.as_str() == Some("true")
                        }),
                        constraints: constraints(p),
                    },
                );
            }
        }

        let transforms = language_extensions::transforms(&canonical);
        let mut unchecked = Vec::new();
        let processed =
            if transforms
                .iter()
                .any(|t| t == language_extensions::TRANSFORM)
            {
                let mut values: BTreeMap<String, String> = parameters
                    .iter()
                    .filter_map(|(k, p)| Some((k.clone(), p.default.clone()?)))
                    .collect();
                for (k, v) in given {
                    match v {
                        Some(v) => values.insert(k.clone(), v.clone()),
                        None => values.remove(k),
                    };
                }
                let ex = language_extensions::expand(&canonical, &values)
                    .map_err(|e| invalid(e.path, e.message))?;
                unchecked.extend(ex.unresolved.into_iter().map(|u| {
                    format!("loop {u}: what it generates is checked by CloudFormation only")
                }));
                ex.template
            } else {
                canonical.clone()
            };
        for t in transforms
            .iter()
            .filter(|t| *t != language_extensions::TRANSFORM)
        {
            unchecked.push(format!(
                "transform {t} is processed by CloudFormation, not expanded here: the resources and outputs it generates are not checked before the change set (output references, protected resources, the replacement forecast)"
            ));
        }
        let empty = serde_json::Map::new();
        let section = |name: &str| {
            processed
                .get(name)
                .and_then(Json::as_object)
                .unwrap_or(&empty)
        };
        // "The logical ID must be alphanumeric (A-Za-z0-9)"; one a loop
        // generated is reported at its loop, with the remedy.
        let check_id = |section_name: &str, id: &str| -> Result<(), YamlError> {
            if !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Ok(());
            }
            let written = canonical
                .get(section_name)
                .and_then(Json::as_object)
                .is_some_and(|m| m.contains_key(id));
            Err(invalid(
                if written {
                    format!("{section_name}.{id}")
                } else {
                    section_name.to_owned()
                },
                if written {
                    format!("logical id `{id}` must be alphanumeric (A-Z, a-z, 0-9)")
                } else {
                    format!(
                        "a loop generates the logical id `{id}`, which is not alphanumeric (A-Z, a-z, 0-9): write &{{Id}} instead of ${{Id}} in its key to drop the other characters"
                    )
                },
            ))
        };
        let mut resources = BTreeMap::new();
        for (id, r) in section("Resources") {
            if let Some(e) = Self::opaque_key("Resources", id, &transforms, &mut unchecked) {
                return Err(invalid(e.0, e.1));
            }
            if id == "Fn::Transform" {
                continue;
            }
            check_id("Resources", id)?;
            let kind = type_of("Resources", "resource", id, r)?;
            resources.insert(
                id.clone(),
                Resource {
                    kind,
                    properties: r.get("Properties").cloned().unwrap_or(Json::Null),
                },
            );
        }
        let mut outputs = BTreeSet::new();
        for id in section("Outputs").keys() {
            if let Some(e) = Self::opaque_key("Outputs", id, &transforms, &mut unchecked) {
                return Err(invalid(e.0, e.1));
            }
            if id != "Fn::Transform" {
                check_id("Outputs", id)?;
                outputs.insert(id.clone());
            }
        }
        Ok(Template {
            parameters,
            outputs,
            resources,
            canonical,
            transforms,
            unchecked,
        })
    }

    /// A section key that is not a logical id: `Fn::Transform` (an include
    /// or a macro CloudFormation runs; noted as unchecked) or a loop left
    /// by a template without the transform (an error: path and message).
    fn opaque_key(
        section: &str,
        id: &str,
        transforms: &[String],
        unchecked: &mut Vec<String>,
    ) -> Option<(String, String)> {
        if id == "Fn::Transform" {
            unchecked.push(format!(
                "{section}.Fn::Transform is processed by CloudFormation, not expanded here: what it includes is not checked before the change set"
            ));
        } else if id.starts_with("Fn::ForEach")
            && !transforms
                .iter()
                .any(|t| t == language_extensions::TRANSFORM)
        {
            return Some((
                format!("{section}.{id}"),
                format!(
                    "`{id}` needs `Transform: {}` in the template",
                    language_extensions::TRANSFORM
                ),
            ));
        }
        None
    }

    /// Whether `resources` and `outputs` are all the template declares:
    /// nothing is left for CloudFormation to expand.
    pub fn fully_known(&self) -> bool {
        self.unchecked.is_empty()
    }

    /// The parameter values CloudFormation will use: given values over
    /// defaults. Parameters neither given nor defaulted are absent.
    pub fn effective_parameters(
        &self,
        given: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        self.parameters
            .iter()
            .filter_map(|(name, p)| {
                given
                    .get(name)
                    .cloned()
                    .or_else(|| p.default.clone())
                    .map(|v| (name.clone(), v))
            })
            .collect()
    }
}

fn constraints(p: &Json) -> Constraints {
    // Templates write numbers as numbers or as strings ("MinValue: '1'").
    let number = |k: &str| match p.get(k)? {
        Json::Number(n) => n.as_f64(),
        Json::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    Constraints {
        allowed_values: p
            .get("AllowedValues")
            .and_then(Json::as_array)
            .map(|a| a.iter().map(render_scalar).collect()),
        allowed_pattern: p
            .get("AllowedPattern")
            .and_then(Json::as_str)
            .map(str::to_owned),
        min_length: number("MinLength"),
        max_length: number("MaxLength"),
        min_value: number("MinValue"),
        max_value: number("MaxValue"),
        description: p
            .get("ConstraintDescription")
            .and_then(Json::as_str)
            .map(str::to_owned),
    }
}

/// Renders a scalar the way CloudFormation echoes parameter values: strings
/// as they are, numbers and booleans as text, lists comma-joined.
pub fn render_scalar(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Array(items) => items
            .iter()
            .map(render_scalar)
            .collect::<Vec<_>>()
            .join(","),
        Json::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"
Parameters:
  Env: {Type: String}
  Count: {Type: Number, Default: 2}
  Secret: {Type: String, NoEcho: true, Default: x}
  Subnets: {Type: CommaDelimitedList, Default: "a,b"}
Resources:
  T: {Type: "AWS::DynamoDB::Table", Properties: {TableName: !Sub "${Env}-t"}}
Outputs:
  TableName: {Value: !Ref T}
"#;

    #[test]
    fn parameters_outputs_and_resources_are_read() {
        let t = Template::parse(BODY).unwrap();
        assert_eq!(t.parameters["Count"].default.as_deref(), Some("2"));
        assert!(t.parameters["Secret"].no_echo);
        assert!(!t.parameters["Env"].no_echo);
        assert_eq!(t.outputs, BTreeSet::from(["TableName".to_owned()]));
        assert_eq!(t.resources["T"].kind, "AWS::DynamoDB::Table");
    }

    #[test]
    fn effective_parameters_fill_defaults() {
        let t = Template::parse(BODY).unwrap();
        let eff = t.effective_parameters(&BTreeMap::from([("Env".into(), "dev".into())]));
        assert_eq!(eff["Env"], "dev");
        assert_eq!(eff["Count"], "2");
        assert_eq!(eff["Subnets"], "a,b");
    }

    fn param(body: &str) -> TemplateParameter {
        let t = format!("Parameters:\n  P: {body}\nResources:\n  Q: {{Type: AWS::SNS::Topic}}\n");
        Template::parse(&t).unwrap().parameters["P"].clone()
    }

    #[test]
    fn numbers_are_checked_as_cloudformation_does() {
        let p = param("{Type: Number, MinValue: 1, MaxValue: '100'}");
        assert!(p.check("45").is_ok());
        assert!(p.check("4.5e1").is_ok());
        for bad in ["forty-five", "1e400", "", "0x10", "NaN", "inf"] {
            assert!(p.check(bad).is_err(), "{bad}");
        }
        assert!(p.check("0").unwrap_err().contains("MinValue"));
        assert!(p.check("101").unwrap_err().contains("MaxValue"));
        let l = param("{Type: List<Number>}");
        assert!(l.check("1,2, 3").is_ok());
        assert!(l.check("1,two").unwrap_err().contains("`two`"));
    }

    #[test]
    fn string_constraints_are_checked() {
        let p = param(
            "{Type: String, AllowedPattern: '[a-z]+', MinLength: 2, MaxLength: 4, \
             ConstraintDescription: lower-case letters}",
        );
        assert!(p.check("abc").is_ok());
        let e = p.check("ABC").unwrap_err();
        assert!(
            e.contains("AllowedPattern") && e.contains("lower-case letters"),
            "{e}"
        );
        assert!(p.check("a").unwrap_err().contains("MinLength"));
        assert!(p.check("abcde").unwrap_err().contains("MaxLength"));
        let v = param("{Type: String, AllowedValues: [dev, prod]}");
        assert!(v.check("dev").is_ok());
        assert!(v.check("qa").unwrap_err().contains("dev, prod"));
        let list = param("{Type: CommaDelimitedList, AllowedValues: [a, b]}");
        assert!(list.check("a,b").is_ok());
        assert!(list.check("a,c").is_err());
    }

    #[test]
    fn aws_specific_types_are_checked_for_shape() {
        let p = param("{Type: AWS::EC2::VPC::Id}");
        assert!(p.check("vpc-0a1b2c").is_ok());
        assert!(p.check("subnet-0a1b").is_err());
        let l = param("{Type: List<AWS::EC2::Subnet::Id>}");
        assert!(l.check("subnet-1,subnet-2").is_ok());
        assert!(l.check("subnet-1,sg-2").is_err());
    }

    #[test]
    fn a_no_echo_value_is_never_repeated() {
        let p =
            param("{Type: String, NoEcho: true, AllowedPattern: '[a-z]+', AllowedValues: [abc]}");
        let e = p.check("Hunter2").unwrap_err();
        assert!(!e.contains("Hunter2") && !e.contains("abc"), "{e}");
    }

    #[test]
    fn logical_ids_are_alphanumeric_written_or_generated() {
        let e = Template::parse("Resources:\n  my-queue: {Type: 'AWS::SQS::Queue'}\n").unwrap_err();
        assert_eq!(e.path, "Resources.my-queue");
        assert_eq!((e.pos.line, e.pos.column), (2, 3));
        let e = Template::parse(
            "Transform: AWS::LanguageExtensions\nResources:\n  Fn::ForEach::Q: [N, [line-items], {'Q${N}': {Type: 'AWS::SQS::Queue'}}]\n",
        )
        .unwrap_err();
        assert!(
            e.message.contains("`Qline-items`") && e.message.contains("&{Id}"),
            "{}",
            e.message
        );
        assert!(Template::parse(
            "Transform: AWS::LanguageExtensions\nResources:\n  Fn::ForEach::Q: [N, [line-items], {'Q&{N}': {Type: 'AWS::SQS::Queue'}}]\n",
        )
        .is_ok());
    }

    #[test]
    fn a_document_without_resources_is_not_a_template() {
        let err = Template::parse("Parameters: {}\n").unwrap_err();
        assert!(err.message.contains("Resources"), "{}", err.message);
    }
}
