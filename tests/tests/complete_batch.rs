//! Batched completion (issue 20): a worker records its runs' results in groups, one
//! `complete_many.lua` call for many, and each item passes `complete.lua`'s fence on its own: a
//! cancelled or stolen run is refused alone while the others of its group land. One test drives
//! the script directly (every verdict in one call); the other runs real processes (api, workers,
//! the mock LLM) and checks every task's final record and the exact LLM calls.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agentq_common::keys::{Keys, TaskId};
use agentq_common::queue::{Completion, Fetched, MemoryWrite, NodeDone, StreamRest, UsageAdd};
use agentq_common::Broker;
use agentq_tests::fair::fair_violations;
use agentq_tests::{assert_no_panic, log_tails, task_key, MockConfig, Stack, Worker};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

const ACTIVE: &str = "agentq:{default}:active";
const TTL: Duration = Duration::from_secs(3600);

/// The product's broker on the stack's Redis, and the default queue's keys: for tests that act
/// as a worker themselves.
fn queue(s: &Stack) -> Result<(Broker, Keys)> {
    Ok((
        Broker::new(s.redis.agentq()?, "agentq"),
        Keys::new("agentq", "default"),
    ))
}

/// Fetches up to `n` tasks as worker `me` (no blocking wait, a 60 s heartbeat).
async fn fetch(broker: &Broker, keys: &Keys, me: &str, n: usize) -> Result<Fetched> {
    Ok(broker
        .fetch(keys, me, n, None, TTL, Duration::from_secs(60))
        .await?)
}

fn rec(c: &mut redis::Connection, id: &str) -> Result<HashMap<String, String>> {
    Ok(redis::cmd("HGETALL").arg(task_key(id)).query(c)?)
}

fn field<'a>(r: &'a HashMap<String, String>, f: &str) -> &'a str {
    r.get(f).map_or("", String::as_str)
}

fn lrange(c: &mut redis::Connection, key: &str) -> Result<Vec<String>> {
    Ok(redis::cmd("LRANGE").arg(key).arg(0).arg(-1).query(c)?)
}

fn zrange(c: &mut redis::Connection, key: &str) -> Result<Vec<String>> {
    Ok(redis::cmd("ZRANGE").arg(key).arg(0).arg(-1).query(c)?)
}

async fn wait_until<F: FnMut() -> Result<bool>>(
    what: &str,
    timeout: Duration,
    mut f: F,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = f();
        if let Ok(true) = last {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: not true after {timeout:?} (last: {last:?})");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The worker's log lines as JSON objects.
fn log_json(w: &Worker) -> Vec<Value> {
    w.proc
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

fn get<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    // flattened as the spec says; nested under "fields" is accepted too
    v.get(name).or_else(|| v["fields"].get(name))
}

/// The verdicts of the runs a worker reported for `id` ("task finished" lines, DEBUG).
fn verdicts(w: &Worker, id: &str) -> Vec<String> {
    log_json(w)
        .iter()
        .filter(|v| v["message"] == "task finished")
        .filter(|v| get(v, "task.id").and_then(Value::as_str) == Some(id))
        .map(|v| {
            get(v, "verdict")
                .and_then(Value::as_str)
                .unwrap_or("<none>")
                .to_owned()
        })
        .collect()
}

/// The sizes of the groups a worker wrote ("completions written", DEBUG), in order.
fn groups(w: &Worker) -> Vec<u64> {
    log_json(w)
        .iter()
        .filter(|v| v["message"] == "completions written")
        .filter_map(|v| get(v, "items").and_then(Value::as_u64))
        .collect()
}

fn completion(id: &str, token: &str, content: &str) -> Completion {
    Completion {
        id: id.to_owned(),
        token: token.to_owned(),
        result_json: json!({ "content": content }).to_string(),
        ..Completion::default()
    }
}

/// Every verdict complete.lua can give, in one call: a success, a cancelled task, a run whose
/// token another run replaced, a resend of a result already written (its first verdict, nothing
/// rewritten), a record that is gone, a success with memory, usage and stream text, and an item
/// whose body fails. Each is answered on its own and only the owners' writes land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_answers_each_item_by_its_own_fence() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(s.submit(&format!("direct {i}")).await?);
    }
    let me = "batch-test-worker";
    let (broker, keys) = queue(&s)?;
    let fetched = fetch(&broker, &keys, me, 7).await?;
    ensure!(fetched.started.len() == 7, "fetched {:?}", fetched.started);
    let token: HashMap<String, String> = fetched
        .started
        .iter()
        .map(|t| (t.id.clone(), t.token.clone()))
        .collect();
    let tok = |i: usize| token[&ids[i]].clone();
    let mut c = s.redis.conn()?;
    // 1: cancelled while running; 2: another run took it (its token replaced, as recovery and a
    // new fetch would); 3: already written once; 4: the record is gone
    s.cancel(&ids[1]).await?;
    let _: () = redis::cmd("HSET")
        .arg(task_key(&ids[2]))
        .arg("token")
        .arg("99")
        .query(&mut c)?;
    let first = broker
        .complete(
            &keys,
            me,
            &ids[3],
            &tok(3),
            &json!({"content": "first"}).to_string(),
            TTL,
            None,
            None,
            None,
            &StreamRest::default(),
        )
        .await?;
    assert_eq!(first, "ok");
    let _: () = redis::cmd("DEL").arg(task_key(&ids[4])).query(&mut c)?;
    let mut with_memory = completion(&ids[5], &tok(5), "remembered");
    with_memory.memory = Some(MemoryWrite {
        agent_key: "batch-agent".to_owned(),
        messages: vec![
            json!({"role": "user", "content": "direct 5"}).to_string(),
            json!({"role": "assistant", "content": "remembered"}).to_string(),
        ],
        keep: 10,
        ttl: TTL,
    });
    with_memory.usage = Some(UsageAdd {
        prompt: 3,
        completion: 4,
        cached: 0,
        cost_nanos: 5,
    });
    with_memory.rest = StreamRest {
        text: "remembered".to_owned(),
        step: 0,
        unacked: None,
    };
    // a client follows 5 (its stream is on: the final entry carries the rest of the text); 0 is
    // followed by nobody until it is final
    ensure!(broker.follow(&keys, &TaskId::parse(&ids[5])?).await?);
    // 6: a node whose plan is not JSON: its body fails after the fence (as complete.lua alone
    // would), and only that item is answered with the error
    let mut broken = completion(&ids[6], &tok(6), "broken");
    broken.node = Some(NodeDone {
        output: "x".to_owned(),
        children: Some("{not json".to_owned()),
    });
    let items = [
        completion(&ids[0], &tok(0), "zero"),
        completion(&ids[1], &tok(1), "one"),
        completion(&ids[2], &tok(2), "two"),
        completion(&ids[3], &tok(3), "second"),
        completion(&ids[4], &tok(4), "four"),
        with_memory,
        broken,
    ];
    let refs: Vec<&Completion> = items.iter().collect();
    let answers = broker.complete_many(&keys, me, &refs, TTL).await?;
    let got: Vec<String> = answers
        .iter()
        .map(|a| match a {
            Ok(v) => v.clone(),
            Err(_) => "<error>".to_owned(),
        })
        .collect();
    assert_eq!(
        got,
        ["ok", "cancelled", "stale", "ok", "missing", "ok", "<error>"],
        "{answers:?}"
    );
    let r0 = rec(&mut c, &ids[0])?;
    assert_eq!(field(&r0, "status"), "succeeded", "{r0:?}");
    assert_eq!(field(&r0, "result"), r#"{"content":"zero"}"#);
    assert_eq!(field(&r0, "reported"), format!("{}|ok", tok(0)));
    assert_eq!(r0.get("token"), None, "{r0:?}");
    let r1 = rec(&mut c, &ids[1])?;
    assert_eq!(field(&r1, "status"), "cancelled", "{r1:?}");
    assert_eq!(
        r1.get("result"),
        None,
        "a cancelled task keeps no result: {r1:?}"
    );
    let r2 = rec(&mut c, &ids[2])?;
    assert_eq!(
        field(&r2, "status"),
        "running",
        "the other run's task: {r2:?}"
    );
    assert_eq!(field(&r2, "token"), "99");
    assert_eq!(field(&r2, "fenced"), "1");
    assert_eq!(r2.get("result"), None);
    let r3 = rec(&mut c, &ids[3])?;
    assert_eq!(
        field(&r3, "result"),
        r#"{"content":"first"}"#,
        "written once"
    );
    let r5 = rec(&mut c, &ids[5])?;
    assert_eq!(field(&r5, "status"), "succeeded", "{r5:?}");
    assert_eq!(field(&r5, "usage"), "3|4|0|1|5");
    let memory = lrange(&mut c, "agentq:{default}:memory:batch-agent")?;
    assert_eq!(memory.len(), 2, "{memory:?}");
    // the stream's last entry carries the rest of the text with the final status
    let events: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(format!("{}:events", task_key(&ids[5])))
        .arg("-")
        .arg("+")
        .query(&mut c)?;
    let last = &events.last().context("events")?.1;
    assert_eq!(field(last, "e"), "final");
    assert!(
        field(last, "d").contains(r#""text":"remembered""#),
        "{last:?}"
    );
    // nobody followed 0: no stream was written; its first follower gets the run's start and its
    // end rebuilt from the record, the answer's text with it (events.lua, "Streams on demand")
    let stream0 = format!("{}:events", task_key(&ids[0]));
    let exists: bool = redis::cmd("EXISTS").arg(&stream0).query(&mut c)?;
    ensure!(!exists, "an unfollowed task's stream was written");
    ensure!(broker.follow(&keys, &TaskId::parse(&ids[0])?).await?);
    let events: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(&stream0)
        .arg("-")
        .arg("+")
        .query(&mut c)?;
    let kinds: Vec<&str> = events.iter().map(|e| field(&e.1, "e")).collect();
    assert_eq!(kinds, ["started", "final"], "{events:?}");
    let run = format!(r#"{{"attempt":1,"run":{}}}"#, tok(0));
    assert_eq!(field(&events[0].1, "d"), run);
    let end: Value = serde_json::from_str(field(&events[1].1, "d"))?;
    assert_eq!(end["status"], "succeeded", "{end}");
    assert_eq!(end["delta"]["text"], "zero", "{end}");
    assert_eq!(end["delta"]["attempt"], 1, "{end}");
    let ttl: i64 = redis::cmd("TTL").arg(&stream0).query(&mut c)?;
    ensure!(ttl > 0, "the stream expires with its record (TTL {ttl})");
    // a second follower changes nothing
    ensure!(broker.follow(&keys, &TaskId::parse(&ids[0])?).await?);
    let n: usize = redis::cmd("XLEN").arg(&stream0).query(&mut c)?;
    assert_eq!(n, 2);
    // only the run another run owns is still listed (never this run's to remove); `active`
    // keeps it, and the id whose record was gone (complete.lua leaves that one to the sweep)
    let left = lrange(&mut c, &keys.inflight(me))?;
    let which: Vec<usize> = left
        .iter()
        .filter_map(|l| ids.iter().position(|i| i == l))
        .collect();
    assert_eq!(which, [2], "{left:?}");
    let mut active: Vec<usize> = zrange(&mut c, ACTIVE)?
        .iter()
        .filter_map(|l| ids.iter().position(|i| i == l))
        .collect();
    active.sort_unstable();
    assert_eq!(active, [2, 4]);
    // a resend of the whole group after a lost reply gets the same verdicts and writes nothing
    let again = broker.complete_many(&keys, me, &refs[..6], TTL).await?;
    let again: Vec<String> = again.into_iter().map(|a| a.unwrap_or_default()).collect();
    assert_eq!(again, ["ok", "cancelled", "stale", "ok", "missing", "ok"]);
    assert_eq!(field(&rec(&mut c, &ids[2])?, "fenced"), "2");
    assert_eq!(
        rec(&mut c, &ids[5])?.get("usage").map(String::as_str),
        Some("3|4|0|1|5")
    );
    assert_eq!(
        lrange(&mut c, "agentq:{default}:memory:batch-agent")?.len(),
        2
    );
    Ok(())
}

/// Real processes: worker A writes its results in groups (a long wait, so each group is every
/// result of a phase). Phase 1: 40 plain tasks and 4 agents' tasks succeed in one group with 8
/// tasks cancelled after their call; the 8 are refused alone. Phase 2: A stalls (SIGSTOP) with a
/// group waiting; 2 of its tasks are cancelled and worker B recovers and reruns the other 4; A
/// wakes and writes the group: 4 stale, 2 cancelled, B's results stand. Every record is final as
/// it should be, with the exact calls, and the lists are clean.
/// One fetch that starts 600 runs (more than `fetch.lua` adds to `active` in one `ZADD`): every
/// run is in `active` at its start time and counted in `running`, each record's token is its
/// `runs` count (1 for a first run), and a run given back and taken again gets the next token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_fetch_starts_every_run_with_its_own_token_in_active() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let tasks: Vec<Value> = (0..600)
        .map(|i| json!({"prompt": format!("large fetch {i}")}))
        .collect();
    let r = s
        .http
        .post(format!("{}/v1/tasks/batch", s.api_url))
        .json(&json!({ "tasks": tasks }))
        .send()
        .await?;
    ensure!(r.status() == 202, "batch: {}", r.status());
    let me = "large-fetch-worker";
    let (broker, keys) = queue(&s)?;
    let fetched = fetch(&broker, &keys, me, 600).await?;
    ensure!(fetched.started.len() == 600, "{}", fetched.started.len());
    let mut c = s.redis.conn()?;
    let active: Vec<(String, i64)> = redis::cmd("ZRANGE")
        .arg("agentq:{default}:active")
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(&mut c)?;
    ensure!(active.len() == 600, "{} in active", active.len());
    for (id, score) in &active {
        let r = rec(&mut c, id)?;
        ensure!(field(&r, "status") == "running", "{id}: {r:?}");
        ensure!(
            field(&r, "token") == "1" && field(&r, "runs") == "1",
            "{id}: {r:?}"
        );
        ensure!(
            field(&r, "started_at") == score.to_string(),
            "{id}: {r:?} at {score}"
        );
    }
    let running: String = redis::cmd("HGET")
        .arg("agentq:{default}:running")
        .arg("default")
        .query(&mut c)?;
    ensure!(running == "600", "running counts {running}");
    let fair = fair_violations(&mut c, true)?;
    ensure!(fair.is_empty(), "{fair:?}");

    let first = &fetched.started[0];
    let back = broker
        .return_unstarted(&keys, me, &first.id, Some(&first.token))
        .await?;
    ensure!(back == "queued", "{back}");
    let again = fetch(&broker, &keys, me, 1).await?;
    let ids: Vec<(&str, &str)> = again
        .started
        .iter()
        .map(|t| (t.id.as_str(), t.token.as_str()))
        .collect();
    ensure!(ids == [(first.id.as_str(), "2")], "{ids:?}");
    let r = rec(&mut c, &first.id)?;
    ensure!(
        field(&r, "runs") == "2" && field(&r, "token") == "2",
        "{r:?}"
    );
    ensure!(s.mock.total_calls() == 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_lands_while_its_cancelled_and_stolen_runs_are_refused_alone() -> Result<()> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.start_api(&[]).await?;
    let logs = [
        ("AGENTQ_LOG_FORMAT", "json"),
        ("RUST_LOG", "info,agentq_worker=debug,agentq_common=debug"),
        ("AGENTQ_HEARTBEAT_SECS", "3"),
        ("AGENTQ_LLM_TIMEOUT_SECS", "30"),
        ("WORKER_CONCURRENCY", "64"),
    ];
    let mut a_env = logs.to_vec();
    a_env.extend([
        ("WORKER_COMPLETE_BATCH", "100"),
        ("WORKER_COMPLETE_WAIT_MS", "3000"),
    ]);
    let a = s.start_worker(&a_env).await?;
    let mut c = s.redis.conn()?;

    // ---- phase 1: one group, some of it cancelled after the call ----
    let plain: Vec<String> = (0..40).map(|i| format!("plain {i}")).collect();
    let agents: Vec<String> = (0..4).map(|i| format!("agent {i}")).collect();
    let doomed: Vec<String> = (0..8).map(|i| format!("doomed {i}")).collect();
    let mut id_of: HashMap<String, String> = HashMap::new();
    for p in plain.iter().chain(&doomed) {
        id_of.insert(p.clone(), s.submit(p).await?);
    }
    for (i, p) in agents.iter().enumerate() {
        let id = s
            .submit_json(&json!({"prompt": p, "agent_id": format!("bot-{i}")}))
            .await?;
        id_of.insert(p.clone(), id);
    }
    let mock = s.mock.clone();
    let all1: Vec<&String> = plain.iter().chain(&agents).chain(&doomed).collect();
    wait_until(
        "every phase-1 call reached the mock",
        Duration::from_secs(15),
        || Ok(all1.iter().all(|p| mock.calls(p) == 1)),
    )
    .await
    .with_context(|| log_tails(&s))?;
    // the calls answered at once (0 ms): the runs left their execute step and wait in A's group
    tokio::time::sleep(Duration::from_millis(300)).await;
    for p in &doomed {
        s.cancel(&id_of[p]).await?;
    }
    let ids1: Vec<String> = all1.iter().map(|p| id_of[*p].clone()).collect();
    let done = s
        .wait_final(&ids1, Duration::from_secs(20))
        .await
        .with_context(|| log_tails(&s))?;
    let by_id: HashMap<&str, &Value> = ids1.iter().map(String::as_str).zip(&done).collect();
    for p in plain.iter().chain(&agents) {
        let t = by_id[id_of[p].as_str()];
        assert_eq!(t["status"], "succeeded", "{p}: {t}");
        assert_eq!(t["result"]["content"], format!("echo: {p}"), "{t}");
        assert_eq!(verdicts(&a, &id_of[p]), ["ok"], "{p}");
    }
    for p in &doomed {
        let t = by_id[id_of[p].as_str()];
        assert_eq!(t["status"], "cancelled", "{p}: {t}");
        let r = rec(&mut c, &id_of[p])?;
        assert_eq!(
            r.get("result"),
            None,
            "{p}: refused, nothing written: {r:?}"
        );
        assert_eq!(
            verdicts(&a, &id_of[p]),
            ["cancelled"],
            "{p}: refused in the group"
        );
    }
    for (i, p) in agents.iter().enumerate() {
        let memory = lrange(&mut c, &format!("agentq:{{default}}:memory:bot-{i}"))?;
        assert_eq!(
            memory.len(),
            2,
            "{p}: the exchange appended with the result: {memory:?}"
        );
    }
    assert!(
        groups(&a).contains(&52),
        "all 52 results of phase 1 in one call: {:?}",
        groups(&a)
    );

    // ---- phase 2: A stalls holding a group; cancels and a rescue meanwhile ----
    let stolen: Vec<String> = (0..4).map(|i| format!("stolen {i}")).collect();
    let dropped: Vec<String> = (0..2).map(|i| format!("dropped {i}")).collect();
    for p in stolen.iter().chain(&dropped) {
        id_of.insert(p.clone(), s.submit(p).await?);
    }
    let all2: Vec<&String> = stolen.iter().chain(&dropped).collect();
    wait_until(
        "every phase-2 call reached the mock",
        Duration::from_secs(15),
        || Ok(all2.iter().all(|p| mock.calls(p) == 1)),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a_id = field(&rec(&mut c, &id_of[&stolen[0]])?, "worker").to_owned();
    a.proc.freeze();
    for p in &dropped {
        s.cancel(&id_of[p]).await?;
    }
    // B's reruns take a while, so A wakes while B still owns the tasks
    s.mock.set_latency(Duration::from_secs(3));
    let b = s.start_worker(&logs).await?;
    wait_until(
        "B recovered and reruns the stolen tasks",
        Duration::from_secs(20),
        || {
            let mut ok = true;
            for p in &stolen {
                let r = rec(&mut c, &id_of[p])?;
                ok &= field(&r, "status") == "running"
                    && field(&r, "worker") != a_id
                    && mock.calls(p) == 2;
            }
            Ok(ok)
        },
    )
    .await
    .with_context(|| log_tails(&s))?;
    a.proc.thaw();
    let ids2: Vec<String> = all2.iter().map(|p| id_of[*p].clone()).collect();
    let done = s
        .wait_final(&ids2, Duration::from_secs(20))
        .await
        .with_context(|| log_tails(&s))?;
    s.mock.set_latency(Duration::ZERO);
    for (p, t) in all2.iter().zip(&done) {
        let id = &id_of[*p];
        let r = rec(&mut c, id)?;
        if p.starts_with("stolen") {
            assert_eq!(t["status"], "succeeded", "{p}: B's result stands: {t}");
            assert_eq!(mock.calls(p), 2, "{p}: A's call and B's");
            assert_eq!(verdicts(&a, id), ["stale"], "{p}: A's late item");
            assert_eq!(verdicts(&b, id), ["ok"], "{p}");
            for (f, n) in [("fenced", "1"), ("recovered", "1"), ("runs", "2")] {
                assert_eq!(field(&r, f), n, "{p}: {f} in {r:?}");
            }
        } else {
            assert_eq!(t["status"], "cancelled", "{p}: {t}");
            assert_eq!(mock.calls(p), 1, "{p}");
            assert_eq!(verdicts(&a, id), ["cancelled"], "{p}: A's late item");
            assert!(verdicts(&b, id).is_empty(), "{p}: never rerun");
        }
    }
    assert!(
        groups(&a).contains(&6),
        "A's late group held all 6: {:?}",
        groups(&a)
    );
    // exact calls for everything, and nothing left anywhere
    for p in plain.iter().chain(&agents).chain(&doomed) {
        assert_eq!(mock.calls(p), 1, "{p}");
    }
    assert_eq!(zrange(&mut c, ACTIVE)?, Vec::<String>::new());
    let lists: Vec<String> = redis::cmd("KEYS")
        .arg("agentq:{default}:inflight:*")
        .query(&mut c)?;
    for l in lists {
        assert_eq!(lrange(&mut c, &l)?, Vec::<String>::new(), "{l}");
    }
    let fair = fair_violations(&mut c, true)?;
    assert!(fair.is_empty(), "{fair:?}");
    assert_no_panic(&s);
    Ok(())
}
