//! Budgets in the worker: which scopes have one (read from Redis every second, so a call under
//! no budget costs no extra script), the per-task caps, and the dollars-by-agent metric.
//! The holds themselves are `common/src/flow/budget.rs`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use agentq_common::flow::{Budgets, UsageBatch};
use tokio_util::sync::CancellationToken;

use crate::{pause, Worker};

/// How often the worker rereads which scopes have a budget: a new budget binds within this.
pub(crate) const REFRESH: Duration = Duration::from_secs(1);
/// Agent ids with their own `agentq_agent_cost_dollars_total` series, per process.
const MAX_AGENT_LABELS: usize = 100;

pub(crate) struct BudgetState {
    pub budgets: Budgets,
    /// Scopes that have a budget, as last read.
    scopes: RwLock<Arc<HashSet<String>>>,
    any: std::sync::atomic::AtomicBool,
    agents: Mutex<HashSet<String>>,
    /// Calls counted for the usage report since the last flush.
    pub usage: Mutex<UsageBatch>,
}

impl BudgetState {
    pub fn new(budgets: Budgets) -> Self {
        Self {
            budgets,
            scopes: RwLock::new(Arc::new(HashSet::new())),
            any: std::sync::atomic::AtomicBool::new(false),
            agents: Mutex::new(HashSet::new()),
            usage: Mutex::new(UsageBatch::default()),
        }
    }

    /// Whether any budget exists (a call under none builds no scope names).
    pub fn any(&self) -> bool {
        self.any.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Of `candidates` (`scopes_of`: a tenant's call names the fleet-wide scopes, its quota and
    /// its own namespaced ones), the scopes that have a budget.
    pub fn applying(&self, candidates: Vec<String>) -> Vec<String> {
        let known = self
            .scopes
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        if known.is_empty() {
            return Vec::new();
        }
        candidates
            .into_iter()
            .filter(|c| known.contains(c))
            .collect()
    }

    /// The label an agent's spend is counted under: `agent` is its namespaced key
    /// (`<tenant>~<agent>` for a tenant's agent, so tenants' agents of one name are not summed),
    /// and the first [`MAX_AGENT_LABELS`] keys a process sees get their own series.
    pub fn agent_label<'a>(&self, agent: &'a str) -> &'a str {
        let Ok(mut seen) = self.agents.lock() else {
            return "other";
        };
        if seen.contains(agent) {
            return agent;
        }
        if seen.len() < MAX_AGENT_LABELS {
            seen.insert(agent.to_owned());
            return agent;
        }
        "other"
    }
}

impl Worker {
    /// Writes the usage report's counts gathered since the last flush. On an error they are
    /// dropped (the report is a report; budgets and task records are written per call).
    pub(crate) async fn flush_usage(&self) {
        let batch = match self.budget.usage.lock() {
            Ok(mut b) => std::mem::take(&mut *b),
            Err(_) => return,
        };
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.budget.budgets.record_usage(batch).await {
            tracing::warn!(error = %e, "could not write the usage report's counts; dropped");
        }
    }

    /// Every [`REFRESH`]: rereads the set of budgeted scopes (on an error the last set stays)
    /// and flushes the usage report's counts; once more when stopped.
    /// `read` is cancelled after the first read, successful or not.
    pub(crate) async fn watch_budgets(
        self: Arc<Self>,
        stop: CancellationToken,
        read: CancellationToken,
    ) {
        loop {
            match self.budget.budgets.all().await {
                Ok(all) => {
                    let set: HashSet<String> = all.into_iter().map(|b| b.scope).collect();
                    self.budget
                        .any
                        .store(!set.is_empty(), std::sync::atomic::Ordering::Relaxed);
                    if let Ok(mut s) = self.budget.scopes.write() {
                        *s = Arc::new(set);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not read the budgets; keeping the last")
                }
            }
            read.cancel();
            self.flush_usage().await;
            if !pause(REFRESH, &stop).await {
                self.flush_usage().await;
                return;
            }
        }
    }
}
