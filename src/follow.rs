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
        let detail = match &e.detail {
            serde_json::Value::Null => String::new(),
            d => d.to_string(),
        };
        writeln!(
            out,
            "{:>6}  {}  {}  {}  {}  {}",
            e.id,
            output::time(e.at),
            e.actor,
            e.action,
            e.target,
            detail
        )?;
    }
    out.flush()?;
    Ok(())
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
