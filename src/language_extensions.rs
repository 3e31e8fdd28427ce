//! The `AWS::LanguageExtensions` transform, expanded the way CloudFormation
//! processes a template before it plans one: `Fn::ForEach` loops in the
//! Conditions, Outputs and Resources sections (and inside resource
//! properties), `Fn::Length`, and intrinsic `DeletionPolicy` and
//! `UpdateReplacePolicy` values.
//!
//! stackwarden needs the processed template to know which resources and
//! outputs a template declares: output references, the protected-resource
//! forecast and the replacement policy all work on logical ids, and a loop
//! hides them. The revision and the desired/live comparison stay on the
//! template as written.
//!
//! Semantics follow the AWS template reference (`Fn::ForEach`, `Fn::Length`,
//! the `AWS::LanguageExtensions` transform page); `tests/language_extensions.rs`
//! checks the expansion against cfn-lint's independent implementation.

use std::collections::BTreeMap;

use serde_json::{Map, Value as Json};

/// The transform's name in a template's `Transform`.
pub const TRANSFORM: &str = "AWS::LanguageExtensions";

/// How deep loops may nest, as CloudFormation allows.
const MAX_NESTING: usize = 5;

/// The sections a loop may appear in (AWS: "It can't be used in any of the
/// following sections: AWSTemplateFormatVersion, Description, Metadata,
/// Transform, Parameters, Mappings, Rules, or Hooks").
const LOOP_SECTIONS: &[&str] = &["Conditions", "Outputs", "Resources"];

/// The values `DeletionPolicy` and `UpdateReplacePolicy` take.
const POLICIES: &[&str] = &["Delete", "Retain", "RetainExceptOnDelete", "Snapshot"];

/// A template the transform refuses, with the path of the node at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpandError {
    pub path: String,
    pub message: String,
}

/// A processed template and what could not be processed before deploy time.
#[derive(Debug, Clone, PartialEq)]
pub struct Expansion {
    pub template: Json,
    /// Loops whose collection is known only at deploy time (a parameter
    /// given as another stack's output), left out of `template`: what they
    /// generate is not checked before CloudFormation processes it.
    pub unresolved: Vec<String>,
}

/// The transforms a template declares, in order: `Transform` is a name, a
/// `{Name, Parameters}` mapping (`AWS::Include`), or a list of either.
pub fn transforms(template: &Json) -> Vec<String> {
    fn name(t: &Json) -> Option<String> {
        match t {
            Json::String(s) => Some(s.clone()),
            Json::Object(m) => m.get("Name").and_then(Json::as_str).map(str::to_owned),
            _ => None,
        }
    }
    match template.get("Transform") {
        Some(Json::Array(a)) => a.iter().filter_map(name).collect(),
        Some(t) => name(t).into_iter().collect(),
        None => Vec::new(),
    }
}

/// Processes `template` with the transform. `parameters` holds the value
/// of each parameter that has one before deploy time (given or default);
/// list parameters are split as CloudFormation splits them.
///
/// # Errors
/// What CloudFormation's transform refuses: a malformed loop, a loop outside
/// the sections that allow it, a key a loop generates twice or that the
/// template already has, a policy that is not one of its values.
pub fn expand(
    template: &Json,
    parameters: &BTreeMap<String, String>,
) -> Result<Expansion, ExpandError> {
    let mut ex = Expander {
        template,
        parameters,
        unresolved: Vec::new(),
        generated: 0,
    };
    let Json::Object(root) = template else {
        return Ok(Expansion {
            template: template.clone(),
            unresolved: Vec::new(),
        });
    };
    let mut out = Map::new();
    for (section, value) in root {
        let processed = if LOOP_SECTIONS.contains(&section.as_str()) {
            ex.walk(value, &Scope::default(), section)?
        } else {
            if let Some(path) = find_loop(value, section) {
                return Err(ExpandError {
                    path,
                    message: format!(
                        "Fn::ForEach cannot be used in the {section} section (only in Conditions, Outputs and Resources)"
                    ),
                });
            }
            value.clone()
        };
        out.insert(section.clone(), processed);
    }
    if let Some(Json::Object(resources)) = out.get_mut("Resources") {
        for (id, resource) in resources.iter_mut() {
            ex.resolve_policies(id, resource)?;
        }
    }
    Ok(Expansion {
        template: Json::Object(out),
        unresolved: ex.unresolved,
    })
}

/// The path of the first loop under `value`, if any.
fn find_loop(value: &Json, path: &str) -> Option<String> {
    match value {
        Json::Object(m) => m.iter().find_map(|(k, v)| {
            let here = format!("{path}.{k}");
            if k.starts_with("Fn::ForEach") {
                Some(here)
            } else {
                find_loop(v, &here)
            }
        }),
        Json::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, v)| find_loop(v, &format!("{path}.{i}"))),
        _ => None,
    }
}

/// The loop identifiers in scope and their current values, innermost last.
#[derive(Debug, Clone, Default)]
struct Scope {
    bound: Vec<(String, String)>,
}

impl Scope {
    fn get(&self, id: &str) -> Option<&str> {
        self.bound
            .iter()
            .rev()
            .find(|(k, _)| k == id)
            .map(|(_, v)| v.as_str())
    }

    fn with(&self, id: &str, value: &str) -> Scope {
        let mut s = self.clone();
        s.bound.push((id.to_owned(), value.to_owned()));
        s
    }

    /// `${Id}` becomes the value, `&{Id}` the value without its
    /// non-alphanumeric characters (for logical ids).
    fn substitute(&self, s: &str) -> String {
        let mut out = s.to_owned();
        for (id, value) in self.bound.iter().rev() {
            out = out.replace(&format!("${{{id}}}"), value);
            let alnum: String = value.chars().filter(char::is_ascii_alphanumeric).collect();
            out = out.replace(&format!("&{{{id}}}"), &alnum);
        }
        out
    }
}

struct Expander<'a> {
    template: &'a Json,
    parameters: &'a BTreeMap<String, String>,
    unresolved: Vec<String>,
    /// Entries the loops generated so far, bounded by [`MAX_GENERATED`].
    generated: usize,
}

/// The most entries the loops of one template may generate: far above
/// what CloudFormation accepts (500 resources, 200 outputs), low enough
/// that nested loops over long lists cannot exhaust memory or time.
const MAX_GENERATED: usize = 10_000;

/// What a collection resolves to.
enum Collection {
    Values(Vec<String>),
    /// Known only at deploy time, for this reason.
    Later(String),
}

impl Expander<'_> {
    fn walk(&mut self, value: &Json, scope: &Scope, path: &str) -> Result<Json, ExpandError> {
        match value {
            Json::Object(m) => self.walk_map(m, scope, path),
            Json::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, v)| self.walk(v, scope, &format!("{path}.{i}")))
                .collect::<Result<Vec<_>, _>>()
                .map(Json::Array),
            other => Ok(other.clone()),
        }
    }

    fn walk_map(
        &mut self,
        m: &Map<String, Json>,
        scope: &Scope,
        path: &str,
    ) -> Result<Json, ExpandError> {
        if m.len() == 1 {
            let (k, v) = m.iter().next().expect("one key");
            if let Some(resolved) = self.function(k, v, scope, path)? {
                return Ok(resolved);
            }
        }
        let mut out = Map::new();
        // Keys the template writes win over nothing: a generated key that
        // collides with a written one is an error either way.
        for (k, v) in m.iter().filter(|(k, _)| !k.starts_with("Fn::ForEach")) {
            let key = scope.substitute(k);
            let here = format!("{path}.{k}");
            let processed = self.walk(v, scope, &here)?;
            if out.insert(key.clone(), processed).is_some() {
                return Err(ExpandError {
                    path: here,
                    message: format!("`{key}` is declared twice once loops are expanded"),
                });
            }
        }
        for (k, v) in m.iter().filter(|(k, _)| k.starts_with("Fn::ForEach")) {
            let here = format!("{path}.{k}");
            for (key, value) in self.for_each(k, v, scope, &here)? {
                if out.contains_key(&key) {
                    return Err(ExpandError {
                        path: here,
                        message: format!("the loop generates `{key}`, which is already declared"),
                    });
                }
                out.insert(key, value);
            }
        }
        Ok(Json::Object(out))
    }

    /// A one-key mapping that is a function the transform resolves inside
    /// a loop, resolved; None for anything else.
    fn function(
        &mut self,
        name: &str,
        arg: &Json,
        scope: &Scope,
        path: &str,
    ) -> Result<Option<Json>, ExpandError> {
        let here = format!("{path}.{name}");
        Ok(match name {
            "Ref" => arg
                .as_str()
                .and_then(|id| scope.get(id))
                .map(|v| Json::String(v.to_owned())),
            "Fn::Sub" if !scope.bound.is_empty() => {
                let sub = match arg {
                    Json::String(s) => Json::String(scope.substitute(s)),
                    Json::Array(a) if !a.is_empty() => {
                        let mut items = vec![match &a[0] {
                            Json::String(s) => Json::String(scope.substitute(s)),
                            other => other.clone(),
                        }];
                        for (i, v) in a.iter().enumerate().skip(1) {
                            items.push(self.walk(v, scope, &format!("{here}.{i}"))?);
                        }
                        Json::Array(items)
                    }
                    other => other.clone(),
                };
                Some(serde_json::json!({ "Fn::Sub": sub }))
            }
            "Fn::Length" => {
                let processed = self.walk(arg, scope, &here)?;
                match self.list(&processed, scope) {
                    Some(Collection::Values(v)) => Some(Json::from(v.len())),
                    _ => Some(serde_json::json!({ "Fn::Length": processed })),
                }
            }
            // Its argument is data: an empty mapping in it is a value.
            "Fn::ToJsonString" => Some(serde_json::json!({
                "Fn::ToJsonString": self.walk(arg, scope, &here)?
            })),
            _ => None,
        })
    }

    /// The list a collection (or `Fn::Length` argument) denotes.
    fn list(&self, value: &Json, scope: &Scope) -> Option<Collection> {
        match value {
            Json::Array(items) => {
                let mut out = Vec::new();
                for item in items {
                    match item {
                        Json::String(s) => out.push(s.clone()),
                        Json::Number(n) => out.push(n.to_string()),
                        Json::Bool(b) => out.push(b.to_string()),
                        Json::Object(m) if m.len() == 1 && m.contains_key("Ref") => {
                            let name = m["Ref"].as_str()?;
                            match scope.get(name) {
                                Some(v) => out.push(v.to_owned()),
                                None => match self.parameters.get(name) {
                                    Some(v) => out.push(v.clone()),
                                    None => {
                                        return Some(Collection::Later(format!(
                                            "parameter `{name}` has no value before deploy time"
                                        )));
                                    }
                                },
                            }
                        }
                        _ => return Some(Collection::Later("an item is a function".into())),
                    }
                }
                Some(Collection::Values(out))
            }
            Json::Object(m) if m.len() == 1 => {
                if let Some(name) = m.get("Ref").and_then(Json::as_str) {
                    let declared = self.template.get("Parameters")?.get(name)?;
                    let kind = declared.get("Type").and_then(Json::as_str).unwrap_or("");
                    if kind.starts_with("AWS::SSM::Parameter") {
                        return Some(Collection::Later(format!(
                            "parameter `{name}` is read from SSM at deploy time"
                        )));
                    }
                    if !(kind == "CommaDelimitedList" || kind.starts_with("List<")) {
                        return None;
                    }
                    return Some(match self.parameters.get(name) {
                        Some(v) => Collection::Values(split_list(v)),
                        None => Collection::Later(format!(
                            "parameter `{name}` has no value before deploy time"
                        )),
                    });
                }
                if let Some(Json::Array(args)) = m.get("Fn::FindInMap") {
                    // Keys are literals, loop identifiers or parameters with
                    // a known value; anything else (a pseudo parameter, a
                    // value known at deploy time) leaves the loop to
                    // CloudFormation.
                    let mut keys = Vec::new();
                    for a in args.iter().take(3) {
                        let key = match a {
                            Json::String(s) => Some(s.clone()),
                            Json::Object(r) => r.get("Ref").and_then(Json::as_str).and_then(|n| {
                                scope
                                    .get(n)
                                    .map(str::to_owned)
                                    .or_else(|| self.parameters.get(n).cloned())
                            }),
                            _ => None,
                        };
                        match key {
                            Some(k) => keys.push(k),
                            None => {
                                return Some(Collection::Later(
                                    "a key of its Fn::FindInMap is known only at deploy time"
                                        .into(),
                                ));
                            }
                        }
                    }
                    if keys.len() != 3 {
                        return None;
                    }
                    let found = self
                        .template
                        .get("Mappings")
                        .and_then(|m| m.get(&keys[0]))
                        .and_then(|m| m.get(&keys[1]))
                        .and_then(|m| m.get(&keys[2]))
                        // The transform's fourth argument: {DefaultValue: ...}.
                        .or_else(|| args.get(3)?.get("DefaultValue"))?;
                    return self.list(found, scope);
                }
                Some(Collection::Later(format!(
                    "the collection is {} (resolved by CloudFormation)",
                    m.keys().next().expect("one key")
                )))
            }
            _ => None,
        }
    }

    /// The key/value pairs one `Fn::ForEach::Name: [Identifier, Collection,
    /// {OutputKey: OutputValue}]` generates.
    fn for_each(
        &mut self,
        key: &str,
        value: &Json,
        scope: &Scope,
        path: &str,
    ) -> Result<Vec<(String, Json)>, ExpandError> {
        let err = |message: String| ExpandError {
            path: path.to_owned(),
            message,
        };
        let name = key.strip_prefix("Fn::ForEach::").unwrap_or("");
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(err(format!(
                "`{key}`: a loop is named `Fn::ForEach::` followed by an alphanumeric name"
            )));
        }
        if scope.bound.len() >= MAX_NESTING {
            return Err(err(format!("loops nest at most {MAX_NESTING} deep")));
        }
        let Some([identifier, collection, fragment]) = value
            .as_array()
            .map(Vec::as_slice)
            .and_then(|a| <&[Json; 3]>::try_from(a).ok())
        else {
            return Err(err(
                "a loop takes a list of three: an identifier, a collection and a mapping of output keys to values".into(),
            ));
        };
        let Some(identifier) = identifier
            .as_str()
            .filter(|i| !i.is_empty() && i.chars().all(|c| c.is_ascii_alphanumeric()))
        else {
            return Err(err(
                "the loop's identifier (its first item) must be an alphanumeric string".into(),
            ));
        };
        if scope.get(identifier).is_some() {
            return Err(err(format!(
                "identifier `{identifier}` is already used by an enclosing loop"
            )));
        }
        let Json::Object(fragment) = fragment else {
            return Err(err(
                "the loop's third item must be a mapping of output keys to values".into(),
            ));
        };
        for k in fragment.keys() {
            if !k.starts_with("Fn::ForEach")
                && !k.contains(&format!("${{{identifier}}}"))
                && !k.contains(&format!("&{{{identifier}}}"))
            {
                return Err(ExpandError {
                    path: format!("{path}.2.{k}"),
                    message: format!(
                        "output key `{k}` must contain ${{{identifier}}} or &{{{identifier}}}, or every iteration would generate the same key"
                    ),
                });
            }
        }
        let collection = self.walk(collection, scope, &format!("{path}.1"))?;
        let values = match self.list(&collection, scope) {
            Some(Collection::Values(v)) => v,
            Some(Collection::Later(reason)) => {
                self.unresolved.push(format!("{path}: {reason}"));
                return Ok(Vec::new());
            }
            None => {
                return Err(ExpandError {
                    path: format!("{path}.1"),
                    message: "the loop's collection must be a list, or a Ref to a CommaDelimitedList or List<...> parameter".into(),
                });
            }
        };
        let mut out: Vec<(String, Json)> = Vec::new();
        for v in values {
            let inner = scope.with(identifier, &v);
            let Json::Object(generated) = self.walk_map(fragment, &inner, &format!("{path}.2"))?
            else {
                // Only a one-key function mapping walks to something else,
                // and its key would lack the identifier (refused above).
                return Err(err(
                    "the loop's third item must be a mapping of output keys to values".into(),
                ));
            };
            self.generated += generated.len();
            if self.generated > MAX_GENERATED {
                return Err(err(format!(
                    "the loops generate more than {MAX_GENERATED} entries (CloudFormation takes at most 500 resources and 200 outputs)"
                )));
            }
            for (k, val) in generated {
                if out.iter().any(|(seen, _)| *seen == k) {
                    return Err(err(format!(
                        "the loop generates `{k}` twice (the collection repeats `{v}`, or &{{{identifier}}} removes what told items apart)"
                    )));
                }
                out.push((k, val));
            }
        }
        Ok(out)
    }

    /// `DeletionPolicy` and `UpdateReplacePolicy` may be functions under the
    /// transform: a parameter is resolved to its value, which must be a
    /// policy.
    fn resolve_policies(&self, id: &str, resource: &mut Json) -> Result<(), ExpandError> {
        for attr in ["DeletionPolicy", "UpdateReplacePolicy"] {
            let Some(v) = resource.get(attr) else {
                continue;
            };
            let value = match v {
                Json::Object(m) if m.len() == 1 => match m.get("Ref").and_then(Json::as_str) {
                    Some(p) => match self.parameters.get(p) {
                        Some(v) => v.clone(),
                        None => continue,
                    },
                    None => continue,
                },
                Json::String(s) => s.clone(),
                _ => continue,
            };
            if !POLICIES.contains(&value.as_str()) {
                return Err(ExpandError {
                    path: format!("Resources.{id}.{attr}"),
                    message: format!(
                        "{attr} of `{id}` is `{value}`; it must be one of {}",
                        POLICIES.join(", ")
                    ),
                });
            }
            resource[attr] = Json::String(value);
        }
        Ok(())
    }
}

/// A list parameter's value as CloudFormation splits it: at commas, each
/// member space-trimmed.
fn split_list(v: &str) -> Vec<String> {
    v.split(',').map(|s| s.trim().to_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_yaml(body: &str, params: &[(&str, &str)]) -> Result<Expansion, ExpandError> {
        let t = crate::yaml::parse_template(body).unwrap();
        let params = params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        expand(&t, &params)
    }

    const TABLES: &str = r#"
Transform: AWS::LanguageExtensions
Parameters:
  Names: {Type: CommaDelimitedList, Default: "orders, line-items"}
Resources:
  Fn::ForEach::Tables:
    - Name
    - !Ref Names
    - Table&{Name}:
        Type: AWS::DynamoDB::Table
        Properties:
          TableName: !Sub "${AWS::StackName}-${Name}"
Outputs:
  Fn::ForEach::Arns:
    - Name
    - !Ref Names
    - Table&{Name}Arn:
        Value: !GetAtt [!Sub "Table&{Name}", Arn]
"#;

    #[test]
    fn a_loop_over_a_list_parameter_generates_resources_and_outputs() {
        let ex = expand_yaml(TABLES, &[("Names", "orders, line-items")]).unwrap();
        let resources = ex.template["Resources"].as_object().unwrap();
        assert_eq!(
            resources.keys().collect::<Vec<_>>(),
            ["Tablelineitems", "Tableorders"]
        );
        assert_eq!(
            resources["Tableorders"]["Properties"]["TableName"],
            serde_json::json!({"Fn::Sub": "${AWS::StackName}-orders"})
        );
        let outputs = ex.template["Outputs"].as_object().unwrap();
        assert!(outputs.contains_key("TablelineitemsArn"), "{outputs:?}");
        assert!(ex.unresolved.is_empty());
    }

    #[test]
    fn a_parameter_known_only_at_deploy_time_leaves_its_loop_unresolved() {
        let ex = expand_yaml(TABLES, &[]).unwrap();
        assert!(ex.template["Resources"].as_object().unwrap().is_empty());
        assert_eq!(ex.unresolved.len(), 2, "{:?}", ex.unresolved);
        assert!(ex.unresolved[0].contains("Names"));
    }

    #[test]
    fn loops_nest_and_refs_to_identifiers_resolve() {
        let ex = expand_yaml(
            r#"
Transform: [AWS::LanguageExtensions]
Resources:
  Fn::ForEach::Envs:
    - Env
    - [dev, prod]
    - Fn::ForEach::Topics:
        - Topic
        - [a, b]
        - ${Env}${Topic}:
            Type: AWS::SNS::Topic
            Properties: {TopicName: !Ref Topic, DisplayName: !Ref Env}
"#,
            &[],
        )
        .unwrap();
        let r = ex.template["Resources"].as_object().unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(r["proda"]["Properties"]["TopicName"], "a");
        assert_eq!(r["proda"]["Properties"]["DisplayName"], "prod");
    }

    #[test]
    fn fn_length_and_policies_resolve() {
        let ex = expand_yaml(
            r#"
Transform: AWS::LanguageExtensions
Parameters:
  Keep: {Type: String, Default: Retain}
  Zones: {Type: CommaDelimitedList}
Resources:
  Q:
    Type: AWS::SQS::Queue
    DeletionPolicy: !Ref Keep
    Properties: {DelaySeconds: !Length [a, b, c], MaximumMessageSize: !Length {Ref: Zones}}
"#,
            &[("Keep", "Retain"), ("Zones", "x,y")],
        )
        .unwrap();
        let q = &ex.template["Resources"]["Q"];
        assert_eq!(q["DeletionPolicy"], "Retain");
        assert_eq!(q["Properties"]["DelaySeconds"], 3);
        assert_eq!(q["Properties"]["MaximumMessageSize"], 2);
        let bad = expand_yaml(
            "Transform: AWS::LanguageExtensions\nParameters: {Keep: {Type: String}}\nResources:\n  Q: {Type: AWS::SQS::Queue, DeletionPolicy: !Ref Keep}\n",
            &[("Keep", "Keep")],
        )
        .unwrap_err();
        assert_eq!(bad.path, "Resources.Q.DeletionPolicy");
    }

    #[test]
    fn mapping_keys_resolve_from_parameters_or_wait_for_deploy_time() {
        let body = "Transform: AWS::LanguageExtensions\nParameters:\n  Env: {Type: String}\nMappings:\n  M:\n    prod: {Names: [a, b]}\nResources:\n  Fn::ForEach::T:\n    - N\n    - !FindInMap [M, !Ref Env, Names]\n    - Topic${N}: {Type: 'AWS::SNS::Topic'}\n";
        let ex = expand_yaml(body, &[("Env", "prod")]).unwrap();
        assert_eq!(ex.template["Resources"].as_object().unwrap().len(), 2);
        let ex = expand_yaml(body, &[]).unwrap();
        assert!(ex.template["Resources"].as_object().unwrap().is_empty());
        assert_eq!(ex.unresolved.len(), 1, "{:?}", ex.unresolved);
        let region = body.replace("!Ref Env", "!Ref AWS::Region");
        assert_eq!(expand_yaml(&region, &[]).unwrap().unresolved.len(), 1);
    }

    #[test]
    fn nested_loops_cannot_generate_without_bound() {
        let items: Vec<String> = (0..100).map(|i| format!("v{i}")).collect();
        let list = items.join(", ");
        let body = format!(
            "Transform: AWS::LanguageExtensions\nResources:\n  Fn::ForEach::A:\n    - A\n    - [{list}]\n    - Fn::ForEach::B:\n        - B\n        - [{list}]\n        - Fn::ForEach::C:\n            - C\n            - [{list}]\n            - T${{A}}${{B}}${{C}}: {{Type: 'AWS::SNS::Topic'}}\n"
        );
        let e = expand_yaml(&body, &[]).unwrap_err();
        assert!(e.message.contains("more than"), "{}", e.message);
    }

    #[test]
    fn malformed_loops_are_refused_with_their_place() {
        for (body, path, says) in [
            (
                "Resources:\n  Fn::ForEach::T: [Id, [a]]\n",
                "Resources.Fn::ForEach::T",
                "three",
            ),
            (
                "Resources:\n  Fn::ForEach::T: [Id, [a], {Fixed: {Type: AWS::SNS::Topic}}]\n",
                "Resources.Fn::ForEach::T.2.Fixed",
                "${Id}",
            ),
            (
                "Resources:\n  Fn::ForEach::T: [Id, [a-b, ab], {'&{Id}': {Type: AWS::SNS::Topic}}]\n",
                "Resources.Fn::ForEach::T",
                "twice",
            ),
            (
                "Resources:\n  T1: {Type: AWS::SNS::Topic}\n  Fn::ForEach::T: [Id, ['1'], {'T${Id}': {Type: AWS::SNS::Topic}}]\n",
                "Resources.Fn::ForEach::T",
                "already declared",
            ),
            (
                "Parameters:\n  Fn::ForEach::P: [Id, [a], {'${Id}': {Type: String}}]\nResources:\n  T: {Type: AWS::SNS::Topic}\n",
                "Parameters.Fn::ForEach::P",
                "Parameters section",
            ),
            (
                "Resources:\n  Fn::ForEach::T: [Id, abc, {'${Id}': {Type: AWS::SNS::Topic}}]\n",
                "Resources.Fn::ForEach::T.1",
                "collection",
            ),
        ] {
            let e = expand_yaml(&format!("Transform: AWS::LanguageExtensions\n{body}"), &[])
                .unwrap_err();
            assert_eq!(e.path, path, "{body}");
            assert!(e.message.contains(says), "{body}: {}", e.message);
        }
    }
}
