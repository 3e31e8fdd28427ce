//! A CloudFormation template as stackwarden needs to know it: its declared
//! parameters (type, default, NoEcho), its outputs, its resources, and a
//! canonical JSON form for semantic comparison.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value as Json;

use crate::yaml::{self, YamlError};

/// A declared template parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateParameter {
    pub kind: String,
    /// The default, rendered as AWS echoes it back (lists comma-joined).
    pub default: Option<String>,
    /// NoEcho parameters are never printed and come back from AWS as `****`.
    pub no_echo: bool,
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
    /// Parses a template body (YAML or JSON).
    ///
    /// # Errors
    /// A syntax error, or a document that is not a template (no `Resources`
    /// mapping, a parameter without `Type`).
    pub fn parse(body: &str) -> Result<Template, YamlError> {
        let canonical = yaml::parse_template(body)?;
        let invalid = |message: String| YamlError {
            pos: Default::default(),
            path: String::new(),
            message,
        };
        let root = canonical
            .as_object()
            .ok_or_else(|| invalid("a template must be a mapping".into()))?;
        let resources = match root.get("Resources") {
            Some(Json::Object(map)) if !map.is_empty() => map
                .iter()
                .map(|(id, r)| {
                    let kind = r
                        .get("Type")
                        .and_then(Json::as_str)
                        .ok_or_else(|| invalid(format!("resource {id} has no Type")))?;
                    Ok((
                        id.clone(),
                        Resource {
                            kind: kind.to_owned(),
                            properties: r.get("Properties").cloned().unwrap_or(Json::Null),
                        },
                    ))
                })
                .collect::<Result<BTreeMap<_, _>, YamlError>>()?,
            _ => {
                return Err(invalid(
                    "a template needs a non-empty Resources mapping".into(),
                ));
            }
        };
        let mut parameters = BTreeMap::new();
        if let Some(Json::Object(params)) = root.get("Parameters") {
            for (name, p) in params {
                let kind = p
                    .get("Type")
                    .and_then(Json::as_str)
                    .ok_or_else(|| invalid(format!("parameter {name} has no Type")))?;
                parameters.insert(
                    name.clone(),
                    TemplateParameter {
                        kind: kind.to_owned(),
                        default: p.get("Default").map(render_scalar),
                        no_echo: p.get("NoEcho").is_some_and(|v| {
                            v.as_bool() == Some(true) || v.as_str() == Some("true")
                        }),
                    },
                );
            }
        }
        let outputs = match root.get("Outputs") {
            Some(Json::Object(outs)) => outs.keys().cloned().collect(),
            _ => BTreeSet::new(),
        };
        Ok(Template {
            parameters,
            outputs,
            resources,
            canonical,
        })
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

    #[test]
    fn a_document_without_resources_is_not_a_template() {
        let err = Template::parse("Parameters: {}\n").unwrap_err();
        assert!(err.message.contains("Resources"), "{}", err.message);
    }
}
