//! Issue 19: agentq on a real Redis Cluster (6 local `redis-server`s: 3 masters, 3 replicas, made
//! by `redis-cli --cluster create`), the binaries in cluster mode (`REDIS_CLUSTER_NODES`).

use std::collections::HashSet;
use std::time::Duration;

use agentq_tests::{MockConfig, RedisCluster, Stack};
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
#[derive(Default)]
struct Load {
    /// (prompt, task id, acknowledged after the old master came back as a replica)
    acked: Vec<(String, String, bool)>,
    unavailable: usize,
    other: Vec<String>,
}

/// Issue 19's proof: a master SIGKILLed under load (clients enqueueing, workers draining). Its
/// replica takes over; every task the api acknowledged with 202 reaches `succeeded`, with one
/// final record and one final event; the api answers 503 while it cannot vouch for a write (never
/// 500); the same worker processes go on without a restart. With the replica promoted and the old
/// master gone, the slot has no replica, so `WAIT 1` fails and enqueues are refused (503) until
/// the old master rejoins as the new one's replica: that refusal is the guarantee working.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_killed_under_load_loses_no_acknowledged_task() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
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

    let stop = Arc::new(AtomicBool::new(false));
    let rejoined = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Mutex::new(Load::default()));
    let mut posters = Vec::new();
    for k in 0..4 {
        let (http, url, q) = (s.http.clone(), s.api_url.clone(), q.clone());
        let (stop, rejoined, load) = (stop.clone(), rejoined.clone(), load.clone());
        posters.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let prompt = format!("fo-{k}-{i}");
                i += 1;
                // a 503 is resent with the same Idempotency-Key until it is acknowledged
                let deadline = std::time::Instant::now() + Duration::from_secs(40);
                while std::time::Instant::now() < deadline {
                    let r = http
                        .post(format!("{url}/v1/tasks"))
                        .header("Idempotency-Key", &prompt)
                        .json(&json!({"prompt": prompt, "queue": q}))
                        .send()
                        .await;
                    let (status, body) = match r {
                        Ok(r) => {
                            let st = r.status().as_u16();
                            (st, r.json::<serde_json::Value>().await.unwrap_or_default())
                        }
                        Err(e) => (0, json!({"transport": e.to_string()})),
                    };
                    let acked = {
                        let mut l = load.lock().expect("load");
                        match status {
                            202 => {
                                let id = body["id"].as_str().unwrap_or_default().to_owned();
                                l.acked.push((
                                    prompt.clone(),
                                    id,
                                    rejoined.load(Ordering::Relaxed),
                                ));
                                true
                            }
                            503 => {
                                l.unavailable += 1;
                                false
                            }
                            _ => {
                                l.other.push(format!("{status} {body}"));
                                true
                            }
                        }
                    };
                    if acked {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_kill = load.lock().expect("load").acked.len();
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
    rejoined.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for p in posters {
        p.await?;
    }
    let load = std::mem::take(&mut *load.lock().expect("load"));
    assert!(
        load.other.is_empty(),
        "answers other than 202/503: {:?}",
        load.other
    );
    assert!(before_kill > 0, "no load before the kill");
    assert!(
        load.acked.iter().any(|a| a.2),
        "nothing acknowledged after the old master rejoined"
    );

    let ids: Vec<String> = load.acked.iter().map(|a| a.1.clone()).collect();
    let done = s.wait_final(&ids, Duration::from_secs(90)).await?;
    let mut conn = c.client()?.get_async_connection().await?;
    let mut seen = HashSet::new();
    for ((prompt, id, _), t) in load.acked.iter().zip(&done) {
        assert_eq!(t["status"], "succeeded", "{prompt}: {t}");
        assert_eq!(t["result"]["content"], format!("echo: {prompt}"), "{t}");
        assert!(seen.insert(id.clone()), "{id} acknowledged for two prompts");
        assert!(s.mock.calls(prompt) >= 1, "{prompt} never reached the LLM");
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
        "failover: {} acknowledged ({} before the kill), {} answers 503, {calls} LLM calls",
        ids.len(),
        before_kill,
        load.unavailable
    );
    Ok(())
}
