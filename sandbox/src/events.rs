//! Audit events: every denial the sandbox or the tunneler can see, as one JSON object per line.
//!
//! Events go to `umbra run --events FILE` and to the controller's audit log. They carry the
//! sandbox id and the identity, never a secret: a refused DNS name is what the agent asked
//! for, and that is the point of recording it.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    /// The agent started.
    Started {
        /// The command's first word.
        command: String,
    },
    /// A DNS query for a name the identity may not reach.
    DnsRefused {
        /// The name as asked (case kept), in RFC 1035 presentation form.
        name: String,
    },
    /// A DNS query the responder could not parse (FORMERR or NOTIMP). Audited like a refusal:
    /// a malformed query is still something the agent sent out, and may carry data.
    DnsMalformed {
        /// What was wrong.
        reason: String,
        /// The question's name as far as it could be read, in presentation form.
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// A connection to a listener whose service the router refused.
    DialDenied {
        /// The service.
        service: String,
        /// The router's reason, as the SDK reports it.
        reason: String,
    },
    /// A limit was hit.
    Limit {
        /// `memory` or `pids`.
        limit: String,
    },
    /// The agent ran past `--timeout` and was killed.
    Timeout {
        /// The timeout in milliseconds.
        after_ms: u64,
    },
    /// The identity was revoked while the agent ran.
    Revoked {
        /// Whether the agent was terminated (not with `--keep-on-revoke`).
        terminated: bool,
    },
    /// Events the audit window did not admit (see [`EventWindow`]): how many, so that a flood
    /// of refused names is still visible as a flood.
    Suppressed {
        /// What was suppressed (`dns`).
        what: String,
        /// How many events were not written since the last summary.
        count: u64,
    },
    /// The agent ended.
    Exited {
        /// `umbra run`'s exit code.
        code: i32,
    },
}

/// One event.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// RFC 3339, UTC.
    pub at: String,
    /// The sandbox.
    pub sandbox: String,
    /// The identity's name.
    pub identity: String,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

type Forward = Box<dyn Fn(&Event) + Send + Sync>;

/// Where events go: a JSON-lines file (optional) and a forwarding hook (the controller).
#[derive(Clone)]
pub struct EventSink {
    sandbox: String,
    identity: String,
    file: Option<Arc<Mutex<std::fs::File>>>,
    forward: Option<Arc<Forward>>,
    /// What stamps the events (`at`).
    clock: umbra_clock::Clock,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink")
            .field("sandbox", &self.sandbox)
            .field("file", &self.file.is_some())
            .finish()
    }
}

impl EventSink {
    /// A sink for one sandbox; `file` is created (or appended to) now, so a bad path fails
    /// before anything starts. It is opened by `umbra_pki::open_append`: created 0600 (events
    /// name what the agent tried to reach), appended to in place if it is a FIFO or device, and
    /// refused if it is a directory, socket or dangling link.
    pub fn new(sandbox: &str, identity: &str, file: Option<&Path>) -> std::io::Result<EventSink> {
        let file = match file {
            Some(p) => Some(Arc::new(Mutex::new(
                umbra_pki::open_append(p, 0o600).map_err(std::io::Error::other)?,
            ))),
            None => None,
        };
        Ok(EventSink {
            sandbox: sandbox.to_string(),
            identity: identity.to_string(),
            file,
            forward: None,
            clock: umbra_clock::Clock::system(),
        })
    }

    /// Stamps events with `clock` instead of the system clock.
    pub fn with_clock(mut self, clock: umbra_clock::Clock) -> EventSink {
        self.clock = clock;
        self
    }

    /// Also hands every event to `f` (which must not block).
    pub fn forward(mut self, f: impl Fn(&Event) + Send + Sync + 'static) -> EventSink {
        self.forward = Some(Arc::new(Box::new(f)));
        self
    }

    /// Records an event.
    pub fn emit(&self, kind: EventKind) {
        let at = time::OffsetDateTime::from(self.clock.now())
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let ev = Event {
            at,
            sandbox: self.sandbox.clone(),
            identity: self.identity.clone(),
            kind,
        };
        tracing::info!(sandbox = %ev.sandbox, event = ?ev.kind, "sandbox event");
        if let Some(f) = &self.file {
            if let Ok(mut line) = serde_json::to_vec(&ev) {
                line.push(b'\n');
                if let Ok(mut f) = f.lock() {
                    let _ = f.write_all(&line);
                }
            }
        }
        if let Some(fwd) = &self.forward {
            fwd(&ev);
        }
    }
}

/// Bounds how many events one kind of agent behaviour can produce: each key (a refused name,
/// say) at most once per period, and at most `max_keys` keys per period. An agent that asks a
/// million names a second then costs the audit log `max_keys` lines a second, not a million.
/// Time is an argument, so the window is tested without a clock.
#[derive(Debug)]
pub struct EventWindow {
    period: std::time::Duration,
    max_keys: usize,
    started: Option<std::time::Instant>,
    seen: std::collections::HashSet<String>,
    suppressed: u64,
    /// Suppressed since the last [`EventWindow::summary`].
    unreported: u64,
}

impl EventWindow {
    /// A window of `period` admitting at most `max_keys` distinct keys in each.
    pub fn new(period: std::time::Duration, max_keys: usize) -> EventWindow {
        EventWindow {
            period,
            max_keys,
            started: None,
            seen: Default::default(),
            suppressed: 0,
            unreported: 0,
        }
    }

    /// Whether an event for `key` at `now` is to be emitted.
    pub fn admit(&mut self, now: std::time::Instant, key: &str) -> bool {
        let fresh = match self.started {
            None => true,
            Some(s) => now.saturating_duration_since(s) >= self.period,
        };
        if fresh {
            self.started = Some(now);
            self.seen.clear();
        }
        if self.seen.len() >= self.max_keys || self.seen.contains(key) {
            self.suppressed += 1;
            self.unreported += 1;
            return false;
        }
        self.seen.insert(key.to_string());
        true
    }

    /// How many events were not admitted so far.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }

    /// How many events were suppressed since the last summary, once a period has passed since
    /// that summary (or `flush` is set, at the end of a sandbox): what the caller writes as one
    /// [`EventKind::Suppressed`] line. `None` when there is nothing to say yet, so a flood costs
    /// one summary a period.
    pub fn summary(&mut self, now: std::time::Instant, flush: bool) -> Option<u64> {
        if self.unreported == 0 {
            return None;
        }
        let due = flush
            || self
                .started
                .is_some_and(|s| now.saturating_duration_since(s) >= self.period);
        if !due {
            return None;
        }
        Some(std::mem::take(&mut self.unreported))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_stamped_by_the_sinks_clock_in_rfc3339() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_126_400);
        let clock = umbra_clock::ManualClock::new(at);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = EventSink::new("s", "a", None)
            .expect("sink")
            .with_clock(clock.clock())
            .forward({
                let seen = Arc::clone(&seen);
                move |e| seen.lock().expect("lock").push(e.at.clone())
            });
        sink.emit(EventKind::Started {
            command: "x".into(),
        });
        assert_eq!(*seen.lock().expect("lock"), ["2026-12-01T12:00:00Z"]);
    }

    #[test]
    fn the_window_admits_each_key_once_and_a_bounded_number_per_period() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let mut w = EventWindow::new(Duration::from_secs(1), 3);
        assert!(w.admit(t0, "a"));
        assert!(!w.admit(t0, "a"));
        assert!(
            w.admit(t0 + Duration::from_millis(10), "A"),
            "keys keep case"
        );
        assert!(w.admit(t0 + Duration::from_millis(20), "b"));
        assert!(
            !w.admit(t0 + Duration::from_millis(30), "c"),
            "over the bound"
        );
        // A million distinct keys within the period: none admitted.
        let admitted = (0..1_000_000)
            .filter(|i| w.admit(t0 + Duration::from_millis(999), &i.to_string()))
            .count();
        assert_eq!(admitted, 0);
        assert_eq!(w.suppressed(), 1_000_002);
        // The next period starts afresh.
        assert!(w.admit(t0 + Duration::from_secs(1), "a"));
        assert!(w.admit(t0 + Duration::from_secs(1), "c"));
        // A clock that goes backwards does not wedge it.
        assert!(!w.admit(t0, "a"));
    }

    #[test]
    fn what_the_window_suppresses_is_summarised_once_a_period() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let mut w = EventWindow::new(Duration::from_secs(1), 2);
        assert_eq!(
            w.summary(t0, true),
            None,
            "nothing suppressed, nothing said"
        );
        for i in 0..10 {
            w.admit(t0, &i.to_string());
        }
        // Within the period: not yet.
        assert_eq!(w.summary(t0 + Duration::from_millis(500), false), None);
        assert_eq!(w.summary(t0 + Duration::from_secs(1), false), Some(8));
        assert_eq!(w.summary(t0 + Duration::from_secs(2), false), None);
        // The next period's suppressions are summarised on their own; a flush says them at once.
        w.admit(t0 + Duration::from_secs(1), "a");
        w.admit(t0 + Duration::from_secs(1), "a");
        assert_eq!(w.summary(t0 + Duration::from_millis(1100), false), None);
        assert_eq!(w.summary(t0 + Duration::from_millis(1100), true), Some(1));
        assert_eq!(w.suppressed(), 9);
    }

    #[test]
    fn a_malformed_query_event_carries_its_reason_and_name_if_any() {
        let v = serde_json::to_value(EventKind::DnsMalformed {
            reason: "truncated name".into(),
            name: Some("Ab\\c".into()),
        })
        .unwrap();
        assert_eq!(v["kind"], "dns_malformed");
        assert_eq!(v["name"], "Ab\\c");
        let v = serde_json::to_value(EventKind::DnsMalformed {
            reason: "x".into(),
            name: None,
        })
        .unwrap();
        assert!(v.get("name").is_none());
    }

    #[test]
    fn events_are_json_lines_with_their_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ev.jsonl");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let sink = EventSink::new("sb-1", "agent-1", Some(&path))
            .unwrap()
            .forward(move |e| s2.lock().unwrap().push(e.kind.clone()));
        sink.emit(EventKind::DnsRefused {
            name: "evil.example".into(),
        });
        sink.emit(EventKind::Exited { code: 3 });
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["kind"], "dns_refused");
        assert_eq!(lines[0]["name"], "evil.example");
        assert_eq!(lines[0]["sandbox"], "sb-1");
        assert_eq!(lines[0]["identity"], "agent-1");
        assert_eq!(lines[1]["code"], 3);
        assert_eq!(seen.lock().unwrap().len(), 2);
        // Private from creation, whatever the umask: events name what the agent reached for.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
