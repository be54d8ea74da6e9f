//! The call journal: one [`CallRecord`] per chat completion call, with when it
//! started, when it ended and how, for tests that check call overlap and
//! per-task spend (the chaos test: two runs of one task must not call the LLM
//! at the same time unless the first run's worker was lost).
//!
//! A call's end is recorded when the handler returns its answer, or, through a
//! drop guard, when hyper drops the handler because the client went away
//! (disconnect, client timeout, killed process). So a call whose client died
//! ends when the client died, not when a `[[hang]]` would have given up.
//!
//! Each call's arrival is also kept at once, as a [`CallArrival`], so a test
//! can see calls still in progress and tell a quota or storm 429 from a
//! scripted one ([`CallRecord`] and [`CallOutcome`] stay as they are: other
//! crates build and match them exhaustively).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use parking_lot::Mutex;

use crate::quota::Rejection;
use crate::MockLlm;

/// How a journaled call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// The handler answered with this HTTP status (a `[[hang]]` that ran its
    /// full hour ends as 504).
    Status(u16),
    /// `[[drop]]`: the connection was closed without an answer.
    Dropped,
    /// The client went away while the call hung on `[[hang]]`.
    Hung,
    /// The client went away before the answer was ready (during the latency,
    /// a `[[sleep]]` or while the request was being handled).
    Cancelled,
}

/// One chat completion call, as the mock saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    /// The last user message's content (what per-prompt counters key on).
    pub prompt: String,
    /// This call's 1-based number among the calls of `prompt`.
    pub call: u64,
    /// When the request arrived: parsed, counted and checked against the
    /// quota (the same instant as its [`CallArrival::start`]).
    pub start: Instant,
    /// When the answer was ready, or when the client went away.
    pub end: Instant,
    pub outcome: CallOutcome,
}

impl CallRecord {
    /// True when the two calls were in progress at the same moment.
    pub fn overlaps(&self, other: &CallRecord) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// One chat completion call as it arrived, kept by the journal the moment it
/// arrives ([`MockLlm::arrivals`]), so calls still in progress are included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallArrival {
    /// The last user message's content.
    pub prompt: String,
    /// This call's 1-based number among the calls of `prompt`.
    pub call: u64,
    /// Equal to the [`CallRecord::start`] of the same call once it ends.
    pub start: Instant,
    /// Wall-clock time of the arrival, to compare with times from other
    /// processes (e.g. a `blocked_until` in milliseconds since the epoch).
    pub at: SystemTime,
    /// `Some` when the call was answered 429 by the quota or a storm without
    /// being served (its [`CallRecord`] then says `Status(429)`).
    pub rejected: Option<Rejection>,
}

/// Finished calls, oldest first, bounded.
pub(crate) struct Journal {
    capacity: usize,
    records: Mutex<VecDeque<CallRecord>>,
    /// Every call at its arrival, oldest first, bounded like `records`.
    arrivals: Mutex<VecDeque<CallArrival>>,
    /// Records pushed out by newer ones once `capacity` was reached, so a test
    /// can tell a complete journal from a truncated one.
    evicted: AtomicU64,
    /// Calls started whose end is not recorded yet.
    open: AtomicU64,
}

impl Journal {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            records: Mutex::new(VecDeque::new()),
            arrivals: Mutex::new(VecDeque::new()),
            evicted: AtomicU64::new(0),
            open: AtomicU64::new(0),
        }
    }

    fn push(&self, record: CallRecord) {
        let mut records = self.records.lock();
        if records.len() >= self.capacity {
            records.pop_front();
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        records.push_back(record);
    }

    fn arrive(&self, arrival: CallArrival) {
        let mut arrivals = self.arrivals.lock();
        if arrivals.len() >= self.capacity {
            arrivals.pop_front();
        }
        arrivals.push_back(arrival);
    }

    pub(crate) fn arrivals(&self) -> Vec<CallArrival> {
        self.arrivals.lock().iter().cloned().collect()
    }

    pub(crate) fn records(&self) -> Vec<CallRecord> {
        self.records.lock().iter().cloned().collect()
    }

    pub(crate) fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    pub(crate) fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Forgets finished calls and arrivals; calls in progress are still
    /// recorded when they end.
    pub(crate) fn clear(&self) {
        self.records.lock().clear();
        self.arrivals.lock().clear();
        self.evicted.store(0, Ordering::Relaxed);
    }
}

/// A call in progress. Recorded when [`JournalEntry::finish`]ed, or when
/// dropped unfinished (the client went away and hyper dropped the handler).
pub(crate) struct JournalEntry {
    mock: MockLlm,
    prompt: String,
    call: u64,
    start: Instant,
    hanging: bool,
    outcome: Option<CallOutcome>,
}

impl JournalEntry {
    pub(crate) fn begin(
        mock: MockLlm,
        journal: &Journal,
        prompt: &str,
        call: u64,
        start: Instant,
        rejected: Option<Rejection>,
    ) -> Self {
        journal.open.fetch_add(1, Ordering::Relaxed);
        journal.arrive(CallArrival {
            prompt: prompt.to_owned(),
            call,
            start,
            at: SystemTime::now(),
            rejected,
        });
        Self {
            mock,
            prompt: prompt.to_owned(),
            call,
            start,
            hanging: false,
            outcome: None,
        }
    }

    /// The call is now in `[[hang]]`: if the client gives up, it ended as [`CallOutcome::Hung`].
    pub(crate) fn hanging(&mut self) {
        self.hanging = true;
    }

    pub(crate) fn finish(mut self, outcome: CallOutcome) {
        self.outcome = Some(outcome);
    }
}

impl Drop for JournalEntry {
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or(if self.hanging {
            CallOutcome::Hung
        } else {
            CallOutcome::Cancelled
        });
        let Some(journal) = self.mock.journal_state() else {
            return;
        };
        journal.push(CallRecord {
            prompt: std::mem::take(&mut self.prompt),
            call: self.call,
            start: self.start,
            end: Instant::now(),
            outcome,
        });
        journal.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MockConfig;

    fn journaled() -> MockLlm {
        MockLlm::new(MockConfig {
            journal: true,
            ..MockConfig::default()
        })
    }

    #[test]
    fn finished_and_abandoned_calls_are_recorded_with_their_outcome() {
        let mock = journaled();
        let a = mock
            .journal_entry("a", 1, Instant::now(), None)
            .expect("journal on");
        let mut b = mock
            .journal_entry("b", 1, Instant::now(), None)
            .expect("journal on");
        let c = mock
            .journal_entry("c", 1, Instant::now(), None)
            .expect("journal on");
        assert_eq!(mock.journal_open(), 3);
        b.hanging();
        a.finish(CallOutcome::Status(200));
        drop(b);
        drop(c);
        assert_eq!(mock.journal_open(), 0);
        let records = mock.journal();
        let outcomes: Vec<(&str, CallOutcome)> = records
            .iter()
            .map(|r| (r.prompt.as_str(), r.outcome))
            .collect();
        assert_eq!(
            outcomes,
            vec![
                ("a", CallOutcome::Status(200)),
                ("b", CallOutcome::Hung),
                ("c", CallOutcome::Cancelled)
            ]
        );
        assert!(records.iter().all(|r| r.start <= r.end && r.call == 1));
        // Arrivals were kept at once, in arrival order, with the same start.
        let arrivals = mock.arrivals();
        let prompts: Vec<&str> = arrivals.iter().map(|a| a.prompt.as_str()).collect();
        assert_eq!(prompts, ["a", "b", "c"]);
        for arrival in &arrivals {
            let record = records.iter().find(|r| r.prompt == arrival.prompt);
            assert_eq!(record.map(|r| r.start), Some(arrival.start));
        }
        assert_eq!(mock.call_times().len(), 3);
    }

    #[test]
    fn arrivals_include_calls_in_progress_and_why_they_were_refused() {
        let mock = journaled();
        let open = mock.journal_entry("a", 1, Instant::now(), Some(Rejection::Blocked));
        assert!(mock.journal().is_empty());
        let arrivals = mock.arrivals();
        assert_eq!(arrivals.len(), 1);
        assert_eq!(arrivals[0].rejected, Some(Rejection::Blocked));
        drop(open);
        mock.reset();
        assert!(mock.arrivals().is_empty());
    }

    #[test]
    fn off_means_no_entries() {
        let mock = MockLlm::new(MockConfig::default());
        assert!(mock.journal_entry("a", 1, Instant::now(), None).is_none());
        assert!(mock.journal().is_empty());
        assert_eq!(mock.journal_open(), 0);
    }

    #[test]
    fn the_journal_is_bounded_and_counts_what_it_dropped() {
        let mock = journaled();
        let total = crate::JOURNAL_CAPACITY + 3;
        for i in 0..total {
            if let Some(e) = mock.journal_entry("p", i as u64 + 1, Instant::now(), None) {
                e.finish(CallOutcome::Status(200));
            }
        }
        let records = mock.journal();
        assert_eq!(records.len(), crate::JOURNAL_CAPACITY);
        assert_eq!(records[0].call, 4, "the oldest are dropped first");
        assert_eq!(mock.journal_evicted(), 3);
        mock.reset();
        assert!(mock.journal().is_empty());
        assert_eq!(mock.journal_evicted(), 0);
    }

    #[test]
    fn overlap_is_strict_intersection() {
        let t0 = Instant::now();
        let ms = std::time::Duration::from_millis;
        let rec = |s: u64, e: u64| CallRecord {
            prompt: String::new(),
            call: 1,
            start: t0 + ms(s),
            end: t0 + ms(e),
            outcome: CallOutcome::Status(200),
        };
        assert!(rec(0, 10).overlaps(&rec(5, 20)));
        assert!(rec(5, 20).overlaps(&rec(0, 10)));
        assert!(rec(0, 30).overlaps(&rec(10, 20)));
        assert!(
            !rec(0, 10).overlaps(&rec(10, 20)),
            "back to back is not overlap"
        );
        assert!(!rec(20, 30).overlaps(&rec(0, 10)));
    }
}
