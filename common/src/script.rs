//! How agentq's Lua scripts are made (docs/architecture.md, "Declared keys").
//!
//! Redis Cluster routes a script by the keys it is given in `KEYS`, and servers and proxies that
//! enforce declarations refuse a key a script builds for itself. A plain Redis (and a cluster,
//! while every key shares the queue's hash tag) runs such a script anyway, so a key left out
//! would go unnoticed in tests. [`declared`] makes a script whose every key is in `KEYS`, and in
//! a debug build (every test of the workspace runs debug binaries) it puts `declared.lua` before
//! it: each `redis.call` checks its key arguments against `KEYS` and fails the script on one it
//! was not given. A release build runs the script as written.
//!
//! Scripts still made with `Script::new` build some keys themselves (a tenant's line from the
//! record's tenant, a workflow's keys from its record); they move here as their callers learn to
//! declare those keys.

use redis::Script;

const CHECK: &str = include_str!("declared.lua");

/// A script that touches only the keys it is given in `KEYS` (checked on every call in a debug
/// build).
pub fn declared(src: &str) -> Script {
    if cfg!(debug_assertions) {
        Script::new(&format!("{CHECK}{src}"))
    } else {
        Script::new(src)
    }
}
