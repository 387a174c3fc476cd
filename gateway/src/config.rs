//! The LLM gateway's configuration: providers, their keys, and which model goes where.
//!
//! Who may use which model, and how much, is not here: that is the controller's policy, beside
//! the grant. This file only says what exists. API keys come from the environment or a file,
//! never from the configuration text itself, and are redacted in `Debug`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use zeroize::Zeroizing;

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The YAML is malformed or has unknown fields.
    #[error("{0}")]
    Syntax(String),
    /// A value is wrong.
    #[error("{0}")]
    Invalid(String),
}

/// A provider's wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI and OpenAI-compatible servers: Chat Completions and Responses.
    Openai,
    /// Anthropic: Messages.
    Anthropic,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderFile {
    kind: ProviderKind,
    /// Including the version prefix, as the official clients take it: `https://api.openai.com/v1`.
    base_url: String,
    #[serde(default)]
    api_key_env: Option<String>,
    #[serde(default)]
    api_key_file: Option<PathBuf>,
    /// Client headers passed upstream, by name, with the values allowed (see
    /// `llm::headers`); every other client header is dropped.
    #[serde(default)]
    forward_headers: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    name: String,
    provider: String,
    /// The provider's name for the model, when it differs.
    #[serde(default)]
    upstream: Option<String>,
    /// US dollars per million input tokens, for the cost estimate in the audit log.
    #[serde(default)]
    input_per_mtok: Option<f64>,
    /// US dollars per million output tokens.
    #[serde(default)]
    output_per_mtok: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default = "default_service")]
    service: String,
    providers: BTreeMap<String, ProviderFile>,
    models: Vec<ModelFile>,
    #[serde(default = "default_max_tokens")]
    default_max_tokens: u64,
    #[serde(default)]
    ledger: Option<PathBuf>,
    #[serde(default = "default_max_body")]
    max_request_bytes: usize,
}

fn default_service() -> String {
    "llm".into()
}
fn default_max_tokens() -> u64 {
    4096
}
fn default_max_body() -> usize {
    8 << 20
}

/// An upstream API key. Never printed.
#[derive(Clone)]
pub struct ApiKey(Zeroizing<String>);

impl ApiKey {
    /// The key, for the one header that carries it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(redacted)")
    }
}

/// Where a provider is and how it is reached.
#[derive(Debug, Clone)]
pub struct Provider {
    /// Its name in the configuration.
    pub name: String,
    /// Its wire format.
    pub kind: ProviderKind,
    /// `http` or `https`.
    pub tls: bool,
    /// Host name or IP.
    pub host: String,
    /// Port.
    pub port: u16,
    /// The path prefix (`/v1`), without a trailing slash.
    pub prefix: String,
    /// The key the gateway adds; `None` for a provider that needs none (a local server).
    pub key: Option<ApiKey>,
    /// The client headers allowed upstream and their allowed values (lower-case names). Empty:
    /// none, so an agent cannot switch on provider features (betas, API versions) under the
    /// organization's key.
    pub forward_headers: crate::llm::headers::Allowlist,
}

/// A model the gateway serves.
#[derive(Debug, Clone)]
pub struct Model {
    /// The name clients use.
    pub name: String,
    /// The provider's name for it.
    pub upstream: String,
    /// The provider (key into [`Config::providers`]).
    pub provider: String,
    /// Dollars per million input and output tokens.
    pub price: (f64, f64),
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The overlay service the gateway binds.
    pub service: String,
    /// Providers by name.
    pub providers: BTreeMap<String, Provider>,
    /// Models by client-facing name.
    pub models: BTreeMap<String, Model>,
    /// The output cap reserved for a request that sets none.
    pub default_max_tokens: u64,
    /// The ledger's SQLite file.
    pub ledger: PathBuf,
    /// Largest request body accepted.
    pub max_request_bytes: usize,
    /// Where the gateway reads the wall time: which budget period a request falls in, and the
    /// ledger's timestamps. The system clock unless a test sets a manual one.
    pub clock: umbra_clock::Clock,
    /// Where to register the gateway's metrics (see `umbra_metrics`); `None` counts nothing.
    pub metrics: Option<umbra_metrics::Registry>,
}

pub(crate) fn parse_base(url: &str) -> Result<(bool, String, u16, String), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!(
            "base_url {url:?} must start with http:// or https://"
        ));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("base_url {url:?}: bad port"))?,
        ),
        _ => (authority, if tls { 443 } else { 80 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || authority.contains('@') {
        return Err(format!("base_url {url:?}: no host"));
    }
    Ok((
        tls,
        host.to_string(),
        port,
        path.trim_end_matches('/').to_string(),
    ))
}

/// Checks a provider's `forward_headers`: valid header names that the gateway does not set
/// itself and that carry no credentials, and values that are single items (no commas).
fn allowlist(
    provider: &str,
    raw: BTreeMap<String, Vec<String>>,
) -> Result<crate::llm::headers::Allowlist, String> {
    let mut out = crate::llm::headers::Allowlist::new();
    for (name, values) in raw {
        let lower = name.to_ascii_lowercase();
        if http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
            return Err(format!(
                "providers.{provider}.forward_headers: {name:?} is not a header name"
            ));
        }
        if crate::llm::headers::RESERVED.contains(&lower.as_str()) {
            return Err(format!(
                "providers.{provider}.forward_headers: {name:?} is set by the gateway and cannot be forwarded"
            ));
        }
        for v in &values {
            let ok = !v.is_empty()
                && v.trim() == v
                && v.bytes().all(|b| b.is_ascii_graphic() && b != b',');
            if !ok {
                return Err(format!(
                    "providers.{provider}.forward_headers.{name}: {v:?} must be one value without commas or spaces"
                ));
            }
        }
        out.entry(lower).or_default().extend(values);
    }
    Ok(out)
}

impl Config {
    /// Reads and checks a configuration file; relative paths are relative to it.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, dir, |k| std::env::var(k).ok())
    }

    /// Parses configuration text; `env` looks up environment variables.
    pub fn parse(
        text: &str,
        dir: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file: ConfigFile =
            serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let bad = |m: String| ConfigError::Invalid(m);
        umbra_policies::Name::new(file.service.as_str())
            .map_err(|e| bad(format!("service: {e}")))?;
        let mut providers = BTreeMap::new();
        for (name, p) in file.providers {
            let (tls, host, port, prefix) =
                parse_base(&p.base_url).map_err(|e| bad(format!("providers.{name}: {e}")))?;
            let key = match (&p.api_key_env, &p.api_key_file) {
                (Some(_), Some(_)) => {
                    return Err(bad(format!(
                        "providers.{name}: set api_key_env or api_key_file, not both"
                    )))
                }
                (Some(var), None) => {
                    Some(env(var).filter(|v| !v.trim().is_empty()).ok_or_else(|| {
                        bad(format!(
                            "providers.{name}: the environment variable {var} is not set"
                        ))
                    })?)
                }
                (None, Some(f)) => {
                    let f = dir.join(f);
                    let k = std::fs::read_to_string(&f).map_err(|e| {
                        bad(format!(
                            "providers.{name}: api_key_file {}: {e}",
                            f.display()
                        ))
                    })?;
                    Some(k)
                }
                (None, None) => None,
            };
            let forward_headers = allowlist(&name, p.forward_headers).map_err(bad)?;
            providers.insert(
                name.clone(),
                Provider {
                    name,
                    kind: p.kind,
                    tls,
                    host,
                    port,
                    prefix,
                    key: key.map(|k| ApiKey(Zeroizing::new(k.trim().to_string()))),
                    forward_headers,
                },
            );
        }
        let mut models = BTreeMap::new();
        for m in file.models {
            if !providers.contains_key(&m.provider) {
                return Err(bad(format!(
                    "models.{}: no provider named {:?}",
                    m.name, m.provider
                )));
            }
            if m.name.is_empty()
                || m.name.len() > 128
                || !m.name.chars().all(|c| c.is_ascii_graphic())
            {
                return Err(bad(format!("models: invalid model name {:?}", m.name)));
            }
            let model = Model {
                upstream: m.upstream.unwrap_or_else(|| m.name.clone()),
                name: m.name.clone(),
                provider: m.provider,
                price: (
                    m.input_per_mtok.unwrap_or(0.0),
                    m.output_per_mtok.unwrap_or(0.0),
                ),
            };
            if models.insert(m.name.clone(), model).is_some() {
                return Err(bad(format!("models: {:?} is listed twice", m.name)));
            }
        }
        if file.default_max_tokens == 0 {
            return Err(bad("default_max_tokens must be at least 1".into()));
        }
        Ok(Config {
            service: file.service,
            providers,
            models,
            default_max_tokens: file.default_max_tokens,
            ledger: dir.join(
                file.ledger
                    .unwrap_or_else(|| PathBuf::from("llm-ledger.db")),
            ),
            max_request_bytes: file.max_request_bytes,
            clock: umbra_clock::Clock::system(),
            metrics: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
service: llm
providers:
  openai: { kind: openai, base_url: "https://api.openai.com/v1", api_key_env: OPENAI_API_KEY }
  local: { kind: anthropic, base_url: "http://127.0.0.1:8080/v1" }
models:
  - { name: gpt-4o-mini, provider: openai, input_per_mtok: 0.15, output_per_mtok: 0.6 }
  - { name: claude, provider: local, upstream: claude-sonnet-4-20250514 }
"#;

    #[test]
    fn parses_and_keeps_keys_out_of_debug() {
        let env = |k: &str| (k == "OPENAI_API_KEY").then(|| "sk-secret-123".to_string());
        let c = Config::parse(YAML, Path::new("/etc/umbra"), env).unwrap();
        let p = &c.providers["openai"];
        assert!(p.tls && p.host == "api.openai.com" && p.port == 443 && p.prefix == "/v1");
        assert_eq!(p.key.as_ref().unwrap().expose(), "sk-secret-123");
        let l = &c.providers["local"];
        assert!(!l.tls && l.port == 8080 && l.key.is_none());
        assert_eq!(c.models["claude"].upstream, "claude-sonnet-4-20250514");
        assert_eq!(c.ledger, Path::new("/etc/umbra/llm-ledger.db"));
        assert!(!format!("{c:?}").contains("sk-secret"));
        assert!(
            l.forward_headers.is_empty(),
            "nothing forwarded unless listed"
        );
        let with = "providers:\n  a: { kind: anthropic, base_url: 'http://x', forward_headers: { Anthropic-Beta: [prompt-caching-2024-07-31] } }\nmodels: []";
        let c = Config::parse(with, Path::new("."), |_| None).unwrap();
        assert!(c.providers["a"].forward_headers["anthropic-beta"]
            .contains("prompt-caching-2024-07-31"));
    }

    #[test]
    fn bad_configurations_say_what_is_wrong() {
        let none = |_: &str| None;
        let e = Config::parse(YAML, Path::new("."), none).unwrap_err();
        assert!(e.to_string().contains("OPENAI_API_KEY"), "{e}");
        for (bad, want) in [
            ("providers: {}\nmodels: [{name: x, provider: nope}]", "no provider"),
            ("providers: {p: {kind: openai, base_url: 'ftp://x'}}\nmodels: []", "http"),
            ("providers: {p: {kind: openai, base_url: 'http://x:99999'}}\nmodels: []", "port"),
            ("providers: {}\nmodels: []\nsurprise: 1", "unknown field"),
            ("providers: {p: {kind: cohere, base_url: 'http://x'}}\nmodels: []", "unknown variant"),
            ("providers: {p: {kind: openai, base_url: 'http://x'}}\nmodels: [{name: a, provider: p}, {name: a, provider: p}]", "twice"),
            ("providers: {p: {kind: anthropic, base_url: 'http://x', forward_headers: {x-api-key: [k]}}}\nmodels: []", "set by the gateway"),
            ("providers: {p: {kind: anthropic, base_url: 'http://x', forward_headers: {anthropic-beta: ['a,b']}}}\nmodels: []", "without commas"),
            ("providers: {p: {kind: anthropic, base_url: 'http://x', forward_headers: {'bad header': [a]}}}\nmodels: []", "not a header name"),
        ] {
            let e = Config::parse(bad, Path::new("."), none).unwrap_err();
            assert!(e.to_string().contains(want), "{bad}: {e}");
        }
    }
}
