//! The daemon's status page for people (pure: the caller gives the
//! status and the time): `/` lists every environment, `/env/<name>` shows
//! one with its last pass object by object. Server-rendered HTML with its
//! style inline and no script, image or link to anywhere else, so it works
//! where the daemon runs (no CDN, no internet); it refreshes itself.
//!
//! Every value is escaped: stack names, reasons and alert texts come from
//! AWS and from files, and must never become markup.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use crate::controller::EnvStatus;
use crate::outcome::{Condition, ObjectKind, Outcome};
use crate::plan::{Health, Sync, Verdict};

/// How often the page reloads itself.
pub const REFRESH_SECONDS: u32 = 15;

/// Escapes text for an HTML element or a quoted attribute.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A path segment with everything but unreserved characters
/// percent-encoded (RFC 3986).
pub fn encode_segment(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The inverse of [`encode_segment`]; `None` for a malformed escape or
/// text that is not UTF-8.
pub fn decode_segment(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

const STYLE: &str = "\
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1b1f24;background:#fff}\
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}\
table{border-collapse:collapse;width:100%}\
th,td{text-align:left;padding:.35em .6em;border-bottom:1px solid #d8dee4;vertical-align:top}\
th{background:#f6f8fa;font-weight:600}\
.muted{color:#59636e}.badge{display:inline-block;padding:0 .5em;border-radius:.7em;font-size:.9em;white-space:nowrap}\
.clean,.in_sync{background:#dafbe1;color:#116329}.drift,.differences{background:#fff8c5;color:#7d4e00}\
.degraded{background:#ffebe9;color:#a40e26}.failed{background:#a40e26;color:#fff}\
.blocked{background:#ddf4ff;color:#0550ae}.unknown{background:#eff2f5;color:#59636e}\
.note{margin:.3em 0;padding:.4em .6em;border-left:4px solid #0969da;background:#f6f8fa}\
.warn{border-left-color:#bf8700}.bad{border-left-color:#cf222e}\
pre{white-space:pre-wrap;margin:0;font-size:.9em}";

fn head(out: &mut String, title: &str) {
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{}</title><style>{STYLE}</style></head><body>",
        escape(title)
    );
}

fn foot(out: &mut String, now: SystemTime) {
    let _ = writeln!(
        out,
        "<p class=\"muted\">Rendered {} by stackwarden {}; reloads every {REFRESH_SECONDS}s. \
The same data as JSON: <a href=\"/status\">/status</a>.</p></body></html>",
        escape(&humantime::format_rfc3339_seconds(now).to_string()),
        escape(env!("CARGO_PKG_VERSION")),
    );
}

/// `3m ago` (whole minutes past the first, seconds before).
fn ago(at: u64, now: SystemTime) -> String {
    let then = SystemTime::UNIX_EPOCH + Duration::from_secs(at);
    let secs = now.duration_since(then).unwrap_or_default().as_secs();
    let rounded = if secs >= 60 { secs - secs % 60 } else { secs };
    format!(
        "{} ago",
        humantime::format_duration(Duration::from_secs(rounded))
    )
}

fn at_title(at: u64) -> String {
    crate::state::rfc3339(at)
}

/// The environment's overall state, as a badge: its last pass's verdict,
/// or why it has none.
fn result_badge(s: &EnvStatus) -> String {
    let (class, label) = match (s.result, &s.error) {
        (Some(Verdict::InSync), _) => ("in_sync", "in sync"),
        (Some(Verdict::Differences), _) => ("differences", "differences"),
        (Some(Verdict::Failed), _) => ("failed", "failed"),
        (None, Some(_)) => ("failed", "pass failed"),
        (None, None) if s.passes == 0 => ("unknown", "no pass yet"),
        (None, None) => ("unknown", "unknown"),
    };
    format!("<span class=\"badge {class}\">{label}</span>")
}

fn condition_badge(c: Condition) -> String {
    let (class, label) = match c {
        Condition::Failed => ("failed", "failed".to_owned()),
        Condition::Blocked(by) => (
            "blocked",
            format!(
                "blocked: {}",
                serde_json::to_value(by)
                    .ok()
                    .and_then(|v| v.as_str().map(|s| s.replace('_', " ")))
                    .unwrap_or_default()
            ),
        ),
        Condition::Degraded => ("degraded", "degraded".to_owned()),
        Condition::Drift => ("drift", "out of sync".to_owned()),
        Condition::Clean => ("clean", "in sync".to_owned()),
    };
    format!("<span class=\"badge {class}\">{}</span>", escape(&label))
}

fn sync_label(s: Sync) -> &'static str {
    match s {
        Sync::InSync => "in sync",
        Sync::OutOfSync => "out of sync",
        Sync::Missing => "missing",
        Sync::Orphaned => "orphaned",
        Sync::Unknown => "unknown",
    }
}

fn health_label(h: Health) -> &'static str {
    match h {
        Health::Healthy => "healthy",
        Health::Progressing => "progressing",
        Health::Degraded => "degraded",
        Health::Failed => "failed",
        Health::Absent => "absent",
    }
}

/// The notes that say why an environment is not simply running: held,
/// waiting, failing to load.
fn notes(s: &EnvStatus) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(x) = &s.suspended {
        out.push(("warn", x.describe()));
    }
    if let Some(w) = &s.sync_window {
        out.push((if w.open { "" } else { "warn" }, w.describe()));
    }
    if let Some(e) = &s.desired_state_error {
        out.push((
            "bad",
            format!("desired state does not load (the last good one is enforced): {e}"),
        ));
    }
    if let Some(e) = &s.error {
        out.push(("bad", format!("last pass: {e}")));
    }
    if let Some(w) = &s.waiting_for {
        out.push(("warn", format!("waiting for {w}")));
    }
    if let Some(l) = &s.lease {
        let text = match (&l.holder, l.held) {
            (_, true) => "lease held by this replica".to_owned(),
            (Some(h), false) => format!("lease held by another replica: {h}"),
            (None, false) => "lease free".to_owned(),
        };
        out.push(("", text));
    }
    out
}

/// `/`: every environment, one row each.
pub fn index(status: &BTreeMap<String, EnvStatus>, now: SystemTime) -> String {
    let mut out = String::with_capacity(1024 + status.len() * 600);
    head(&mut out, "stackwarden");
    let _ = write!(
        out,
        "<h1>stackwarden</h1><p class=\"muted\">{} environment(s)</p>",
        status.len()
    );
    out.push_str(
        "<table><thead><tr><th>Environment</th><th>Result</th><th>Last pass</th>\
<th>Took</th><th>Objects</th><th>Open alerts</th><th>Notes</th></tr></thead><tbody>",
    );
    for (name, s) in status {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for o in &s.objects {
            let key = match o.condition {
                Condition::Failed => "failed",
                Condition::Blocked(_) => "blocked",
                Condition::Degraded => "degraded",
                Condition::Drift => "out of sync",
                Condition::Clean => "in sync",
            };
            *counts.entry(key).or_default() += 1;
        }
        let objects = counts
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ");
        let drifted: usize = s.drift.values().map(|d| d.resources.len()).sum();
        let objects = if drifted > 0 {
            format!("{objects}; {drifted} drifted resource(s)")
        } else {
            objects
        };
        let _ = write!(
            out,
            "<tr><td><a href=\"/env/{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            encode_segment(name),
            escape(name),
            result_badge(s),
            s.last_pass_at.map_or_else(
                || "never".to_owned(),
                |t| format!(
                    "<span title=\"{}\">{}</span>",
                    escape(&at_title(t)),
                    escape(&ago(t, now))
                )
            ),
            s.last_pass_seconds
                .map_or_else(String::new, |d| format!("{d:.1}s")),
            escape(&objects),
            s.open_alerts.len(),
            notes(s)
                .iter()
                .map(|(_, n)| escape(n))
                .collect::<Vec<_>>()
                .join("<br>"),
        );
    }
    out.push_str("</tbody></table>");
    foot(&mut out, now);
    out
}

/// `/env/<name>`: one environment and its last pass, object by object.
pub fn environment(name: &str, s: &EnvStatus, now: SystemTime) -> String {
    let mut out = String::with_capacity(4096 + s.objects.len() * 400);
    head(&mut out, &format!("{name} - stackwarden"));
    let _ = write!(
        out,
        "<p><a href=\"/\">&larr; all environments</a></p><h1>{} {}</h1><p class=\"muted\">",
        escape(name),
        result_badge(s)
    );
    let mut facts = vec![format!("file {}", s.file.display())];
    if let Some(r) = &s.revision {
        facts.push(format!("revision {r}"));
    }
    facts.push(format!("{} pass(es)", s.passes));
    if let Some(t) = s.last_pass_at {
        facts.push(format!("last pass {} ({})", ago(t, now), at_title(t)));
    }
    if let Some(d) = s.last_pass_seconds {
        facts.push(format!("took {d:.1}s"));
    }
    out.push_str(&escape(&facts.join(" · ")));
    out.push_str("</p>");
    for (class, text) in notes(s) {
        let _ = write!(out, "<p class=\"note {class}\">{}</p>", escape(&text));
    }

    out.push_str(
        "<h2>Stacks and services</h2><table><thead><tr><th>Object</th><th>State</th>\
<th>Sync</th><th>Health</th><th>Reason</th><th>Drift</th><th>Open alerts</th></tr></thead><tbody>",
    );
    if s.objects.is_empty() {
        out.push_str("<tr><td colspan=\"7\" class=\"muted\">no pass has reported yet</td></tr>");
    }
    for o in &s.objects {
        let alerts: Vec<String> = s
            .open_alerts
            .iter()
            .filter(|f| about(o, &f.object))
            .map(|f| format!("{}: {}", f.kind.label(), f.what()))
            .collect();
        let drift = match (o.kind, s.drift.get(&o.id)) {
            (ObjectKind::Stack, Some(d)) => d.summary(now),
            _ => String::new(),
        };
        let kind = match o.kind {
            ObjectKind::Stack => "stack",
            ObjectKind::Service => "ECS service",
        };
        let _ = write!(
            out,
            "<tr><td>{} <span class=\"muted\">{kind}</span></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&o.id),
            condition_badge(o.condition),
            sync_label(o.sync),
            health_label(o.health),
            escape(&o.reason),
            escape(&drift),
            alerts
                .iter()
                .map(|a| escape(a))
                .collect::<Vec<_>>()
                .join("<br>"),
        );
    }
    out.push_str("</tbody></table>");

    if !s.drift.is_empty() {
        out.push_str("<h2>Resource drift</h2><table><thead><tr><th>Stack</th><th>Drifted properties</th></tr></thead><tbody>");
        for (key, d) in &s.drift {
            let _ = write!(
                out,
                "<tr><td>{}</td><td><pre>{}</pre></td></tr>",
                escape(key),
                escape(&d.lines().join("\n"))
            );
        }
        out.push_str("</tbody></table>");
    }

    let _ = write!(out, "<h2>Open alerts ({})</h2>", s.open_alerts.len());
    if s.open_alerts.is_empty() {
        out.push_str("<p class=\"muted\">none</p>");
    } else {
        out.push_str(
            "<table><thead><tr><th>Object</th><th>Kind</th><th>What</th></tr></thead><tbody>",
        );
        for f in &s.open_alerts {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&f.object),
                f.kind.label(),
                escape(&f.what())
            );
        }
        out.push_str("</tbody></table>");
    }
    foot(&mut out, now);
    out
}

/// Whether an alert's object (`stack:<key>`, `ecs:<service>`,
/// `resource:<key>/<LogicalId><path>`) is about this outcome's object.
fn about(o: &Outcome, object: &str) -> bool {
    object == o.object
        || (o.kind == ObjectKind::Stack
            && object
                .strip_prefix("resource:")
                .and_then(|r| r.split_once('/'))
                .is_some_and(|(key, _)| key == o.id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::{DifferenceKind, DriftStatus, ResourceDriftStatus};
    use crate::drift::{Difference, DriftedResource, StackDrift};
    use crate::notify::{Finding, Kind};
    use crate::plan::BlockedBy;
    use html5gum::{Token, Tokenizer};

    /// Text from AWS or from a file that would be markup if not escaped.
    const HOSTILE: &str = "<script>alert(1)</script><img src=x onerror=alert(2)>\"'&amp;";

    const NOW: u64 = 1_795_000_000;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(NOW)
    }

    fn outcome(id: &str, kind: ObjectKind, condition: Condition, reason: &str) -> Outcome {
        let object = match kind {
            ObjectKind::Stack => format!("stack:{id}"),
            ObjectKind::Service => format!("ecs:{id}"),
        };
        let (sync, health) = match condition {
            Condition::Clean => (Sync::InSync, Health::Healthy),
            Condition::Failed => (Sync::OutOfSync, Health::Failed),
            Condition::Degraded => (Sync::InSync, Health::Degraded),
            _ => (Sync::OutOfSync, Health::Healthy),
        };
        Outcome {
            object,
            kind,
            id: id.into(),
            condition,
            sync,
            health,
            reason: reason.into(),
        }
    }

    /// Environments in every state the page knows.
    fn statuses() -> BTreeMap<String, EnvStatus> {
        let drift = StackDrift {
            status: DriftStatus::Drifted,
            checked: Some(now() - Duration::from_secs(720)),
            stale: false,
            detection_failed: None,
            resources: vec![DriftedResource {
                logical_id: "Jobs".into(),
                resource_type: "AWS::SQS::Queue".into(),
                status: ResourceDriftStatus::Modified,
                differences: vec![Difference {
                    path: "/VisibilityTimeout".into(),
                    expected: Some("30".into()),
                    actual: Some(HOSTILE.into()),
                    kind: DifferenceKind::NotEqual,
                    unrevertable: None,
                }],
            }],
            ignored: vec![],
            not_checked: vec![],
        };
        let mut all = BTreeMap::new();
        all.insert("never".to_owned(), EnvStatus::default());
        all.insert(
            "dev".to_owned(),
            EnvStatus {
                file: "desired-state/dev.yaml".into(),
                revision: Some("9502345fac4cee89".into()),
                passes: 12,
                last_pass_at: Some(NOW - 200),
                last_pass_seconds: Some(1.25),
                result: Some(Verdict::InSync),
                objects: vec![
                    outcome("network", ObjectKind::Stack, Condition::Clean, "in sync"),
                    outcome(
                        "dev-svc",
                        ObjectKind::Service,
                        Condition::Clean,
                        "2/2 running",
                    ),
                ],
                ..EnvStatus::default()
            },
        );
        all.insert(
            "staging".to_owned(),
            EnvStatus {
                passes: 3,
                last_pass_at: Some(NOW - 30),
                last_pass_seconds: Some(0.4),
                result: Some(Verdict::Differences),
                suspended: Some(crate::state::Suspension {
                    by: "arn:aws:iam::123456789012:user/ops".into(),
                    since: NOW - 3600,
                    reason: format!("incident {HOSTILE}"),
                }),
                sync_window: Some(crate::window::WindowState {
                    open: false,
                    next_change: Some(now() + Duration::from_secs(3600)),
                    because: vec![],
                    next_change_local: Some("2026-11-27 08:00 CET".into()),
                    ignored: false,
                    search_gave_up: false,
                }),
                lease: Some(crate::lease::LeaseStatus {
                    holder: Some("replica-b".into()),
                    held: false,
                    held_for_seconds: None,
                    handovers: 1,
                }),
                objects: vec![
                    outcome(
                        HOSTILE,
                        ObjectKind::Stack,
                        Condition::Blocked(BlockedBy::Policy),
                        HOSTILE,
                    ),
                    outcome(
                        "queue",
                        ObjectKind::Stack,
                        Condition::Blocked(BlockedBy::SyncWindow),
                        "does not exist; outside sync window",
                    ),
                    outcome("jobs", ObjectKind::Stack, Condition::Drift, "drifted"),
                    outcome(
                        "svc",
                        ObjectKind::Service,
                        Condition::Degraded,
                        "1/2 running",
                    ),
                ],
                open_alerts: vec![
                    Finding {
                        object: "resource:jobs/Jobs/VisibilityTimeout".into(),
                        kind: Kind::Drift,
                        difference: "drifted".into(),
                        detail: Some(format!("expected 30, actual {HOSTILE}")),
                    },
                    Finding {
                        object: format!("stack:{HOSTILE}"),
                        kind: Kind::Blocked,
                        difference: HOSTILE.into(),
                        detail: None,
                    },
                ],
                drift: BTreeMap::from([("jobs".to_owned(), drift)]),
                ..EnvStatus::default()
            },
        );
        all.insert(
            "prod".to_owned(),
            EnvStatus {
                passes: 1,
                last_pass_at: Some(NOW - 7200),
                result: Some(Verdict::Failed),
                error: Some(format!("cannot observe: {HOSTILE}")),
                desired_state_error: Some("desired-state/prod.yaml:3:1: region: missing".into()),
                waiting_for: Some("a change of the desired state".into()),
                objects: vec![outcome(
                    "network",
                    ObjectKind::Stack,
                    Condition::Failed,
                    "UPDATE_ROLLBACK_FAILED",
                )],
                ..EnvStatus::default()
            },
        );
        all.insert(
            HOSTILE.to_owned(),
            EnvStatus {
                error: Some("cannot load".into()),
                ..EnvStatus::default()
            },
        );
        all
    }

    /// What a browser's tokenizer sees: start tags with their attributes,
    /// and the text (entities decoded).
    struct Parsed {
        tags: Vec<(String, BTreeMap<String, String>)>,
        text: String,
    }

    fn parse(html: &str) -> Parsed {
        let mut parsed = Parsed {
            tags: Vec::new(),
            text: String::new(),
        };
        for token in Tokenizer::new(html) {
            match token.expect("infallible") {
                Token::StartTag(t) => parsed.tags.push((
                    String::from_utf8_lossy(&t.name).into_owned(),
                    t.attributes
                        .iter()
                        .map(|(k, v)| {
                            (
                                String::from_utf8_lossy(k).into_owned(),
                                String::from_utf8_lossy(&v.value).into_owned(),
                            )
                        })
                        .collect(),
                )),
                Token::String(s) => parsed.text.push_str(&String::from_utf8_lossy(&s.value)),
                Token::Error(e) => panic!("malformed HTML: {e:?}\n{html}"),
                _ => {}
            }
        }
        parsed
    }

    /// No script, no external resource, no event handler: whatever the
    /// data, the page only links to itself.
    fn assert_self_contained(html: &str) {
        let p = parse(html);
        for (name, attrs) in &p.tags {
            assert!(
                ![
                    "script", "img", "iframe", "link", "object", "embed", "form", "base"
                ]
                .contains(&name.as_str()),
                "<{name}> in\n{html}"
            );
            for (k, v) in attrs {
                assert!(!k.starts_with("on"), "<{name} {k}> in\n{html}");
                if ["href", "src", "action"].contains(&k.as_str()) {
                    assert!(
                        v.starts_with('/') && !v.starts_with("//"),
                        "<{name} {k}={v}> leaves the page"
                    );
                }
            }
        }
        assert!(
            !html.contains("url(") && !html.contains("@import"),
            "{html}"
        );
        assert!(
            p.tags.iter().any(|(n, a)| n == "meta"
                && a.get("http-equiv").map(String::as_str) == Some("refresh")
                && a.get("content").map(String::as_str) == Some("15")),
            "it refreshes itself"
        );
    }

    #[test]
    fn the_index_shows_every_environment_in_its_state_and_escapes_everything() {
        let html = index(&statuses(), now());
        assert_self_contained(&html);
        let p = parse(&html);
        // Each environment links to its page, by its encoded name.
        let links: Vec<&str> = p
            .tags
            .iter()
            .filter(|(n, _)| n == "a")
            .filter_map(|(_, a)| a.get("href").map(String::as_str))
            .collect();
        assert!(
            links.contains(&"/env/dev") && links.contains(&"/env/never"),
            "{links:?}"
        );
        let hostile_link = format!("/env/{}", encode_segment(HOSTILE));
        assert!(links.contains(&hostile_link.as_str()), "{links:?}");
        assert_eq!(
            decode_segment(&hostile_link["/env/".len()..]).as_deref(),
            Some(HOSTILE)
        );
        for expected in [
            "in sync",
            "differences",
            "failed",
            "no pass yet",
            "pass failed",
            "3m ago",
            "1.2s",
            "2 blocked, 1 degraded, 1 out of sync",
            "outside sync window (opens at 2026-11-27 08:00 CET)",
            "lease held by another replica: replica-b",
            "desired state does not load",
            "waiting for a change of the desired state",
            "1 drifted resource(s)",
            HOSTILE,
        ] {
            assert!(p.text.contains(expected), "no `{expected}` in\n{}", p.text);
        }
        // The hostile text is text: it never became a tag.
        assert!(!p.tags.iter().any(|(n, _)| n == "script" || n == "img"));
    }

    #[test]
    fn an_environment_page_shows_each_object_its_drift_and_its_alerts() {
        let all = statuses();
        let html = environment("staging", &all["staging"], now());
        assert_self_contained(&html);
        let p = parse(&html);
        for expected in [
            "blocked: policy",
            "blocked: sync window",
            "outside sync window (opens at 2026-11-27 08:00 CET)",
            "out of sync",
            "degraded",
            "1/2 running",
            "ECS service",
            "suspended by arn:aws:iam::123456789012:user/ops",
            "drifted (1 property), checked 12m ago",
            "/VisibilityTimeout: expected 30, actual",
            "Open alerts (2)",
            "drift: drifted (expected 30, actual",
            HOSTILE,
        ] {
            assert!(p.text.contains(expected), "no `{expected}` in\n{}", p.text);
        }
        assert!(!p.tags.iter().any(|(n, _)| n == "script" || n == "img"));
        for (name, s) in &all {
            assert_self_contained(&environment(name, s, now()));
        }
        let never = parse(&environment("never", &all["never"], now()));
        assert!(
            never.text.contains("no pass has reported yet"),
            "{}",
            never.text
        );
    }

    #[test]
    fn names_survive_the_trip_through_a_url() {
        for name in ["dev", "eu west/1", "ünïcode", "a%2Fb", HOSTILE] {
            assert_eq!(decode_segment(&encode_segment(name)).as_deref(), Some(name));
        }
        assert_eq!(decode_segment("%zz"), None);
        assert_eq!(decode_segment("%ff"), None);
        assert_eq!(decode_segment("%4"), None);
    }
}
