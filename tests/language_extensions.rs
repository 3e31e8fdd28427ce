//! stackwarden's `AWS::LanguageExtensions` expansion against an independent
//! implementation of the same transform: cfn-lint's (AWS's template linter,
//! pinned in `.venv`, made by `scripts/setup-venv`). Both expand the same
//! long-form templates with the same parameter values; the Conditions,
//! Resources and Outputs they produce must be equal.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value as Json;
use stackwarden::language_extensions::expand;

/// Runs cfn-lint's transform on a long-form template, with `parameters`
/// as the values of list parameters (cfn-lint reads a parameter's Default).
const CFN_LINT: &str = r#"
import json, sys
from cfnlint.template.transforms._language_extensions import _Transform
req = json.load(sys.stdin)
template = req["template"]
for name, value in req["parameters"].items():
    template.setdefault("Parameters", {}).setdefault(name, {})["Default"] = value
class Cfn:
    pass
cfn = Cfn()
cfn.template = template
cfn.regions = ["us-east-1"]
json.dump(_Transform()._walk(template, {}, cfn), sys.stdout)
"#;

fn cfn_lint(template: &Json, parameters: &BTreeMap<String, String>) -> Json {
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let mut child = Command::new(&python)
        .args(["-c", CFN_LINT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}: run scripts/setup-venv (cfn-lint is the reference implementation)",
                python.display()
            )
        });
    let request = serde_json::json!({"template": template, "parameters": parameters});
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "cfn-lint's transform failed");
    serde_json::from_slice(&out.stdout).expect("JSON from cfn-lint")
}

/// cfn-lint writes an `Fn::Sub` left with no variable as the plain string
/// (CloudFormation resolves it either way); compare the two alike.
fn normalize(v: &Json) -> Json {
    match v {
        Json::Object(m) if m.len() == 1 => match m.get("Fn::Sub") {
            Some(Json::String(s)) if !s.contains("${") => Json::String(s.clone()),
            _ => Json::Object(m.iter().map(|(k, v)| (k.clone(), normalize(v))).collect()),
        },
        Json::Object(m) => Json::Object(m.iter().map(|(k, v)| (k.clone(), normalize(v))).collect()),
        Json::Array(a) => Json::Array(a.iter().map(normalize).collect()),
        other => other.clone(),
    }
}

/// A sample: what it shows, its body, and the list parameters' values.
type Sample = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

const TEMPLATES: &[Sample] = &[
    (
        "a loop over a list parameter, with ${} and &{} keys",
        r#"
Transform: AWS::LanguageExtensions
Parameters:
  Names: {Type: CommaDelimitedList}
Resources:
  Fn::ForEach::Queues:
    - Name
    - !Ref Names
    - Queue&{Name}:
        Type: AWS::SQS::Queue
        Properties: {QueueName: !Sub "${AWS::StackName}-${Name}", DelaySeconds: 5}
Outputs:
  Fn::ForEach::Urls:
    - Name
    - !Ref Names
    - Queue&{Name}Url:
        Value: {Ref: !Sub "Queue&{Name}"}
        Export: {Name: !Sub "${AWS::StackName}-${Name}-url"}
"#,
        &[("Names", "orders,line-items, refunds")],
    ),
    (
        "nested loops and a Ref to the identifier",
        r#"
Transform: [AWS::LanguageExtensions]
Resources:
  Fn::ForEach::Envs:
    - Env
    - [dev, prod]
    - Fn::ForEach::Kinds:
        - Kind
        - [alerts, audit]
        - ${Env}${Kind}Topic:
            Type: AWS::SNS::Topic
            Properties:
              TopicName: !Ref Kind
              DisplayName: !Sub "${Env} ${Kind}"
              Tags: [{Key: env, Value: !Ref Env}]
"#,
        &[],
    ),
    (
        "loops in Conditions and inside properties",
        r#"
Transform: AWS::LanguageExtensions
Parameters:
  Stage: {Type: String, Default: dev}
Conditions:
  Fn::ForEach::Stages:
    - S
    - [dev, prod]
    - Is${S}: !Equals [!Ref Stage, !Ref S]
Resources:
  Fn:
    Type: AWS::Lambda::Function
    Properties:
      Role: arn:aws:iam::123456789012:role/r
      Code: {ZipFile: "x"}
      Handler: index.handler
      Runtime: python3.12
      Environment:
        Variables:
          Fn::ForEach::Vars:
            - V
            - [TABLE, QUEUE]
            - ${V}_NAME: !Sub "${Stage}-${V}"
"#,
        &[],
    ),
    (
        "a collection from a mapping",
        r#"
Transform: AWS::LanguageExtensions
Mappings:
  Buckets:
    Names:
      All: [logs, data]
Resources:
  Fn::ForEach::Buckets:
    - B
    - !FindInMap [Buckets, Names, All]
    - Bucket${B}:
        Type: AWS::S3::Bucket
        DeletionPolicy: Retain
        Properties: {BucketName: !Sub "x-${B}"}
"#,
        &[],
    ),
    (
        "a collection from a mapping's default value",
        r#"
Transform: AWS::LanguageExtensions
Mappings:
  Buckets:
    Names:
      All: [logs, data]
Resources:
  Fn::ForEach::Buckets:
    - B
    - !FindInMap [Buckets, Names, Missing, {DefaultValue: [audit]}]
    - Bucket${B}:
        Type: AWS::S3::Bucket
        Properties: {BucketName: !Sub "x-${B}"}
"#,
        &[],
    ),
];

#[test]
fn the_expansion_equals_cfn_lints_on_every_sample() {
    for (what, body, params) in TEMPLATES {
        let canonical = stackwarden::yaml::parse_template(body).expect(what);
        let params: BTreeMap<String, String> = params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let ours = expand(&canonical, &params).expect(what);
        assert!(ours.unresolved.is_empty(), "{what}: {:?}", ours.unresolved);
        let theirs = cfn_lint(&canonical, &params);
        for section in ["Conditions", "Resources", "Outputs"] {
            assert_eq!(
                normalize(&ours.template[section]),
                normalize(&theirs[section]),
                "{what}: {section}"
            );
        }
        assert!(
            ours.template["Resources"]
                .as_object()
                .unwrap()
                .keys()
                .all(|k| !k.starts_with("Fn::ForEach")),
            "{what}"
        );
    }
}
