//! Sync windows: when a pass may write to an environment (pure; the
//! caller says what time it is).
//!
//! A window opens at each time its cron schedule fires, in its time zone,
//! and stays open for its duration (absolute time: a 2h window across a
//! daylight-saving change is still two hours long). As in Argo CD, an
//! active `deny` window closes the environment whatever else is open, and
//! when there are `allow` windows the environment is open only while one
//! of them is active. Without windows it is always open.
//!
//! Daylight-saving changes follow croner (OCPS). For a schedule with one
//! minute and one hour (`0 8 * * 1-5`, the usual window), a start time
//! that a spring-forward skips fires at the first instant after the gap,
//! and one that a fall-back repeats fires once, at its first occurrence.
//! A schedule listing several times in the hour that changes
//! (`*/30 2 * * *`) is an interval: its skipped times do not fire, and its
//! repeated times fire twice.

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use jiff::Timestamp;
use jiff::tz::TimeZone;

/// How far ahead the next opening (or closing) is looked for; also the
/// longest window.
pub const HORIZON: Duration = Duration::from_secs(366 * 24 * 3600);

/// The shortest window.
const MIN_DURATION: Duration = Duration::from_secs(60);

/// Why a write is held back, in plans, results and alerts: stable (the
/// opening time is in the environment's window state), so an alert episode
/// does not start anew each time the next opening moves.
pub const HELD: &str = "outside sync window";

/// Steps of that search: each moves to a window's next start or end.
const MAX_STEPS: usize = 10_000;

/// What an active window means.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
#[schemars(rename = "WindowKind")]
pub enum Kind {
    /// Writes are allowed while the window is active (and no deny window is).
    Allow,
    /// No writes while the window is active.
    Deny,
}

/// One window of `policy.windows`.
#[derive(Debug, Clone)]
pub struct SyncWindow {
    pub kind: Kind,
    /// The schedule as written (5 fields: minute hour day-of-month month
    /// day-of-week).
    pub schedule: String,
    cron: croner::Cron,
    pub duration: Duration,
    /// The IANA name, as written.
    pub timezone: String,
    tz: TimeZone,
}

impl PartialEq for SyncWindow {
    fn eq(&self, other: &Self) -> bool {
        (self.kind, &self.schedule, self.duration, &self.timezone)
            == (other.kind, &other.schedule, other.duration, &other.timezone)
    }
}

impl Eq for SyncWindow {}

/// Why a window cannot be built; the loader adds the file, line and key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error(
        "invalid cron schedule `{schedule}`: {reason} (5 fields: minute hour day-of-month month day-of-week)"
    )]
    Schedule { schedule: String, reason: String },
    #[error("schedule `{0}` never fires")]
    NeverFires(String),
    #[error("unknown time zone `{0}` (an IANA name such as Europe/Berlin or UTC)")]
    TimeZone(String),
    #[error("duration must be between 1m and 366days (a longer freeze is several windows)")]
    Duration,
}

impl SyncWindow {
    pub fn new(
        kind: Kind,
        schedule: &str,
        duration: Duration,
        timezone: &str,
    ) -> Result<SyncWindow, WindowError> {
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Disallowed)
            .year(croner::parser::Year::Disallowed)
            .build()
            .parse(schedule)
            .map_err(|e| WindowError::Schedule {
                schedule: schedule.to_owned(),
                reason: e.to_string(),
            })?;
        let tz = TimeZone::get(timezone).map_err(|_| WindowError::TimeZone(timezone.to_owned()))?;
        // Shorter than a minute, no pass could use it; a span past the
        // search horizon could not say when it ends.
        if !(MIN_DURATION..=HORIZON).contains(&duration) {
            return Err(WindowError::Duration);
        }
        let window = SyncWindow {
            kind,
            schedule: schedule.to_owned(),
            cron,
            duration,
            timezone: timezone.to_owned(),
            tz,
        };
        // `0 0 30 2 *` parses and never fires: said at load, not at 3 a.m.
        if window.next_start(Timestamp::UNIX_EPOCH).is_none() {
            return Err(WindowError::NeverFires(schedule.to_owned()));
        }
        Ok(window)
    }

    /// The span `[start, end)` of the occurrence active at `t`, if any: the
    /// latest start at or before `t`, if it has not ended.
    fn active_at(&self, t: Timestamp) -> Option<(Timestamp, Timestamp)> {
        let start = self
            .cron
            .find_previous_occurrence(&t.to_zoned(self.tz.clone()), true)
            .ok()?
            .timestamp();
        let end = add(start, self.duration)?;
        (t < end).then_some((start, end))
    }

    /// The first start strictly after `t`.
    fn next_start(&self, t: Timestamp) -> Option<Timestamp> {
        self.cron
            .find_next_occurrence(&t.to_zoned(self.tz.clone()), false)
            .ok()
            .map(|z| z.timestamp())
    }

    /// `allow 0 8 * * 1-5 for 10h (Europe/Berlin)`.
    pub fn describe(&self) -> String {
        let kind = match self.kind {
            Kind::Allow => "allow",
            Kind::Deny => "deny",
        };
        format!(
            "{kind} `{}` for {} ({})",
            self.schedule,
            humantime::format_duration(self.duration),
            self.timezone
        )
    }
}

fn add(t: Timestamp, d: Duration) -> Option<Timestamp> {
    t.checked_add(jiff::SignedDuration::try_from(d).ok()?).ok()
}

/// Whether writes are allowed at some instant, and until when.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WindowState {
    pub open: bool,
    /// When it next opens (closed) or closes (open), if within
    /// [`HORIZON`].
    #[serde(serialize_with = "rfc3339")]
    pub next_change: Option<SystemTime>,
    /// The windows that decide it now: the active deny windows when
    /// closed by one, the active allow windows when open.
    pub because: Vec<String>,
    /// `next_change` as people read it, in the first window's time zone.
    pub next_change_local: Option<String>,
    /// Closed, and overridden (`--ignore-windows`): the pass writes.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ignored: bool,
    /// No `next_change` because the search gave up (windows that start
    /// every minute, back to back, for months), not because there is none
    /// within [`HORIZON`].
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub search_gave_up: bool,
}

fn rfc3339<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t.and_then(|t| Timestamp::try_from(t).ok()) {
        Some(t) => s.serialize_some(&t.to_string()),
        None => s.serialize_none(),
    }
}

impl WindowState {
    /// `outside sync window (opens at 2026-11-27 08:00 CET)`, or `sync
    /// window open until ...`.
    pub fn describe(&self) -> String {
        match (self.open, &self.next_change_local) {
            (false, _) if self.ignored => format!("{HELD}, ignored for this pass"),
            (false, Some(at)) => format!("{HELD} (opens at {at})"),
            (false, None) if self.search_gave_up => {
                format!("{HELD} (its next opening was not found)")
            }
            (false, None) => format!(
                "{HELD} (no opening within {} days)",
                HORIZON.as_secs() / 86_400
            ),
            (true, Some(at)) => format!("sync window open (closes at {at})"),
            (true, None) => "sync window open".into(),
        }
    }
}

/// The windows of an environment, in the order declared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Windows(pub Vec<SyncWindow>);

impl Windows {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether writes are allowed at `now` (without windows, yes): what
    /// a write asks, without the search for the next change.
    pub fn is_open(&self, now: SystemTime) -> bool {
        self.open_at(Timestamp::try_from(now).unwrap_or(Timestamp::UNIX_EPOCH))
    }

    fn open_at(&self, t: Timestamp) -> bool {
        let mut allows = self.0.iter().filter(|w| w.kind == Kind::Allow).peekable();
        let allowed = allows.peek().is_none() || allows.any(|w| w.active_at(t).is_some());
        allowed
            && !self
                .0
                .iter()
                .any(|w| w.kind == Kind::Deny && w.active_at(t).is_some())
    }

    /// The state at `now`; `None` without windows (always open).
    pub fn state(&self, now: SystemTime) -> Option<WindowState> {
        if self.is_empty() {
            return None;
        }
        let now = Timestamp::try_from(now).unwrap_or(Timestamp::UNIX_EPOCH);
        let open = self.open_at(now);
        let (next_change, search_gave_up) = match self.next_change(now, open) {
            Search::Found(t) => (Some(t), false),
            Search::Beyond => (None, false),
            Search::GaveUp => (None, true),
        };
        let because = self
            .0
            .iter()
            .filter(|w| {
                let active = w.active_at(now).is_some();
                active && (w.kind == Kind::Deny) != open
            })
            .map(SyncWindow::describe)
            .collect();
        let tz = &self.0[0].tz;
        Some(WindowState {
            open,
            next_change: next_change.map(SystemTime::from),
            because,
            next_change_local: next_change.map(|t| {
                t.to_zoned(tz.clone())
                    .strftime("%Y-%m-%d %H:%M %Z")
                    .to_string()
            }),
            ignored: false,
            search_gave_up,
        })
    }

    /// The first instant after `now` whose openness differs from `open`.
    ///
    /// It steps from one instant where openness may change to the next:
    /// while closed by deny windows, to the latest of their ends (a freeze
    /// is crossed in one step); while closed for want of an allow window,
    /// to the next allow start; while open, to the next deny start or the
    /// end of an active allow window.
    fn next_change(&self, now: Timestamp, open: bool) -> Search {
        let Some(limit) = add(now, HORIZON) else {
            return Search::Beyond;
        };
        let (allows, denies): (Vec<&SyncWindow>, Vec<&SyncWindow>) =
            self.0.iter().partition(|w| w.kind == Kind::Allow);
        let mut t = now;
        for _ in 0..MAX_STEPS {
            let active_deny_ends: Vec<Timestamp> = denies
                .iter()
                .filter_map(|w| w.active_at(t).map(|(_, end)| end))
                .collect();
            let next = if !active_deny_ends.is_empty() && !open {
                active_deny_ends.into_iter().max()
            } else if !open {
                allows.iter().filter_map(|w| w.next_start(t)).min()
            } else {
                denies
                    .iter()
                    .filter_map(|w| w.next_start(t))
                    .chain(
                        allows
                            .iter()
                            .filter_map(|w| w.active_at(t).map(|(_, end)| end)),
                    )
                    .min()
            };
            let Some(next) = next else {
                return Search::Beyond;
            };
            if next > limit {
                return Search::Beyond;
            }
            t = next;
            if self.open_at(t) != open {
                return Search::Found(t);
            }
        }
        Search::GaveUp
    }
}

/// What the search for the next change found.
enum Search {
    Found(Timestamp),
    /// No change within [`HORIZON`].
    Beyond,
    /// Too many steps (windows back to back, every minute).
    GaveUp,
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Kind, String> {
        match s {
            "allow" => Ok(Kind::Allow),
            "deny" => Ok(Kind::Deny),
            _ => Err(format!("unknown window kind `{s}` (allow or deny)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> SystemTime {
        SystemTime::from(s.parse::<Timestamp>().unwrap())
    }

    fn window(kind: Kind, schedule: &str, duration: &str, tz: &str) -> SyncWindow {
        SyncWindow::new(
            kind,
            schedule,
            humantime::parse_duration(duration).unwrap(),
            tz,
        )
        .unwrap()
    }

    fn business_hours() -> Windows {
        // Weekdays 08:00 to 18:00 in Berlin.
        Windows(vec![window(
            Kind::Allow,
            "0 8 * * 1-5",
            "10h",
            "Europe/Berlin",
        )])
    }

    #[test]
    fn no_windows_means_always_open() {
        assert_eq!(Windows::default().state(at("2026-11-26T03:00:00Z")), None);
    }

    #[test]
    fn an_allow_window_is_open_from_its_start_to_just_before_its_end() {
        let w = business_hours();
        // Thursday 26 November 2026; Berlin is UTC+1 in winter.
        let before = w.state(at("2026-11-26T06:59:59Z")).unwrap();
        assert!(!before.open);
        assert_eq!(before.next_change, Some(at("2026-11-26T07:00:00Z")));
        assert_eq!(
            before.describe(),
            "outside sync window (opens at 2026-11-26 08:00 CET)"
        );
        let start = w.state(at("2026-11-26T07:00:00Z")).unwrap();
        assert!(start.open);
        assert_eq!(start.next_change, Some(at("2026-11-26T17:00:00Z")));
        assert_eq!(
            start.because,
            vec!["allow `0 8 * * 1-5` for 10h (Europe/Berlin)"]
        );
        assert!(w.state(at("2026-11-26T16:59:59Z")).unwrap().open);
        let end = w.state(at("2026-11-26T17:00:00Z")).unwrap();
        assert!(!end.open);
        // Friday's window opens next.
        assert_eq!(end.next_change, Some(at("2026-11-27T07:00:00Z")));
    }

    #[test]
    fn the_weekend_waits_for_monday() {
        let w = business_hours();
        let saturday = w.state(at("2026-11-28T12:00:00Z")).unwrap();
        assert!(!saturday.open);
        assert_eq!(saturday.next_change, Some(at("2026-11-30T07:00:00Z")));
    }

    #[test]
    fn a_deny_window_closes_whatever_allow_window_is_open() {
        let mut w = business_hours();
        // A freeze every Friday from 12:00 for 3 days.
        w.0.push(window(Kind::Deny, "0 12 * * 5", "3d", "Europe/Berlin"));
        let friday_morning = w.state(at("2026-11-27T10:00:00Z")).unwrap();
        assert!(friday_morning.open);
        // It closes at the freeze, before the allow window's end.
        assert_eq!(friday_morning.next_change, Some(at("2026-11-27T11:00:00Z")));
        let friday_afternoon = w.state(at("2026-11-27T12:00:00Z")).unwrap();
        assert!(!friday_afternoon.open);
        assert_eq!(
            friday_afternoon.because,
            vec!["deny `0 12 * * 5` for 3days (Europe/Berlin)"]
        );
        // The freeze ends Monday 12:00, inside Monday's allow window.
        assert_eq!(
            friday_afternoon.next_change,
            Some(at("2026-11-30T11:00:00Z"))
        );
    }

    #[test]
    fn deny_windows_alone_leave_the_rest_of_the_time_open() {
        let w = Windows(vec![window(Kind::Deny, "0 22 * * *", "8h", "UTC")]);
        assert!(w.state(at("2026-11-26T21:59:00Z")).unwrap().open);
        let night = w.state(at("2026-11-26T23:00:00Z")).unwrap();
        assert!(!night.open);
        assert_eq!(night.next_change, Some(at("2026-11-27T06:00:00Z")));
        assert_eq!(
            night.describe(),
            "outside sync window (opens at 2026-11-27 06:00 UTC)"
        );
    }

    #[test]
    fn overlapping_occurrences_keep_a_window_open() {
        // Every hour for 90 minutes: always open once started.
        let w = Windows(vec![window(Kind::Allow, "0 * * * *", "90m", "UTC")]);
        let s = w.state(at("2026-11-26T10:59:00Z")).unwrap();
        assert!(s.open);
        assert_eq!(s.next_change, None);
        assert_eq!(s.describe(), "sync window open");
    }

    #[test]
    fn the_same_wall_clock_window_moves_in_utc_across_daylight_saving() {
        // 08:00 New York is 13:00 UTC in winter, 12:00 UTC from Sunday 8
        // March 2026.
        let w = Windows(vec![window(
            Kind::Allow,
            "0 8 * * *",
            "1h",
            "America/New_York",
        )]);
        assert!(w.state(at("2026-03-07T13:30:00Z")).unwrap().open);
        assert!(w.state(at("2026-03-08T12:30:00Z")).unwrap().open);
        assert!(!w.state(at("2026-03-08T13:30:00Z")).unwrap().open);
        let before = w.state(at("2026-03-08T05:00:00Z")).unwrap();
        assert_eq!(before.next_change, Some(at("2026-03-08T12:00:00Z")));
        assert_eq!(
            before.describe(),
            "outside sync window (opens at 2026-03-08 08:00 EDT)"
        );
    }

    #[test]
    fn a_start_skipped_by_spring_forward_opens_right_after_the_gap() {
        // Berlin skips 02:00-03:00 on Sunday 29 March 2026 (01:00 UTC).
        let w = Windows(vec![window(
            Kind::Allow,
            "30 2 * * *",
            "1h",
            "Europe/Berlin",
        )]);
        let s = w.state(at("2026-03-29T00:30:00Z")).unwrap();
        assert!(!s.open);
        assert_eq!(s.next_change, Some(at("2026-03-29T01:00:00Z")));
        // Open for an hour of real time from 03:00 CEST.
        assert!(w.state(at("2026-03-29T01:59:00Z")).unwrap().open);
        assert!(!w.state(at("2026-03-29T02:00:00Z")).unwrap().open);
    }

    #[test]
    fn a_start_repeated_by_fall_back_opens_once_for_its_duration() {
        // Berlin repeats 02:00-03:00 on Sunday 25 October 2026: 02:30 CEST
        // is 00:30 UTC, 02:30 CET is 01:30 UTC.
        let w = Windows(vec![window(
            Kind::Allow,
            "30 2 * * *",
            "30m",
            "Europe/Berlin",
        )]);
        let s = w.state(at("2026-10-25T00:00:00Z")).unwrap();
        assert_eq!(s.next_change, Some(at("2026-10-25T00:30:00Z")));
        assert!(w.state(at("2026-10-25T00:45:00Z")).unwrap().open);
        assert!(!w.state(at("2026-10-25T01:00:00Z")).unwrap().open);
        // The repeated 02:30 does not open it again.
        assert!(!w.state(at("2026-10-25T01:45:00Z")).unwrap().open);
        // A window spanning the change lasts its duration in real time:
        // 01:00 CEST for 3h ends at 03:00 CET, 02:00 UTC.
        let w = Windows(vec![window(
            Kind::Allow,
            "0 1 * * *",
            "3h",
            "Europe/Berlin",
        )]);
        let s = w.state(at("2026-10-24T23:00:00Z")).unwrap();
        assert!(s.open);
        assert_eq!(s.next_change, Some(at("2026-10-25T02:00:00Z")));
    }

    #[test]
    fn a_schedule_of_several_times_in_the_changing_hour_is_an_interval() {
        // Berlin skips 02:00-03:00 on 29 March 2026: neither 02:00 nor
        // 02:30 exists, and neither fires.
        let w = Windows(vec![window(
            Kind::Allow,
            "*/30 2 * * *",
            "20m",
            "Europe/Berlin",
        )]);
        assert!(!w.state(at("2026-03-29T01:10:00Z")).unwrap().open);
        assert_eq!(
            w.state(at("2026-03-29T00:59:00Z")).unwrap().next_change,
            Some(at("2026-03-30T00:00:00Z"))
        );
        // On 25 October 02:00-03:00 comes twice: 02:30 CEST and 02:30 CET.
        assert!(w.state(at("2026-10-25T00:35:00Z")).unwrap().open);
        assert!(w.state(at("2026-10-25T01:35:00Z")).unwrap().open);
    }

    #[test]
    fn a_long_freeze_is_crossed_in_one_step_and_endless_denial_is_said() {
        // Open around the clock, frozen for 14 days from 20 December.
        let w = Windows(vec![
            window(Kind::Allow, "* * * * *", "2m", "UTC"),
            window(Kind::Deny, "0 0 20 12 *", "14days", "UTC"),
        ]);
        let frozen = w.state(at("2026-12-21T00:00:00Z")).unwrap();
        assert!(!frozen.open);
        assert_eq!(frozen.next_change, Some(at("2027-01-03T00:00:00Z")));
        // A deny window back to back every minute never ends: the search
        // gives up and says so, rather than claim a year.
        let never = Windows(vec![window(Kind::Deny, "* * * * *", "2m", "UTC")]);
        let s = never.state(at("2026-12-21T00:00:00Z")).unwrap();
        assert!(!s.open && s.search_gave_up, "{s:?}");
        assert_eq!(
            s.describe(),
            "outside sync window (its next opening was not found)"
        );
        assert!(!never.is_open(at("2026-12-21T00:00:30Z")));
        assert!(Windows::default().is_open(at("2026-12-21T00:00:30Z")));
    }

    #[test]
    fn bad_windows_say_what_is_wrong() {
        let d = Duration::from_secs(3600);
        let e = SyncWindow::new(Kind::Allow, "0 8 * *", d, "UTC").unwrap_err();
        assert!(
            e.to_string().starts_with("invalid cron schedule `0 8 * *`"),
            "{e}"
        );
        let e = SyncWindow::new(Kind::Allow, "0 0 8 * * *", d, "UTC").unwrap_err();
        assert!(e.to_string().starts_with("invalid cron schedule"), "{e}");
        let e = SyncWindow::new(Kind::Allow, "61 8 * * *", d, "UTC").unwrap_err();
        assert!(e.to_string().starts_with("invalid cron schedule"), "{e}");
        let e = SyncWindow::new(Kind::Allow, "0 8 * * *", d, "Mars/Olympus").unwrap_err();
        assert_eq!(e, WindowError::TimeZone("Mars/Olympus".into()));
        let e = SyncWindow::new(Kind::Allow, "0 0 30 2 *", d, "UTC").unwrap_err();
        assert_eq!(e, WindowError::NeverFires("0 0 30 2 *".into()));
        for d in [
            Duration::ZERO,
            Duration::from_secs(59),
            HORIZON + Duration::from_secs(1),
        ] {
            let e = SyncWindow::new(Kind::Allow, "0 8 * * *", d, "UTC").unwrap_err();
            assert_eq!(e, WindowError::Duration);
        }
    }
}
