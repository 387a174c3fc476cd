//! The syslog sink: one RFC 5424 message per event, over UDP (one datagram each, RFC 5426),
//! TCP with octet-counting framing (RFC 6587 section 3.4.1) or a Unix datagram socket.
//!
//! A message is `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [umbra@32473 ...] JSON`:
//! MSGID is the event kind, the structured data carries the audit id, actor and target, and
//! MSG is the event as JSON (MSG-ANY: no BOM). 32473 is the private enterprise number RFC 5612
//! reserves for examples; a deployment that has its own can filter on the SD-ID's name.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket, UnixDatagram};

use super::config::SyslogTransport;
use super::{Event, SinkError};

/// Longest message sent; MSG is cut (at a character boundary) to fit. 8 KiB travels in one
/// datagram on loopback and on any network a collector is likely to sit on.
pub const MAX_MESSAGE: usize = 8192;

/// The SD-ID of Umbra's structured data element.
const SD_ID: &str = "umbra@32473";

/// Severity by kind: refusals are warnings (4), revocations notices (5), the rest
/// informational (6).
pub fn severity(kind: &str) -> u8 {
    if kind.contains("denied")
        || kind.contains("refused")
        || kind.ends_with("malformed")
        || kind == "sinks.dropped"
        || kind == "audit.suppressed"
    {
        4
    } else if kind.ends_with("revoke") || kind.ends_with("revoked") || kind.ends_with(".delete") {
        5
    } else {
        6
    }
}

/// Printable US-ASCII (33 to 126) only, at most `max` bytes, `-` when nothing is left: the
/// grammar of HOSTNAME, APP-NAME, PROCID and MSGID.
fn header_field(s: &str, max: usize) -> String {
    let v: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v
    }
}

/// PARAM-VALUE escaping: `"`, `\` and `]` are preceded by a backslash.
fn param_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The machine's host name, for HOSTNAME.
pub fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    header_field(raw.trim(), 255)
}

/// Formats one event as an RFC 5424 message.
pub fn format(e: &Event, facility: u8, host: &str, app: &str, pid: u32) -> String {
    let pri = u16::from(facility) * 8 + u16::from(severity(&e.kind));
    let mut msg = format!(
        "<{pri}>1 {} {} {} {} {} [{SD_ID} id=\"{}\" actor=\"{}\" target=\"{}\"] ",
        e.time,
        header_field(host, 255),
        header_field(app, 48),
        pid,
        header_field(&e.kind, 32),
        e.id,
        param_value(&e.actor),
        param_value(&e.target),
    );
    let body = serde_json::to_string(e).unwrap_or_default();
    let room = MAX_MESSAGE.saturating_sub(msg.len());
    let mut cut = body.len().min(room);
    while !body.is_char_boundary(cut) {
        cut -= 1;
    }
    msg.push_str(&body[..cut]);
    msg
}

/// A syslog connection (or socket), opened on first use and again after a failure.
#[derive(Debug)]
pub struct SyslogSink {
    transport: SyslogTransport,
    facility: u8,
    app: String,
    host: String,
    tcp: Option<TcpStream>,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl SyslogSink {
    /// A sink for `transport`.
    pub fn new(transport: SyslogTransport, facility: u8, app: String) -> SyslogSink {
        SyslogSink {
            transport,
            facility,
            app,
            host: hostname(),
            tcp: None,
        }
    }

    /// Sends every event, in order; on an error the batch is retried whole later.
    pub async fn send(&mut self, events: &[Event]) -> Result<(), SinkError> {
        let pid = std::process::id();
        let msgs: Vec<String> = (events.iter())
            .map(|e| format(e, self.facility, &self.host, &self.app, pid))
            .collect();
        let io = |e: std::io::Error| SinkError::Io(e.to_string());
        match &self.transport {
            SyslogTransport::Udp(addr) => {
                let bind = if addr.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let sock = UdpSocket::bind(bind).await.map_err(io)?;
                sock.connect(addr).await.map_err(io)?;
                for m in &msgs {
                    sock.send(m.as_bytes()).await.map_err(io)?;
                }
            }
            SyslogTransport::Unix(path) => {
                let sock = UnixDatagram::unbound().map_err(io)?;
                for m in &msgs {
                    sock.send_to(m.as_bytes(), path).await.map_err(io)?;
                }
            }
            SyslogTransport::Tcp(addr) => {
                if self.tcp.is_none() {
                    let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
                        .await
                        .map_err(|_| SinkError::Io("connect timed out".into()))?
                        .map_err(io)?;
                    self.tcp = Some(s);
                }
                let mut frames = Vec::new();
                for m in &msgs {
                    frames.extend_from_slice(format!("{} ", m.len()).as_bytes());
                    frames.extend_from_slice(m.as_bytes());
                }
                let Some(s) = self.tcp.as_mut() else {
                    return Err(SinkError::Io("not connected".into()));
                };
                if let Err(e) = s.write_all(&frames).await {
                    self.tcp = None;
                    return Err(io(e));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, actor: &str) -> Event {
        Event {
            id: 42,
            time: "2026-01-02T03:04:05Z".into(),
            kind: kind.into(),
            actor: actor.into(),
            target: "umbra-1a2b".into(),
            detail: serde_json::json!({ "host": "evil.example", "port": 443 }),
        }
    }

    #[test]
    fn messages_parse_as_rfc_5424() {
        let e = event("sandbox.dial_denied", r#"spiffe://t/agent/a"b]c\d"#);
        let m = format(&e, 13, "host-1", "umbra", 777);
        let p = syslog_rfc5424::parse_message(&m).expect(&m);
        assert_eq!(p.facility as i32, 13);
        assert_eq!(p.severity as i32, 4, "a refusal is a warning");
        assert_eq!(p.hostname.as_deref(), Some("host-1"));
        assert_eq!(p.appname.as_deref(), Some("umbra"));
        assert_eq!(p.msgid.as_deref(), Some("sandbox.dial_denied"));
        assert_eq!(p.timestamp, Some(1_767_323_045));
        let sd = p.sd.find_sdid(SD_ID).expect("structured data");
        assert_eq!(sd.get("id").map(String::as_str), Some("42"));
        assert_eq!(
            sd.get("actor").map(String::as_str),
            Some(r#"spiffe://t/agent/a"b]c\d"#),
            "escaped and unescaped again"
        );
        let body: serde_json::Value = serde_json::from_str(&p.msg).unwrap();
        assert_eq!(body["detail"]["host"], "evil.example");
    }

    #[tokio::test]
    async fn tcp_frames_are_octet_counted_and_unix_datagrams_whole() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut sink = SyslogSink::new(SyslogTransport::Tcp(addr), 13, "umbra".into());
        let events = [
            event("sandbox.dial_denied", "a"),
            event("identity.revoke", "b"),
        ];
        let (sent, accepted) = tokio::join!(sink.send(&events), listener.accept());
        sent.unwrap();
        let (mut conn, _) = accepted.unwrap();
        sink.send(&events[..1]).await.unwrap();
        drop(sink);
        let mut all = Vec::new();
        conn.read_to_end(&mut all).await.unwrap();
        // RFC 6587 3.4.1: MSG-LEN SP SYSLOG-MSG, back to back.
        let mut rest = &all[..];
        let mut ids = Vec::new();
        while !rest.is_empty() {
            let sp = rest.iter().position(|&b| b == b' ').unwrap();
            let len: usize = std::str::from_utf8(&rest[..sp]).unwrap().parse().unwrap();
            let msg = std::str::from_utf8(&rest[sp + 1..sp + 1 + len]).unwrap();
            ids.push(syslog_rfc5424::parse_message(msg).unwrap().msgid.unwrap());
            rest = &rest[sp + 1 + len..];
        }
        assert_eq!(
            ids,
            [
                "sandbox.dial_denied",
                "identity.revoke",
                "sandbox.dial_denied"
            ]
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let rx = tokio::net::UnixDatagram::bind(&path).unwrap();
        let mut sink = SyslogSink::new(SyslogTransport::Unix(path), 4, "umbra".into());
        sink.send(&events).await.unwrap();
        let mut buf = vec![0u8; MAX_MESSAGE];
        for want in ["sandbox.dial_denied", "identity.revoke"] {
            let n = rx.recv(&mut buf).await.unwrap();
            let m = syslog_rfc5424::parse_message(std::str::from_utf8(&buf[..n]).unwrap()).unwrap();
            assert_eq!(m.msgid.as_deref(), Some(want));
            assert_eq!(m.facility as i32, 4);
        }
    }

    #[test]
    fn fields_are_bounded_and_long_messages_cut() {
        let mut e = event("identity.revoke", "spiffe://t/admin/root");
        e.detail = serde_json::json!({ "pad": "é".repeat(10_000) });
        let m = format(&e, 4, "", "umbra", 1);
        assert!(m.len() <= MAX_MESSAGE);
        let p = syslog_rfc5424::parse_message(&m).expect("parses");
        assert_eq!(p.severity as i32, 5);
        assert_eq!(p.hostname, None, "NILVALUE");
        assert_eq!(header_field(&"k".repeat(40), 32).len(), 32);
        assert_eq!(header_field("a b\tc", 32), "abc");
    }
}
