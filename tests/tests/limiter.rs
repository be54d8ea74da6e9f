//! The flow limiter's scripts (`common/src/flow/*.lua`) against a real `redis-server`, exactly:
//! the seeded window, admissions per second, turns for parked tasks, settlement to the usage
//! reported, concurrency leases (released, and expiring on their own), blocks, learned limits,
//! calls too large for a minute, and state lost with Redis. The end-to-end proofs with workers and
//! the mock's quota are in `flow.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use agentq_common::flow::{
    Admission, Limiter, Limits, Line, Refusal, Reservation, Route, Settlement, Upstream, Upstreams,
};
use agentq_tests::RedisServer;
use anyhow::{bail, Result};
use redis::AsyncCommands;
use secrecy::SecretString;

fn upstream(limits: Limits, model_limits: &[(&str, Limits)]) -> Upstream {
    Upstream {
        name: "up".to_owned(),
        base_url: "http://127.0.0.1:1".to_owned(),
        api_key: SecretString::from(String::new()),
        models: vec!["m".to_owned()],
        limits,
        model_limits: model_limits
            .iter()
            .map(|(m, l)| ((*m).to_owned(), *l))
            .collect::<BTreeMap<_, _>>(),
        prices: BTreeMap::new(),
    }
}

/// An upstream whose model `m` alone has limits.
fn model_limited(l: Limits) -> Upstream {
    upstream(Limits::default(), &[("m", l)])
}

fn route(u: &Upstream) -> Route<'_> {
    Route {
        upstream: u,
        model: "m",
        model_limits: u.limits_for("m"),
    }
}

async fn setup() -> Result<(RedisServer, Limiter, agentq_common::redis_conn::Conn)> {
    let redis = RedisServer::start()?;
    let r = redis.agentq()?;
    let conn = r.conn().await?;
    Ok((redis, Limiter::new(r, "agentq"), conn))
}

async fn reserve(l: &Limiter, r: &Route<'_>, tokens: u64, lease: &str, park: bool) -> Admission {
    let line = if park { Line::Join } else { Line::Probe };
    l.reserve(r, false, tokens, lease, Duration::from_secs(30), line)
        .await
        .expect("reserve.lua runs")
}

async fn redis_ms(conn: &mut agentq_common::redis_conn::Conn) -> Result<i64> {
    let (s, us): (i64, i64) = redis::cmd("TIME").query_async(conn).await?;
    Ok(s * 1000 + us / 1000)
}

/// Waits until Redis's clock is just past a second boundary, so a test's steps fall in one second.
async fn start_of_second(conn: &mut agentq_common::redis_conn::Conn) -> Result<()> {
    let ms = redis_ms(conn).await? % 1000;
    tokio::time::sleep(Duration::from_millis((1000 - ms as u64) + 20)).await;
    Ok(())
}

fn admitted(a: Admission) -> Result<Reservation> {
    match a {
        Admission::Admitted(r) => Ok(r),
        other => bail!("expected an admission, got {other:?}"),
    }
}

/// Concurrency slots a scope holds: its leases, a grant's weighing its slots (`gextra` counts
/// what grants' leases weigh beyond one each).
async fn slots_held(conn: &mut agentq_common::redis_conn::Conn, scope: &str) -> Result<i64> {
    let leases: i64 = conn.zcard(format!("{scope}:leases")).await?;
    let extra: Option<i64> = conn.hget(scope, "gextra").await?;
    Ok(leases + extra.unwrap_or(0))
}

/// Settles `held` at the same moment: the even ones served (7 tokens used), the odd ones never
/// reached the upstream (a 429: the request and its tokens handed back).
async fn settle_together(l: &Limiter, held: Vec<Reservation>, latency: Duration) -> Result<()> {
    let settles = held.into_iter().enumerate().map(|(i, r)| {
        let l = l.clone();
        tokio::spawn(async move {
            let unserved = i % 2 == 1;
            l.reconcile(
                &r,
                Settlement {
                    used_tokens: if unserved { None } else { Some(7) },
                    not_served: unserved,
                    latency,
                },
            )
            .await
        })
    });
    for s in futures::future::join_all(settles).await {
        s??;
    }
    Ok(())
}

/// Script calls Redis has run so far (every limiter step is one EVALSHA).
async fn evalsha_calls(conn: &agentq_common::redis_conn::Conn) -> Result<u64> {
    let mut c = conn.clone();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0))
}

/// `n` reservations (the `i`th of `tokens(i)`, lease `<tag><i>`) asked at the same moment, as a
/// fetched batch of runs asks them; their answers in order.
async fn reserve_together(
    l: &Limiter,
    u: &Upstream,
    n: usize,
    tokens: fn(usize) -> u64,
    tag: &str,
    line: Line,
) -> Result<Vec<Admission>> {
    let calls = (0..n).map(|i| {
        let (l, u, lease, tokens) = (l.clone(), u.clone(), format!("{tag}{i}"), tokens(i));
        tokio::spawn(async move {
            l.reserve(
                &route(&u),
                false,
                tokens,
                &lease,
                Duration::from_secs(30),
                line,
            )
            .await
        })
    });
    let mut out = Vec::with_capacity(n);
    for c in futures::future::join_all(calls).await {
        out.push(c??);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_scope_admits_at_the_steady_rate_and_parked_tasks_take_turns() -> Result<()> {
    let (_redis, l, mut conn) = setup().await?;
    let u = model_limited(Limits {
        rpm: Some(120),
        ..Limits::default()
    });
    let r = route(&u);
    start_of_second(&mut conn).await?;
    // Seeded as a minute used up evenly: nothing this second (no burst), 2 per second after.
    let now = redis_ms(&mut conn).await?;
    let mut turns = Vec::new();
    for i in 0..4 {
        match reserve(&l, &r, 10, &format!("p{i}"), true).await {
            Admission::Wait {
                eligible_at_ms,
                reason,
                limit,
            } => {
                assert_eq!((reason, limit), (Refusal::Rpm, 120));
                turns.push(eligible_at_ms);
            }
            other => bail!("a fresh scope admitted a burst: {other:?}"),
        }
    }
    // the first room opens when the oldest seeded bucket leaves, within the next second; parked
    // tasks are given turns 61 s / 120 = 508 ms apart (a bucket counts for 61 s)
    assert!(
        turns[0] > now && turns[0] <= now + 1000,
        "{turns:?} vs {now}"
    );
    for w in turns.windows(2) {
        assert_eq!(w[1] - w[0], 508, "{turns:?}");
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // a newcomer does not overtake the line, even with room this instant
    match l
        .reserve(&r, false, 10, "new", Duration::from_secs(30), Line::Join)
        .await?
    {
        Admission::Wait { eligible_at_ms, .. } => {
            assert_eq!(
                eligible_at_ms,
                turns[3] + 508,
                "the next turn after the line"
            )
        }
        other => bail!("a newcomer overtook the parked tasks: {other:?}"),
    }
    // the turn holders are served: exactly one second's share of 120 rpm
    let mut this_second = 0;
    for i in 0..5 {
        if matches!(
            l.reserve(
                &r,
                false,
                10,
                &format!("a{i}"),
                Duration::from_secs(30),
                Line::Turn
            )
            .await?,
            Admission::Admitted(_)
        ) {
            this_second += 1;
        }
    }
    assert_eq!(this_second, 2, "one second's share of 120 rpm");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn settlement_returns_unused_tokens_and_unserved_requests() -> Result<()> {
    let (_redis, l, mut conn) = setup().await?;
    let big = Limits {
        rpm: Some(60_000),
        tpm: Some(6_000_000),
        concurrency: None,
    };
    let u = upstream(big, &[("m", big)]);
    let r = route(&u);
    // the first call seeds both scopes full (refused); a second later there is room
    assert!(matches!(
        reserve(&l, &r, 1, "seed", false).await,
        Admission::Wait { .. }
    ));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let key = "agentq:limiter:{up}:model:m";
    let sums = |c: &mut agentq_common::redis_conn::Conn| {
        let mut c = c.clone();
        async move {
            let v: (i64, i64) = c.hmget(key, &["rsum", "tsum"][..]).await?;
            anyhow::Ok(v)
        }
    };
    start_of_second(&mut conn).await?;
    // sums are brought up to date (expired buckets dropped) by each reserve: one first, so the
    // rest of the test happens inside this second against fresh sums
    admitted(reserve(&l, &r, 1, "w", false).await)?;
    let before = sums(&mut conn).await?;
    let res = admitted(reserve(&l, &r, 4_200, "x", false).await)?;
    assert_eq!(sums(&mut conn).await?, (before.0 + 1, before.1 + 4_200));
    l.reconcile(
        &res,
        Settlement {
            used_tokens: Some(37),
            not_served: false,
            latency: Duration::from_millis(80),
        },
    )
    .await?;
    assert_eq!(
        sums(&mut conn).await?,
        (before.0 + 1, before.1 + 37),
        "4,163 unused tokens returned, the request stays counted"
    );
    let up: (i64, i64) = conn
        .hmget("agentq:limiter:{up}", &["rsum", "tsum"][..])
        .await?;
    let res2 = admitted(reserve(&l, &r, 500, "y", false).await)?;
    l.reconcile(
        &res2,
        Settlement {
            used_tokens: None,
            not_served: true,
            latency: Duration::ZERO,
        },
    )
    .await?;
    assert_eq!(
        sums(&mut conn).await?,
        (before.0 + 1, before.1 + 37),
        "a 429 hands back the request and all its tokens"
    );
    let up_after: (i64, i64) = conn
        .hmget("agentq:limiter:{up}", &["rsum", "tsum"][..])
        .await?;
    assert_eq!(up, up_after, "the upstream scope is settled the same way");
    let lat: i64 = conn.hget(key, "lat").await?;
    assert_eq!(lat, 80);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_leases_are_released_and_expire_on_their_own() -> Result<()> {
    let (_redis, l, _conn) = setup().await?;
    let u = upstream(
        Limits {
            concurrency: Some(2),
            ..Limits::default()
        },
        &[],
    );
    let r = route(&u);
    let a = admitted(reserve(&l, &r, 10, "a", false).await)?;
    // b's lease lasts 1 s: a worker killed mid-call gives its slot back by itself
    let _b = admitted(
        l.reserve(&r, false, 10, "b", Duration::from_secs(1), Line::Probe)
            .await?,
    )?;
    match reserve(&l, &r, 10, "c", false).await {
        Admission::Wait { reason, limit, .. } => {
            assert_eq!((reason, limit), (Refusal::Concurrency, 2))
        }
        other => bail!("third concurrent call admitted: {other:?}"),
    }
    l.reconcile(
        &a,
        Settlement {
            used_tokens: Some(5),
            not_served: false,
            latency: Duration::from_millis(10),
        },
    )
    .await?;
    admitted(reserve(&l, &r, 10, "c", false).await)?;
    assert!(matches!(
        reserve(&l, &r, 10, "d", false).await,
        Admission::Wait { .. }
    ));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    admitted(reserve(&l, &r, 10, "d", false).await)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn blocks_learned_limits_and_calls_too_large() -> Result<()> {
    let (_redis, l, mut conn) = setup().await?;
    let u = model_limited(Limits {
        tpm: Some(1_000),
        ..Limits::default()
    });
    let r = route(&u);
    match reserve(&l, &r, 1_001, "big", true).await {
        Admission::TooLarge { tpm } => assert_eq!(tpm, 1_000),
        other => bail!("a call above a minute's tokens: {other:?}"),
    }
    let until = redis_ms(&mut conn).await? + 1_500;
    assert_eq!(l.learn(&r, false, until, 0, 0).await?, until);
    match reserve(&l, &r, 1, "x", false).await {
        Admission::Wait {
            eligible_at_ms,
            reason,
            ..
        } => {
            assert_eq!(reason, Refusal::Blocked);
            assert!(eligible_at_ms >= until, "{eligible_at_ms} < {until}");
        }
        other => bail!("blocked model admitted: {other:?}"),
    }
    // an earlier block never shortens a later one
    l.learn(&r, false, until - 1_000, 0, 0).await?;
    let b: i64 = conn
        .hget("agentq:limiter:{up}:model:m", "blocked_until")
        .await?;
    assert_eq!(b, until);
    // a learned rpm of 1 below the configured (none) binds; a window started by learning starts
    // empty (the reply that taught it says where the upstream stands), so one call fits
    let other = upstream(Limits::default(), &[]);
    let r2 = Route {
        upstream: &other,
        model: "n",
        model_limits: Limits::default(),
    };
    admitted(reserve(&l, &r2, 1, "n1", false).await)?;
    l.learn(&r2, true, 0, 1, 0).await?;
    admitted(reserve(&l, &r2, 1, "n2", false).await)?;
    match reserve(&l, &r2, 1, "n3", false).await {
        Admission::Wait { reason, limit, .. } => assert_eq!((reason, limit), (Refusal::Rpm, 1)),
        other => bail!("learned limit ignored: {other:?}"),
    }
    let snap = l
        .snapshot(&Upstreams {
            list: vec![u.clone()],
            implicit: false,
            default_model: "m".to_owned(),
        })
        .await?;
    assert_eq!(snap[0].model_states[0].model, "m");
    assert!(snap[0].model_states[0].blocked_until.is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn state_lost_with_redis_is_seeded_full_again() -> Result<()> {
    let (mut redis, l, mut conn) = setup().await?;
    let u = model_limited(Limits {
        rpm: Some(60),
        ..Limits::default()
    });
    let r = route(&u);
    assert!(matches!(
        reserve(&l, &r, 1, "seed", false).await,
        Admission::Wait { .. }
    ));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // a second later the seeded window frees one request: admitted
    admitted(reserve(&l, &r, 1, "a", false).await)?;
    redis.kill();
    redis.resume()?;
    // Redis came back empty: the next call reseeds, as if the provider had seen a full minute
    let mut refused = false;
    for _ in 0..50 {
        match l
            .reserve(&r, false, 1, "b", Duration::from_secs(30), Line::Probe)
            .await
        {
            Ok(Admission::Wait { reason, .. }) => {
                assert_eq!(reason, Refusal::Rpm);
                refused = true;
                break;
            }
            Ok(other) => bail!("after losing its state the limiter admitted a burst: {other:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(refused, "Redis never came back");
    let rsum: i64 = conn.hget("agentq:limiter:{up}:model:m", "rsum").await?;
    assert_eq!(rsum, 60, "reseeded with the full minute");
    Ok(())
}

/// Reservations and settlements that arrive together on one route share a script call (group
/// commit), and are decided exactly as one by one: no more admitted than the limit, every
/// refused newcomer given its own turn in the line, every lease ended by its settlement.
#[tokio::test(flavor = "multi_thread")]
async fn calls_asking_together_share_a_script_and_are_decided_one_by_one() -> Result<()> {
    let (_redis, l, mut conn) = setup().await?;
    // each call decided by its own reservation (as near a limit), not admitted from a grant
    let l = l.with_grants(false);
    let u = upstream(
        Limits {
            concurrency: Some(7),
            ..Limits::default()
        },
        &[],
    );
    let before = evalsha_calls(&conn).await?;
    let mut held = Vec::new();
    let mut turns = Vec::new();
    for a in reserve_together(&l, &u, 40, |_| 10, "c", Line::Join).await? {
        match a {
            Admission::Admitted(r) => held.push(r),
            Admission::Wait {
                eligible_at_ms,
                reason,
                limit,
            } => {
                assert_eq!((reason, limit), (Refusal::Concurrency, 7));
                turns.push(eligible_at_ms);
            }
            other => bail!("unexpected {other:?}"),
        }
    }
    let scripts = evalsha_calls(&conn).await? - before;
    assert_eq!(held.len(), 7, "exactly the concurrency limit admitted");
    assert!(
        scripts < 20,
        "40 reservations asked together took {scripts} script calls"
    );
    // each refused newcomer took the next turn: one call's time under the limit apart
    // (1,000 ms assumed latency / 7 slots), none sharing a turn
    turns.sort_unstable();
    for w in turns.windows(2) {
        assert_eq!(w[1] - w[0], 142, "{turns:?}");
    }
    let leases: u64 = conn.zcard("agentq:limiter:{up}:leases").await?;
    assert_eq!(leases, 7);
    let settles = held.into_iter().map(|r| {
        let l = l.clone();
        tokio::spawn(async move {
            l.reconcile(
                &r,
                Settlement {
                    used_tokens: Some(3),
                    not_served: false,
                    latency: Duration::from_millis(100),
                },
            )
            .await
        })
    });
    for s in futures::future::join_all(settles).await {
        s??;
    }
    let leases: u64 = conn.zcard("agentq:limiter:{up}:leases").await?;
    assert_eq!(leases, 0, "every settlement ended its lease");

    // counted limits: 20 calls reserved together, settled together, half of them never served
    // (a 429): the window ends as if each had been settled alone
    let big = Limits {
        rpm: Some(60_000),
        tpm: Some(60_000_000),
        concurrency: None,
    };
    // another upstream: the first part left a line of parked turns on {up}
    let mut u = model_limited(big);
    u.name = "up2".to_owned();
    let key = "agentq:limiter:{up2}:model:m";
    assert!(matches!(
        reserve(&l, &route(&u), 1, "seed", false).await,
        Admission::Wait { .. }
    ));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    start_of_second(&mut conn).await?;
    admitted(reserve(&l, &route(&u), 1, "w", false).await)?;
    let (r0, t0): (i64, i64) = conn.hmget(key, &["rsum", "tsum"][..]).await?;
    let mut held = Vec::new();
    for a in reserve_together(&l, &u, 20, |i| 100 + i as u64, "k", Line::Probe).await? {
        held.push(admitted(a)?);
    }
    let (r1, t1): (i64, i64) = conn.hmget(key, &["rsum", "tsum"][..]).await?;
    let reserved: i64 = (0..20).map(|i| 100 + i).sum();
    assert_eq!((r1, t1), (r0 + 20, t0 + reserved));
    settle_together(&l, held, Duration::from_millis(50)).await?;
    let (r2, t2): (i64, i64) = conn.hmget(key, &["rsum", "tsum"][..]).await?;
    assert_eq!(
        (r2, t2),
        (r0 + 10, t0 + 10 * 7),
        "10 served calls of 7 tokens counted; 10 unserved handed back with all their tokens"
    );
    Ok(())
}

/// Two scopes refusing at once (an upstream's rpm and the same rpm for its only model, as when the
/// model learned the upstream's own limit from its headers: both windows hold the same calls): a
/// refused task lines up in the longer line, never at the next second's edge of a scope with no
/// line while tasks wait in the other's. (Binding the first scope let newcomers and refused turn
/// holders overtake the upstream's whole line, in batches at every second's edge.)
#[tokio::test(flavor = "multi_thread")]
async fn a_task_refused_by_two_scopes_joins_the_longer_line() -> Result<()> {
    let (_redis, l, mut conn) = setup().await?;
    let rpm = Limits {
        rpm: Some(120),
        ..Limits::default()
    };
    let u = upstream(rpm, &[("m", rpm)]);
    let r = route(&u);
    start_of_second(&mut conn).await?;
    // both windows are seeded full: refused by both, and the first refusal starts a line
    let first = match reserve(&l, &r, 1, "seed", true).await {
        Admission::Wait { eligible_at_ms, .. } => eligible_at_ms,
        other => bail!("a fresh scope admitted a burst: {other:?}"),
    };
    // the upstream's line is long (a backlog parked on it); the model's has ended
    let now = redis_ms(&mut conn).await?;
    let end = now + 60_000;
    let _: () = conn
        .hset_multiple(
            "agentq:limiter:{up}",
            &[("cursor", end.to_string()), ("line", "rpm".to_owned())],
        )
        .await?;
    let _: () = conn
        .hset("agentq:limiter:{up}:model:m", "cursor", first)
        .await?;
    for (i, line) in [Line::Join, Line::Turn, Line::Join].into_iter().enumerate() {
        match l
            .reserve(
                &r,
                false,
                1,
                &format!("t{i}"),
                Duration::from_secs(30),
                line,
            )
            .await?
        {
            Admission::Wait { eligible_at_ms, .. } => assert_eq!(
                eligible_at_ms,
                end + i as i64 * 508,
                "{line:?} refused by both scopes: the next turn after the upstream's line"
            ),
            other => bail!("admitted with both windows full: {other:?}"),
        }
    }
    Ok(())
}

/// Grants: a route called many times a moment takes a share of its limits in one script call and
/// admits its calls from it with none; counted up front in the window like that many calls, it
/// settles in one item once over. Checked exactly: many calls cost few scripts, while calls are
/// held the window counts at least them, and once every call has settled and the grants have
/// ended the window holds exactly what was served (requests and tokens), with no lease left, as
/// if each call had been reserved and settled on its own. A block written by another worker
/// reaches a grant holder when its grant ends: within `GRANT_SPAN` (100 ms).
#[tokio::test(flavor = "multi_thread")]
async fn a_hot_route_takes_grants_that_settle_exactly_and_end_at_a_block() -> Result<()> {
    let (_redis, l, mut conn) = setup().await?;
    let u = model_limited(Limits {
        rpm: Some(600_000),
        tpm: Some(600_000_000),
        concurrency: Some(10_000),
    });
    let key = "agentq:limiter:{up}:model:m";
    // an idle window, far from every limit (a fresh scope would be seeded full)
    let sec = redis_ms(&mut conn).await? / 1000;
    let _: () = redis::cmd("HSET")
        .arg(key)
        .arg("head")
        .arg(sec - 60)
        .arg("rsum")
        .arg(0)
        .arg("tsum")
        .arg(0)
        .query_async(&mut conn)
        .await?;
    const WAVES: usize = 10;
    const WAVE: usize = 50;
    let before = evalsha_calls(&conn).await?;
    let mut held = Vec::new();
    for w in 0..WAVES {
        for a in reserve_together(&l, &u, WAVE, |_| 100, &format!("w{w}c"), Line::Join).await? {
            held.push(admitted(a)?);
        }
    }
    let scripts = evalsha_calls(&conn).await? - before;
    let n = (WAVES * WAVE) as i64;
    let (r1, t1): (i64, i64) = conn.hmget(key, &["rsum", "tsum"][..]).await?;
    let leases = slots_held(&mut conn, key).await?;
    println!("grants: {n} calls held with {scripts} script calls; window {r1} requests, {t1} tokens, {leases} leases");
    assert!(
        scripts * 5 <= n as u64,
        "{n} calls took {scripts} script calls: no grants"
    );
    assert!(
        r1 >= n && t1 >= n * 100 && leases >= n,
        "every call held counts: {r1} requests, {t1} tokens, {leases} leases"
    );
    // settle: even calls served (7 tokens each), odd ones never reached the upstream
    settle_together(&l, held, Duration::from_millis(40)).await?;
    // grants end within their span; the last one's settlement follows at once
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (r2, t2): (i64, i64) = conn.hmget(key, &["rsum", "tsum"][..]).await?;
    let leases = slots_held(&mut conn, key).await?;
    let weights: Vec<String> = conn.hkeys(key).await?;
    assert!(
        !weights.iter().any(|f| f.starts_with("gw:")),
        "a grant's weight left: {weights:?}"
    );
    assert_eq!(
        (r2, t2, leases),
        (n / 2, n / 2 * 7, 0),
        "the window holds exactly the served calls' requests and tokens, and no lease"
    );
    let lat: i64 = conn.hget(key, "lat").await?;
    assert_eq!(lat, 40, "the calls' latency moved the average");

    let served = Settlement {
        used_tokens: Some(7),
        not_served: false,
        latency: Duration::from_millis(40),
    };
    // a block written by another worker: a grant holder's calls are refused once its grant ends
    let mut held = Vec::new();
    for a in reserve_together(&l, &u, WAVE, |_| 100, "b", Line::Join).await? {
        held.push(admitted(a)?);
    }
    let other = Limiter::new(_redis.agentq()?, "agentq");
    let until = redis_ms(&mut conn).await? + 5_000;
    other.learn(&route(&u), false, until, 0, 0).await?;
    tokio::time::sleep(Duration::from_millis(110)).await;
    match reserve(&l, &route(&u), 100, "after", true).await {
        Admission::Wait {
            eligible_at_ms,
            reason: Refusal::Blocked,
            ..
        } => assert_eq!(eligible_at_ms, until),
        other => bail!("a call {other:?} after the grant's span, during a block"),
    }
    for r in held {
        l.reconcile(&r, served).await?;
    }

    // a block this worker learns itself (its own 429) ends its grant at once
    // (the block lifted, and the line the refused call joined behind it gone)
    let _: () = conn
        .hdel(key, &["blocked_until", "cursor", "line"][..])
        .await?;
    let mut held = Vec::new();
    for a in reserve_together(&l, &u, WAVE, |_| 100, "c", Line::Join).await? {
        held.push(admitted(a)?);
    }
    held.push(admitted(
        reserve(&l, &route(&u), 100, "from-grant", true).await,
    )?);
    let until = redis_ms(&mut conn).await? + 5_000;
    l.learn(&route(&u), false, until, 0, 0).await?;
    match reserve(&l, &route(&u), 100, "own", true).await {
        Admission::Wait {
            reason: Refusal::Blocked,
            ..
        } => {}
        other => bail!("a call {other:?} right after this worker learned a block"),
    }
    for r in held {
        l.reconcile(&r, served).await?;
    }
    // (and the grants of the parts above end and settle)
    tokio::time::sleep(Duration::from_millis(200)).await;

    // a worker that dies holding a grant: its slots end with the grant's lease, all at once
    let _: () = conn
        .hdel(key, &["blocked_until", "cursor", "line"][..])
        .await?;
    let u2 = model_limited(Limits {
        concurrency: Some(10_000),
        ..Limits::default()
    });
    // a call that outlives the crash: the leases do not all expire at once
    let long = admitted(reserve(&l, &route(&u2), 1, "long", false).await)?;
    assert_eq!(slots_held(&mut conn, key).await?, 1);
    let dying = Limiter::new(_redis.agentq()?, "agentq");
    let mut held = Vec::new();
    for w in 0..3 {
        let calls = (0..WAVE).map(|i| {
            let (l, u) = (dying.clone(), u2.clone());
            tokio::spawn(async move {
                let lease = format!("d{w}-{i}");
                l.reserve(
                    &route(&u),
                    false,
                    1,
                    &lease,
                    Duration::from_millis(300),
                    Line::Join,
                )
                .await
            })
        });
        for c in futures::future::join_all(calls).await {
            held.push(admitted(c??)?);
        }
    }
    let granted = held.iter().filter(|r| r.from_grant()).count();
    let in_use = slots_held(&mut conn, key).await?;
    assert!(granted > 0, "no call of {} taken from a grant", held.len());
    assert!(
        in_use > held.len() as i64,
        "{in_use} slots held for {} calls in flight and one more",
        held.len()
    );
    drop(held); // never settled: the worker is gone
    tokio::time::sleep(Duration::from_millis(600)).await;
    admitted(reserve(&l, &route(&u2), 1, "after-crash", false).await)?;
    assert_eq!(
        slots_held(&mut conn, key).await?,
        2,
        "the dead worker's grant slots expired with its lease; the live calls' remain"
    );
    let done = Settlement {
        used_tokens: Some(1),
        not_served: false,
        latency: Duration::from_millis(40),
    };
    l.reconcile(&long, done).await?;
    Ok(())
}
