//! The fleet-wide limiter: every worker reserves a call in Redis before making it, so the limits
//! of an upstream hold however many workers run. One atomic script per step, beside this file:
//! `reserve.lua` (admit, or say when), `reconcile.lua` (settle to the usage reported, refund
//! what a failed call did not use, end the concurrency lease) and `learn.lua` (a 429's block,
//! and limits the upstream's headers report). Calls on one route that ask together share a
//! script call (group commit); a route called many times a moment takes grants instead, a share
//! of its limits admitted from locally and settled in one step (`Grant`). See
//! docs/architecture.md, "Flow control".

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redis::{RedisResult, Script};
use serde::Serialize;
use tokio::sync::oneshot;

use super::upstreams::{Limits, Route, Upstream, Upstreams};
use crate::keys;
use crate::redis_conn::Redis;
use crate::script::declared;

static RESERVE: LazyLock<Script> = LazyLock::new(|| declared(include_str!("reserve.lua")));
static RECONCILE: LazyLock<Script> = LazyLock::new(|| declared(include_str!("reconcile.lua")));
static LEARN: LazyLock<Script> = LazyLock::new(|| declared(include_str!("learn.lua")));

/// State kept for models of the implicit upstream (any model name a task gives) expires when
/// unused, so names clients make up cannot pile up keys; configured scopes keep theirs.
const IMPLICIT_STATE_TTL: Duration = Duration::from_secs(3600);

/// Why a call was not admitted now (the `reason` label of `agentq_limiter_throttled_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Rpm,
    Tpm,
    Concurrency,
    Blocked,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rpm => "rpm",
            Self::Tpm => "tpm",
            Self::Concurrency => "concurrency",
            Self::Blocked => "blocked",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "rpm" => Self::Rpm,
            "tpm" => Self::Tpm,
            "concurrency" => Self::Concurrency,
            _ => Self::Blocked,
        }
    }
}

/// How a reservation stands in a scope's line of parked tasks (`reserve.lua`'s ARGV[4]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line {
    /// Only asking (a model with fallbacks after it): refused, the task tries the next model and
    /// takes no turn; a line of parked tasks counts as a refusal.
    Probe,
    /// A new arrival that will park if refused: behind a line of parked tasks it takes the next
    /// turn even when there is room now, so parked tasks are not overtaken.
    Join,
    /// A parked task back at its turn: served ahead of the line; refused (the room its turn
    /// counted on is not there yet, or a block), it lines up again.
    Turn,
}

impl Line {
    fn arg(self) -> u8 {
        match self {
            Self::Probe => 0,
            Self::Join => 1,
            Self::Turn => 2,
        }
    }
}

/// An admitted call's hold on the limits, to settle with [`Limiter::reconcile`].
#[derive(Debug, Clone)]
pub struct Reservation {
    keys: Arc<RouteKeys>,
    sec: i64,
    pub tokens: u64,
    lease: String,
    /// False when no scope counted the call or leased a slot (no limits apply yet): nothing to
    /// settle, so the call costs the limiter one round trip instead of two.
    held: bool,
    /// The worker's grant the call was admitted from, if it was: it settles with the grant.
    grant: Option<Arc<Mutex<Grant>>>,
}

#[derive(Debug, Clone)]
pub enum Admission {
    Admitted(Reservation),
    /// Not now: come back at `eligible_at_ms` (Redis clock, ms since the epoch).
    Wait {
        eligible_at_ms: i64,
        reason: Refusal,
        limit: u64,
    },
    /// The call alone needs more tokens than the scope's whole minute allows.
    TooLarge {
        tpm: u64,
    },
}

/// A call's tokens estimated two ways, for [`Limiter::reserve_estimated`]. `quick`: cheap, and
/// not far below the real count (a call admitted from a grant reserves it: far from every limit
/// the estimate only sizes a reservation that is settled to the usage reported). `exact`: the
/// count Redis decides the call by, near a limit; computed only when Redis decides the call.
pub struct Estimate<F: FnOnce() -> u64> {
    pub quick: u64,
    pub exact: F,
}

/// How a call ended, for [`Limiter::reconcile`].
#[derive(Debug, Clone, Copy)]
pub struct Settlement {
    /// Tokens the upstream reported (prompt + completion); `None`: it reported none, so the
    /// reservation stands if the call reached it, or is refunded if not.
    pub used_tokens: Option<u64>,
    /// True when the request never counted upstream (a 429, a refused connection): the request
    /// and its tokens are handed back.
    pub not_served: bool,
    pub latency: Duration,
}

/// The keys of one route's scopes: the model scope hash and its leases, then the upstream
/// scope's when the upstream has limits of its own. Built once per route and shared.
#[derive(Debug)]
struct RouteKeys(Vec<String>, u64);

impl RouteKeys {
    fn new(keys: Vec<String>) -> Self {
        use std::hash::{Hash, Hasher};
        // hashed once here (the lanes look a route up twice per call), with fixed keys so equal
        // routes always hash equal
        let mut h = std::hash::DefaultHasher::new();
        keys.hash(&mut h);
        let id = h.finish();
        Self(keys, id)
    }
}

/// Most calls one script call reserves or settles: bounds how long one script holds Redis.
const MAX_BATCH: usize = 64;
/// How long a grant lasts at most, and the span over which a route's pace is measured to size
/// the next one: a block or a lower limit learned by another worker reaches a grant holder
/// within this, and a grant is about what the worker's calls on the route use in it.
const GRANT_SPAN: Duration = Duration::from_millis(100);
/// Calls a route must see in a span before its worker asks for grants: below this the calls
/// are few enough to reserve one by one, each decided by Redis.
const MIN_GRANT: u64 = 16;
/// Most calls one grant admits.
const MAX_GRANT: u64 = 1024;
/// Least concurrency slots a grant asks for.
const MIN_GRANT_SLOTS: u64 = 16;
/// Routes whose keys a limiter remembers; past it the cache starts over (the implicit upstream
/// serves any model name a client gives, so the names must not pile up).
const MAX_CACHED_ROUTES: usize = 1024;

#[derive(Clone)]
pub struct Limiter {
    redis: Redis,
    prefix: Arc<str>,
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Whether hot routes take grants (`AGENTQ_LIMITER_GRANTS`).
    grants_on: bool,
    /// Names this process's grants (their slots are leases named after them).
    id: String,
    grants: AtomicU64,
    routes: Mutex<HashMap<String, HashMap<String, Arc<RouteKeys>>>>,
    reserves: Mutex<HashMap<LaneKey, Lane>>,
    settles: Mutex<Lanes<SettleCall>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Calls on one route in one span: how many, their tokens, and the most that were in flight
/// from a grant at once.
#[derive(Debug, Default, Clone, Copy)]
struct Span {
    calls: u64,
    tokens: u64,
    peak: u64,
}

/// A route's reservations in this worker: the calls waiting for its script (group commit), the
/// grant in force, and the pace that sizes the next grant.
struct Lane {
    calls: Vec<ReserveCall>,
    flushing: bool,
    grant: Option<Arc<Mutex<Grant>>>,
    span_start: Instant,
    this: Span,
    last: Span,
    /// A call found the grant's slots all in use: the next grant asks for a slot per request.
    starved: bool,
    lease_ms: u64,
}

impl Lane {
    fn new(now: Instant) -> Self {
        Self {
            calls: Vec::new(),
            flushing: false,
            grant: None,
            span_start: now,
            this: Span::default(),
            last: Span::default(),
            starved: false,
            lease_ms: 0,
        }
    }

    fn tick(&mut self, now: Instant, tokens: u64) {
        let age = now.saturating_duration_since(self.span_start);
        if age >= GRANT_SPAN {
            self.last = if age < 2 * GRANT_SPAN {
                self.this
            } else {
                Span::default()
            };
            self.this = Span::default();
            self.span_start = now;
        }
        self.this.calls += 1;
        self.this.tokens += tokens;
    }

    /// What to ask for: about a span of this route's calls, or nothing when it is not hot.
    fn grant_request(&self) -> Option<GrantAsk> {
        let span = if self.this.calls > self.last.calls {
            self.this
        } else {
            self.last
        };
        if span.calls < MIN_GRANT {
            return None;
        }
        let n = (span.calls + span.calls / 4).min(MAX_GRANT);
        let per_call = span.tokens.div_ceil(span.calls).max(1);
        let tokens = per_call.saturating_mul(n + n / 4);
        let peak = self.this.peak.max(self.last.peak);
        let slots = if self.starved {
            n
        } else {
            (2 * peak).max(MIN_GRANT_SLOTS).min(n)
        };
        Some((n, tokens, slots))
    }
}

/// A grant to ask for: requests, tokens, concurrency slots.
type GrantAsk = (u64, u64, u64);

/// A share of the fleet's limits taken by this worker in one script call (see `reserve.lua`):
/// its calls are admitted from it locally, and it is settled in one item when it is over and
/// its last call has settled.
#[derive(Debug)]
pub(crate) struct Grant {
    id: String,
    sec: i64,
    deadline: Instant,
    requests: u64,
    tokens: u64,
    slots: u64,
    /// Whether a scope counted it or leased its slots: only then is there anything to settle.
    counted: bool,
    left_requests: u64,
    left_tokens: u64,
    in_flight: u64,
    served: u64,
    used: u64,
    latency_ms: u64,
    latencies: u64,
    closed: bool,
    settled: bool,
}

impl Grant {
    /// Closes the grant; the settlement to send when nothing of it is in flight any more.
    fn close(&mut self) -> Option<SettleCallArgs> {
        self.closed = true;
        self.take_settlement()
    }

    fn take_settlement(&mut self) -> Option<SettleCallArgs> {
        if !self.closed || self.in_flight > 0 || self.settled || !self.counted {
            return None;
        }
        self.settled = true;
        Some(SettleCallArgs {
            sec: self.sec,
            reserved: self.tokens,
            used: self.used,
            lease: self.id.clone(),
            latency_ms: self.latency_ms.checked_div(self.latencies).unwrap_or(0),
            handback: self.requests.saturating_sub(self.served),
            served: self.served,
            slots: self.slots,
        })
    }
}

/// Calls share a script only when its keys and its per-route arguments (limits, state TTL) are
/// the same.
type LaneKey = (Arc<RouteKeys>, Vec<u64>);

impl PartialEq for RouteKeys {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other) || self.0 == other.0
    }
}
impl Eq for RouteKeys {}
impl std::hash::Hash for RouteKeys {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.1);
    }
}

/// Calls waiting for the script of each route; a route has an entry while its flusher runs.
/// Group commit: the first call on an idle route is sent at once; calls that arrive while a
/// script is in flight go together in the next one. Under load (a fetched batch of tasks all
/// reserving at once, calls finishing together) one script serves many calls; alone, a call
/// waits for nobody.
type Lanes<T> = HashMap<LaneKey, Vec<T>>;

struct ReserveCall {
    tokens: u64,
    lease: String,
    lease_ms: u64,
    line: Line,
    reply: oneshot::Sender<RedisResult<Admission>>,
}

/// One item of `reconcile.lua`: a call, or a whole grant.
#[derive(Debug)]
struct SettleCallArgs {
    sec: i64,
    reserved: u64,
    used: u64,
    lease: String,
    latency_ms: u64,
    /// Requests handed back: a call that never reached the upstream, a grant's unused ones.
    handback: u64,
    /// Calls served (their used tokens and latency move the route's averages).
    served: u64,
    /// A grant's slots (`<lease>:1..slots`); 0 for a call's one lease.
    slots: u64,
}

struct SettleCall {
    args: SettleCallArgs,
    reply: oneshot::Sender<RedisResult<()>>,
}

fn scope_args(l: &Limits) -> [u64; 3] {
    [
        l.rpm.unwrap_or(0),
        l.tpm.unwrap_or(0),
        l.concurrency.unwrap_or(0),
    ]
}

fn lost_flusher() -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Io,
        "flow limiter: the batch was dropped before its reply",
    ))
}

/// Adds `call` to the route's lane; true when the caller must start the lane's flusher.
fn enqueue<T>(lanes: &Mutex<Lanes<T>>, key: &LaneKey, call: T) -> bool {
    let mut lanes = lock(lanes);
    match lanes.get_mut(key) {
        Some(calls) => {
            calls.push(call);
            false
        }
        None => {
            lanes.insert(key.clone(), vec![call]);
            true
        }
    }
}

/// The next batch of a lane, or `None` (and the lane removed) when no call is waiting: the
/// flusher's exit is decided under the same lock that `enqueue` takes, so no call is left behind.
fn next_batch<T>(lanes: &Mutex<Lanes<T>>, key: &LaneKey) -> Option<Vec<T>> {
    let mut lanes = lock(lanes);
    let calls = lanes.get_mut(key)?;
    if calls.is_empty() {
        lanes.remove(key);
        return None;
    }
    let take = calls.len().min(MAX_BATCH);
    Some(calls.drain(..take).collect())
}

impl Limiter {
    pub fn new(redis: Redis, prefix: &str) -> Self {
        Self {
            redis,
            prefix: prefix.into(),
            inner: Arc::new(Inner {
                grants_on: true,
                id: uuid::Uuid::new_v4().simple().to_string(),
                ..Inner::default()
            }),
        }
    }

    /// Whether routes called many times a moment take grants (on by default): off, every call
    /// is decided by its own reservation in Redis. Set before the limiter is first used.
    pub fn with_grants(self, on: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                grants_on: on,
                id: self.inner.id.clone(),
                ..Inner::default()
            }),
            ..self
        }
    }

    fn state_ttl(&self, route: &Route<'_>, implicit: bool) -> u64 {
        if implicit && route.model_limits.is_empty() {
            IMPLICIT_STATE_TTL.as_millis() as u64
        } else {
            0
        }
    }

    /// The keys a call on `route` touches: the model scope always (blocks and learned limits
    /// live there), the upstream scope when the upstream has limits of its own.
    fn keys(&self, route: &Route<'_>) -> Arc<RouteKeys> {
        let mut routes = lock(&self.inner.routes);
        if let Some(k) = routes
            .get(route.upstream.name.as_str())
            .and_then(|m| m.get(route.model))
        {
            return k.clone();
        }
        let model = keys::limiter_model(&self.prefix, &route.upstream.name, route.model);
        let mut k = vec![model.clone(), keys::limiter_leases(&model)];
        if !route.upstream.limits.is_empty() {
            let up = keys::limiter_upstream(&self.prefix, &route.upstream.name);
            k.push(up.clone());
            k.push(keys::limiter_leases(&up));
        }
        let k = Arc::new(RouteKeys::new(k));
        if routes.values().map(HashMap::len).sum::<usize>() >= MAX_CACHED_ROUTES {
            routes.clear();
        }
        routes
            .entry(route.upstream.name.clone())
            .or_default()
            .insert(route.model.to_owned(), k.clone());
        k
    }

    /// The lane of `route`: its keys and the per-route arguments of its scripts.
    fn lane_key(&self, route: &Route<'_>, implicit: bool) -> LaneKey {
        let mut head = Vec::with_capacity(7);
        head.push(self.state_ttl(route, implicit));
        head.extend(scope_args(&route.model_limits));
        head.extend(scope_args(&route.upstream.limits));
        (self.keys(route), head)
    }

    /// Ends the grant in force on `route`, if any: no call is admitted from it any more.
    fn end_grant(&self, key: &LaneKey) {
        let grant = lock(&self.inner.reserves)
            .get_mut(key)
            .and_then(|l| l.grant.take());
        if let Some(args) = grant.and_then(|g| lock(&g).close()) {
            let (this, keys) = (self.clone(), key.0.clone());
            tokio::spawn(async move { this.settle_grant(keys, args).await });
        }
    }

    /// Reserves one call of `tokens` (estimated prompt + output cap) on `route`. `lease_id`
    /// names the concurrency lease (unique per call); `lease` is how long it may be held at most
    /// (a crashed worker's lease ends by itself). `line`: where the call stands in the line of
    /// tasks parked on the route. Calls on one route that ask together share one script call,
    /// decided in the order they asked.
    pub async fn reserve(
        &self,
        route: &Route<'_>,
        implicit: bool,
        tokens: u64,
        lease_id: &str,
        lease: Duration,
        line: Line,
    ) -> RedisResult<Admission> {
        let estimate = Estimate {
            quick: tokens,
            exact: || tokens,
        };
        self.reserve_estimated(route, implicit, estimate, lease_id, lease, line)
            .await
    }

    /// [`Limiter::reserve`] with two estimates of the call's tokens: `quick` when the call is
    /// admitted from a grant, `exact` computed only when Redis decides the call.
    pub async fn reserve_estimated(
        &self,
        route: &Route<'_>,
        implicit: bool,
        estimate: Estimate<impl FnOnce() -> u64>,
        lease_id: &str,
        lease: Duration,
        line: Line,
    ) -> RedisResult<Admission> {
        let quick = estimate.quick.max(1);
        let lease_ms = lease.as_millis() as u64;
        let key = self.lane_key(route, implicit);
        let now = Instant::now();
        let to_settle = {
            let mut lanes = lock(&self.inner.reserves);
            if !lanes.contains_key(&key) {
                if lanes.len() >= MAX_CACHED_ROUTES {
                    // routes gone quiet; a lane that is busy or holds a grant stays
                    lanes.retain(|_, l| l.flushing || !l.calls.is_empty() || l.grant.is_some());
                }
                lanes.insert(key.clone(), Lane::new(now));
            }
            let Some(lane) = lanes.get_mut(&key) else {
                return Err(lost_flusher());
            };
            lane.tick(now, quick);
            lane.lease_ms = lease_ms;
            let mut to_settle = None;
            // A parked task's turn is decided by Redis: it moves the line.
            if let (Some(g), false) = (lane.grant.clone(), line == Line::Turn) {
                let mut gr = lock(&g);
                let open = !gr.closed && now < gr.deadline && gr.left_requests > 0;
                if open && gr.left_tokens >= quick && (gr.slots == 0 || gr.in_flight < gr.slots) {
                    gr.left_requests -= 1;
                    gr.left_tokens -= quick;
                    gr.in_flight += 1;
                    lane.this.peak = lane.this.peak.max(gr.in_flight);
                    return Ok(Admission::Admitted(Reservation {
                        keys: key.0.clone(),
                        sec: gr.sec,
                        tokens: quick,
                        lease: String::new(),
                        held: gr.counted,
                        grant: Some(g.clone()),
                    }));
                }
                if open {
                    // spent its slots or tokens before its requests: this call asks Redis, and
                    // the next grant comes with a slot per request
                    lane.starved |= gr.slots > 0 && gr.in_flight >= gr.slots;
                } else {
                    to_settle = gr.close();
                    lane.grant = None;
                }
            }
            to_settle
        };
        // Redis decides this call: now the exact count is worth its cost (outside the lock)
        let tokens = (estimate.exact)().max(1);
        let (tx, rx) = oneshot::channel();
        let spawn = {
            let mut lanes = lock(&self.inner.reserves);
            let lane = lanes.entry(key.clone()).or_insert_with(|| Lane::new(now));
            lane.calls.push(ReserveCall {
                tokens,
                lease: lease_id.to_owned(),
                lease_ms,
                line,
                reply: tx,
            });
            let spawn = !lane.flushing;
            lane.flushing = true;
            spawn
        };
        if let Some(args) = to_settle {
            let (this, keys) = (self.clone(), key.0.clone());
            tokio::spawn(async move { this.settle_grant(keys, args).await });
        }
        if spawn {
            let this = self.clone();
            tokio::spawn(async move { this.flush_reserves(key).await });
        }
        rx.await.unwrap_or_else(|_| Err(lost_flusher()))
    }

    /// The next batch of a route's waiting calls and the grant to ask for with it, or `None`
    /// (the flusher stops) when no call waits: decided under the lock `reserve` takes, so no
    /// call is left behind.
    fn next_reserves(&self, key: &LaneKey) -> Option<(Vec<ReserveCall>, Option<GrantAsk>, u64)> {
        let mut lanes = lock(&self.inner.reserves);
        let lane = lanes.get_mut(key)?;
        if lane.calls.is_empty() {
            lane.flushing = false;
            return None;
        }
        let take = lane.calls.len().min(MAX_BATCH);
        let calls: Vec<ReserveCall> = lane.calls.drain(..take).collect();
        let usable = lane.grant.as_ref().is_some_and(|g| {
            let g = lock(g);
            !g.closed && g.left_requests > 0 && Instant::now() < g.deadline && !lane.starved
        });
        let ask = if usable || !self.inner.grants_on {
            None
        } else {
            lane.grant_request()
        };
        Some((calls, ask, lane.lease_ms))
    }

    async fn flush_reserves(&self, key: LaneKey) {
        let (keys, head) = &key;
        while let Some((calls, ask, lease_ms)) = self.next_reserves(&key) {
            let mut inv = RESERVE.prepare_invoke();
            for k in &keys.0 {
                inv.key(k);
            }
            for v in head {
                inv.arg(*v);
            }
            let (gn, gt, gc) = ask.unwrap_or((0, 0, 0));
            let gid = if gn > 0 {
                let n = self.inner.grants.fetch_add(1, Ordering::Relaxed);
                format!("g:{}:{n}", self.inner.id)
            } else {
                String::new()
            };
            inv.arg(gn)
                .arg(gt)
                .arg(gc)
                .arg(&gid)
                .arg(lease_ms)
                .arg(GRANT_SPAN.as_millis() as u64);
            for c in &calls {
                inv.arg(c.tokens)
                    .arg(&c.lease)
                    .arg(c.lease_ms)
                    .arg(c.line.arg());
            }
            // the grant's time counts from before the script ran: it ends no later than Redis
            // said
            let sent = Instant::now();
            let out: RedisResult<Vec<redis::Value>> = match self.redis.conn().await {
                Ok(mut conn) => inv.invoke_async(&mut conn).await,
                Err(e) => Err(e),
            };
            match out {
                Ok(out) => {
                    if gn > 0 {
                        self.install_grant(&key, &out, calls.len() * 4, gid, sent);
                    }
                    for (i, c) in calls.into_iter().enumerate() {
                        let got = admission(&out, i * 4, keys, c.tokens, &c.lease);
                        let _ = c.reply.send(got);
                    }
                }
                Err(e) => {
                    for c in calls {
                        let _ = c.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// Puts the grant `reserve.lua` gave (six values from `at`) in force on the route, and ends
    /// it when its time is up.
    fn install_grant(
        &self,
        key: &LaneKey,
        out: &[redis::Value],
        at: usize,
        id: String,
        sent: Instant,
    ) {
        let int = |i: usize| -> i64 {
            out.get(at + i)
                .and_then(|v| redis::from_redis_value_ref::<i64>(v).ok())
                .unwrap_or(0)
        };
        let requests = int(0).max(0) as u64;
        if requests == 0 {
            return;
        }
        let deadline = sent + Duration::from_millis(int(3).max(0) as u64);
        let tokens = int(1).max(0) as u64;
        let grant = Arc::new(Mutex::new(Grant {
            id,
            sec: int(4),
            deadline,
            requests,
            tokens,
            slots: int(2).max(0) as u64,
            counted: int(5) != 0,
            left_requests: requests,
            left_tokens: tokens,
            in_flight: 0,
            served: 0,
            used: 0,
            latency_ms: 0,
            latencies: 0,
            closed: false,
            settled: false,
        }));
        let replaced = {
            let mut lanes = lock(&self.inner.reserves);
            match lanes.get_mut(key) {
                Some(lane) => {
                    lane.starved = false;
                    lane.grant.replace(grant.clone())
                }
                // the lane is gone (pruned): the grant is never used, settle it at once
                None => Some(grant.clone()),
            }
        };
        let keys = key.0.clone();
        if let Some(args) = replaced.and_then(|g| lock(&g).close()) {
            let (this, keys) = (self.clone(), keys.clone());
            tokio::spawn(async move { this.settle_grant(keys, args).await });
        }
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline.into()).await;
            let args = lock(&grant).close();
            if let Some(args) = args {
                this.settle_grant(keys, args).await;
            }
        });
    }

    async fn settle_grant(&self, keys: Arc<RouteKeys>, args: SettleCallArgs) {
        if let Err(e) = self.send_settle(keys, args).await {
            tracing::warn!(error = %e, "could not settle a flow grant; it ages out");
        }
    }

    async fn send_settle(&self, keys: Arc<RouteKeys>, args: SettleCallArgs) -> RedisResult<()> {
        let (tx, rx) = oneshot::channel();
        let key = (keys, Vec::new());
        if enqueue(&self.inner.settles, &key, SettleCall { args, reply: tx }) {
            let this = self.clone();
            tokio::spawn(async move { this.flush_settles(key).await });
        }
        rx.await.unwrap_or_else(|_| Err(lost_flusher()))
    }

    /// Settles a reservation: tokens become what was used (unused ones return to the window),
    /// a request the upstream never counted is handed back, the lease ends. Settlements on one
    /// route that arrive together share one script call.
    pub async fn reconcile(&self, r: &Reservation, s: Settlement) -> RedisResult<()> {
        if !r.held {
            return Ok(());
        }
        let used = match (s.used_tokens, s.not_served) {
            (Some(u), _) => u,
            (None, true) => 0,
            (None, false) => r.tokens,
        };
        if let Some(g) = &r.grant {
            // admitted from a grant: counted in it, settled with it once it is over
            let args = {
                let mut g = lock(g);
                g.in_flight = g.in_flight.saturating_sub(1);
                if !s.not_served {
                    g.served += 1;
                    g.used += used;
                }
                let ms = s.latency.as_millis() as u64;
                if ms > 0 {
                    g.latency_ms += ms;
                    g.latencies += 1;
                }
                g.take_settlement()
            };
            return match args {
                Some(args) => self.send_settle(r.keys.clone(), args).await,
                None => Ok(()),
            };
        }
        let args = SettleCallArgs {
            sec: r.sec,
            reserved: r.tokens,
            used,
            lease: r.lease.clone(),
            latency_ms: s.latency.as_millis() as u64,
            handback: u64::from(s.not_served),
            served: u64::from(!s.not_served),
            slots: 0,
        };
        self.send_settle(r.keys.clone(), args).await
    }

    async fn flush_settles(&self, key: LaneKey) {
        let keys = &key.0;
        while let Some(calls) = next_batch(&self.inner.settles, &key) {
            let mut inv = RECONCILE.prepare_invoke();
            for k in &keys.0 {
                inv.key(k);
            }
            for c in &calls {
                let a = &c.args;
                inv.arg(a.sec)
                    .arg(a.reserved)
                    .arg(a.used)
                    .arg(&a.lease)
                    .arg(a.latency_ms)
                    .arg(a.handback)
                    .arg(a.served)
                    .arg(a.slots);
            }
            let out: RedisResult<i64> = match self.redis.conn().await {
                Ok(mut conn) => inv.invoke_async(&mut conn).await,
                Err(e) => Err(e),
            };
            for c in calls {
                let _ = c.reply.send(match &out {
                    Ok(_) => Ok(()),
                    Err(e) => Err(e.clone()),
                });
            }
        }
    }

    /// Records what the upstream said: block `route` for the whole fleet until `blocked_until_ms`
    /// (0: no block), and limits lower than configured (0: none). Returns the block in force.
    pub async fn learn(
        &self,
        route: &Route<'_>,
        implicit: bool,
        blocked_until_ms: i64,
        rpm: u64,
        tpm: u64,
    ) -> RedisResult<i64> {
        // This worker heard it first: its own grant on the route ends now rather than when its
        // span is over (other workers' end within their span).
        if blocked_until_ms > 0 || rpm > 0 || tpm > 0 {
            self.end_grant(&self.lane_key(route, implicit));
        }
        let key = keys::limiter_model(&self.prefix, &route.upstream.name, route.model);
        let mut conn = self.redis.conn().await?;
        LEARN
            .key(key)
            .arg(blocked_until_ms.max(0))
            .arg(rpm)
            .arg(tpm)
            .arg(self.state_ttl(route, implicit))
            .arg(u8::from(
                route.model_limits.rpm.is_none() && route.model_limits.tpm.is_none(),
            ))
            .invoke_async(&mut conn)
            .await
    }

    /// What `GET /v1/upstreams` shows: limits, the current minute's use, leases held and blocks.
    pub async fn snapshot(&self, upstreams: &Upstreams) -> RedisResult<Vec<UpstreamState>> {
        let mut conn = self.redis.conn().await?;
        let (secs, _): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let now_ms = secs * 1000;
        let mut out = Vec::with_capacity(upstreams.list.len());
        for u in &upstreams.list {
            let up_key = keys::limiter_upstream(&self.prefix, &u.name);
            let (usage, _) = scope_state(&mut conn, &up_key, secs, now_ms).await?;
            let mut models: Vec<String> = u.models.clone();
            if upstreams.implicit {
                models = implicit_models(&mut conn, &self.prefix, u, upstreams).await?;
            }
            let mut model_states = Vec::with_capacity(models.len());
            for m in models {
                let key = keys::limiter_model(&self.prefix, &u.name, &m);
                let (usage, extra) = scope_state(&mut conn, &key, secs, now_ms).await?;
                model_states.push(ModelState {
                    limits: u.limits_for(&m),
                    model: m,
                    learned: extra.learned,
                    usage,
                    blocked_until: extra.blocked_until,
                });
            }
            let blocked_until = model_states
                .iter()
                .filter_map(|m| m.blocked_until.clone())
                .max();
            out.push(UpstreamState {
                blocked_until,
                name: u.name.clone(),
                implicit: upstreams.implicit,
                base_url: crate::config::redact_url(&u.base_url),
                models: u.models.clone(),
                limits: u.limits,
                usage,
                model_states,
            });
        }
        Ok(out)
    }
}

impl Reservation {
    /// Whether the call was admitted from this worker's grant rather than by Redis.
    pub fn from_grant(&self) -> bool {
        self.grant.is_some()
    }
}

/// One call's answer in `reserve.lua`'s reply: four values from `at`.
fn admission(
    out: &[redis::Value],
    at: usize,
    keys: &Arc<RouteKeys>,
    tokens: u64,
    lease: &str,
) -> RedisResult<Admission> {
    let int = |i: usize| -> RedisResult<i64> {
        match out.get(at + i) {
            Some(v) => Ok(redis::from_redis_value_ref(v)?),
            None => Err(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "reserve.lua: short reply",
            ))),
        }
    };
    Ok(match int(0)? {
        1 => Admission::Admitted(Reservation {
            keys: keys.clone(),
            sec: int(1)?,
            tokens,
            lease: lease.to_owned(),
            held: int(2)? != 0,
            grant: None,
        }),
        2 => Admission::TooLarge {
            tpm: int(1)?.max(0) as u64,
        },
        _ => {
            let reason: String = match out.get(at + 2) {
                Some(v) => redis::from_redis_value_ref(v)?,
                None => String::new(),
            };
            Admission::Wait {
                eligible_at_ms: int(1)?,
                reason: Refusal::parse(&reason),
                limit: int(3)?.max(0) as u64,
            }
        }
    })
}

/// Models of the implicit upstream worth showing: the default one and any with limiter state
/// (found by a bounded SCAN; this is an operator's endpoint, not a hot path).
async fn implicit_models(
    conn: &mut crate::redis_conn::Conn,
    prefix: &str,
    u: &Upstream,
    upstreams: &Upstreams,
) -> RedisResult<Vec<String>> {
    let base = keys::limiter_model(prefix, &u.name, "");
    let mut models = vec![upstreams.default_model.clone()];
    let mut cursor: u64 = 0;
    for _ in 0..100 {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(format!("{base}*"))
            .arg("COUNT")
            .arg(1000);
        // the upstream's keys share its hash tag: in a cluster they are all on that slot's node
        let (next, found): (u64, Vec<String>) = conn.query_at(&scan, &base).await?;
        for k in found {
            if let Some(m) = k.strip_prefix(&base) {
                if !m.ends_with(":leases") && !models.iter().any(|x| x == m) && models.len() < 100 {
                    models.push(m.to_owned());
                }
            }
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    Ok(models)
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    /// Requests counted in the current sliding minute.
    pub requests: u64,
    /// Tokens counted in the current sliding minute (reserved, or settled to what was used).
    pub tokens: u64,
    /// Concurrency leases held now.
    pub concurrency: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Learned {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
}

#[derive(Default)]
struct Extra {
    learned: Learned,
    blocked_until: Option<String>,
}

async fn scope_state(
    conn: &mut crate::redis_conn::Conn,
    key: &str,
    sec: i64,
    now_ms: i64,
) -> RedisResult<(Usage, Extra)> {
    let (h, leases): (std::collections::HashMap<String, String>, u64) = redis::pipe()
        .hgetall(key)
        .zcount(keys::limiter_leases(key), now_ms, "+inf")
        .query_async(conn)
        .await?;
    // a grant's lease weighs its slots (`gextra`: beyond one each, see reserve.lua)
    let gextra = h
        .get("gextra")
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0)
        .max(0) as u64;
    let mut usage = Usage {
        concurrency: leases + if leases > 0 { gextra } else { 0 },
        ..Usage::default()
    };
    for (f, v) in &h {
        let Some((kind, b)) = f.split_once(':') else {
            continue;
        };
        let (Ok(b), Ok(v)) = (b.parse::<i64>(), v.parse::<u64>()) else {
            continue;
        };
        // the same span reserve.lua counts: buckets opened in the last 61 s
        if b > sec - 61 && b <= sec {
            match kind {
                "r" => usage.requests += v,
                "t" => usage.tokens += v,
                _ => {}
            }
        }
    }
    let num = |k: &str| h.get(k).and_then(|v| v.parse::<i64>().ok());
    let fresh = num("learned_at").is_some_and(|at| now_ms - at < 3_600_000);
    let learned = Learned {
        rpm: num("learned_rpm")
            .filter(|_| fresh)
            .map(|v| v.max(0) as u64),
        tpm: num("learned_tpm")
            .filter(|_| fresh)
            .map(|v| v.max(0) as u64),
    };
    let blocked_until = num("blocked_until")
        .filter(|b| *b > now_ms)
        .map(crate::time::format_ms);
    Ok((
        usage,
        Extra {
            learned,
            blocked_until,
        },
    ))
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelState {
    pub model: String,
    pub limits: Limits,
    pub learned: Learned,
    pub usage: Usage,
    pub blocked_until: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct UpstreamState {
    pub name: String,
    pub implicit: bool,
    pub base_url: String,
    pub models: Vec<String>,
    pub limits: Limits,
    pub usage: Usage,
    /// The latest block among its models (RFC 3339), while one lasts: a 429 blocks one model.
    pub blocked_until: Option<String>,
    pub model_states: Vec<ModelState>,
}
