//! The MCP gateway: each identity sees only its own tools, resources and prompts, namespaced
//! by upstream server; a hidden one is absent from every listing and calling it by any spelling
//! gets exactly what a nonexistent one gets, without reaching the upstream.

pub mod catalog;
pub mod config;
pub mod cursor;
pub mod pool;
pub mod routing_header;
pub mod server;
pub mod stdio;
pub mod upstream;

pub use config::McpConfig;
pub use server::{McpError, McpGateway};
