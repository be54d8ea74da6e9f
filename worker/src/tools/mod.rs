//! Tools the worker runs itself for a task's model: MCP servers the operator declared
//! (`mcp.rs`). A task's own (client-side) tools are run by its client (`requires_action`).

pub mod mcp;
