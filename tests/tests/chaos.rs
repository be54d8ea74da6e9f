//! Issue 10's seeded chaos test, the Jepsen/FoundationDB way scaled to CI: for `CHAOS_SECS`
//! (default 60) three workers run 2,000 tasks whose prompts script a mix of LLM faults (500/503,
//! 429 with and without `Retry-After`, 400, hangs past the LLM timeout, dropped connections, slow
//! calls) while a seeded scheduler SIGSTOPs/SIGCONTs, SIGKILLs and SIGTERMs workers (starting a
//! replacement for each one that goes) and freezes or kills and restarts Redis (AOF,
//! `appendfsync always`). Atomic snapshots taken all along check the structural invariants of the
//! queue; at the end Redis, the mock LLM's call journal and the workers' logs are checked task by
//! task.
//!
//! A failure prints its seed; replay it with
//! `CHAOS_SEED=<seed> cargo nextest run -p agentq-tests --test chaos --no-capture`. A longer run:
//! `CHAOS_SECS=300` (the task count scales with the duration unless `CHAOS_TASKS` is set). A replay
//! repeats the same tasks and the same fault sequence; the interleaving with real time differs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentq_mock_llm::{CallOutcome, CallRecord};
use agentq_tests::{MockConfig, RedisServer, Stack, Worker, ADMIN_TOKEN};
use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

#[path = "chaos_parts/workflows.rs"]
mod wf;

#[path = "chaos_parts/streams.rs"]
mod streams;

#[path = "chaos_parts/chat.rs"]
mod chat;

/// Key prefix of the default queue.
const PREFIX: &str = "agentq:{default}:";
const WORKERS: usize = 3;
const CONCURRENCY: &str = "16";
/// The upstream's concurrency limit: below WORKERS × CONCURRENCY, so the limiter parks runs.
const FLOW_CONCURRENCY: u64 = 40;
/// Heartbeat TTL: a worker frozen longer than this (plus a recovery period) loses its runs.
const HEARTBEAT_SECS: u64 = 2;
const MAX_RATE_LIMITED: u64 = 4;
/// Longest SIGSTOP of a worker; stops are drawn from 0.5 s up to this, so many outlast the TTL.
const MAX_WORKER_STOP_MS: u64 = 6000;
/// Longer than the longest worker stop plus scheduler slack, on purpose: a worker thawed after a
/// stop shorter than this must handle the answer that reached its socket while it was frozen as
/// what it is. With a shorter timeout, a 429 that arrived during the stop could be seen as a
/// timeout (tokio's timer fires before the socket is read), be counted as an attempt, and the
/// mock's log could no longer be reconciled with `rate_limited`. `[[hang:1]]` ends by it.
const LLM_TIMEOUT_SECS: u64 = 8;
/// Short, so SIGTERMed workers give runs back at the deadline instead of finishing them.
const DRAIN_TIMEOUT_SECS: u64 = 1;
const TASKS_PER_MINUTE: u64 = 2000;
/// A SIGTERMed worker must be gone by then (drain 1 s, give-back grace 5 s, Redis outages).
const EXIT_LIMIT: Duration = Duration::from_secs(30);
/// After the chaos: every acknowledged task final by then. Every injected 429 blocks the model
/// for the whole fleet (flow control), so the retries of a few hundred 429s take a while: runs
/// here settled 200-220 s after the faults, too close to the 240 s this limit used to be.
const SETTLE_LIMIT: Duration = Duration::from_secs(300);
/// After that: queues empty and every LLM call ended by then.
const QUIET_LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_chaos_keeps_every_invariant() -> Result<()> {
    let cfg = Config::from_env()?;
    println!(
        "chaos: seed {} ({} s, {} tasks); replay with CHAOS_SEED={}",
        cfg.seed, cfg.secs, cfg.tasks, cfg.seed
    );
    let seed = cfg.seed;
    run(cfg)
        .await
        .with_context(|| format!("chaos seed {seed}: replay with CHAOS_SEED={seed}"))
}

struct Config {
    seed: u64,
    secs: u64,
    tasks: usize,
}

impl Config {
    fn from_env() -> Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let seed = match var("CHAOS_SEED") {
            Some(v) => v
                .trim()
                .parse()
                .with_context(|| format!("CHAOS_SEED={v:?} is not an unsigned integer"))?,
            None => rand::random(),
        };
        let secs: u64 = match var("CHAOS_SECS") {
            Some(v) => v
                .trim()
                .parse()
                .with_context(|| format!("CHAOS_SECS={v:?} is not a number of seconds"))?,
            None => 60,
        };
        let tasks = match var("CHAOS_TASKS") {
            Some(v) => v
                .trim()
                .parse()
                .with_context(|| format!("CHAOS_TASKS={v:?} is not a count"))?,
            None => usize::try_from((TASKS_PER_MINUTE * secs / 60).max(1))?,
        };
        if secs == 0 || tasks == 0 {
            bail!("CHAOS_SECS and CHAOS_TASKS must be positive");
        }
        Ok(Self { seed, secs, tasks })
    }
}

// ---- the tasks ----

/// One task the test submits: everything about it is drawn from the seed up front.
struct Spec {
    n: usize,
    prompt: String,
    max_attempts: u32,
    /// When to POST it, from the start of the chaos phase.
    send_at: Duration,
    /// Cancel it (DELETE) this long after its 202.
    cancel_after: Option<Duration>,
    /// One of a few dozen agents, for about one task in ten: an agent's tasks must run one at a
    /// time (its lane), whatever the faults.
    agent: Option<String>,
    /// Whose task it is (an index into [`TENANTS`]): the tasks are spread over three tenants, so
    /// fair fetch's rotation and weights, the tickets and the per-tenant run counts meet every
    /// fault. An agent's tasks all belong to one tenant (lanes are per tenant).
    tenant: usize,
}

/// The chaos test's tenants: the default tenant (the admin token's tasks) and two made over the
/// admin routes, of weights 1 and 2. (id, weight); the default tenant's weight is 1.
const TENANTS: [(&str, u32); 3] = [("default", 1), ("chaos-a", 1), ("chaos-b", 2)];

fn plan_tasks(cfg: &Config) -> Vec<Spec> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    // Spread over the first 90% of the chaos phase, so the last tasks still meet faults.
    let span = Duration::from_secs(cfg.secs).mul_f64(0.9);
    (0..cfg.tasks)
        .map(|n| {
            let mut prompt = format!("chaos {} task {n}:", cfg.seed);
            let roll = rng.random_range(0..100u32);
            let marker = match roll {
                0..30 => String::new(),
                30..45 => format!(
                    "[[fail:{}:{}]]",
                    if rng.random_bool(0.5) { 500 } else { 503 },
                    rng.random_range(1..=3u32)
                ),
                45..55 => format!("[[fail:429:{}]]", rng.random_range(1..=5u32)),
                55..65 => format!("[[fail:429:{}:1]]", rng.random_range(1..=5u32)),
                65..70 => "[[fail:400]]".to_owned(),
                70..74 => "[[hang:1]]".to_owned(),
                74..77 => "[[drop:1]]".to_owned(),
                _ => format!("[[sleep:{}]]", rng.random_range(200..=1800u32)),
            };
            if !marker.is_empty() {
                prompt.push(' ');
                prompt.push_str(&marker);
            }
            // Slow calls on top of the other faults too: they keep calls in flight when a worker
            // is frozen, killed or drained.
            if roll < 77 && rng.random_bool(0.25) {
                prompt.push_str(&format!(" [[sleep:{}]]", rng.random_range(100..=1500u32)));
            }
            // Answers streamed slowly (the worker streams every call): a fault lands mid-stream,
            // and the event-stream invariants (chaos_parts/streams.rs) must still hold.
            if rng.random_bool(0.2) {
                prompt.push_str(&format!(
                    " some words to stream [[stream_rate:{}]]",
                    rng.random_range(5..=60u32)
                ));
            }
            let max_attempts = rng.random_range(1..=4u32);
            let cancel_after = rng
                .random_bool(0.01)
                .then(|| Duration::from_millis(rng.random_range(0..3000)));
            let agent_n = rng.random_bool(0.1).then(|| rng.random_range(0..40u32));
            let agent = agent_n.map(|a| format!("chaos-agent-{a}"));
            let tenant = match agent_n {
                Some(a) => a as usize % TENANTS.len(),
                None => n % TENANTS.len(),
            };
            Spec {
                n,
                prompt,
                max_attempts,
                send_at: span.mul_f64(n as f64 / cfg.tasks as f64),
                cancel_after,
                agent,
                tenant,
            }
        })
        .collect()
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum CancelReply {
    #[default]
    NotAsked,
    /// 200: the task must end `cancelled`.
    Cancelled,
    /// 409 to the first DELETE: it was already final, so not by this cancel.
    Conflict,
    /// No answer or a 503 (Redis away), maybe then a 409: it may or may not have landed.
    Unknown,
}

#[derive(Debug, Default)]
struct Submission {
    n: usize,
    /// The id from the 202, once acknowledged.
    id: Option<String>,
    posts: u32,
    cancel: CancelReply,
    problems: Vec<String>,
}

/// POSTs one task until a 202, retrying 503s and timeouts with the same `Idempotency-Key` (what
/// the README tells clients to do), then cancels it if the spec says so.
async fn submit(
    http: reqwest::Client,
    api: String,
    seed: u64,
    spec: &Spec,
    token: &str,
    give_up: Instant,
) -> Submission {
    let mut sub = Submission {
        n: spec.n,
        ..Submission::default()
    };
    let mut body = json!({"prompt": spec.prompt, "max_attempts": spec.max_attempts});
    if let Some(agent) = &spec.agent {
        body["agent_id"] = json!(agent);
    }
    let key = format!("chaos-{seed}-{}", spec.n);
    loop {
        sub.posts += 1;
        let reply = http
            .post(format!("{api}/v1/tasks"))
            .header("idempotency-key", &key)
            .bearer_auth(token)
            .json(&body)
            .send()
            .await;
        if let Ok(r) = reply {
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            match status {
                202 => {
                    match v["id"].as_str() {
                        Some(id) => sub.id = Some(id.to_owned()),
                        None => sub
                            .problems
                            .push(format!("task {}: 202 without an id: {v}", spec.n)),
                    }
                    break;
                }
                503 => {}
                _ => {
                    sub.problems.push(format!(
                        "task {}: POST /v1/tasks answered {status} (only 202 or 503 are expected): {v}",
                        spec.n
                    ));
                    if status < 500 {
                        break;
                    }
                }
            }
        }
        // else: no answer in time (Redis frozen under the api): same key again
        if Instant::now() > give_up {
            sub.problems.push(format!(
                "task {}: never acknowledged after {} POSTs",
                spec.n, sub.posts
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (Some(id), Some(after)) = (sub.id.clone(), spec.cancel_after) else {
        return sub;
    };
    tokio::time::sleep(after).await;
    sub.cancel = CancelReply::Unknown;
    // A DELETE that got no answer or a 503 may still land when Redis wakes up (its script was
    // sent), and then a retry finds the task already final: that 409 proves nothing.
    let mut unanswered = false;
    for _ in 0..5 {
        let Ok(r) = http
            .delete(format!("{api}/v1/tasks/{id}"))
            .bearer_auth(token)
            .send()
            .await
        else {
            unanswered = true;
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        match r.status().as_u16() {
            200 => sub.cancel = CancelReply::Cancelled,
            409 if !unanswered => sub.cancel = CancelReply::Conflict,
            409 => {}
            503 => {
                unanswered = true;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            other => sub.problems.push(format!(
                "task {}: DELETE answered {other} (200, 409 or 503 expected)",
                spec.n
            )),
        }
        break;
    }
    sub
}

/// Submits every task at its time, each on its own tokio task so one stuck POST (Redis frozen)
/// does not hold up the others.
async fn submit_all(
    http: reqwest::Client,
    api: String,
    seed: u64,
    specs: Arc<Vec<Spec>>,
    tokens: Arc<Vec<String>>,
    t0: Instant,
    give_up: Instant,
) -> Vec<Submission> {
    let limit = Arc::new(Semaphore::new(256));
    let mut handles = Vec::with_capacity(specs.len());
    for i in 0..specs.len() {
        tokio::time::sleep_until((t0 + specs[i].send_at).into()).await;
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let (http, api, specs, tokens) = (http.clone(), api.clone(), specs.clone(), tokens.clone());
        handles.push(tokio::spawn(async move {
            let _permit = permit;
            let token = &tokens[specs[i].tenant];
            submit(http, api, seed, &specs[i], token, give_up).await
        }));
    }
    let mut out = Vec::with_capacity(handles.len());
    for (n, h) in handles.into_iter().enumerate() {
        out.push(h.await.unwrap_or_else(|e| Submission {
            n,
            problems: vec![format!("task {n}: submitter panicked: {e}")],
            ..Submission::default()
        }));
    }
    out
}

// ---- snapshots of the queue ----

/// Reads every structure of the queue in one script, so the snapshot is atomic. `KEYS` is fine
/// here: a private, non-cluster Redis with a few thousand keys. Pending ids are those in the
/// tenants' lines (`pending` holds tickets); the fair-scheduling invariants
/// ([`agentq_tests::fair::FAIR_CHECK_LUA`], prepended) are checked in the same step.
const SNAPSHOT_LUA: &str = r#"
local p = ARGV[1]
local pending = {}
for _, key in ipairs(redis.call('KEYS', p .. 'pending:*')) do
  for _, id in ipairs(redis.call('LRANGE', key, 0, -1)) do pending[#pending + 1] = id end
end
local delayed = redis.call('ZRANGE', p .. 'delayed', 0, -1)
local throttled = redis.call('ZRANGE', p .. 'throttled', 0, -1)
local dead = redis.call('ZRANGE', p .. 'dead', 0, -1)
local active = redis.call('ZRANGE', p .. 'active', 0, -1)
local inflight = {}
for _, key in ipairs(redis.call('KEYS', p .. 'inflight:*')) do
  local worker = string.sub(key, #p + 10)
  for _, id in ipairs(redis.call('LRANGE', key, 0, -1)) do
    -- a ticket a blocking wait moved is no id: fair_violations counts it
    if id ~= '~' then inflight[#inflight + 1] = worker .. ' ' .. id end
  end
end
local running = {}
local tasks = 0
-- at any instant, not settled: workers may sit between a blocking wait and its fetch
local broken = fair_violations(p, false)
for _, key in ipairs(redis.call('KEYS', p .. 'task:*')) do
  -- a task's event stream sits beside its record: '<record key>:events'. Streams are written on
  -- demand (events.lua): one exists only while its record says it is on, and a final task whose
  -- stream is on has its end written last
  if string.sub(key, -7) == ':events' then
    local rec = string.sub(key, 1, -8)
    if redis.call('EXISTS', rec) == 1 and redis.call('HEXISTS', rec, 'ev') == 0 then
      broken[#broken + 1] = key .. ' exists but its record says the stream is off'
    end
  else
    local r = redis.call('HMGET', key, 'status', 'ev')
    if r[2] and (r[1] == 'succeeded' or r[1] == 'failed' or r[1] == 'cancelled') then
      local last = redis.call('XREVRANGE', key .. ':events', '+', '-', 'COUNT', 1)[1]
      if not last or last[2][2] ~= 'final' then
        broken[#broken + 1] = key .. ' is ' .. r[1] .. ' with its stream on, but the stream does not end with its end'
      end
    end
    tasks = tasks + 1
    local t = redis.call('HMGET', key, 'status', 'worker')
    if t[1] == 'running' then
      running[#running + 1] = string.sub(key, #p + 6) .. ' ' .. (t[2] or '')
    end
  end
end
return {pending, delayed, dead, active, inflight, running, tasks, throttled, broken}
"#;

#[derive(Debug, Default)]
struct Snapshot {
    pending: Vec<String>,
    delayed: Vec<String>,
    /// Parked by the flow limiter (a 429's fleet-wide block) until their turn.
    throttled: Vec<String>,
    dead: Vec<String>,
    active: Vec<String>,
    /// (worker, id) for every entry of every in-flight list.
    inflight: Vec<(String, String)>,
    /// (id, worker) of every task whose status is `running`.
    running: Vec<(String, String)>,
    task_records: usize,
    /// Broken invariants of fair scheduling: tickets against queued ids, the ring, the run
    /// counts per tenant ([`agentq_tests::fair::FAIR_CHECK_LUA`]); and of the on-demand event
    /// streams (a stream only while its record says it is on, a final task's on stream ending
    /// with its end).
    fair: Vec<String>,
}

fn pairs(v: Vec<String>) -> Vec<(String, String)> {
    v.into_iter()
        .map(|s| match s.split_once(' ') {
            Some((a, b)) => (a.to_owned(), b.to_owned()),
            None => (s, String::new()),
        })
        .collect()
}

async fn snapshot(client: &redis::Client) -> Result<Snapshot> {
    let work = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        type Raw = (
            Vec<String>,
            Vec<String>,
            Vec<String>,
            Vec<String>,
            Vec<String>,
            Vec<String>,
            usize,
            Vec<String>,
            Vec<String>,
        );
        let lua = format!("{}\n{SNAPSHOT_LUA}", agentq_tests::fair::FAIR_CHECK_LUA);
        let raw: Raw = redis::Script::new(&lua)
            .arg(PREFIX)
            .invoke_async(&mut conn)
            .await?;
        anyhow::Ok(raw)
    };
    let (pending, delayed, dead, active, inflight, running, task_records, throttled, fair) =
        tokio::time::timeout(Duration::from_secs(2), work)
            .await
            .context("snapshot timed out")??;
    Ok(Snapshot {
        pending,
        delayed,
        throttled,
        dead,
        active,
        inflight: pairs(inflight),
        running: pairs(running),
        task_records,
        fair,
    })
}

/// The invariants of the fencing spec that hold at every instant.
fn structural_violations(s: &Snapshot) -> Vec<String> {
    let mut places: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for id in &s.pending {
        places.entry(id).or_default().push("pending".to_owned());
    }
    for id in &s.delayed {
        places.entry(id).or_default().push("delayed".to_owned());
    }
    for id in &s.throttled {
        places.entry(id).or_default().push("throttled".to_owned());
    }
    for id in &s.dead {
        places.entry(id).or_default().push("dead".to_owned());
    }
    for (worker, id) in &s.inflight {
        places
            .entry(id)
            .or_default()
            .push(format!("inflight:{worker}"));
    }
    let mut out = s.fair.clone();
    for (id, at) in &places {
        if at.len() > 1 {
            out.push(format!(
                "{id} is in {} places at once: {}",
                at.len(),
                at.join(", ")
            ));
        }
    }
    let active: HashSet<&str> = s.active.iter().map(String::as_str).collect();
    let running: BTreeMap<&str, &str> = s
        .running
        .iter()
        .map(|(id, w)| (id.as_str(), w.as_str()))
        .collect();
    let inflight: HashSet<(&str, &str)> = s
        .inflight
        .iter()
        .map(|(w, id)| (w.as_str(), id.as_str()))
        .collect();
    let mut not_running: Vec<&&str> = active
        .iter()
        .filter(|id| !running.contains_key(**id))
        .collect();
    not_running.sort();
    for id in not_running {
        out.push(format!("{id} is in active but its status is not running"));
    }
    for (id, worker) in &running {
        if !active.contains(id) {
            out.push(format!(
                "{id} is running (worker {worker}) but not in active"
            ));
        }
        if !inflight.contains(&(*worker, *id)) {
            out.push(format!(
                "{id} is running on {worker} but not in inflight:{worker}"
            ));
        }
    }
    out
}

#[derive(Debug, Default)]
struct SnapshotLog {
    taken: u64,
    missed: u64,
    /// (seconds since the start, violation), the first ones only.
    violations: Vec<(f64, String)>,
}

/// Takes a snapshot every 500 ms until `stop`, checking each one.
async fn watch(client: redis::Client, t0: Instant, stop: Arc<AtomicBool>) -> SnapshotLog {
    let mut log = SnapshotLog::default();
    while !stop.load(Ordering::SeqCst) {
        match snapshot(&client).await {
            Ok(s) => {
                log.taken += 1;
                let at = t0.elapsed().as_secs_f64();
                for v in structural_violations(&s) {
                    if log.violations.len() < 100 {
                        log.violations.push((at, v));
                    }
                }
            }
            // Redis frozen or down: nothing to read.
            Err(_) => log.missed += 1,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    log
}

// ---- the fault scheduler ----

struct Live {
    worker: Worker,
    frozen_until: Option<Instant>,
}

struct Draining {
    worker: Worker,
    since: Instant,
}

#[derive(Debug, Clone, Copy)]
enum RedisState {
    Up,
    Frozen(Instant),
    Down(Instant),
}

#[derive(Debug, Default)]
struct FaultCounts {
    worker_stops: u32,
    worker_stops_past_ttl: u32,
    worker_kills: u32,
    worker_terms: u32,
    redis_freezes: u32,
    redis_kills: u32,
    skipped: u32,
}

struct Chaos {
    rng: StdRng,
    t0: Instant,
    live: Vec<Live>,
    draining: Vec<Draining>,
    /// Worker name (`worker-N`) → Unix ms of its SIGKILL.
    killed_at: HashMap<String, i64>,
    redis: RedisState,
    faults: FaultCounts,
    events: Vec<String>,
    problems: Vec<String>,
}

impl Chaos {
    fn new(seed: u64, t0: Instant) -> Self {
        Self {
            // Its own stream, so the task plan and the fault plan do not shift each other.
            rng: StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15),
            t0,
            live: Vec::new(),
            draining: Vec::new(),
            killed_at: HashMap::new(),
            redis: RedisState::Up,
            faults: FaultCounts::default(),
            events: Vec::new(),
            problems: Vec::new(),
        }
    }

    fn note(&mut self, what: String) {
        let line = format!("{:>8.3} s  {what}", self.t0.elapsed().as_secs_f64());
        println!("chaos: {line}");
        self.events.push(line);
    }

    async fn start_worker(&mut self, s: &mut Stack) -> Result<()> {
        let worker = s.start_worker(&[]).await?;
        self.note(format!("started {}", worker.proc.name));
        self.live.push(Live {
            worker,
            frozen_until: None,
        });
        Ok(())
    }

    /// Ends the faults whose time is up and reaps drained workers.
    async fn tick(&mut self, s: &mut Stack) -> Result<()> {
        let now = Instant::now();
        let mut notes = Vec::new();
        for l in &mut self.live {
            if l.frozen_until.is_some_and(|t| t <= now) {
                l.worker.proc.thaw();
                l.frozen_until = None;
                notes.push(format!("SIGCONT {}", l.worker.proc.name));
            }
        }
        match self.redis {
            RedisState::Frozen(until) if until <= now => {
                s.redis.thaw();
                self.redis = RedisState::Up;
                notes.push("SIGCONT redis".to_owned());
            }
            RedisState::Down(until) if until <= now => {
                // block_in_place: resume() polls with std sleeps, and the mock LLM shares this
                // runtime.
                tokio::task::block_in_place(|| s.redis.resume())?;
                self.redis = RedisState::Up;
                notes.push("restarted redis (AOF replayed)".to_owned());
            }
            _ => {}
        }
        let mut still = Vec::new();
        for mut d in std::mem::take(&mut self.draining) {
            let name = d.worker.proc.name.clone();
            match d.worker.proc.try_exit() {
                Some(status) => {
                    notes.push(format!(
                        "{name} exited ({status}) {:.1} s after SIGTERM",
                        d.since.elapsed().as_secs_f64()
                    ));
                    if !status.success() {
                        self.problems.push(format!(
                            "{name} exited with {status} after SIGTERM (a drain exits 0)"
                        ));
                    }
                }
                None if d.since.elapsed() > EXIT_LIMIT => {
                    self.problems.push(format!(
                        "{name} still running {EXIT_LIMIT:?} after SIGTERM; killed"
                    ));
                    d.worker.proc.sigkill();
                    self.killed_at
                        .insert(name.clone(), agentq_common::time::now_ms());
                    notes.push(format!("SIGKILL {name} (drain never ended)"));
                }
                None => still.push(d),
            }
        }
        self.draining = still;
        for n in notes {
            self.note(n);
        }
        Ok(())
    }

    /// One fault, drawn from the seeded stream. The same numbers are drawn whatever the state,
    /// so a replay makes the same decisions even when a fault has to be skipped.
    async fn inject(&mut self, s: &mut Stack) -> Result<()> {
        let roll = self.rng.random_range(0..100u32);
        let pick = self.rng.random_range(0..1000usize);
        let u: f64 = self.rng.random();
        let now = Instant::now();
        match roll {
            0..30 => {
                let idle: Vec<usize> = (0..self.live.len())
                    .filter(|&i| self.live[i].frozen_until.is_none())
                    .collect();
                let Some(&i) = idle.get(pick % idle.len().max(1)) else {
                    self.skip("SIGSTOP a worker: every worker is frozen");
                    return Ok(());
                };
                let ms = 500 + (u * (MAX_WORKER_STOP_MS - 500) as f64) as u64;
                let l = &mut self.live[i];
                l.worker.proc.freeze();
                l.frozen_until = Some(now + Duration::from_millis(ms));
                let name = l.worker.proc.name.clone();
                self.faults.worker_stops += 1;
                let past = ms > HEARTBEAT_SECS * 1000;
                if past {
                    self.faults.worker_stops_past_ttl += 1;
                }
                self.note(format!(
                    "SIGSTOP {name} for {ms} ms{}",
                    if past {
                        " (past the heartbeat TTL)"
                    } else {
                        ""
                    }
                ));
            }
            30..50 => {
                // Frozen workers too: a paused node that never comes back.
                if self.live.is_empty() {
                    self.skip("SIGKILL a worker: none");
                    return Ok(());
                }
                let mut l = self.live.remove(pick % self.live.len());
                l.worker.proc.sigkill();
                let name = l.worker.proc.name.clone();
                self.killed_at
                    .insert(name.clone(), agentq_common::time::now_ms());
                self.faults.worker_kills += 1;
                self.note(format!(
                    "SIGKILL {name}{}",
                    if l.frozen_until.is_some() {
                        " (while frozen)"
                    } else {
                        ""
                    }
                ));
                drop(l);
                self.start_worker(s).await?;
            }
            50..70 => {
                let idle: Vec<usize> = (0..self.live.len())
                    .filter(|&i| self.live[i].frozen_until.is_none())
                    .collect();
                let Some(&i) = idle.get(pick % idle.len().max(1)) else {
                    self.skip("SIGTERM a worker: every worker is frozen");
                    return Ok(());
                };
                let l = self.live.remove(i);
                l.worker.proc.sigterm();
                let name = l.worker.proc.name.clone();
                self.draining.push(Draining {
                    worker: l.worker,
                    since: now,
                });
                self.faults.worker_terms += 1;
                self.note(format!("SIGTERM {name}"));
                self.start_worker(s).await?;
            }
            70..85 => {
                if !matches!(self.redis, RedisState::Up) {
                    self.skip("SIGSTOP redis: redis is not up");
                    return Ok(());
                }
                let ms = 500 + (u * 4500.0) as u64;
                s.redis.freeze();
                self.redis = RedisState::Frozen(now + Duration::from_millis(ms));
                self.faults.redis_freezes += 1;
                self.note(format!("SIGSTOP redis for {ms} ms"));
            }
            _ => {
                if !matches!(self.redis, RedisState::Up) {
                    self.skip("SIGKILL redis: redis is not up");
                    return Ok(());
                }
                let ms = (u * 3000.0) as u64;
                s.redis.kill();
                self.redis = RedisState::Down(now + Duration::from_millis(ms));
                self.faults.redis_kills += 1;
                self.note(format!("SIGKILL redis, restart in {ms} ms"));
            }
        }
        Ok(())
    }

    fn skip(&mut self, what: &str) {
        self.faults.skipped += 1;
        self.note(format!("skipped: {what}"));
    }

    /// Ends every fault: thaws workers and Redis, restarts Redis, waits for drains, tops the
    /// fleet back up to three workers.
    async fn calm(&mut self, s: &mut Stack) -> Result<()> {
        let now = Instant::now();
        for l in &mut self.live {
            if l.frozen_until.is_some() {
                l.frozen_until = Some(now);
            }
        }
        match self.redis {
            RedisState::Frozen(_) => self.redis = RedisState::Frozen(now),
            RedisState::Down(_) => self.redis = RedisState::Down(now),
            RedisState::Up => {}
        }
        self.tick(s).await?;
        while !self.draining.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.tick(s).await?;
        }
        while self.live.len() < WORKERS {
            self.start_worker(s).await?;
        }
        self.note("faults over".to_owned());
        Ok(())
    }
}

// ---- the run ----

async fn run(cfg: Config) -> Result<()> {
    let redis = RedisServer::start_with(true, &[])?;
    let mut s = Stack::with_redis(
        redis,
        MockConfig {
            journal: true,
            ..MockConfig::default()
        },
    )
    .await?;
    for (k, v) in [
        ("AGENTQ_LOG_FORMAT", "json"),
        ("RUST_LOG", "info,agentq_worker=debug"),
        ("AGENTQ_HEARTBEAT_SECS", &HEARTBEAT_SECS.to_string()),
        ("AGENTQ_MAX_RATE_LIMITED", &MAX_RATE_LIMITED.to_string()),
        ("AGENTQ_LLM_TIMEOUT_SECS", &LLM_TIMEOUT_SECS.to_string()),
        ("AGENTQ_DRAIN_TIMEOUT_SECS", &DRAIN_TIMEOUT_SECS.to_string()),
        ("WORKER_CONCURRENCY", CONCURRENCY),
    ] {
        s.env.insert(k.to_owned(), v.to_owned());
    }
    // Flow control under chaos: a concurrency limit below the fleet's 48 slots parks runs in the
    // throttled set, leases of killed workers must age out, and every 429 blocks the model for
    // the whole fleet; the invariants must hold through all of it.
    let upstreams = s.logs.path().join("upstreams.json");
    std::fs::write(
        &upstreams,
        serde_json::json!({"upstreams": [{
            "name": "chaos",
            "base_url": s.llm_url,
            "api_key": "env:OPENAI_API_KEY",
            "models": ["mock-gpt"],
            "limits": {"rpm": 60000, "concurrency": FLOW_CONCURRENCY},
            "model_limits": {"mock-gpt": {"tpm": 100_000_000}},
        }]})
        .to_string(),
    )?;
    s.env.insert(
        "AGENTQ_UPSTREAMS".to_owned(),
        upstreams.to_string_lossy().into_owned(),
    );
    // auth on: the plain tasks are spread over three tenants (their tokens), the workflows and
    // chat completions are the admin's (the default tenant)
    s.start_api_auth(&[]).await?;
    let mut tokens = vec![ADMIN_TOKEN.to_owned()];
    for (id, weight) in &TENANTS[1..] {
        tokens.push(s.tenant(&json!({"id": id, "weight": weight})).await?);
    }
    let tokens = Arc::new(tokens);
    let admin_headers = {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            reqwest::header::AUTHORIZATION,
            reqwest::header::HeaderValue::from_str(&format!("Bearer {ADMIN_TOKEN}"))?,
        );
        h
    };

    let specs = Arc::new(plan_tasks(&cfg));
    let t0 = Instant::now();
    let mut chaos = Chaos::new(cfg.seed, t0);
    for _ in 0..WORKERS {
        chaos.start_worker(&mut s).await?;
    }
    let chaos_end = t0 + Duration::from_secs(cfg.secs);

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(8))
        .build()?;
    let submitter = tokio::spawn(submit_all(
        http,
        s.api_url.clone(),
        cfg.seed,
        specs.clone(),
        tokens.clone(),
        t0,
        chaos_end + Duration::from_secs(60),
    ));
    let wf_specs = Arc::new(wf::plan(cfg.seed, cfg.secs, cfg.tasks));
    let wf_submitter = {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(8))
            .default_headers(admin_headers.clone())
            .build()?;
        let (api, seed, give_up) = (
            s.api_url.clone(),
            cfg.seed,
            chaos_end + Duration::from_secs(60),
        );
        paced(
            wf_specs.clone(),
            t0,
            |w: &wf::WfSpec| w.send_at,
            move |specs, i| {
                let (http, api) = (http.clone(), api.clone());
                async move { wf::submit(http, api, seed, &specs[i], give_up).await }
            },
            |w, e| wf::WfSubmission {
                w,
                problems: vec![format!("workflow {w}: submitter panicked: {e}")],
                ..wf::WfSubmission::default()
            },
        )
    };
    let chat_specs = Arc::new(chat::plan(cfg.seed, cfg.secs, cfg.tasks));
    let chat_submitter = {
        // a stream lasts as long as its task: no whole-request timeout short of the api's wait
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(8))
            .timeout(Duration::from_secs(400))
            .default_headers(admin_headers.clone())
            .build()?;
        let (api, seed, give_up) = (s.api_url.clone(), cfg.seed, chaos_end + SETTLE_LIMIT);
        paced(
            chat_specs.clone(),
            t0,
            |c: &chat::ChatSpec| c.send_at,
            move |specs, i| {
                let (http, api) = (http.clone(), api.clone());
                async move { chat::submit(http, api, seed, &specs[i], give_up).await }
            },
            |n, e| chat::ChatSub {
                n,
                problems: vec![format!("chat {n}: submitter panicked: {e}")],
                ..chat::ChatSub::default()
            },
        )
    };
    let stop_watching = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch(s.redis.client()?, t0, stop_watching.clone()));

    // The chaos phase: a fault every 1–3 s.
    let mut next_fault = t0 + Duration::from_millis(chaos.rng.random_range(1000..3000));
    while Instant::now() < chaos_end {
        chaos.tick(&mut s).await?;
        if Instant::now() >= next_fault {
            chaos.inject(&mut s).await?;
            next_fault = Instant::now() + Duration::from_millis(chaos.rng.random_range(1000..3000));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    chaos.calm(&mut s).await?;

    let submissions = submitter.await.context("submitter panicked")?;
    let wf_subs = wf_submitter.await.context("workflow submitter panicked")?;
    let settle_from = Instant::now();
    let mut violations: Vec<String> = Vec::new();
    for sub in &submissions {
        violations.extend(sub.problems.iter().cloned());
    }
    violations.extend(chaos.problems.iter().cloned());

    let acked: Vec<(usize, String)> = submissions
        .iter()
        .filter_map(|sub| sub.id.clone().map(|id| (sub.n, id)))
        .collect();
    let ids: Vec<String> = acked.iter().map(|(_, id)| id.clone()).collect();
    let client = s.redis.client()?;

    // Every acknowledged task reaches a final state.
    let unfinished = wait_final(&client, &ids, SETTLE_LIMIT).await?;
    let settle = settle_from.elapsed();
    for (id, status) in unfinished.iter().take(20) {
        violations.push(format!(
            "{id} is still {status} {SETTLE_LIMIT:?} after the faults ended"
        ));
    }
    // Every acknowledged workflow closes too.
    for sub in &wf_subs {
        violations.extend(sub.problems.iter().cloned());
    }
    let wf_ids: Vec<String> = wf_subs.iter().filter_map(|w| w.id.clone()).collect();
    let left = settle_from.elapsed();
    for id in wf::wait_closed(&client, &wf_ids, SETTLE_LIMIT.saturating_sub(left)).await? {
        violations.push(format!(
            "workflow {id} is still running {SETTLE_LIMIT:?} after the faults ended"
        ));
    }
    // Every streamed chat completion ends, and its task too.
    let chat_subs = chat_submitter.await.context("chat submitter panicked")?;
    let chat_ids: Vec<String> = chat_subs
        .iter()
        .filter_map(|c| c.id.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let left = settle_from.elapsed();
    for (id, status) in wait_final(&client, &chat_ids, SETTLE_LIMIT.saturating_sub(left)).await? {
        violations.push(format!(
            "chat completion task {id} is still {status} {SETTLE_LIMIT:?} after the faults ended"
        ));
    }
    // Then the queue empties and every LLM call ends.
    let quiet = wait_quiet(&client, &s, QUIET_LIMIT).await;
    stop_watching.store(true, Ordering::SeqCst);
    let watched = watcher.await.context("snapshot watcher panicked")?;
    for (at, v) in &watched.violations {
        violations.push(format!("snapshot at {at:.3} s: {v}"));
    }
    let last = match quiet {
        Ok(snap) => snap,
        Err((snap, why)) => {
            violations.push(why);
            snap
        }
    };

    let records = read_records(&client, &ids).await?;
    let wrep = wf::check(&client, cfg.seed, &wf_specs, &wf_subs, &s.mock.arrivals()).await?;
    violations.extend(wrep.violations.iter().cloned());
    // the calls of acknowledged chat completions are checked by chat::check, not as tasks
    let chat_prompts: HashSet<&str> = chat_subs
        .iter()
        .filter(|c| c.id.is_some())
        .map(|c| chat_specs[c.n].prompt.as_str())
        .collect();
    let journal: Vec<CallRecord> = s
        .mock
        .journal()
        .into_iter()
        .filter(|c| !chat_prompts.contains(c.prompt.as_str()))
        .collect();
    let logs = read_worker_logs(&s)?;
    let report = check_tasks(
        &specs,
        &submissions,
        &records,
        &journal,
        &logs,
        &chaos.killed_at,
        t0,
    );
    violations.extend(report.violations.iter().cloned());
    let broker = agentq_common::Broker::new(
        agentq_common::Redis::open(&secrecy::SecretString::from(s.redis.url()))?,
        "agentq",
    );
    violations.extend(streams::check(&client, &broker, &ids).await?);
    violations.extend(streams::check(&client, &broker, &chat_ids).await?);
    violations.extend(chat::check(&client, &chat_subs).await?);
    let chat_records = read_records(&client, &chat_ids).await?;

    // Global checks.
    violations.extend(lane_violations(&specs, &submissions, &records));
    let lanes_left: u64 = redis::cmd("SCARD")
        .arg(format!("{PREFIX}lanes"))
        .query_async(&mut client.get_multiplexed_async_connection().await?)
        .await?;
    if lanes_left != 0 {
        violations.push(format!(
            "{lanes_left} agents still have a lane with every task final"
        ));
    }
    let distinct: HashSet<&str> = ids.iter().map(String::as_str).collect();
    if distinct.len() != ids.len() {
        violations.push(format!(
            "{} acknowledged tasks share {} ids: two POSTs with different keys got one task",
            ids.len(),
            distinct.len()
        ));
    }
    if last.task_records != ids.len() + wrep.node_tasks.len() + chat_ids.len() {
        violations.push(format!(
            "{} task records in Redis for {} acknowledged tasks, {} workflow nodes and {} chat completions (a 503'd POST retried with its key must not make a second task or workflow)",
            last.task_records,
            ids.len(),
            wrep.node_tasks.len(),
            chat_ids.len()
        ));
    }
    let dead: HashSet<&str> = last.dead.iter().map(String::as_str).collect();
    let failed: HashSet<&str> = records
        .iter()
        .chain(chat_records.iter())
        .filter(|(_, r)| field(r, "status") == "failed")
        .map(|(id, _)| id.as_str())
        .chain(wrep.failed_tasks.iter().map(String::as_str))
        .collect();
    if dead != failed {
        let mut extra: Vec<&&str> = dead.difference(&failed).collect();
        let mut missing: Vec<&&str> = failed.difference(&dead).collect();
        extra.sort();
        missing.sort();
        violations.push(format!(
            "dead set differs from the failed tasks: in dead but not failed {extra:?}; failed but not in dead {missing:?}"
        ));
    }
    if s.mock.journal_evicted() > 0 {
        violations.push(format!(
            "the mock's journal dropped {} calls; the per-task checks are incomplete",
            s.mock.journal_evicted()
        ));
    }
    let all_logs = s.all_logs();
    let panics: Vec<&str> = all_logs
        .lines()
        .filter(|l| l.contains("panicked"))
        .take(10)
        .collect();
    if !panics.is_empty() {
        violations.push(format!("a process panicked:\n{}", panics.join("\n")));
    }

    let summary = summarize(
        &cfg,
        &submissions,
        &records,
        &logs,
        &chaos,
        &watched,
        &report,
        settle,
    );
    println!("{summary}");
    println!(
        "chaos workflows: {} of {} acknowledged ({} cancelled over HTTP), final {:?}, node states {:?}",
        wf_ids.len(),
        wf_specs.len(),
        wf_subs.iter().filter(|w| w.cancelled).count(),
        wrep.by_status,
        wrep.node_states
    );
    let chat_endings = chat_subs.iter().fold(BTreeMap::new(), |mut m, c| {
        let k = match &c.ending {
            chat::Ending::Done(_) => "done".to_owned(),
            chat::Ending::Error(code) => code.clone(),
            chat::Ending::Nothing => "nothing".to_owned(),
        };
        *m.entry(k).or_insert(0u32) += 1;
        m
    });
    println!(
        "chaos chat completions: {} streamed calls ({} tries), endings {chat_endings:?}",
        chat_subs.len(),
        chat_subs.iter().map(|c| c.tries).sum::<u32>()
    );
    for e in &report.wider_429_examples {
        println!("chaos: a 429 accounted to a give-back or a cancel: {e}");
    }
    if violations.is_empty() {
        return Ok(());
    }
    let kept = keep_evidence(&cfg, &s, &chaos, &violations, &records);
    let shown = violations.len().min(40);
    bail!(
        "chaos seed {seed}: {n} invariant violations (replay with CHAOS_SEED={seed}); evidence in {kept}\n{list}\n{more}\n{summary}",
        seed = cfg.seed,
        n = violations.len(),
        kept = kept.display(),
        list = violations[..shown].join("\n"),
        more = if violations.len() > shown {
            format!("... and {} more", violations.len() - shown)
        } else {
            String::new()
        },
    )
}

/// Runs `submit(specs, i)` for every spec at its `send_at` from `t0`, each on its own tokio task
/// (one stuck request holds up no other); the results in spec order, `lost(i, why)` for one whose
/// task panicked.
fn paced<S, R, F, Fut>(
    specs: Arc<Vec<S>>,
    t0: Instant,
    send_at: fn(&S) -> Duration,
    submit: F,
    lost: fn(usize, tokio::task::JoinError) -> R,
) -> tokio::task::JoinHandle<Vec<R>>
where
    S: Send + Sync + 'static,
    R: Send + 'static,
    F: Fn(Arc<Vec<S>>, usize) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = R> + Send + 'static,
{
    tokio::spawn(async move {
        let mut handles = Vec::with_capacity(specs.len());
        for i in 0..specs.len() {
            tokio::time::sleep_until((t0 + send_at(&specs[i])).into()).await;
            handles.push(tokio::spawn(submit(specs.clone(), i)));
        }
        let mut out = Vec::with_capacity(handles.len());
        for (i, h) in handles.into_iter().enumerate() {
            out.push(h.await.unwrap_or_else(|e| lost(i, e)));
        }
        out
    })
}

/// Polls the statuses of `ids` until all are final; returns those that never were.
async fn wait_final(
    client: &redis::Client,
    ids: &[String],
    limit: Duration,
) -> Result<Vec<(String, String)>> {
    let deadline = Instant::now() + limit;
    let mut open: Vec<String> = ids.to_vec();
    loop {
        let statuses = async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            let mut pipe = redis::pipe();
            for id in &open {
                pipe.cmd("HGET")
                    .arg(format!("{PREFIX}task:{id}"))
                    .arg("status");
            }
            let v: Vec<Option<String>> = pipe.query_async(&mut conn).await?;
            anyhow::Ok(v)
        };
        if let Ok(Ok(statuses)) = tokio::time::timeout(Duration::from_secs(5), statuses).await {
            let left: Vec<(String, String)> = open
                .iter()
                .zip(statuses)
                .filter_map(|(id, st)| {
                    let st = st.unwrap_or_else(|| "<no record>".to_owned());
                    (!matches!(st.as_str(), "succeeded" | "failed" | "cancelled"))
                        .then(|| (id.clone(), st))
                })
                .collect();
            if left.is_empty() || Instant::now() > deadline {
                return Ok(left);
            }
            open = left.into_iter().map(|(id, _)| id).collect();
        } else if Instant::now() > deadline {
            bail!("redis did not answer while waiting for the tasks to finish");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until pending, delayed, active and every in-flight list are empty and the mock has no
/// call in progress. Returns the last snapshot, with the reason when that never happened.
async fn wait_quiet(
    client: &redis::Client,
    s: &Stack,
    limit: Duration,
) -> std::result::Result<Snapshot, (Snapshot, String)> {
    let deadline = Instant::now() + limit;
    loop {
        let snap = snapshot(client).await;
        if let Ok(snap) = snap {
            let open_calls = s.mock.journal_open();
            let quiet = snap.pending.is_empty()
                && snap.delayed.is_empty()
                && snap.throttled.is_empty()
                && snap.active.is_empty()
                && snap.inflight.is_empty()
                && snap.running.is_empty()
                && open_calls == 0;
            if quiet {
                return Ok(snap);
            }
            if Instant::now() > deadline {
                let why = format!(
                    "not quiet {limit:?} after every task was final: pending {:?}, delayed {:?}, throttled {:?}, active {:?}, inflight {:?}, running {:?}, LLM calls still open {open_calls}",
                    snap.pending, snap.delayed, snap.throttled, snap.active, snap.inflight, snap.running
                );
                return Err((snap, why));
            }
        } else if Instant::now() > deadline {
            return Err((
                Snapshot::default(),
                "redis unreachable at the end".to_owned(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

type Record = HashMap<String, String>;

async fn read_records(client: &redis::Client, ids: &[String]) -> Result<Vec<(String, Record)>> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.cmd("HGETALL").arg(format!("{PREFIX}task:{id}"));
    }
    let recs: Vec<Record> = pipe.query_async(&mut conn).await?;
    Ok(ids.iter().cloned().zip(recs).collect())
}

fn field<'a>(r: &'a Record, name: &str) -> &'a str {
    r.get(name).map_or("", String::as_str)
}

fn num(r: &Record, name: &str) -> u64 {
    r.get(name).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// `worker-3-0123abcd…` (a worker id) → `worker-3` (its process and log file name).
fn worker_name(worker_id: &str) -> &str {
    worker_id
        .rsplit_once('-')
        .map_or(worker_id, |(name, _)| name)
}

/// The workers' "task finished" lines: task id → (log file's worker name, verdict) per line.
struct WorkerLogs {
    finished: HashMap<String, Vec<(String, String)>>,
    verdicts: BTreeMap<String, u64>,
}

fn read_worker_logs(s: &Stack) -> Result<WorkerLogs> {
    let mut logs = WorkerLogs {
        finished: HashMap::new(),
        verdicts: BTreeMap::new(),
    };
    for entry in std::fs::read_dir(s.logs.path())? {
        let path = entry?.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".log"))
            .filter(|n| n.starts_with("worker-"))
            .map(str::to_owned)
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path)?;
        for line in text.lines() {
            // A SIGKILLed worker can leave half a line; it is not a report.
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if v["message"] != "task finished" {
                continue;
            }
            let (Some(id), Some(verdict)) = (v["task.id"].as_str(), v["verdict"].as_str()) else {
                continue;
            };
            *logs.verdicts.entry(verdict.to_owned()).or_default() += 1;
            logs.finished
                .entry(id.to_owned())
                .or_default()
                .push((name.clone(), verdict.to_owned()));
        }
    }
    Ok(logs)
}

#[derive(Debug, Default)]
struct TaskReport {
    violations: Vec<String>,
    by_status: BTreeMap<String, u64>,
    calls_by_outcome: BTreeMap<String, u64>,
    calls: u64,
    recovered: u64,
    fenced: u64,
    given_back: u64,
    /// Calls that began while an earlier call of the same task was in progress.
    overlapping: u64,
    /// Calls that must have been stale runs' (see [`stale_calls_needed`]).
    stale_needed: u64,
    /// Succeeded tasks whose one "ok" line is missing because its worker was SIGKILLed between
    /// the write and the log line.
    ok_lines_lost_to_sigkill: u64,
    /// 429 answers accounted to a give-back or a cancel rather than to `rate_limited` or
    /// `recovered` (how often the wider bound is needed).
    calls_429_given_back_or_cancelled: u64,
    /// The first tasks that needed it, with their evidence, for the summary.
    wider_429_examples: Vec<String>,
}

fn outcome_name(o: CallOutcome) -> String {
    match o {
        CallOutcome::Status(c) => c.to_string(),
        CallOutcome::Dropped => "dropped".to_owned(),
        CallOutcome::Hung => "hung".to_owned(),
        CallOutcome::Cancelled => "gone".to_owned(),
    }
}

/// The fewest calls of one task that take part in every overlap: a minimum vertex cover of the
/// graph whose edges are pairs of calls in progress at the same moment (for intervals: all calls
/// minus a largest set of pairwise disjoint ones, found greedily by end time). Only the owner of
/// a task calls, except a stale run taken from a lost worker, which may still be calling; each such
/// run makes one call, so at most `recovered` calls can be stale. Counting overlapping pairs
/// instead would count one long stale call twice when it outlasts two short owned runs in a row
/// (seed 16: a stale `[[hang]]` call overlapped a run given back at a drain deadline, then the
/// next run).
fn stale_calls_needed(calls: &[&CallRecord]) -> u64 {
    let mut by_end: Vec<&CallRecord> = calls.to_vec();
    by_end.sort_by_key(|c| c.end);
    let mut disjoint = 0u64;
    let mut free_from: Option<Instant> = None;
    for c in by_end {
        if free_from.is_none_or(|t| c.start >= t) {
            disjoint += 1;
            free_from = Some(c.end);
        }
    }
    calls.len() as u64 - disjoint
}

/// Calls of one task that began while an earlier call of it was still in progress.
fn overlapping(calls: &[&CallRecord]) -> u64 {
    let mut sorted: Vec<&CallRecord> = calls.to_vec();
    sorted.sort_by_key(|c| c.start);
    let mut n = 0;
    let mut busy_until: Option<Instant> = None;
    for c in sorted {
        if busy_until.is_some_and(|until| c.start < until) {
            n += 1;
        }
        busy_until = Some(busy_until.map_or(c.end, |u| u.max(c.end)));
    }
    n
}

/// Checks every acknowledged task against its record, the mock's calls and the worker logs.
/// One conversation at a time: the runs that decided the tasks of one agent (each record's last
/// `started_at` to its `finished_at`) never overlap, whatever was frozen, killed or cancelled.
fn lane_violations(
    specs: &[Spec],
    submissions: &[Submission],
    records: &[(String, Record)],
) -> Vec<String> {
    let agent_of: HashMap<&str, &str> = submissions
        .iter()
        .filter_map(|sub| {
            let agent = specs.get(sub.n)?.agent.as_deref()?;
            Some((sub.id.as_deref()?, agent))
        })
        .collect();
    let mut runs: BTreeMap<&str, Vec<(u64, u64, &str)>> = BTreeMap::new();
    for (id, r) in records {
        let Some(agent) = agent_of.get(id.as_str()) else {
            continue;
        };
        let (start, end) = (num(r, "started_at"), num(r, "finished_at"));
        if start > 0 && end > 0 {
            runs.entry(agent)
                .or_default()
                .push((start, end, id.as_str()));
        }
    }
    let mut out = Vec::new();
    for (agent, mut v) in runs {
        v.sort();
        for w in v.windows(2) {
            if w[1].0 < w[0].1 {
                out.push(format!(
                    "agent {agent}: task {} started at {} before task {} finished at {} (two of its tasks ran at once)",
                    w[1].2, w[1].0, w[0].2, w[0].1
                ));
            }
        }
    }
    out
}

fn check_tasks(
    specs: &[Spec],
    submissions: &[Submission],
    records: &[(String, Record)],
    journal: &[CallRecord],
    logs: &WorkerLogs,
    killed_at: &HashMap<String, i64>,
    t0: Instant,
) -> TaskReport {
    let mut rep = TaskReport::default();
    let mut calls_of: HashMap<&str, Vec<&CallRecord>> = HashMap::new();
    for c in journal {
        calls_of.entry(c.prompt.as_str()).or_default().push(c);
        *rep.calls_by_outcome
            .entry(outcome_name(c.outcome))
            .or_default() += 1;
        rep.calls += 1;
    }
    let record_of: HashMap<&str, &Record> =
        records.iter().map(|(id, r)| (id.as_str(), r)).collect();
    let mut acked_prompts: HashSet<&str> = HashSet::new();
    let rel = |t: Instant| {
        if t >= t0 {
            (t - t0).as_secs_f64()
        } else {
            -(t0 - t).as_secs_f64()
        }
    };
    for sub in submissions {
        let Some(id) = sub.id.as_deref() else {
            continue;
        };
        let spec = &specs[sub.n];
        acked_prompts.insert(spec.prompt.as_str());
        let empty = Record::new();
        let r = record_of.get(id).copied().unwrap_or(&empty);
        let calls: Vec<&CallRecord> = calls_of
            .get(spec.prompt.as_str())
            .cloned()
            .unwrap_or_default();
        let finished = logs.finished.get(id).cloned().unwrap_or_default();
        let status = field(r, "status");
        *rep.by_status.entry(status.to_owned()).or_default() += 1;
        let (runs, attempts, rate_limited) =
            (num(r, "runs"), num(r, "attempts"), num(r, "rate_limited"));
        let (given_back, recovered, fenced) =
            (num(r, "given_back"), num(r, "recovered"), num(r, "fenced"));
        rep.recovered += recovered;
        rep.fenced += fenced;
        rep.given_back += given_back;
        let calls_429 = calls
            .iter()
            .filter(|c| c.outcome == CallOutcome::Status(429))
            .count() as u64;
        let calls_other = calls.len() as u64 - calls_429;
        rep.overlapping += overlapping(&calls);
        let stale = stale_calls_needed(&calls);
        rep.stale_needed += stale;
        let cancelled = u64::from(status == "cancelled");

        let mut bad: Vec<String> = Vec::new();
        if !matches!(status, "succeeded" | "failed" | "cancelled") {
            bad.push(format!("not final: status {status:?}"));
        }
        match sub.cancel {
            CancelReply::Cancelled if status != "cancelled" => {
                bad.push("DELETE answered 200 but the task did not end cancelled".to_owned())
            }
            CancelReply::Conflict if status == "cancelled" => bad.push(
                "DELETE answered 409 (already final) but the task ended cancelled".to_owned(),
            ),
            _ => {}
        }
        // The result is written once: one accepted complete.lua ("ok") per succeeded task,
        // logged by the worker that owned the run; none for any other task.
        let oks: Vec<&String> = finished
            .iter()
            .filter(|(_, v)| v == "ok")
            .map(|(w, _)| w)
            .collect();
        let owner = worker_name(field(r, "worker"));
        if status == "succeeded" {
            let lost_to_kill = killed_at
                .get(owner)
                .is_some_and(|&k| num(r, "finished_at") as i64 <= k);
            match oks.as_slice() {
                [w] if w.as_str() == owner => {}
                [] if lost_to_kill => rep.ok_lines_lost_to_sigkill += 1,
                _ => bad.push(format!(
                    "succeeded, so exactly one \"ok\" report from its owner {owner} was expected; found {oks:?}"
                )),
            }
            let content = serde_json::from_str::<Value>(field(r, "result"))
                .ok()
                .and_then(|v| v["content"].as_str().map(str::to_owned));
            if content.as_deref() != Some(format!("echo: {}", spec.prompt).as_str()) {
                bad.push(format!("result is not the echo of the prompt: {content:?}"));
            }
        } else if !oks.is_empty() {
            bad.push(format!("status {status} but \"ok\" reports from {oks:?}"));
        }
        // LLM spend agrees with the record. Each run makes at most one call; a run's attempt is
        // uncounted only by an accepted 429 (rate_limited) or a drain give-back (given_back); a
        // recovered run stays counted and its late report is fenced.
        if calls.len() as u64 > runs {
            bad.push(format!("{} calls but only {runs} runs", calls.len()));
        }
        if calls_other > attempts + given_back {
            bad.push(format!(
                "{calls_other} non-429 calls > attempts {attempts} + given_back {given_back}"
            ));
        }
        if attempts > u64::from(spec.max_attempts) {
            bad.push(format!(
                "attempts {attempts} > max_attempts {}",
                spec.max_attempts
            ));
        }
        if rate_limited > calls_429 {
            bad.push(format!(
                "rate_limited {rate_limited} > {calls_429} calls answered 429"
            ));
        }
        // A 429 answer not accepted as rate_limited: its run was recovered (stale), given back at
        // a drain deadline before its report landed, or its task was cancelled under it.
        rep.calls_429_given_back_or_cancelled += calls_429.saturating_sub(rate_limited + recovered);
        if calls_429 > rate_limited + recovered + given_back + cancelled {
            bad.push(format!(
                "{calls_429} calls answered 429 > rate_limited {rate_limited} + recovered {recovered} + given_back {given_back} + cancelled {cancelled}"
            ));
        }
        if rate_limited > MAX_RATE_LIMITED {
            bad.push(format!(
                "rate_limited {rate_limited} > AGENTQ_MAX_RATE_LIMITED {MAX_RATE_LIMITED}"
            ));
        }
        // Two calls of one task at once only when a run was taken from a lost worker: every
        // overlap involves a stale run's call, and there are at most `recovered` of those.
        if stale > recovered {
            bad.push(format!(
                "overlapping calls that only {stale} stale runs can explain, but recovered {recovered}"
            ));
        }
        let wider_429 = calls_429 > rate_limited + recovered;
        let show_wider = wider_429 && rep.wider_429_examples.len() < 5;
        if !bad.is_empty() || show_wider {
            let timeline: Vec<String> = {
                let mut cs = calls.clone();
                cs.sort_by_key(|c| c.start);
                cs.iter()
                    .map(|c| {
                        format!(
                            "#{} {:.3}..{:.3} {}",
                            c.call,
                            rel(c.start),
                            rel(c.end),
                            outcome_name(c.outcome)
                        )
                    })
                    .collect()
            };
            let mut fields: Vec<String> = [
                "status",
                "runs",
                "attempts",
                "max_attempts",
                "rate_limited",
                "given_back",
                "recovered",
                "fenced",
                "worker",
                "started_at",
                "finished_at",
                "error",
            ]
            .iter()
            .filter_map(|f| r.get(*f).map(|v| format!("{f}={v}")))
            .collect();
            fields.push(format!("cancel={:?}", sub.cancel));
            let what = if bad.is_empty() {
                format!(
                    "{calls_429} calls answered 429 > rate_limited {rate_limited} + recovered {recovered}"
                )
            } else {
                bad.join("; ")
            };
            let evidence = format!(
                "task {} {id} ({:?}): {what}\n    record: {}\n    calls (s since start): [{}]\n    reports: {:?}",
                sub.n,
                spec.prompt,
                fields.join(" "),
                timeline.join(", "),
                finished
            );
            if bad.is_empty() {
                rep.wider_429_examples.push(evidence);
            } else {
                rep.violations.push(evidence);
            }
        }
    }
    let mut strays: Vec<&str> = calls_of
        .keys()
        .filter(|p| !acked_prompts.contains(**p) && !wf::is_node_prompt(p))
        .copied()
        .collect();
    strays.sort();
    if !strays.is_empty() {
        rep.violations.push(format!(
            "the LLM was called for prompts of tasks never acknowledged: {strays:?}"
        ));
    }
    rep
}

#[allow(clippy::too_many_arguments)]
fn summarize(
    cfg: &Config,
    submissions: &[Submission],
    records: &[(String, Record)],
    logs: &WorkerLogs,
    chaos: &Chaos,
    watched: &SnapshotLog,
    rep: &TaskReport,
    settle: Duration,
) -> String {
    let posts: u32 = submissions.iter().map(|s| s.posts).sum();
    let cancels = submissions
        .iter()
        .filter(|s| s.cancel == CancelReply::Cancelled)
        .count();
    let f = &chaos.faults;
    // the tenant each record carries (none: the default tenant)
    let mut tenants: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, r) in records {
        let t = field(r, "tenant");
        *tenants
            .entry(if t.is_empty() { "default" } else { t })
            .or_default() += 1;
    }
    format!(
        "chaos summary (seed {seed}, {secs} s): {acked} of {tasks} tasks acknowledged ({posts} POSTs), final {status:?}, {cancels} cancelled over HTTP; tasks per tenant {tenants:?}\n\
         LLM calls: {calls} by outcome {outcomes:?}; calls overlapping an earlier one {overlapping}, explained by at least {stale} stale calls\n\
         faults: {stops} worker SIGSTOPs ({past} past the heartbeat TTL), {kills} worker SIGKILLs, {terms} worker SIGTERMs, {freezes} Redis SIGSTOPs, {rkills} Redis SIGKILLs + restarts, {skipped} skipped\n\
         runs recovered {recovered}, reports fenced {fenced}, runs given back {given_back}; report verdicts {verdicts:?}; ok lines lost to SIGKILL {lost}; 429 answers accounted to a give-back or cancel {given_429}\n\
         snapshots checked {taken} ({missed} missed while Redis was away); settled {settle:.1} s after the faults ended; {records} records read",
        seed = cfg.seed,
        secs = cfg.secs,
        acked = submissions.iter().filter(|s| s.id.is_some()).count(),
        tasks = cfg.tasks,
        status = rep.by_status,
        calls = rep.calls,
        outcomes = rep.calls_by_outcome,
        overlapping = rep.overlapping,
        stale = rep.stale_needed,
        stops = f.worker_stops,
        past = f.worker_stops_past_ttl,
        kills = f.worker_kills,
        terms = f.worker_terms,
        freezes = f.redis_freezes,
        rkills = f.redis_kills,
        skipped = f.skipped,
        recovered = rep.recovered,
        fenced = rep.fenced,
        given_back = rep.given_back,
        verdicts = logs.verdicts,
        lost = rep.ok_lines_lost_to_sigkill,
        given_429 = rep.calls_429_given_back_or_cancelled,
        taken = watched.taken,
        missed = watched.missed,
        settle = settle.as_secs_f64(),
        records = records.len(),
    )
}

/// Copies the logs, the fault timeline, the violations and the records out of the temporary
/// directories (removed when the test ends), for the failure report.
fn keep_evidence(
    cfg: &Config,
    s: &Stack,
    chaos: &Chaos,
    violations: &[String],
    records: &[(String, Record)],
) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("agentq-chaos-{}-{}", cfg.seed, std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    if let Ok(entries) = std::fs::read_dir(s.logs.path()) {
        for e in entries.flatten() {
            let _ = std::fs::copy(e.path(), dir.join(e.file_name()));
        }
    }
    let _ = std::fs::write(dir.join("events.txt"), chaos.events.join("\n"));
    let _ = std::fs::write(dir.join("violations.txt"), violations.join("\n"));
    let recs: BTreeMap<&str, &Record> = records.iter().map(|(id, r)| (id.as_str(), r)).collect();
    let _ = std::fs::write(
        dir.join("records.json"),
        serde_json::to_string_pretty(&recs).unwrap_or_default(),
    );
    dir
}

/// The checkers themselves, on made-up data: each invariant must fire when broken.
mod checks {
    use super::*;

    fn snap() -> Snapshot {
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        let p = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                .collect::<Vec<_>>()
        };
        Snapshot {
            pending: s(&["a", "b"]),
            delayed: s(&["c"]),
            throttled: s(&["g"]),
            dead: s(&["d"]),
            active: s(&["e"]),
            inflight: p(&[("w1", "e"), ("w2", "f")]),
            running: p(&[("e", "w1")]),
            task_records: 7,
            fair: Vec::new(),
        }
    }

    #[test]
    fn a_consistent_snapshot_passes() {
        assert_eq!(structural_violations(&snap()), Vec::<String>::new());
    }

    #[test]
    fn every_structural_invariant_fires() {
        type Breakage = fn(&mut Snapshot);
        let cases: [(&str, Breakage); 8] = [
            ("a fair-scheduling invariant", |s| {
                s.fair.push("tenant a is in the ring twice".into())
            }),
            ("pending twice", |s| s.pending.push("a".into())),
            ("pending and in flight", |s| {
                s.inflight.push(("w2".into(), "b".into()))
            }),
            ("delayed and dead", |s| s.dead.push("c".into())),
            ("throttled and pending", |s| s.pending.push("g".into())),
            ("active but not running", |s| s.active.push("b".into())),
            ("running but not active", |s| {
                s.running.push(("f".into(), "w2".into()))
            }),
            ("running but in another worker's list", |s| {
                s.running[0].1 = "w2".into()
            }),
        ];
        for (what, break_it) in cases {
            let mut s = snap();
            break_it(&mut s);
            assert!(!structural_violations(&s).is_empty(), "{what} not caught");
        }
    }

    fn call(
        prompt: &str,
        n: u64,
        t0: Instant,
        from_ms: u64,
        to_ms: u64,
        o: CallOutcome,
    ) -> CallRecord {
        CallRecord {
            prompt: prompt.to_owned(),
            call: n,
            start: t0 + Duration::from_millis(from_ms),
            end: t0 + Duration::from_millis(to_ms),
            outcome: o,
        }
    }

    #[test]
    fn overlapping_runs_of_one_agent_are_a_violation() {
        let spec = |n: usize, agent: &str| Spec {
            n,
            prompt: format!("t{n}"),
            max_attempts: 1,
            send_at: Duration::ZERO,
            cancel_after: None,
            agent: Some(agent.to_owned()),
            tenant: 0,
        };
        let specs = vec![spec(0, "a"), spec(1, "a"), spec(2, "b")];
        let subs: Vec<Submission> = (0..3)
            .map(|n| Submission {
                n,
                id: Some(format!("default.t{n}")),
                ..Submission::default()
            })
            .collect();
        let rec = |start: &str, end: &str| -> Record {
            [("started_at", start), ("finished_at", end)]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        };
        let in_turn = vec![
            ("default.t0".to_owned(), rec("10", "20")),
            ("default.t1".to_owned(), rec("20", "30")),
            ("default.t2".to_owned(), rec("12", "18")),
        ];
        assert!(lane_violations(&specs, &subs, &in_turn).is_empty());
        let at_once = vec![
            ("default.t0".to_owned(), rec("10", "20")),
            ("default.t1".to_owned(), rec("19", "30")),
        ];
        assert_eq!(lane_violations(&specs, &subs, &at_once).len(), 1);
    }

    #[test]
    fn overlaps_count_calls_that_start_while_another_runs() {
        let t0 = Instant::now();
        let ok = CallOutcome::Status(200);
        let a = call("p", 1, t0, 0, 100, ok);
        let b = call("p", 2, t0, 100, 200, ok);
        let c = call("p", 3, t0, 50, 60, ok);
        let long = call("p", 4, t0, 0, 1000, CallOutcome::Hung);
        let d = call("p", 5, t0, 150, 300, ok);
        assert_eq!(overlapping(&[&a, &b]), 0, "back to back");
        assert_eq!(stale_calls_needed(&[&a, &b]), 0, "back to back");
        assert_eq!(overlapping(&[&b, &a, &c]), 1);
        assert_eq!(stale_calls_needed(&[&b, &a, &c]), 1);
        // one long stale call across two owned runs in a row: two overlaps, one stale call
        assert_eq!(overlapping(&[&long, &b, &c]), 2);
        assert_eq!(stale_calls_needed(&[&long, &b, &c]), 1);
        // three at once (a, c, long) need two stale calls; b and d overlap each other too
        assert_eq!(stale_calls_needed(&[&long, &a, &c]), 2);
        assert_eq!(stale_calls_needed(&[&a, &b, &d]), 1);
        assert_eq!(stale_calls_needed(&[&long, &a, &b, &c, &d]), 3);
    }

    /// One succeeded task with `calls` and `record`, checked; returns the violations.
    fn verdict(
        calls: Vec<CallRecord>,
        record: &[(&str, &str)],
        reports: &[(&str, &str)],
    ) -> Vec<String> {
        let prompt = "chaos 0 task 0:".to_owned();
        let specs = vec![Spec {
            n: 0,
            prompt: prompt.clone(),
            max_attempts: 3,
            send_at: Duration::ZERO,
            cancel_after: None,
            agent: None,
            tenant: 0,
        }];
        let subs = vec![Submission {
            n: 0,
            id: Some("default.x".into()),
            ..Submission::default()
        }];
        let mut r: Record = [
            ("status", "succeeded"),
            ("worker", "worker-1-abc"),
            ("finished_at", "5"),
            ("result", r#"{"content":"echo: chaos 0 task 0:"}"#),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        for (k, v) in record {
            r.insert((*k).to_owned(), (*v).to_owned());
        }
        let records = vec![("default.x".to_owned(), r)];
        let calls: Vec<CallRecord> = calls
            .into_iter()
            .map(|mut c| {
                c.prompt = prompt.clone();
                c
            })
            .collect();
        let logs = WorkerLogs {
            finished: HashMap::from([(
                "default.x".to_owned(),
                reports
                    .iter()
                    .map(|(w, v)| ((*w).to_owned(), (*v).to_owned()))
                    .collect(),
            )]),
            verdicts: BTreeMap::new(),
        };
        let t0 = Instant::now();
        check_tasks(&specs, &subs, &records, &calls, &logs, &HashMap::new(), t0).violations
    }

    #[test]
    fn per_task_checks_pass_a_clean_history_and_fire_on_each_breach() {
        let t0 = Instant::now();
        let ok = CallOutcome::Status(200);
        let limited = CallOutcome::Status(429);
        let base = [("runs", "2"), ("attempts", "1"), ("rate_limited", "1")];
        let clean = vec![call("", 1, t0, 0, 10, limited), call("", 2, t0, 20, 30, ok)];
        assert_eq!(
            verdict(clean.clone(), &base, &[("worker-1", "ok")]),
            Vec::<String>::new()
        );

        type Pairs = Vec<(&'static str, &'static str)>;
        let breaches: Vec<(&str, Vec<CallRecord>, Pairs, Pairs)> = vec![
            ("no ok line", clean.clone(), base.to_vec(), vec![]),
            (
                "two ok lines",
                clean.clone(),
                base.to_vec(),
                vec![("worker-1", "ok"), ("worker-2", "ok")],
            ),
            (
                "ok line from another worker",
                clean.clone(),
                base.to_vec(),
                vec![("worker-2", "ok")],
            ),
            (
                "more calls than runs",
                clean.clone(),
                vec![("runs", "1"), ("attempts", "1"), ("rate_limited", "1")],
                vec![("worker-1", "ok")],
            ),
            (
                "uncounted call",
                vec![call("", 1, t0, 0, 10, ok), call("", 2, t0, 20, 30, ok)],
                base.to_vec(),
                vec![("worker-1", "ok")],
            ),
            (
                "429 not accounted",
                vec![
                    call("", 1, t0, 0, 10, limited),
                    call("", 2, t0, 10, 15, limited),
                    call("", 3, t0, 20, 30, ok),
                ],
                vec![("runs", "3"), ("attempts", "1"), ("rate_limited", "1")],
                vec![("worker-1", "ok")],
            ),
            (
                "rate_limited without a 429",
                vec![call("", 1, t0, 20, 30, ok)],
                base.to_vec(),
                vec![("worker-1", "ok")],
            ),
            (
                "overlap without recovery",
                vec![call("", 1, t0, 0, 50, limited), call("", 2, t0, 20, 30, ok)],
                base.to_vec(),
                vec![("worker-1", "ok")],
            ),
            (
                "attempts over max",
                clean.clone(),
                vec![("runs", "2"), ("attempts", "4"), ("rate_limited", "1")],
                vec![("worker-1", "ok")],
            ),
        ];
        for (what, calls, record, reports) in breaches {
            assert!(
                !verdict(calls, &record, &reports).is_empty(),
                "{what} not caught"
            );
        }
        // an overlap is allowed once a run was recovered from a lost worker
        let recovered = [("runs", "2"), ("attempts", "2"), ("recovered", "1")];
        let overlap = vec![
            call("", 1, t0, 0, 50, CallOutcome::Hung),
            call("", 2, t0, 20, 30, ok),
        ];
        assert_eq!(
            verdict(overlap, &recovered, &[("worker-1", "ok")]),
            Vec::<String>::new()
        );
        // seed 16's shape: one stale [[hang]] call outlasting a run given back at a drain deadline
        // and the next run is one stale call, explained by one recovery
        let hang_then_two = || {
            vec![
                call("", 1, t0, 0, 8000, CallOutcome::Hung),
                call("", 2, t0, 6000, 7000, CallOutcome::Cancelled),
                call("", 3, t0, 7001, 8200, ok),
            ]
        };
        let one_recovery = [
            ("runs", "3"),
            ("attempts", "2"),
            ("given_back", "1"),
            ("recovered", "1"),
        ];
        assert_eq!(
            verdict(hang_then_two(), &one_recovery, &[("worker-1", "ok")]),
            Vec::<String>::new()
        );
        // but three calls at once need two stale runs
        let mut three = hang_then_two();
        three[2].start = t0 + Duration::from_millis(6500);
        assert!(!verdict(three, &one_recovery, &[("worker-1", "ok")]).is_empty());
    }
}
