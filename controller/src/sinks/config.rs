//! The sinks file (`umbra controller run --sinks FILE`, YAML): parsed into DTOs that refuse
//! unknown fields, then converted into [`SinkConfig`]s that cannot hold a bad value. Every
//! problem in the file is reported at once.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::filter::KindFilter;

/// Why a sinks file was refused: every problem found, each naming its sink.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct ConfigError(pub Vec<String>);

/// A webhook's signing secret. Never printed: `Debug` shows `"..."`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// The secret's bytes, for the HMAC key alone.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
impl Secret {
    /// A secret for unit tests.
    pub fn from_test(b: &[u8]) -> Secret {
        Secret(b.to_vec())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"...\"")
    }
}

/// A webhook's URL. Many receivers put a token in the path or query (`/services/T0/B0/XYZ`),
/// so `Debug` shows the scheme and authority only.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookUrl(pub hyper::Uri);

impl fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = self.0.scheme_str().unwrap_or("https");
        let authority = self.0.authority().map_or("", |a| a.as_str());
        write!(f, "\"{scheme}://{authority}/...\"")
    }
}

/// Where a syslog sink sends its messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyslogTransport {
    /// One datagram a message (RFC 5426).
    Udp(SocketAddr),
    /// A TCP stream with octet-counting framing (RFC 6587 section 3.4.1).
    Tcp(SocketAddr),
    /// A Unix datagram socket such as `/dev/log`.
    Unix(PathBuf),
}

/// What a sink does with the events it is given.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkKind {
    /// JSON lines appended to a 0600 file, rotated by size.
    File {
        /// The file; rotated copies are `PATH.1` (newest) to `PATH.<keep>`.
        path: PathBuf,
        /// Size at which the file is rotated.
        max_bytes: u64,
        /// Rotated files kept.
        keep: u32,
    },
    /// RFC 5424 messages.
    Syslog {
        /// Where to.
        transport: SyslogTransport,
        /// The facility (0 to 23; 4 is `auth`, 10 `authpriv`, 13 `log audit`).
        facility: u8,
        /// APP-NAME.
        app_name: String,
    },
    /// HTTPS POSTs of JSON batches, signed.
    Webhook {
        /// An `https://` URL.
        url: WebhookUrl,
        /// The HMAC-SHA256 key.
        secret: Secret,
        /// Trust anchors for the receiver (PEM); the system's web roots when absent.
        ca_file: Option<PathBuf>,
        /// How long one POST may take.
        timeout: Duration,
    },
}

/// One validated sink.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    /// Unique in the file; names its cursor file.
    pub name: String,
    /// What it does.
    pub kind: SinkKind,
    /// Which event kinds (audit actions) it gets.
    pub filter: KindFilter,
    /// Most events in one delivery.
    pub batch: u32,
    /// Most events a sink may fall behind before it skips ahead (and says how many it skipped).
    pub max_lag_events: u64,
    /// Oldest an undelivered event may be before the sink skips ahead.
    pub max_lag: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDto {
    sinks: Vec<SinkDto>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkDto {
    name: String,
    kind: String,
    #[serde(default)]
    events: Option<Vec<String>>,
    #[serde(default)]
    batch: Option<u32>,
    #[serde(default)]
    max_lag_events: Option<u64>,
    #[serde(default)]
    max_lag: Option<String>,
    // file
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    max_bytes: Option<u64>,
    #[serde(default)]
    keep: Option<u32>,
    // syslog
    #[serde(default)]
    udp: Option<SocketAddr>,
    #[serde(default)]
    tcp: Option<SocketAddr>,
    #[serde(default)]
    unix: Option<PathBuf>,
    #[serde(default)]
    facility: Option<u8>,
    #[serde(default)]
    app_name: Option<String>,
    // webhook
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    secret_env: Option<String>,
    #[serde(default)]
    secret_file: Option<PathBuf>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    timeout: Option<String>,
}

/// Parses `30s`, `5m`, `2h`, `7d` or a number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().ok()?;
    let mul = match unit {
        "ms" => return Some(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return None,
    };
    Some(Duration::from_secs(n.checked_mul(mul)?))
}

/// Reads and validates a sinks file. `env` looks up environment variables (an argument so that
/// tests need not change the process's environment).
pub fn load(
    path: &Path,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Vec<SinkConfig>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(vec![format!("{}: {e}", path.display())]))?;
    parse(&text, env)
}

/// Validates the text of a sinks file (YAML; JSON is YAML too).
pub fn parse(
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Vec<SinkConfig>, ConfigError> {
    let dto: FileDto =
        serde_yaml_ng::from_str(text).map_err(|e| ConfigError(vec![format!("sinks file: {e}")]))?;
    let mut errors = Vec::new();
    let mut out = Vec::new();
    let mut names = std::collections::HashSet::new();
    for s in dto.sinks {
        let mut err = |m: String| errors.push(format!("sink {:?}: {m}", s.name));
        let name_ok = !s.name.is_empty()
            && s.name.len() <= 64
            && s.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            err("a name is 1 to 64 of [A-Za-z0-9_-]".into());
        } else if !names.insert(s.name.clone()) {
            err("the name is used twice".into());
        }
        let filter = match KindFilter::new(s.events.clone().unwrap_or_else(|| vec!["*".into()])) {
            Ok(f) => f,
            Err(e) => {
                err(e);
                continue;
            }
        };
        let dur = |v: &Option<String>,
                   default: Duration,
                   what: &str,
                   err: &mut dyn FnMut(String)| {
            match v {
                None => default,
                Some(t) => parse_duration(t).unwrap_or_else(|| {
                    err(format!(
                        "{what}: {t:?} is not a duration such as 30s, 5m or 1h"
                    ));
                    default
                }),
            }
        };
        let max_lag = dur(&s.max_lag, Duration::from_secs(3600), "max_lag", &mut err);
        let batch = s.batch.unwrap_or(100);
        if batch == 0 || batch > 1000 {
            err("batch is 1 to 1000".into());
        }
        let max_lag_events = s.max_lag_events.unwrap_or(100_000);
        if max_lag_events == 0 {
            err("max_lag_events must be above 0".into());
        }
        let stray = |fields: &[(&str, bool)], err: &mut dyn FnMut(String)| {
            for (f, set) in fields {
                if *set {
                    err(format!("{f} does not apply to a {} sink", s.kind));
                }
            }
        };
        let kind = match s.kind.as_str() {
            "file" => {
                stray(
                    &[
                        ("udp", s.udp.is_some()),
                        ("tcp", s.tcp.is_some()),
                        ("unix", s.unix.is_some()),
                        ("url", s.url.is_some()),
                        (
                            "secret",
                            s.secret.is_some() || s.secret_env.is_some() || s.secret_file.is_some(),
                        ),
                        ("ca_file", s.ca_file.is_some()),
                    ],
                    &mut err,
                );
                let Some(path) = s.path.clone() else {
                    err("a file sink needs path".into());
                    continue;
                };
                let max_bytes = s.max_bytes.unwrap_or(10 * 1024 * 1024);
                if max_bytes < 1024 {
                    err("max_bytes is at least 1024".into());
                }
                let keep = s.keep.unwrap_or(5);
                if keep > 100 {
                    err("keep is at most 100".into());
                }
                SinkKind::File {
                    path,
                    max_bytes,
                    keep,
                }
            }
            "syslog" => {
                stray(
                    &[
                        ("path", s.path.is_some()),
                        ("url", s.url.is_some()),
                        (
                            "secret",
                            s.secret.is_some() || s.secret_env.is_some() || s.secret_file.is_some(),
                        ),
                        ("ca_file", s.ca_file.is_some()),
                    ],
                    &mut err,
                );
                let transport = match (s.udp, s.tcp, s.unix.clone()) {
                    (Some(a), None, None) => SyslogTransport::Udp(a),
                    (None, Some(a), None) => SyslogTransport::Tcp(a),
                    (None, None, Some(p)) => SyslogTransport::Unix(p),
                    _ => {
                        err("a syslog sink needs exactly one of udp, tcp or unix".into());
                        continue;
                    }
                };
                let facility = s.facility.unwrap_or(13);
                if facility > 23 {
                    err("facility is 0 to 23".into());
                }
                let app_name = s.app_name.clone().unwrap_or_else(|| "umbra".into());
                if app_name.is_empty()
                    || app_name.len() > 48
                    || !app_name.bytes().all(|b| (33..=126).contains(&b))
                {
                    err("app_name is 1 to 48 printable ASCII characters without spaces".into());
                }
                SinkKind::Syslog {
                    transport,
                    facility,
                    app_name,
                }
            }
            "webhook" => {
                stray(
                    &[
                        ("path", s.path.is_some()),
                        ("udp", s.udp.is_some()),
                        ("tcp", s.tcp.is_some()),
                        ("unix", s.unix.is_some()),
                    ],
                    &mut err,
                );
                let url = match s.url.as_deref().map(str::parse::<hyper::Uri>) {
                    Some(Ok(u)) if u.scheme_str() == Some("https") && u.host().is_some() => u,
                    Some(_) => {
                        err("url must be an https:// URL".into());
                        continue;
                    }
                    None => {
                        err("a webhook sink needs url".into());
                        continue;
                    }
                };
                let secret = match (&s.secret, &s.secret_env, &s.secret_file) {
                    (Some(v), None, None) => Some(v.clone()),
                    (None, Some(var), None) => env(var).or_else(|| {
                        err(format!("secret_env: ${var} is not set"));
                        None
                    }),
                    (None, None, Some(p)) => match std::fs::read_to_string(p) {
                        Ok(v) => Some(v.trim_end_matches(['\n', '\r']).to_owned()),
                        Err(e) => {
                            err(format!("secret_file {}: {e}", p.display()));
                            None
                        }
                    },
                    _ => {
                        err(
                            "a webhook sink needs exactly one of secret, secret_env or secret_file"
                                .into(),
                        );
                        None
                    }
                };
                let Some(secret) = secret else { continue };
                if secret.len() < 16 {
                    err("the secret must be at least 16 bytes".into());
                }
                let timeout = dur(&s.timeout, Duration::from_secs(10), "timeout", &mut err);
                SinkKind::Webhook {
                    url: WebhookUrl(url),
                    secret: Secret(secret.into_bytes()),
                    ca_file: s.ca_file.clone(),
                    timeout,
                }
            }
            other => {
                err(format!("kind {other:?} is not file, syslog or webhook"));
                continue;
            }
        };
        out.push(SinkConfig {
            name: s.name.clone(),
            kind,
            filter,
            batch,
            max_lag_events,
            max_lag,
        });
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ConfigError(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn a_full_file_parses_and_the_secret_never_prints() {
        let text = r#"
sinks:
  - name: secops
    kind: webhook
    url: https://127.0.0.1:9/hook/t0k3n
    secret_env: HOOK_SECRET
    events: ["sandbox.*", identity.revoke]
  - name: local
    kind: file
    path: /tmp/x.jsonl
    keep: 3
  - name: sys
    kind: syslog
    tcp: 127.0.0.1:514
"#;
        let env = |k: &str| (k == "HOOK_SECRET").then(|| "s3cret-s3cret-s3cret".to_owned());
        let sinks = parse(text, env).unwrap();
        assert_eq!(sinks.len(), 3);
        let shown = format!("{sinks:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(!shown.contains("t0k3n"), "{shown}");
        assert!(shown.contains("https://127.0.0.1:9/..."), "{shown}");
        assert!(sinks[0].filter.matches("sandbox.dial_denied"));
        assert!(!sinks[0].filter.matches("policy.grant"));
        assert!(sinks[1].filter.matches("policy.grant"));
        assert!(matches!(
            sinks[2].kind,
            SinkKind::Syslog { facility: 13, .. }
        ));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
sinks:
  - name: a
    kind: webhook
    url: http://plain/hook
    secret: short
  - name: a
    kind: file
  - name: b
    kind: syslog
    udp: 127.0.0.1:514
    tcp: 127.0.0.1:514
  - name: c
    kind: file
    path: /tmp/y
    url: https://x/
    max_lag: soon
"#;
        let e = parse(text, no_env).unwrap_err().0;
        let all = e.join("\n");
        for needle in [
            "https://",
            "used twice",
            "needs path",
            "exactly one of udp",
            "url does not apply",
            "max_lag",
        ] {
            assert!(all.contains(needle), "{needle} missing from {all}");
        }
        assert!(parse(
            "sinks: [{name: x, kind: file, path: /t, colour: red}]",
            no_env
        )
        .is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1w"), None);
        assert_eq!(parse_duration(""), None);
    }
}
