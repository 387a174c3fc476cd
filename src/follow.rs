//! `umbra audit --follow`: prints the controller's audit log as it grows, as lines for a person
//! or JSON lines, and picks up after its last printed id when the stream breaks.

use std::io::Write;
use std::time::Duration;

use umbra_proto::api::AuditEntry;
use umbra_sdk::ControllerClient;

use crate::output;

/// Longest line accepted from the controller (an entry's detail is bounded far below this).
const MAX_LINE: usize = 1 << 20;

/// A short account of a router's stream decision (policy or reason, bytes each way,
/// duration), so that the audit table says who reached what under which policy; empty for
/// other entries.
pub fn summary(e: &AuditEntry) -> String {
    if !e.action.starts_with("router.") {
        return String::new();
    }
    let d = &e.detail;
    let mut parts = Vec::new();
    if let Some(p) = d["policy"].as_str() {
        parts.push(format!("policy={p}"));
    }
    if let Some(r) = d["reason"].as_str() {
        parts.push(format!("reason={r:?}"));
    }
    if e.action != "router.stream_refused" {
        parts.push(format!(
            "bytes={}/{} {}ms",
            d["bytes_up"].as_u64().unwrap_or(0),
            d["bytes_down"].as_u64().unwrap_or(0),
            d["duration_ms"].as_u64().unwrap_or(0)
        ));
    }
    parts.join(" ")
}

/// Prints one entry.
pub fn print(e: &AuditEntry, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, e)?;
        writeln!(out)?;
    } else {
        writeln!(out, "{}", line(e))?;
    }
    out.flush()?;
    Ok(())
}

/// One entry as a line for a terminal. An agent chooses parts of what it reports (the names
/// it asked for, its own events' details), and JSON leaves C1 controls (`U+009B` starts an
/// escape sequence in terminals that honour it) and bidirectional overrides (which reorder
/// what is shown) as they are: every such character is printed escaped.
pub fn line(e: &AuditEntry) -> String {
    let detail = match &e.detail {
        serde_json::Value::Null => String::new(),
        d => d.to_string(),
    };
    let text = format!(
        "{:>6}  {}  {}  {}  {}  {}",
        e.id,
        output::time(e.at),
        e.actor,
        e.action,
        e.target,
        detail
    );
    printable(&text)
}

/// `s` with control characters (C0, DEL, C1) and bidirectional formatting characters
/// escaped as `\u{..}`.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || bidi {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// Follows until interrupted: after a broken stream or a controller's `error` line it waits
/// (1 s, doubling to 10 s while failures go on) and resumes after the last id printed.
pub async fn follow(
    c: &ControllerClient,
    mut after: Option<u64>,
    json: bool,
) -> anyhow::Result<()> {
    let mut pause = Duration::from_secs(1);
    loop {
        let path = match after {
            Some(a) => format!("/v1/audit/follow?after={a}"),
            None => "/v1/audit/follow".to_owned(),
        };
        match c.stream(&path).await {
            Err(e) => eprintln!("umbra: cannot follow the audit log: {e}; retrying"),
            Ok(mut s) => {
                let mut buf: Vec<u8> = Vec::new();
                let why = loop {
                    match s.chunk().await {
                        Ok(Some(b)) => buf.extend_from_slice(&b),
                        Ok(None) => break "the controller ended the stream".to_owned(),
                        Err(e) => break e.to_string(),
                    }
                    let mut ended = None;
                    while let Some(i) = buf.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=i).collect();
                        let line = &line[..line.len() - 1];
                        if line.is_empty() {
                            continue;
                        }
                        let v: serde_json::Value = match serde_json::from_slice(line) {
                            Ok(v) => v,
                            Err(e) => {
                                ended = Some(format!("unexpected line: {e}"));
                                break;
                            }
                        };
                        if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
                            ended = Some(err.to_owned());
                            break;
                        }
                        let entry: AuditEntry = match serde_json::from_value(v) {
                            Ok(e) => e,
                            Err(e) => {
                                ended = Some(format!("unexpected entry: {e}"));
                                break;
                            }
                        };
                        print(&entry, json)?;
                        // A row committed late on a shared store comes after higher ids: resume after the
                        // highest.
                        after = Some(after.map_or(entry.id, |a| a.max(entry.id)));
                        pause = Duration::from_secs(1);
                    }
                    if buf.len() > MAX_LINE {
                        ended = Some("a line too long".into());
                    }
                    if let Some(why) = ended {
                        break why;
                    }
                };
                eprintln!("umbra: audit stream ended ({why}); resuming");
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agents_escape_sequences_and_overrides_print_escaped() {
        let e = AuditEntry {
            id: 7,
            at: umbra_policies::Timestamp(0),
            actor: "spiffe://t/agent/a".into(),
            action: "sandbox.dns_refused".into(),
            target: "umbra-1".into(),
            detail: serde_json::json!({"event": {"name": "x\u{9b}2J\u{1b}[31m\u{202e}moc.live"}}),
        };
        let l = line(&e);
        assert!(!l.chars().any(|c| c.is_control()), "{l:?}");
        assert!(!l.contains('\u{202e}'), "{l:?}");
        assert!(
            l.contains("\\u{9b}2J") && l.contains("\\u{202e}moc.live"),
            "{l}"
        );
        // Plain text is untouched.
        assert_eq!(printable("héllo wörld"), "héllo wörld");
    }
}
