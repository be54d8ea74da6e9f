//! Tenants: who a task, workflow, batch or budget belongs to, and what the queue needs to know
//! about them at admission (their weight in fair scheduling and their per-queue quotas).
//!
//! A request without a tenant (auth off, or the admin token) acts as the tenant
//! [`DEFAULT_TENANT`]; its records carry no `tenant` field and its keys are the ones agentq used
//! before tenants existed, so an upgrade changes nothing for a single-tenant deployment.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// The tenant of everything created without a tenant token.
pub const DEFAULT_TENANT: &str = "default";
/// Longest tenant id: ids land in Redis keys and in records, never in metric labels.
pub const MAX_TENANT_LEN: usize = 64;
/// Highest fair-scheduling weight (a weight is how many turns a tenant gets per round).
pub const MAX_WEIGHT: u32 = 100;

/// A tenant id: `[a-z0-9][a-z0-9_-]*`, at most [`MAX_TENANT_LEN`] bytes. No `:`, `~`, `{` or `}`,
/// so a tenant id can prefix an agent id or an idempotency key unambiguously and never moves a
/// key to another cluster slot.
pub fn valid_tenant_id(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_TENANT_LEN
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-'))
}

/// `None` for the default tenant (records and keys as before tenants), else the id.
pub fn non_default(tenant: Option<&str>) -> Option<&str> {
    tenant.filter(|t| *t != DEFAULT_TENANT && !t.is_empty())
}

/// The name an agent's lane and memory keys use: the agent id itself for the default tenant,
/// `<tenant>~<agent id>` for any other, so two tenants' agents of the same name never share a
/// lane or a memory (`~` is in neither alphabet).
pub fn agent_key<'a>(tenant: Option<&str>, agent: &'a str) -> Cow<'a, str> {
    match non_default(tenant) {
        None => Cow::Borrowed(agent),
        Some(t) => Cow::Owned(format!("{t}~{agent}")),
    }
}

/// The idempotency key as stored: per tenant, so one tenant's key never answers with another
/// tenant's task id.
pub fn idempotency_key<'a>(tenant: Option<&str>, key: &'a str) -> Cow<'a, str> {
    match non_default(tenant) {
        None => Cow::Borrowed(key),
        Some(t) => Cow::Owned(format!("{t}~{key}")),
    }
}

/// What a queue needs to know about a tenant: its weight in the queue's fair rotation and its
/// per-queue quotas. The api copies it into every declared queue's `tenants` hash (one slot per
/// queue, never a global key) when a tenant is created or changed and at start, so the scripts
/// that enforce it stay single-slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admission {
    /// Turns per round in the queue's rotation across tenants with pending work (1..=100).
    pub weight: u32,
    /// Most tasks of the tenant waiting in this queue's pending work; `None`: no cap.
    pub max_pending: Option<u64>,
    /// Most runs of the tenant in flight at once in this queue; `None`: no cap.
    pub max_running: Option<u64>,
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            weight: 1,
            max_pending: None,
            max_running: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids() {
        assert!(valid_tenant_id("acme"));
        assert!(valid_tenant_id("team-7_b"));
        assert!(!valid_tenant_id(""));
        assert!(!valid_tenant_id("-x"));
        assert!(!valid_tenant_id("Acme"));
        assert!(!valid_tenant_id("a:b"));
        assert!(!valid_tenant_id("a~b"));
        assert!(!valid_tenant_id("a{b}"));
        assert!(!valid_tenant_id(&"a".repeat(65)));
    }

    #[test]
    fn namespaced_names() {
        assert_eq!(agent_key(None, "bot"), "bot");
        assert_eq!(agent_key(Some(DEFAULT_TENANT), "bot"), "bot");
        assert_eq!(agent_key(Some("acme"), "bot"), "acme~bot");
        assert_eq!(idempotency_key(Some("acme"), "k1"), "acme~k1");
        assert_eq!(idempotency_key(None, "k1"), "k1");
    }
}
