//! Issue 19: agentq on a real Redis Cluster (6 local `redis-server`s: 3 masters, 3 replicas, made
//! by `redis-cli --cluster create`), the binaries in cluster mode (`REDIS_CLUSTER_NODES`).

use std::collections::HashSet;
use std::time::Duration;

use agentq_common::keys::TaskId;
use agentq_common::redis_conn::RedisTarget;
use agentq_common::{Broker, Redis};
use agentq_tests::{MockConfig, RedisCluster, Stack};
use secrecy::SecretString;
use serde_json::json;

/// Three queue names whose hash tags land on three different masters, so the test spreads
/// work over the whole cluster rather than hoping the names do.
fn queues_on_three_masters(c: &RedisCluster) -> anyhow::Result<Vec<String>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for i in 0..200 {
        let q = format!("q{i}");
        let m = c.master_of(&format!("{{{q}}}"))?;
        if seen.insert(m) {
            out.push(q);
            if out.len() == 3 {
                return Ok(out);
            }
        }
    }
    anyhow::bail!("no three queues on three masters")
}

/// A stack whose binaries speak to the cluster; its own standalone Redis is left unused (the
/// binaries ignore REDIS_URL in cluster mode, which this proves too: it stays empty).
async fn cluster_stack(c: &RedisCluster, queues: &[String]) -> anyhow::Result<Stack> {
    let mut s = Stack::new(MockConfig::default()).await?;
    s.env.insert("REDIS_CLUSTER_NODES".into(), c.seeds());
    s.env.insert("AGENTQ_QUEUES".into(), queues.join(","));
    Ok(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_queues_on_three_masters_run_each_task_once() -> anyhow::Result<()> {
    let c = RedisCluster::start()?;
    let queues = queues_on_three_masters(&c)?;
    let mut s = cluster_stack(&c, &queues).await?;
    s.start_api(&[]).await?;
    let mut workers = Vec::new();
    for q in &queues {
        workers.push(
            s.start_worker(&[("AGENTQ_QUEUE", q.as_str()), ("WORKER_CONCURRENCY", "8")])
                .await?,
        );
    }
    let mut ids = Vec::new();
    let mut prompts = Vec::new();
    for q in &queues {
        for i in 0..40 {
            let p = format!("{q}-task-{i}");
            ids.push(s.submit_json(&json!({"prompt": p, "queue": q})).await?);
            prompts.push(p);
        }
    }
    let done = s.wait_final(&ids, Duration::from_secs(60)).await?;
    for (p, t) in prompts.iter().zip(&done) {
        assert_eq!(t["status"], "succeeded", "{t}");
        assert_eq!(t["attempts"], 1, "{t}");
        assert_eq!(t["result"]["content"], format!("echo: {p}"));
        assert_eq!(s.mock.calls(p), 1, "{p} reached the LLM more than once");
    }
    assert_eq!(s.mock.total_calls(), 120);
    // every master holds its queue's keys; the standalone Redis of REDIS_URL was never written
    for q in &queues {
        let m = c.master_of(&format!("{{{q}}}"))?;
        let n: u64 = redis::cmd("DBSIZE").query(&mut c.nodes[m].conn()?)?;
        assert!(n > 0, "master {m} of {q} holds no keys");
        let v = s.queue(q).await?;
        assert_eq!(
            (
                v["pending"].as_u64(),
                v["inflight"].as_u64(),
                v["dead"].as_u64()
            ),
            (Some(0), Some(0), Some(0)),
            "{v}"
        );
    }
    assert_eq!(
        s.redis.dbsize()?,
        0,
        "REDIS_URL's server was used in cluster mode"
    );
    let logs = s.all_logs();
    assert!(
        logs.contains("REDIS_CLUSTER_NODES is set, so REDIS_URL is ignored"),
        "no cluster-mode notice at start"
    );
    // every script and pipeline kept to one slot: Redis would have refused it otherwise
    for refusal in ["CROSSSLOT", "non local key", "do not hash to the same slot"] {
        assert!(!logs.contains(refusal), "{refusal} in the logs");
    }
    agentq_tests::assert_no_panic(&s);
    Ok(())
}

/// The api's event hub in cluster mode (one non-blocking XREAD per queue's slot, woken when a
/// client joins): two clients on tasks of queues on different masters, subscribed before any
/// worker runs, each get their task's text as it streams, ending with `done`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_streams_of_queues_on_different_masters() -> anyhow::Result<()> {
    use agentq_tests::sse::{names, read};
    let c = RedisCluster::start()?;
    let queues = queues_on_three_masters(&c)?;
    let mut s = Stack::new(MockConfig {
        stream_rate: 400,
        ..MockConfig::default()
    })
    .await?;
    s.env.insert("REDIS_CLUSTER_NODES".into(), c.seeds());
    s.env.insert("AGENTQ_QUEUES".into(), queues.join(","));
    s.start_api(&[]).await?;
    let mut readers = Vec::new();
    for q in &queues[..2] {
        let prompt: String = (0..60).map(|i| format!("{q}w{i} ")).collect();
        let id = s
            .submit_json(&json!({"prompt": prompt, "queue": q}))
            .await?;
        let path = format!("/v1/tasks/{id}/events");
        let api = s.api_url.clone();
        readers.push((
            id,
            tokio::spawn(async move { read(&api, &path, None, None).await }),
        ));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut workers = Vec::new();
    for q in &queues[..2] {
        workers.push(s.start_worker(&[("AGENTQ_QUEUE", q.as_str())]).await?);
    }
    for (id, r) in readers {
        let live = r.await??;
        let n = names(&live);
        assert_eq!(n.first(), Some(&"status"), "{n:?}");
        assert_eq!(n.last(), Some(&"done"), "{n:?}");
        let text: String = live
            .iter()
            .filter(|e| e.event == "delta")
            .map(|e| e.data["text"].as_str().unwrap_or_default())
            .collect();
        let task = s.task(&id).await?;
        assert_eq!(task["status"], "succeeded", "{task}");
        assert_eq!(task["result"]["content"].as_str(), Some(text.as_str()));
        assert!(
            live.iter().filter(|e| e.event == "delta").count() >= 2,
            "the text came in pieces: {n:?}"
        );
    }
    assert_eq!(s.mock.total_calls(), 2);
    agentq_tests::assert_no_panic(&s);
    Ok(())
}

/// What the load of the failover test saw.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// k6 from the repo's `.venv` (`bash tests/peers/k6/install.sh`), or `K6` when set.
fn k6() -> anyhow::Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("K6") {
        return Ok(p.into());
    }
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/k6");
    anyhow::ensure!(
        p.exists(),
        "{} missing: run `bash tests/peers/k6/install.sh`",
        p.display()
    );
    Ok(p)
}

/// Issue 19's proof: a master SIGKILLed under load (k6 enqueueing, workers draining). Its
/// replica takes over; every task the api acknowledged with 202 reaches `succeeded`, with one
/// final record and one final event; the api answers 503 while it cannot vouch for a write (never
/// 500); the same worker processes go on without a restart. With the replica promoted and the old
/// master gone, the slot has no replica, so `WAIT 1` fails and enqueues are refused (503) until
/// the old master rejoins as the new one's replica: that refusal is the guarantee working.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_killed_under_load_loses_no_acknowledged_task() -> anyhow::Result<()> {
    let k6 = k6()?;
    let mut c = RedisCluster::start()?;
    let queues = queues_on_three_masters(&c)?;
    let q = queues[0].clone();
    let victim = c.master_of(&format!("{{{q}}}"))?;
    let mut s = Stack::new(MockConfig {
        latency: Duration::from_millis(50),
        ..MockConfig::default()
    })
    .await?;
    s.env.insert("REDIS_CLUSTER_NODES".into(), c.seeds());
    s.env.insert("AGENTQ_QUEUES".into(), q.clone());
    s.start_api(&[]).await?;
    let mut workers = Vec::new();
    for _ in 0..2 {
        workers.push(
            s.start_worker(&[("AGENTQ_QUEUE", q.as_str()), ("WORKER_CONCURRENCY", "8")])
                .await?,
        );
    }
    let worker_pids: Vec<u32> = workers.iter().map(|w| w.proc.pid()).collect();

    // 4 k6 clients for 20 s; every iteration ends (its 503s resent for up to 40 s) before k6 does
    let answers_file = s.logs.path().join("k6-answers.jsonl");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../loadtest/k6/failover.js");
    let mut k6_proc = agentq_tests::Proc::spawn(
        "k6",
        std::process::Command::new(&k6)
            .arg("run")
            .arg("--quiet")
            .arg("--no-usage-report")
            .arg("--no-color")
            .arg(format!("--console-output={}", answers_file.display()))
            .arg("--log-format=raw")
            .args(["-e", &format!("BASE_URL={}", s.api_url)])
            .args(["-e", &format!("QUEUE={q}")])
            .args(["-e", "VUS=4", "-e", "DURATION=20s"])
            .arg(&script),
        s.logs.path(),
    )?;
    let t0 = unix_ms();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed_at = unix_ms();
    c.nodes[victim].kill();
    // the replica is promoted: another node serves the slot
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while c.master_of(&format!("{{{q}}}"))? == victim {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no failover within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // the old master comes back (same port, same nodes.conf) as the new master's replica
    c.nodes[victim].resume()?;
    c.wait_ready(Duration::from_secs(30))?;
    let rejoined_at = unix_ms();
    anyhow::ensure!(
        rejoined_at < t0 + 16_000,
        "the cluster took {} ms to fail over and take the old master back: too late for k6's 20 s",
        rejoined_at - t0
    );
    let k6_status = tokio::task::spawn_blocking(move || {
        let st = k6_proc.wait_exit(Duration::from_secs(90));
        (k6_proc, st)
    });
    let (k6_proc, k6_status) = k6_status.await?;
    let k6_status = k6_status?;
    anyhow::ensure!(
        k6_status.success(),
        "k6 exited {k6_status}: {}",
        k6_proc.tail()
    );

    let text = std::fs::read_to_string(&answers_file)?;
    let mut acked: Vec<(String, String, u64)> = Vec::new();
    let (mut unavailable, mut other) = (0usize, Vec::new());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        // {"prompt", "status", "id" (202), "body" (others), "at": Unix ms}
        let a: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("k6 answer line {line:?}: {e}"))?;
        let (prompt, id) = (
            a["prompt"].as_str().unwrap_or_default().to_owned(),
            a["id"].as_str().unwrap_or_default().to_owned(),
        );
        match a["status"].as_u64() {
            Some(202) if !id.is_empty() => {
                acked.push((prompt, id, a["at"].as_u64().unwrap_or_default()))
            }
            Some(503) => unavailable += 1,
            _ => other.push(line.to_owned()),
        }
    }
    assert!(other.is_empty(), "answers other than 202/503: {:?}", other);
    let before_kill = acked.iter().filter(|a| a.2 < killed_at).count();
    assert!(before_kill > 0, "no load before the kill");
    assert!(
        acked.iter().any(|a| a.2 > rejoined_at),
        "nothing acknowledged after the old master rejoined"
    );
    let prompts: HashSet<&str> = acked.iter().map(|a| a.0.as_str()).collect();
    assert_eq!(
        prompts.len(),
        acked.len(),
        "a prompt acknowledged twice by k6"
    );

    let ids: Vec<String> = acked.iter().map(|a| a.1.clone()).collect();
    let done = s.wait_final(&ids, Duration::from_secs(90)).await?;
    let mut conn = c.client()?.get_async_connection().await?;
    // streams are written on demand (events.lua): following each task now writes its story, in
    // which a task that reached its end once has exactly one end
    let seeds = c
        .seeds()
        .split(',')
        .map(|u| SecretString::from(u.to_owned()))
        .collect();
    let broker = Broker::new(Redis::open_target(&RedisTarget::Cluster(seeds))?, "agentq");
    let mut seen = HashSet::new();
    for ((prompt, id, _), t) in acked.iter().zip(&done) {
        assert_eq!(t["status"], "succeeded", "{prompt}: {t}");
        assert_eq!(t["result"]["content"], format!("echo: {prompt}"), "{t}");
        assert!(seen.insert(id.clone()), "{id} acknowledged for two prompts");
        assert!(s.mock.calls(prompt) >= 1, "{prompt} never reached the LLM");
        let tid = TaskId::parse(id)?;
        assert!(broker.follow(&broker.keys(tid.queue()), &tid).await?);
        let events: Vec<redis::Value> = redis::cmd("XRANGE")
            .arg(format!("agentq:{{{q}}}:task:{id}:events"))
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await?;
        let finals = events
            .iter()
            .filter(|e| format!("{e:?}").contains("\"final\""))
            .count();
        assert_eq!(finals, 1, "{id}: {finals} final events");
    }
    // a run in flight on the lost master may have run again on its replica: the LLM may see
    // such a task twice (at most the runs in flight then), never a third time
    let calls = s.mock.total_calls() as usize;
    assert!(
        calls >= ids.len() && calls <= ids.len() + 16,
        "{calls} LLM calls for {} tasks",
        ids.len()
    );
    for w in &mut workers {
        assert!(w.proc.try_exit().is_none(), "a worker exited");
    }
    assert_eq!(
        workers.iter().map(|w| w.proc.pid()).collect::<Vec<_>>(),
        worker_pids
    );
    let logs = s.all_logs();
    assert!(!logs.contains("CROSSSLOT"), "CROSSSLOT in the logs");
    agentq_tests::assert_no_panic(&s);
    eprintln!(
        "failover (k6): {} acknowledged ({} before the kill), {} answers 503, {calls} LLM calls",
        ids.len(),
        before_kill,
        unavailable
    );
    Ok(())
}
