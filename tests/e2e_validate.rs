//! `stackwarden validate`, run as a user runs it, on the shipped desired
//! state and on broken copies of it. Nothing here touches AWS.

mod common;

use common::{Workspace, run, stackwarden, stderr, stdout};

#[test]
fn shipped_environments_are_valid() {
    let out = run(stackwarden().arg("validate"));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    for env in ["dev", "staging", "prod"] {
        assert!(
            text.contains(&format!("{env}: valid: 8 stacks in 5 waves")),
            "{text}"
        );
    }
    // The seed's deployment order is honoured: network first, service last.
    assert!(text.contains("  1. dynamodb, network\n"), "{text}");
    assert!(text.contains("  5. service (after"), "{text}");
}

#[test]
fn validate_json_lists_waves_and_revisions() {
    let out = run(stackwarden().args(["validate", "-e", "dev", "-o", "json"]));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(v[0]["environment"], "dev");
    assert_eq!(v[0]["waves"][0], serde_json::json!(["dynamodb", "network"]));
    assert_eq!(v[0]["revision"].as_str().map(str::len), Some(16));
}

#[test]
fn a_broken_environment_is_refused_with_file_and_line_for_each_error() {
    let ws = Workspace::new();
    ws.edit(
        "desired-state/dev.yaml",
        "      FlowLogRetentionDays: 14\n",
        "      FlowLogRetentionDays: 14\n      Colour: blue\n",
    );
    ws.edit(
        "desired-state/dev.yaml",
        "{output: network.VpcId}",
        "{output: network.VpcIdentifier}",
    );
    ws.edit(
        "desired-state/dev.yaml",
        "    timeout: 90m\n",
        "    timeout: 90m\n    retries: 3\n",
    );
    let out = run(stackwarden()
        .args(["validate", "-e", "dev", "--desired-state"])
        .arg(ws.desired_state()));
    assert_eq!(out.status.code(), Some(1), "stdout: {}", stdout(&out));
    let err = stderr(&out);
    let file = ws.path("desired-state/dev.yaml").display().to_string();
    assert!(
        err.contains(&format!(
            "{file}:25:7: stacks.network.parameters.Colour: parameter `Colour` is not declared"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{file}:35:5: stacks.msk.retries: unknown field `retries`"
        )),
        "{err}"
    );
    assert!(
        err.contains("stacks.alb.parameters.VpcId: stack `network` has no output `VpcIdentifier`"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 3, "one line per error: {err}");
}

#[test]
fn a_cycle_and_a_missing_template_are_refused() {
    let ws = Workspace::new();
    ws.edit(
        "desired-state/dev.yaml",
        "    template: ../templates/network.yaml\n",
        "    template: ../templates/network.yaml\n    depends_on: [service]\n",
    );
    ws.edit(
        "desired-state/dev.yaml",
        "../templates/dynamodb.yaml",
        "../templates/missing.yaml",
    );
    let out = run(stackwarden()
        .args(["validate", "-e", "dev", "--desired-state"])
        .arg(ws.desired_state()));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("stacks.dynamodb.template: cannot read template"),
        "{err}"
    );
    assert!(
        err.contains("dependency cycle: ") && err.contains("network -> service"),
        "{err}"
    );
}

#[test]
fn an_unknown_environment_is_an_error() {
    let out = run(stackwarden().args(["validate", "-e", "qa"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no environment `qa`"),
        "{}",
        stderr(&out)
    );
}
