//! `stackwarden schema` against the loader, checked with a standard
//! validator (python-jsonschema, the reference implementation of draft
//! 2020-12, from the project's venv): every shipped and test desired-state
//! file is valid, and every file the loader refuses for its shape (an
//! unknown key, a wrong type, a missing key, a value out of its set) is
//! invalid. The schema committed beside the shipped files for editors is
//! the binary's own.

mod common;

use std::io::Write;
use std::process::Stdio;

use common::{Workspace, python, repo, run, stackwarden, stdout};

/// Validates each document (JSON) against the schema; one list of errors
/// per document.
fn validate(schema: &serde_json::Value, docs: &[serde_json::Value]) -> Vec<Vec<String>> {
    const CHECK: &str = r#"
import json, sys
import jsonschema
schema, docs = json.load(sys.stdin)
jsonschema.Draft202012Validator.check_schema(schema)
v = jsonschema.Draft202012Validator(schema)
print(json.dumps([[f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(d)] for d in docs]))
"#;
    let mut child = std::process::Command::new(python())
        .args(["-c", CHECK])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the venv's python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&(schema, docs)).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "jsonschema failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the validator's answer")
}

fn schema() -> serde_json::Value {
    let out = run(stackwarden().arg("schema"));
    assert_eq!(out.status.code(), Some(0));
    serde_json::from_str(&stdout(&out)).expect("the schema is JSON")
}

/// A YAML document as JSON, read as the loader reads it (serde_yaml), so
/// only the validator differs.
fn json_of(text: &str) -> serde_json::Value {
    let yaml: serde_yaml::Value = serde_yaml::from_str(text).expect("YAML");
    serde_json::to_value(yaml).expect("JSON")
}

/// Every shipped desired-state file, by path.
fn shipped() -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(repo().join("desired-state"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .chain([repo().join("deploy/management.example.yaml")])
        .map(|p| {
            (
                p.display().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    files
}

/// The shipped dev, with every optional key the loader knows set.
fn dev_with_everything() -> String {
    let dev = std::fs::read_to_string(repo().join("desired-state/dev.yaml")).unwrap();
    dev.replace(
        "policy:\n  mode: converge\n  prune: false\n",
        "policy:
  mode: converge
  prune: true
  protect: [AWS::DynamoDB::Table, AWS::RDS::DBInstance]
  allow_replacement: [dynamodb.ReviewCyclesTable]
  allow_prune: [dev-performance-mgmt-legacy]
  rollback_skip: [service.Service]
  recreate_failed: true
  continue_rollback: true
  windows:
    - {kind: allow, schedule: \"0 8 * * 1-5\", duration: 10h, timezone: Europe/Berlin}
    - {kind: deny, schedule: \"0 12 24 12 *\", duration: 2days}
assume_role:
  role_arn: arn:aws:iam::123456789012:role/stackwarden-operator
  external_id: x
  session_name: ci
artifacts: {bucket: dev-templates-123456789012, prefix: stackwarden/, upload: always}
drift: {mode: revert, interval: 2h, ignore: [service.Service.DesiredCount]}
allow_templates_outside_repository: false
",
    )
    .replace(
        "sns_topic_arn: arn:aws:sns:us-east-1:123456789012:stackwarden-alerts\n",
        "sns_topic_arn: arn:aws:sns:us-east-1:123456789012:stackwarden-alerts\n  repeat_after: 12h\n",
    )
    .replace("operation_timeout: 60m\n", "operation_timeout: 1.5h\n")
    .replace(
        "  dynamodb:\n    template: ../templates/dynamodb.yaml\n",
        "  dynamodb:\n    template: ../templates/dynamodb.yaml\n    name: dev-performance-mgmt-dynamodb\n    termination_protection: true\n    tags: {Data: restricted}\n    drift: {mode: alert, interval: 30m, ignore: [ReviewCyclesTable]}\n",
    )
}

#[test]
fn the_schema_is_draft_2020_12_and_describes_every_key() {
    let schema = schema();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    let mut undescribed = Vec::new();
    let mut objects = vec![("#".to_owned(), &schema)];
    for (name, def) in schema["$defs"].as_object().unwrap() {
        objects.push((format!("#/$defs/{name}"), def));
    }
    for (at, object) in objects {
        for (key, property) in object["properties"].as_object().into_iter().flatten() {
            if property["description"].as_str().is_none_or(str::is_empty) {
                undescribed.push(format!("{at}/properties/{key}"));
            }
        }
    }
    assert!(
        undescribed.is_empty(),
        "keys without a description: {undescribed:?}"
    );
    // The shipped schema for editors is this one.
    let committed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("desired-state/stackwarden.schema.json"))
            .expect("desired-state/stackwarden.schema.json"),
    )
    .unwrap();
    assert_eq!(
        committed, schema,
        "regenerate it: stackwarden schema > desired-state/stackwarden.schema.json"
    );
}

#[test]
fn every_shipped_and_test_desired_state_file_is_valid() {
    let ws = Workspace::new();
    let mut docs = Vec::new();
    let mut names = Vec::new();
    for (path, text) in shipped() {
        assert!(
            path.contains("deploy/")
                || text.starts_with("# yaml-language-server: $schema=./stackwarden.schema.json\n"),
            "{path} names its schema for editors on its first line"
        );
        docs.push(json_of(&text));
        names.push(path);
    }
    let everything = dev_with_everything();
    std::fs::write(ws.path("desired-state/dev.yaml"), &everything).unwrap();
    if let Err(e) = stackwarden::spec::load(&ws.path("desired-state/dev.yaml")) {
        panic!("the loader refuses the test file: {e:?}");
    }
    docs.push(json_of(&everything));
    names.push("dev with every key".into());
    for (name, errors) in names.iter().zip(validate(&schema(), &docs)) {
        assert!(errors.is_empty(), "{name}: {errors:#?}");
    }
}

#[test]
fn what_the_loader_refuses_for_its_shape_the_schema_refuses_too() {
    let dev = std::fs::read_to_string(repo().join("desired-state/dev.yaml")).unwrap();
    let everything = dev_with_everything();
    // (what is wrong, from, to) on the file with every key.
    let cases: &[(&str, &str, &str)] = &[
        (
            "an unknown top-level key",
            "region: us-east-1\n",
            "region: us-east-1\nregoin: eu-west-1\n",
        ),
        ("a missing region", "region: us-east-1\n", ""),
        (
            "a region that is a list",
            "region: us-east-1\n",
            "region: [us-east-1]\n",
        ),
        (
            "an unknown policy key",
            "  prune: true\n",
            "  prune: true\n  purge: true\n",
        ),
        (
            "prune as a string",
            "  prune: true\n",
            "  prune: \"yes please\"\n",
        ),
        (
            "an unknown mode",
            "  mode: converge\n",
            "  mode: sometimes\n",
        ),
        ("a window of an unknown kind", "kind: deny", "kind: maybe"),
        (
            "a window without a schedule",
            "schedule: \"0 12 24 12 *\", ",
            "",
        ),
        (
            "a window with an unknown key",
            "duration: 2days}",
            "duration: 2days, zone: UTC}",
        ),
        (
            "a duration that is a word",
            "duration: 10h",
            "duration: soon",
        ),
        (
            "a window duration as a number",
            "duration: 10h",
            "duration: 10",
        ),
        (
            "windows as a mapping",
            "  windows:\n    - {kind: allow, schedule: \"0 8 * * 1-5\", duration: 10h, timezone: Europe/Berlin}\n    - {kind: deny, schedule: \"0 12 24 12 *\", duration: 2days}\n",
            "  windows: {kind: allow, schedule: \"0 8 * * 1-5\", duration: 10h}\n",
        ),
        (
            "an unknown stack key",
            "    termination_protection: true\n",
            "    termination_protection: true\n    protection: true\n",
        ),
        (
            "a stack without a template",
            "    template: ../templates/dynamodb.yaml\n",
            "",
        ),
        (
            "a parameter that is a list",
            "      VpcCIDR: 10.0.0.0/16\n",
            "      VpcCIDR: [10.0.0.0/16]\n",
        ),
        (
            "an output reference without a dot",
            "{output: network.VpcId}",
            "{output: network}",
        ),
        (
            "an output reference with another key",
            "{output: network.VpcId}",
            "{output: network.VpcId, default: x}",
        ),
        (
            "an ECS service with an unknown key",
            "autoscaling: {min: 1, max: 2}",
            "autoscaling: {min: 1, max: 2}\n        scale: 3",
        ),
        (
            "autoscaling below zero",
            "autoscaling: {min: 1, max: 2}",
            "autoscaling: {min: -1, max: 2}",
        ),
        (
            "a tag that is a mapping",
            "Service: performance-mgmt\n",
            "Service: {name: performance-mgmt}\n",
        ),
        (
            "an unknown drift mode",
            "drift: {mode: revert,",
            "drift: {mode: undo,",
        ),
        (
            "an unknown drift key",
            "interval: 2h, ignore",
            "interval: 2h, every: 1h, ignore",
        ),
        (
            "an unknown alerts key",
            "  repeat_after: 12h\n",
            "  repeat_after: 12h\n  repeat: 1h\n",
        ),
        (
            "an unknown assume_role key",
            "  session_name: ci\n",
            "  session_name: ci\n  duration: 1h\n",
        ),
        (
            "an unknown upload mode",
            "upload: always",
            "upload: sometimes",
        ),
    ];
    // No stacks at all: the file up to its stacks.
    let no_stacks = format!("{}stacks: {{}}\n", &dev[..dev.find("stacks:\n").unwrap()]);
    let cases: Vec<(&str, String)> = cases
        .iter()
        .map(|(what, from, to)| {
            assert!(everything.contains(from), "{what}: no `{from}`");
            (*what, everything.replacen(from, to, 1))
        })
        .chain([("no stacks", no_stacks)])
        .collect();
    let ws = Workspace::new();
    let file = ws.path("desired-state/dev.yaml");
    let mut docs = Vec::new();
    for (what, text) in &cases {
        std::fs::write(&file, text).unwrap();
        assert!(
            stackwarden::spec::load(&file).is_err(),
            "{what}: the loader accepts it"
        );
        docs.push(serde_yaml::from_str::<serde_yaml::Value>(text).map_or_else(
            |e| panic!("{what}: not YAML: {e}"),
            |v| serde_json::to_value(v).unwrap(),
        ));
    }
    let answers = validate(&schema(), &docs);
    for ((what, _), errors) in cases.iter().zip(answers) {
        assert!(!errors.is_empty(), "{what}: the schema accepts it");
    }
    // And the unchanged file is valid: the refusals are the mutations'.
    assert_eq!(
        validate(&schema(), &[json_of(&dev)]),
        vec![Vec::<String>::new()]
    );
}
