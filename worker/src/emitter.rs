//! A run's writer to its task's event stream (`emit.lua`; docs/architecture.md, "Streaming").
//!
//! The answer's text is batched: written when `AGENTQ_STREAM_FLUSH_BYTES` have gathered or the
//! oldest unwritten piece has waited `AGENTQ_STREAM_FLUSH_MS`, so a fast model does not cost one
//! Redis write per token. What is still unwritten when the run succeeds goes with the result
//! (`complete.lua`), so the stream's text of the winning attempt always adds up to the result.
//! Every write is fenced by the run's token: once the run has lost the task, nothing more is
//! written (and the run's report is refused as it is today).

use std::time::Duration;

use agentq_common::keys::Keys;
use agentq_common::queue::{RunEvent, StreamRest};
use agentq_common::Broker;
use tokio::time::Instant;

use crate::llm::DeltaSink;

pub(crate) struct Emitter<'a> {
    broker: &'a Broker,
    keys: &'a Keys,
    id: &'a str,
    token: &'a str,
    attempt: u32,
    /// The run's step (the deltas' `step`): the number of model replies recorded before.
    step: u32,
    /// Batches written by this run (`emit.lua`'s resend guard).
    batch: u64,
    /// Text not written yet, and when its first piece came.
    text: String,
    since: Option<Instant>,
    /// A batch whose write failed without an answer (it may have landed): resent as it was, with
    /// its number, before anything newer, so it is never written twice nor skipped.
    unacked: Option<(u64, Vec<RunEvent>)>,
    /// Text of this run's current call went out (or is waiting): a call that fails after it
    /// leaves partial text a client must drop when another call starts (`attempt_started`).
    dirty: bool,
    /// The run no longer owns the task: nothing more is written.
    fenced: bool,
    flush_every: Duration,
    flush_bytes: usize,
}

impl<'a> Emitter<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        broker: &'a Broker,
        keys: &'a Keys,
        id: &'a str,
        token: &'a str,
        attempt: u32,
        step: u32,
        flush_every: Duration,
        flush_bytes: usize,
    ) -> Self {
        Self {
            broker,
            keys,
            id,
            token,
            attempt,
            step,
            batch: 0,
            text: String::new(),
            since: None,
            unacked: None,
            dirty: false,
            fenced: false,
            flush_every,
            flush_bytes,
        }
    }

    /// Before a model call: if an earlier call of this run failed after its text went out, a
    /// client is told to drop that text (the next model, a fallback, starts over).
    pub(crate) async fn begin_call(&mut self, model: &str) {
        if self.dirty {
            self.dirty = false;
            let data = serde_json::json!({
                "attempt": self.attempt,
                "run": self.token.parse::<u64>().unwrap_or(0),
                "model": model,
                "reason": "fallback",
            });
            self.event("attempt_started", data.to_string()).await;
        }
    }

    /// A call failed: its unwritten text is of no use to anyone.
    pub(crate) fn call_failed(&mut self) {
        self.text.clear();
        self.since = None;
    }

    /// The next step of an agent run begins: the previous reply's text is written first (it
    /// belongs to that step), and it is no partial text to drop.
    pub(crate) async fn next_step(&mut self, step: u32) {
        self.flush().await;
        self.step = step;
        self.dirty = false;
    }

    /// One event of the run (`tool_call`, `tool_result`), after the text before it.
    pub(crate) async fn event(&mut self, kind: &'static str, data: String) {
        self.flush().await;
        if self.fenced {
            return;
        }
        if self.unacked.is_some() {
            // Redis does not answer: written after the text it follows or not at all
            tracing::debug!(task.id = %self.id, event = kind, "event dropped: the stream is not writable");
            return;
        }
        self.batch += 1;
        let events = vec![RunEvent { kind, data }];
        self.write(self.batch, events).await;
    }

    /// What `complete.lua` appends with the result: the text not written yet. A batch whose
    /// write never got an answer is tried once more first; if that fails too it goes with the
    /// result, and `complete.lua` writes it only if it did not land after all.
    pub(crate) async fn rest(&mut self) -> StreamRest {
        if self.unacked.is_some() {
            self.resend().await;
        }
        let unacked = self.unacked.take().map(|(batch, events)| {
            let text: String = events
                .into_iter()
                .filter(|e| e.kind == "delta")
                .map(|e| e.data)
                .collect();
            (batch, text)
        });
        self.since = None;
        StreamRest {
            text: std::mem::take(&mut self.text),
            step: self.step,
            unacked,
        }
    }

    async fn resend(&mut self) {
        if let Some((batch, events)) = self.unacked.take() {
            self.write(batch, events).await;
        }
    }

    /// Writes one batch; keeps it for a resend when Redis did not answer.
    async fn write(&mut self, batch: u64, events: Vec<RunEvent>) {
        match self
            .broker
            .emit(self.keys, self.id, self.token, batch, self.step, &events)
            .await
        {
            Ok(v) if v == "ok" => {}
            Ok(_) => {
                // stale or missing: the run lost the task; its report will be refused too
                self.fenced = true;
                self.text.clear();
                self.since = None;
            }
            Err(e) => {
                tracing::debug!(task.id = %self.id, error = %e, "event stream write failed; will resend");
                self.unacked = Some((batch, events));
                // try again after the flush interval, not on every chunk
                self.since.get_or_insert_with(Instant::now);
            }
        }
    }
}

impl DeltaSink for Emitter<'_> {
    async fn push(&mut self, text: &str) {
        if self.fenced || text.is_empty() {
            return;
        }
        if self.text.is_empty() {
            self.since.get_or_insert_with(Instant::now);
        }
        self.text.push_str(text);
        self.dirty = true;
        if self.text.len() >= self.flush_bytes {
            self.flush().await;
        }
    }

    fn due(&self) -> Option<Instant> {
        if self.fenced {
            return None;
        }
        self.since.map(|t| t + self.flush_every)
    }

    async fn flush(&mut self) {
        if self.fenced {
            return;
        }
        self.since = None;
        if self.unacked.is_some() {
            self.resend().await;
            if self.unacked.is_some() {
                // Redis still does not answer: keep the new text for later, in order
                if !self.text.is_empty() {
                    self.since = Some(Instant::now());
                }
                return;
            }
        }
        if self.text.is_empty() || self.fenced {
            return;
        }
        self.batch += 1;
        let events = vec![RunEvent {
            kind: "delta",
            data: std::mem::take(&mut self.text),
        }];
        self.write(self.batch, events).await;
    }
}
