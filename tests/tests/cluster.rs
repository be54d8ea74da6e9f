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
