//! Umbra's gateways, hosted on the overlay through the SDK: they have no listening port, and
//! each request's caller is the identity the router verified.
//!
//! The LLM gateway ([`llm::Gateway`]) relays OpenAI Chat Completions and Responses and Anthropic
//! Messages to the configured providers, adding the provider's key itself; the caller's grants
//! (from the controller's policy) decide which models it may use, how many tokens per period and
//! how many requests per minute. Every request is metered from the provider's own usage reports
//! and recorded in a ledger that survives restarts.

pub mod config;
pub mod errors;
pub mod grants;
pub mod ledger;
pub mod llm;
pub mod mcp;
pub mod meter;
pub mod sse;
pub mod upstream;

/// The response body type of the gateway's HTTP server.
pub type Body = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;

pub use config::{Config, ConfigError};
pub use llm::{Gateway, GatewayError};
