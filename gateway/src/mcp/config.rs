//! The MCP gateway's configuration: the upstream servers and how to reach them. Who sees which
//! tools is not here but in the controller's policy, beside the grant.
//!
//! Credentials for upstreams are written as `${VARIABLE}` and taken from the gateway's
//! environment when it starts; the configuration text holds no secret and `Debug` shows none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::upstream::Transport;
use crate::config::ConfigError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerFile {
    #[serde(default)]
    command: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default = "default_service")]
    service: String,
    #[serde(default = "default_separator")]
    separator: String,
    #[serde(default = "default_ttl")]
    session_ttl_secs: u64,
    #[serde(default)]
    audit: Option<PathBuf>,
    #[serde(default)]
    log_arguments: bool,
    #[serde(default)]
    allowed_origins: Vec<String>,
    #[serde(default = "default_page")]
    page_size: usize,
    #[serde(default = "default_max_body")]
    max_request_bytes: usize,
    servers: BTreeMap<String, ServerFile>,
}

fn default_service() -> String {
    "mcp".into()
}
fn default_separator() -> String {
    "__".into()
}
fn default_ttl() -> u64 {
    1800
}
fn default_page() -> usize {
    100
}
fn default_max_body() -> usize {
    4 << 20
}

/// One upstream server.
#[derive(Clone)]
pub struct Server {
    /// Its name: the namespace of its tools.
    pub name: String,
    /// How it is reached (credentials inside).
    pub transport: Transport,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.transport {
            Transport::Stdio { command, .. } => format!("stdio {command}"),
            Transport::Http { host, port, .. } => format!("http {host}:{port}"),
        };
        write!(f, "Server({}: {kind}, credentials redacted)", self.name)
    }
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct McpConfig {
    /// The overlay service the gateway binds.
    pub service: String,
    /// Between server and tool in offered names (`github__create_issue`).
    pub separator: String,
    /// Idle time after which a client session expires (404 afterwards).
    pub session_ttl: Duration,
    /// Where call events are appended as JSON lines (`None`: the log only).
    pub audit: Option<PathBuf>,
    /// Log whole arguments instead of their hash.
    pub log_arguments: bool,
    /// `Origin` values accepted; a request without `Origin` is accepted.
    pub allowed_origins: Vec<String>,
    /// Items per page of a list.
    pub page_size: usize,
    /// Largest request body.
    pub max_request_bytes: usize,
    /// Upstream servers by name.
    pub servers: BTreeMap<String, Server>,
    /// Where the gateway reads the wall time (the audit records' timestamps). The system clock
    /// unless a test sets a manual one.
    pub clock: umbra_clock::Clock,
    /// Where to register the gateway's metrics (see `umbra_metrics`); `None` counts nothing.
    pub metrics: Option<umbra_metrics::Registry>,
}

/// Replaces `${VAR}` with the variable's value; a missing variable is an error.
fn expand(s: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed ${{ in {s:?}"))?;
        let var = &after[..end];
        let v = env(var).ok_or_else(|| format!("the environment variable {var} is not set"))?;
        out.push_str(&v);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl McpConfig {
    /// Reads and checks a configuration file; relative paths are relative to it.
    pub fn load(path: &Path) -> Result<McpConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        McpConfig::parse(&text, dir, |k| std::env::var(k).ok())
    }

    /// Parses configuration text; `env` looks up environment variables.
    pub fn parse(
        text: &str,
        dir: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<McpConfig, ConfigError> {
        let f: File =
            serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let bad = ConfigError::Invalid;
        umbra_policies::Name::new(f.service.as_str()).map_err(|e| bad(format!("service: {e}")))?;
        if f.separator.is_empty() || f.separator.len() > 8 {
            return Err(bad("separator: 1 to 8 characters".into()));
        }
        if f.page_size == 0 || f.page_size > 10_000 {
            return Err(bad("page_size: 1 to 10000".into()));
        }
        let mut servers = BTreeMap::new();
        for (name, s) in f.servers {
            if name.is_empty()
                || name.contains(&f.separator)
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(bad(format!(
                    "servers.{name}: names are letters, digits, - and _, without the separator"
                )));
            }
            let transport = match (s.command, s.url) {
                (Some(command), None) => Transport::Stdio {
                    command,
                    args: s.args,
                    env: s
                        .env
                        .iter()
                        .map(|(k, v)| Ok((k.clone(), expand(v, &env)?)))
                        .collect::<Result<_, String>>()
                        .map_err(|e| bad(format!("servers.{name}.env: {e}")))?,
                },
                (None, Some(url)) => {
                    let (tls, host, port, path) = crate::config::parse_base(&url)
                        .map_err(|e| bad(format!("servers.{name}: {e}")))?;
                    Transport::Http {
                        tls,
                        host,
                        port,
                        path: if path.is_empty() { "/".into() } else { path },
                        headers: s
                            .headers
                            .iter()
                            .map(|(k, v)| Ok((k.to_ascii_lowercase(), expand(v, &env)?)))
                            .collect::<Result<_, String>>()
                            .map_err(|e| bad(format!("servers.{name}.headers: {e}")))?,
                    }
                }
                _ => {
                    return Err(bad(format!(
                        "servers.{name}: set `command` (stdio) or `url` (streamable HTTP)"
                    )))
                }
            };
            servers.insert(name.clone(), Server { name, transport });
        }
        Ok(McpConfig {
            service: f.service,
            separator: f.separator,
            session_ttl: Duration::from_secs(f.session_ttl_secs.max(1)),
            audit: f.audit.map(|a| dir.join(a)),
            log_arguments: f.log_arguments,
            allowed_origins: f.allowed_origins,
            page_size: f.page_size,
            max_request_bytes: f.max_request_bytes,
            servers,
            clock: umbra_clock::Clock::system(),
            metrics: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_parse_with_credentials_from_the_environment() {
        let yaml = r#"
servers:
  github: { command: python3, args: [up.py], env: { UPSTREAM_TOKEN: "${GH}" } }
  notes: { url: "http://127.0.0.1:9000/mcp", headers: { Authorization: "Bearer ${NOTES}" } }
"#;
        let env = |k: &str| match k {
            "GH" => Some("gh-secret".to_string()),
            "NOTES" => Some("notes-secret".to_string()),
            _ => None,
        };
        let c = McpConfig::parse(yaml, Path::new("/etc"), env).unwrap();
        assert_eq!(c.separator, "__");
        match &c.servers["github"].transport {
            Transport::Stdio { env, .. } => assert_eq!(env["UPSTREAM_TOKEN"], "gh-secret"),
            _ => panic!("wrong transport"),
        }
        match &c.servers["notes"].transport {
            Transport::Http { headers, path, .. } => {
                assert_eq!(headers["authorization"], "Bearer notes-secret");
                assert_eq!(path, "/mcp");
            }
            _ => panic!("wrong transport"),
        }
        assert!(!format!("{c:?}").contains("secret"));
        let e = McpConfig::parse(yaml, Path::new("."), |_| None).unwrap_err();
        assert!(e.to_string().contains("GH"), "{e}");
        for bad in [
            "servers: { a__b: { command: x } }",
            "servers: { a: {} }",
            "servers: { a: { command: x, url: 'http://x' } }",
            "servers: {}\nseparator: ''",
        ] {
            assert!(
                McpConfig::parse(bad, Path::new("."), |_| None).is_err(),
                "{bad}"
            );
        }
    }
}
