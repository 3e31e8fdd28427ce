//! `stackwarden validate`, run as a user runs it, on the shipped desired
//! state and on broken copies of it. Nothing here touches AWS.

mod common;

use common::{Workspace, run, stackwarden, stderr, stdout};

/// Runs `validate -e dev` on the workspace's desired state, expects it
/// refused (exit 1), and returns its stderr.
fn refused_dev(ws: &Workspace) -> String {
    let out = run(stackwarden()
        .args(["validate", "-e", "dev", "--desired-state"])
        .arg(ws.desired_state()));
    assert_eq!(out.status.code(), Some(1), "stdout: {}", stdout(&out));
    stderr(&out)
}

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
    let err = refused_dev(&ws);
    let file = ws.path("desired-state/dev.yaml").display().to_string();
    // The lines where the edits are, counted in the file.
    let text = std::fs::read_to_string(&file).unwrap();
    let line_of = |needle: &str| 1 + text.lines().position(|l| l.contains(needle)).unwrap();
    assert!(
        err.contains(&format!(
            "{file}:{}:7: stacks.network.parameters.Colour: parameter `Colour` is not declared",
            line_of("Colour: blue")
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{file}:{}:5: stacks.msk.retries: unknown field `retries`",
            line_of("retries: 3")
        )),
        "{err}"
    );
    assert!(
        err.contains("stacks.alb.parameters.VpcId: stack `network` has no output `VpcIdentifier`"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 3, "one line per error: {err}");
}

/// `-o json` lists every environment: the valid ones with their summary,
/// the failed ones with each error's file, line, column, path and message.
#[test]
fn validate_json_lists_failed_environments_with_their_errors() {
    let ws = Workspace::new();
    ws.edit(
        "desired-state/staging.yaml",
        "    timeout: 90m\n",
        "    timeout: 90m\n    retries: 3\n",
    );
    let out = run(stackwarden()
        .args(["validate", "-o", "json", "--desired-state"])
        .arg(ws.desired_state()));
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    let envs: Vec<(&str, bool)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["environment"].as_str().unwrap(),
                e["valid"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(envs, [("dev", true), ("prod", true), ("staging", false)]);
    let err = &v[2]["errors"][0];
    assert_eq!(err["path"], "stacks.msk.retries");
    assert!(err["line"].as_u64().unwrap() > 1, "{err}");
    assert!(err["column"].as_u64().unwrap() >= 1, "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `retries`"),
        "{err}"
    );
    assert!(
        err["file"]
            .as_str()
            .unwrap()
            .ends_with("desired-state/staging.yaml")
    );
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
    let err = refused_dev(&ws);
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

/// Runs a command that must end on its own within `limit` (a hang is the
/// defect under test, so it must fail the test rather than wedge it).
fn run_bounded(
    cmd: &mut std::process::Command,
    limit: std::time::Duration,
) -> std::process::Output {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("output"),
        Err(_) => {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{cmd:?} did not end within {limit:?}");
        }
    }
}

#[test]
fn usage_errors_exit_1_and_help_and_version_exit_0() {
    for args in [
        &["plan", "-o", "jsn"][..],
        &["reconcile", "--once", "--max-parallel", "0"],
        &["frobnicate"],
        &[],
    ] {
        let out = run(stackwarden().args(args));
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
    }
    for args in [&["--help"][..], &["--version"], &["plan", "--help"]] {
        let out = run(stackwarden().args(args));
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(!stdout(&out).is_empty());
    }
}

#[test]
fn intervals_below_the_floor_or_beyond_any_use_are_refused() {
    for (value, shown) in [
        ("0s", "0s"),
        ("500000000000y", "500000000000y"),
        ("25h", "25h"),
    ] {
        let out = run(stackwarden().args(["reconcile", "--interval", value]));
        assert_eq!(out.status.code(), Some(1), "{value}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(shown) && !err.contains("panicked"), "{err}");
    }
    let out = run(stackwarden().args(["reconcile", "--interval", "1s"]));
    assert!(
        stderr(&out).contains("must be between 10s and 1day"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_absurd_timeout_is_refused_by_validate_and_reconcile_without_a_panic() {
    let ws = Workspace::new();
    ws.edit(
        "desired-state/dev.yaml",
        "    timeout: 90m\n",
        "    timeout: 500000000000y\n",
    );
    for args in [
        &["validate", "-e", "dev"][..],
        &["reconcile", "--once", "-e", "dev"],
    ] {
        let out = run(stackwarden()
            .args(args)
            .arg("--desired-state")
            .arg(ws.desired_state())
            .env("AWS_ENDPOINT_URL", "http://127.0.0.1:1"));
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(".timeout: ") && err.contains("out of range"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn fifos_devices_and_paths_outside_the_repository_are_refused_without_hanging() {
    let ws = Workspace::new();
    let fifo = ws.path("desired-state/qa.yaml");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let out = run_bounded(
        stackwarden()
            .args(["validate", "--desired-state"])
            .arg(ws.desired_state()),
        std::time::Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("qa.yaml:1:1: cannot read: not a regular file (a FIFO)"),
        "{}",
        stderr(&out)
    );
    std::fs::remove_file(&fifo).unwrap();

    let dev = std::fs::read_to_string(ws.path("desired-state/dev.yaml")).unwrap();
    let template = dev
        .lines()
        .find_map(|l| l.trim().strip_prefix("template: "))
        .expect("a template line")
        .to_owned();
    for (target, expected) in [
        (
            "../../../../../../../../etc/passwd",
            "outside the repository",
        ),
        ("/proc/self/environ", "outside the repository"),
        ("/dev/zero", "outside the repository"),
    ] {
        ws.edit("desired-state/dev.yaml", &template, target);
        let out = run_bounded(
            stackwarden()
                .args(["validate", "-e", "dev", "--desired-state"])
                .arg(ws.desired_state()),
            std::time::Duration::from_secs(30),
        );
        assert_eq!(out.status.code(), Some(1), "{target}");
        assert!(
            stderr(&out).contains(expected),
            "{target}: {}",
            stderr(&out)
        );
        ws.edit("desired-state/dev.yaml", target, &template);
    }
    // Opted out, /dev/zero is still only read as far as a regular file would be.
    ws.edit("desired-state/dev.yaml", &template, "/dev/zero");
    ws.edit(
        "desired-state/dev.yaml",
        "stacks:\n",
        "allow_templates_outside_repository: true\nstacks:\n",
    );
    let out = run_bounded(
        stackwarden()
            .args(["validate", "-e", "dev", "--desired-state"])
            .arg(ws.desired_state()),
        std::time::Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not a regular file (a character device)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_autoscaling_range_other_than_the_scalable_targets_is_refused() {
    let ws = Workspace::new();
    ws.edit(
        "desired-state/dev.yaml",
        "autoscaling: {min: 1, max: 2}",
        "autoscaling: {min: 1, max: 3}",
    );
    let err = refused_dev(&ws);
    assert!(
        err.contains("stacks.service.ecs_services.0.autoscaling: max 3 differs from the stack's scalable target: MaxCapacity is 2 (parameter MaxCapacity)"),
        "{err}"
    );
}
