//! The same template written another way is the same revision: JSON, YAML
//! in the long form, YAML in the short form (`!Sub`, `!GetAtt a.b`) with
//! every string quoted. Checked for every shipped template and a few that
//! use the forms people write by hand (bare `!GetAZs`, `!GetAtt` with a
//! dotted attribute, nested short forms), through `spec::load`, as a
//! desired-state change would be seen.

mod common;

use common::Workspace;
use serde_json::Value as Json;
use stackwarden::spec;
use stackwarden::template::Template;

/// Short-form names, as `stackwarden::yaml` reads them (`Fn::` dropped).
fn short_name(key: &str) -> Option<&str> {
    if key == "Ref" {
        return Some("Ref");
    }
    key.strip_prefix("Fn::")
        .filter(|n| !n.contains("::") && !n.is_empty())
}

/// The template as flow-style YAML with short-form tags, every string in
/// double quotes (a JSON string is a valid YAML double-quoted scalar).
fn short_form(v: &Json, out: &mut String) {
    match v {
        Json::Object(m) if m.len() == 1 => {
            let (k, arg) = m.iter().next().expect("one key");
            match (short_name(k), arg) {
                (Some("GetAtt"), Json::Array(a))
                    if a.len() == 2 && a.iter().all(Json::is_string) =>
                {
                    out.push_str("!GetAtt ");
                    let dotted = format!("{}.{}", a[0].as_str().unwrap(), a[1].as_str().unwrap());
                    out.push_str(&serde_json::to_string(&dotted).unwrap());
                }
                (Some(name), _) => {
                    out.push('!');
                    out.push_str(name);
                    out.push(' ');
                    short_form(arg, out);
                }
                (None, _) => mapping(m, out),
            }
        }
        Json::Object(m) => mapping(m, out),
        Json::Array(a) => {
            out.push('[');
            for (i, item) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                short_form(item, out);
            }
            out.push(']');
        }
        Json::String(s) => out.push_str(&serde_json::to_string(s).unwrap()),
        other => out.push_str(&other.to_string()),
    }
}

fn mapping(m: &serde_json::Map<String, Json>, out: &mut String) {
    out.push('{');
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&serde_json::to_string(k).unwrap());
        out.push_str(": ");
        short_form(v, out);
    }
    out.push('}');
}

/// Every rendering of `body`'s template: (what, text).
fn renderings(body: &str) -> Vec<(&'static str, String)> {
    let canonical = Template::parse(body).expect("parses").canonical;
    let mut short = String::new();
    short_form(&canonical, &mut short);
    vec![
        ("JSON", serde_json::to_string_pretty(&canonical).unwrap()),
        ("long-form YAML", serde_yaml::to_string(&canonical).unwrap()),
        ("short-form YAML, strings quoted", short),
    ]
}

#[test]
fn every_shipped_template_has_one_revision_whatever_its_form() {
    let original = spec::load(&common::repo().join("desired-state/dev.yaml")).expect("dev loads");
    let mut checked = 0;
    for stack in original.stacks.values() {
        let rel = format!(
            "templates/{}",
            stack.template_path.file_name().unwrap().to_string_lossy()
        );
        let body = std::fs::read_to_string(&stack.template_path).unwrap();
        for (what, text) in renderings(&body) {
            let ws = Workspace::new();
            std::fs::write(ws.path(&rel), &text).unwrap();
            let env = spec::load(&ws.path("desired-state/dev.yaml"))
                .unwrap_or_else(|e| panic!("{rel} as {what}: {e}\n{text}"));
            assert_eq!(
                env.stacks[&stack.key].revision, stack.revision,
                "{rel} as {what}:\n{text}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, original.stacks.len() * 3);
}

#[test]
fn hand_written_forms_read_as_their_long_forms() {
    for (short, long) in [
        (
            "Resources:\n  S:\n    Type: AWS::EC2::Subnet\n    Properties:\n      AvailabilityZone: !Select\n        - 0\n        - !GetAZs\n      VpcId: !Ref Vpc\n      CidrBlock: '10.0.0.0/24'\n",
            r#"{"Resources": {"S": {"Type": "AWS::EC2::Subnet", "Properties": {"AvailabilityZone": {"Fn::Select": [0, {"Fn::GetAZs": ""}]}, "VpcId": {"Ref": "Vpc"}, "CidrBlock": "10.0.0.0/24"}}}}"#,
        ),
        (
            "Resources:\n  T:\n    Type: AWS::SNS::Topic\n    Properties:\n      TopicName: !GetAtt Stack.Outputs.TopicName\n      DisplayName: !Sub\n        - '${A}-x'\n        - A: !ImportValue shared\n",
            r#"{"Resources": {"T": {"Type": "AWS::SNS::Topic", "Properties": {"TopicName": {"Fn::GetAtt": ["Stack", "Outputs.TopicName"]}, "DisplayName": {"Fn::Sub": ["${A}-x", {"A": {"Fn::ImportValue": "shared"}}]}}}}}"#,
        ),
    ] {
        let a = Template::parse(short).unwrap();
        let b = Template::parse(long).unwrap();
        assert_eq!(a.canonical, b.canonical, "{short}");
        for (what, text) in renderings(short) {
            assert_eq!(
                Template::parse(&text).unwrap().canonical,
                a.canonical,
                "{what}:\n{text}"
            );
        }
    }
}
