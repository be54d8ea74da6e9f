//! Budgets: dollar limits over a scope (`global`, `queue:<name>`, `agent:<id>`, `model:<name>`)
//! and a window, enforced the way the limiter enforces quotas: before each LLM call its worst-case
//! cost is held against every budget that applies (`budget_reserve.lua`, atomic over all of
//! them), and after the call the hold is released and what the call really cost is charged
//! (`budget_settle.lua`). Every settlement also feeds the usage report (`GET /v1/usage`).
//!
//! Tenants (docs/architecture.md, "Budgets"): the operator's budgets are the scopes above (fleet
//! wide) and `tenant:<id>` (a tenant's spend quota); a tenant's own budgets are stored under
//! namespaced scopes `<tenant>~<scope>` (`acme~agent:bot`), so tenants never share one. Which of
//! them bind a call is [`scopes_of`].
//!
//! Money is counted in nano-dollars (integers), so sums are exact and Lua's doubles hold them.
//! All keys share the `{budgets}` hash tag: one script touches every budget of a call, and a
//! Redis Cluster keeps them in one slot. docs/architecture.md ("Budgets") has the overspend bound.

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;
use std::time::Duration;

use redis::{RedisResult, Script};
use serde::{Deserialize, Serialize};

use crate::script::declared;
use crate::task::{valid_name, FieldError};
use crate::Redis;

static RESERVE: LazyLock<Script> = LazyLock::new(|| declared(include_str!("budget_reserve.lua")));
static SETTLE: LazyLock<Script> = LazyLock::new(|| declared(include_str!("budget_settle.lua")));

/// Nano-dollars in a dollar.
pub const NANOS: f64 = 1e9;
/// The most budgets the operator keeps over `global`, `queue:`, `agent:` and `model:` scopes (each
/// is a key, a metric series and a config entry every worker rereads every second). Tenant
/// quotas (`tenant:<id>`) are bounded by the tenant count instead.
pub const MAX_BUDGETS: usize = 1000;
/// The most budgets one tenant keeps under its own namespace (`<tenant>~<scope>`), so no tenant
/// can fill the table the whole fleet shares.
pub const MAX_TENANT_BUDGETS: usize = 100;
/// The most budgets all tenants keep under their namespaces together: the table (and the
/// workers' per-second reread of it) stays bounded whatever the tenant count.
pub const MAX_TENANT_BUDGETS_TOTAL: usize = 1000;
/// Between a tenant id and the scope it names in a tenant's own budget: in neither alphabet
/// (tenant ids are `[a-z0-9_-]`, scope names have no `~`), so the split is unambiguous.
pub const TENANT_SEP: char = '~';
/// The largest limit a budget takes, in dollars.
pub const MAX_LIMIT_USD: f64 = 1e9;
const MIN_WINDOW_SECS: u64 = 60;
const MAX_WINDOW_SECS: u64 = 30 * 86_400;

/// Dollars to nano-dollars, rounded up: a hold or a limit is never smaller than asked.
pub fn nanos_up(usd: f64) -> i64 {
    if !usd.is_finite() || usd <= 0.0 {
        return 0;
    }
    (usd * NANOS).ceil().min(i64::MAX as f64) as i64
}

pub fn usd(nanos: i64) -> f64 {
    nanos as f64 / NANOS
}

/// What a call with these token counts costs at `price` (dollars per million tokens), in
/// nano-dollars, rounded up.
pub fn cost_nanos(prompt_tokens: u64, completion_tokens: u64, price: crate::config::Price) -> i64 {
    // per million tokens, in dollars = per token, in milli-nano-dollars
    let n =
        (prompt_tokens as f64 * price.prompt + completion_tokens as f64 * price.completion) * 1e3;
    if n <= 0.0 {
        0
    } else {
        n.ceil().min(i64::MAX as f64) as i64
    }
}

/// How a budget's window moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The last `window` up to now (counted in sixtieths of the window: spend leaves it between
    /// one window and one window plus a sixtieth after it was made).
    #[default]
    Rolling,
    /// Fixed periods of `window` since the Unix epoch, UTC (`1h`: clock hours, `1d`: UTC days):
    /// everything is available again when a period starts.
    Calendar,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Rolling => "rolling",
            Self::Calendar => "calendar",
        }
    }
}

/// `PUT /v1/budgets/{scope}`'s body (and a tenant's `quotas.budget`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetBody {
    pub limit_usd: Option<f64>,
    pub window: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
}

/// A validated budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub scope: String,
    pub limit_nanos: i64,
    pub window: String,
    pub window_secs: u64,
    pub mode: Mode,
}

impl Budget {
    fn encode(&self) -> String {
        format!(
            "{}|{}|{}",
            self.limit_nanos,
            self.window_secs,
            self.mode.as_str()
        )
    }

    fn decode(scope: &str, raw: &str) -> Option<Self> {
        let mut it = raw.split('|');
        let limit_nanos = it.next()?.parse().ok()?;
        let window_secs: u64 = it.next()?.parse().ok()?;
        let mode = match it.next()? {
            "calendar" => Mode::Calendar,
            _ => Mode::Rolling,
        };
        Some(Self {
            scope: scope.to_owned(),
            limit_nanos,
            window: format_window(window_secs),
            window_secs,
            mode,
        })
    }
}

/// A scope a tenant may name for its own budgets (and the operator for fleet-wide ones):
/// `global`, `queue:<name>`, `agent:<id>` or `model:<name>`.
pub fn validate_plain_scope(scope: &str) -> Result<(), FieldError> {
    if scope == "global" {
        return Ok(());
    }
    let bad = || {
        FieldError::new(
            "scope",
            "must be global, queue:<name>, agent:<agent_id> or model:<model>",
        )
    };
    let (kind, name) = scope.split_once(':').ok_or_else(bad)?;
    let ok = match kind {
        "queue" => crate::keys::validate_queue(name).is_ok(),
        "agent" | "model" => valid_name(name),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// Any scope a budget may be stored under (the admin's view): a plain scope
/// ([`validate_plain_scope`]), `tenant:<id>` (a tenant's spend quota), or a tenant's own budget
/// `<tenant>~<plain scope>`. A tenant's requests name plain scopes only; the api namespaces them.
pub fn validate_scope(scope: &str) -> Result<(), FieldError> {
    let bad = || {
        FieldError::new(
            "scope",
            "must be global, queue:<name>, agent:<agent_id>, model:<model>, tenant:<id> or \
             <tenant>~<one of the first four>",
        )
    };
    if let Some(id) = scope.strip_prefix("tenant:") {
        return if crate::tenant::valid_tenant_id(id) {
            Ok(())
        } else {
            Err(bad())
        };
    }
    if scope.contains(TENANT_SEP) {
        return match split_tenant_scope(scope) {
            Some((_, inner)) if validate_plain_scope(inner).is_ok() => Ok(()),
            _ => Err(bad()),
        };
    }
    validate_plain_scope(scope).map_err(|_| bad())
}

/// `acme~agent:bot` → `("acme", "agent:bot")`; `None` for a scope outside every tenant's
/// namespace (an operator's scope, or `tenant:<id>`).
pub fn split_tenant_scope(scope: &str) -> Option<(&str, &str)> {
    let (tenant, inner) = scope.split_once(TENANT_SEP)?;
    crate::tenant::valid_tenant_id(tenant).then_some((tenant, inner))
}

/// `scope` as tenant `tenant` names it (its own budgets without their namespace), for messages
/// the tenant reads; every other scope as stored.
pub fn scope_shown_to<'a>(tenant: Option<&str>, scope: &'a str) -> &'a str {
    match (
        split_tenant_scope(scope),
        crate::tenant::non_default(tenant),
    ) {
        (Some((owner, inner)), Some(t)) if owner == t => inner,
        _ => scope,
    }
}

/// Where tenant `tenant`'s own budget over `scope` (a plain scope) is stored.
pub fn tenant_scope(tenant: &str, scope: &str) -> String {
    format!("{tenant}{TENANT_SEP}{scope}")
}

/// `30s`-style windows: a whole number of minutes (`m`), hours (`h`) or days (`d`), 1m to 30d.
pub fn parse_window(w: &str) -> Option<u64> {
    // digits only, no sign and no leading zero: one spelling per window
    let digits = w.get(..w.len().checked_sub(1)?)?;
    if digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let unit = w.chars().last()?;
    let n: u64 = w.get(..w.len() - 1)?.parse().ok()?;
    let secs = n.checked_mul(match unit {
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return None,
    })?;
    (MIN_WINDOW_SECS..=MAX_WINDOW_SECS)
        .contains(&secs)
        .then_some(secs)
}

fn format_window(secs: u64) -> String {
    if secs.is_multiple_of(86_400) {
        format!("{}d", secs / 86_400)
    } else if secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else {
        format!("{}m", secs / 60)
    }
}

impl BudgetBody {
    pub fn validate(self, scope: &str) -> Result<Budget, FieldError> {
        validate_scope(scope)?;
        let limit = self
            .limit_usd
            .ok_or_else(|| FieldError::new("limit_usd", "is required (dollars, > 0)"))?;
        if !limit.is_finite() || limit <= 0.0 || limit > MAX_LIMIT_USD {
            return Err(FieldError::new(
                "limit_usd",
                format!("must be a number of dollars above 0 and at most {MAX_LIMIT_USD}"),
            ));
        }
        let window = self
            .window
            .ok_or_else(|| FieldError::new("window", "is required, e.g. 1h"))?;
        let window_secs = parse_window(&window).ok_or_else(|| {
            FieldError::new(
                "window",
                "must be a whole number of minutes, hours or days (e.g. 15m, 1h, 7d), from 1m to 30d",
            )
        })?;
        Ok(Budget {
            scope: scope.to_owned(),
            limit_nanos: nanos_up(limit),
            window: format_window(window_secs),
            window_secs,
            mode: self.mode.unwrap_or_default(),
        })
    }
}

/// A budget as `GET /v1/budgets/{scope}` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BudgetView {
    pub scope: String,
    pub limit_usd: f64,
    pub window: String,
    pub mode: Mode,
    /// Settled spend in the current window.
    pub spent_usd: f64,
    /// Worst-case cost of the calls in flight against it.
    pub reserved_usd: f64,
    pub remaining_usd: f64,
}

/// The scopes a call falls under, in a fixed order. A call of the default tenant (`None`):
/// `global`, `queue:<q>`, `agent:<a>`, `model:<m>`. A call of tenant `t`: the operator's fleet-wide
/// `global`, `queue:<q>` and `model:<m>` (the operator's `agent:<a>` does not bind it: agent names
/// are per tenant), the tenant's quota `tenant:<t>`, and the tenant's own budgets
/// `t~global`, `t~queue:<q>`, `t~agent:<a>`, `t~model:<m>`. Only those that have a budget are held.
pub fn scopes_of(
    tenant: Option<&str>,
    queue: &str,
    agent: Option<&str>,
    model: &str,
) -> Vec<String> {
    let tenant = crate::tenant::non_default(tenant);
    let mut s = Vec::with_capacity(if tenant.is_some() { 8 } else { 4 });
    s.push("global".to_owned());
    s.push(format!("queue:{queue}"));
    if let (Some(a), None) = (agent, tenant) {
        s.push(format!("agent:{a}"));
    }
    s.push(format!("model:{model}"));
    if let Some(t) = tenant {
        s.push(format!("tenant:{t}"));
        s.push(tenant_scope(t, "global"));
        s.push(format!("{t}{TENANT_SEP}queue:{queue}"));
        if let Some(a) = agent {
            s.push(format!("{t}{TENANT_SEP}agent:{a}"));
        }
        s.push(format!("{t}{TENANT_SEP}model:{model}"));
    }
    s
}

/// What [`Budgets::reserve`] decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Hold {
    /// Held against these scopes (empty: no budget applies).
    Held(Vec<String>),
    /// Refused by `scope` until about `eligible_at_ms`.
    Wait {
        scope: String,
        eligible_at_ms: i64,
        limit_nanos: i64,
        spent_nanos: i64,
        held_nanos: i64,
        /// Only the holds of calls in flight are in the way: once they settle to what they
        /// really cost there may be room, so the caller waits a moment whatever `on_budget` says.
        holds_only: bool,
    },
    /// Refused for good: the call alone costs more than `scope`'s whole limit.
    TooLarge { scope: String, limit_nanos: i64 },
}

/// One call's report to [`Budgets::settle`].
#[derive(Debug, Clone)]
pub struct Charge<'a> {
    pub hold_id: &'a str,
    pub scopes: &'a [String],
    pub cost_nanos: i64,
}

/// Calls counted for the usage report, summed in the worker and written every second
/// ([`Budgets::record_usage`]): the report needs no per-call write. Counting a call allocates
/// only for a (tenant, queue, agent, model) combination new in its minute.
#[derive(Debug, Default)]
pub struct UsageBatch {
    /// minute -> tenant ('' the default) -> queue -> agent ('' none) -> model ->
    /// [cost n$, prompt, completion, calls]
    minutes: HashMap<i64, ByTenant>,
}

type ByModel = HashMap<String, [i64; 4]>;
type ByQueue = HashMap<String, HashMap<String, ByModel>>;
type ByTenant = HashMap<String, ByQueue>;

impl UsageBatch {
    pub fn is_empty(&self) -> bool {
        self.minutes.is_empty()
    }

    /// Adds one call of `tenant`'s (`None`: the default tenant) `agent` (its id as the tenant
    /// wrote it).
    #[allow(clippy::too_many_arguments)]
    pub fn count(
        &mut self,
        now_ms: i64,
        tenant: Option<&str>,
        agent: Option<&str>,
        queue: &str,
        model: &str,
        prompt: u64,
        completion: u64,
        cost_nanos: i64,
    ) {
        fn slot<'a, V: Default>(m: &'a mut HashMap<String, V>, k: &str) -> &'a mut V {
            if !m.contains_key(k) {
                m.insert(k.to_owned(), V::default());
            }
            m.get_mut(k).expect("inserted above")
        }
        let by_tenant = self.minutes.entry(now_ms / 60_000).or_default();
        let by_queue = slot(by_tenant, crate::tenant::non_default(tenant).unwrap_or(""));
        let by_agent = slot(by_queue, queue);
        let by_model = slot(by_agent, agent.unwrap_or(""));
        let c = slot(by_model, model);
        c[0] = c[0].saturating_add(cost_nanos.max(0));
        c[1] = c[1].saturating_add(i64::try_from(prompt).unwrap_or(i64::MAX));
        c[2] = c[2].saturating_add(i64::try_from(completion).unwrap_or(i64::MAX));
        c[3] = c[3].saturating_add(1);
    }
}

/// Whose calls a usage report sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageView<'a> {
    /// Every call of the fleet (the admin): `group_by` agent (tenants' agents as
    /// `<tenant>~<agent>`), queue, model or tenant.
    Fleet,
    /// One tenant's calls only: `group_by` agent (as the tenant names them), queue or model.
    Tenant(&'a str),
}

/// One group's spend in `GET /v1/usage`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct UsageRow {
    pub key: String,
    pub cost_usd: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub calls: u64,
}

#[derive(Clone)]
pub struct Budgets {
    redis: Redis,
    prefix: String,
}

impl Budgets {
    pub fn new(redis: Redis, prefix: &str) -> Self {
        Self {
            redis,
            prefix: prefix.to_owned(),
        }
    }

    pub fn conf_key(&self) -> String {
        format!("{}:{{budgets}}:conf", self.prefix)
    }
    pub fn spend_key(&self, scope: &str) -> String {
        format!("{}:{{budgets}}:spend:{scope}", self.prefix)
    }
    pub fn holds_key(&self, scope: &str) -> String {
        format!("{}:{{budgets}}:holds:{scope}", self.prefix)
    }
    fn usage_key(&self, grain: &str, n: i64) -> String {
        format!("{}:{{budgets}}:usage:{grain}:{n}", self.prefix)
    }

    /// Creates or replaces a budget; `Ok(true)` when it is new. A new one is refused (`Err`
    /// with the field) past its pool's cap: [`MAX_BUDGETS`] for the operator's own scopes,
    /// [`MAX_TENANT_BUDGETS`] for one tenant's namespace and [`MAX_TENANT_BUDGETS_TOTAL`] for all
    /// tenants' together (`tenant:<id>` quotas are bounded by the tenant count). An existing one
    /// can always change.
    pub async fn put(&self, b: &Budget) -> RedisResult<Result<bool, FieldError>> {
        let mut conn = self.redis.conn().await?;
        // one script: the counts and the write cannot interleave with another PUT. The counts
        // walk the table's names (at most a few thousand, and PUTs are rare), so no counter can
        // drift from what the table holds.
        let script = declared(
            "redis.call('HDEL', KEYS[2], 'refused_until') \
             if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then \
               redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) return 0 end \
             local mine, prefix = 0, ARGV[6] \
             local own, tenants = 0, 0 \
             for _, k in ipairs(redis.call('HKEYS', KEYS[1])) do \
               if string.find(k, '~', 1, true) then \
                 tenants = tenants + 1 \
                 if prefix ~= '' and string.sub(k, 1, #prefix) == prefix then mine = mine + 1 end \
               elseif string.sub(k, 1, 7) ~= 'tenant:' then own = own + 1 end \
             end \
             if prefix == '' then \
               if string.sub(ARGV[1], 1, 7) ~= 'tenant:' and own >= tonumber(ARGV[3]) then \
                 return -1 end \
             else \
               if mine >= tonumber(ARGV[4]) then return -2 end \
               if tenants >= tonumber(ARGV[5]) then return -3 end \
             end \
             redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) return 1",
        );
        let prefix = split_tenant_scope(&b.scope)
            .map(|(t, _)| tenant_scope(t, ""))
            .unwrap_or_default();
        // a changed limit may fit what the old one refused: its refusal mark goes
        let r: i64 = script
            .key(self.conf_key())
            .key(self.spend_key(&b.scope))
            .arg(&b.scope)
            .arg(b.encode())
            .arg(MAX_BUDGETS)
            .arg(MAX_TENANT_BUDGETS)
            .arg(MAX_TENANT_BUDGETS_TOTAL)
            .arg(&prefix)
            .invoke_async(&mut conn)
            .await?;
        let full = |m: String| Err(FieldError::new("scope", m));
        Ok(match r {
            1 => Ok(true),
            0 => Ok(false),
            -2 => full(format!(
                "at most {MAX_TENANT_BUDGETS} budgets per tenant; delete one first"
            )),
            -3 => full(format!(
                "at most {MAX_TENANT_BUDGETS_TOTAL} budgets over all tenants; delete one first"
            )),
            _ => full(format!("at most {MAX_BUDGETS} budgets; delete one first")),
        })
    }

    /// Deletes a budget and its counts; `false` when there was none.
    pub async fn delete(&self, scope: &str) -> RedisResult<bool> {
        let mut conn = self.redis.conn().await?;
        let (n, _, _): (i64, i64, i64) = redis::pipe()
            .atomic()
            .hdel(self.conf_key(), scope)
            .del(self.spend_key(scope))
            .del(self.holds_key(scope))
            .query_async(&mut conn)
            .await?;
        Ok(n > 0)
    }

    /// Deletes every budget in `tenant`'s own namespace (`<tenant>~<scope>`) with its counts,
    /// for a tenant that is deleted; returns how many there were.
    pub async fn delete_tenant_budgets(&self, tenant: &str) -> RedisResult<usize> {
        let prefix = tenant_scope(tenant, "");
        let scopes: Vec<String> = {
            let mut conn = self.redis.conn().await?;
            redis::cmd("HKEYS")
                .arg(self.conf_key())
                .query_async(&mut conn)
                .await?
        };
        let mut n = 0;
        for s in scopes.iter().filter(|s| s.starts_with(&prefix)) {
            if self.delete(s).await? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Until when (ms since the epoch) the budget over `scope` refuses calls for what was
    /// spent, if it does now: set when a call was refused because the window's settled spend
    /// left no room for it (not merely calls in flight), cleared when a call fits or the budget
    /// is replaced. The api answers a tenant's new work 429 while its quota (`tenant:<id>`) says
    /// so, instead of queueing tasks that would fail `budget_exceeded`.
    pub async fn refusing(&self, scope: &str, now_ms: i64) -> RedisResult<Option<i64>> {
        let mut conn = self.redis.conn().await?;
        let until: Option<String> = redis::cmd("HGET")
            .arg(self.spend_key(scope))
            .arg("refused_until")
            .query_async(&mut conn)
            .await?;
        // written by Lua from a number: read leniently, an unreadable mark refuses nothing
        let until = until.and_then(|t| {
            t.parse::<i64>()
                .ok()
                .or_else(|| t.parse::<f64>().ok().map(|f| f as i64))
        });
        Ok(until.filter(|t| *t > now_ms))
    }

    /// Every budget's configuration.
    pub async fn all(&self) -> RedisResult<Vec<Budget>> {
        let mut conn = self.redis.conn().await?;
        let raw: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.conf_key())
            .query_async(&mut conn)
            .await?;
        let mut v: Vec<Budget> = raw
            .iter()
            .filter_map(|(s, r)| Budget::decode(s, r))
            .collect();
        v.sort_by(|a, b| a.scope.cmp(&b.scope));
        Ok(v)
    }

    /// One budget with its current spend, or `None`.
    pub async fn view(&self, scope: &str, now_ms: i64) -> RedisResult<Option<BudgetView>> {
        let mut conn = self.redis.conn().await?;
        let raw: Option<String> = redis::cmd("HGET")
            .arg(self.conf_key())
            .arg(scope)
            .query_async(&mut conn)
            .await?;
        let Some(b) = raw.and_then(|r| Budget::decode(scope, &r)) else {
            return Ok(None);
        };
        Ok(Some(self.view_of(&b, now_ms).await?))
    }

    /// `b` with the spend of its current window.
    pub async fn view_of(&self, b: &Budget, now_ms: i64) -> RedisResult<BudgetView> {
        let mut conn = self.redis.conn().await?;
        let (spend, expired): (HashMap<String, i64>, Vec<String>) = redis::pipe()
            .hgetall(self.spend_key(&b.scope))
            .cmd("ZRANGEBYSCORE")
            .arg(self.holds_key(&b.scope))
            .arg("-inf")
            .arg(now_ms)
            .query_async(&mut conn)
            .await?;
        let (size, keep) = match b.mode {
            Mode::Calendar => (b.window_secs.max(1) as i64, 1),
            Mode::Rolling => ((b.window_secs / 60).max(1) as i64, 61),
        };
        let cur = now_ms / 1000 / size;
        let spent: i64 = spend
            .iter()
            .filter_map(|(k, v)| {
                let idx: i64 = k.strip_prefix("b:")?.parse().ok()?;
                (idx > cur - keep).then_some(*v)
            })
            .sum();
        let expired: i64 = expired
            .iter()
            .filter_map(|id| spend.get(&format!("h:{id}")))
            .sum();
        let held = (spend.get("held").copied().unwrap_or(0) - expired).max(0);
        Ok(BudgetView {
            scope: b.scope.clone(),
            limit_usd: usd(b.limit_nanos),
            window: b.window.clone(),
            mode: b.mode,
            spent_usd: usd(spent),
            reserved_usd: usd(held),
            remaining_usd: usd((b.limit_nanos - spent - held).max(0)),
        })
    }

    /// Holds `cost_nanos` against every budget among `scopes`, or says why not.
    pub async fn reserve(
        &self,
        scopes: &[String],
        hold_id: &str,
        cost_nanos: i64,
        ttl: Duration,
        now_ms: i64,
    ) -> RedisResult<Hold> {
        let mut conn = self.redis.conn().await?;
        let mut inv = RESERVE.prepare_invoke();
        inv.key(self.conf_key());
        for s in scopes {
            inv.key(self.spend_key(s)).key(self.holds_key(s));
        }
        inv.arg(now_ms)
            .arg(hold_id)
            .arg(cost_nanos.max(0))
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        for s in scopes {
            inv.arg(s);
        }
        let v: Vec<redis::Value> = inv.invoke_async(&mut conn).await?;
        let int = |i: usize| -> i64 {
            v.get(i)
                .and_then(|x| redis::from_redis_value::<i64>(x.clone()).ok())
                .unwrap_or(0)
        };
        let text = |i: usize| -> String {
            v.get(i)
                .and_then(|x| redis::from_redis_value::<String>(x.clone()).ok())
                .unwrap_or_default()
        };
        Ok(match int(0) {
            1 => Hold::Held((1..v.len()).map(text).collect()),
            2 => Hold::TooLarge {
                scope: text(1),
                limit_nanos: int(2),
            },
            _ => Hold::Wait {
                eligible_at_ms: int(1),
                scope: text(2),
                limit_nanos: int(3),
                spent_nanos: int(4),
                held_nanos: int(5),
                holds_only: int(6) == 1,
            },
        })
    }

    /// Releases a hold and charges the real cost to the budgets it was held against. Returns
    /// how many holds it settled.
    pub async fn settle(&self, c: &Charge<'_>, now_ms: i64) -> RedisResult<i64> {
        let mut conn = self.redis.conn().await?;
        let mut inv = SETTLE.prepare_invoke();
        inv.key(self.conf_key());
        for s in c.scopes {
            inv.key(self.spend_key(s)).key(self.holds_key(s));
        }
        inv.arg(now_ms).arg(c.hold_id).arg(c.cost_nanos.max(0));
        for s in c.scopes {
            inv.arg(s);
        }
        inv.invoke_async(&mut conn).await
    }

    /// Writes a batch of usage counts (one pipeline). Minute buckets are kept a day, hour
    /// buckets 31 days.
    ///
    /// A bucket is a hash of `<group>|<key>|<c|p|o|n>` fields (cost n$, prompt and completion
    /// tokens, calls). Fleet-wide groups, as before tenants existed: `agent|<agent key>` (a
    /// tenant's agent as `<tenant>~<agent>`), `queue|<q>`, `model|<m>`, plus `tenant|<t>` (the
    /// default tenant as `default`). A tenant's own: `<t>~agent|<a>`, `<t>~queue|<q>`,
    /// `<t>~model|<m>`, one set per tenant (bounded by the tenant count).
    pub async fn record_usage(&self, batch: UsageBatch) -> RedisResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        // (bucket key, field) -> amount: each call counts under its groups, in its minute's and
        // its hour's bucket
        let mut adds: HashMap<(String, String), i64> = HashMap::new();
        let mut add = |key: &String, group: &str, c: &[i64; 4]| {
            for (what, v) in ["c", "p", "o", "n"].iter().zip(c) {
                let e = adds
                    .entry((key.clone(), format!("{group}|{what}")))
                    .or_insert(0);
                *e = e.saturating_add(*v);
            }
        };
        for (minute, tenants) in &batch.minutes {
            let keys = [
                self.usage_key("m", *minute),
                self.usage_key("h", minute / 60),
            ];
            for (tenant, queues) in tenants {
                let tenant = (!tenant.is_empty()).then_some(tenant.as_str());
                let own = |group: &str| tenant.map(|t| format!("{t}{TENANT_SEP}{group}"));
                let tenant_group =
                    format!("tenant|{}", tenant.unwrap_or(crate::tenant::DEFAULT_TENANT));
                for (queue, agents) in queues {
                    let queue_group = format!("queue|{queue}");
                    for (agent, models) in agents {
                        let agent_group = (!agent.is_empty())
                            .then(|| format!("agent|{}", crate::tenant::agent_key(tenant, agent)));
                        for (model, c) in models {
                            let model_group = format!("model|{model}");
                            for k in &keys {
                                if let Some(g) = &agent_group {
                                    add(k, g, c);
                                    if let Some(g) = own(&format!("agent|{agent}")) {
                                        add(k, &g, c);
                                    }
                                }
                                add(k, &queue_group, c);
                                add(k, &model_group, c);
                                add(k, &tenant_group, c);
                                for g in
                                    [own(&queue_group), own(&model_group)].into_iter().flatten()
                                {
                                    add(k, &g, c);
                                }
                            }
                        }
                    }
                }
            }
        }
        let mut pipe = redis::pipe();
        let mut keys: Vec<&String> = Vec::new();
        for ((key, field), v) in &adds {
            pipe.hincr(key, field, *v).ignore();
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        for k in keys {
            let ttl = if k.contains(":usage:m:") {
                86_400 + 120
            } else {
                31 * 86_400 + 7200
            };
            pipe.expire(k, ttl).ignore();
        }
        let mut conn = self.redis.conn().await?;
        pipe.query_async(&mut conn).await
    }

    /// Spend by `group_by` (`agent`, `queue` or `model`, and for the fleet view `tenant`) over
    /// the last `window_secs`, of the calls `view` covers: minute buckets for windows up to a
    /// day, hour buckets beyond (so the report's window is whole minutes or hours, the current
    /// one included).
    pub async fn usage(
        &self,
        view: UsageView<'_>,
        group_by: &str,
        window_secs: u64,
        now_ms: i64,
    ) -> RedisResult<Vec<UsageRow>> {
        let (grain, size_ms) = if window_secs <= 86_400 {
            ("m", 60_000i64)
        } else {
            ("h", 3_600_000i64)
        };
        let n = i64::try_from(window_secs.saturating_mul(1000)).unwrap_or(i64::MAX) / size_ms;
        let cur = now_ms / size_ms;
        let mut pipe = redis::pipe();
        for i in (cur - n.max(1) + 1)..=cur {
            pipe.hgetall(self.usage_key(grain, i));
        }
        let mut conn = self.redis.conn().await?;
        let buckets: Vec<HashMap<String, i64>> = pipe.query_async(&mut conn).await?;
        let mut rows: BTreeMap<String, UsageRow> = BTreeMap::new();
        let want = match view {
            UsageView::Fleet => format!("{group_by}|"),
            UsageView::Tenant(t) => format!("{t}{TENANT_SEP}{group_by}|"),
        };
        for b in &buckets {
            for (field, v) in b {
                let Some(rest) = field.strip_prefix(&want) else {
                    continue;
                };
                let Some((key, what)) = rest.rsplit_once('|') else {
                    continue;
                };
                let row = rows.entry(key.to_owned()).or_insert_with(|| UsageRow {
                    key: key.to_owned(),
                    ..UsageRow::default()
                });
                let v = (*v).max(0);
                match what {
                    "c" => row.cost_usd += usd(v),
                    "p" => row.prompt_tokens += v as u64,
                    "o" => row.completion_tokens += v as u64,
                    "n" => row.calls += v as u64,
                    _ => {}
                }
            }
        }
        let mut out: Vec<UsageRow> = rows.into_values().collect();
        out.sort_by(|a, b| b.cost_usd.total_cmp(&a.cost_usd).then(a.key.cmp(&b.key)));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_whole_minutes_hours_or_days_from_1m_to_30d() {
        assert_eq!(parse_window("1m"), Some(60));
        assert_eq!(parse_window("90m"), Some(5400));
        assert_eq!(parse_window("1h"), Some(3600));
        assert_eq!(parse_window("30d"), Some(2_592_000));
        for bad in [
            "",
            "m",
            "0m",
            "30s",
            "31d",
            "1w",
            "-1h",
            "1.5h",
            "h1",
            "1H",
            "99999999999999999999d",
        ] {
            assert_eq!(parse_window(bad), None, "{bad}");
        }
        assert_eq!(format_window(5400), "90m");
        assert_eq!(format_window(7200), "2h");
        assert_eq!(format_window(86_400), "1d");
    }

    #[test]
    fn scopes_are_global_or_a_kind_and_a_valid_name() {
        for ok in [
            "global",
            "queue:default",
            "agent:a-1.b/c",
            "model:gpt-4o-mini",
            "tenant:acme",
            "acme~global",
            "acme~agent:bot",
            "a-1_b~queue:default",
            "acme~model:m",
        ] {
            assert!(validate_scope(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "globalx",
            "team:x",
            "queue:",
            "queue:a.b",
            "agent:",
            "agent:a b",
            "model",
            "tenant:",
            "tenant:Acme",
            "tenant:a~b",
            "~global",
            "Acme~global",
            "acme~",
            "acme~tenant:acme",
            "acme~b~global",
            "acme~agent:a~b",
            "agent:a~b",
            "acme:x~global",
        ] {
            assert_eq!(
                validate_scope(bad).map_err(|e| e.field),
                Err("scope".into()),
                "{bad}"
            );
        }
        // what a tenant may name: plain scopes only
        for ok in ["global", "queue:q", "agent:bot", "model:m"] {
            assert!(validate_plain_scope(ok).is_ok(), "{ok}");
        }
        for bad in ["tenant:acme", "acme~global", "x"] {
            assert!(validate_plain_scope(bad).is_err(), "{bad}");
        }
        assert_eq!(
            split_tenant_scope("acme~agent:bot"),
            Some(("acme", "agent:bot"))
        );
        assert_eq!(split_tenant_scope("agent:bot"), None);
        assert_eq!(split_tenant_scope("tenant:acme"), None);
        assert_eq!(tenant_scope("acme", "global"), "acme~global");
        assert_eq!(scope_shown_to(Some("acme"), "acme~agent:bot"), "agent:bot");
        assert_eq!(scope_shown_to(Some("acme"), "tenant:acme"), "tenant:acme");
        assert_eq!(
            scope_shown_to(Some("b"), "acme~agent:bot"),
            "acme~agent:bot"
        );
        assert_eq!(scope_shown_to(None, "acme~agent:bot"), "acme~agent:bot");
    }

    #[test]
    fn a_tenants_call_falls_under_the_fleet_limits_its_quota_and_its_own_budgets() {
        // the default tenant: as before tenants existed
        let plain = ["global", "queue:q", "agent:bot", "model:m"];
        assert_eq!(scopes_of(None, "q", Some("bot"), "m"), plain);
        assert_eq!(scopes_of(Some("default"), "q", Some("bot"), "m"), plain);
        assert_eq!(
            scopes_of(None, "q", None, "m"),
            ["global", "queue:q", "model:m"]
        );
        // a tenant: not the operator's agent:bot (another tenant's agent may be called bot)
        assert_eq!(
            scopes_of(Some("acme"), "q", Some("bot"), "m"),
            [
                "global",
                "queue:q",
                "model:m",
                "tenant:acme",
                "acme~global",
                "acme~queue:q",
                "acme~agent:bot",
                "acme~model:m",
            ]
        );
        assert_eq!(
            scopes_of(Some("acme"), "q", None, "m"),
            [
                "global",
                "queue:q",
                "model:m",
                "tenant:acme",
                "acme~global",
                "acme~queue:q",
                "acme~model:m",
            ]
        );
        for s in scopes_of(Some("acme"), "q", Some("a-1.b/c:d"), "gpt-4o") {
            assert!(validate_scope(&s).is_ok(), "{s}");
        }
    }

    #[test]
    fn usage_batches_keep_tenants_apart() {
        let mut b = UsageBatch::default();
        b.count(60_000, None, Some("bot"), "q", "m", 1, 2, 3);
        b.count(60_001, Some("default"), Some("bot"), "q", "m", 1, 2, 3);
        b.count(60_002, Some("acme"), Some("bot"), "q", "m", 10, 20, 30);
        let minute = &b.minutes[&1];
        assert_eq!(minute[""]["q"]["bot"]["m"], [6, 2, 4, 2]);
        assert_eq!(minute["acme"]["q"]["bot"]["m"], [30, 10, 20, 1]);
    }

    #[test]
    fn a_bad_budget_names_its_field() {
        let body = |v: serde_json::Value| serde_json::from_value::<BudgetBody>(v).expect("shape");
        let field = |v: serde_json::Value| body(v).validate("global").map_err(|e| e.field);
        assert_eq!(
            field(serde_json::json!({"window": "1h"})),
            Err("limit_usd".into())
        );
        assert_eq!(
            field(serde_json::json!({"limit_usd": -1, "window": "1h"})),
            Err("limit_usd".into())
        );
        assert_eq!(
            field(serde_json::json!({"limit_usd": 0, "window": "1h"})),
            Err("limit_usd".into())
        );
        assert_eq!(
            field(serde_json::json!({"limit_usd": 5})),
            Err("window".into())
        );
        assert_eq!(
            field(serde_json::json!({"limit_usd": 5, "window": "2y"})),
            Err("window".into())
        );
        let b = body(serde_json::json!({"limit_usd": 5, "window": "60m", "mode": "calendar"}))
            .validate("agent:x")
            .expect("valid");
        assert_eq!(
            (b.limit_nanos, b.window.as_str(), b.mode),
            (5_000_000_000, "1h", Mode::Calendar)
        );
        assert_eq!(Budget::decode("agent:x", &b.encode()), Some(b));
    }

    #[test]
    fn costs_round_up_to_the_nano_dollar() {
        let p = crate::config::Price {
            prompt: 0.15,
            completion: 0.60,
        };
        // 1000 prompt tokens at $0.15/M = $0.00015 = 150_000 n$; 100 completion = 60_000 n$
        assert_eq!(cost_nanos(1000, 100, p), 210_000);
        assert_eq!(cost_nanos(1, 0, p), 150);
        assert_eq!(nanos_up(5.0), 5_000_000_000);
        assert_eq!(nanos_up(-1.0), 0);
    }
}
